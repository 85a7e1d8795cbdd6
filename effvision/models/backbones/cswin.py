"""CSWin Transformer backbone for dense prediction.

Dong et al., "CSWin Transformer: A General Vision Transformer Backbone with Cross-Shaped Windows",
CVPR 2022. Reference: the official dense code, microsoft/CSWin-Transformer
``segmentation/backbone/cswin_transformer.py`` (class ``CSWin``) @ f111ae2, which our outputs match
to float64 round-off; the variants and the classification checkpoints come from ``models/cswin.py``
in the same commit. Written anew; what differs and why:

* Stripe attention is :func:`effvision.ops.window_attention` with full-height (or full-width)
  windows and centred zero padding: a fused C++/CUDA kernel reads each branch's q, k, v straight
  from the projected map and writes the output map (no ``F.pad``, partition or crop), or its
  PyTorch reference runs (also what ONNX export records). The qkv rows are stored grouped per
  branch ([q k v] of branch 0, then of branch 1; the converters permute the official rows) so
  that each branch is one channel slice. LePE, the depthwise 3x3 conv on V inside each stripe,
  gathers V's stripes with one index vector and scatters back with another
  (:func:`stripe_layout`), channels-last; H and W stay symbolic under ``torch.export``.
* Stage widths always double (``models/cswin.py`` and the paper). The dense class computes them as
  ``width * (heads[i+1] // heads[i])``: the same for T/S/B, but it gives CSWin-L a 576-wide last
  stage instead of the 1152 of the released CSWin-L weights. ``widths=`` reproduces any other rule.
* State-dict names are ours (``stem``, ``stages.i.downsample``, ``stages.i.blocks.j.attn``,
  ``norm{i}`` 0-based); :func:`convert_official_dense` and :func:`convert_official_cls` map the
  official checkpoints, and ``init_cfg`` converts on load.

Behaviour of the official dense code that we keep on purpose (it defines the published numbers):
stripes pad the token map **centred** (top/left get ``pad // 2``) with zeros **after** the qkv
projection; padded keys are **not masked** (logit 0, value 0) and LePE sees them as zeros; LePE
pads each stripe at its own borders; the last stage is one branch of global attention over the
whole map at any input size (its stripe width is never used); the block's ``proj_drop`` is never
applied; a stage with an odd head count gives each branch ``heads // 2`` heads (one is silently
lost). The official dense code ignores ``qkv_bias`` (always a bias); ours honours it, default True.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
import torch.utils.checkpoint as cp
from timm.layers import DropPath, trunc_normal_
from torch import nn

from effvision.models.backbones.base import DenseBackbone
from effvision.models.layers.mlp import Mlp
from effvision.models.layers.window import floor_mod, round_up, to_nchw
from effvision.ops.window_attention import window_attention
from effvision.registry import MODELS
from effvision.utils.checkpoint import CheckpointError

__all__ = [
    'CSWin',
    'CSWIN_ARCHS',
    'DERIVED_KEYS',
    'convert_checkpoint',
    'convert_official_cls',
    'convert_official_dense',
    'detect_format',
]


# ---------------------------------------------------------------------------------------------
# building blocks
# ---------------------------------------------------------------------------------------------
class StripeLayout(NamedTuple):
    """Where one branch's stripes come from and go back to, for an (H, W) token map.

    Attributes:
        gather: (nW * N,) row index, one per stripe slot (stripe k, position p at ``k * N + p``),
            into (H * W * branches) rows, one per (token, branch) (one branch: the token map's
            rows); padding slots point at row 0 and are zeroed with ``keep``.
        keep: (nW * N, 1) 1 for slots holding a token, 0 for padding.
        scatter: (H * W,) index into the stripe slots, one per token.
        height, width: Stripe extent in tokens (N = height * width).
        window: The stripe as :func:`effvision.ops.window_attention`'s window, 0 for the whole
            axis: (0, split) for vertical stripes, (split, 0) for horizontal ones.
    """

    gather: torch.Tensor
    keep: torch.Tensor
    scatter: torch.Tensor
    height: int
    width: int
    window: tuple[int, int]


def stripe_layout(
    h: int,
    w: int,
    split: int,
    vertical: bool,
    branch: int,
    num_branches: int,
    dtype: torch.dtype,
    device: torch.device | None = None,
) -> StripeLayout:
    """Stripes over an (h, w) token map padded centred to a multiple of ``split``, as officially.

    Vertical stripes span the full height and ``split`` columns; horizontal ones ``split`` rows
    and the full width. The official code pads the map with ``pad // 2`` zeros at the top/left
    and the rest at the bottom/right. Stripes are windows whose long side is the whole map; the
    indices are written for that case (``round_up(h, h)`` for a full-height window would make
    ``torch.export`` guard on sizes). Every index comes from one flat ``arange`` and H, W stay
    symbolic.

    Args:
        h, w: Token map size (may be symbolic).
        split: Stripe width in tokens.
        vertical: Full-height stripes (the official ``idx=0`` branch), else full-width ones.
        branch, num_branches: Which of the interleaved per-token branch rows to gather.
        dtype: Of ``keep``.
        device: Where to build the indices.
    """
    token = torch.arange(h * w, device=device)
    if vertical:
        wp = round_up(w, split)
        left = (wp - w) // 2
        n = h * split
        slot = torch.arange(h * wp, device=device)
        pos = floor_mod(slot, n)
        col = (slot // n) * split + floor_mod(pos, split) - left
        inside = (col >= 0) & (col < w)
        source = (pos // split) * w + col
        shifted = floor_mod(token, w) + left
        scatter = (shifted // split) * n + (token // w) * split + floor_mod(shifted, split)
        height, width = h, split
    else:  # full-width stripes are consecutive rows: the slots are the padded token sequence
        top = (round_up(h, split) - h) // 2 * w
        source = torch.arange(round_up(h, split) * w, device=device) - top
        inside = (source >= 0) & (source < h * w)
        scatter = token + top
        height, width = split, w
    gather = torch.where(inside, source, torch.zeros_like(source)) * num_branches + branch
    window = (0, split) if vertical else (split, 0)
    return StripeLayout(gather, inside[:, None].to(dtype), scatter, height, width, window)


def conv_tokens(conv: nn.Conv2d, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Apply ``conv`` to the tokens of an (h, w) map: (B, h * w, C) -> (B, h', w', C').

    Eager mode convolves in PyTorch's channels-last memory format, as the tokens already are
    (faster on CPU than through an NCHW copy, most for depthwise convs over thin stripes). Under
    ``torch.export``/``torch.compile`` memory-format and view checks would guard on sizes of 1,
    so there the map goes through contiguous NCHW with flat reshapes only, keeping H and W
    symbolic.

    Args:
        x: (B, h * w, C), possibly strided (e.g. V inside packed q, k, v).
    """
    if not torch.compiler.is_compiling():
        x = x.unflatten(1, (h, w)).permute(0, 3, 1, 2)
        return conv(x.contiguous(memory_format=torch.channels_last)).permute(0, 2, 3, 1)
    b, _, c = x.shape
    y = conv(x.transpose(1, 2).contiguous().view(b, c, h, w))
    b, c, h, w = y.shape
    return y.view(b, c, h * w).transpose(1, 2).contiguous().view(b, h, w, c)


