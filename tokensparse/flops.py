"""FLOPs of a graph per transformer block, counted by torch's FlopCounterMode on fake tensors."""

from __future__ import annotations

import torch
import torch.fx as fx
from torch.utils import flop_counter

from tokensparse.fx.patterns.graph import module_paths
from tokensparse.runtime.ops import is_tokensparse_target, static_token_counts

_CPU_SDPA = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def _register_cpu_attention() -> None:
    """torch counts the CUDA attention kernels but not the CPU one; count it with the same formula."""
    if _CPU_SDPA in flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(_CPU_SDPA)
    def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


_register_cpu_attention()


POLICY_NODE = "tokensparse_policy"      # node meta flag: inserted by a pass as part of a policy's own work


class _CountingInterpreter(fx.Interpreter):
    def __init__(self, gm, counter, block_paths, watch=()):
        super().__init__(gm)
        self.counter, self.block_paths = counter, block_paths
        self.by_block: dict = {}
        self.watch, self.shapes = set(watch), {}

    def run_node(self, node):
        before = self.counter.get_total_flops()
        result = super().run_node(node)
        spent = self.counter.get_total_flops() - before
        if node in self.watch:
            self.shapes[node] = tuple(result.shape)
        if spent:
            key = next((p for p in module_paths(node) if p in self.block_paths), None)
            if key is None:
                policy = node.meta.get(POLICY_NODE) or (node.op == "call_function" and is_tokensparse_target(node.target))
                key = "tokensparse" if policy else "other"
            self.by_block[key] = self.by_block.get(key, 0) + spent
        return result


def flops_by_block(gm: fx.GraphModule, fake_inputs, fake_mode, block_paths) -> dict:
    """{block path: FLOPs, 'other': outside the blocks, 'tokensparse': the inserted policy ops}."""
    with static_token_counts(), fake_mode, flop_counter.FlopCounterMode(display=False) as counter:
        interpreter = _CountingInterpreter(gm, counter, set(block_paths))
        interpreter.run(*fake_inputs)
    return interpreter.by_block


def flops_by_block_running(gm: fx.GraphModule, inputs, block_paths, watch=()) -> tuple[dict, dict]:
    """flops_by_block on real inputs (for graphs whose token counts depend on the data), and the shapes of
    the `watch` nodes seen on the way."""
    with flop_counter.FlopCounterMode(display=False) as counter, torch.no_grad():
        interpreter = _CountingInterpreter(gm, counter, set(block_paths), watch)
        interpreter.run(*inputs)
    return interpreter.by_block, interpreter.shapes
