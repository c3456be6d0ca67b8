"""Benchmark: prefill of a LLaVA-shaped model (random init) with language-model pruning, side by side, on
the CPU or a GPU.

    .venv/bin/python tools/bench_vlm.py --runs 20
    python tools/bench_vlm.py --device cuda --dtype bfloat16 --batch 8 --runs 50     # a GPU (torch >= 2.14)

(Not yet run on a GPU: the GPU run so far used torch 2.11, whose Inductor cannot compile the pruned prefill;
see "GPU and TensorRT status" in the README.)

The model: a small CLIP tower (576 image tokens) and a Llama text model (hidden 1024, 8 layers, GQA 16/8
heads, MLP 2816) on a prompt of 32 + 576 + 32 tokens. Prefill is forward(..., logits_to_keep=1), as
generate() calls it. Every variant is compiled by Inductor through the same forward; speedups are over
the unpruned one, and "of ideal" divides by the FLOPs-ideal speedup counted by tokensparse.explain.
"eager ops": the ops dispatched one by one per prefill outside compiled kernels (benchmark.eager_ops_per_forward),
the CPU-side proxy for a GPU's launch overhead.
Decode: greedy generate() of --new-tokens tokens, tokens/s and the KV-cache bytes it holds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="tokensparse-bench-"))
# tests.models (models built from configs) is not part of the installed package: import it from the repository.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20, help="timed prefills per variant (medians reported)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--layers", type=int, default=8, help="decoder layers")
    parser.add_argument("--new-tokens", type=int, default=32, help="decode: tokens generated per variant (0: prefill only)")
    parser.add_argument("--onnx", action="store_true", help="time ONNX Runtime on to_onnx exports instead of "
                                                                "Inductor (prefill only)")
    parser.add_argument("--onnx-generation", action="store_true", help="time ONNX Runtime on to_onnx_generation "
                        "pairs: the prefill, the KV cache it leaves, and one decode step from that cache")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--only", nargs="*", default=None, help="variants whose names contain one of these")
    return parser.parse_args(argv)


def variants(layers: int, only=None) -> dict:
    """Name -> Config; `only`: keep the names containing one of these strings."""
    import tokensparse
    from tokensparse import Config

    quarter = layers // 4
    configs = {
        "fastv K=2 keep=0.25": Config(llm=tokensparse.FastV(layer=2, keep=0.25)),
        f"pyramiddrop layers {quarter},{2 * quarter},{3 * quarter} ratio 0.5":
            Config(llm=tokensparse.PyramidDrop(layers=(quarter, 2 * quarter, 3 * quarter), ratio=0.5)),
        "visionzip 54+10": Config(llm=tokensparse.VisionZip(dominant=54, contextual=10)),
        "divprune keep=0.098": Config(llm=tokensparse.DivPrune(keep=0.098)),
        # ToMe in the tower's two blocks up to its feature layer: 576 -> 288 image tokens
        "tome r=144 (tower)": Config(vision=tokensparse.ToMe(r=144)),
        "tome r=144 (tower) + fastv K=2 keep=0.25": Config(vision=tokensparse.ToMe(r=144),
                                                            llm=tokensparse.FastV(layer=2, keep=0.25)),
    }
    return {name: config for name, config in configs.items() if not only or any(part in name for part in only)}


def kv_bytes(cache) -> int:
    return sum(layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
               for layer in cache.layers)


def llava_shaped(args):
    from tests.models import build_llava

    model, inputs = build_llava(text_layers=args.layers, image_tokens=576, prompt=(32, 32), batch=args.batch,
                                hidden=1024, heads=16, kv_heads=8, intermediate=2816, vocab=32000, vision_hidden=256,
                                patch=14, vision_layers=3, feature_layer=-2)  # LLaVA-1.5: the second-to-last layer
    device, dtype = getattr(args, "device", "cpu"), getattr(torch, getattr(args, "dtype", "float32"))
    inputs = {"input_ids": inputs["input_ids"].to(device), "pixel_values": inputs["pixel_values"].to(device, dtype)}
    return model.to(device, dtype), inputs


def print_table(console, title: str, timings: dict, base_name: str, ideal: dict, prefix: str,
                eager_ops: dict = None) -> dict:
    """Medians, speedups over `base_name` and shares of the FLOPs-ideal speedup (and `eager_ops`, name -> ops
    dispatched per call, where given); returns the rows."""
    from rich.table import Table

    eager_ops = eager_ops or {}
    base = timings[base_name].median_ms
    table = Table(title=title)
    for column in ("variant", "median ms", "speedup", "FLOPs-ideal", "of ideal", "compile s") + (
            ("eager ops",) if eager_ops else ()):
        table.add_column(column, justify="left" if column == "variant" else "right")
    rows = {}
    for name, timing in timings.items():
        speedup = base / timing.median_ms
        key = name.removeprefix(prefix)
        share = speedup / ideal[key] if key in ideal else None
        rows[name] = {"median_ms": timing.median_ms, "speedup": speedup, "flops_ideal": ideal.get(key),
                      "of_ideal": share, "compile_s": timing.compile_s}
        cells = [name, f"{timing.median_ms:.1f}", f"{speedup:.2f}x", f"{ideal[key]:.2f}x" if share else "",
                 f"{share:.2f}" if share else "", f"{timing.compile_s:.1f}"]
        if eager_ops:
            rows[name]["eager_ops"] = eager_ops.get(name)
            cells.append(f"{eager_ops[name]:g}" if name in eager_ops else "")
        table.add_row(*cells)
    console.print(table)
    return rows


def run_onnx(args) -> dict:
    """ONNX Runtime (CPU) on static-batch exports of the unpruned and pruned prefills."""
    import onnxruntime
    from rich.console import Console

    import tokensparse
    from tokensparse.benchmark import time_side_by_side
    from tokensparse.export import to_onnx

    console = Console()
    model, inputs = llava_shaped(args)
    prefill = {**inputs, "logits_to_keep": 1}
    directory = tempfile.mkdtemp(prefix="tokensparse-vlm-onnx-")
    configs = {"unpruned": None, **variants(args.layers, args.only)}
    sessions, ideal = {}, {}
    for name, config in configs.items():
        console.print(f"exporting {name} ...")
        start = time.perf_counter()
        path = to_onnx(model, prefill, config, os.path.join(directory, f"{len(sessions)}.onnx"), dynamic=False).path
        if config is not None:
            ideal[name] = tokensparse.explain(model, prefill, config=config).flops_ideal_ratio
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        feed = {value.name: prefill[value.name].numpy() for value in session.get_inputs()}
        sessions[f"onnxruntime {name}"] = ((lambda *_, s=session, f=feed: s.run(None, f)), time.perf_counter() - start)
    timings = time_side_by_side(sessions, (), args.runs)
    rows = print_table(console, f"LLaVA-shaped prefill in ONNX Runtime, batch {args.batch}, median of {args.runs} runs "
                                f"(compile s: export + session)", timings, "onnxruntime unpruned", ideal, "onnxruntime ")
    result = {"runtime": "onnxruntime", "batch": args.batch, "layers": args.layers, "runs": args.runs, "variants": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


def run_onnx_generation(args) -> dict:
    """ONNX Runtime (CPU) on to_onnx_generation pairs: prefill medians, the KV-cache bytes the prefill returns, and
    medians of one decode step from that cache (all variants side by side)."""
    import onnxruntime
    from rich.console import Console
    from rich.table import Table

    import tokensparse
    from tokensparse.benchmark import time_side_by_side
    from tokensparse.export.generation import DECODE_FILE, PREFILL_FILE, to_onnx_generation

    console = Console()
    model, inputs = llava_shaped(args)
    inputs = {"input_ids": inputs["input_ids"], "attention_mask": torch.ones_like(inputs["input_ids"]),
              "pixel_values": inputs["pixel_values"]}
    configs = {"unpruned": tokensparse.Config(), **variants(args.layers, args.only),
               "snapkv budget 256": tokensparse.Config(kv=tokensparse.SnapKV(budget=256)),
               "streamingllm 4+252": tokensparse.Config(kv=tokensparse.StreamingLLM(sinks=4, window=252))}
    root = tempfile.mkdtemp(prefix="tokensparse-vlm-generation-")
    prefills, decodes, cache_bytes, ideal = {}, {}, {}, {}
    for index, (name, config) in enumerate(configs.items()):
        console.print(f"exporting {name} ...")
        start = time.perf_counter()
        pair = to_onnx_generation(model, inputs, config, os.path.join(root, str(index)))
        if config.policy is not None:
            ideal[name] = tokensparse.explain(model, {**inputs, "logits_to_keep": 1}, config=config).flops_ideal_ratio
        prefill, decode = (onnxruntime.InferenceSession(os.path.join(pair.directory, file),
                                                        providers=["CPUExecutionProvider"])
                           for file in (PREFILL_FILE, DECODE_FILE))
        feed = {value.name: inputs[value.name].numpy() for value in prefill.get_inputs()}
        outputs = prefill.run(None, feed)
        cache_bytes[name] = sum(value.nbytes for value in outputs[1:])
        step = {"input_ids": outputs[0][:, -1].argmax(-1)[:, None],
                "attention_mask": torch.ones(args.batch, inputs["input_ids"].shape[1] + 1, dtype=torch.long).numpy(),
                **{value.name: past for value, past in zip(decode.get_inputs()[2:], outputs[1:])}}
        compile_s = time.perf_counter() - start
        prefills[name] = ((lambda *_, s=prefill, f=feed: s.run(None, f)), compile_s)
        decodes[name] = ((lambda *_, s=decode, f=step: s.run(None, f)), 0.0)
    prefill_times = time_side_by_side(prefills, (), args.runs)
    decode_times = time_side_by_side(decodes, (), args.runs * 5)
    table = Table(title=f"LLaVA-shaped generation pair in ONNX Runtime, batch {args.batch}: prefill median of "
                        f"{args.runs} runs, decode step median of {args.runs * 5}")
    for column in ("variant", "prefill ms", "speedup", "FLOPs-ideal", "of ideal", "KV after prefill",
                   "decode step ms", "decode speedup"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    rows = {}
    base_prefill, base_decode = prefill_times["unpruned"].median_ms, decode_times["unpruned"].median_ms
    for name in configs:
        prefill_ms, decode_ms = prefill_times[name].median_ms, decode_times[name].median_ms
        speedup = base_prefill / prefill_ms
        share = speedup / ideal[name] if name in ideal else None
        rows[name] = {"prefill_ms": prefill_ms, "speedup": speedup, "flops_ideal": ideal.get(name), "of_ideal": share,
                      "kv_bytes": cache_bytes[name], "decode_step_ms": decode_ms,
                      "decode_speedup": base_decode / decode_ms, "export_s": prefill_times[name].compile_s}
        table.add_row(name, f"{prefill_ms:.1f}", f"{speedup:.2f}x", f"{ideal[name]:.2f}x" if share else "",
                      f"{share:.2f}" if share else "", f"{cache_bytes[name] / 2 ** 20:.1f} MiB", f"{decode_ms:.2f}",
                      f"{base_decode / decode_ms:.2f}x")
    console.print(table)
    result = {"runtime": "onnxruntime generation pair", "batch": args.batch, "layers": args.layers, "runs": args.runs,
              "variants": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


def run(args) -> dict:
    from rich.console import Console
    from rich.table import Table

    import tokensparse
    from tokensparse.benchmark import (device_description, eager_ops_per_forward, first_call_seconds, synchronizer,
                                       time_side_by_side)

    if args.onnx:
        return run_onnx(args)
    if args.onnx_generation:
        return run_onnx_generation(args)
    console = Console()
    synchronize = synchronizer(args.device)
    model, inputs = llava_shaped(args)
    prefill = {**inputs, "logits_to_keep": 1}
    policies = variants(args.layers, args.only)
    compiled, ideal = {}, {}
    console.print("compiling unpruned (Inductor) ...")
    plain = torch.compile(model.forward)
    compiled["inductor (unpruned)"] = (lambda: plain(**prefill), first_call_seconds(lambda: plain(**prefill),
                                                                                         synchronize=synchronize))
    for name, config in policies.items():
        report = tokensparse.explain(model, prefill, config=config)
        ideal[name] = report.flops_ideal_ratio
        console.print(f"compiling tokensparse {name} (FLOPs-ideal {ideal[name]:.2f}x) ...")
        fast = tokensparse.compile(model, config)
        compiled[f"tokensparse {name}"] = ((lambda f=fast: f(**prefill)), first_call_seconds(lambda f=fast: f(**prefill),
                                                                                               synchronize=synchronize))
    base_flops = report.flops_before
    timings = time_side_by_side({name: (lambda *_, fn=fn: fn(), s) for name, (fn, s) in compiled.items()},
                                (), args.runs, synchronize=synchronize)
    eager_ops = {name: eager_ops_per_forward(fn, calls=2) for name, (fn, _) in compiled.items()}
    where = device_description(args.device)
    rows = print_table(console, f"LLaVA-shaped prefill, batch {args.batch}, {args.dtype}, {where}, "
                                f"median of {args.runs} runs ({base_flops / 1e9:.0f} GFLOPs unpruned)",
                       timings, "inductor (unpruned)", ideal, "tokensparse ", eager_ops)

    decode = Table(title=f"greedy generate(), {args.new_tokens} new tokens")
    for column in ("variant", "decode tokens/s", "KV bytes after prefill", "KV bytes at the end"):
        decode.add_column(column, justify="left" if column == "variant" else "right")
    # keep=1.0: the graph compiles unchanged
    configs = {"inductor (unpruned)": tokensparse.Config(llm=tokensparse.FastV(keep=1.0))}
    configs.update({f"tokensparse {name}": config for name, config in policies.items()})
    for name, config in configs.items() if args.new_tokens > 0 else ():       # --new-tokens 0: prefill only
        torch._dynamo.reset()      # each copy's graphs count against dynamo's recompile limit of the shared forward
        fast = tokensparse.compile(model, config)
        settings = dict(do_sample=False, pad_token_id=0, return_dict_in_generate=True)
        with torch.inference_mode():
            fast.generate(**inputs, max_new_tokens=3, **settings)               # compile prefill and decode
            first = fast.generate(**inputs, max_new_tokens=1, **settings)
            synchronize()
            start = time.perf_counter()
            out = fast.generate(**inputs, max_new_tokens=args.new_tokens, **settings)
            synchronize()
            total = time.perf_counter() - start
        prefill_s = rows[name]["median_ms"] / 1e3
        rate = (args.new_tokens - 1) * args.batch / max(total - prefill_s, 1e-9)
        rows[name].update({"decode_tokens_per_s": rate, "kv_bytes_prefill": kv_bytes(first.past_key_values),
                           "kv_bytes_end": kv_bytes(out.past_key_values)})
        decode.add_row(name, f"{rate:.1f}", f"{kv_bytes(first.past_key_values) / 2**20:.1f} MiB",
                       f"{kv_bytes(out.past_key_values) / 2**20:.1f} MiB")
    if args.new_tokens > 0:
        console.print(decode)
    result = {"batch": args.batch, "layers": args.layers, "runs": args.runs, "threads": torch.get_num_threads(),
              "device": where, "dtype": args.dtype,
              "flops_before": base_flops, "variants": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    sys.exit(run(parse_args()) is None)