class CrossShapedAttention(nn.Module):
    """Cross-shaped window self-attention with LePE.

    Half of the channels (and heads) attend within vertical stripes (full height, ``split``
    columns), the other half within horizontal stripes (``split`` rows, full width); the branch
    outputs are concatenated and projected. With ``global_attn`` one branch over all channels
    attends over the whole map (the last stage). LePE is a depthwise 3x3 conv on V inside each
    stripe, added to the attention output.
    """

    def __init__(
        self, dim: int, num_heads: int, global_attn: bool, qkv_bias: bool, attn_drop: float
    ) -> None:
        super().__init__()
        self.num_branches = 1 if global_attn else 2
        self.branch_dim = dim // self.num_branches
        # the official code gives each branch num_heads // 2 heads
        self.branch_heads = num_heads // self.num_branches
        self.head_dim = self.branch_dim // self.branch_heads
        self.scale = self.head_dim**-0.5
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.lepe = nn.ModuleList(
            nn.Conv2d(self.branch_dim, self.branch_dim, 3, padding=1, groups=self.branch_dim)
            for _ in range(self.num_branches)
        )
        self.proj = nn.Linear(dim, dim)

    def _attend(
        self,
        qkv: torch.Tensor,
        window: tuple[int, int],
        lepe: nn.Conv2d,
        layout: StripeLayout | None,
    ) -> torch.Tensor:
        """One branch: (B, H, W, 3C') projected map -> (B, H, W, C') attention output + LePE."""
        b, h, w, _ = qkv.shape
        x = window_attention(
            qkv,
            self.branch_heads,
            window,
            scale=self.scale,
            center_pad=True,
            dropout_p=self.attn_drop if self.training else 0.0,
        )
        # LePE: depthwise 3x3 conv on V within each stripe, zero-padded at the stripe's borders
        v = qkv[..., 2 * self.branch_dim :].reshape(b, h * w, self.branch_dim)
        if layout is None:
            return x + conv_tokens(lepe, v, h, w)
        stripes = v.index_select(1, layout.gather).mul_(layout.keep)
        pos = conv_tokens(lepe, stripes.view(-1, layout.height * layout.width, self.branch_dim),
                          layout.height, layout.width)  # fmt: skip
        # reshape: the layout of pos depends on the device's conv kernels (a view on CPU)
        pos = pos.reshape(b, -1, self.branch_dim).index_select(1, layout.scatter)
        return x + pos.view(b, h, w, self.branch_dim)

    def forward(self, x: torch.Tensor, layouts: Sequence[StripeLayout] | None) -> torch.Tensor:
        """Attend within cross-shaped stripes.

        Args:
            x: (B, H, W, C) normalised tokens.
            layouts: The LePE :class:`StripeLayout` of each branch (vertical, horizontal), or
                None for global attention.

        Returns:
            (B, H, W, C).
        """
        qkv = self.qkv(x)  # (B, H, W, 3C)
        if layouts is None:  # one branch: [q | k | v]
            return self.proj(self._attend(qkv, (0, 0), self.lepe[0], None))
        # Two branches: the qkv channels are grouped per branch, [q k v of branch 0 | of
        # branch 1] (the converter permutes the official [q | k | v] x [branch 0 | branch 1]).
        width = 3 * self.branch_dim
        outs = [
            self._attend(qkv[..., i * width : (i + 1) * width], layout.window, self.lepe[i], layout)
            for i, layout in enumerate(layouts)
        ]
        return self.proj(torch.cat(outs, dim=-1))


