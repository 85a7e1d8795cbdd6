"""Swin Transformer backbone for dense prediction.

Liu et al., "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows", ICCV 2021.
Reference: the official dense code, SwinTransformer/Swin-Transformer-Semantic-Segmentation
(``mmseg/models/backbones/swin_transformer.py`` @ 87e6f90), which our outputs match to float64
round-off. Written anew; what differs and why:

* Padding, cyclic shift, window partition, relative position bias, shift mask, softmax attention,
  window reverse and the crop are one op, :func:`effvision.ops.window_attention`, from the qkv
  projection of the (unpadded) map to the attention output map: a fused C++/CUDA kernel, or its
  PyTorch reference (index gathers + SDPA; also what ONNX export records). Padded tokens get the
  qkv bias as their projection, which is what projecting the official zero-padded map gives.
  Patch merging is a gather and padding is always applied (possibly by zero): H and W stay
  symbolic under ``torch.export``, so dynamic-shape ONNX graphs are right at every size.
* State-dict names follow the official checkpoint where the structure is the same
  (``patch_embed``, ``blocks.j.attn.qkv``, ``mlp.fc1``, ``norm{i}``); stages are ``stages.i``
  rather than ``layers.i`` and the derived ``relative_position_index`` buffer is not stored.
  :func:`checkpoint_filter_fn` converts official (classification and dense) and mmseg-format
  checkpoints.

Behaviour of the official dense code that we keep on purpose (it defines the published numbers):
padded tokens are not masked in unshifted windows; every odd block shifts by ``window // 2`` even
when the feature map is no larger than the window; cross-region pairs get -100, not -inf.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from timm.layers import DropPath, trunc_normal_
from torch import nn

from effvision.models.backbones.base import DenseBackbone
from effvision.models.layers.mlp import Mlp
from effvision.models.layers.window import floor_mod, pad_to_multiple, to_nchw
from effvision.ops.window_attention import window_attention
from effvision.registry import MODELS
from effvision.utils.checkpoint import CheckpointError

__all__ = ['Swin', 'checkpoint_filter_fn', 'SWIN_ARCHS']

# Value the official code puts on attention logits between tokens of different shift regions.
_SHIFT_MASK_VALUE = -100.0


# ---------------------------------------------------------------------------------------------
# building blocks
# ---------------------------------------------------------------------------------------------
class PatchEmbed(nn.Module):
    """Non-overlapping patch embedding; pads right/bottom up to a multiple of the patch size."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int, norm: bool) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim) if norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, ceil(H/p), ceil(W/p), C) channels-last."""
        x = self.proj(pad_to_multiple(x, self.patch_size, dims=(2, 3)))
        return self.norm(x.permute(0, 2, 3, 1))


class PatchMerging(nn.Module):
    """2x2 neighbour concatenation + LayerNorm + linear 4C -> 2C; odd sizes are zero-padded.

    The concatenation order (even row, even col), (odd row, even col), (even row, odd col),
    (odd row, odd col) is the official one; the reduction weights depend on it.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 2C)."""
        b, c = x.shape[0], x.shape[-1]
        x = pad_to_multiple(x, 2, dims=(1, 2))
        ho, wo, wp = x.shape[1] // 2, x.shape[2] // 2, x.shape[2]
        # One gather from a flat arange instead of four strided slices + cat: same numbers, and
        # torch.export keeps H and W symbolic (slicing and broadcasting make it guard on sizes 1).
        k = torch.arange(ho * wo * 4, device=x.device)
        q, j, i = floor_mod(k, 4), floor_mod(k // 4, wo), k // (4 * wo)
        x = x.flatten(1, 2).index_select(1, (2 * i + floor_mod(q, 2)) * wp + 2 * j + q // 2)
        return self.reduction(self.norm(x.view(b, ho, wo, 4 * c)))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows, with a learned relative position bias."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window: int,
        qkv_bias: bool,
        attn_drop: float,
        proj_drop: float,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.window = window
        self.scale = (dim // num_heads) ** -0.5
        self.attn_drop = attn_drop
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window - 1) ** 2, num_heads)
        )
        self.register_buffer(
            'relative_position_index', relative_position_index(window), persistent=False
        )
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, shift: int) -> torch.Tensor:
        """Attend within each (shifted) window.

        Args:
            x: (B, H, W, C) normalised token map, any H and W (padded inside the op).
            shift: Cyclic shift of the windows (0 for plain windows).

        Returns:
            (B, H, W, C).
        """
        x = window_attention(
            self.qkv(x),
            self.num_heads,
            self.window,
            shift,
            scale=self.scale,
            bias_table=self.relative_position_bias_table,
            bias_index=self.relative_position_index,
            pad_value=self.qkv.bias,
            shift_mask_value=_SHIFT_MASK_VALUE,
            dropout_p=self.attn_drop if self.training else 0.0,
        )
        return self.proj_drop(self.proj(x))


