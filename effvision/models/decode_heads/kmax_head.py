"""kMaX-DeepLab's network: axial-attention pixel decoder + k-means transformer decoder.

Yu et al., "k-means Mask Transformer", ECCV 2022; official PyTorch code bytedance/kmax-deeplab
at f8e1d04 (``kmax_deeplab/modeling/pixel_decoder/kmax_pixel_decoder.py``,
``.../transformer_decoder/kmax_transformer_decoder.py``, ``.../meta_arch/kmax_deeplab_head.py``),
a port of google-research/deeplab2 (TensorFlow).

Differences from the official code:
- Axial attention runs at any feature size. The official relative-position index matrices are
  built once from the training canvas (``cfg.INPUT.IMAGE_SIZE``), so the network only runs at
  that canvas. Here the tables keep their official fixed length ``2 * max_span - 1``, and the
  relative distances are computed from the actual axis length at run time. At the training
  canvas the result is identical. An axis longer than ``max_span`` (255 officially, i.e. 8160
  pixels at stride 32) clamps its distances to the ends of the table.
- The official ``align_corners`` parity rules are kept (see the helpers below). Under
  ``torch.export`` with dynamic sizes a parity is symbolic and becomes a ``torch.cond``, so H and
  W stay symbolic.
- Norms come from ``norm_cfg`` (official: SyncBN, eps 1e-3, momentum 0.01, the default here).
  ``nn.SyncBatchNorm`` works on CPU and in one process (it only synchronises when
  torch.distributed is initialised), and mmengine's runner turns it into BN when not
  distributed. A plain ``'BN'`` becomes BN1d/2d/3d to match the rank of each normalised tensor.
- The official code calls ``.float()`` before the softmaxes, the channels-first LayerNorm and
  the k-means einsum. Here that happens only for float16/bfloat16 inputs, so float64 stays
  float64.
- Module names are the official ones without the leading underscore, with ``_predcitor`` spelt
  ``predictor``; the head's ``predictor`` is ``transformer_decoder``. :func:`convert_official` is
  therefore a rename.
- The aux semantic output is named ``aux_semantic`` (official ``aux_semantic_pred``). The
  Cityscapes-style fifth decoder stage takes its high-resolution feature from the caller (see
  :class:`KMaXPixelDecoder`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn import build_norm_layer
from mmengine.model import BaseModule
from timm.layers import DropPath, trunc_normal_tf_
from torch import Tensor

from effvision.registry import MODELS

from .mask_classification import MaskClassificationHead

DEFAULT_NORM_CFG = dict(type='SyncBN', eps=1e-3, momentum=0.01)
LAYER_TYPES = ('axial', 'bottleneck')
AUX_SEMANTIC_HEADS = ('aspp', 'light')
# The transformer decoder's widths are fixed in the official code (deeplab2's kMaX settings),
# whatever the backbone or the pixel decoder.
QUERY_CHANNELS = 256
BOTTLENECK_CHANNELS = 256  # base_filters 128 x bottleneck_expansion 2
KEY_CHANNELS = 128
VALUE_CHANNELS = 256
FFN_CHANNELS = 2048
NUM_HEADS = 8
PIXEL_HEAD_CHANNELS = 256
EMBED_CHANNELS = 128
OFFICIAL_MAX_SPAN = 255
# KMaXNetwork's transformer-decoder defaults: the published COCO R50 model (its pixel-decoder
# defaults are KMaXPixelDecoder's).
PUBLISHED_TRANSFORMER_DECODER = dict(
    dec_layers=(2, 2, 2), drop_path_rate=0.2, aux_semantic_head='aspp'
)
VOID_PRIOR = 0.9


# --------------------------------------------------------------------------------------------
# Precision and resizing rules
# --------------------------------------------------------------------------------------------
def _upcast(x: Tensor) -> Tensor:
    """float32 for half inputs (AMP safety, as the official ``.float()``); other dtypes kept."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _autocast_off(x: Tensor):
    return torch.autocast(device_type=x.device.type, enabled=False)


def _back_to(x: Tensor, dtype: torch.dtype) -> Tensor:
    """A float32 result of an upcast region, returned to ``dtype`` unless autocast is on.

    Under autocast the official code carries the float32 result on (the next ops cast as
    needed); a model converted to half precision without autocast needs its own dtype back,
    since its norms cannot take a float32 input.
    """
    if x.dtype == dtype or torch.is_autocast_enabled(x.device.type):
        return x
    return x.to(dtype)


def _align_corners_from_source(x: Tensor) -> bool:
    """The official ``align_corners`` when upsampling the map ``x``: its WIDTH is odd.

    Used by the pixel decoder's fuse (the low-resolution map's width) and by the aux semantic
    head's ASPP pooling and upsampling (the stride-32 map's width, for both of its upsamplings).
    """
    return x.shape[-1] % 2 == 1


def _align_corners_from_target(size: Sequence[int]) -> bool:
    """The official ``align_corners`` for upsampling the aux outputs to ``size`` (H, W): H odd."""
    return size[0] % 2 == 1


def _resize(x: Tensor, size: Sequence[int], align_corners: bool) -> Tensor:
    """Bilinear resize to ``size``.

    Under ``torch.export`` with dynamic sizes ``align_corners`` (a size parity) is symbolic;
    ``torch.cond`` then keeps both variants in the graph and picks one at run time.
    """
    if isinstance(align_corners, bool):
        return F.interpolate(x, size=size, mode='bilinear', align_corners=align_corners)
    size = tuple(size)
    return torch.cond(
        align_corners,
        lambda t: F.interpolate(t, size=size, mode='bilinear', align_corners=True),
        lambda t: F.interpolate(t, size=size, mode='bilinear', align_corners=False),
        (x,),
    )


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------
def build_norm(norm_cfg: dict | None, channels: int, ndim: int) -> nn.Module:
    """A norm layer for ``ndim``-D inputs (3: B C L, 4: B C H W, 5: B C L H W).

    ``'BN'`` (rank-specific in PyTorch) becomes ``'BN1d'``/``'BN2d'``/``'BN3d'``; other types
    (``'SyncBN'``, any rank) are built as given by mmcv's ``build_norm_layer``.
    """
    if norm_cfg is None:
        return nn.Identity()
    cfg = dict(norm_cfg)
    if cfg.get('type') == 'BN':
        cfg['type'] = {3: 'BN1d', 4: 'BN2d', 5: 'BN3d'}[ndim]
    return build_norm_layer(cfg, channels)[1]


