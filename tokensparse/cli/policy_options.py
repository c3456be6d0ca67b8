"""--policy and every policy's own options, generated from the policy dataclasses (tokensparse.policies.POLICIES).

Each field a user sets becomes `--name` (underscores as dashes), typed from its annotation: int, float, str,
bool (`--name` / `--no-name`), a number (Union[int, float]: a count or a fraction), a list of ints (Sequence or
tuple; Union[int, Sequence[int]] passes one value as an int). Fields with repr=False are set internally and are
left out. An option not given takes the dataclass's own default; one given to a policy that has no such field
is named in a warning."""

from __future__ import annotations

import argparse
import dataclasses
import numbers
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

NONE = "none"           # export the model unchanged (export only)

# argument kinds: how the command line spells a field's value
INT, FLOAT, NUMBER, STR, BOOL, INTS = "int", "float", "number", "str", "bool", "ints"


@dataclass(frozen=True)
class PolicyField:
    name: str
    kind: str
    one_or_many: bool       # Union[int, Sequence[int]]: a single value is passed as an int
    default: object


def _kind(annotation) -> tuple[str, bool] | None:
    """(kind, one_or_many) of a field's annotation, or None for a type the command line cannot spell."""
    if annotation in (bool, int, float, str):
        return {bool: BOOL, int: INT, float: FLOAT, str: STR}[annotation], False
    if annotation is tuple:
        return INTS, False
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (tuple, Sequence, list) and all(arg in (int, Ellipsis) for arg in args):
        return INTS, False
    if origin is typing.Union:
        options = [arg for arg in args if arg is not type(None)]
        if len(options) == 1:
            return _kind(options[0])
        if set(options) == {int, float}:
            return NUMBER, False
        kinds = {_kind(arg) for arg in options}
        if kinds == {(INT, False), (INTS, False)}:
            return INTS, True
    return None


@cache
def policy_fields(cls) -> tuple:
    """The fields of a policy dataclass that the command line sets, in declaration order."""
    hints = typing.get_type_hints(cls)
    fields = []
    for field in dataclasses.fields(cls):
        kind = _kind(hints.get(field.name))
        if not field.init or not field.repr or kind is None:
            continue
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        fields.append(PolicyField(field.name, *kind, default))
    return tuple(fields)


def skipped_fields(cls) -> list:
    """The init fields left off the command line although shown in repr (a type it cannot spell)."""
    spelled = {field.name for field in policy_fields(cls)}
    return [field.name for field in dataclasses.fields(cls) if field.init and field.repr and field.name not in spelled]


def _role(cls) -> str:
    from tokensparse.policies import KVPolicy, LanguagePolicy

    return "kv" if issubclass(cls, KVPolicy) else "llm" if issubclass(cls, LanguagePolicy) else "vision"


ROLES = {"vision": "a vision encoder", "llm": "a VLM's language model (its vision tokens)",
         "kv": "a decoder's KV cache"}


def policies_for(roles=("vision", "llm", "kv")) -> dict:
    """name -> policy class, for the roles a subcommand can run."""
    from tokensparse.policies import POLICIES

    return {name: cls for name, cls in POLICIES.items() if _role(cls) in roles}


def _number(text: str):
    try:
        return int(text)
    except ValueError:
        return float(text)


ARGUMENT = {INT: {"type": int}, FLOAT: {"type": float}, NUMBER: {"type": _number}, STR: {"type": str},
            BOOL: {"action": argparse.BooleanOptionalAction}, INTS: {"type": int, "nargs": "+"}}
MERGED = {frozenset({INT, FLOAT}): NUMBER, frozenset({INT, NUMBER}): NUMBER, frozenset({FLOAT, NUMBER}): NUMBER,
          frozenset({INT, INTS}): INTS}


def options_by_name(policies: dict) -> dict:
    """option name -> {policy name: PolicyField}, over the given policies."""
    options: dict = {}
    for policy, cls in policies.items():
        for field in policy_fields(cls):
            options.setdefault(field.name, {})[policy] = field
    return options


