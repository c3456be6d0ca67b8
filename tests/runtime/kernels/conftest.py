"""The Triton kernels run under the interpreter on CPU tensors (no GPU here); set before any kernel
module is imported."""

import os

os.environ["TRITON_INTERPRET"] = "1"