class ConvNormAct(nn.Module):
    """Conv (1-D or 2-D), optional norm, optional GELU: the official ``ConvBN``.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        kernel_size: Kernel size.
        padding: Zero padding.
        dilation: Dilation.
        groups: Conv groups.
        bias: Conv bias.
        conv_type: ``'1d'`` (token tensors B x C x L) or ``'2d'``.
        norm_cfg: Norm config; None for no norm.
        act: Apply GELU after the norm.
        init_std: Weight init: ``'he_normal'`` (truncated normal, std ``sqrt(2 / in_channels)``
            as the official code computes it, kernel size ignored), ``'xavier_uniform'``, or a
            float std for a truncated normal.
        norm_init: Initial norm gamma (0 for the last norm of a residual branch).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        padding: int = 0,
        dilation: int = 1,
        groups: int = 1,
        bias: bool = False,
        conv_type: str = '2d',
        norm_cfg: dict | None = None,
        act: bool = False,
        init_std: str | float = 'he_normal',
        norm_init: float = 1.0,
    ) -> None:
        super().__init__()
        conv = {'1d': nn.Conv1d, '2d': nn.Conv2d}[conv_type]
        self.conv = conv(
            in_channels,
            out_channels,
            kernel_size,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=bias,
        )
        self.norm = build_norm(norm_cfg, out_channels, 3 if conv_type == '1d' else 4)
        self.act = nn.GELU() if act else nn.Identity()
        self.init_std = init_std
        self.norm_init = norm_init

    def forward(self, x: Tensor) -> Tensor:
        """Args: x: (B, C_in, L) or (B, C_in, H, W). Returns: (B, C_out, ...)."""
        return self.act(self.norm(self.conv(x)))


class ChannelsFirstLayerNorm(nn.Module):
    """LayerNorm over the channels of an NCHW map (ConvNeXt's ``channels_first`` LayerNorm)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        """Args: x: (B, C, H, W). Returns: (B, C, H, W), normalised over C."""
        with _autocast_off(x):
            y = _upcast(x)
            mean = y.mean(1, keepdim=True)
            var = (y - mean).pow(2).mean(1, keepdim=True)
            y = (y - mean) / torch.sqrt(var + self.eps)
            y = self.weight[:, None, None] * y + self.bias[:, None, None]
        return _back_to(y, x.dtype)


@lru_cache(maxsize=64)
def _cached_relative_index(length: int, max_span: int, device: torch.device) -> Tensor:
    # a normal tensor even when first asked for under inference_mode, so that a later training
    # step can save it for backward
    with torch.inference_mode(False):
        return _relative_index(length, max_span, device)


def _relative_index(length, max_span: int, device: torch.device) -> Tensor:
    """(L, L) table rows: ``key - query + max_span - 1``, clamped to the table.

    For ``length <= max_span`` this is the official distance matrix (query length = key length,
    no memory flange); longer axes reuse the end rows for the far distances.
    """
    pos = torch.arange(length, device=device)
    index = pos[None, :] - pos[:, None] + (max_span - 1)
    return index.clamp(0, 2 * max_span - 2)


class RelativePositionalEncoding(nn.Module):
    """A table of ``2 * max_span - 1`` embeddings indexed by relative distance along one axis.

    Args:
        depth: Embedding channels.
        max_span: Longest axis with distinct embeddings for every distance (official 255).
    """

    def __init__(self, depth: int, max_span: int = OFFICIAL_MAX_SPAN) -> None:
        super().__init__()
        if max_span < 1:
            raise ValueError(f'max_span must be >= 1, got {max_span}')
        self.embeddings = nn.Embedding(2 * max_span - 1, depth)

    @property
    def max_span(self) -> int:
        return (self.embeddings.num_embeddings + 1) // 2

    def forward(self, length: int) -> Tensor:
        """Returns: (L, L, depth): the embedding of ``key - query`` for every pair on the axis."""
        device = self.embeddings.weight.device
        if torch.compiler.is_compiling() or torch.jit.is_tracing() or not isinstance(length, int):
            index = _relative_index(length, self.max_span, device)
        else:
            index = _cached_relative_index(length, self.max_span, device)
        return self.embeddings.weight[index]


class AxialAttention(nn.Module):
    """Multi-head self-attention along one axis with query, key and value position encodings.

    Similarities = content + query-RPE + key-RPE terms, each batch-normalised (one BN over the
    three stacked) and summed; outputs = attended values + attended value-RPE, batch-normalised
    and summed (deeplab2 ``axial_layers.AxialAttention``).

    Args:
        in_channels: Input channels.
        key_channels: Total query/key channels over all heads.
        value_channels: Total value channels over all heads (= output channels).
        num_heads: Heads.
        norm_cfg: Norm config.
        max_span: Relative-position table span.
    """

    def __init__(
        self,
        in_channels: int,
        key_channels: int,
        value_channels: int,
        num_heads: int = NUM_HEADS,
        *,
        norm_cfg: dict | None = DEFAULT_NORM_CFG,
        max_span: int = OFFICIAL_MAX_SPAN,
    ) -> None:
        super().__init__()
        if key_channels % num_heads or value_channels % num_heads:
            raise ValueError(
                f'key ({key_channels}) and value ({value_channels}) channels must be divisible '
                f'by num_heads={num_heads}'
            )
        self.key_channels = key_channels
        self.value_channels = value_channels
        self.num_heads = num_heads
        qkv_channels = 2 * key_channels + value_channels
        self.qkv_transform = ConvNormAct(
            in_channels, qkv_channels, 1, conv_type='1d', init_std=in_channels**-0.5
        )
        self.query_rpe = RelativePositionalEncoding(key_channels // num_heads, max_span)
        self.key_rpe = RelativePositionalEncoding(key_channels // num_heads, max_span)
        self.value_rpe = RelativePositionalEncoding(value_channels // num_heads, max_span)
        self.batch_norm_qkv = build_norm(norm_cfg, qkv_channels, 3)
        self.batch_norm_similarity = build_norm(norm_cfg, 3 * num_heads, 4)
        self.batch_norm_retrieved_output = build_norm(norm_cfg, 2 * value_channels, 3)

    def forward(self, x: Tensor) -> Tensor:
        """Args: x: (N, C_in, L) sequences. Returns: (N, value_channels, L)."""
        n, _, length = x.shape
        heads = self.num_heads
        qkv = self.batch_norm_qkv(self.qkv_transform(x))
        q, k, v = qkv.split([self.key_channels, self.key_channels, self.value_channels], dim=1)
        q = q.reshape(n, heads, -1, length)
        k = k.reshape(n, heads, -1, length)
        v = v.reshape(n, heads, -1, length)

        query_rpe = self.query_rpe(length)
        key_rpe = self.key_rpe(length)
        similarity = torch.cat(
            [
                torch.einsum('bhdl,bhdm->bhlm', q, k),
                torch.einsum('bhdl,lmd->bhlm', q, query_rpe),
                torch.einsum('bhdm,lmd->bhlm', k, key_rpe),
            ],
            dim=1,
        )
        similarity = self.batch_norm_similarity(similarity)
        similarity = similarity.reshape(n, 3, heads, length, length).sum(dim=1)
        with _autocast_off(similarity):
            weights = F.softmax(_upcast(similarity), dim=-1)
        weights = weights.to(v.dtype)

        retrieved = torch.cat(
            [
                torch.einsum('bhlm,bhdm->bhdl', weights, v),
                torch.einsum('bhlm,lmd->bhdl', weights, self.value_rpe(length)),
            ],
            dim=1,
        ).reshape(n, 2 * self.value_channels, length)
        retrieved = self.batch_norm_retrieved_output(retrieved)
        return retrieved.reshape(n, 2, self.value_channels, length).sum(dim=1)


class AxialAttention2D(nn.Module):
    """Axial attention along the height, then along the width (deeplab2 ``AxialAttention2D``).

    Args:
        in_channels: Input channels.
        filters: Key channels; values have ``2 * filters``.
        num_heads: Heads.
        norm_cfg: Norm config.
        max_span: Relative-position table span.
    """

    def __init__(
        self,
        in_channels: int,
        filters: int,
        num_heads: int = NUM_HEADS,
        *,
        norm_cfg: dict | None = DEFAULT_NORM_CFG,
        max_span: int = OFFICIAL_MAX_SPAN,
    ) -> None:
        super().__init__()
        self.value_channels = 2 * filters
        kwargs = dict(num_heads=num_heads, norm_cfg=norm_cfg, max_span=max_span)
        self.height_axis = AxialAttention(in_channels, filters, 2 * filters, **kwargs)
        self.width_axis = AxialAttention(2 * filters, filters, 2 * filters, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        """Args: x: (N, C_in, H, W). Returns: (N, 2 * filters, H, W)."""
        n, c, h, w = x.shape
        v = self.value_channels
        x = x.permute(0, 3, 1, 2).reshape(n * w, c, h)
        x = self.height_axis(x)
        x = x.reshape(n, w, v, h).permute(0, 3, 2, 1).reshape(n * h, v, w)
        x = self.width_axis(x)
        return x.reshape(n, h, v, w).permute(0, 2, 1, 3)


class SingleBlock(nn.Module):
    """Residual axial or bottleneck block of the pixel decoder (GELU first, no act after the add).

    Axial: 1x1 -> 2*base, axial attention (key base, value 2*base) + GELU, 1x1 -> 4*base.
    Bottleneck: 1x1 -> base, 3x3 -> base, 1x1 -> 4*base. The last norm starts at zero gamma.

    Args:
        in_channels: Input channels.
        base_filters: Block width.
        block_type: ``'axial'`` or ``'bottleneck'``.
        drop_path_rate: Stochastic depth of the residual branch.
        norm_cfg: Norm config.
        max_span: Relative-position table span (axial blocks).
    """

    def __init__(
        self,
        in_channels: int,
        base_filters: int,
        block_type: str,
        *,
        drop_path_rate: float = 0.0,
        norm_cfg: dict | None = DEFAULT_NORM_CFG,
        max_span: int = OFFICIAL_MAX_SPAN,
    ) -> None:
        super().__init__()
        if block_type not in LAYER_TYPES:
            raise ValueError(f'block type must be one of {LAYER_TYPES}, got {block_type!r}')
        self.block_type = block_type
        out_channels = 4 * base_filters
        mid = 2 * base_filters if block_type == 'axial' else base_filters
        self.conv1_bn_act = ConvNormAct(in_channels, mid, 1, norm_cfg=norm_cfg, act=True)
        if block_type == 'axial':
            self.attention = AxialAttention2D(
                mid, base_filters, norm_cfg=norm_cfg, max_span=max_span
            )
            branch_channels = 2 * base_filters
        else:
            self.conv2_bn_act = ConvNormAct(
                mid, base_filters, 3, padding=1, norm_cfg=norm_cfg, act=True
            )
            branch_channels = base_filters
        self.conv3_bn = ConvNormAct(
            branch_channels, out_channels, 1, norm_cfg=norm_cfg, norm_init=0
        )
        self.shortcut = None
        if in_channels != out_channels:
            self.shortcut = ConvNormAct(in_channels, out_channels, 1, norm_cfg=norm_cfg)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """Args: x: (B, C_in, H, W). Returns: (B, 4 * base_filters, H, W)."""
        x = F.gelu(x)
        shortcut = x if self.shortcut is None else self.shortcut(x)
        x = self.conv1_bn_act(x)
        if self.block_type == 'axial':
            x = F.gelu(self.attention(x))
        else:
            x = self.conv2_bn_act(x)
        return self.drop_path(self.conv3_bn(x)) + shortcut


class BlockGroup(nn.Module):
    """``num_blocks`` :class:`SingleBlock` of one type and width (one pixel-decoder stage)."""

    def __init__(
        self, in_channels: int, base_filters: int, num_blocks: int, block_type: str, **kwargs
    ) -> None:
        super().__init__()
        if num_blocks < 1:
            raise ValueError(f'a decoder stage needs at least one block, got {num_blocks}')
        self.blocks = nn.ModuleList()
        for _ in range(num_blocks):
            self.blocks.append(SingleBlock(in_channels, base_filters, block_type, **kwargs))
            in_channels = 4 * base_filters

    def forward(self, x: Tensor) -> Tensor:
        """Args: x: (B, C_in, H, W). Returns: (B, 4 * base_filters, H, W)."""
        for block in self.blocks:
            x = block(x)
        return x


class ResizedFuse(nn.Module):
    """Upsamples the low-resolution path onto the high-resolution one and adds them.

    Each path that does not already have ``out_channels`` goes through GELU and a 1x1 conv +
    norm first. The bilinear ``align_corners`` follows the low-resolution map's width parity.
    """

    def __init__(
        self,
        low_channels: int,
        high_channels: int,
        out_channels: int,
        *,
        norm_cfg: dict | None = DEFAULT_NORM_CFG,
    ) -> None:
        super().__init__()
        self.conv_bn_low = None
        self.conv_bn_high = None
        if low_channels != out_channels:
            self.conv_bn_low = ConvNormAct(low_channels, out_channels, 1, norm_cfg=norm_cfg)
        if high_channels != out_channels:
            self.conv_bn_high = ConvNormAct(high_channels, out_channels, 1, norm_cfg=norm_cfg)

    def forward(self, low: Tensor, high: Tensor) -> Tensor:
        """Args: low: (B, C_low, h, w); high: (B, C_high, H, W). Returns: (B, C_out, H, W)."""
        align_corners = _align_corners_from_source(low)
        if self.conv_bn_low is not None:
            low = self.conv_bn_low(F.gelu(low))
        low = _resize(low, high.shape[2:], align_corners)
        if self.conv_bn_high is not None:
            high = self.conv_bn_high(F.gelu(high))
        return low + high


class KMaXPixelDecoder(nn.Module):
    """Stages from the coarsest feature to the finest, each fused with the next backbone level.

    Every backbone feature first goes through a channels-first LayerNorm. The coarsest one runs
    through stage 0; the output of stage i is fused (:class:`ResizedFuse`) with backbone feature
    i + 1 (in coarse-to-fine order) and runs through stage i + 1. Published COCO/ADE20K setting:
    4 stages on res5..res2, ``dec_layers=(1, 5, 1, 1)``, ``dec_channels=(512, 256, 128, 64)``,
    axial/axial/bottleneck/bottleneck. Stage outputs have ``4 * dec_channels[i]`` channels.

    Cityscapes-style fifth stage (``dec_layers=(1, 5, 1, 1, 1)``, ``dec_channels=(..., 32)``,
    one more ``'bottleneck'``) needs a fifth, finest feature, passed first:
    ``[extra, res2, res3, res4, res5]``. deeplab2 uses the stride-2 stem there and predicts at
    stride 2. The official PyTorch code sorts its features by declared stride: for ResNet the
    stem it returns is the stride-4 map after the max-pool and lands before res2 (its stage 3
    fuses the stem, stage 4 res2), for ConvNeXt the stride-4 patchify output declared as
    stride 2 lands after res2. Its Cityscapes models therefore predict at stride 4; to load an
    official ResNet Cityscapes checkpoint pass ``[res2, stem, res3, res4, res5]`` with
    ``in_channels=(256, 64, 512, 1024, 2048)``.

    Args:
        in_channels: Backbone channels, finest first (``[res2, res3, res4, res5]``, or with the
            extra feature first for five stages).
        dec_layers: Blocks per stage, coarsest stage first.
        dec_channels: Base width per stage, coarsest first.
        layer_types: ``'axial'`` or ``'bottleneck'`` per stage, coarsest first.
        drop_path_rate: Stochastic depth of every block (official ``DROP_PATH_PROB``, 0).
        norm_cfg: Norm config.
        max_span: Axial relative-position table span (official 255).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        *,
        dec_layers: Sequence[int] = (1, 5, 1, 1),
        dec_channels: Sequence[int] = (512, 256, 128, 64),
        layer_types: Sequence[str] = ('axial', 'axial', 'bottleneck', 'bottleneck'),
        drop_path_rate: float = 0.0,
        norm_cfg: dict | None = DEFAULT_NORM_CFG,
        max_span: int = OFFICIAL_MAX_SPAN,
    ) -> None:
        super().__init__()
        num_stages = len(in_channels)
        if num_stages < 4 or not (
            num_stages == len(dec_layers) == len(dec_channels) == len(layer_types)
        ):
            raise ValueError(
                'in_channels, dec_layers, dec_channels and layer_types need one entry per '
                f'stage and at least 4 stages (5 for the Cityscapes-style extra stage); got '
                f'{len(in_channels)}, {len(dec_layers)}, {len(dec_channels)}, {len(layer_types)}'
            )
        self.num_stages = num_stages
        self.in_channels = list(in_channels)
        coarse_first = self.in_channels[::-1]
        self.out_channels = [4 * c for c in dec_channels]
        self.in_norms = nn.ModuleList(ChannelsFirstLayerNorm(c) for c in coarse_first)
        self.stages = nn.ModuleList()
        self.resized_fuses = nn.ModuleList()
        for i in range(num_stages):
            self.stages.append(
                BlockGroup(
                    coarse_first[0] if i == 0 else dec_channels[i],
                    dec_channels[i],
                    dec_layers[i],
                    layer_types[i],
                    drop_path_rate=drop_path_rate,
                    norm_cfg=norm_cfg,
                    max_span=max_span,
                )
            )
            if i > 0:
                self.resized_fuses.append(
                    ResizedFuse(
                        self.out_channels[i - 1],
                        coarse_first[i],
                        dec_channels[i],
                        norm_cfg=norm_cfg,
                    )
                )
        init_official_weights(self)

    @property
    def semantic_channels(self) -> list[int]:
        """Channels of the aux semantic head's inputs (see :meth:`forward`)."""
        coarse_first = self.in_channels[::-1]
        return [coarse_first[0], coarse_first[2], coarse_first[3]]

    def forward(self, feats: Sequence[Tensor]) -> tuple[list[Tensor], Tensor, list[Tensor]]:
        """Decodes the backbone features.

        Args:
            feats: Backbone features, finest first, e.g. ``[res2, res3, res4, res5]`` with shapes
                (B, C_i, H/s_i, W/s_i) for strides 4, 8, 16, 32.

        Returns:
            ``(multi_scale, panoptic, semantic)``: the outputs of stages 0-2 (strides 32, 16, 8:
            (B, 4 * dec_channels[i], h_i, w_i)), the last stage's output (B, 4 *
            dec_channels[-1], H/4, W/4) (stride of the finest feature), and the raw
            (un-normalised) backbone features the official aux semantic head reads: the
            coarsest, third coarsest and fourth coarsest (res5, res3, res2 for four stages).
        """
        if len(feats) != self.num_stages:
            hint = ''
            if self.num_stages == 5 and len(feats) == 4:
                hint = (
                    ': the Cityscapes-style fifth stage needs an extra high-resolution feature '
                    'first ([stem, res2, res3, res4, res5]); make the backbone also return its '
                    'stem feature, or use a four-stage decoder'
                )
            raise ValueError(
                f'the kMaX pixel decoder has {self.num_stages} stages and takes '
                f'{self.num_stages} features (finest first), got {len(feats)}{hint}'
            )
        coarse_first = list(feats)[::-1]
        outs = []
        x = self.in_norms[0](coarse_first[0])
        for i in range(self.num_stages - 1):
            x = self.stages[i](x)
            outs.append(x)
            x = self.resized_fuses[i](x, self.in_norms[i + 1](coarse_first[i + 1]))
        outs.append(self.stages[-1](x))
        semantic = [coarse_first[0], coarse_first[2], coarse_first[3]]
        return outs[:3], outs[-1], semantic


class AttentionOperation(nn.Module):
    """Multi-head attention core with batch-normalised logits and values (then GELU)."""

    def __init__(
        self, value_channels: int, num_heads: int, *, norm_cfg: dict | None = DEFAULT_NORM_CFG
    ) -> None:
        super().__init__()
        self.batch_norm_similarity = build_norm(norm_cfg, num_heads, 4)
        self.batch_norm_retrieved_value = build_norm(norm_cfg, value_channels, 3)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Args: q, k: (B, heads, d_k, L); v: (B, heads, d_v, L). Returns: (B, heads*d_v, L)."""
        b, heads, dv, length = v.shape
        similarity = self.batch_norm_similarity(torch.einsum('bhdl,bhdm->bhlm', q, k))
        with _autocast_off(similarity):
            weights = F.softmax(_upcast(similarity), dim=-1)
        retrieved = torch.einsum('bhlm,bhdm->bhdl', weights.to(v.dtype), v)
        retrieved = self.batch_norm_retrieved_value(retrieved.reshape(b, heads * dv, length))
        return F.gelu(retrieved)


class KMaXPredictor(nn.Module):
    """Class logits, mask logits and the normalised pixel embedding from queries and pixels.

    Pixel head: depthwise 5x5 + norm + GELU, 1x1 -> 256 + norm + GELU, 1x1 -> 128 + norm,
    L2-normalised over channels. Mask logits = pixel embedding . mask kernels (1x1 conv + norm
    of the queries), then a one-channel norm (gamma 0.1 at init). Class logits from a 1x1 conv
    of the queries, with the constant ``log(K * 0.9 / 0.1)`` added to the void logit.

    Args:
        in_channels: Pixel feature channels.
        num_classes: Class logits including void (K + 1).
        norm_cfg: Norm config.
    """

    def __init__(
        self, in_channels: int, num_classes: int, *, norm_cfg: dict | None = DEFAULT_NORM_CFG
    ) -> None:
        super().__init__()
        self.pixel_space_head_conv0bnact = ConvNormAct(
            in_channels,
            in_channels,
            5,
            padding=2,
            groups=in_channels,
            norm_cfg=norm_cfg,
            act=True,
            init_std='xavier_uniform',
        )
        self.pixel_space_head_conv1bnact = ConvNormAct(
            in_channels, PIXEL_HEAD_CHANNELS, 1, norm_cfg=norm_cfg, act=True
        )
        self.pixel_space_head_last_convbn = ConvNormAct(
            PIXEL_HEAD_CHANNELS, EMBED_CHANNELS, 1, bias=True, norm_cfg=norm_cfg, init_std=0.01
        )
        self.transformer_mask_head = ConvNormAct(
            QUERY_CHANNELS, EMBED_CHANNELS, 1, conv_type='1d', norm_cfg=norm_cfg
        )
        self.transformer_class_head = ConvNormAct(
            QUERY_CHANNELS, num_classes, 1, bias=True, conv_type='1d', init_std=0.01
        )
        self.pixel_space_mask_batch_norm = build_norm(norm_cfg, 1, 5)
        # a Python float, so that it is exact in every dtype (a float32 buffer cast to float64
        # would be off by ~5e-8)
        self.void_bias = math.log((num_classes - 1) * VOID_PRIOR / (1 - VOID_PRIOR))

    def forward(
        self, mask_embeddings: Tensor, class_embeddings: Tensor, pixel_feature: Tensor
    ) -> dict[str, Tensor]:
        """Predicts one layer's outputs.

        Args:
            mask_embeddings: (B, 256, Q) query features for the mask kernels.
            class_embeddings: (B, 256, Q) query features for the class logits.
            pixel_feature: (B, C, H, W) pixel features.

        Returns:
            ``class_logits`` (B, Q, K+1), ``mask_logits`` (B, Q, H, W), ``pixel_feature``
            (B, 128, H, W) L2-normalised over channels.
        """
        pixels = self.pixel_space_head_conv0bnact(pixel_feature)
        pixels = self.pixel_space_head_conv1bnact(pixels)
        pixels = F.normalize(self.pixel_space_head_last_convbn(pixels), p=2, dim=1)
        class_logits = self.transformer_class_head(class_embeddings).permute(0, 2, 1)
        class_logits = torch.cat(
            [class_logits[..., :-1], class_logits[..., -1:] + self.void_bias], dim=-1
        )
        kernels = self.transformer_mask_head(mask_embeddings)
        mask_logits = torch.einsum('bchw,bcn->bnhw', pixels, kernels)
        mask_logits = self.pixel_space_mask_batch_norm(mask_logits.unsqueeze(1)).squeeze(1)
        return dict(class_logits=class_logits, mask_logits=mask_logits, pixel_feature=pixels)


class KMaXTransformerLayer(nn.Module):
    """One kMaX layer: k-means cross-attention, query self-attention, FFN.

    The layer's predictor runs on the projected pixels and the projected queries
    (``query_space``). Each pixel is assigned to its argmax query (a hard, gradient-free
    assignment) and every query adds the SUM of its pixels' values (k-means update). Self-
    attention q/k/v also come from ``query_space``, i.e. the queries before the update.

    Args:
        pixel_channels: Channels of the pixel features this layer reads.
        num_classes: Class logits including void (K + 1).
        drop_path_rate: Stochastic depth of the three query updates.
        norm_cfg: Norm config.
    """

    def __init__(
        self,
        pixel_channels: int,
        num_classes: int,
        *,
        drop_path_rate: float = 0.0,
        norm_cfg: dict | None = DEFAULT_NORM_CFG,
    ) -> None:
        super().__init__()

        def drop_path() -> nn.Module:
            return DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()

        self.drop_path_kmeans = drop_path()
        self.drop_path_attn = drop_path()
        self.drop_path_ffn = drop_path()
        std = BOTTLENECK_CHANNELS**-0.5
        query = dict(conv_type='1d', norm_cfg=norm_cfg)
        self.query_conv1_bn_act = ConvNormAct(
            QUERY_CHANNELS, BOTTLENECK_CHANNELS, 1, act=True, **query
        )
        self.pixel_conv1_bn_act = ConvNormAct(
            pixel_channels, BOTTLENECK_CHANNELS, 1, norm_cfg=norm_cfg, act=True
        )
        self.query_qkv_conv_bn = ConvNormAct(
            BOTTLENECK_CHANNELS, 2 * KEY_CHANNELS + VALUE_CHANNELS, 1, init_std=std, **query
        )
        self.pixel_v_conv_bn = ConvNormAct(
            BOTTLENECK_CHANNELS, VALUE_CHANNELS, 1, norm_cfg=norm_cfg, init_std=std
        )
        self.query_self_attention = AttentionOperation(VALUE_CHANNELS, NUM_HEADS, norm_cfg=norm_cfg)
        self.query_conv3_bn = ConvNormAct(VALUE_CHANNELS, QUERY_CHANNELS, 1, norm_init=0, **query)
        self.query_ffn_conv1_bn_act = ConvNormAct(
            QUERY_CHANNELS, FFN_CHANNELS, 1, act=True, **query
        )
        self.query_ffn_conv2_bn = ConvNormAct(FFN_CHANNELS, QUERY_CHANNELS, 1, norm_init=0, **query)
        self.predictor = KMaXPredictor(BOTTLENECK_CHANNELS, num_classes, norm_cfg=norm_cfg)
        self.kmeans_query_batch_norm_retrieved_value = build_norm(norm_cfg, VALUE_CHANNELS, 3)
        self.kmeans_query_conv3_bn = ConvNormAct(
            VALUE_CHANNELS, QUERY_CHANNELS, 1, norm_init=0, **query
        )

    def forward(self, pixel_feature: Tensor, query: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Updates the queries (cluster centres) with one pixel level.

        Args:
            pixel_feature: (B, C, H, W) pixel-decoder features.
            query: (B, 256, Q) cluster centres.

        Returns:
            The updated (B, 256, Q) queries and this layer's predictions (see
            :meth:`KMaXPredictor.forward`), made from the queries entering the layer.
        """
        b = pixel_feature.shape[0]
        q_len = query.shape[-1]
        pixel_space = self.pixel_conv1_bn_act(F.gelu(pixel_feature))
        query_space = self.query_conv1_bn_act(query)

        pixel_value = self.pixel_v_conv_bn(pixel_space).flatten(2)
        prediction = self.predictor(
            mask_embeddings=query_space, class_embeddings=query_space, pixel_feature=pixel_space
        )
        with torch.no_grad():
            logits = prediction['mask_logits'].detach().flatten(2)
            assignment = torch.zeros_like(logits).scatter_(1, logits.argmax(1, keepdim=True), 1.0)
        with _autocast_off(pixel_value):
            kmeans_update = torch.einsum('blm,bdm->bdl', _upcast(assignment), _upcast(pixel_value))
        kmeans_update = _back_to(kmeans_update, pixel_value.dtype)
        kmeans_update = self.kmeans_query_batch_norm_retrieved_value(kmeans_update)
        kmeans_update = self.kmeans_query_conv3_bn(kmeans_update)
        query = query + self.drop_path_kmeans(kmeans_update)

        qkv = self.query_qkv_conv_bn(query_space)
        q, k, v = qkv.split([KEY_CHANNELS, KEY_CHANNELS, VALUE_CHANNELS], dim=1)
        attn = self.query_self_attention(
            q.reshape(b, NUM_HEADS, -1, q_len),
            k.reshape(b, NUM_HEADS, -1, q_len),
            v.reshape(b, NUM_HEADS, -1, q_len),
        )
        query = F.gelu(query + self.drop_path_attn(self.query_conv3_bn(attn)))

        ffn = self.query_ffn_conv2_bn(self.query_ffn_conv1_bn_act(query))
        query = F.gelu(query + self.drop_path_ffn(ffn))
        return query, prediction


class ASPP(nn.Module):
    """DeepLabv3 ASPP (1x1, three dilated 3x3, image pooling; GELU), 1x1 projection, dropout."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        atrous_rates: Sequence[int] = (6, 12, 18),
        *,
        norm_cfg: dict | None = DEFAULT_NORM_CFG,
    ) -> None:
        super().__init__()
        cba = dict(norm_cfg=norm_cfg, act=True)
        self.aspp_conv0 = ConvNormAct(in_channels, out_channels, 1, **cba)
        r1, r2, r3 = atrous_rates
        self.aspp_conv1 = ConvNormAct(in_channels, out_channels, 3, padding=r1, dilation=r1, **cba)
        self.aspp_conv2 = ConvNormAct(in_channels, out_channels, 3, padding=r2, dilation=r2, **cba)
        self.aspp_conv3 = ConvNormAct(in_channels, out_channels, 3, padding=r3, dilation=r3, **cba)
        self.aspp_pool = ConvNormAct(in_channels, out_channels, 1, **cba)
        self.proj_conv_bn_act = ConvNormAct(5 * out_channels, out_channels, 1, **cba)
        self.proj_drop = nn.Dropout(p=0.1)

    def forward(self, x: Tensor) -> Tensor:
        """Args: x: (B, C_in, H, W). Returns: (B, C_out, H, W).

        The pooling branch's norm sees one value per image, so training needs batch size > 1.
        """
        pooled = self.aspp_pool(F.adaptive_avg_pool2d(x, 1))
        pooled = _resize(pooled, x.shape[-2:], _align_corners_from_source(x))
        branches = [self.aspp_conv0(x), self.aspp_conv1(x), self.aspp_conv2(x), self.aspp_conv3(x)]
        x = torch.cat([*branches, pooled], dim=1)
        return self.proj_drop(self.proj_conv_bn_act(x))


class SemanticPredictor(nn.Module):
    """Panoptic-DeepLab-style aux semantic decoder + head (COCO/ADE20K): stride 4, K+1 logits.

    ASPP (256, rates 6/12/18) on the coarsest feature, fused with the stride-8 and stride-4
    features (projected to 64 and 32 channels) by depthwise 5x5 + 1x1 convs, then a depthwise
    5x5 + 1x1 head and a 1x1 classifier.

    Args:
        in_channels: Coarsest (stride 32) feature channels.
        os8_channels: Stride-8 feature channels.
        os4_channels: Stride-4 feature channels.
        num_classes: Output logits (K + 1 officially).
        norm_cfg: Norm config.
    """

    def __init__(
        self,
        in_channels: int,
        os8_channels: int,
        os4_channels: int,
        num_classes: int,
        *,
        norm_cfg: dict | None = DEFAULT_NORM_CFG,
    ) -> None:
        super().__init__()
        cba = dict(norm_cfg=norm_cfg, act=True)
        width = 256

        def depthwise(channels: int) -> ConvNormAct:
            return ConvNormAct(
                channels,
                channels,
                5,
                padding=2,
                groups=channels,
                init_std='xavier_uniform',
                **cba,
            )

        self.aspp = ASPP(in_channels, width, (6, 12, 18), norm_cfg=norm_cfg)
        self.low_level_projection_os8 = ConvNormAct(os8_channels, 64, 1, **cba)
        self.low_level_fusion_os8_conv0_bn_act = depthwise(width + 64)
        self.low_level_fusion_os8_conv1_bn_act = ConvNormAct(width + 64, width, 1, **cba)
        self.low_level_projection_os4 = ConvNormAct(os4_channels, 32, 1, **cba)
        self.low_level_fusion_os4_conv0_bn_act = depthwise(width + 32)
        self.low_level_fusion_os4_conv1_bn_act = ConvNormAct(width + 32, width, 1, **cba)
        self.conv_block_0 = depthwise(width)
        self.conv_block_1 = ConvNormAct(width, width, 1, **cba)
        self.final_conv = ConvNormAct(width, num_classes, 1, bias=True, init_std=0.01)

    def forward(self, x: Tensor, low_os8: Tensor, low_os4: Tensor) -> Tensor:
        """Args: x: (B, C, H/32, W/32); low_os8: (B, C8, H/8, W/8); low_os4: (B, C4, H/4, W/4).

        Returns: (B, num_classes, H/4, W/4) logits.
        """
        x = self.aspp(x)
        # the official code takes the stride-32 map's parity for both upsamplings
        align_corners = _align_corners_from_source(x)
        low_os8 = self.low_level_projection_os8(low_os8)
        x = _resize(x, low_os8.shape[-2:], align_corners)
        x = torch.cat([x, low_os8], dim=1)
        x = self.low_level_fusion_os8_conv1_bn_act(self.low_level_fusion_os8_conv0_bn_act(x))
        low_os4 = self.low_level_projection_os4(low_os4)
        x = _resize(x, low_os4.shape[-2:], align_corners)
        x = torch.cat([x, low_os4], dim=1)
        x = self.low_level_fusion_os4_conv1_bn_act(self.low_level_fusion_os4_conv0_bn_act(x))
        return self.final_conv(self.conv_block_1(self.conv_block_0(x)))


def light_semantic_predictor(
    in_channels: int, num_classes: int, *, norm_cfg: dict | None = DEFAULT_NORM_CFG
) -> nn.Sequential:
    """The light aux semantic head (Cityscapes): depthwise 5x5, 1x1 -> 256, 1x1 -> K logits.

    Runs on the coarsest feature (stride 32). Note: K logits, without void (as official).
    """
    return nn.Sequential(
        ConvNormAct(
            in_channels,
            in_channels,
            5,
            padding=2,
            groups=in_channels,
            norm_cfg=norm_cfg,
            act=True,
            init_std='xavier_uniform',
        ),
        ConvNormAct(in_channels, 256, 1, norm_cfg=norm_cfg, act=True),
        ConvNormAct(256, num_classes, 1, bias=True, init_std=0.01),
    )


class KMaXTransformerDecoder(nn.Module):
    """Learned cluster centres refined by kMaX layers over the stride-32, 16 and 8 features.

    ``dec_layers[i]`` layers read the pixel-decoder output at stride 32 / 16 / 8; then class and
    mask embedding projections and a final :class:`KMaXPredictor` on the finest decoder output.

    Args:
        in_channels: Pixel channels at strides 32, 16, 8 and of the final (finest) features.
        num_classes: Classes K (the logits have K + 1, the last void).
        num_queries: Cluster centres Q (official: 128 COCO/ADE20K, 256 Cityscapes).
        dec_layers: Layers per level (official ``(2, 2, 2)``).
        drop_path_rate: Stochastic depth of the query updates (official 0.2 COCO/Cityscapes,
            0.0 ADE20K).
        aux_semantic_head: None, ``'aspp'`` (Panoptic-DeepLab decoder, K+1 logits at stride 4;
            official ``USE_AUX_SEMANTIC_DECODER: True``) or ``'light'`` (K logits at stride 32,
            Cityscapes). Runs only in training.
        semantic_channels: Channels of the aux head's inputs (coarsest, stride 8, stride 4
            backbone features); needed with ``aux_semantic_head``.
        norm_cfg: Norm config.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        num_queries: int = 128,
        *,
        dec_layers: Sequence[int] = (2, 2, 2),
        drop_path_rate: float = 0.0,
        aux_semantic_head: str | None = None,
        semantic_channels: Sequence[int] | None = None,
        norm_cfg: dict | None = DEFAULT_NORM_CFG,
    ) -> None:
        super().__init__()
        if len(in_channels) != 4 or len(dec_layers) != 3:
            raise ValueError(
                'in_channels needs 4 entries (strides 32, 16, 8 and the final features) and '
                f'dec_layers 3 (one per level); got {list(in_channels)} and {list(dec_layers)}'
            )
        if aux_semantic_head not in (None, *AUX_SEMANTIC_HEADS):
            raise ValueError(
                f'aux_semantic_head must be None or one of {AUX_SEMANTIC_HEADS}, '
                f'got {aux_semantic_head!r}'
            )
        if aux_semantic_head is not None and (
            semantic_channels is None or len(semantic_channels) != 3
        ):
            raise ValueError(
                'aux_semantic_head needs semantic_channels=(C_stride32, C_stride8, C_stride4) '
                'of the backbone features it reads'
            )
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.dec_layers = list(dec_layers)
        self.kmax_transformer_layers = nn.ModuleList(
            KMaXTransformerLayer(
                in_channels[level],
                num_classes + 1,
                drop_path_rate=drop_path_rate,
                norm_cfg=norm_cfg,
            )
            for level, n in enumerate(self.dec_layers)
            for _ in range(n)
        )
        # official: an Embedding used as a (256, Q) matrix; kept for its key name
        self.cluster_centers = nn.Embedding(QUERY_CHANNELS, num_queries)
        query = dict(conv_type='1d', norm_cfg=norm_cfg, act=True)
        self.class_embedding_projection = ConvNormAct(QUERY_CHANNELS, QUERY_CHANNELS, 1, **query)
        self.mask_embedding_projection = ConvNormAct(QUERY_CHANNELS, QUERY_CHANNELS, 1, **query)
        self.predictor = KMaXPredictor(in_channels[-1], num_classes + 1, norm_cfg=norm_cfg)
        self.aux_semantic_head = aux_semantic_head
        if aux_semantic_head == 'aspp':
            self.auxiliary_semantic_predictor = SemanticPredictor(
                *semantic_channels, num_classes + 1, norm_cfg=norm_cfg
            )
        elif aux_semantic_head == 'light':
            self.auxiliary_semantic_predictor = light_semantic_predictor(
                semantic_channels[0], num_classes, norm_cfg=norm_cfg
            )
        init_official_weights(self)

    def forward(
        self,
        multi_scale: Sequence[Tensor],
        panoptic: Tensor,
        semantic: Sequence[Tensor] | None = None,
    ) -> dict:
        """Runs the kMaX layers and the final prediction.

        Args:
            multi_scale: Pixel-decoder outputs at strides 32, 16, 8: (B, C_i, h_i, w_i).
            panoptic: (B, C, h, w) finest pixel-decoder output (stride 4).
            semantic: The aux head's backbone features (stride 32, 8, 4), used in training.

        Returns:
            ``pred_logits`` (B, Q, K+1), ``pred_masks`` (B, Q, h, w), ``pixel_feature``
            (B, 128, h, w), ``aux_outputs`` (one dict per kMaX layer, masks and pixel features
            resized to (h, w)) and, in training with an aux head, ``aux_semantic``.
        """
        if len(multi_scale) != 3:
            raise ValueError(f'expected 3 pixel levels (strides 32, 16, 8), got {len(multi_scale)}')
        b = panoptic.shape[0]
        query = self.cluster_centers.weight.unsqueeze(0).expand(b, -1, -1)
        predictions = []
        layers = iter(self.kmax_transformer_layers)
        for feat, n in zip(multi_scale, self.dec_layers):
            for _ in range(n):
                query, prediction = next(layers)(feat, query)
                predictions.append(prediction)
        final = self.predictor(
            mask_embeddings=self.mask_embedding_projection(query),
            class_embeddings=self.class_embedding_projection(query),
            pixel_feature=panoptic,
        )
        size = final['mask_logits'].shape[-2:]
        align_corners = _align_corners_from_target(size)

        def resize(x: Tensor) -> Tensor:
            return _resize(x, size, align_corners)

        out = dict(
            pred_logits=final['class_logits'],
            pred_masks=final['mask_logits'],
            pixel_feature=final['pixel_feature'],
            aux_outputs=[
                dict(
                    pred_logits=p['class_logits'],
                    pred_masks=resize(p['mask_logits']),
                    pixel_feature=resize(p['pixel_feature']),
                )
                for p in predictions
            ],
        )
        if self.training and self.aux_semantic_head is not None:
            if semantic is None:
                raise ValueError('the aux semantic head needs the semantic features in training')
            if self.aux_semantic_head == 'aspp':
                out['aux_semantic'] = self.auxiliary_semantic_predictor(*semantic)
            else:
                out['aux_semantic'] = self.auxiliary_semantic_predictor(semantic[0])
        return out


# --------------------------------------------------------------------------------------------
# Network
# --------------------------------------------------------------------------------------------
class KMaXNetwork(BaseModule):
    """kMaX-DeepLab's head network: :class:`KMaXPixelDecoder` + :class:`KMaXTransformerDecoder`.

    Defaults are the published COCO R50 settings (backbone channels aside). Any input size
    works (see the module docstring on axial attention); the official code padded every image
    to a fixed odd canvas (1281 x 1281 COCO), which also fixes its ``align_corners`` choices.

    Args:
        in_channels: Backbone channels, finest first (``[256, 512, 1024, 2048]`` for R50).
        num_classes: Classes K.
        num_queries: Cluster centres Q.
        pixel_decoder: :class:`KMaXPixelDecoder` keyword arguments (``dec_layers``,
            ``dec_channels``, ``layer_types``, ``drop_path_rate``, ``max_span``).
        transformer_decoder: :class:`KMaXTransformerDecoder` keyword arguments (``dec_layers``,
            ``drop_path_rate``, ``aux_semantic_head``), over the published defaults
            :data:`PUBLISHED_TRANSFORMER_DECODER`; ``in_channels`` is derived from the pixel
            decoder (4 x its stage widths) and only checked if given.
        norm_cfg: Norm of every conv and attention (official SyncBN, eps 1e-3, momentum 0.01).
        init_cfg: mmengine init config; None applies the official initialisation.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        num_queries: int = 128,
        *,
        pixel_decoder: dict | None = None,
        transformer_decoder: dict | None = None,
        norm_cfg: dict | None = DEFAULT_NORM_CFG,
        init_cfg: dict | list[dict] | None = None,
    ) -> None:
        super().__init__(init_cfg=init_cfg)
        pixel_cfg = copy.deepcopy(dict(pixel_decoder or {}))
        trans_cfg = dict(PUBLISHED_TRANSFORMER_DECODER)
        trans_cfg.update(copy.deepcopy(dict(transformer_decoder or {})))
        self.pixel_decoder = KMaXPixelDecoder(in_channels, norm_cfg=norm_cfg, **pixel_cfg)
        pixel_out = self.pixel_decoder.out_channels
        derived = [*pixel_out[:3], pixel_out[-1]]
        given = trans_cfg.pop('in_channels', None)
        if given is not None and list(given) != derived:
            raise ValueError(
                f'transformer_decoder in_channels {list(given)} do not match the pixel decoder '
                f'outputs {derived} (4 x dec_channels of stages 0-2 and of the last stage)'
            )
        trans_cfg.setdefault('semantic_channels', self.pixel_decoder.semantic_channels)
        self.transformer_decoder = KMaXTransformerDecoder(
            derived, num_classes, num_queries, norm_cfg=norm_cfg, **trans_cfg
        )

    def init_weights(self) -> None:
        """The official initialisation, or ``init_cfg`` (e.g. ``Pretrained``) when given."""
        if self.init_cfg:
            super().init_weights()
        else:
            init_official_weights(self)

    def forward(self, feats: Sequence[Tensor]) -> dict:
        """Predicts class and mask logits from backbone features.

        Args:
            feats: Backbone features NCHW, finest first: ``[res2, res3, res4, res5]`` at strides
                4, 8, 16, 32 (plus the extra finest feature first for a 5-stage decoder).

        Returns:
            ``pred_logits`` (B, Q, K+1, last = void), ``pred_masks`` (B, Q, h, w) mask logits at
            the finest feature's size, ``pixel_feature`` (B, 128, h, w) L2-normalised,
            ``aux_outputs`` (one dict per kMaX layer with ``pred_logits``, ``pred_masks`` and
            ``pixel_feature`` resized to (h, w)), and ``aux_semantic`` (B, K+1, h, w) (``'aspp'``)
            or (B, K, H/32, W/32) (``'light'``) in training when the aux head is on.
        """
        multi_scale, panoptic, semantic = self.pixel_decoder(feats)
        return self.transformer_decoder(multi_scale, panoptic, semantic)


# --------------------------------------------------------------------------------------------
# Weight init
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def init_official_weights(module: nn.Module) -> None:
    """The official initialisation of every kMaX block inside ``module``.

    Convs: truncated normal (TF style, +-2 std) with std ``sqrt(2 / in_channels)`` unless the
    block sets another (axial qkv ``in_channels**-0.5``, query qkv and pixel value
    ``256**-0.5``, class heads and the pixel-embedding conv 0.01, depthwise 5x5 Xavier uniform);
    biases zero. Norms: gamma 1, beta 0, except the last norm of every residual branch (gamma 0)
    and the mask-logit norm (gamma 0.1). Relative-position tables and cluster centres:
    truncated normal, std 1. Running statistics are reset.
    """
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase):
            m.reset_parameters()
        elif isinstance(m, ChannelsFirstLayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for m in module.modules():
        if isinstance(m, ConvNormAct):
            weight = m.conv.weight
            if m.init_std == 'xavier_uniform':
                nn.init.xavier_uniform_(weight)
            elif m.init_std == 'he_normal':
                trunc_normal_tf_(weight, std=math.sqrt(2.0 / m.conv.in_channels))
            else:
                trunc_normal_tf_(weight, std=float(m.init_std))
            if m.conv.bias is not None:
                nn.init.zeros_(m.conv.bias)
            if getattr(m.norm, 'weight', None) is not None:
                nn.init.constant_(m.norm.weight, m.norm_init)
        elif isinstance(m, RelativePositionalEncoding):
            trunc_normal_tf_(m.embeddings.weight, std=1.0)
        elif isinstance(m, KMaXPredictor):
            norm = m.pixel_space_mask_batch_norm
            if getattr(norm, 'weight', None) is not None:
                nn.init.constant_(norm.weight, 0.1)
        elif isinstance(m, KMaXTransformerDecoder):
            trunc_normal_tf_(m.cluster_centers.weight, std=1.0)


# --------------------------------------------------------------------------------------------
# Official checkpoint conversion
# --------------------------------------------------------------------------------------------
_OFFICIAL_ROOTS = {'pixel_decoder': 'pixel_decoder', 'predictor': 'transformer_decoder'}


def convert_official(state_dict: dict) -> dict[str, Tensor]:
    """An official kMaX-DeepLab head state dict in :class:`KMaXNetwork`'s key layout.

    Accepts the head's own keys (``pixel_decoder.…``, ``predictor.…``) or a detectron2
    checkpoint (keys under ``sem_seg_head.``, possibly wrapped as ``{'model': ...}``; numpy
    arrays from the TF-converted ``.pkl`` files become tensors). The backbone and any other
    non-head entries are left out. The mapping is a rename: every dotted name loses its leading
    underscore, ``_predcitor`` becomes ``predictor`` and the head's ``predictor`` becomes
    ``transformer_decoder``.
    """
    if isinstance(state_dict.get('model'), dict):
        state_dict = state_dict['model']
    elif isinstance(state_dict.get('state_dict'), dict):
        state_dict = state_dict['state_dict']
    out = {}
    for key, value in state_dict.items():
        name = key.removeprefix('sem_seg_head.')
        parts = name.split('.')
        if parts[0] not in _OFFICIAL_ROOTS:
            continue
        parts = [_OFFICIAL_ROOTS[parts[0]]] + [p.removeprefix('_') for p in parts[1:]]
        parts = ['predictor' if p == 'predcitor' else p for p in parts]
        out['.'.join(parts)] = value if isinstance(value, Tensor) else torch.as_tensor(value)
    if not out:
        raise ValueError(
            'no kMaX-DeepLab head weights found: expected keys starting with pixel_decoder. / '
            'predictor. (head state dict) or sem_seg_head. (detectron2 checkpoint)'
        )
    return out


# --------------------------------------------------------------------------------------------
# The registered head (mmseg decode head and mmdet panoptic head)
# --------------------------------------------------------------------------------------------
@MODELS.register_module()
class KMaXHead(MaskClassificationHead):
    """kMaX-DeepLab as a decode head (mmseg, semantic) and a panoptic head (mmdet, panoptic).

    Holds the official head's ``pixel_decoder`` and ``transformer_decoder`` (official
    ``predictor``; :func:`convert_official` maps the keys) and :class:`KMaXCriterion`. Masks are
    a softmax across the queries ("mask-ID"): semantic inference is
    ``einsum(softmax(class)[:-1], softmax_queries(mask))`` and panoptic merging is kMaX's
    (``effvision.MaskClassificationFusionHead`` with ``rule='kmax'``). Mask logits are upsampled
    to the padded input with ``align_corners`` when its width is odd, as the official
    meta-architecture does for its odd canvases (1281, 1025 x 2049).

    Args:
        in_channels: Backbone channels, finest first (4 levels at strides 4-32; 5 with the
            Cityscapes-style extra stage).
        num_classes: Classes without void (things first for panoptic use).
        num_things_classes, num_stuff_classes: Panoptic class split, or None (semantic).
        num_queries: Cluster centres (COCO/ADE20K 128, Cityscapes 256).
        pixel_decoder: :class:`KMaXPixelDecoder` keyword arguments.
        transformer_decoder: :class:`KMaXTransformerDecoder` keyword arguments (``dec_layers``,
            ``drop_path_rate``, ``aux_semantic_head``).
        norm_cfg: Norm of the head (official SyncBN, eps 1e-3, momentum 0.01).
        loss: Criterion config (``KMaXCriterion``; ``num_classes`` is filled in).
        **kwargs: See :class:`MaskClassificationHead` (``ignore_index``, ``in_index``, ...).
    """

    mask_activation = 'softmax'
    mask_align_corners = 'odd_width'  # official: align_corners iff the canvas width is odd

    def __init__(
        self,
        *,
        in_channels: Sequence[int],
        num_classes: int,
        num_things_classes: int | None = None,
        num_stuff_classes: int | None = None,
        num_queries: int = 128,
        pixel_decoder: dict | None = None,
        transformer_decoder: dict | None = None,
        norm_cfg: dict | None = DEFAULT_NORM_CFG,
        loss: dict | None = None,
        **kwargs,
    ) -> None:
        super().__init__(
            num_classes=num_classes,
            num_things_classes=num_things_classes,
            num_stuff_classes=num_stuff_classes,
            **kwargs,
        )
        network = KMaXNetwork(
            in_channels,
            num_classes,
            num_queries,
            pixel_decoder=pixel_decoder,
            transformer_decoder=transformer_decoder,
            norm_cfg=norm_cfg,
        )
        self.pixel_decoder = network.pixel_decoder
        self.transformer_decoder = network.transformer_decoder
        self.build_criterion(loss or dict(type='effvision.KMaXCriterion'))

    def init_weights(self) -> None:
        """The official initialisation, or ``init_cfg`` (e.g. ``Pretrained``) when given."""
        if self.init_cfg:
            super().init_weights()
        else:
            init_official_weights(self)

    def forward(self, inputs: Sequence[Tensor]) -> dict:
        """Class and mask logits of the final prediction and of every kMaX layer.

        Args:
            inputs: Backbone features NCHW, finest first (after ``in_index``).

        Returns:
            ``pred_logits`` (B, Q, K+1), ``pred_masks`` (B, Q, h, w) at the finest feature's
            size, ``pixel_feature``, ``aux_outputs`` and, in training, ``aux_semantic``.
        """
        multi_scale, panoptic, semantic = self.pixel_decoder(self.select_inputs(inputs))
        return self.transformer_decoder(multi_scale, panoptic, semantic)
