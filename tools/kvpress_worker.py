"""Run inside kvpress's own environment (it pins transformers<5.3): the positions each kvpress press keeps.

    .venv-kvpress/bin/python tools/kvpress_worker.py WORKDIR

Reads WORKDIR/model.pt (a Llama config dict, its state_dict, the prompt's input_ids) and WORKDIR/cases.json
([{"name", "press", "options"}]); writes WORKDIR/kvpress.pt: {case name: [per layer, kept [B, H_kv, L] bool]}
and the versions used. A kept key is found in the full prefill's keys by its nearest row (the press stores the
same post-RoPE keys, gathered).
"""

from __future__ import annotations

import json
import sys
from importlib import metadata
from pathlib import Path

import torch


def kept_positions(full_keys: torch.Tensor, kept_keys: torch.Tensor) -> torch.Tensor:
    """[B, H, L] bool: which rows of full_keys [B, H, L, d] the press kept (kept_keys [B, H, L', d])."""
    distance = torch.cdist(kept_keys.float(), full_keys.float())               # [B, H, L', L]
    where = distance.argmin(dim=-1)
    kept = torch.zeros(full_keys.shape[:3], dtype=torch.bool)
    kept.scatter_(2, where, True)
    if int(kept.sum(dim=-1).min()) != kept_keys.shape[2]:
        raise RuntimeError("two kept keys matched the same position: the press changed the keys it kept")
    return kept


def main(workdir: Path) -> None:
    import kvpress
    import transformers
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    saved = torch.load(workdir / "model.pt")
    model = LlamaForCausalLM(LlamaConfig(**saved["config"])).eval()
    model.load_state_dict(saved["state_dict"])
    input_ids = saved["input_ids"]
    with torch.no_grad():
        full = model(input_ids, past_key_values=DynamicCache(), use_cache=True).past_key_values
    results = {}
    for case in json.loads((workdir / "cases.json").read_text()):
        press = getattr(kvpress, case["press"])(**case["options"])
        with torch.no_grad(), press(model):
            cache = model(input_ids, past_key_values=DynamicCache(), use_cache=True).past_key_values
        results[case["name"]] = [kept_positions(full.layers[i].keys, cache.layers[i].keys)
                                 for i in range(len(cache.layers))]
    versions = {"kvpress": metadata.version("kvpress"), "transformers": transformers.__version__,
                "torch": str(torch.__version__)}
    torch.save({"kept": results, "versions": versions}, workdir / "kvpress.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
