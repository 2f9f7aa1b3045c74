"""Quantized matmul kernels: the plain-PyTorch specification (reference.py),
Triton kernels for CUDA, and the dispatching ``torch.ops.slimtune`` custom ops (dispatch.py)."""

from slimtune.compress.kernels import dispatch, reference  # noqa: F401 - registers torch.ops.slimtune.*
