"""Export-time module rewrites: same numbers, graphs that stay correct at every input size.

The ONNX translation of ``aten.adaptive_avg_pool2d`` in torch 2.15's exporter bakes the pooling
windows of the example size into the graph: the exported program is right at every size, the ONNX
file only at the example one (measured: max abs error 0.58 at 13x17 after exporting at 4x4, with
no warning). mmseg's PPM (UPerHead, PSPHead) pools to fixed grids, so every such model is hit.
We swap those modules for an equivalent written as two matrix products with averaging matrices
built from the (symbolic) input size.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from effvision.models.layers.window import floor_mod


def _pool_matrix(size: int, out: int, like: torch.Tensor) -> torch.Tensor:
    """(out, size) matrix averaging each adaptive-pooling bin, as ``adaptive_avg_pool`` bins.

    Bin i covers [floor(i * size / out), ceil((i + 1) * size / out)).
    """
    k = torch.arange(out * size, device=like.device)  # one flat arange: no broadcasting of sizes
    i, j = k // size, floor_mod(k, size)
    start = (i * size) // out
    end = ((i + 1) * size + out - 1) // out
    inside = (j >= start) & (j < end)
    weights = inside.to(like.dtype) / (end - start).to(like.dtype)
    return weights.view(out, size)


class ExportableAdaptiveAvgPool2d(nn.Module):
    """``nn.AdaptiveAvgPool2d`` with a fixed output size, as ``P_h @ x @ P_w^T``."""

    def __init__(self, output_size: int | tuple[int, int]) -> None:
        super().__init__()
        if isinstance(output_size, int):
            output_size = (output_size, output_size)
        if any(s is None for s in output_size):
            raise ValueError('output sizes of None (keep the input size) are not supported')
        self.output_size = tuple(int(s) for s in output_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, C, out_h, out_w)."""
        rows = _pool_matrix(x.shape[-2], self.output_size[0], x)
        cols = _pool_matrix(x.shape[-1], self.output_size[1], x)
        return rows @ x @ cols.transpose(0, 1)


def make_exportable(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every export-unsafe module replaced by its equivalent."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.AdaptiveAvgPool2d):
            parent_name, _, child = name.rpartition('.')
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, ExportableAdaptiveAvgPool2d(module.output_size))
    return model