class CSWinBlock(nn.Module):
    """Pre-norm cross-shaped window attention followed by a pre-norm MLP."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        global_attn: bool,
        mlp_ratio: float,
        qkv_bias: bool,
        drop: float,
        attn_drop: float,
        drop_path: float,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = CrossShapedAttention(dim, num_heads, global_attn, qkv_bias, attn_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: torch.Tensor, layouts: Sequence[StripeLayout] | None) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C); ``layouts`` as in :class:`CrossShapedAttention`."""
        x = x + self.drop_path(self.attn(self.norm1(x), layouts))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class Stem(nn.Module):
    """Overlapping 7x7 stride-4 conv embedding + LayerNorm."""

    def __init__(self, in_channels: int, dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, dim, 7, stride=4, padding=2)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, (H - 3) // 4 + 1, (W - 3) // 4 + 1, C) channels-last."""
        return self.norm(self.conv(x).permute(0, 2, 3, 1))


class MergeBlock(nn.Module):
    """3x3 stride-2 conv + LayerNorm between stages."""

    def __init__(self, dim: int, dim_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim_out, 3, stride=2, padding=1)
        self.norm = nn.LayerNorm(dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, ceil(H / 2), ceil(W / 2), C_out), convolved channels-last."""
        return self.norm(conv_tokens(self.conv, x.flatten(1, 2), x.shape[1], x.shape[2]))


class CSWinStage(nn.Module):
    """Optional downsampling, then ``depth`` blocks sharing the stage's stripe layouts."""

    def __init__(
        self,
        dim_in: int,
        dim: int,
        depth: int,
        num_heads: int,
        split_size: int,
        global_attn: bool,
        mlp_ratio: float,
        qkv_bias: bool,
        drop: float,
        attn_drop: float,
        drop_path: Sequence[float],
        downsample: bool,
        with_cp: bool,
    ) -> None:
        super().__init__()
        self.split_size = split_size
        self.global_attn = global_attn
        self.with_cp = with_cp
        self.downsample = MergeBlock(dim_in, dim) if downsample else None
        self.blocks = nn.ModuleList(
            CSWinBlock(
                dim, num_heads, global_attn, mlp_ratio, qkv_bias, drop, attn_drop, drop_path[i]
            )
            for i in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C_in) -> (B, H', W', C), H' = ceil(H / 2) after downsampling, else H."""
        if self.downsample is not None:
            x = self.downsample(x)
        h, w = x.shape[1], x.shape[2]
        layouts = None
        if not self.global_attn:
            split, dtype, device = self.split_size, x.dtype, x.device
            layouts = (
                stripe_layout(h, w, split, True, 0, 1, dtype, device),
                stripe_layout(h, w, split, False, 0, 1, dtype, device),
            )
        for block in self.blocks:
            if self.with_cp and x.requires_grad:
                x = cp.checkpoint(block, x, layouts, use_reentrant=False)
            else:
                x = block(x, layouts)
        return x


