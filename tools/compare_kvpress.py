"""Compare the KV positions tokensparse keeps with the ones kvpress keeps, on the same model and prompt.

    .venv/bin/python tools/compare_kvpress.py [--setup] [--prompt 256] [--ratio 0.5] [--window 32]

kvpress pins transformers<5.3, so it runs in its own environment, .venv-kvpress: `--setup` (or its absence)
creates it with `kvpress==0.5.5` and a transformers below 5.3, and a .pth file that lends it this project's
torch (no second torch download). One Llama (random, seeded weights, GQA) is built here and saved; the
worker (tools/kvpress_worker.py) rebuilds it there from the same config and weights and records the
positions each press keeps after prefill. tokensparse's positions come from its eviction reference
(reference/kv.py), which the compiled passes are tested to equal, with the same number kept per layer.

Methods both have: SnapKV (SnapKVPress), StreamingLLM (StreamingLLMPress) and key norm (KnormPress against
tokensparse's KeyNorm). Reported per method: the share of kvpress's kept positions that tokensparse keeps
too (over every layer, sample and KV head), and the share of (layer, sample, head) sets that are equal.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
ENV = ROOT / ".venv-kvpress"
REQUIREMENTS = ["kvpress==0.5.5", "transformers>=4.56,<5.3"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setup", action="store_true", help="(re)install kvpress's environment first")
    parser.add_argument("--prompt", type=int, default=256, help="prompt length")
    parser.add_argument("--ratio", type=float, default=0.5, help="kvpress compression_ratio (share evicted)")
    parser.add_argument("--window", type=int, default=32, help="SnapKV's observation window")
    parser.add_argument("--sinks", type=int, default=4, help="StreamingLLM's sink positions")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    return parser.parse_args(argv)


def ensure_environment(force: bool) -> Path:
    """kvpress's own virtual environment, borrowing this project's torch through a .pth file."""
    python = ENV / "bin" / "python"
    if python.exists() and not force:
        return python
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(ENV)], check=True)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    ours = [path for path in sys.path if path.endswith("site-packages")]
    # Appended after the environment's own site-packages: its transformers shadows ours, torch is ours.
    Path(site, "tokensparse_torch.pth").write_text("\n".join(ours) + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *REQUIREMENTS], check=True)
    return python


def build_model(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=args.layers,
                         num_attention_heads=8, num_key_value_heads=2, vocab_size=1000,
                         max_position_embeddings=4096)
    model = LlamaForCausalLM(config).eval()
    input_ids = torch.randint(0, 1000, (args.batch, args.prompt), generator=torch.Generator().manual_seed(0))
    return model, input_ids


def cases(args) -> list[dict]:
    return [
        {"name": "snapkv", "press": "SnapKVPress",
         "options": {"compression_ratio": args.ratio, "window_size": args.window, "kernel_size": 5}},
        {"name": "streamingllm", "press": "StreamingLLMPress",
         "options": {"compression_ratio": args.ratio, "n_sink": args.sinks}},
        {"name": "key_norm", "press": "KnormPress", "options": {"compression_ratio": args.ratio}},
    ]


def our_policy(name: str, kept: int, args):
    import tokensparse

    if name == "snapkv":
        return tokensparse.SnapKV(budget=kept, window=args.window, kernel=5, pooling="avg")
    if name == "streamingllm":
        return tokensparse.StreamingLLM(sinks=args.sinks, window=kept - args.sinks)
    return tokensparse.KeyNorm(budget=kept)


def our_kept(model, input_ids, policy) -> list[torch.Tensor]:
    """[per layer, [B, H_kv, L] bool]: what tokensparse's eviction reference keeps after prefill."""
    from tokensparse.reference.kv import evicted_generate

    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    _, log = evicted_generate(model, inputs, policy, max_new_tokens=1, do_sample=False)
    return [log.alive[index][..., :input_ids.shape[1]] for index in sorted(log.alive)]


def agreement(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> dict:
    both = sum(int((a & b).sum()) for a, b in zip(ours, theirs))
    kept = sum(int(b.sum()) for b in theirs)
    sets = [bool(torch.equal(a[i, h], b[i, h])) for a, b in zip(ours, theirs)
            for i in range(a.shape[0]) for h in range(a.shape[1])]
    return {"positions_agreeing": both / kept, "equal_sets": sum(sets) / len(sets), "sets": len(sets)}


def main(argv=None) -> dict:
    args = parse_args(argv)
    python = ensure_environment(args.setup)
    model, input_ids = build_model(args)
    with tempfile.TemporaryDirectory(prefix="tokensparse-kvpress-") as work:
        workdir = Path(work)
        torch.save({"config": model.config.to_dict(), "state_dict": model.state_dict(), "input_ids": input_ids},
                   workdir / "model.pt")
        (workdir / "cases.json").write_text(json.dumps(cases(args)))
        env = {**os.environ, "TRANSFORMERS_DISABLE_TORCH_CHECK": "1"}
        subprocess.run([str(python), str(ROOT / "tools" / "kvpress_worker.py"), str(workdir)], check=True, env=env)
        theirs = torch.load(workdir / "kvpress.pt")
    results = {"versions": theirs["versions"], "prompt": args.prompt, "ratio": args.ratio, "methods": {}}
    for name, kept_by_layer in theirs["kept"].items():
        kept = int(kept_by_layer[0][0, 0].sum())
        ours = our_kept(model, input_ids, our_policy(name, kept, args))
        results["methods"][name] = {"kept": kept, **agreement(ours, kept_by_layer)}
    print(f"kvpress {results['versions']['kvpress']} (transformers {results['versions']['transformers']}) against "
          f"tokensparse, prompt {args.prompt}, batch {args.batch}, {args.layers} layers, compression {args.ratio}")
    print(f"{'method':<14}{'kept':>6}{'positions agreeing':>20}{'equal sets':>12}")
    for name, row in results["methods"].items():
        print(f"{name:<14}{row['kept']:>6}{row['positions_agreeing']:>20.4f}{row['equal_sets']:>12.4f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
