"""Fused kernels behind one dispatch: each op has a PyTorch reference that defines it, a C++ CPU
kernel and a CUDA kernel, registered as ``torch.library`` custom ops (``effvision::<op>``).

``EFFVISION_OPS=reference`` or :func:`reference_ops` forces the references; ONNX export always
records them. Missing compiled kernels fall back to the references with one warning.
"""

from ._ext import reference_ops
from .window_attention import window_attention

__all__ = ['reference_ops', 'window_attention']