# ---------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------
CSWIN_ARCHS: dict[str, dict] = {
    # microsoft/CSWin-Transformer models/cswin.py (@register_model functions); split_sizes[-1] is
    # the classification models' last-stage window, unused by the dense (global) last stage
    'tiny': dict(
        embed_dim=64, depths=(1, 2, 21, 1), num_heads=(2, 4, 8, 16), split_sizes=(1, 2, 7, 7)
    ),
    'small': dict(
        embed_dim=64, depths=(2, 4, 32, 2), num_heads=(2, 4, 8, 16), split_sizes=(1, 2, 7, 7)
    ),
    'base': dict(
        embed_dim=96, depths=(2, 4, 32, 2), num_heads=(4, 8, 16, 32), split_sizes=(1, 2, 7, 7)
    ),
    'large': dict(
        embed_dim=144, depths=(2, 4, 32, 2), num_heads=(6, 12, 24, 24), split_sizes=(1, 2, 7, 7)
    ),
    'base_384': dict(
        embed_dim=96, depths=(2, 4, 32, 2), num_heads=(4, 8, 16, 32), split_sizes=(1, 2, 12, 12)
    ),
    'large_384': dict(
        embed_dim=144, depths=(2, 4, 32, 2), num_heads=(6, 12, 24, 24), split_sizes=(1, 2, 12, 12)
    ),
}


