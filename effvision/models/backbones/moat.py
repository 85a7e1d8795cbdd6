"""MOAT backbone (and tiny-MOAT) for dense prediction.

Yang et al., "MOAT: Alternating Mobile Convolution and Attention Brings Strong Vision Models",
ICLR 2023. Reference: the official TensorFlow code, google-research/deeplab2 @ 64bc1c1a65
(``model/pixel_encoder/moat.py``, ``model/layers/moat_blocks.py``,
``model/layers/moat_attention.py``), in its dense form (``get_model``: ``pool_size=3``, no
classification head). Our outputs match it to float32 round-off on the golden fixtures. Written
anew in PyTorch; what differs and why:

* TensorFlow's ``padding='same'`` is reproduced exactly: strided 3x3 convolutions and the 3x3
  shortcut average pool pad ``(size % 2, 1)`` per side (asymmetric on even sizes), and the pool
  divides by the number of real pixels. The pad amounts are computed from (symbolic) sizes.
* Any input size. The official code runs windowed attention only where the window divides the
  feature map and freezes "global" attention to the size the model was built for. Here a global
  block attends over the map it receives, whatever its size, and a windowed block covers the map
  with ceil(H / wh) x ceil(W / ww) windows whose out-of-map slots are masked out as keys (their
  queries are dropped): each pixel attends exactly to the pixels of its window inside the map,
  which equals the official result wherever the official code runs.
* q, k and v are projected on the real pixels only (one linear over the three weight matrices)
  and attention in windows (or over the whole map), relative position bias and key mask
  included, is one op, :func:`effvision.ops.window_attention`: a fused C++/CUDA kernel, or its
  PyTorch reference (index gathers + ``F.scaled_dot_product_attention``; what ONNX export
  records). H and W stay symbolic under ``torch.export`` and the dynamic-shape ONNX export.
* The relative position table is resized to the window (``F.interpolate`` bilinear, half-pixel,
  no antialias, as ``tf.image.resize``) and reindexed with two small gathers at every forward,
  from the loaded parameter. (In TF2 eager mode the official ``Attention.build`` freezes the bias
  computed from the *initial* table, so loaded tables have no effect there; graph mode, which the
  fixtures use, reads the variable. We follow the graph-mode, intended semantics.)
* The strided depthwise conv gets no padded copy of its (4x expanded) input: its 3x3 kernel is
  embedded in a 5x5 one at the offset TF's padding implies (see :class:`SameConv2d`).
* The network runs channels-last by default (``channels_last=True``): oneDNN convolutions skip
  their layout reorders and the LayerNorm/attention half of each MOAT block needs no permute copy.
* ``switch_to_deploy()`` folds every BatchNorm into its neighbouring convolution.

Quirks kept on purpose (the published numbers depend on them): BatchNorm eps 1e-3 (Keras default),
exact-erf GELU but SiLU in squeeze-excitation (deeplab2 passes no activation to it), SE width from
the block's *output* width, relative bias indexed by key minus query, MBConv expansion relative to
the output width, stochastic depth ``rate * block / num_blocks`` (not ``/ (num_blocks - 1)``),
no norm after the stages.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from timm.layers import DropPath
from torch import nn

from effvision.models.backbones.base import DenseBackbone
from effvision.models.layers.window import floor_mod, pair
from effvision.ops.window_attention import window_attention
from effvision.registry import MODELS
from effvision.utils.checkpoint import CheckpointError

__all__ = [
    'MOAT',
    'MOAT_ARCHS',
    'convert_tf',
    'detect_format',
    'DERIVED_KEYS',
    'TF_CLASSIFIER_SCOPES',
]

# Keras defaults the official code relies on: BatchNormalization(epsilon=1e-3, momentum=0.99).
_BN_EPS = 1e-3
_BN_MOMENTUM = 0.01  # PyTorch's momentum is 1 - Keras' momentum
_LN_EPS = 1e-5


# ---------------------------------------------------------------------------------------------
# building blocks
# ---------------------------------------------------------------------------------------------
def ceil_div(size: int, stride: int) -> int:
    """``ceil(size / stride)`` for size >= 1, written as a strided conv's output size
    (``1 + (size - 1) // stride``) so that ``torch.export`` sees one expression for every
    downsampled size and needs no guard to match them."""
    return 1 + (size - 1) // stride


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow ``padding='same'`` amounts (before, after) for one spatial dim.

    ``ceil(size / stride)`` outputs; the total padding is split with the extra pixel after. Plain
    integer arithmetic, so a symbolic ``size`` stays symbolic (requires ``kernel >= stride``).
    """
    total = (ceil_div(size, stride) - 1) * stride + kernel - size
    before = total // 2
    return before, total - before


def pad_same(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """Zero-pad the last two dims of ``x`` as TF's ``padding='same'`` would."""
    top, bottom = same_padding(x.shape[-2], kernel, stride)
    left, right = same_padding(x.shape[-1], kernel, stride)
    return F.pad(x, (left, right, top, bottom))


class SameConv2d(nn.Conv2d):
    """Conv2d with TF ``'same'`` padding: symmetric ``k // 2`` at stride 1, computed otherwise.

    A strided 3x3 depthwise conv (the big one: 4x expanded channels at the stage's input
    resolution) is not given a padded copy of its input: its kernel is embedded in a 5x5 one at
    the offset TF's padding implies (``(2 - before, before)`` zeros per dim, before = size % 2)
    and run with symmetric padding 2, which covers exactly the same pixels. The stem conv pads its
    3-channel input instead (a 5x5 dense kernel would cost more than the copy).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        bias: bool = True,
    ) -> None:
        if kernel_size < stride:
            raise ValueError(f'kernel_size {kernel_size} < stride {stride} is not supported')
        padding = kernel_size // 2 if stride == 1 else 0
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=bias
        )
        self.embed_kernel = (
            stride == 2 and kernel_size == 3 and groups == in_channels == out_channels
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, C_out, ceil(H / stride), ceil(W / stride))."""
        if self.stride[0] == 1:
            return super().forward(x)
        if self.embed_kernel:
            top = same_padding(x.shape[-2], 3, 2)[0]
            left = same_padding(x.shape[-1], 3, 2)[0]
            weight = F.pad(self.weight, (2 - left, left, 2 - top, top))
            return F.conv2d(x, weight, self.bias, 2, 2, 1, self.groups)
        return super().forward(pad_same(x, self.kernel_size[0], self.stride[0]))


def avg_pool_same(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """``AveragePooling2D(kernel, stride, padding='same')``: the mean over real pixels only.

    Both the zero-padded input and a map of ones are pooled with the plain (count-the-pads)
    average, and divided: sum / count, with no divisor_override (ONNX has none).
    """
    ones = x.new_ones(1, 1, x.shape[-2], x.shape[-1])
    summed = F.avg_pool2d(pad_same(x, kernel, stride), kernel, stride)
    return summed / F.avg_pool2d(pad_same(ones, kernel, stride), kernel, stride)


def batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=_BN_EPS, momentum=_BN_MOMENTUM)


class SqueezeExcite(nn.Module):
    """Spatial mean -> 1x1 conv -> SiLU -> 1x1 conv -> sigmoid gate (deeplab2's SE)."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        gate = self.expand(F.silu(self.reduce(x.mean((2, 3), keepdim=True))))
        return x * gate.sigmoid()


class Attention(nn.Module):
    """Multi-head self-attention with deeplab2's 2-D multi-head relative position bias.

    ``heads = dim // head_dim``; q, k, v, o are linear layers with bias (the official
    ``TrailDense`` einsums). The relative position table (heads, 2P - 1, 2P - 1) is learned for a
    P x P window and resized bilinearly to (2wh - 1, 2ww - 1) for the window used.
    """

    def __init__(self, dim: int, head_dim: int, position_embedding_size: int | None) -> None:
        super().__init__()
        self.num_heads = dim // head_dim
        if self.num_heads < 1:
            raise ValueError(f'width {dim} is smaller than head_dim {head_dim}')
        self.head_dim = head_dim
        inner = self.num_heads * head_dim
        self.q = nn.Linear(dim, inner)
        self.k = nn.Linear(dim, inner)
        self.v = nn.Linear(dim, inner)
        self.o = nn.Linear(inner, dim)
        if position_embedding_size is not None:
            size = 2 * position_embedding_size - 1
            self.relative_position_embedding = nn.Parameter(torch.zeros(self.num_heads, size, size))
        else:
            self.relative_position_embedding = None

    def position_table(self, wh: int, ww: int) -> torch.Tensor | None:
        """((2wh - 1) * (2ww - 1), heads) table for a (wh, ww) window, resized if needed."""
        table = self.relative_position_embedding
        if table is None:
            return None
        size = (2 * wh - 1, 2 * ww - 1)
        if not (isinstance(wh, int) and isinstance(ww, int) and size == tuple(table.shape[1:])):
            table = F.interpolate(table[None], size=size, mode='bilinear', align_corners=False)[0]
        return table.flatten(1).t()

    def forward(self, x: torch.Tensor, window: tuple[int, int] | None) -> torch.Tensor:
        """Attend globally (``window`` None) or inside windows.

        Args:
            x: (B, H, W, C) normalised map.
            window: (wh, ww), or None for one window covering the whole map.

        Returns:
            (B, H * W, C).
        """
        b, h, w, _ = x.shape
        wh, ww = (h, w) if window is None else window
        weight = torch.cat([self.q.weight, self.k.weight, self.v.weight])
        bias = torch.cat([self.q.bias, self.k.bias, self.v.bias])
        table = self.position_table(wh, ww)
        if table is not None:  # e.g. half-precision q under autocast, float32 table
            table = table.to(x.dtype)
        out = window_attention(
            F.linear(x, weight, bias),
            self.num_heads,
            (0, 0) if window is None else window,
            scale=self.head_dim**-0.5,
            bias_table=table,
            bias_index=None if table is None else relative_index(wh, ww, x.device),
            mask_padded_keys=True,
        )
        return self.o(out.flatten(1, 2))


def relative_index(wh: int, ww: int, device: torch.device) -> torch.Tensor:
    """(N, N) index into the flattened (2wh - 1, 2ww - 1) table at key - query, N = wh * ww.

    Built from one flat ``arange`` (sizes may be symbolic for global attention).
    """
    n = wh * ww
    pair = torch.arange(n * n, device=device)
    query, key = pair // n, floor_mod(pair, n)
    rows = key // ww - query // ww + (wh - 1)
    cols = floor_mod(key, ww) - floor_mod(query, ww) + (ww - 1)
    return (rows * (2 * ww - 1) + cols).view(n, n)


class MBConvBlock(nn.Module):
    """Inverted bottleneck: BN -> 1x1 expand -> BN -> GELU -> 3x3 depthwise (stride) -> BN ->
    GELU -> [SE] -> 1x1 shrink, plus a shortcut (average pool if strided, 1x1 conv if the width
    changes). The expansion is relative to the *output* width, as in the official code."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        stride: int,
        expansion_rate: int,
        se_ratio: float | None,
        pool_size: int,
        drop_path: float,
    ) -> None:
        super().__init__()
        inner = out_channels * expansion_rate
        self.stride = stride
        self.pool_size = pool_size
        self.shortcut_conv = (
            nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        )
        self.pre_norm = batch_norm(in_channels)
        self.expand_conv = nn.Conv2d(in_channels, inner, 1, bias=False)
        self.expand_norm = batch_norm(inner)
        self.depthwise_conv = SameConv2d(inner, inner, 3, stride, groups=inner, bias=False)
        self.depthwise_norm = batch_norm(inner)
        self.se = (
            SqueezeExcite(inner, max(1, int(out_channels * se_ratio)))
            if se_ratio is not None
            else None
        )
        self.shrink_conv = nn.Conv2d(inner, out_channels, 1)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = avg_pool_same(x, self.pool_size, self.stride)
        return self.shortcut_conv(x) if self.shortcut_conv is not None else x

    def mbconv(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, C_out, ceil(H / stride), ceil(W / stride))."""
        y = F.gelu(self.expand_norm(self.expand_conv(self.pre_norm(x))))
        y = F.gelu(self.depthwise_norm(self.depthwise_conv(y)))
        if self.se is not None:
            y = self.se(y)
        return self.shortcut(x) + self.drop_path(self.shrink_conv(y))

    def forward(self, x: torch.Tensor, window: tuple[int, int] | None = None) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, C_out, ceil(H / stride), ceil(W / stride)).

        ``window`` is accepted for a uniform stage loop and ignored.
        """
        return self.mbconv(x)

    @torch.no_grad()
    def fuse(self) -> None:
        """Fold the three BatchNorms into the 1x1 expand and the depthwise conv (inference)."""
        scale, shift = _bn_affine(self.pre_norm)
        expand = self.expand_conv
        weight = expand.weight * scale.view(1, -1, 1, 1)  # BN before a 1x1 conv
        bias = expand.weight.flatten(1) @ shift
        fused = nn.Conv2d(expand.in_channels, expand.out_channels, 1).to(weight)
        fused.weight.copy_(weight)
        fused.bias.copy_(bias)
        self.expand_conv = _fold_bn_after(fused, self.expand_norm)
        self.depthwise_conv = _fold_bn_after(self.depthwise_conv, self.depthwise_norm)
        self.pre_norm = self.expand_norm = self.depthwise_norm = nn.Identity()


