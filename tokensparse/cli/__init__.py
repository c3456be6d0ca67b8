"""The `tokensparse` command: `tokensparse export`, `tokensparse explain`, `tokensparse bench`. Each subcommand
is one module with parser(prog) and main(argv); the policy options of all three are generated from the policy
dataclasses (tokensparse.cli.policy_options)."""

from __future__ import annotations

import argparse
import importlib
import sys

DESCRIPTION = "Token pruning and merging for vision transformers and VLMs: export, explain, bench."
COMMANDS = {
    "export": ("tokensparse.cli.export", "export to ONNX with a policy built in, or rewrite an ONNX file; "
                                         "TensorRT engine and Triton server repository (experimental)"),
    "explain": ("tokensparse.cli.explain", "what a policy does to a model, block by block, without compiling"),
    "bench": ("tokensparse.cli.bench", "time a timm ViT unpruned and pruned, in PyTorch or ONNX Runtime"),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokensparse", description=DESCRIPTION,
                                     epilog="`tokensparse COMMAND --help` lists a command's options.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, summary) in COMMANDS.items():
        commands.add_parser(name, help=summary, add_help=False)
    return parser


def main(argv=None) -> int:
    """Run `tokensparse COMMAND ...`; returns the command's exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        _parser().parse_args(argv)       # --help, or a usage error naming the commands
        return 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:], prog=f"tokensparse {argv[0]}")
