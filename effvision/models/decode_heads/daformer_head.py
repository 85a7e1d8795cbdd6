"""DAFormer's decode head: per-level embedding, upsampling to stride 4, context-aware fusion.

Hoyer et al., "DAFormer: Improving Network Architectures and Training Strategies for
Domain-Adaptive Semantic Segmentation", CVPR 2022; official code lhoyer/DAFormer
(``mmseg/models/decode_heads/daformer_head.py``, a vendored mmseg 0.16).

Differences from the official code, none of which changes a number: the embedding and fusion
settings are plain keyword arguments (``decoder_params=dict(...)`` as in the official configs is
still accepted); the caller's config dicts are never modified in place; the inputs are selected
with ``in_index`` (the official head indexed the feature list directly, which only worked for the
full four-level list); the ``isa`` fusion is not provided (an ablation that needs a layer mmseg
1.x does not have). Parameter names follow the official ones, so official checkpoints load as
they are (``embed_layers.<level>.proj``, ``fuse_layer.aspp_modules``, ``fuse_layer.bottleneck``).
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn import ConvModule, DepthwiseSeparableConvModule
from mmseg.models.decode_heads.aspp_head import ASPPModule
from mmseg.models.decode_heads.decode_head import BaseDecodeHead
from mmseg.models.decode_heads.sep_aspp_head import DepthwiseSeparableASPPModule

from effvision.registry import MODELS

LAYER_TYPES = ('id', 'mlp', 'conv', 'sep_conv', 'aspp', 'rawconv_and_aspp')


class LinearEmbed(nn.Module):
    """A linear projection of every pixel's channels (SegFormer's ``MLP``), NCHW in and out.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: (B, C_in, H, W). Returns: (B, C_out, H, W)."""
        return self.proj(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ASPPFusion(nn.Module):
    """ASPP without (by default) the image-pooling branch, followed by a 3x3 bottleneck.

    The branches are a 1x1 conv for dilation 1 and 3x3 convs (depthwise separable when ``sep``)
    for the other dilations, each with norm and activation; their concatenation (plus the pooled
    branch and the optional context layer) goes through a 3x3 ``bottleneck`` to ``channels``.

    Args:
        in_channels: Input channels.
        channels: Channels of every branch and of the output.
        sep: Depthwise separable 3x3 branches (DAFormer's published fusion) instead of full ones.
        dilations: One branch per dilation; 1 gives the 1x1 branch.
        pool: Add the global-average-pooling branch of DeepLabv3.
        norm_cfg: Norm of every conv.
        act_cfg: Activation of every conv.
        align_corners: For upsampling the pooled branch.
        context_cfg: An extra branch built with :func:`build_layer` (unused by the published model).
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        *,
        sep: bool,
        dilations: tuple[int, ...] = (1, 6, 12, 18),
        pool: bool = False,
        norm_cfg: dict | None = None,
        act_cfg: dict | None = None,
        align_corners: bool = False,
        context_cfg: dict | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(dilations, (list, tuple)) or not dilations:
            raise ValueError(f'dilations must be a non-empty list of ints, got {dilations!r}')
        self.align_corners = align_corners
        self.image_pool = None
        if pool:
            self.image_pool = nn.Sequential(
                nn.AdaptiveAvgPool2d(1),
                ConvModule(in_channels, channels, 1, norm_cfg=norm_cfg, act_cfg=act_cfg),
            )
        self.context_layer = None
        if context_cfg is not None:
            self.context_layer = build_layer(in_channels, channels, context_cfg)
        aspp = DepthwiseSeparableASPPModule if sep else ASPPModule
        self.aspp_modules = aspp(
            dilations=tuple(dilations),
            in_channels=in_channels,
            channels=channels,
            conv_cfg=None,
            norm_cfg=norm_cfg,
            act_cfg=act_cfg,
        )
        branches = len(dilations) + int(pool) + int(context_cfg is not None)
        self.bottleneck = ConvModule(
            branches * channels, channels, 3, padding=1, norm_cfg=norm_cfg, act_cfg=act_cfg
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: (B, C_in, H, W). Returns: (B, channels, H, W)."""
        outs = []
        if self.image_pool is not None:
            pooled = self.image_pool(x)
            outs.append(
                F.interpolate(
                    pooled, size=x.shape[2:], mode='bilinear', align_corners=self.align_corners
                )
            )
        if self.context_layer is not None:
            outs.append(self.context_layer(x))
        outs.extend(self.aspp_modules(x))
        return self.bottleneck(torch.cat(outs, dim=1))


def build_layer(in_channels: int, out_channels: int, cfg: dict) -> nn.Module:
    """Builds one embedding or fusion layer from ``cfg['type']`` (one of :data:`LAYER_TYPES`).

    ``cfg`` is copied, never modified. ``mlp`` ignores any ``act_cfg``/``norm_cfg`` in it, as the
    official code does (DAFormer's configs pass ``None`` for both).
    """
    cfg = copy.deepcopy(dict(cfg))
    kind = cfg.pop('type', None)
    if kind == 'id':
        return nn.Identity()
    if kind == 'mlp':
        return LinearEmbed(in_channels, out_channels)
    if kind in ('conv', 'sep_conv'):
        kernel_size = cfg.pop('kernel_size', None)
        if kernel_size is None:
            raise ValueError(
                f'a {kind!r} layer needs kernel_size, e.g. dict(type={kind!r}, '
                'kernel_size=1, norm_cfg=..., act_cfg=...)'
            )
        module = ConvModule if kind == 'conv' else DepthwiseSeparableConvModule
        return module(in_channels, out_channels, kernel_size, padding=kernel_size // 2, **cfg)
    if kind == 'aspp':
        return ASPPFusion(in_channels, out_channels, **cfg)
    if kind == 'rawconv_and_aspp':
        kernel_size = cfg.pop('kernel_size', 1)
        return nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2),
            ASPPFusion(out_channels, out_channels, **cfg),
        )
    raise ValueError(
        f'unknown DAFormer layer type {kind!r}; supported: {", ".join(LAYER_TYPES)} '
        "(the official 'isa' ablation is not provided)"
    )


def _with_defaults(cfg: dict, **defaults) -> dict:
    """``cfg`` with the head-wide settings filled in where a fusion layer uses them."""
    cfg = dict(cfg)
    if cfg.get('type') in ('aspp', 'rawconv_and_aspp'):
        for key, value in defaults.items():
            cfg.setdefault(key, value)
    return cfg


@MODELS.register_module()
class DAFormerHead(BaseDecodeHead):
    """DAFormer's decoder: embed every level, upsample to the first level's size, fuse, classify.

    Each selected level goes through its own embedding layer (a per-pixel linear projection to
    ``embed_dims`` in the published model; the last level can have its own ``embed_neck_cfg``),
    is resized bilinearly to the first selected level's size (stride 4), and the concatenation
    goes through the fusion layer: the published ``aspp`` with ``sep=True`` (1x1 branch plus
    depthwise-separable 3x3 branches at dilations 6, 12, 18, no pooling, BN, ReLU, then a 3x3
    bottleneck), or the ablations ``aspp`` with ``sep=False``, ``conv`` with ``kernel_size=1``
    (SegFormer-like), and the bottleneck form (``embed_neck_cfg=dict(type='rawconv_and_aspp',
    ...)`` with :class:`SegFormerAdapter` as neck).

    Args:
        embed_dims: Embedding channels, one int for all levels or one per selected level.
        embed_cfg: Embedding layer of every level but the last (see :func:`build_layer`).
        embed_neck_cfg: Embedding layer of the last level; None or ``'same_as_embed_cfg'`` uses
            ``embed_cfg``.
        fusion_cfg: The fusion layer; ``norm_cfg``, ``act_cfg`` and ``align_corners`` default to
            the head's.
        decoder_params: The official configs' nesting of the four arguments above; when given,
            its entries override them.
        **kwargs: :class:`mmseg.models.decode_heads.decode_head.BaseDecodeHead` arguments
            (``in_channels``, ``in_index``, ``channels``, ``num_classes``, ...);
            ``input_transform`` is always ``'multiple_select'``.
    """

    def __init__(
        self,
        embed_dims: int | list[int] = 256,
        embed_cfg: dict | None = None,
        embed_neck_cfg: dict | str | None = None,
        fusion_cfg: dict | None = None,
        decoder_params: dict | None = None,
        **kwargs,
    ) -> None:
        if kwargs.pop('input_transform', 'multiple_select') != 'multiple_select':
            raise ValueError("DAFormerHead always uses input_transform='multiple_select'")
        super().__init__(input_transform='multiple_select', **kwargs)
        if self.align_corners:
            raise ValueError('DAFormerHead is defined with align_corners=False')
        params = dict(
            embed_dims=embed_dims,
            embed_cfg=embed_cfg or dict(type='mlp'),
            embed_neck_cfg=embed_neck_cfg,
            fusion_cfg=fusion_cfg
            or dict(type='aspp', sep=True, dilations=(1, 6, 12, 18), pool=False),
        )
        unknown = set(decoder_params or {}) - set(params)
        if unknown:
            raise ValueError(f'unknown decoder_params {sorted(unknown)}; known: {sorted(params)}')
        params.update(decoder_params or {})

        levels = list(self.in_index)
        dims = params['embed_dims']
        dims = [dims] * len(levels) if isinstance(dims, int) else list(dims)
        if len(dims) != len(levels):
            raise ValueError(
                f'embed_dims has {len(dims)} entries for {len(levels)} in_index levels'
            )
        neck_cfg = params['embed_neck_cfg']
        if neck_cfg is None or neck_cfg == 'same_as_embed_cfg':
            neck_cfg = params['embed_cfg']
        defaults = dict(
            norm_cfg=self.norm_cfg, act_cfg=self.act_cfg, align_corners=self.align_corners
        )
        self.embed_layers = nn.ModuleDict()
        for level, in_channels, dim in zip(levels, self.in_channels, dims):
            cfg = neck_cfg if level == levels[-1] else params['embed_cfg']
            self.embed_layers[str(level)] = build_layer(
                in_channels, dim, _with_defaults(cfg, **defaults)
            )
        self.fuse_layer = build_layer(
            sum(dims), self.channels, _with_defaults(params['fusion_cfg'], **defaults)
        )

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        """Segmentation logits at the first selected level's resolution.

        Args:
            inputs: Backbone features, NCHW; the levels in ``in_index`` are used, e.g. (B, C_i,
                H/s_i, W/s_i) at strides 4, 8, 16, 32.

        Returns:
            (B, num_classes, H_0, W_0) with H_0, W_0 the size of the first selected level.
        """
        feats = self._transform_inputs(inputs)
        size = feats[0].shape[2:]
        embedded = []
        for i, (level, feat) in enumerate(zip(self.in_index, feats)):
            x = self.embed_layers[str(level)](feat)
            # Every level but the first is resized, without comparing sizes: a size comparison
            # is a guard torch.export cannot decide for a symbolic H/W, and resizing to the same
            # size is exact (bilinear at scale 1 copies).
            if i > 0:
                x = F.interpolate(x, size=size, mode='bilinear', align_corners=self.align_corners)
            embedded.append(x)
        return self.cls_seg(self.fuse_layer(torch.cat(embedded, dim=1)))


@MODELS.register_module()
class SegFormerAdapter(nn.Module):
    """Neck of DAFormer's "bottleneck" ablation: upsamples chosen levels and puts them last.

    The levels ``out_levels`` are resized bilinearly by ``scales`` and their concatenation
    replaces the last level (e.g. ``out_levels=(3,), scales=(8,)`` brings the stride-32 map to
    stride 4, where the head's ``rawconv_and_aspp`` embedding adds context).

    Args:
        out_levels: Levels to resize.
        scales: Scale factor of each.
    """

    def __init__(self, out_levels: tuple[int, ...] = (3,), scales: tuple[float, ...] = (4,)):
        super().__init__()
        if len(out_levels) != len(scales):
            raise ValueError('out_levels and scales need one entry each')
        self.out_levels = tuple(out_levels)
        self.scales = tuple(scales)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """Args: feats: NCHW maps. Returns: the same list with the last entry replaced."""
        resized = [
            feats[level]
            if scale == 1
            else F.interpolate(
                feats[level], scale_factor=scale, mode='bilinear', align_corners=False
            )
            for level, scale in zip(self.out_levels, self.scales)
        ]
        return [*feats[:-1], torch.cat(resized, dim=1)]


def convert_official(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An official DAFormer checkpoint's weights in effvision's layout.

    Head parameters keep their official names. The official MiT backbone (NVlabs naming:
    ``patch_embed1``, ``block1``, ``attn.q``/``attn.kv``, ``mlp.fc1``) becomes mmseg's
    ``MixVisionTransformer``, wherever it sits: a segmentor's ``backbone.``, or the student
    ``model.backbone.``, EMA teacher ``ema_model.backbone.`` and ImageNet copy
    ``imnet_model.backbone.`` of a UDA checkpoint (which is :class:`~effvision.models.DACS`'s
    layout too). Other keys and bare head state dicts pass through unchanged.
    """
    if 'state_dict' in state_dict and isinstance(state_dict['state_dict'], dict):
        state_dict = state_dict['state_dict']
    groups: dict[str, dict[str, torch.Tensor]] = {}
    out = {}
    for key, value in state_dict.items():
        prefix, sep, rest = key.partition('backbone.')
        if sep and prefix in ('', 'model.', 'ema_model.', 'imnet_model.'):
            groups.setdefault(prefix + sep, {})[rest] = value
        else:
            out[key] = value
    for prefix, backbone in groups.items():
        if any(key.startswith('patch_embed1.') for key in backbone):
            backbone = _mit_to_mmseg(backbone)
        out.update({prefix + k: v for k, v in backbone.items()})
    return out


def _mit_to_mmseg(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """NVlabs SegFormer MiT keys (what DAFormer trains) -> mmseg 1.x ``MixVisionTransformer``."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith('head'):
            continue
        if key.startswith('patch_embed'):
            stage = int(key[len('patch_embed')]) - 1
            new = key.replace(f'patch_embed{stage + 1}', f'layers.{stage}.0')
            new = new.replace('proj', 'projection')
        elif key.startswith('block'):
            stage = int(key[len('block')]) - 1
            new = key.replace(f'block{stage + 1}', f'layers.{stage}.1')
            if 'attn.q.' in new:
                kv = state_dict[key.replace('attn.q.', 'attn.kv.')]
                new = new.replace('attn.q.', 'attn.attn.in_proj_')
                value = torch.cat([value, kv], dim=0)
            elif 'attn.kv.' in new:
                continue
            elif 'attn.proj.' in new:
                new = new.replace('attn.proj.', 'attn.attn.out_proj.')
            elif 'attn.sr.' in new or 'attn.norm.' in new:
                pass
            elif 'mlp.' in new:
                new = new.replace('mlp.fc1.', 'ffn.layers.0.')
                new = new.replace('mlp.dwconv.dwconv.', 'ffn.layers.1.')
                new = new.replace('mlp.fc2.', 'ffn.layers.4.')
                if new.endswith('weight') and value.dim() == 2:
                    value = value.reshape(*value.shape, 1, 1)
        elif key.startswith('norm'):
            stage = int(key[len('norm')]) - 1
            new = key.replace(f'norm{stage + 1}', f'layers.{stage}.2')
        else:
            new = key
        out[new] = value
    return out