class MOATBlock(MBConvBlock):
    """MBConv (without SE) followed by ``x + Attention(LayerNorm(x))``, global or windowed."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        stride: int,
        expansion_rate: int,
        pool_size: int,
        drop_path: float,
        head_dim: int,
        position_embedding_size: int | None,
    ) -> None:
        super().__init__(
            in_channels,
            out_channels,
            stride=stride,
            expansion_rate=expansion_rate,
            se_ratio=None,
            pool_size=pool_size,
            drop_path=drop_path,
        )
        self.attention_norm = nn.LayerNorm(out_channels, eps=_LN_EPS)
        self.attention = Attention(out_channels, head_dim, position_embedding_size)

    def forward(self, x: torch.Tensor, window: tuple[int, int] | None = None) -> torch.Tensor:
        """One MOAT block.

        Args:
            x: (B, C_in, H, W).
            window: (wh, ww) attention window, or None for global attention.

        Returns:
            (B, C_out, H', W') with H' = ceil(H / stride), W' = ceil(W / stride).
        """
        x = self.mbconv(x)
        b, c, h, w = x.shape
        y = self.attention(self.attention_norm(x.permute(0, 2, 3, 1)), window)
        return x + self.drop_path(y.transpose(1, 2).view(b, c, h, w))


def _bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (scale, shift) of an inference-mode BatchNorm."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return scale, bn.bias - bn.running_mean * scale


def _fold_bn_after(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """Rewrite ``conv`` in place so that it computes ``bn(conv(x))`` (it gains a bias)."""
    scale, shift = _bn_affine(bn)
    bias = shift if conv.bias is None else conv.bias * scale + shift
    conv.weight.mul_(scale.view(-1, 1, 1, 1))
    conv.bias = nn.Parameter(bias.detach().clone())
    return conv


class Stem(nn.Module):
    """3x3 convs (the first with stride 2, TF 'same' padding), BN + GELU between them."""

    def __init__(self, in_channels: int, channels: Sequence[int]) -> None:
        super().__init__()
        self.num_convs = len(channels)
        for i, out in enumerate(channels):
            self.add_module(f'conv{i}', SameConv2d(in_channels, out, 3, 2 if i == 0 else 1))
            if i < self.num_convs - 1:
                self.add_module(f'norm{i}', batch_norm(out))
            in_channels = out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, channels[-1], ceil(H / 2), ceil(W / 2))."""
        for i in range(self.num_convs):
            x = getattr(self, f'conv{i}')(x)
            if i < self.num_convs - 1:
                x = F.gelu(getattr(self, f'norm{i}')(x))
        return x

    @torch.no_grad()
    def fuse(self) -> None:
        for i in range(self.num_convs - 1):
            _fold_bn_after(getattr(self, f'conv{i}'), getattr(self, f'norm{i}'))
            setattr(self, f'norm{i}', nn.Identity())


