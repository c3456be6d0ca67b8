"""Print tokensparse.explain() for a timm model (random init) and optionally save the merge picture.

    .venv/bin/python tools/explain.py --model vit_base_patch16_224 --policy tome --r 13 --png out/merges.png
"""

import argparse

import torch


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_base_patch16_224", help="a timm model name (random init)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--policy", default="tome", choices=["tome", "topk"])
    parser.add_argument("--r", type=int, default=13)
    parser.add_argument("--schedule", default="constant", choices=["constant", "decreasing"])
    parser.add_argument("--layers", type=int, nargs="+", default=[3, 6, 9])
    parser.add_argument("--keep", type=float, default=0.7)
    parser.add_argument("--fuse", action="store_true")
    parser.add_argument("--png", default=None)
    args = parser.parse_args(argv)

    import timm

    import tokensparse

    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval()
    pixels = torch.randn(args.batch, *model.default_cfg.get("input_size", (3, 224, 224)))
    if args.policy == "tome":
        policy = tokensparse.ToMe(r=args.r, schedule=args.schedule)
    else:
        policy = tokensparse.TopK(layers=tuple(args.layers), keep=args.keep, fuse=args.fuse)
    report = tokensparse.explain(model, pixels, config=tokensparse.Config(vision=policy))
    print(report)
    if args.png:
        report.save_png(args.png)
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
