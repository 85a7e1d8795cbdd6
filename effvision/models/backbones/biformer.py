"""BiFormer backbone (bi-level routing attention) for dense prediction.

Zhu et al., "BiFormer: Vision Transformer with Bi-Level Routing Attention", CVPR 2023.
Reference: the official dense backbone of rayleizhu/BiFormer @ 1697bbb,
``semantic_segmentation/models_mm/biformer_mm.py`` (``BiFormer_mm``, the same class as
``object_detection/models_mm/biformer_mm.py``), built from ``models/biformer.py``, the legacy
routing op ``ops/bra_legacy.py`` and ``models/_common.py:AttentionLePE``. Our outputs match it to
float64 round-off, routing indices included. Written anew; what differs and why:

* The routing and the token attention are one op, :func:`effvision.ops.routing_attention`, on
  the q, k, v maps as the single qkv projection of the padded map leaves them (channel slices, no
  region partition copy). Its compiled kernels read the routed keys and values in place by index
  instead of the official ``torch.gather`` over a ``topk``-times expanded 5-D view (memory does
  not grow with topk); its reference (export, ``EFFVISION_OPS=reference``) gathers whole regions
  with ``index_select`` and runs ``F.scaled_dot_product_attention``.
* The crop back to the unpadded map is an ``index_select`` with indices from ``arange``
  arithmetic (``effvision/models/layers/window.py``), so H and W stay symbolic under
  ``torch.export``.
* Blocks run channels-last (B, H, W, C) from the stem to the output norms; the official code
  permutes NCHW <-> NHWC twice per block.
* The map is cropped before the output projection rather than after it (the projection is
  per-token, so the numbers are the same and the padded tokens are not projected).
* State-dict names are ours (``stem``, ``stages.i.downsample``, ``stages.i.blocks.j``,
  ``attn.proj``, ``mlp.fc1``/``fc2``, ``norm{i}``); :func:`convert_checkpoint_state` converts the
  official classification and dense/detection checkpoints.

Behaviour of the official dense code kept on purpose (it defines the published numbers):

* ``n_win`` is the number of regions per side (7 for ImageNet at 224, 8 in the ADE20K configs,
  16 in the COCO configs), not a region size. The region size is ``ceil(H / n_win)``.
* Any input size (``auto_pad=True`` in every official dense config): inside each routed
  attention the normalised (B, H, W, C) map is zero-padded bottom/right to a multiple of
  ``n_win`` *before* the qkv projection and the output is cropped back. Padded tokens are not
  masked: their q/k/v equal the qkv bias, they enter the region means used for routing, they are
  keys and values of the token attention and they feed the LePE convolution of v. When a side is
  much smaller than ``n_win`` (e.g. the 1/16 map of a small image with ``n_win=16``) whole regions
  are padding; they tie in the routing logits, and since their content is identical the result
  does not depend on which of them ``topk`` returns.
* The attention scale is ``qk_dim ** -0.5`` (the full qk width, not the head width) for both the
  routing logits and the token attention; the routing is not differentiated.
* The last stage (``topk=-2``) is global attention with 8 heads whatever ``head_dim`` says, no
  qkv bias, and a LePE convolution of the attention *input* (not of v).
* The 3x3 convolutional position embedding before every block, the stem (two 3x3 stride-2
  conv + BN, GELU between) and the 3x3 stride-2 conv + BN downsampling layers; the outputs of the
  3x3 stride-2 convolutions have ``ceil(H / 2)`` rows, so stage i has ``ceil(H / 2**(i+2))``.
* One LayerNorm (eps 1e-6) per output (``extra_norms`` in the official dense code), absent from
  the ImageNet checkpoints; the classifier's final BatchNorm and head are not used.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from timm.layers import DropPath, trunc_normal_
from torch import nn

from effvision.models.backbones.base import DenseBackbone
from effvision.models.layers.mlp import Mlp
from effvision.models.layers.window import floor_mod, pad_to_multiple, to_nchw
from effvision.ops.routing_attention import routing_attention as fused_routing_attention
from effvision.registry import MODELS
from effvision.utils.checkpoint import CheckpointError

__all__ = [
    'BiFormer',
    'BIFORMER_ARCHS',
    'routing_attention',
    'detect_format',
    'convert_official_classification',
    'convert_official_dense',
    'convert_checkpoint_state',
]

# LayerNorm epsilon of the blocks and of the output norms (official: 1e-6 everywhere).
_LN_EPS = 1e-6


# ---------------------------------------------------------------------------------------------
# building blocks
# ---------------------------------------------------------------------------------------------
def _batch_norm_factory(norm_cfg: Mapping | None) -> Callable[[int], nn.Module]:
    """BatchNorm2d (``None`` or ``type='BN'``) or SyncBatchNorm (``type='SyncBN'``) builder."""
    cfg = dict(norm_cfg or {})
    kind = cfg.pop('type', 'BN')
    requires_grad = cfg.pop('requires_grad', True)
    if cfg:
        raise ValueError(
            f'BiFormer: unsupported norm_cfg keys {sorted(cfg)}; use type and requires_grad'
        )
    if kind not in ('BN', 'SyncBN'):
        raise ValueError(f"BiFormer: norm_cfg type {kind!r} is not supported; use 'BN' or 'SyncBN'")

    def build(channels: int) -> nn.Module:
        norm = nn.SyncBatchNorm(channels) if kind == 'SyncBN' else nn.BatchNorm2d(channels)
        norm.requires_grad_(requires_grad)
        return norm

    return build


def routing_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    topk: int,
    num_heads: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bi-level routing attention on region-laid-out tensors (the legacy BiFormer op's core).

    Every query region attends to all tokens of the ``topk`` regions whose mean key best matches
    its mean query. A (B, R, N, C) tensor is a map of R rows of one region each, so this is
    :func:`effvision.ops.routing_attention` with an (R, 1) region grid (fused when available).

    Args:
        q: (B, R, N, C_qk) queries, R regions of N tokens each.
        k: (B, R, N, C_qk) keys.
        v: (B, R, N, C_v) values.
        topk: Regions each query region attends to (``<= R``).
        num_heads: Heads; C_qk and C_v are split evenly among them.
        scale: Multiplier of the logits, for the routing and the token attention alike (the
            official models use ``C_qk ** -0.5``).

    Returns:
        (B, R, N, C_v) attention output, and the (B, R, topk) routed region indices of every
        query region, by descending routing logit (regions numbered row-major).
    """
    return fused_routing_attention(q, k, v, (q.shape[1], 1), topk, num_heads, scale)


