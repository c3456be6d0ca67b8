"""The checks `tokensparse export` runs on what it wrote: ONNX Runtime (or the kernel plugins launched as TensorRT
would) against the pruned PyTorch model or the policy's reference, and the TensorRT operator-support report. Each
returns an exit status: 0 agreed, 1 a check failed."""

from __future__ import annotations

import os


def check_generation(model, policy, result, inputs: dict, console, new_tokens: int = 16) -> int:
    """Greedy generation in ONNX Runtime (prefill.onnx, then decode.onnx) against generate() with the policy's
    masking oracle (a KV policy: its evicting reference): the same tokens, and every step's logits within 1e-4 relative."""
    import torch

    from tokensparse.export.onnx_generate import generate_onnx
    from tokensparse.reference.kv import evicted_generate
    from tokensparse.reference.llava import masked_generate

    got = generate_onnx(result.directory, {name: value.numpy() for name, value in inputs.items()}, new_tokens)
    greedy = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, output_logits=True,
                  return_dict_in_generate=True)
    if policy is not None and policy.stage == "kv":
        want, _ = evicted_generate(model, inputs, policy, **greedy)
        against = "generate() with the evicting reference"
    else:
        want = masked_generate(model, inputs, policy, **greedy)
        against = "generate() with the masking oracle" if policy else "generate()"
    if not torch.equal(got.tokens, want.sequences[:, -new_tokens:]):
        console.print(f"[red]check failed[/red]: ONNX Runtime's {new_tokens} greedy tokens differ from {against}")
        return 1
    return _report_check(torch.stack(got.logits, 1), torch.stack(want.logits, 1), against, console)


def check_against_pytorch(model, config, result, pixels, console) -> int:
    """ONNX Runtime against the pruned PyTorch model (the tokensparse backend run eagerly)."""
    import onnxruntime
    import torch

    session = onnxruntime.InferenceSession(result.path, providers=["CPUExecutionProvider"])
    [got, *_] = session.run(None, {session.get_inputs()[0].name: pixels.numpy()})
    return _report_check(torch.from_numpy(got), _pruned_pytorch_output(model, config, pixels), "pruned PyTorch",
                         console)


def _pruned_pytorch_output(model, config, pixels):
    """The model's (first) output on `pixels` with the config's policy: the tokensparse backend run eagerly."""
    import torch

    from tokensparse.backend import tokensparse_backend

    options = config if config.policy is not None else None
    reference = torch.compile(model, backend=tokensparse_backend, options=_eager(options)) if options else model
    with torch.no_grad():
        want = reference(pixels)
    return want if isinstance(want, torch.Tensor) else want[0]


def check_kernel_plugins(model, config, result, pixels, console) -> int:
    """The kernel-plugin ONNX (onnx's reference evaluator, each plugin launched as TensorRT would) against the
    pruned PyTorch model."""
    import torch

    from tokensparse.deploy.plugin_eval import run_with_kernel_plugins

    device = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        console.print("check skipped: no GPU here, and the plugin kernels run on the CPU only under Triton's "
                      "interpreter: rerun with TRITON_INTERPRET=1")
        return 0
    [got, *_] = run_with_kernel_plugins(result.path, {result.input_names[0]: pixels.numpy()}, device)
    runner = f"the ONNX with its plugin kernels launched as TensorRT would ({device})"
    return _report_check(torch.from_numpy(got), _pruned_pytorch_output(model, config, pixels), "pruned PyTorch",
                         console, runner=runner)


def check_vlm(model, policy, result, inputs: dict, console) -> int:
    """ONNX Runtime's logits against the masking oracle's at the kept positions (tokensparse.reference.llava)."""
    import onnxruntime
    import torch

    from tokensparse.reference.llava import masked_forward

    session = onnxruntime.InferenceSession(result.path, providers=["CPUExecutionProvider"])
    [got, *_] = session.run(None, {value.name: inputs[value.name].numpy() for value in session.get_inputs()})
    if policy is None:
        with torch.no_grad():
            want = model(**inputs, use_cache=False).logits
    else:
        reference = masked_forward(model, inputs, policy)
        kept = reference["kept"].unsqueeze(-1).expand(-1, -1, reference["logits"].shape[-1])
        want = reference["logits"].gather(1, kept)
    return _report_check(torch.from_numpy(got), want, "the masking oracle" if policy else "PyTorch", console)


def _report_check(got, want, against: str, console, runner: str = "ONNX Runtime") -> int:
    if got.shape != want.shape:
        console.print(f"[red]check failed[/red]: {runner} gives shape {tuple(got.shape)}, {against} "
                      f"{tuple(want.shape)}")
        return 1
    error = (got - want).abs().max().item()
    relative = error / max(want.abs().max().item(), 1e-12)
    ok = relative <= 1e-4
    console.print(f"check: {runner} vs {against}, max |error| {error:.2e} (relative {relative:.2e}): "
                  + ("[green]ok[/green]" if ok else "[red]too large[/red]"))
    return 0 if ok else 1


def _eager(config):
    import dataclasses

    return dataclasses.replace(config, inductor=False)


def check_trt(path: str, console) -> int:
    from tokensparse.deploy.trt_check import check_tensorrt

    report = check_tensorrt(path)
    console.print(str(report))
    return 0 if report.ok else 1
