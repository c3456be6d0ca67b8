"""Shallow copies of a model (the same weights) whose modules can be replaced and hooked, the original untouched."""

from __future__ import annotations

import copy
import functools

import torch


def own_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A shallow copy of `module` with its own submodule and hook tables (the same parameters and buffers):
    replacing a child of the copy, or hooking it, leaves the original alone."""
    duplicate = copy.copy(module)
    for name, value in vars(module).items():
        if isinstance(value, dict):
            duplicate.__dict__[name] = copy.copy(value)
    return duplicate


def hook_decoder_layers(fast, hook) -> bool:
    """Give `fast` its own copies of the modules down to its decoder layers and register
    hook(index, module, args, kwargs) as each layer's forward pre-hook (with kwargs). False for a model whose
    decoder layers are not found."""
    try:
        layers = fast.get_decoder().layers
    except (AttributeError, NotImplementedError):
        return False
    path = next((name for name, module in fast.named_modules() if module is layers), None)
    if path is None or not isinstance(layers, torch.nn.ModuleList):
        return False
    parent = fast
    for name in path.split("."):
        parent._modules[name] = own_copy(parent._modules[name])
        parent = parent._modules[name]
    for index, name in enumerate(list(parent._modules)):
        layer = parent._modules[name] = own_copy(parent._modules[name])
        layer.register_forward_pre_hook(functools.partial(hook, index), with_kwargs=True)
    return True
