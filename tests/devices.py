"""Where the Triton kernel tests run: on a CUDA GPU when Triton compiles for it (TRITON_INTERPRET=0 and a
GPU), else on CPU tensors under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 by default)."""

import os

import torch

KERNEL_DEVICE = "cuda" if os.environ.get("TRITON_INTERPRET") == "0" and torch.cuda.is_available() else "cpu"