class MOATStage(nn.Module):
    """Blocks of one type; the first is strided. MOAT stages attend in ``window`` (None: global);
    with ``global_last`` their last block attends globally."""

    def __init__(
        self,
        blocks: Sequence[MBConvBlock],
        window: tuple[int, int] | None,
        global_last: bool,
        with_cp: bool,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.window = window
        self.windows = [window] * len(blocks)
        if global_last and isinstance(blocks[-1], MOATBlock):
            self.windows[-1] = None
        self.with_cp = with_cp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, C_out, ceil(H / stride), ceil(W / stride))."""
        for block, window in zip(self.blocks, self.windows, strict=True):
            if self.with_cp and torch.is_grad_enabled():
                x = cp.checkpoint(block, x, window, use_reentrant=False)
            else:
                x = block(x, window)
        return x


# ---------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------
def _moat(stem: int, depths: tuple, widths: tuple, survival_prob: float) -> dict:
    return dict(
        stem_channels=(stem, stem),
        depths=depths,
        widths=widths,
        # the official per-variant survival_prob (ImageNet training), as 1 - survival
        drop_path_rate=round(1.0 - survival_prob, 6),
    )


# deeplab2 model/pixel_encoder/moat.py: *_config and _get_moat_config_via_model_name
MOAT_ARCHS: dict[str, dict] = {
    'moat0': _moat(64, (2, 3, 7, 2), (96, 192, 384, 768), 0.8),
    'moat1': _moat(64, (2, 6, 14, 2), (96, 192, 384, 768), 0.7),
    'moat2': _moat(128, (2, 6, 14, 2), (128, 256, 512, 1024), 0.7),
    'moat3': _moat(160, (2, 12, 28, 2), (160, 320, 640, 1280), 0.4),
    'moat4': _moat(256, (2, 12, 28, 2), (256, 512, 1024, 2048), 0.3),
    'tiny_moat0': _moat(32, (2, 3, 7, 2), (32, 64, 128, 256), 1.0),
    'tiny_moat1': _moat(40, (2, 3, 7, 2), (40, 80, 160, 320), 1.0),
    'tiny_moat2': _moat(56, (2, 3, 7, 2), (56, 112, 224, 448), 1.0),
    'tiny_moat3': _moat(80, (2, 3, 7, 2), (80, 160, 320, 640), 0.9),
}

WindowArg = int | tuple[int, int] | None


@MODELS.register_module()
class MOAT(DenseBackbone):
    """MOAT: stem, two MBConv stages, two MOAT stages (MBConv + attention), strides 4/8/16/32.

    Args:
        arch: One of :data:`MOAT_ARCHS` (``moat0``..``moat4``, ``tiny_moat0``..``tiny_moat3``), or
            None to give ``stem_channels``, ``depths``, ``widths`` and ``drop_path_rate``
            explicitly. Explicit values override the arch's.
        stem_channels: Output channels of each stem conv (the first has stride 2).
        depths: Blocks per stage.
        widths: Output channels per stage (the official ``hidden_size``).
        block_types: ``'mbconv'`` or ``'moat'`` per stage.
        strides: Stride of the first block of each stage.
        expansion_rate: Inner width of MBConv over the block's output width.
        se_ratio: Squeeze-excitation width over the output width in MBConv blocks (None: no SE).
        head_dim: Channels per attention head (heads = width // head_dim).
        window_sizes: Attention window per stage: an int, (rows, cols), or None for global
            attention over the whole map. Ignored for MBConv stages. The default is the official
            COCO setting (14 x 14 windows at stride 16, global at stride 32); the official
            ADE20K setting is global in both (``(None, None, None, None)``), the ImageNet one
            ``(None, None, 14, 7)``.
        global_attention_at_end_of_moat_stage: Make the last block of every MOAT stage global.
        position_embedding_sizes: Side P of the learned relative position table per stage
            ((2P - 1)^2 entries per head, resized to each window); None for MBConv stages.
        relative_position_embedding: False for the official ``*_no_pe`` checkpoints.
        pool_size: Kernel of the strided shortcut average pool: 3 in the official dense form
            (``get_model``), 2 in its classification form.
        in_channels: Input image channels.
        channels_last: Run in the channels-last memory format whatever the input's (the
            outputs are NCHW tensors with channels-last strides). The attention half of every
            MOAT block is channels-last anyway, and oneDNN convolutions skip their layout
            reorders. False keeps the input's format.
        drop_path_rate: Stochastic depth; block ``b`` of ``n`` drops with ``rate * b / n``
            (the official rule). Defaults to the arch's ImageNet value (1 - survival_prob).
        out_indices: Stages whose outputs are returned.
        frozen_stages: -1 freezes nothing; 0 the stem; k >= 1 the stem and stages 0..k-1.
        norm_eval: Keep BatchNorm layers in eval mode while training.
        with_cp: Gradient checkpointing of every block.
        init_cfg: ``dict(type='Pretrained', checkpoint=PATH)`` loads an official deeplab2 MOAT
            checkpoint converted to a ``.pth`` of TF variable names (see
            ``tools/model_converters/moat_to_effvision.py``) or one of ours.
    """

    arch_settings = MOAT_ARCHS

    def __init__(
        self,
        *,
        arch: str | None = 'moat0',
        stem_channels: Sequence[int] | None = None,
        depths: Sequence[int] | None = None,
        widths: Sequence[int] | None = None,
        block_types: Sequence[str] = ('mbconv', 'mbconv', 'moat', 'moat'),
        strides: Sequence[int] = (2, 2, 2, 2),
        expansion_rate: int = 4,
        se_ratio: float | None = 0.25,
        head_dim: int = 32,
        window_sizes: Sequence[WindowArg] = (None, None, 14, None),
        global_attention_at_end_of_moat_stage: bool = False,
        position_embedding_sizes: Sequence[int | None] = (None, None, 14, 7),
        relative_position_embedding: bool = True,
        pool_size: int = 3,
        in_channels: int = 3,
        channels_last: bool = True,
        drop_path_rate: float | None = None,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        frozen_stages: int = -1,
        norm_eval: bool = False,
        with_cp: bool = False,
        init_cfg: dict | list[dict] | None = None,
    ) -> None:
        settings = self.resolve_arch(
            arch,
            stem_channels=stem_channels,
            depths=depths,
            widths=widths,
            drop_path_rate=drop_path_rate,
        )
        stem_channels = tuple(settings['stem_channels'])
        depths, widths = tuple(settings['depths']), tuple(settings['widths'])
        drop_path_rate = settings['drop_path_rate']
        num_stages = len(depths)
        per_stage = dict(
            widths=widths,
            block_types=block_types,
            strides=strides,
            window_sizes=window_sizes,
            position_embedding_sizes=position_embedding_sizes,
        )
        for name, values in per_stage.items():
            if len(values) != num_stages:
                raise ValueError(
                    f'MOAT: {name} has {len(values)} entries but depths {depths} has '
                    f'{num_stages} stages; give one entry per stage'
                )
        if not stem_channels:
            raise ValueError('MOAT: stem_channels needs at least one conv')
        for kind in block_types:
            if kind not in ('mbconv', 'moat'):
                raise ValueError(f"MOAT: block type {kind!r} is not 'mbconv' or 'moat'")
        if pool_size < max(strides):
            raise ValueError(f'MOAT: pool_size {pool_size} must be >= every stride {strides}')
        super().__init__(
            num_stages=num_stages,
            out_indices=out_indices,
            frozen_stages=frozen_stages,
            norm_eval=norm_eval,
            init_cfg=init_cfg,
        )
        self.depths, self.widths, self.block_types = depths, widths, tuple(block_types)
        self.head_dim = head_dim
        self.deploy = False
        self.channels_last = channels_last
        self.num_features = list(widths)

        self.stem = Stem(in_channels, stem_channels)
        total = sum(depths)
        channels = stem_channels[-1]
        self.stages = nn.ModuleList()
        reductions, reduction = [], 2
        for i in range(num_stages):
            window = window_sizes[i] if block_types[i] == 'moat' else None  # MBConv: no attention
            window = pair(window) if window is not None else None
            pos_size = position_embedding_sizes[i] if relative_position_embedding else None
            if block_types[i] == 'moat' and relative_position_embedding and pos_size is None:
                raise ValueError(f'MOAT: stage {i} needs a position_embedding_sizes entry')
            blocks = []
            for j in range(depths[i]):
                common = dict(
                    stride=strides[i] if j == 0 else 1,
                    expansion_rate=expansion_rate,
                    pool_size=pool_size,
                    drop_path=drop_path_rate * (sum(depths[:i]) + j) / total,
                )
                if block_types[i] == 'moat':
                    block = MOATBlock(
                        channels,
                        widths[i],
                        head_dim=head_dim,
                        position_embedding_size=pos_size,
                        **common,
                    )
                else:
                    block = MBConvBlock(channels, widths[i], se_ratio=se_ratio, **common)
                blocks.append(block)
                channels = widths[i]
            self.stages.append(
                MOATStage(blocks, window, global_attention_at_end_of_moat_stage, with_cp)
            )
            reduction *= strides[i]
            reductions.append(reduction)
        self.feature_info = [
            dict(num_chs=widths[i], reduction=reductions[i], module=f'stages.{i}')
            for i in self.out_indices
        ]
        self._freeze_stages()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Extract multi-scale features.

        Args:
            x: (B, C_in, H, W) images of any size.

        Returns:
            One (B, widths[i], H_i, W_i) tensor per ``out_indices`` entry, NCHW, where
            H_i = ceil(H / 4 / 2**i) for the default strides (TF 'same' rounding).
        """
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.stem(x)
        outs = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.out_indices:
                outs.append(x)
        return tuple(outs)

    # -- training utilities --------------------------------------------------------------------
    @torch.no_grad()
    def switch_to_deploy(self) -> None:
        """Fold every BatchNorm into the adjacent conv (stem conv, 1x1 expand, depthwise).

        Inference only: the running statistics become weights, so training afterwards is not
        the same model. Idempotent.
        """
        if self.deploy:
            return
        self.stem.fuse()
        for stage in self.stages:
            for block in stage.blocks:
                block.fuse()
        self.deploy = True

    # -- weight init ---------------------------------------------------------------------------
    def init_random_weights(self) -> None:
        """The official init: N(0, 0.02) kernels and tables, zero biases, unit norms."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d | nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, Attention) and module.relative_position_embedding is not None:
                nn.init.normal_(module.relative_position_embedding, std=0.02)

    def convert_checkpoint(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """deeplab2 (TF variable names) or effvision MOAT weights to ours."""
        fmt = detect_format(state)
        return convert_tf(state) if fmt == 'tf' else dict(state)


# ---------------------------------------------------------------------------------------------
# official-checkpoint conversion
# ---------------------------------------------------------------------------------------------
# Buffers we rebuild rather than load. deeplab2 stores none (its lookup tensors and resized
# position bias are graph constants, not variables), and neither do we.
DERIVED_KEYS: tuple[str, ...] = ()
# Classification-head variables of the ImageNet checkpoints; the dense encoder drops them.
TF_CLASSIFIER_SCOPES = ('final_layer_norm/', 'logits_head/')
_EMA_SUFFIX = '/ExponentialMovingAverage'
_BN_NAMES = {
    'gamma': 'weight',
    'beta': 'bias',
    'moving_mean': 'running_mean',
    'moving_variance': 'running_var',
}
_TF_VARIABLE = re.compile(
    r'^(?:.*/)?moat/(stem/.+|block_\d+_\d+/.+|final_layer_norm/.+|logits_head/.+)$'
)
_TF_STEM_UNSCOPED = re.compile(r'^(conv|norm)_\d+/')
# Everything a TF checkpoint holds besides model variables: optimizer slots and counters.
_TF_NON_MODEL = re.compile(
    r'(/(Momentum|RMSProp|RMSProp_1|Adam|Adam_1|Adagrad|LARS|ExponentialMovingAverage_\d+)$)'
    r'|(^|/)(global_step|learning_rate|beta1_power|beta2_power|_CHECKPOINTABLE_OBJECT_GRAPH)$'
)


def detect_format(state: Mapping[str, torch.Tensor]) -> str:
    """``'tf'`` for deeplab2 variable names (``moat/block_00_00/...``), ``'effvision'`` for ours.

    Raises:
        CheckpointError: Neither, with what to do instead.
    """
    keys = list(state)
    if any(k.startswith(('stem.', 'stages.')) for k in keys):
        return 'effvision'
    if any(_tf_name(k) is not None for k in keys):
        return 'tf'
    raise CheckpointError(
        'not a MOAT checkpoint: expected deeplab2 TF variable names (moat/stem/..., '
        'moat/block_SS_BB/...) or effvision keys (stem., stages.); '
        f'first keys: {keys[:5]}. A TF checkpoint must first be read into a .pth with '
        'tools/model_converters/moat_to_effvision.py; for a full segmentor checkpoint pass '
        'prefix="backbone".'
    )


def _tf_name(key: str) -> str | None:
    """The variable name relative to the ``moat/`` scope, or None for a non-MOAT key."""
    key = key.removesuffix(':0')
    match = _TF_VARIABLE.match(key)
    if match:
        return match.group(1)
    if _TF_STEM_UNSCOPED.match(key):  # TF2 eager naming loses the Sequential's scope
        return 'stem/' + key
    return None


def _convert_tf_tensor(name: str, value: torch.Tensor) -> tuple[str, torch.Tensor]:
    """One deeplab2 variable (name relative to ``moat/``) -> (our key, our layout)."""
    parts = name.split('/')
    leaf = parts[-1]
    if parts[0] == 'stem':
        layer, index = parts[1].rsplit('_', 1)
        prefix = f'stem.{layer}{index}'
    else:
        stage, block = (int(s) for s in parts[0][len('block_') :].split('_'))
        prefix = f'stages.{stage}.blocks.{block}.' + '.'.join(parts[1:-1])
        prefix = prefix.replace('se.reduce_conv2d', 'se.reduce')
        prefix = prefix.replace('se.expand_conv2d', 'se.expand')
    if leaf in _BN_NAMES:
        return f'{prefix}.{_BN_NAMES[leaf]}', value
    if leaf == 'kernel':  # HWIO -> OIHW
        return f'{prefix}.weight', value.permute(3, 2, 0, 1)
    if leaf == 'depthwise_kernel':  # (kh, kw, C, 1) -> (C, 1, kh, kw)
        return f'{prefix}.weight', value.permute(2, 3, 0, 1)
    if leaf == 'relative_position_embedding':  # (heads, 2P - 1, 2P - 1), same layout
        return f'{prefix}.relative_position_embedding', value
    layer = parts[-2]
    if layer in ('q', 'k', 'v') and leaf == 'weight':  # (C, heads, d) -> (heads * d, C)
        return f'{prefix}.weight', value.flatten(1).t()
    if layer == 'o' and leaf == 'weight':  # (heads, d, C) -> (C, heads * d)
        return f'{prefix}.weight', value.flatten(0, 1).t()
    if leaf == 'bias':  # (heads, d) for q/k/v, (C,) otherwise
        return f'{prefix}.bias', value.flatten()
    raise CheckpointError(f'unknown MOAT variable moat/{name} {tuple(value.shape)}')


def convert_tf(
    state: Mapping[str, torch.Tensor], *, use_ema: bool = False
) -> dict[str, torch.Tensor]:
    """Convert deeplab2 MOAT variables (TF names and layouts) to effvision's state dict.

    Accepts the dense encoder (``get_model``) and the ImageNet classification checkpoints alike:
    names with or without ``:0`` and with any scope above ``moat/`` (TF2 eager names of the stem
    without their ``moat/stem/`` scope too). Kernels go from HWIO to OIHW, depthwise kernels from
    (kh, kw, C, 1) to (C, 1, kh, kw), the einsum projections q/k/v (C, heads, d) and o
    (heads, d, C) to linear weights. Dropped: the classifier (``final_layer_norm``,
    ``logits_head``), optimizer slots and counters, and the ``/ExponentialMovingAverage``
    shadows unless ``use_ema`` (deeplab2 itself loads the raw values). BatchNorm moving
    statistics are converted when present (deeplab2 never reads them: BN trains in train mode
    downstream). Keys that are none of these are passed through unchanged, so that loading
    reports them as unexpected.

    Args:
        state: TF variable name -> tensor (e.g. read by ``moat_to_effvision.py``).
        use_ema: Take ``<name>/ExponentialMovingAverage`` where the checkpoint has it.

    Returns:
        A new dict with effvision keys and PyTorch layouts.
    """
    ema = {k.removesuffix(':0')[: -len(_EMA_SUFFIX)]: v for k, v in state.items()
           if k.removesuffix(':0').endswith(_EMA_SUFFIX)}  # fmt: skip
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        raw = key.removesuffix(':0')
        if raw.endswith(_EMA_SUFFIX) or _TF_NON_MODEL.search(raw):
            continue
        name = _tf_name(raw)
        if name is None:
            out[key] = value
            continue
        if name.startswith(TF_CLASSIFIER_SCOPES):
            continue
        if use_ema and raw in ema:
            value = ema[raw]
        new_key, new_value = _convert_tf_tensor(name, torch.as_tensor(value))
        out[new_key] = new_value.contiguous()
        if name.endswith('/gamma') and not name.endswith('attention_norm/gamma'):
            # a BatchNorm: PyTorch also stores its update counter (Keras has none)
            out[new_key[: -len('weight')] + 'num_batches_tracked'] = torch.tensor(0)
    return out
