"""Export-time module rewrites: same numbers, graphs that stay correct at every input size.

The ONNX translation of ``aten.adaptive_avg_pool2d`` in torch 2.15's exporter bakes the pooling
windows of the example size into the graph: the exported program is right at every size, the ONNX
file only at the example one (measured: max abs error 0.58 at 13x17 after exporting at 4x4, with
no warning). mmseg's PPM (UPerHead, PSPHead) pools to fixed grids, so every such model is hit.
We swap those modules for an equivalent written as two matrix products with averaging matrices
built from the (symbolic) input size.

Upsampling by a scale factor (mmseg's ``Upsample`` in FPNHead, ``nn.Upsample``) computes the output
size as ``int(size * factor)`` in floating point, which pins H and W under ``torch.export``. For an
integer factor the output size is ``size * factor`` exactly, and giving it as a size produces the
same numbers (the kernel's scale is ``in / out = 1 / factor`` either way), so those modules are
swapped for :class:`ExportableUpsample`.

``nn.MultiheadAttention`` reshapes its projections in a way that makes ``torch.export`` guard on
the batch size being other than 1, which pins the batch of a dynamic export (PEM's query
self-attention); :class:`ExportableMultiheadAttention` computes the same attention from the
same parameters with shape-agnostic ops.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
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


class ExportableUpsample(nn.Module):
    """Upsampling by integer factors, with the output size computed in integers."""

    def __init__(self, factor: tuple[int, int], mode: str, align_corners: bool | None) -> None:
        super().__init__()
        self.factor = factor
        self.mode = mode
        self.align_corners = align_corners

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, C, H * fh, W * fw)."""
        size = (x.shape[-2] * self.factor[0], x.shape[-1] * self.factor[1])
        return F.interpolate(x, size=size, mode=self.mode, align_corners=self.align_corners)


class ExportableMultiheadAttention(nn.Module):
    """The inference of an ``nn.MultiheadAttention`` (no masks), sharing its parameters.

    Args:
        attention: The module to compute as; it must project q, k and v with one packed weight
            (equal embedding sizes) and have no ``bias_k``/``bias_v``/``add_zero_attn``.
    """

    def __init__(self, attention: nn.MultiheadAttention) -> None:
        super().__init__()
        self.in_proj_weight = attention.in_proj_weight
        self.in_proj_bias = attention.in_proj_bias
        self.out_proj = attention.out_proj
        self.num_heads = attention.num_heads
        self.batch_first = attention.batch_first

    @staticmethod
    def supports(attention: nn.MultiheadAttention) -> bool:
        return (
            attention._qkv_same_embed_dim
            and attention.bias_k is None
            and attention.bias_v is None
            and not attention.add_zero_attn
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = False,
        attn_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        """(B, L, C) query and (B, S, C) key/value (sequence-first when not ``batch_first``)
        -> ((B, L, C) output, None)."""
        if key_padding_mask is not None or attn_mask is not None or need_weights:
            raise NotImplementedError(
                'the export form of nn.MultiheadAttention takes no masks and returns no weights'
            )
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = (
            self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        )

        def heads(x: torch.Tensor) -> torch.Tensor:  # (B, L, C) -> (B, heads, L, C / heads)
            return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            heads(F.linear(query, w_q, b_q)),
            heads(F.linear(key, w_k, b_k)),
            heads(F.linear(value, w_v, b_v)),
        )
        out = self.out_proj(out.transpose(1, 2).flatten(2))
        return (out if self.batch_first else out.transpose(0, 1)), None


def _integer_factor(module: nn.Module) -> tuple[int, int] | None:
    """(fh, fw) of an upsampling module that scales by integer factors, else None."""
    if getattr(module, 'size', None) or getattr(module, 'scale_factor', None) is None:
        return None
    if getattr(module, 'recompute_scale_factor', None):
        return None
    factor = module.scale_factor
    factor = tuple(factor) if isinstance(factor, (tuple, list)) else (factor, factor)
    if len(factor) != 2 or any(float(f) != int(f) or f < 1 for f in factor):
        return None
    return int(factor[0]), int(factor[1])


def _exportable_replacement(module: nn.Module) -> nn.Module | None:
    """The export-safe equivalent of ``module``, or None when it is fine as it is."""
    from mmseg.models.utils import Upsample as MMSegUpsample

    if isinstance(module, nn.AdaptiveAvgPool2d):
        return ExportableAdaptiveAvgPool2d(module.output_size)
    if isinstance(module, nn.MultiheadAttention) and ExportableMultiheadAttention.supports(module):
        return ExportableMultiheadAttention(module)
    if isinstance(module, (nn.Upsample, MMSegUpsample)):
        factor = _integer_factor(module)
        if factor is not None:
            return ExportableUpsample(factor, module.mode, module.align_corners)
    return None


def apply_deploy_forms(model: nn.Module) -> list[str]:
    """Switches every module that has a deploy-time form to it, in place.

    Backbones that fold BatchNorms into convolutions for inference (Next-ViT's ``merge_bn``,
    EfficientFormer (V2), MOAT) expose ``switch_to_deploy()``; it is called on the outermost
    such modules (they switch their children). Same numbers up to float rounding, fewer ops.

    Returns:
        The names of the switched modules (``''`` for the model itself).
    """
    switched: list[str] = []
    for name, module in model.named_modules():
        inside = any(name.startswith(f'{done}.') or not done for done in switched)
        if not inside and callable(getattr(module, 'switch_to_deploy', None)):
            module.eval()
            module.switch_to_deploy()
            switched.append(name)
    return switched


def use_reference_deform_conv(model: nn.Module, opset: int) -> list[str]:
    """Switches PEM's modulated deformable convs to their plain-op form below opset 19.

    torchvision's ``deform_conv2d`` becomes the ONNX ``DeformConv`` op, which exists from
    opset 19 on; below that the pure-PyTorch reference (gathers and a matmul, the same numbers)
    is exported instead.

    Returns:
        The names of the switched modules.
    """
    from effvision.models.decode_heads.pem_head import ModulatedDeformConv

    if opset >= 19:
        return []
    switched = []
    for name, module in model.named_modules():
        if isinstance(module, ModulatedDeformConv) and module.impl != 'pytorch':
            module.impl = 'pytorch'
            switched.append(name)
    return switched


def make_exportable(model: nn.Module, opset: int = 18) -> nn.Module:
    """A deep copy of ``model`` in its deploy form, export-unsafe modules replaced.

    The copy gets the deploy-time forms (:func:`apply_deploy_forms`, recorded in its
    ``deploy_forms`` attribute; reference deformable convs below opset 19, recorded in
    ``reference_forms``) and every module that would give a wrong or size-pinned graph is swapped
    for its exact equivalent.
    """
    model = copy.deepcopy(model)
    model.deploy_forms = apply_deploy_forms(model)
    model.reference_forms = use_reference_deform_conv(model, opset)
    for name, module in list(model.named_modules()):
        replacement = _exportable_replacement(module)
        if replacement is not None:
            parent_name, _, child = name.rpartition('.')
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, replacement)
    return model
