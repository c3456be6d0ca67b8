"""Benchmark: KV-cache eviction in generate() on a LLaVA-shaped model (random init), CPU, side by side.

    .venv/bin/python tools/bench_kv.py --new-tokens 128

For each variant (all compiled by Inductor through tokensparse.compile): the KV-cache bytes held after
prefill and after --new-tokens greedy steps, against the budget's ideal (budget positions x layers x
keys and values; H2O's cache also holds a float32 score per position, counted); decode tokens/s (a
generate() of --new-tokens minus a generate() of one token, medians of --runs); and the per-step eviction
ops' own time at the decode shape (median of 200 calls).

    .venv/bin/python tools/bench_kv.py --sliding --window 256

--sliding: the same on a Mistral-shaped text model whose sliding window is shorter than its prompt, so every
step is past it (tokensparse.compile's PositionedCache: the window over each entry's position); the baseline is
the model compiled without a policy, with transformers' own sliding-window cache. Bytes count the positions.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="tokensparse-bench-"))
# tests.models (models built from configs) is not part of the installed package: import it from the repository.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import tokensparse  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--budget", type=int, default=256, help="positions kept per layer and KV head")
    parser.add_argument("--runs", type=int, default=3, help="timed generate() calls per variant (medians)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--variants", default=None,
                        help="comma-separated subset of unpruned,snapkv,streamingllm,h2o,adaptive,vision_budget "
                             "(default: all)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--sliding", action="store_true",
                        help="a Mistral-shaped text model with a sliding window shorter than the prompt (--window)")
    parser.add_argument("--window", type=int, default=256, help="the sliding window of --sliding")
    parser.add_argument("--prompt", type=int, default=640, help="the prompt length of --sliding")
    parser.add_argument("--selections", action="store_true",
                        help="only H2O's decode-step selection: the sort (h2o_keep) against the one-drop form "
                             "(h2o_step_keep) at several cache lengths")
    return parser.parse_args(argv)


def kv_bytes(cache) -> int:
    """Bytes the cache holds: keys, values, (ScoredCache) scores and (PositionedCache) positions."""
    tensors = [t for layer in cache.layers for t in (layer.keys, layer.values, getattr(layer, "scores", None),
                                                     getattr(layer, "positions", None))]
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def decode_rate(fast, inputs: dict, args, settings: dict):
    """(decode tokens/s, the 1-token generate()'s output, the --new-tokens one's): a generate() of --new-tokens minus
    one of a single token, medians of --runs, after a warm-up that compiles the prefill and decode graphs."""
    with torch.inference_mode():
        fast.generate(**inputs, max_new_tokens=4, **settings)
        first = fast.generate(**inputs, max_new_tokens=1, **settings)
        full_s, one_s = [], []
        for _ in range(args.runs):
            start = time.perf_counter()
            out = fast.generate(**inputs, max_new_tokens=args.new_tokens, **settings)
            full_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            fast.generate(**inputs, max_new_tokens=1, **settings)
            one_s.append(time.perf_counter() - start)
    batch = inputs["input_ids"].shape[0]
    return (args.new_tokens - 1) * batch / (statistics.median(full_s) - statistics.median(one_s)), first, out


def op_ms(policy, shape, heads: int) -> float:
    """Median ms of one decode step's eviction for one layer's cache of `shape` [B, H_kv, L, d]: the
    selection and gather (StreamingLLM); H2O adds the new query's column sums and the scores' gather."""
    from tokensparse.runtime.ops import ATTENTION_COLUMN_SUMS, H2O_STEP_KEEP, KV_EVICT

    keys, values = torch.randn(shape), torch.randn(shape)
    query, scores = torch.randn(shape[0], heads, 1, shape[3]), torch.rand(shape[:3])
    count = policy.kept_count(shape[2])

    def step():
        if isinstance(policy, tokensparse.H2O):
            accumulated = scores + ATTENTION_COLUMN_SUMS(query, keys, shape[3] ** -0.5)
            kept = H2O_STEP_KEEP(accumulated, count, policy.recent)     # what a decode step runs
            accumulated.gather(2, kept)
        else:
            kept = policy.keep(query, keys, 1.0, count)
        KV_EVICT(keys, values, kept)

    samples = []
    for _ in range(200):
        start = time.perf_counter()
        step()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def selection_ms(lengths=(257, 1025, 4097), kv_heads: int = 8, calls: int = 300) -> dict:
    """Median ms of H2O's selection at a decode step (a cache one position over heavy = recent = L // 2), the
    sort and the one-drop form alternating call by call; both keep the same positions (checked)."""
    from tokensparse.runtime.ops import H2O_KEEP, H2O_STEP_KEEP

    rows = {}
    for length in lengths:
        scores = torch.rand(1, kv_heads, length, generator=torch.Generator().manual_seed(length))
        count, recent = length - 1, (length - 1) // 2
        if not torch.equal(H2O_KEEP(scores, count, recent), H2O_STEP_KEEP(scores, count, recent)):
            raise AssertionError(f"the two selections differ at L={length}")
        samples = {H2O_KEEP: [], H2O_STEP_KEEP: []}
        for _ in range(calls):
            for op, times in samples.items():
                start = time.perf_counter()
                op(scores, count, recent)
                times.append((time.perf_counter() - start) * 1e3)
        rows[length] = {"sort_ms": statistics.median(samples[H2O_KEEP]),
                        "one_drop_ms": statistics.median(samples[H2O_STEP_KEEP])}
        print(f"L={length}, {kv_heads} KV heads: sort {rows[length]['sort_ms']:.3f} ms, one drop "
              f"{rows[length]['one_drop_ms']:.3f} ms ({rows[length]['sort_ms'] / rows[length]['one_drop_ms']:.2f}x)")
    return rows


def run(args) -> dict:
    from rich.console import Console
    from rich.table import Table

    from bench_vlm import llava_shaped

    console = Console()
    model, inputs = llava_shaped(args)
    prompt = inputs["input_ids"].shape[1]
    text = model.config.text_config
    per_position = 2 * text.num_key_value_heads * (text.hidden_size // text.num_attention_heads) * 4 * args.layers
    budget = args.budget
    variants = {
        "unpruned": (tokensparse.SnapKV(budget=1.0), prompt, prompt + args.new_tokens - 1),
        f"snapkv budget {budget}": (tokensparse.SnapKV(budget=budget), budget, budget + args.new_tokens - 1),
        f"streamingllm 4 + {budget - 4}": (tokensparse.StreamingLLM(sinks=4, window=budget - 4), budget, budget),
        f"h2o {budget // 2} + {budget - budget // 2}": (tokensparse.H2O(heavy=budget // 2, recent=budget - budget // 2),
                                                       budget, budget),
        "adaptive tau 0.9": (tokensparse.AdaptiveKV(tau=0.9), None, None),       # the count depends on the data
        # 576 image tokens -> 128; the 32 text tokens before the window and the 32-token window stay
        "vision_budget 128 + all text": (tokensparse.VisionBudget(vision=128, text=1.0), 192, 192 + args.new_tokens - 1),
    }
    if args.variants:
        wanted = args.variants.split(",")
        variants = {name: value for name, value in variants.items() if name.split()[0] in wanted}
    settings = dict(do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    rows = {}
    table = Table(title=f"LLaVA-shaped generate(), prompt {prompt}, {args.new_tokens} new tokens, batch {args.batch}, "
                        f"{torch.get_num_threads()} threads")
    for column in ("variant", "KV after prefill", "ideal", "KV at the end", "ideal", "of ideal", "decode tok/s",
                   "speedup", "evict op ms/step"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for name, (policy, ideal_prefill, ideal_end) in variants.items():
        console.print(f"compiling and running {name} ...")
        torch._dynamo.reset()
        fast = tokensparse.compile(model, tokensparse.Config(kv=policy))
        rate, first, out = decode_rate(fast, inputs, args, settings)
        prefill_bytes, end_bytes = kv_bytes(first.past_key_values), kv_bytes(out.past_key_values)
        ideal = (None, None) if ideal_prefill is None else (ideal_prefill * per_position * args.batch,
                                                            ideal_end * per_position * args.batch)
        head_dim = text.hidden_size // text.num_attention_heads
        evict = op_ms(policy, (args.batch, text.num_key_value_heads, budget + 1, head_dim), text.num_attention_heads) \
            if isinstance(policy, (tokensparse.StreamingLLM, tokensparse.H2O)) else None
        rows[name] = {"kv_bytes_prefill": prefill_bytes, "ideal_prefill": ideal[0], "kv_bytes_end": end_bytes,
                      "ideal_end": ideal[1], "decode_tokens_per_s": rate, "evict_op_ms_per_layer_step": evict}
    base = rows["unpruned"]["decode_tokens_per_s"] if "unpruned" in rows else None
    for name, row in rows.items():
        mib = 2 ** 20
        known = row["ideal_end"] is not None
        table.add_row(name, f"{row['kv_bytes_prefill'] / mib:.2f} MiB",
                      f"{row['ideal_prefill'] / mib:.2f}" if known else "data",
                      f"{row['kv_bytes_end'] / mib:.2f} MiB", f"{row['ideal_end'] / mib:.2f}" if known else "data",
                      f"{row['kv_bytes_end'] / row['ideal_end']:.3f}" if known else "", f"{row['decode_tokens_per_s']:.1f}",
                      f"{row['decode_tokens_per_s'] / base:.2f}x" if base else "",
                      f"{row['evict_op_ms_per_layer_step']:.3f}" if row["evict_op_ms_per_layer_step"] else "")
        if not known:
            console.print(f"{name}: keeps {row['kv_bytes_prefill'] / per_position / args.batch:.1f} positions per "
                          f"layer on average after prefill (of {prompt})")
    console.print(table)
    result = {"prompt": prompt, "new_tokens": args.new_tokens, "batch": args.batch, "variants": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


def sliding(args) -> dict:
    """--sliding: KV bytes and decode tokens/s past a sliding window, against the model without a policy."""
    from rich.console import Console
    from rich.table import Table

    from tests.models import build_llama

    console = Console()
    model, inputs = build_llama(layers=args.layers, prompt=args.prompt, batch=args.batch, hidden=1024, heads=16,
                                kv_heads=8, vocab=32000, family="mistral", sliding_window=args.window)
    budget = args.budget
    variants = {"no policy (transformers' sliding cache)": None,
                # every entry kept: what the PositionedCache's positions, window mask and slice cost
                "nothing to evict (snapkv budget 1.0)": tokensparse.SnapKV(budget=1.0),
                f"snapkv budget {budget}": tokensparse.SnapKV(budget=budget),
                f"streamingllm 4 + {budget - 4}": tokensparse.StreamingLLM(sinks=4, window=budget - 4),
                f"h2o {budget // 2} + {budget - budget // 2}": tokensparse.H2O(heavy=budget // 2,
                                                                               recent=budget - budget // 2)}
    settings = dict(do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    rows = {}
    for name, policy in variants.items():
        console.print(f"compiling and running {name} ...")
        torch._dynamo.reset()
        fast = tokensparse.compile(model, tokensparse.Config(kv=policy))
        rate, first, out = decode_rate(fast, inputs, args, settings)
        rows[name] = {"kv_bytes_prefill": kv_bytes(first.past_key_values), "kv_bytes_end": kv_bytes(out.past_key_values),
                      "entries_end": out.past_key_values.layers[0].keys.shape[2], "decode_tokens_per_s": rate}
    base = next(iter(rows.values()))["decode_tokens_per_s"]
    table = Table(title=f"Mistral-shaped generate() past a sliding window of {args.window}: prompt {args.prompt}, "
                        f"{args.new_tokens} new tokens, batch {args.batch}, {torch.get_num_threads()} threads")
    for column in ("variant", "KV after prefill", "KV at the end", "entries per layer", "decode tok/s", "speedup"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for name, row in rows.items():
        table.add_row(name, f"{row['kv_bytes_prefill'] / 2 ** 20:.2f} MiB", f"{row['kv_bytes_end'] / 2 ** 20:.2f} MiB",
                      str(row["entries_end"]), f"{row['decode_tokens_per_s']:.1f}",
                      f"{row['decode_tokens_per_s'] / base:.2f}x")
    console.print(table)
    result = {"prompt": args.prompt, "window": args.window, "new_tokens": args.new_tokens, "variants": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    arguments = parse_args()
    selection_ms() if arguments.selections else sliding(arguments) if arguments.sliding else run(arguments)
