"""How a kernel is launched: directly, or through torch.library.wrap_triton inside a triton_op (so that
torch.compile and Inductor see the kernel)."""


def launch(wrapper, kernel):
    return kernel if wrapper is None else wrapper(kernel)
