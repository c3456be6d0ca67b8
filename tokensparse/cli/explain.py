"""`tokensparse explain`: what a policy does to a model (tokens entering each block, FLOPs, the language model's
cut), without compiling; optionally the merge picture."""

from __future__ import annotations

import argparse
import sys

from tokensparse.cli.errors import UserError
from tokensparse.cli.policy_options import (add_policy_options, config_from_policy, ignored_policy_options,
                                            policies_for, policy_from_args, required_message)

EXAMPLES = """examples:
  tokensparse explain --model vit_base_patch16_224 --random-init --policy tome --r 13 --png out/merges.png
  tokensparse explain --model path/to/llava_config_dir --random-init --policy fastv --layer 2 --keep 0.25

exit status: 0 done, 2 bad input
"""


def parser(prog: str = "tokensparse explain") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_argument_group("model")
    source.add_argument("--model", default="vit_base_patch16_224",
                        help="a timm model name, or a Hugging Face config/checkpoint directory (LLaVA included)")
    source.add_argument("--random-init", action="store_true", help="random seeded weights (no download)")
    source.add_argument("--checkpoint", help="a state_dict file for a timm model")
    source.add_argument("--batch", type=int, default=1, help="batch of the example input")
    add_policy_options(parser, policies_for())
    parser.add_argument("--png", help="write the picture of the tokens each block keeps (vision encoders)")
    return parser


def main(argv=None, prog: str = "tokensparse explain") -> int:
    command = parser(prog)
    args = command.parse_args(argv)
    if args.policy is None:
        command.error(required_message(policies_for()))
    for warning in ignored_policy_options(args, policies_for()):
        print(f"warning: {warning}", file=sys.stderr)
    try:
        return run(args)
    except (UserError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def run(args) -> int:
    import tokensparse
    from tokensparse.cli.models import load_model

    if args.batch < 1:
        raise UserError(f"--batch {args.batch} is out of range: it must be at least 1")
    config = config_from_policy(policy_from_args(args))
    loaded = load_model(args.model, args.random_init, args.checkpoint, args.batch)
    report = tokensparse.explain(loaded.model, loaded.inputs, config=config)
    print(report)
    if args.png:
        report.save_png(args.png)
        print(f"wrote {args.png}")
    return 0
