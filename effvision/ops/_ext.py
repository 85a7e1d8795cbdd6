"""Loading effvision's compiled kernels, and the switch that forces the pure-PyTorch references.

Each fused op is its own extension module, ``effvision.ops._<op>`` (built by ``setup.py``, so by
``make install``). When one is missing effvision keeps working on the op's reference
implementation and warns once, saying how to build the kernels.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading
import warnings
from collections.abc import Iterator
from types import ModuleType

import torch

_BUILD_HINT = (
    'build them with `make install` (or `pip install --no-build-isolation -e .` in the '
    'repository); set EFFVISION_OPS=reference to silence this warning'
)
_modules: dict[str, ModuleType | None] = {}
_warned = False
_local = threading.local()


def load(op: str) -> ModuleType | None:
    """The compiled extension of ``op``, or None (with one warning per process) if not built."""
    global _warned
    if op not in _modules:
        try:
            _modules[op] = importlib.import_module(f'effvision.ops._{op}')
        except ImportError as error:
            _modules[op] = None
            if not _warned and os.environ.get('EFFVISION_OPS', '') != 'reference':
                _warned = True
                warnings.warn(
                    f"effvision's compiled ops are not available ({error}); running the "
                    f'pure-PyTorch reference implementations instead, which are slower: '
                    f'{_BUILD_HINT}.',
                    stacklevel=3,
                )
    return _modules[op]


def has_cuda(op: str) -> bool:
    """Whether ``op``'s extension was compiled with its CUDA kernels."""
    module = load(op)
    return module is not None and bool(getattr(module, 'WITH_CUDA', False))


@contextlib.contextmanager
def reference_ops() -> Iterator[None]:
    """Within this context (this thread), every fused op runs its pure-PyTorch reference.

    Used for export (the reference is made of standard ops every backend knows) and to compare
    the two paths.
    """
    previous = getattr(_local, 'reference', False)
    _local.reference = True
    try:
        yield
    finally:
        _local.reference = previous


def use_reference() -> bool:
    """True when the reference must run: forced by env or context, or while exporting/tracing.

    ``torch.onnx`` export (TorchScript or dynamo) always gets the reference decomposition, so the
    graph holds standard ONNX ops; ``torch.compile`` and ``torch.export`` see the custom op.
    """
    if os.environ.get('EFFVISION_OPS', '') == 'reference' or getattr(_local, 'reference', False):
        return True
    return torch.onnx.is_in_onnx_export() or torch.jit.is_tracing() or torch.jit.is_scripting()