def relative_position_index(window: int) -> torch.Tensor:
    """(N, N) index into the ((2W-1)^2, heads) bias table for every pair of tokens in a window."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing='ij'))
    coords = coords.flatten(1)  # (2, N)
    delta = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return delta[..., 0] * (2 * window - 1) + delta[..., 1]


class SwinBlock(nn.Module):
    """Pre-norm (shifted-)window attention block followed by a pre-norm MLP."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window: int,
        shift: int,
        mlp_ratio: float,
        qkv_bias: bool,
        drop: float,
        attn_drop: float,
        drop_path: float,
    ) -> None:
        super().__init__()
        self.window = window
        self.shift = shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window, qkv_bias, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        x = x + self.drop_path(self.attn(self.norm1(x), self.shift))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class SwinStage(nn.Module):
    """``depth`` blocks alternating plain and shifted windows, then optional patch merging."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window: int,
        mlp_ratio: float,
        qkv_bias: bool,
        drop: float,
        attn_drop: float,
        drop_path: Sequence[float],
        downsample: bool,
        with_cp: bool,
    ) -> None:
        super().__init__()
        self.window = window
        self.shift = window // 2
        self.with_cp = with_cp
        self.blocks = nn.ModuleList(
            SwinBlock(
                dim,
                num_heads,
                window,
                0 if i % 2 == 0 else self.shift,
                mlp_ratio,
                qkv_bias,
                drop,
                attn_drop,
                drop_path[i],
            )
            for i in range(depth)
        )
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, H, W, C) -> (stage output (B, H, W, C), next stage input)."""
        for block in self.blocks:
            if self.with_cp and x.requires_grad:
                x = cp.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x, (self.downsample(x) if self.downsample is not None else x)


# ---------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------
SWIN_ARCHS: dict[str, dict] = {
    # name: embed_dim, depths, num_heads (microsoft/Swin-Transformer configs/swin/*.yaml)
    'tiny': dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    'small': dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    'base': dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
    'large': dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48)),
}