@MODELS.register_module()
class CSWin(DenseBackbone):
    """CSWin Transformer backbone with the official dense-prediction behaviour.

    Any input size works: the stem and merge convs define the sizes (stride-4 7x7 conv with
    padding 2, then stride-2 3x3 convs with padding 1, so stage i has ``(H - 3) // 4 + 1`` rows
    halved ``i`` times rounding up); each stripe branch pads its map centred to a multiple of the
    stripe width with zeros after the qkv projection, unmasked, and crops back (the official dense
    policy); the last stage attends globally.

    Args:
        arch: One of :data:`CSWIN_ARCHS` (``tiny``, ``small``, ``base``, ``large``, ``base_384``,
            ``large_384``), or None to give ``embed_dim``, ``depths``, ``num_heads`` and
            ``split_sizes`` explicitly. Explicit values override the arch's.
        embed_dim: Channels of the first stage.
        depths: Blocks per stage.
        num_heads: Attention heads per stage (each stripe branch gets half of them).
        split_sizes: Stripe width per stage (the last one is unused: the last stage is global).
        widths: Channels per stage; None doubles ``embed_dim`` every stage, as the classification
            checkpoints do.
        in_channels: Input image channels.
        mlp_ratio: MLP hidden width over the block width.
        qkv_bias: Learn a bias in the qkv projection (the official dense code always does).
        drop_rate: Dropout in the MLP.
        attn_drop_rate: Dropout on attention probabilities.
        drop_path_rate: Stochastic depth, increasing linearly from 0 to this over all blocks.
        out_indices: Stages whose outputs are returned.
        frozen_stages: -1 freezes nothing; 0 freezes the stem; k >= 1 freezes the stem and stages
            0..k-1 (with their downsampling and output norms), mmseg's convention.
        norm_eval: Keep BatchNorm layers in eval mode (CSWin has none; accepted for the contract).
        with_cp: Gradient checkpointing of every block (saves memory, costs one extra forward).
        init_cfg: ``dict(type='Pretrained', checkpoint=PATH)`` loads an official CSWin checkpoint
            (ImageNet classification, or an ADE20K UPerNet one whose ``backbone.`` keys are
            picked out), or one of ours, converting it on the fly.
    """

    arch_settings = CSWIN_ARCHS

    def __init__(
        self,
        *,
        arch: str | None = 'tiny',
        embed_dim: int | None = None,
        depths: Sequence[int] | None = None,
        num_heads: Sequence[int] | None = None,
        split_sizes: Sequence[int] | None = None,
        widths: Sequence[int] | None = None,
        in_channels: int = 3,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        frozen_stages: int = -1,
        norm_eval: bool = False,
        with_cp: bool = False,
        init_cfg: dict | list[dict] | None = None,
    ) -> None:
        settings = self.resolve_arch(
            arch, embed_dim=embed_dim, depths=depths, num_heads=num_heads, split_sizes=split_sizes
        )
        embed_dim = settings['embed_dim']
        depths, num_heads = tuple(settings['depths']), tuple(settings['num_heads'])
        split_sizes = tuple(settings['split_sizes'])
        num_stages = len(depths)
        widths = (
            tuple(widths)
            if widths is not None
            else tuple(embed_dim * 2**i for i in range(num_stages))
        )
        if not len(num_heads) == len(split_sizes) == len(widths) == num_stages:
            raise ValueError(
                f'depths {depths}, num_heads {num_heads}, split_sizes {split_sizes} and widths '
                f'{widths} must have one entry per stage'
            )
        for i, (width, heads, split) in enumerate(zip(widths, num_heads, split_sizes)):
            branches = 1 if i == num_stages - 1 else 2
            if split < 1 or heads < branches or width % (branches * (heads // branches)):
                raise ValueError(
                    f'stage {i}: width {width}, {heads} heads, stripe width {split} do not fit: '
                    f'each of its {branches} branch(es) needs at least one head, the width must '
                    f'split evenly into {branches} x (heads // {branches}) heads, and the stripe '
                    'width must be positive'
                )
        super().__init__(
            num_stages=num_stages,
            out_indices=out_indices,
            frozen_stages=frozen_stages,
            norm_eval=norm_eval,
            init_cfg=init_cfg,
        )
        self.embed_dim = embed_dim
        self.depths = depths
        self.num_heads = num_heads
        self.split_sizes = split_sizes
        self.num_features = list(widths)

        self.stem = Stem(in_channels, widths[0])
        total = sum(depths)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]  # linear decay rule
        self.stages = nn.ModuleList()
        for i in range(num_stages):
            start = sum(depths[:i])
            self.stages.append(
                CSWinStage(
                    widths[max(i - 1, 0)],
                    widths[i],
                    depths[i],
                    num_heads[i],
                    split_sizes[i],
                    global_attn=i == num_stages - 1,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    drop=drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=rates[start : start + depths[i]],
                    downsample=i > 0,
                    with_cp=with_cp,
                )
            )
        for i in self.out_indices:
            self.add_module(f'norm{i}', nn.LayerNorm(widths[i]))
        self.feature_info = [
            dict(num_chs=widths[i], reduction=4 * 2**i, module=f'stages.{i}')
            for i in self.out_indices
        ]
        self._freeze_stages()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Extract multi-scale features.

        Args:
            x: (B, C_in, H, W) images of any size (H, W >= 3).

        Returns:
            One (B, widths[i], H_i, W_i) tensor per ``out_indices`` entry, NCHW, with
            ``H_0 = (H - 3) // 4 + 1`` and ``H_i = ceil(H_{i-1} / 2)`` (likewise W).
        """
        x = self.stem(x)  # (B, H/4, W/4, C)
        outs = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.out_indices:
                outs.append(to_nchw(getattr(self, f'norm{i}')(x)))
        return tuple(outs)

    # -- training utilities --------------------------------------------------------------------
    # -- weight init ---------------------------------------------------------------------------
    def init_random_weights(self) -> None:
        """The official init: truncated normal (std 0.02) linear weights, zero biases, unit
        LayerNorms; convolutions keep PyTorch's default."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def convert_checkpoint(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Official (classification or dense, bare or inside a segmentor) or effvision CSWin
        weights to ours; see :func:`detect_format`."""
        return convert_checkpoint(state)


# ---------------------------------------------------------------------------------------------
# official-checkpoint conversion
# ---------------------------------------------------------------------------------------------
# Buffers the official code may store that we rebuild (or never need): the dense block registers
# ``atten_mask_matrix`` as a None buffer, so released files do not hold it, but we drop it if found.
DERIVED_KEYS = ('atten_mask_matrix',)

_OFFICIAL_ROOTS = ('stage1_conv_embed.', 'stage1.', 'merge1.')


def detect_format(state: Mapping[str, torch.Tensor]) -> str:
    """Name the layout of a CSWin state dict.

    Returns:
        ``'official_dense'`` (segmentation backbone: output norms ``norm1..norm4``),
        ``'official_cls'`` (ImageNet model: final ``norm`` and ``head``), ``'effvision'``, or
        the same three prefixed with ``'segmentor:'`` when the keys sit under ``backbone.`` (a
        full UPerNet checkpoint).

    Raises:
        CheckpointError: Not a CSWin checkpoint.
    """
    keys = list(state)
    if any(k.startswith(_OFFICIAL_ROOTS) for k in keys):
        if any(k.startswith(('head.', 'norm.')) for k in keys):
            return 'official_cls'
        return 'official_dense'
    if any(k.startswith(('stem.', 'stages.')) for k in keys):
        return 'effvision'
    inner = {k[len('backbone.') :]: v for k, v in state.items() if k.startswith('backbone.')}
    if inner:
        return 'segmentor:' + detect_format(inner)
    raise CheckpointError(
        'not a CSWin checkpoint: no key starts with stage1_conv_embed./stage1. (official) or '
        f'stem./stages. (effvision), nor with backbone. (a segmentor); first keys: {keys[:5]}. '
        'Pass the CSWin ImageNet or UPerNet checkpoint (or prefix="..." for another wrapper).'
    )


def _rename_official(key: str) -> str | None:
    """One official key -> ours (None: not a backbone tensor we keep)."""
    parts = key.split('.')
    root = parts[0]
    if root == 'stage1_conv_embed':  # Sequential(conv, Rearrange, LayerNorm)
        part = {'0': 'conv', '2': 'norm'}.get(parts[1])
        return '.'.join(['stem', part, *parts[2:]]) if part else None
    if root.startswith('merge'):
        return '.'.join([f'stages.{int(root[5:])}.downsample', *parts[1:]])
    if root.startswith('stage'):
        stage, block, rest = int(root[5:]) - 1, parts[1], parts[2:]
        if rest[0] in ('qkv', 'proj'):
            rest = ['attn', *rest]
        elif rest[0] == 'attns':  # attns.{branch}.get_v.* -> attn.lepe.{branch}.*
            rest = ['attn', 'lepe', rest[1], *rest[3:]]
        return '.'.join([f'stages.{stage}.blocks.{block}', *rest])
    if root.startswith('norm') and root[4:].isdigit():  # dense output norms are 1-based
        return '.'.join([f'norm{int(root[4:]) - 1}', *parts[1:]])
    return None


def _group_qkv_by_branch(value: torch.Tensor) -> torch.Tensor:
    """Reorder qkv rows (or biases) from [q | k | v] x [branch 0 | 1] to [q k v] per branch."""
    return value.unflatten(0, (3, 2, -1)).transpose(0, 1).flatten(0, 2)


def convert_official_dense(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The official segmentation backbone's keys (``CSWin`` in
    ``segmentation/backbone/cswin_transformer.py``, without the ``backbone.`` prefix) -> ours.

    Besides renaming, the qkv rows of the two-branch stages (all but the last) are grouped per
    branch (see :class:`CrossShapedAttention`).
    """
    stages = [int(k.split('.')[0][5:]) for k in state if re.match(r'stage\d+\.', k)]
    last = max(stages, default=0)
    out = {}
    for key, value in state.items():
        if key.endswith(DERIVED_KEYS):
            continue
        new = _rename_official(key)
        if new is None:
            raise CheckpointError(f'unexpected key {key!r} in an official CSWin dense checkpoint')
        if '.attn.qkv.' in new and int(key.split('.')[0][5:]) != last:
            value = _group_qkv_by_branch(value)
        out[new] = value
    return out


def convert_official_cls(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The official ImageNet model's keys (``models/cswin.py``) -> ours.

    The classifier ``head`` and the final ``norm`` are dropped: the official dense code loads
    them as unexpected keys and trains its output norms from scratch, and so do we.
    """
    return convert_official_dense(
        {k: v for k, v in state.items() if not k.startswith(('head.', 'norm.'))}
    )


def convert_checkpoint(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Any supported CSWin state dict -> ours (see :func:`detect_format`; ours unchanged)."""
    fmt = detect_format(state)
    if fmt.startswith('segmentor:'):
        fmt = fmt[len('segmentor:') :]
        state = {k[len('backbone.') :]: v for k, v in state.items() if k.startswith('backbone.')}
    if fmt == 'official_dense':
        return convert_official_dense(state)
    if fmt == 'official_cls':
        return convert_official_cls(state)
    return dict(state)