def _shared_kind(name: str, fields: dict) -> str:
    kinds = frozenset(field.kind for field in fields.values())
    if len(kinds) == 1:
        return next(iter(kinds))
    if kinds in MERGED:
        return MERGED[kinds]
    raise TypeError(f"the policies' field {name!r} has kinds {sorted(kinds)} that one option cannot take: rename one")


def add_policy_options(parser: argparse.ArgumentParser, policies: dict, allow_none: bool = False) -> None:
    """--policy (choices: the given policies, and `none` with allow_none) and one option per policy field."""
    group = parser.add_argument_group("policy (each option defaults to the chosen policy's own default)")
    by_role = {}
    for name, cls in policies.items():
        by_role.setdefault(_role(cls), []).append(name)
    described = "; ".join(f"{ROLES[role]}: {', '.join(names)}" for role, names in by_role.items())
    group.add_argument("--policy", choices=[*policies, *([NONE] if allow_none else [])],
                       help=f"(required) {described}" + ("; none: unchanged" if allow_none else ""))
    for name, fields in options_by_name(policies).items():
        kind = _shared_kind(name, fields)
        defaults = ", ".join(f"{policy} {_shown(field.default)}" for policy, field in fields.items())
        group.add_argument("--" + name.replace("_", "-"), dest=name, default=None,
                           metavar=None if kind == BOOL else name.upper(), help=f"{kind}; default: {defaults}",
                           **ARGUMENT[kind])


def _shown(value) -> str:
    if isinstance(value, (tuple, list)):
        return " ".join(map(str, value)) if value else "()"
    return str(value)


def required_message(policies: dict, allow_none: bool = False) -> str:
    by_role = {}
    for name, cls in policies.items():
        by_role.setdefault(_role(cls), []).append(name)
    choices = "; ".join(f"{', '.join(names)} for {ROLES[role]}" for role, names in by_role.items())
    return f"--policy is required: {choices}" + ("; none to export the model unchanged" if allow_none else "")


def given_policy_options(args: argparse.Namespace, policies: dict) -> set:
    return {name for name in options_by_name(policies) if getattr(args, name, None) is not None}


def ignored_policy_options(args: argparse.Namespace, policies: dict) -> list:
    """A warning for each policy option given that --policy does not read, naming the policies that do."""
    flag = lambda name: "--" + name.replace("_", "-")  # noqa: E731
    warnings = []
    for name, fields in options_by_name(policies).items():
        if getattr(args, name, None) is not None and args.policy not in fields:
            users = [f"--policy {policy}" for policy in fields]
            said = users[0] if len(users) == 1 else f"{', '.join(users[:-1])} and {users[-1]}"
            warnings.append(f"{flag(name)} is ignored with --policy {args.policy}: it is read by {said}")
    return warnings


def _value(field: PolicyField, value):
    if field.kind == INTS:
        value = tuple(value) if isinstance(value, (list, tuple)) else (value,)
        return value[0] if field.one_or_many and len(value) == 1 else value
    if field.kind == INT and isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
        raise ValueError(f"--{field.name.replace('_', '-')} {value} must be an integer")
    if field.kind == FLOAT:
        return float(value)
    return value


def policy_from_args(args: argparse.Namespace):
    """The policy --policy names, with the options given and the dataclass defaults for the rest (None for
    --policy none). A bad value is the policy's own ValueError."""
    from tokensparse.policies import POLICIES

    if args.policy == NONE:
        return None
    cls = POLICIES[args.policy]
    given = {field.name: _value(field, getattr(args, field.name)) for field in policy_fields(cls)
             if getattr(args, field.name, None) is not None}
    return cls(**given)


def config_from_policy(policy):
    """A Config with the policy in its slot: vision=, llm= or kv=."""
    from tokensparse import Config

    return Config() if policy is None else Config(**{_role(type(policy)): policy})