@MODELS.register_module()
class Swin(DenseBackbone):
    """Swin Transformer backbone with the official dense-prediction behaviour.

    Args:
        arch: One of :data:`SWIN_ARCHS` (``tiny``, ``small``, ``base``, ``large``), or None to give
            ``embed_dim``, ``depths`` and ``num_heads`` explicitly. Explicit values override the
            arch's.
        embed_dim: Channels of the first stage; stage i has ``embed_dim * 2**i``.
        depths: Blocks per stage.
        num_heads: Attention heads per stage.
        window_size: Window side in tokens (7 for the 224 checkpoints, 12 for the 384 ones).
        patch_size: Patch side of the stem.
        in_channels: Input image channels.
        mlp_ratio: MLP hidden width over the block width.
        qkv_bias: Learn a bias in the qkv projection.
        drop_rate: Dropout after the stem, in the MLP and after the attention projection.
        attn_drop_rate: Dropout on attention probabilities.
        drop_path_rate: Stochastic depth, increasing linearly from 0 to this over all blocks.
        ape: Learned absolute position embedding (off in every published model).
        pretrain_img_size: Image size the absolute position embedding was trained at.
        patch_norm: LayerNorm after the patch embedding.
        out_indices: Stages whose outputs are returned.
        frozen_stages: -1 freezes nothing; 0 freezes the stem; k >= 1 freezes the stem and stages
            0..k-1 with their output norms (mmseg's convention).
        norm_eval: Keep BatchNorm layers in eval mode while training (Swin has none of its own;
            accepted for the common backbone contract).
        with_cp: Gradient checkpointing of every block (saves memory, costs one extra forward).
        init_cfg: ``dict(type='Pretrained', checkpoint=PATH)`` loads an official Swin checkpoint
            (classification or dense, with or without a ``backbone.`` prefix), an mmseg-format one,
            or one of ours, converting it on the fly.
    """

    arch_settings = SWIN_ARCHS
    stem_name = 'patch_embed'

    def __init__(
        self,
        *,
        arch: str | None = 'tiny',
        embed_dim: int | None = None,
        depths: Sequence[int] | None = None,
        num_heads: Sequence[int] | None = None,
        window_size: int = 7,
        patch_size: int = 4,
        in_channels: int = 3,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        ape: bool = False,
        pretrain_img_size: int = 224,
        patch_norm: bool = True,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        frozen_stages: int = -1,
        norm_eval: bool = False,
        with_cp: bool = False,
        init_cfg: dict | list[dict] | None = None,
    ) -> None:
        settings = self.resolve_arch(arch, embed_dim=embed_dim, depths=depths, num_heads=num_heads)
        embed_dim, depths, num_heads = (
            settings['embed_dim'],
            settings['depths'],
            settings['num_heads'],
        )
        if len(depths) != len(num_heads):
            raise ValueError(f'depths {depths} and num_heads {num_heads} differ in length')
        if window_size < 1 or patch_size < 1:
            raise ValueError('window_size and patch_size must be positive')
        num_stages = len(depths)
        super().__init__(
            num_stages=num_stages,
            out_indices=out_indices,
            frozen_stages=frozen_stages,
            norm_eval=norm_eval,
            init_cfg=init_cfg,
        )
        out_indices = self.out_indices

        self.embed_dim = embed_dim
        self.depths = tuple(depths)
        self.num_heads = tuple(num_heads)
        self.window_size = window_size
        self.patch_size = patch_size
        self.num_features = [embed_dim * 2**i for i in range(num_stages)]

        self.patch_embed = PatchEmbed(in_channels, embed_dim, patch_size, patch_norm)
        if ape:
            grid = -(-pretrain_img_size // patch_size)
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, embed_dim, grid, grid))
        else:
            self.absolute_pos_embed = None
        self.pos_drop = nn.Dropout(drop_rate)

        total = sum(depths)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]  # linear decay rule
        self.stages = nn.ModuleList()
        for i in range(num_stages):
            start = sum(depths[:i])
            self.stages.append(
                SwinStage(
                    self.num_features[i],
                    depths[i],
                    num_heads[i],
                    window_size,
                    mlp_ratio,
                    qkv_bias,
                    drop_rate,
                    attn_drop_rate,
                    rates[start : start + depths[i]],
                    downsample=i < num_stages - 1,
                    with_cp=with_cp,
                )
            )
        for i in out_indices:
            self.add_module(f'norm{i}', nn.LayerNorm(self.num_features[i]))
        # timm-style feature contract: what each output is, for heads and tests
        self.feature_info = [
            dict(num_chs=self.num_features[i], reduction=patch_size * 2**i, module=f'stages.{i}')
            for i in out_indices
        ]
        self._freeze_stages()

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Extract multi-scale features.

        Args:
            x: (B, C_in, H, W) images of any size; they are padded internally and the features
                cover the padded image (``ceil(H / 4 / 2**i)`` rows at stage i).

        Returns:
            One (B, embed_dim * 2**i, ceil(H / (4 * 2**i)), ceil(W / (4 * 2**i))) tensor per
            ``out_indices`` entry, NCHW.
        """
        x = self.patch_embed(x)  # (B, H/4, W/4, C)
        if self.absolute_pos_embed is not None:
            pos = F.interpolate(
                self.absolute_pos_embed, size=x.shape[1:3], mode='bicubic', align_corners=False
            )
            x = x + pos.permute(0, 2, 3, 1)
        x = self.pos_drop(x)
        outs = []
        for i, stage in enumerate(self.stages):
            out, x = stage(x)
            if i in self.out_indices:
                outs.append(to_nchw(getattr(self, f'norm{i}')(out)))
        return tuple(outs)

    # -- training utilities --------------------------------------------------------------------
    def _freeze_stages(self) -> None:
        super()._freeze_stages()
        if self.frozen_stages >= 0 and self.absolute_pos_embed is not None:
            self.absolute_pos_embed.requires_grad = False

    # -- weight init ---------------------------------------------------------------------------
    def init_random_weights(self) -> None:
        """Truncated-normal init of linear layers, bias tables and position embedding."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, WindowAttention):
                trunc_normal_(module.relative_position_bias_table, std=0.02)
        if self.absolute_pos_embed is not None:
            trunc_normal_(self.absolute_pos_embed, std=0.02)

    def convert_checkpoint(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Official, mmseg or effvision Swin weights to ours (see :func:`checkpoint_filter_fn`)."""
        return checkpoint_filter_fn(state, self)


# ---------------------------------------------------------------------------------------------
# official-checkpoint conversion
# ---------------------------------------------------------------------------------------------
# Buffers the official code stores that we rebuild from the configuration instead.
DERIVED_KEYS = ('relative_position_index', 'attn_mask')


def _detect_format(state: Mapping[str, torch.Tensor]) -> str:
    keys = list(state)
    if any(k.startswith('stages.') and '.attn.w_msa.' in k for k in keys):
        return 'mmseg'
    if any(k.startswith('layers.') for k in keys):
        return 'official'
    if any(k.startswith('stages.') for k in keys):
        return 'effvision'
    raise CheckpointError(
        'not a Swin checkpoint: no key starts with layers. (official), stages. (effvision/mmseg); '
        f'first keys: {keys[:5]}. For a full segmentor checkpoint pass prefix="backbone".'
    )


def _unfold_to_concat_order(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """Reorder mmseg's ``nn.Unfold`` patch-merging channels into the official concatenation order.

    Unfold lays the 4C channels out channel-major (c * 4 + neighbour) with the neighbours in
    (row, col) order (0,0), (0,1), (1,0), (1,1); the official code concatenates whole neighbour
    maps (neighbour * C + c) in the order (0,0), (1,0), (0,1), (1,1).
    """
    shape = weight.shape
    grouped = weight.reshape(*shape[:dim], -1, 4, *shape[dim + 1 :])  # (..., C, 4, ...)
    grouped = grouped.transpose(dim, dim + 1)  # (..., 4 neighbours in unfold order, C, ...)
    grouped = grouped.index_select(dim, torch.tensor([0, 2, 1, 3]))
    return grouped.reshape(shape)


def _from_mmseg(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        new = key
        new = new.replace('patch_embed.projection.', 'patch_embed.proj.')
        new = new.replace('.attn.w_msa.', '.attn.')
        new = new.replace('.ffn.layers.0.0.', '.mlp.fc1.').replace('.ffn.layers.1.', '.mlp.fc2.')
        if '.downsample.reduction.' in new:
            value = _unfold_to_concat_order(value, dim=1)
        elif '.downsample.norm.' in new:
            value = _unfold_to_concat_order(value, dim=0)
        out[new] = value
    return out


def _from_official(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if key.startswith('layers.'):
            key = 'stages.' + key[len('layers.') :]
        out[key] = value
    return out


def _resize_bias_table(table: torch.Tensor, size: int) -> torch.Tensor:
    """Bicubically resize a ((2W-1)^2, heads) table to ((2W'-1)^2, heads), as mmseg does."""
    old = int(round(table.shape[0] ** 0.5))
    grid = table.T.reshape(1, table.shape[1], old, old).float()
    grid = F.interpolate(grid, size=(size, size), mode='bicubic', align_corners=False)
    return grid.reshape(table.shape[1], size * size).T.to(table.dtype)


def checkpoint_filter_fn(
    state_dict: Mapping[str, torch.Tensor], model: Swin | None = None
) -> dict[str, torch.Tensor]:
    """Convert a Swin state dict of any supported format to effvision's names.

    Formats (detected from the keys): the official classification (microsoft/Swin-Transformer) and
    dense (Swin-Transformer-Semantic-Segmentation/Object-Detection) checkpoints, mmseg/mmdet 1.x
    and 3.x checkpoints, and effvision's own (returned unchanged). Derived buffers
    (``relative_position_index``, ``attn_mask``) and a classifier ``head`` are dropped. The
    classification checkpoint's final ``norm`` is dropped too: the official dense code loads it
    as an unexpected key and trains ``norm3`` from scratch, and so do we.
    A full segmentor checkpoint must be stripped of its ``backbone.`` prefix first.

    Args:
        state_dict: The checkpoint's tensors.
        model: If given, relative position bias tables and absolute position embeddings are
            resized to the model's window size and grid.

    Returns:
        A new dict with effvision key names.
    """
    fmt = _detect_format(state_dict)
    if fmt == 'official':
        state = _from_official(state_dict)
    elif fmt == 'mmseg':
        state = _from_mmseg(state_dict)
    else:
        state = dict(state_dict)
    state = {
        k: v
        for k, v in state.items()
        if not k.endswith(DERIVED_KEYS) and not k.startswith(('head.', 'norm.'))
    }
    if model is not None:
        table_size = 2 * model.window_size - 1
        for key, value in list(state.items()):
            if key.endswith('relative_position_bias_table') and value.shape[0] != table_size**2:
                state[key] = _resize_bias_table(value, table_size)
        if 'absolute_pos_embed' in state and model.absolute_pos_embed is not None:
            pos = state['absolute_pos_embed']
            if pos.dim() == 3:  # (1, L, C) from classification checkpoints
                side = int(round(pos.shape[1] ** 0.5))
                pos = pos.transpose(1, 2).reshape(1, -1, side, side)
            state['absolute_pos_embed'] = F.interpolate(
                pos.float(), size=model.absolute_pos_embed.shape[2:], mode='bicubic'
            ).to(pos.dtype)
    return state