class RegionLayout(NamedTuple):
    """How B (H, W) maps sit on the canvas padded to a multiple of ``n_win`` (regions are cut
    from the padded map by :func:`effvision.ops.routing_attention.routing_attention` itself).

    Attributes:
        crop: (B * H * W,) row of every real token in the batch-flattened (B * Hp * Wp, C)
            padded canvas, Hp = n_win * ceil(H / n_win).
        size: (H, W) of the real map.
        padded: (Hp, Wp).
    """

    crop: torch.Tensor
    size: tuple[int, int]
    padded: tuple[int, int]


def region_layout(
    b: int, h: int, w: int, n_win: int, device: torch.device | None = None
) -> RegionLayout:
    """The padded canvas of B (h, w) maps (sizes may be symbolic), as the legacy op pads."""
    # pad to a multiple of n_win (not of the region size: for h=13, n_win=8 the canvas is 16 rows
    # of 8 regions of 2, where padding to the region size would give 7 regions)
    hp, wp = (h + n_win - 1) // n_win * n_win, (w + n_win - 1) // n_win * n_win
    # one flat arange over the batch: broadcasting would make torch.export guard on sizes of 1
    flat = torch.arange(b * h * w, device=device)
    item, token = flat // (h * w), floor_mod(flat, h * w)
    crop = item * (hp * wp) + (token // w) * wp + floor_mod(token, w)
    return RegionLayout(crop=crop, size=(h, w), padded=(hp, wp))


class BiLevelRoutingAttention(nn.Module):
    """Bi-level routing attention with LePE on v (``ops/bra_legacy.py``, ``auto_pad=True``)."""

    def __init__(
        self, dim: int, qk_dim: int, num_heads: int, topk: int, n_win: int, side_dwconv: int
    ) -> None:
        super().__init__()
        self.n_win = n_win
        self.qk_dim = qk_dim
        self.num_heads = num_heads
        self.topk = topk
        self.scale = qk_dim**-0.5  # full qk width, as the official models were trained
        self.splits = (qk_dim, qk_dim, dim)
        self.qkv = nn.Linear(dim, 2 * qk_dim + dim)
        self.lepe = nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self, x: torch.Tensor, layout: RegionLayout, return_index: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Attend through the routed regions.

        Args:
            x: (B, H, W, C) normalised tokens.
            layout: :func:`region_layout` of this batch and size for the model's ``n_win``.
            return_index: Also return the routed region indices (for inspection).

        Returns:
            (B, H, W, C); with ``return_index`` also the (B, n_win**2, topk) routed regions.
        """
        b, c = x.shape[0], x.shape[-1]
        h, w = layout.size
        # zero-pad the normalised map (the padded tokens' q, k, v are the qkv bias), project once;
        # q, k and v are channel slices of the (B, Hp, Wp, 2 C_qk + C) map, read in place
        x = pad_to_multiple(x, self.n_win, dims=(1, 2))
        q, k, v = self.qkv(x).split(self.splits, dim=-1)
        out, index = fused_routing_attention(
            q, k, v, self.n_win, self.topk, self.num_heads, self.scale
        )  # (B, Hp, Wp, C), (B, R, topk)
        # LePE: depthwise conv of v over the whole padded canvas (padded v = qkv bias), channels
        # last in and out
        lepe = self.lepe(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        out = (out + lepe).reshape(-1, c).index_select(0, layout.crop)
        out = self.proj(out).view(b, h, w, c)
        return (out, index) if return_index else out


class GlobalAttentionLePE(nn.Module):
    """Plain multi-head attention over the whole map plus LePE of its input (last stage)."""

    def __init__(self, dim: int, num_heads: int, side_dwconv: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.lepe = nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, layout: RegionLayout | None = None) -> torch.Tensor:
        """(B, H, W, C) normalised tokens -> (B, H, W, C); ``layout`` is unused."""
        b, h, w, c = x.shape
        qkv = self.qkv(x).view(b, h * w, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, HW, d)
        out = F.scaled_dot_product_attention(q, k, v)  # scale d ** -0.5
        out = out.transpose(1, 2).reshape(b, h, w, c)
        return self.proj(out + self.lepe(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class BiFormerBlock(nn.Module):
    """Conv position embedding, then pre-norm attention and pre-norm MLP residuals."""

    def __init__(
        self,
        dim: int,
        qk_dim: int,
        num_heads: int,
        topk: int,
        global_heads: int,
        n_win: int,
        mlp_ratio: float,
        side_dwconv: int,
        pos_kernel: int,
        drop_path: float,
    ) -> None:
        super().__init__()
        self.routed = topk > 0
        self.pos_embed = nn.Conv2d(dim, dim, pos_kernel, padding=pos_kernel // 2, groups=dim)
        self.norm1 = nn.LayerNorm(dim, eps=_LN_EPS)
        if self.routed:
            self.attn = BiLevelRoutingAttention(dim, qk_dim, num_heads, topk, n_win, side_dwconv)
        else:
            self.attn = GlobalAttentionLePE(dim, global_heads, side_dwconv)
        self.norm2 = nn.LayerNorm(dim, eps=_LN_EPS)
        self.mlp = Mlp(dim, int(mlp_ratio * dim))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, layout: RegionLayout | None) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C); ``layout`` is the stage's region layout (routed blocks)."""
        x = x + self.pos_embed(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        x = x + self.drop_path(self.attn(self.norm1(x), layout))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ConvStem(nn.Module):
    """Two 3x3 stride-2 convolutions with BatchNorm, GELU between: stride 4."""

    def __init__(self, in_channels: int, dim: int, norm: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, dim // 2, 3, stride=2, padding=1)
        self.bn1 = norm(dim // 2)
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(dim // 2, dim, 3, stride=2, padding=1)
        self.bn2 = norm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, ceil(H/4), ceil(W/4), C) channels-last."""
        x = self.bn2(self.conv2(self.act(self.bn1(self.conv1(x)))))
        return _nhwc(x)


class Downsample(nn.Module):
    """3x3 stride-2 convolution + BatchNorm between stages."""

    def __init__(self, in_dim: int, out_dim: int, norm: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_dim, out_dim, 3, stride=2, padding=1)
        self.bn = norm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, ceil(H/2), ceil(W/2), C_out)."""
        return _nhwc(self.bn(self.conv(x.permute(0, 3, 1, 2))))


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    """NCHW conv output -> contiguous (B, H, W, C); free when the conv kept channels-last."""
    return x.permute(0, 2, 3, 1).contiguous()


class BiFormerStage(nn.Module):
    """Optional downsampling, then ``depth`` blocks sharing one region layout."""

    def __init__(
        self,
        *,
        in_dim: int,
        dim: int,
        qk_dim: int,
        depth: int,
        num_heads: int,
        topk: int,
        global_heads: int,
        n_win: int,
        mlp_ratio: float,
        side_dwconv: int,
        pos_kernel: int,
        drop_path: Sequence[float],
        downsample: bool,
        norm: Callable[[int], nn.Module],
        with_cp: bool,
    ) -> None:
        super().__init__()
        self.n_win = n_win
        self.routed = topk > 0
        self.with_cp = with_cp
        self.downsample = Downsample(in_dim, dim, norm) if downsample else None
        self.blocks = nn.ModuleList(
            BiFormerBlock(
                dim,
                qk_dim,
                num_heads,
                topk,
                global_heads,
                n_win,
                mlp_ratio,
                side_dwconv,
                pos_kernel,
                drop_path[j],
            )
            for j in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C_in) -> (B, H', W', C), H' = ceil(H/2) after downsampling, else H."""
        if self.downsample is not None:
            x = self.downsample(x)
        layout = None
        if self.routed:
            layout = region_layout(x.shape[0], x.shape[1], x.shape[2], self.n_win, x.device)
        for block in self.blocks:
            if self.with_cp and x.requires_grad:
                x = cp.checkpoint(block, x, layout, use_reentrant=False)
            else:
                x = block(x, layout)
        return x


# ---------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------
BIFORMER_ARCHS: dict[str, dict] = {
    # rayleizhu/BiFormer models/biformer.py biformer_{tiny,small,base}; all three share
    # mlp_ratio 3, head_dim 32, qk_dims = embed_dims, topks (1, 4, 16, -2), LePE 5x5, pos 3x3
    'tiny': dict(depths=(2, 2, 8, 2), embed_dims=(64, 128, 256, 512)),
    'small': dict(depths=(4, 4, 18, 4), embed_dims=(64, 128, 256, 512)),
    'base': dict(depths=(4, 4, 18, 4), embed_dims=(96, 192, 384, 768)),
}


@MODELS.register_module()
class BiFormer(DenseBackbone):
    """BiFormer backbone with the official dense-prediction behaviour (``BiFormer_mm``).

    Args:
        arch: One of :data:`BIFORMER_ARCHS` (``tiny``, ``small``, ``base``), or None to give
            ``depths`` and ``embed_dims`` explicitly. Explicit values override the arch's.
        depths: Blocks per stage (4 stages).
        embed_dims: Channels per stage.
        qk_dims: Query/key channels of the routed attention per stage; None: ``embed_dims``.
        head_dim: Channels per head of the routed attention (heads = qk_dim // head_dim).
        global_heads: Heads of the last stage's global attention (official: 8, whatever
            ``head_dim`` is).
        mlp_ratios: MLP hidden width over the block width, per stage (or one for all).
        n_win: Regions per side for the routed stages (not a region size): 7 for the ImageNet
            models at 224, 8 in the official ADE20K configs, 16 in the COCO ones.
        topks: Routed regions per query region, per stage; -2 means global attention with LePE
            (the last stage of every published model). Each must be <= n_win**2.
        side_dwconv: Kernel of the LePE depthwise convolution.
        before_attn_dwconv: Kernel of the depthwise position-embedding convolution of every
            block (odd; the official code hard-codes padding 1, so only 3 works there).
        in_channels: Input image channels.
        norm_cfg: The BatchNorms of the stem and the downsampling layers: None or
            ``dict(type='BN'|'SyncBN', requires_grad=True)``. The official segmentation backbone
            converts them to SyncBN; the detection one keeps BN (with ``norm_eval``).
        drop_path_rate: Stochastic depth, increasing linearly from 0 to this over all blocks.
        out_indices: Stages whose outputs are returned.
        frozen_stages: -1 freezes nothing; 0 freezes the stem; k >= 1 also stages 0..k-1 (each
            with its downsampling layer) and their output norms.
        norm_eval: Keep the BatchNorm layers (stem, downsampling) in eval mode while training;
            the official detection backbone does (``norm_eval=True``).
        with_cp: Gradient checkpointing of every block.
        init_cfg: ``dict(type='Pretrained', checkpoint=PATH)`` loads an official BiFormer
            checkpoint (ImageNet classifier or dense/detection backbone, with or without a
            ``backbone.`` prefix) or one of ours, converting it on the fly.
    """

    arch_settings = BIFORMER_ARCHS

    def __init__(
        self,
        *,
        arch: str | None = 'small',
        depths: Sequence[int] | None = None,
        embed_dims: Sequence[int] | None = None,
        qk_dims: Sequence[int] | None = None,
        head_dim: int = 32,
        global_heads: int = 8,
        mlp_ratios: float | Sequence[float] = 3.0,
        n_win: int = 7,
        topks: Sequence[int] = (1, 4, 16, -2),
        side_dwconv: int = 5,
        before_attn_dwconv: int = 3,
        in_channels: int = 3,
        norm_cfg: dict | None = None,
        drop_path_rate: float = 0.0,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        frozen_stages: int = -1,
        norm_eval: bool = False,
        with_cp: bool = False,
        init_cfg: dict | list[dict] | None = None,
    ) -> None:
        settings = self.resolve_arch(arch, depths=depths, embed_dims=embed_dims)
        depths, embed_dims = tuple(settings['depths']), tuple(settings['embed_dims'])
        num_stages = len(depths)
        qk_dims = tuple(qk_dims) if qk_dims is not None else embed_dims
        if isinstance(mlp_ratios, int | float):
            mlp_ratios = (float(mlp_ratios),) * num_stages
        topks = tuple(topks)
        for name, seq in (
            ('embed_dims', embed_dims),
            ('qk_dims', qk_dims),
            ('mlp_ratios', mlp_ratios),
            ('topks', topks),
        ):
            if len(seq) != num_stages:
                raise ValueError(f'BiFormer: {name} has {len(seq)} entries, depths {num_stages}')
        num_heads = []
        for i, (dim, qk_dim, topk) in enumerate(zip(embed_dims, qk_dims, topks)):
            if topk > 0:
                if topk > n_win * n_win:
                    raise ValueError(
                        f'BiFormer: topks[{i}]={topk} exceeds the {n_win * n_win} regions of '
                        f'n_win={n_win}; raise n_win or lower topk'
                    )
                heads = qk_dim // head_dim
                if heads < 1 or qk_dim % heads or dim % heads:
                    raise ValueError(
                        f'BiFormer: stage {i} qk_dim={qk_dim}, dim={dim} cannot be split into '
                        f'heads of head_dim={head_dim}'
                    )
            elif topk == -2:
                heads = global_heads
                if dim % heads:
                    raise ValueError(
                        f'BiFormer: stage {i} dim={dim} is not divisible by global_heads={heads}'
                    )
            else:
                raise ValueError(
                    f'BiFormer: topks[{i}]={topk} is not supported; use k > 0 (routed '
                    'attention) or -2 (global attention with LePE), as the published models do'
                )
            num_heads.append(heads)
        if before_attn_dwconv % 2 == 0 or side_dwconv % 2 == 0:
            raise ValueError('BiFormer: before_attn_dwconv and side_dwconv must be odd')
        super().__init__(
            num_stages=num_stages,
            out_indices=out_indices,
            frozen_stages=frozen_stages,
            norm_eval=norm_eval,
            init_cfg=init_cfg,
        )
        self.depths = depths
        self.embed_dims = embed_dims
        self.qk_dims = qk_dims
        self.num_heads = tuple(num_heads)
        self.n_win = n_win
        self.topks = topks
        self.num_features = list(embed_dims)

        norm = _batch_norm_factory(norm_cfg)
        self.stem = ConvStem(in_channels, embed_dims[0], norm)
        # linear stochastic-depth rule, as the official torch.linspace (on CPU: builds on meta)
        rates = torch.linspace(0, drop_path_rate, sum(depths), device='cpu').tolist()
        self.stages = nn.ModuleList()
        for i in range(num_stages):
            start = sum(depths[:i])
            self.stages.append(
                BiFormerStage(
                    in_dim=embed_dims[max(i - 1, 0)],
                    dim=embed_dims[i],
                    qk_dim=qk_dims[i],
                    depth=depths[i],
                    num_heads=num_heads[i],
                    topk=topks[i],
                    global_heads=global_heads,
                    n_win=n_win,
                    mlp_ratio=mlp_ratios[i],
                    side_dwconv=side_dwconv,
                    pos_kernel=before_attn_dwconv,
                    drop_path=rates[start : start + depths[i]],
                    downsample=i > 0,
                    norm=norm,
                    with_cp=with_cp,
                )
            )
        for i in self.out_indices:
            self.add_module(f'norm{i}', nn.LayerNorm(embed_dims[i], eps=_LN_EPS))
        self.feature_info = [
            dict(num_chs=embed_dims[i], reduction=2 ** (i + 2), module=f'stages.{i}')
            for i in self.out_indices
        ]
        self._freeze_stages()

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Extract multi-scale features.

        Args:
            x: (B, C_in, H, W) images of any size (see the module docstring for the padding).

        Returns:
            One (B, embed_dims[i], ceil(H / 2**(i+2)), ceil(W / 2**(i+2))) tensor per
            ``out_indices`` entry, NCHW, after that stage's LayerNorm.
        """
        x = self.stem(x)  # (B, H/4, W/4, C0)
        outs = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.out_indices:
                outs.append(to_nchw(getattr(self, f'norm{i}')(x)))
        return tuple(outs)

    # -- training utilities --------------------------------------------------------------------
    # -- weight init ---------------------------------------------------------------------------
    def init_random_weights(self) -> None:
        """The official init: truncated-normal linear weights, zero biases, unit LayerNorms.

        Convolutions and BatchNorms keep PyTorch's default initialisation, as officially.
        """
        for module in self.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def convert_checkpoint(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Official or effvision BiFormer weights to ours (see :func:`convert_checkpoint_state`)."""
        return convert_checkpoint_state(state)


# ---------------------------------------------------------------------------------------------
# official-checkpoint conversion
# ---------------------------------------------------------------------------------------------
# Buffers the official code stores that we rebuild instead: none (BiFormer has no index tables
# or masks; BatchNorm statistics are real state and are kept).
DERIVED_KEYS: tuple[str, ...] = ()
# Classifier parts of the official ImageNet checkpoints that the dense backbone does not use
# (the official dense code loads them with strict=False and ignores them too).
CLASSIFIER_PREFIXES = ('head.', 'norm.', 'pre_logits.')

# official prefix -> ours, applied in order (first match wins)
_OFFICIAL_RENAMES = (
    ('downsample_layers.0.0.', 'stem.conv1.'),
    ('downsample_layers.0.1.', 'stem.bn1.'),
    ('downsample_layers.0.3.', 'stem.conv2.'),
    ('downsample_layers.0.4.', 'stem.bn2.'),
)
_BLOCK_RENAMES = (
    ('attn.qkv.qkv.', 'attn.qkv.'),  # routed attention: QKVLinear wraps the Linear
    ('attn.wo.', 'attn.proj.'),
    ('mlp.0.', 'mlp.fc1.'),
    ('mlp.3.', 'mlp.fc2.'),
)


def detect_format(state: Mapping[str, torch.Tensor]) -> str:
    """Name the format of a BiFormer state dict from its keys.

    Returns:
        ``'official_dense'`` (``BiFormer_mm`` of the segmentation or detection code: same keys),
        ``'official_classification'`` (ImageNet ``biformer_*`` models), ``'effvision'``, each
        possibly under a ``backbone.`` prefix (``'...:backbone'``) as in full segmentor or
        detector checkpoints.

    Raises:
        CheckpointError: Not a BiFormer checkpoint of any known format.
    """
    keys = list(state)
    for prefix in ('', 'backbone.'):
        own = [k[len(prefix) :] for k in keys if k.startswith(prefix)]
        tag = f':{prefix[:-1]}' if prefix else ''
        if any(k.startswith('downsample_layers.') for k in own):
            if any(k.startswith('extra_norms.') for k in own):
                return 'official_dense' + tag
            if any(k.startswith(CLASSIFIER_PREFIXES) for k in own):
                return 'official_classification' + tag
            return 'official_dense' + tag
        if any(k.startswith('stem.') for k in own) and any(
            k.startswith('stages.') and '.blocks.' in k for k in own
        ):
            return 'effvision' + tag
    raise CheckpointError(
        'not a BiFormer checkpoint: no key starts with downsample_layers. (official BiFormer) or '
        f'stem./stages.*.blocks. (effvision), with or without backbone.; first keys: {keys[:5]}. '
        'Pass an official biformer_*_in1k / BiFormer_mm checkpoint, or prefix= for another '
        'wrapper.'
    )


def _rename_official(key: str) -> str:
    for old, new in _OFFICIAL_RENAMES:
        if key.startswith(old):
            return new + key[len(old) :]
    parts = key.split('.')
    if parts[0] == 'downsample_layers':  # downsample_layers.{i}.{0 conv, 1 bn}
        layer = {'0': 'conv', '1': 'bn'}[parts[2]]
        return '.'.join(['stages', parts[1], 'downsample', layer, *parts[3:]])
    if parts[0] == 'stages':  # stages.{i}.{j}.rest
        rest = '.'.join(parts[3:])
        for old, new in _BLOCK_RENAMES:
            if rest.startswith(old):
                rest = new + rest[len(old) :]
                break
        return f'stages.{parts[1]}.blocks.{parts[2]}.{rest}'
    if parts[0] == 'extra_norms':  # extra_norms.{i}.weight
        return f'norm{parts[1]}.{".".join(parts[2:])}'
    return key


def convert_official_dense(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``BiFormer_mm`` (official segmentation and detection backbone) weights to ours."""
    return {_rename_official(k): v for k, v in state.items() if not k.endswith(DERIVED_KEYS)}


def convert_official_classification(
    state: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Official ImageNet ``biformer_*`` weights to ours, without the classifier norm and head.

    The output norms (``norm{i}``) are not in these checkpoints and start from the init, as in
    the official dense code.
    """
    return convert_official_dense(
        {k: v for k, v in state.items() if not k.startswith(CLASSIFIER_PREFIXES)}
    )


def convert_checkpoint_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert a BiFormer state dict of any supported format to effvision's names.

    Formats (:func:`detect_format`): official dense/detection backbone, official ImageNet
    classifier (its final BatchNorm and head are dropped), effvision's own (returned unchanged),
    each optionally under ``backbone.`` (a full segmentor/detector checkpoint; the other keys,
    decode heads and necks, are dropped).
    """
    fmt = detect_format(state)
    fmt, _, prefix = fmt.partition(':')
    if prefix:
        prefix += '.'
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if fmt == 'official_dense':
        return convert_official_dense(state)
    if fmt == 'official_classification':
        return convert_official_classification(state)
    return dict(state)
