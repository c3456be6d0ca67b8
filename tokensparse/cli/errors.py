"""The error every subcommand raises for a bad command line or input: printed without a traceback, exit status 2."""


class UserError(Exception):
    """A problem with the command line or its inputs, printed without a traceback."""
