"""Benchmark: the Triton kernels against their plain PyTorch references on a GPU (triton.testing.do_bench
medians), with the maximum difference of each pair.

    python tools/bench_kernels.py --json out/kernels.json          # needs CUDA
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--json", default=None, help="write the results here")
    return parser.parse_args(argv)


def cases(dtype):
    """(name, triton call, reference call) on seeded inputs of serving sizes."""
    from tokensparse.policies.tome import bipartite_soft_matching
    from tokensparse.policies.selection import split_in_order
    from tokensparse.runtime.kernels import (kv_compact, kv_compact_reference, tome_merge_kernel,
                                             tome_merge_reference, topk_gather, topk_gather_reference, topk_split)

    generator = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, device="cuda", generator=generator).to(dtype)

    x, size = randn(64, 197, 768), torch.ones(64, 197, 1, device="cuda", dtype=dtype)
    src, dst, unm = bipartite_soft_matching(randn(64, 197, 64).float(), 13, 1)
    yield ("tome merge, ViT-B/16 batch 64, r=13", lambda: tome_merge_kernel(x, size, src, dst, unm, 1),
           lambda: tome_merge_reference(x, size, src, dst, unm, 1))
    for batch, a_tokens, r in ((64, 98, 13), (4, 4100, 1025)):
        node_max = randn(batch, a_tokens)
        yield (f"ToMe's r best edges and the rest, batch {batch}, {a_tokens} A tokens, r={r}",
               lambda s=node_max, r=r: topk_split(s, r), lambda s=node_max, r=r: split_in_order(s, r))
    for batch, tokens, keep in ((8, 3136, 0.5), (8, 8200, 0.25), (2, 65536, 0.1)):
        tokens_x, scores = randn(batch, tokens, 1024), randn(batch, tokens)
        k = int(keep * tokens)
        yield (f"top-k + gather, batch {batch}, {tokens} tokens, k={k}",
               lambda t=tokens_x, s=scores, k=k: topk_gather(t, s, k),
               lambda t=tokens_x, s=scores, k=k: topk_gather_reference(t, s, k))
    cache = randn(8, 8, 4096, 128)
    work = cache.clone()          # compacted again and again: the same reads and writes each time
    kept = torch.rand(8, 8, 4096, device="cuda", generator=generator).argsort(-1)[..., :1024].sort(-1).values
    yield ("KV compaction in place, [8, 8, 4096, 128] to 1024", lambda: kv_compact(work, kept),
           lambda: kv_compact_reference(cache, kept))


def run(args) -> dict:
    from rich.console import Console
    from rich.table import Table
    from triton.testing import do_bench

    from tokensparse.benchmark import device_description

    dtype = getattr(torch, args.dtype)
    device = device_description("cuda")
    table = Table(title=f"Triton kernels vs PyTorch, {device}, {args.dtype}, do_bench medians")
    for column in ("case", "triton ms", "pytorch ms", "pytorch / triton"):
        table.add_column(column, justify="left" if column == "case" else "right")
    rows = {}
    for name, kernel, reference in cases(dtype):
        kernel_ms = do_bench(kernel, return_mode="median")
        reference_ms = do_bench(reference, return_mode="median")
        rows[name] = {"triton_ms": kernel_ms, "pytorch_ms": reference_ms}
        table.add_row(name, f"{kernel_ms:.3f}", f"{reference_ms:.3f}", f"{reference_ms / kernel_ms:.2f}x")
    Console().print(table)
    result = {"device": device, "dtype": args.dtype, "cases": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA GPU")
    sys.exit(run(parse_args()) is None)
