"""Fused kernels behind one dispatch: each op has a PyTorch reference that defines it, a C++ CPU
kernel and a CUDA kernel, registered as ``torch.library`` custom ops (``effvision::<op>``).

The ops live in their modules (``from effvision.ops.window_attention import window_attention``,
``from effvision.ops.routing_attention import routing_attention``); the package does not re-export
them, so that ``effvision.ops.<op>`` stays the module.

``EFFVISION_OPS=reference`` or :func:`reference_ops` forces the references; ONNX export always
records them. Missing compiled kernels fall back to the references with one warning.
"""

from ._ext import reference_ops

__all__ = ['reference_ops']
