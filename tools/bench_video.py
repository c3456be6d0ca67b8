"""Benchmark: prefill of a Qwen2-VL-shaped model (random init) on a video prompt, DTD and FastV against the
unpruned model, side by side on the CPU.

    .venv/bin/python tools/bench_video.py --runs 20

The model: Qwen2-VL's architecture with a small vision tower and a text model of hidden 1024, 8 layers, GQA
16/8 heads, MLP 2816. The prompt: 32 text tokens, a video of 8 temporal patches of 16 x 16 patches (8 x 8 merged tokens)
(512 video tokens), 32 text tokens. The scene: from the second temporal patch on, each patch shows the
previous one's pixels with probability --static (a static background) and new pixels otherwise. With random
weights the tower mixes every patch of a frame, so even a static patch's feature moves a little: the number
DTD drops at --tau is reported, not set.

Prefill is the language-model forward that generate() runs (the tower, run before it, and the M-RoPE
positions are prepared once and passed in), with logits_to_keep=1, every variant compiled by Inductor.
Speedups are over the unpruned one; "of ideal" divides by the FLOPs-ideal speedup of tokensparse.explain.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="tokensparse-bench-"))
# tests.models (models built from configs) is not part of the installed package: import it from the repository.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20, help="timed prefills per variant (medians reported)")
    parser.add_argument("--layers", type=int, default=8, help="decoder layers")
    parser.add_argument("--frames", type=int, default=8, help="temporal patches (two video frames each)")
    parser.add_argument("--side", type=int, default=16, help="patches per side of a frame (merged 2 x 2)")
    parser.add_argument("--static", type=float, default=0.8, help="share of patches that repeat the previous frame")
    parser.add_argument("--tau", type=float, default=0.9, help="DTD's cosine-similarity threshold")
    parser.add_argument("--json", default=None, help="write the results here")
    return parser.parse_args(argv)


def qwen2_vl_shaped(args):
    from tests.models import build_qwen2_vl

    model, inputs = build_qwen2_vl(video=(args.frames, args.side, args.side), batch=1, text_layers=args.layers,
                                   prompt=(32, 32), hidden=1024, heads=16, kv_heads=8, intermediate=2816, vocab=32000)
    pixels = inputs["pixel_values_videos"].view(args.frames, args.side ** 2, -1)
    generator = torch.Generator().manual_seed(1)
    for frame in range(1, args.frames):
        static = torch.rand(args.side ** 2, generator=generator) < args.static
        pixels[frame, static] = pixels[frame - 1, static]
    return model, inputs


def prefill_inputs(model, inputs) -> dict:
    """The keyword arguments generate() passes to the prefill forward (tower features, 4 x B x S positions),
    without its cache (each call makes its own), and logits_to_keep=1."""
    captured = {}

    def capture(module, args, kwargs):
        captured.setdefault("kwargs", kwargs)

    handle = model.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=1, do_sample=False, pad_token_id=0)
    finally:
        handle.remove()
    kwargs = dict(captured["kwargs"])
    kwargs.pop("past_key_values", None)
    return {**kwargs, "logits_to_keep": 1}


def run(args) -> dict:
    from rich.console import Console

    import tokensparse
    from tokensparse.benchmark import device_description, first_call_seconds, time_side_by_side
    from tools.bench_vlm import print_table

    console = Console()
    model, inputs = qwen2_vl_shaped(args)
    prefill = prefill_inputs(model, inputs)
    video_tokens = int((inputs["input_ids"] == model.config.video_token_id).sum())
    policies = {f"dtd tau={args.tau:g}": tokensparse.DTD(tau=args.tau),
                "fastv K=2 keep=0.25": tokensparse.FastV(layer=2, keep=0.25)}
    compiled, ideal, kept = {}, {}, {}
    console.print("compiling unpruned (Inductor) ...")
    plain = torch.compile(model.forward)
    compiled["inductor (unpruned)"] = (lambda: plain(**prefill), first_call_seconds(lambda: plain(**prefill)))
    for name, policy in policies.items():
        report = tokensparse.explain(model, inputs, config=tokensparse.Config(llm=policy))
        ideal[name] = report.flops_ideal_ratio
        kept[name] = report.blocks[-1].tokens_after
        console.print(f"compiling tokensparse {name}: {kept[name]} of {report.blocks[0].tokens_before} tokens reach the last "
                      f"layer (FLOPs-ideal {ideal[name]:.2f}x) ...")
        fast = tokensparse.compile(model, tokensparse.Config(llm=policy))
        compiled[f"tokensparse {name}"] = ((lambda f=fast: f(**prefill)), first_call_seconds(lambda f=fast: f(**prefill)))
    timings = time_side_by_side({name: (lambda *_, fn=fn: fn(), s) for name, (fn, s) in compiled.items()}, (), args.runs)
    rows = print_table(console, f"Qwen2-VL-shaped prefill, {video_tokens} video tokens ({args.static:.0%} static "
                                f"patches), {device_description('cpu')}, median of {args.runs} runs "
                                f"({report.flops_before / 1e9:.0f} GFLOPs unpruned)",
                       timings, "inductor (unpruned)", ideal, "tokensparse ")
    for name in policies:
        rows[f"tokensparse {name}"]["tokens_in_last_layer"] = kept[name]
    result = {"layers": args.layers, "runs": args.runs, "video_tokens": video_tokens, "static": args.static,
              "tau": args.tau, "device": device_description("cpu"), "flops_before": report.flops_before,
              "prompt_tokens": report.blocks[0].tokens_before, "variants": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    sys.exit(run(parse_args()) is None)
