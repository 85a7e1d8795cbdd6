"""PEM's network: a deformable FPN pixel decoder and a prototype-based masked transformer decoder.

Cavagnero et al., "PEM: Prototype-based Efficient MaskFormer for Image Segmentation", CVPR 2024;
official code NiccoloCavagnero/PEM at commit 2dfeb3dfb972b4c3b78c77168372df0dde458d9f
(``pem/modeling/pixel_decoder/pem_pixel_decoder.py``,
``pem/modeling/transformer_decoder/pem_transformer_decoder.py``,
``pem/modeling/meta_arch/mask_former_head.py``; detectron2).

Differences from the official code. None changes a number at the official settings. Every
official quirk that affects results is kept as the default of a named option:
``csm_double_sigmoid``, ``normalize_over_queries``, ``unmask_rule`` and ``pos_encoding_float32``.
- The modulated deformable conv is ``torchvision.ops.deform_conv2d``. detectron2's op is
  CUDA-only; torchvision's layout (channel 2k = dy, 2k+1 = dx of tap k = 3i+j, one mask channel
  per tap) is the same, and its results are bit-identical to detectron2's kernel and to
  ``mmcv.ops.modulated_deform_conv2d``. ``dcn_impl='pytorch'`` selects a pure-PyTorch version
  (bilinear ``grid_sample`` plus one matmul) instead; it is meant for export. The choice was
  measured with torch 2.15, onnxruntime 1.31, dynamic H and W, checked at two sizes, float32:
  * mmcv ``ModulatedDeformConv2d`` cannot be exported: ``torch.export`` fails ("Cannot access
    data pointer of Tensor (FakeTensor)") because the op is an opaque compiled extension.
  * torchvision's op exports to the ONNX ``DeformConv`` op. That op exists from opset 19 on. At
    opset 19/20/22 onnxruntime matches to 0 / 3.6e-7 (max |diff|). At opset 18, the default of
    ``effvision.deploy``, the exporter still writes ``DeformConv``, and onnxruntime rejects the
    file ("No Op registered for DeformConv with domain_version of 18").
  * the pure-PyTorch version exports at opset 18 with plain ops (GridSample, MatMul) and matches
    torchvision's op in onnxruntime to 1.6e-6. In PyTorch it matches to 7.5e-7 (float32) and
    1e-15 (float64). Its CPU speed is about the same (72 vs 84 ms for 2x16x64x64).
  torchvision stays the default: it has CPU and CUDA kernels, autograd and an autocast rule,
  and it needs no OpenMMLab op. The whole network (small widths, dynamic H and W) exports either
  way, the pure-PyTorch DCN at opset 18 and torchvision's at opset 19. onnxruntime matches it
  to 5e-7 at 128x96, 160x224 and 100x70; the last is not a multiple of 32, so it runs the
  cropping path. Whether TensorRT parses ``DeformConv`` was not checked.
- Queries are batch-first, (B, Q, C), and ``nn.MultiheadAttention`` runs with
  ``batch_first=True`` (same parameters). The masking in the prototype cross-attention uses
  ``masked_fill`` instead of an in-place boolean-index write, so it traces.
- Levels whose sizes are not exact 2x multiples are handled: the upsampled map is cropped to the
  next level's size. This is a no-op for the official /32-padded inputs. The official code
  raises a broadcasting error there. A map smaller than the next level raises an error that
  names the fix.
- Norms come from ``norm_cfg`` (default SyncBN, as every official config has).
  ``LocalRepresentation.bn`` uses it too; the official code hard-codes ``nn.SyncBatchNorm``.
- The decoder skips the attention mask after the last layer. The official code computes it and
  never uses it.

Parameter names are the official ones. ``convert_official`` only strips the detectron2 prefix
``sem_seg_head.``. The defaults are the published head: every released config (ADE20K and
Cityscapes, semantic and panoptic, R50 and STDC) uses conv_dim 128, mask_dim 256, 100 queries,
hidden 256, 8 heads, FFN 2048, 6 layers and pre-norm.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from mmcv.cnn import build_norm_layer
from mmengine.model import BaseModule
from torch import nn
from torchvision.ops import deform_conv2d

from effvision.registry import MODELS

from .mask_classification import MaskClassificationHead

DCN_IMPLS = ('torchvision', 'pytorch')
UNMASK_RULES = ('all_queries', 'per_query')


def _norm(norm_cfg: dict, channels: int) -> nn.Module:
    return build_norm_layer(norm_cfg, channels)[1]


def _c2_xavier_fill(module: nn.Module) -> None:
    """fvcore's ``c2_xavier_fill``: Caffe2's XavierFill is kaiming_uniform with a=1."""
    nn.init.kaiming_uniform_(module.weight, a=1)
    if module.bias is not None:
        nn.init.zeros_(module.bias)


def _c2_msra_fill(module: nn.Module) -> None:
    """fvcore's ``c2_msra_fill``: kaiming_normal over fan_out for ReLU."""
    nn.init.kaiming_normal_(module.weight, mode='fan_out', nonlinearity='relu')
    if module.bias is not None:
        nn.init.zeros_(module.bias)


# ---------------------------------------------------------------------------------------------
# Pixel decoder blocks
# ---------------------------------------------------------------------------------------------


class ConvBNReLU(nn.Sequential):
    """Bias-free conv, norm, ReLU (``conv``/``bn``/``relu``, the official names).

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        kernel_size: Square kernel; padding keeps the size.
        norm_cfg: Norm config.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 1, *, norm_cfg: dict
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False
        )
        self.bn = _norm(norm_cfg, out_channels)
        self.relu = nn.ReLU()
        # kaiming_normal with a=1 (leaky-ReLU gain 1): std = 1 / sqrt(fan_in), as official.
        nn.init.kaiming_normal_(self.conv.weight, a=1)


class ConvMLP(nn.Module):
    """1x1 conv (C -> C/factor), norm, ReLU, 1x1 conv (-> C); both convs bias-free."""

    def __init__(self, channels: int, factor: int, norm_cfg: dict) -> None:
        super().__init__()
        hidden = channels // factor
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False),
            _norm(norm_cfg, hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, channels, 1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        return self.mlp(x)


class CSM(nn.Module):
    """Context-based self-modulation: ``x + x * w`` with a channel gate ``w`` from GAP(x).

    Args:
        channels: Channels of ``x``.
        factor: Reduction of the gate MLP's hidden width.
        norm_cfg: Norm of the gate MLP.
        double_sigmoid: Apply the sigmoid twice, ``w = sigmoid(sigmoid(mlp(gap(x))))``, as the
            official code does (its MLP ends with a Sigmoid and ``forward`` calls ``.sigmoid()``
            again), so that w lies in (0.5, 0.73). False gives the single sigmoid the paper
            describes, with w in (0, 1). Checkpoints trained officially need True.
    """

    def __init__(
        self, channels: int, factor: int = 2, *, norm_cfg: dict, double_sigmoid: bool = True
    ) -> None:
        super().__init__()
        self.mlp = nn.Sequential(ConvMLP(channels, factor, norm_cfg), nn.Sigmoid())
        self.double_sigmoid = double_sigmoid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        w = self.mlp(x.mean(dim=(2, 3), keepdim=True))
        if self.double_sigmoid:
            w = w.sigmoid()
        return x + x * w


def modulated_deform_conv2d_reference(
    x: torch.Tensor,
    offset: torch.Tensor,
    mask: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    stride: int = 1,
    padding: int = 1,
    dilation: int = 1,
) -> torch.Tensor:
    """Modulated deformable conv (DCNv2, one group, one offset group) in plain PyTorch ops.

    This is what ``torchvision.ops.deform_conv2d(x, offset, weight, bias, stride, padding,
    dilation, mask)`` computes. Tap k = i * kw + j samples the input bilinearly at
    ``(y * stride - padding + i * dilation + offset[:, 2k], x * stride - padding + j * dilation
    + offset[:, 2k + 1])``. A sample outside (-1, H) x (-1, W) is 0, and out-of-range corners
    count as 0. That is ``grid_sample`` with zero padding. The sampled taps are scaled by
    ``mask[:, k]`` and contracted with the weight in one matmul.

    Args:
        x: (B, C, H, W) input.
        offset: (B, 2 * kh * kw, H_out, W_out), interleaved (dy, dx) per tap.
        mask: (B, kh * kw, H_out, W_out) modulation.
        weight: (O, C, kh, kw).
        bias: (O,) or None.
        stride: Conv stride.
        padding: Conv padding.
        dilation: Conv dilation.

    Returns:
        (B, O, H_out, W_out).
    """
    b, c, h, w = x.shape
    out_channels, in_channels, kh, kw = weight.shape
    if in_channels != c:
        raise ValueError(
            f'grouped deformable conv is not supported: input has {c} channels, the weight '
            f'expects {in_channels}'
        )
    taps = kh * kw
    if offset.shape[1] != 2 * taps or mask.shape[1] != taps:
        raise ValueError(
            f'expected {2 * taps} offset and {taps} mask channels (one offset group), got '
            f'{offset.shape[1]} and {mask.shape[1]}'
        )
    h_out, w_out = offset.shape[-2:]
    # unflatten, not reshape: reshape's view-or-copy choice on a sliced offset would guard on
    # the batch size (B != 1) under torch.export and pin it
    offset = offset.unflatten(1, (taps, 2))
    tap_y = torch.arange(kh, dtype=x.dtype, device=x.device).repeat_interleave(kw)
    tap_x = torch.arange(kw, dtype=x.dtype, device=x.device).repeat(kh)
    base_y = torch.arange(h_out, dtype=x.dtype, device=x.device) * stride - padding
    base_x = torch.arange(w_out, dtype=x.dtype, device=x.device) * stride - padding
    py = base_y.view(1, 1, -1, 1) + (tap_y * dilation).view(1, -1, 1, 1) + offset[:, :, 0]
    px = base_x.view(1, 1, 1, -1) + (tap_x * dilation).view(1, -1, 1, 1) + offset[:, :, 1]
    # Pixel centres at (2p + 1) / size - 1 (align_corners=False), which works for 1-pixel maps.
    grid = torch.stack(((2 * px + 1) / w - 1, (2 * py + 1) / h - 1), dim=-1)
    cols = F.grid_sample(
        x,
        grid.view(b, taps * h_out, w_out, 2),
        mode='bilinear',
        padding_mode='zeros',
        align_corners=False,
    )
    cols = cols.view(b, c, taps, h_out, w_out) * mask.reshape(b, 1, taps, h_out, w_out)
    out = weight.reshape(out_channels, c * taps) @ cols.view(b, c * taps, h_out * w_out)
    out = out.view(b, out_channels, h_out, w_out)
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1)
    return out


class ModulatedDeformConv(nn.Module):
    """A 3x3 (by default) modulated deformable conv whose offsets and mask come from outside.

    It has the parameters of detectron2's ``ModulatedDeformConv`` (``weight``, optional
    ``bias``). Only one group and one offset group are supported, which is all PEM uses.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        kernel_size: Square kernel size.
        stride: Stride.
        padding: Padding.
        dilation: Dilation.
        bias: Learn a bias.
        impl: ``'torchvision'`` (``torchvision.ops.deform_conv2d``) or ``'pytorch'``
            (:func:`modulated_deform_conv2d_reference`, which exports with plain ONNX ops).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        *,
        stride: int = 1,
        padding: int = 1,
        dilation: int = 1,
        bias: bool = False,
        impl: str = 'torchvision',
    ) -> None:
        super().__init__()
        if impl not in DCN_IMPLS:
            raise ValueError(f'unknown deformable conv impl {impl!r}; choose one of {DCN_IMPLS}')
        self.impl = impl
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        _c2_msra_fill(self)

    def forward(self, x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Args:
            x: (B, C_in, H, W).
            offset: (B, 2 * k * k, H_out, W_out), interleaved (dy, dx) per tap.
            mask: (B, k * k, H_out, W_out), already in [0, 1].

        Returns:
            (B, C_out, H_out, W_out).
        """
        if self.impl == 'pytorch':
            return modulated_deform_conv2d_reference(
                x,
                offset,
                mask,
                self.weight,
                self.bias,
                stride=self.stride,
                padding=self.padding,
                dilation=self.dilation,
            )
        return deform_conv2d(
            x,
            offset,
            self.weight,
            self.bias,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            mask=mask,
        )


class DeformLayer(nn.Module):
    """Modulated 3x3 deformable conv, norm and ReLU, then a learned 2x upsampling.

    The upsampling is a 4x4 stride-2 transposed conv, norm and ReLU. A 3x3 conv
    (``dcn_offset``, zero-initialised) predicts 27 channels per pixel: the first 18 are the
    offsets, interleaved (dy, dx) per tap (the official code splits them into chunks it calls
    ``offset_x``/``offset_y`` and concatenates them back, which is the same layout), and the
    last 9, through a sigmoid, are the tap mask.

    Args:
        in_channels: Input channels.
        out_channels: Output channels (of both convs).
        norm_cfg: Norm config.
        dcn_impl: See :class:`ModulatedDeformConv`.
    """

    def __init__(
        self, in_channels: int, out_channels: int, *, norm_cfg: dict, dcn_impl: str = 'torchvision'
    ) -> None:
        super().__init__()
        self.dcn_offset = nn.Conv2d(in_channels, 27, 3, padding=1)
        self.dcn = ModulatedDeformConv(in_channels, out_channels, 3, padding=1, impl=dcn_impl)
        self.dcn_bn = _norm(norm_cfg, out_channels)
        self.up_sample = nn.ConvTranspose2d(
            out_channels, out_channels, 4, stride=2, padding=1, bias=False
        )
        self.up_bn = _norm(norm_cfg, out_channels)
        self.relu = nn.ReLU()
        # Zero offsets and mask logits start the DCN as a plain conv scaled by sigmoid(0).
        nn.init.zeros_(self.dcn_offset.weight)
        nn.init.zeros_(self.dcn_offset.bias)
        self._init_upsample_bilinear()

    @torch.no_grad()
    def _init_upsample_bilinear(self) -> None:
        # As the official code (CenterNet's fill_up_weights): the bilinear kernel is written
        # to every input channel's output channel 0 only. The other output channels keep
        # PyTorch's default init.
        w = self.up_sample.weight
        k = w.shape[2]
        f = math.ceil(k / 2)
        c = (2 * f - 1 - f % 2) / (2.0 * f)
        ramp = torch.tensor([1 - abs(i / f - c) for i in range(k)], dtype=w.dtype, device=w.device)
        w[:, 0] = torch.outer(ramp, ramp)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: x: (B, C_in, H, W).

        Returns:
            ``(out, up)``: out (B, C_out, H, W) for the transformer decoder; up
            (B, C_out, 2H, 2W), added to the next finer level.
        """
        offset_mask = self.dcn_offset(x)
        offset, mask = offset_mask[:, :18], offset_mask[:, 18:].sigmoid()
        out = self.relu(self.dcn_bn(self.dcn(x, offset, mask)))
        up = self.relu(self.up_bn(self.up_sample(out)))
        return out, up


def _fit_to(up: torch.Tensor, like: torch.Tensor, coarse: str, fine: str) -> torch.Tensor:
    """``up`` cropped to ``like``'s size. Ceil-mode strides (odd sizes) make it 1 px larger."""
    h, w = like.shape[-2:]

    def message() -> str:
        return (
            f"PEM's pixel decoder upsamples the {coarse} map by exactly 2x to "
            f'{tuple(up.shape[-2:])}, which is smaller than the {fine} map {(h, w)} (the '
            'backbone floors odd sizes). Pad the image to a multiple of 32 (e.g. '
            'size_divisor=32 in the data preprocessor).'
        )

    # Checked in eager only: the backbone's ceil-halving makes it hold for every input size,
    # but the symbolic solver of torch.export cannot prove 2*ceil(x/2) >= x through the chain of
    # strides and would turn the check into a guard that restricts H and W to multiples of 32.
    # For the same reason the crop is a gather there: a slice guards that its end fits.
    if torch.compiler.is_exporting():
        rows = torch.arange(h, device=up.device)
        cols = torch.arange(w, device=up.device)
        return up.index_select(-2, rows).index_select(-1, cols)
    torch._check(up.shape[-2] >= h, message)
    torch._check(up.shape[-1] >= w, message)
    return up[..., :h, :w]


class PEMPixelDecoder(nn.Module):
    """PEM's pixel decoder: a top-down FPN with self-modulation and deformable convs.

    Each backbone level is projected to ``conv_dim`` by a 1x1 ConvBNReLU and modulated by a
    :class:`CSM`. A 1x1 ConvBNReLU of the global-average-pooled res5 is added to the stride-32
    level. Going down from stride 32, each level passes through a :class:`DeformLayer`, whose
    2x upsampled output is added to the next level. The stride-4 sum goes through a 1x1
    ConvBNReLU and becomes the mask features.

    Args:
        in_channels: Channels of res2..res5 (strides 4, 8, 16, 32).
        conv_dim: Width of the FPN.
        mask_dim: Channels of the mask features.
        norm_cfg: Norm config of every block.
        dcn_impl: See :class:`ModulatedDeformConv`.
        csm_double_sigmoid: See :class:`CSM`.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        *,
        conv_dim: int = 128,
        mask_dim: int = 256,
        norm_cfg: dict | None = None,
        dcn_impl: str = 'torchvision',
        csm_double_sigmoid: bool = True,
    ) -> None:
        super().__init__()
        norm_cfg = norm_cfg or dict(type='SyncBN', requires_grad=True)
        if len(in_channels) != 4:
            raise ValueError(
                f'PEM needs the four backbone levels res2..res5 (strides 4-32), got in_channels='
                f'{list(in_channels)}; set out_indices=(0, 1, 2, 3) on the backbone'
            )
        self.in_channels = list(in_channels)
        self.in_projections = nn.ModuleList(
            ConvBNReLU(c, conv_dim, 1, norm_cfg=norm_cfg) for c in in_channels
        )
        self.conv_avg = ConvBNReLU(in_channels[-1], conv_dim, 1, norm_cfg=norm_cfg)
        self.csm = nn.ModuleList(
            CSM(conv_dim, 2, norm_cfg=norm_cfg, double_sigmoid=csm_double_sigmoid) for _ in range(4)
        )
        self.dcn = nn.ModuleList(
            DeformLayer(conv_dim, conv_dim, norm_cfg=norm_cfg, dcn_impl=dcn_impl) for _ in range(3)
        )
        self.out = ConvBNReLU(conv_dim, mask_dim, 1, norm_cfg=norm_cfg)

    def forward(self, feats: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Args:
            feats: res2..res5, (B, C_i, H_i, W_i) at strides 4, 8, 16, 32. Each level is the
                previous one halved. Ceil-halving (odd sizes) is accepted. Floor-halving is
                accepted only when the sizes divide evenly.

        Returns:
            ``(mask_features, multi_scale)``: mask_features (B, mask_dim, H_0, W_0);
            multi_scale = [stride 32, stride 16, stride 8] maps of (B, conv_dim, H_i, W_i), the
            DeformLayer outputs the transformer decoder attends to.
        """
        if len(feats) != 4:
            raise ValueError(f'PEM needs the 4 levels res2..res5, got {len(feats)} feature maps')
        for i, (feat, channels) in enumerate(zip(feats, self.in_channels)):
            if feat.dim() != 4 or feat.shape[1] != channels:
                raise ValueError(
                    f'level {i} (stride {4 * 2**i}) should be (B, {channels}, H, W), got '
                    f'{tuple(feat.shape)}; in_channels must list the backbone channels'
                )
        projected = [proj(feat) for proj, feat in zip(self.in_projections, feats)]
        context = self.conv_avg(feats[3].mean(dim=(2, 3), keepdim=True))
        x32, up = self.dcn[0](self.csm[0](projected[3]) + context)
        x16, up = self.dcn[1](self.csm[1](projected[2]) + _fit_to(up, projected[2], 'res5', 'res4'))
        x8, up = self.dcn[2](self.csm[2](projected[1]) + _fit_to(up, projected[1], 'res4', 'res3'))
        x4 = self.csm[3](projected[0]) + _fit_to(up, projected[0], 'res3', 'res2')
        return self.out(x4), [x32, x16, x8]


# ---------------------------------------------------------------------------------------------
# Transformer decoder blocks
# ---------------------------------------------------------------------------------------------


class SinePositionalEncoding(nn.Module):
    """DETR's normalised 2-D sine encoding, ``cat(pos_y, pos_x)`` along channels.

    Args:
        num_feats: Channels per axis (the output has twice as many).
        temperature: Frequency base.
        scale: Coordinates are normalised to (0, scale].
        eps: Added to the last coordinate before normalising.
        float32: Compute in float32 whatever the input dtype, as the official code does. The
            float32 result then goes through type promotion, so a float64 model gets
            float32-rounded encodings. False computes in the input's dtype (measured on the
            golden fixtures: up to 5.3e-7 away from the official outputs in float64).
    """

    def __init__(
        self,
        num_feats: int,
        temperature: float = 10000.0,
        scale: float = 2 * math.pi,
        eps: float = 1e-6,
        *,
        float32: bool = True,
    ) -> None:
        super().__init__()
        self.num_feats = num_feats
        self.temperature = temperature
        self.scale = scale
        self.eps = eps
        self.float32 = float32

    def _axis(self, size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        # Same operations in the same order as the official cumsum-of-ones version.
        pos = torch.arange(1, size + 1, dtype=dtype, device=device)
        pos = pos / (pos[-1:] + self.eps) * self.scale
        dim_t = torch.arange(self.num_feats, dtype=dtype, device=device)
        dim_t = self.temperature ** (2 * (dim_t // 2) / self.num_feats)
        pos = pos[:, None] / dim_t
        return torch.stack((pos[:, 0::2].sin(), pos[:, 1::2].cos()), dim=2).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: (B, C, H, W), only its size and device are used.

        Returns:
            (1, 2 * num_feats, H, W), float32 or ``x.dtype`` (see ``float32``).
        """
        dtype = torch.float32 if self.float32 else x.dtype
        h, w = x.shape[-2:]
        pos_y = self._axis(h, dtype, x.device)[:, None, :].expand(-1, w, -1)
        pos_x = self._axis(w, dtype, x.device)[None, :, :].expand(h, -1, -1)
        return torch.cat((pos_y, pos_x), dim=2).permute(2, 0, 1).unsqueeze(0)


class SelfAttentionLayer(nn.Module):
    """Query self-attention with a residual; pre- or post-LayerNorm."""

    def __init__(self, dim: int, num_heads: int, *, pre_norm: bool) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.pre_norm = pre_norm
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, query: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
        """Args: query, query_pos: (B, Q, C). Returns: (B, Q, C)."""
        x = self.norm(query) if self.pre_norm else query
        qk = x + query_pos
        out = query + self.self_attn(qk, qk, x, need_weights=False)[0]
        return out if self.pre_norm else self.norm(out)


class FFNLayer(nn.Module):
    """Linear, ReLU, linear with a residual; pre- or post-LayerNorm."""

    def __init__(self, dim: int, hidden: int, *, pre_norm: bool) -> None:
        super().__init__()
        self.linear1 = nn.Linear(dim, hidden)
        self.linear2 = nn.Linear(hidden, dim)
        self.norm = nn.LayerNorm(dim)
        self.pre_norm = pre_norm
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, query: torch.Tensor) -> torch.Tensor:
        """Args: query: (B, Q, C). Returns: (B, Q, C)."""
        x = self.norm(query) if self.pre_norm else query
        out = query + self.linear2(F.relu(self.linear1(x)))
        return out if self.pre_norm else self.norm(out)


class LocalRepresentation(nn.Module):
    """Norm, 3x3 depthwise conv, then a per-token linear layer: the prototype candidates."""

    def __init__(self, dim: int, *, norm_cfg: dict) -> None:
        super().__init__()
        self.to_query_3x3 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.bn = _norm(norm_cfg, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: (B, C, H, W). Returns: (B, H * W, C) tokens."""
        return self.out(self.to_query_3x3(self.bn(x)).flatten(2).transpose(1, 2))


class PrototypeCrossAttention(nn.Module):
    """PEM's masked cross-attention (official ``PEM_CA``): one prototype token per query and head.

    Tokens (from :class:`LocalRepresentation` of memory + pos) and queries (LayerNorm and a
    linear layer of query + query_pos) are L2-normalised over all channels and then split into
    heads. For each (query, head), the most cosine-similar token that the previous mask prediction
    allows (mask logit >= 0) is gathered: the argmax, which carries no gradient. Then
    ``final(normalize(proj(prototype * query)) * alpha + prototype)`` is added to the input
    query (without its pos).

    Args:
        dim: Channels.
        num_heads: Heads; ``dim`` must be divisible by it.
        norm_cfg: Norm of the local representation.
        normalize_over_queries: Normalise ``proj(prototype * query)`` over dim 1 of the
            (B, Q, C) tensor, i.e. across queries, as the official code does. False normalises
            each query over its channels, the per-token L2 normalisation the layer seems meant
            to apply. Checkpoints trained officially need True.
        unmask_rule: When the previous prediction masks every token of a query.
            ``'all_queries'`` (official) lifts the mask of an image only when every query of it
            is fully masked. A single fully masked query then sees only -inf and takes token 0.
            ``'per_query'`` (Mask2Former's rule) lifts the mask of each fully masked query on
            its own.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        norm_cfg: dict,
        normalize_over_queries: bool = True,
        unmask_rule: str = 'all_queries',
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'hidden_dim {dim} is not divisible by num_heads {num_heads}')
        if unmask_rule not in UNMASK_RULES:
            raise ValueError(f'unknown unmask_rule {unmask_rule!r}; choose one of {UNMASK_RULES}')
        self.feature_proj = LocalRepresentation(dim, norm_cfg=norm_cfg)
        self.query_proj = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim))
        self.proj = nn.Linear(dim, dim)
        self.final = nn.Linear(dim, dim)
        self.alpha = nn.Parameter(torch.ones(1, 1, dim))
        self.num_heads = num_heads
        self.normalize_over_queries = normalize_over_queries
        self.unmask_rule = unmask_rule

    def select_prototypes(
        self, tokens: torch.Tensor, queries: torch.Tensor, mask_logits: torch.Tensor | None
    ) -> torch.Tensor:
        """The most similar allowed token of every (query, head).

        Args:
            tokens: (B, N, C) normalised tokens.
            queries: (B, Q, C) normalised queries.
            mask_logits: (B, Q, H, W) with H * W = N, or None; tokens with a logit < 0 are
                excluded for that query.

        Returns:
            (B, Q, C): per head, the selected token's D = C / heads channels.
        """
        b, n, c = tokens.shape
        q, heads = queries.shape[1], self.num_heads
        d = c // heads
        tokens = tokens.view(b, n, heads, d).transpose(1, 2)  # (B, h, N, D)
        sim = queries.view(b, q, heads, d).transpose(1, 2) @ tokens.transpose(2, 3)  # (B,h,Q,N)
        if mask_logits is not None:
            masked = (mask_logits.detach().flatten(2) < 0).unsqueeze(1)  # (B, 1, Q, N)
            fully = masked.all(dim=3, keepdim=True)
            if self.unmask_rule == 'all_queries':
                fully = fully.all(dim=2, keepdim=True)
            sim = sim.masked_fill(masked & ~fully, float('-inf'))
        index = sim.argmax(dim=3)  # (B, h, Q); the first index when all are -inf, as official
        picked = torch.gather(tokens, 2, index.unsqueeze(-1).expand(-1, -1, -1, d))
        return picked.transpose(1, 2).reshape(b, q, c)

    def forward(
        self,
        query: torch.Tensor,
        memory: torch.Tensor,
        pos: torch.Tensor,
        query_pos: torch.Tensor,
        mask_logits: torch.Tensor | None,
    ) -> torch.Tensor:
        """Args:
            query: (B, Q, C).
            memory: (B, C, H, W) projected pixel features (with the level embedding).
            pos: (1 or B, C, H, W) positional encoding of the memory.
            query_pos: (B, Q, C) query positional embedding.
            mask_logits: (B, Q, H, W) previous mask logits at this level's size, or None.

        Returns:
            (B, Q, C) updated queries.
        """
        tokens = F.normalize(self.feature_proj(memory + pos), dim=-1)
        queries = F.normalize(self.query_proj(query + query_pos), dim=-1)
        prototypes = self.select_prototypes(tokens, queries, mask_logits)
        dim = 1 if self.normalize_over_queries else -1
        out = F.normalize(self.proj(prototypes * queries), dim=dim) * self.alpha + prototypes
        return self.final(out) + query


class MLP(nn.Module):
    """Linear layers (``layers.i``) with ReLU between them."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_dim) -> (..., out_dim)."""
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class PEMTransformerDecoder(nn.Module):
    """PEM's transformer decoder: Mask2Former's masked decoder with prototype cross-attention.

    Learnable queries go through ``num_layers`` layers. Each layer does prototype
    cross-attention, self-attention, then an FFN. The layers cycle through the levels stride
    32, 16, 8. Before the first layer and after every layer, the LayerNorm-ed queries give class
    logits and mask embeddings. Their dot product with the mask features gives mask logits,
    which are resized to the next layer's level to restrict its prototypes.

    Args:
        in_channels: Channels of the multi-scale maps (the pixel decoder's ``conv_dim``).
        num_classes: Classes, without the no-object class.
        hidden_dim: Query width.
        num_queries: Number of queries.
        num_heads: Heads of both attentions.
        dim_feedforward: FFN hidden width.
        num_layers: Decoder layers. The official yaml's DEC_LAYERS is this plus one.
        pre_norm: Pre-LayerNorm self-attention and FFN.
        mask_dim: Channels of the mask features and mask embeddings.
        enforce_input_project: Keep the 1x1 input projections even when
            ``in_channels == hidden_dim``.
        norm_cfg: Norm of the local representation in the cross-attention.
        normalize_over_queries: See :class:`PrototypeCrossAttention`.
        unmask_rule: See :class:`PrototypeCrossAttention`.
        pos_encoding_float32: See :class:`SinePositionalEncoding` (``float32``).
    """

    num_levels = 3

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        hidden_dim: int = 256,
        num_queries: int = 100,
        num_heads: int = 8,
        dim_feedforward: int = 2048,
        num_layers: int = 6,
        pre_norm: bool = True,
        mask_dim: int = 256,
        enforce_input_project: bool = True,
        norm_cfg: dict | None = None,
        normalize_over_queries: bool = True,
        unmask_rule: str = 'all_queries',
        pos_encoding_float32: bool = True,
    ) -> None:
        super().__init__()
        norm_cfg = norm_cfg or dict(type='SyncBN', requires_grad=True)
        if hidden_dim % 2 or hidden_dim % num_heads:
            raise ValueError(
                f'hidden_dim ({hidden_dim}) must be even (sine encoding) and divisible by '
                f'num_heads ({num_heads})'
            )
        if num_layers < 1:
            raise ValueError(f'num_layers must be >= 1, got {num_layers}')
        self.num_layers = num_layers
        self.pe_layer = SinePositionalEncoding(hidden_dim // 2, float32=pos_encoding_float32)
        self.transformer_self_attention_layers = nn.ModuleList(
            SelfAttentionLayer(hidden_dim, num_heads, pre_norm=pre_norm) for _ in range(num_layers)
        )
        self.transformer_cross_attention_layers = nn.ModuleList(
            PrototypeCrossAttention(
                hidden_dim,
                num_heads,
                norm_cfg=norm_cfg,
                normalize_over_queries=normalize_over_queries,
                unmask_rule=unmask_rule,
            )
            for _ in range(num_layers)
        )
        self.transformer_ffn_layers = nn.ModuleList(
            FFNLayer(hidden_dim, dim_feedforward, pre_norm=pre_norm) for _ in range(num_layers)
        )
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.query_feat = nn.Embedding(num_queries, hidden_dim)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.level_embed = nn.Embedding(self.num_levels, hidden_dim)
        self.input_proj = nn.ModuleList()
        for _ in range(self.num_levels):
            if in_channels != hidden_dim or enforce_input_project:
                proj = nn.Conv2d(in_channels, hidden_dim, 1)
                _c2_xavier_fill(proj)
            else:
                proj = nn.Identity()
            self.input_proj.append(proj)
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)

    def predict(
        self, query: torch.Tensor, mask_features: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Class and mask logits of (B, Q, C) queries: (B, Q, K+1) and (B, Q, H_0, W_0)."""
        query = self.decoder_norm(query)
        b, c, h, w = mask_features.shape
        masks = self.mask_embed(query) @ mask_features.view(b, c, h * w)
        return self.class_embed(query), masks.view(b, -1, h, w)

    def forward(
        self, multi_scale: Sequence[torch.Tensor], mask_features: torch.Tensor
    ) -> dict[str, torch.Tensor | list[dict[str, torch.Tensor]]]:
        """Args:
            multi_scale: [stride 32, stride 16, stride 8] maps, (B, in_channels, H_i, W_i).
            mask_features: (B, mask_dim, H_0, W_0), stride 4.

        Returns:
            dict with ``pred_logits`` (B, Q, K+1) and ``pred_masks`` (B, Q, H_0, W_0) of the last
            layer, and ``aux_outputs``, a list of ``num_layers`` dicts with the same two keys:
            the prediction from the initial queries, then after each layer but the last.
        """
        if len(multi_scale) != self.num_levels:
            raise ValueError(f'expected {self.num_levels} levels, got {len(multi_scale)}')
        srcs, poss = [], []
        for i, x in enumerate(multi_scale):
            poss.append(self.pe_layer(x))
            srcs.append(self.input_proj[i](x) + self.level_embed.weight[i].view(1, -1, 1, 1))
        b = mask_features.shape[0]
        query_pos = self.query_embed.weight.unsqueeze(0).expand(b, -1, -1)
        query = self.query_feat.weight.unsqueeze(0).expand(b, -1, -1)

        predictions = [self.predict(query, mask_features)]
        for i in range(self.num_layers):
            level = i % self.num_levels
            mask_logits = F.interpolate(
                predictions[-1][1],
                size=srcs[level].shape[-2:],
                mode='bilinear',
                align_corners=False,
            )
            query = self.transformer_cross_attention_layers[i](
                query, srcs[level], poss[level], query_pos, mask_logits
            )
            query = self.transformer_self_attention_layers[i](query, query_pos)
            query = self.transformer_ffn_layers[i](query)
            predictions.append(self.predict(query, mask_features))

        return dict(
            pred_logits=predictions[-1][0],
            pred_masks=predictions[-1][1],
            aux_outputs=[dict(pred_logits=c, pred_masks=m) for c, m in predictions[:-1]],
        )


# ---------------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------------


class PEMNetwork(BaseModule):
    """Pixel decoder plus transformer decoder: backbone levels in, mask-classification logits out.

    The attributes ``pixel_decoder`` and ``predictor`` are the official head's, so the state
    dict matches the official ``MaskFormerHead``'s key for key (see :func:`convert_official`).

    Args:
        in_channels: Backbone channels of res2..res5.
        num_classes: Classes, without the no-object class.
        conv_dim: Pixel-decoder width (the transformer's input channels).
        mask_dim: Mask feature / embedding channels.
        norm_cfg: Norm of every conv block and of the cross-attention's local representation.
        hidden_dim, num_queries, num_heads, dim_feedforward, num_layers, pre_norm,
            enforce_input_project: See :class:`PEMTransformerDecoder`.
        dcn_impl: ``'torchvision'`` or ``'pytorch'`` (export); see :class:`ModulatedDeformConv`.
        csm_double_sigmoid: Official double sigmoid in :class:`CSM`.
        normalize_over_queries: Official query-axis normalisation in
            :class:`PrototypeCrossAttention`.
        unmask_rule: ``'all_queries'`` (official) or ``'per_query'`` (Mask2Former).
        pos_encoding_float32: Official float32 positional encoding.
        init_cfg: mmengine init config (e.g. ``Pretrained``). Without it, the official init is
            applied at construction.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        *,
        conv_dim: int = 128,
        mask_dim: int = 256,
        norm_cfg: dict | None = None,
        hidden_dim: int = 256,
        num_queries: int = 100,
        num_heads: int = 8,
        dim_feedforward: int = 2048,
        num_layers: int = 6,
        pre_norm: bool = True,
        enforce_input_project: bool = True,
        dcn_impl: str = 'torchvision',
        csm_double_sigmoid: bool = True,
        normalize_over_queries: bool = True,
        unmask_rule: str = 'all_queries',
        pos_encoding_float32: bool = True,
        init_cfg: dict | None = None,
    ) -> None:
        super().__init__(init_cfg=init_cfg)
        norm_cfg = norm_cfg or dict(type='SyncBN', requires_grad=True)
        self.pixel_decoder = PEMPixelDecoder(
            in_channels,
            conv_dim=conv_dim,
            mask_dim=mask_dim,
            norm_cfg=norm_cfg,
            dcn_impl=dcn_impl,
            csm_double_sigmoid=csm_double_sigmoid,
        )
        self.predictor = PEMTransformerDecoder(
            conv_dim,
            num_classes,
            hidden_dim=hidden_dim,
            num_queries=num_queries,
            num_heads=num_heads,
            dim_feedforward=dim_feedforward,
            num_layers=num_layers,
            pre_norm=pre_norm,
            mask_dim=mask_dim,
            enforce_input_project=enforce_input_project,
            norm_cfg=norm_cfg,
            normalize_over_queries=normalize_over_queries,
            unmask_rule=unmask_rule,
            pos_encoding_float32=pos_encoding_float32,
        )

    def forward(
        self, feats: Sequence[torch.Tensor]
    ) -> dict[str, torch.Tensor | list[dict[str, torch.Tensor]]]:
        """Args:
            feats: res2..res5 backbone maps, (B, C_i, H/s_i, W/s_i) for strides 4, 8, 16, 32
                of the padded input (pad to a multiple of 32).

        Returns:
            dict: ``pred_logits`` (B, Q, K+1), the last class is no-object; ``pred_masks``
            (B, Q, H/4, W/4) mask logits; ``aux_outputs``, a list of ``num_layers`` dicts with
            both keys, in the official order (initial queries first).
        """
        mask_features, multi_scale = self.pixel_decoder(feats)
        return self.predictor(multi_scale, mask_features)


# ---------------------------------------------------------------------------------------------
# Official checkpoint conversion
# ---------------------------------------------------------------------------------------------

_HEAD_PREFIXES = ('pixel_decoder.', 'predictor.')


def convert_official(
    state_dict: dict[str, torch.Tensor], prefix: str = ''
) -> dict[str, torch.Tensor]:
    """Official PEM head weights in :class:`PEMNetwork`'s layout, under ``prefix``.

    Accepted forms: the head's own state dict (``pixel_decoder.*``, ``predictor.*``); a
    detectron2 model state dict, with the head under ``sem_seg_head.``; or a detectron2
    checkpoint file's contents (``{'model': ...}``, numpy arrays allowed). Head parameters keep
    their official names. The only renames are dropping ``sem_seg_head.`` and the Mask2Former
    v1 name ``static_query``, which becomes ``query_feat``. Every other key (``backbone.*``,
    ``pixel_mean``, ...) is returned unchanged and without ``prefix``, for the caller to map.
    """
    for wrapper in ('model', 'state_dict'):
        if isinstance(state_dict.get(wrapper), dict):
            state_dict = state_dict[wrapper]
            break
    out = {}
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            value = torch.as_tensor(value)
        new = key.removeprefix('sem_seg_head.')
        if new.startswith(_HEAD_PREFIXES):
            out[prefix + new.replace('.static_query.', '.query_feat.')] = value
        else:
            out[key] = value
    return out


# ---------------------------------------------------------------------------------------------
# The registered head (mmseg decode head and mmdet panoptic head)
# ---------------------------------------------------------------------------------------------


@MODELS.register_module()
class PEMHead(MaskClassificationHead):
    """PEM as a decode head (mmseg, semantic) and a panoptic head (mmdet, panoptic).

    Holds the official head's ``pixel_decoder`` and ``predictor`` (state-dict keys as the
    official ``MaskFormerHead``'s, under this head's prefix) and the Mask2Former criterion. Masks
    are independent sigmoids; semantic inference is ``einsum(softmax(class)[:-1], sigmoid(mask))``
    and panoptic merging is Mask2Former's (``effvision.MaskClassificationFusionHead`` with
    ``rule='maskformer'``), as the official ``MaskFormer`` meta-architecture does.

    Args:
        in_channels: Backbone channels of the four levels at strides 4, 8, 16, 32.
        num_classes: Classes without no-object (things first for panoptic use).
        num_things_classes, num_stuff_classes: Panoptic class split, or None (semantic).
        loss: Criterion config (``Mask2FormerCriterion``; ``num_classes`` is filled in).
        network: :class:`PEMNetwork` keyword arguments (widths, queries, layers, ``dcn_impl``,
            the official-quirk switches); defaults are the published head.
        norm_cfg: Norm of the network's conv blocks (official SyncBN; BN for one process).
        **kwargs: See :class:`MaskClassificationHead` (``ignore_index``, ``in_index``, ...).
    """

    mask_activation = 'sigmoid'

    def __init__(
        self,
        *,
        in_channels: Sequence[int],
        num_classes: int,
        num_things_classes: int | None = None,
        num_stuff_classes: int | None = None,
        loss: dict | None = None,
        network: dict | None = None,
        norm_cfg: dict | None = None,
        **kwargs,
    ) -> None:
        super().__init__(
            num_classes=num_classes,
            num_things_classes=num_things_classes,
            num_stuff_classes=num_stuff_classes,
            **kwargs,
        )
        net = PEMNetwork(in_channels, num_classes, norm_cfg=norm_cfg, **dict(network or {}))
        self.pixel_decoder = net.pixel_decoder
        self.predictor = net.predictor
        self.build_criterion(loss or dict(type='effvision.Mask2FormerCriterion'))

    def forward(self, inputs: Sequence[torch.Tensor]) -> dict:
        """Class and mask logits of every decoder layer.

        Args:
            inputs: Backbone features NCHW at strides 4, 8, 16, 32 (after ``in_index``).

        Returns:
            ``pred_logits`` (B, Q, K+1), ``pred_masks`` (B, Q, H/4, W/4) and ``aux_outputs``.
        """
        mask_features, multi_scale = self.pixel_decoder(self.select_inputs(inputs))
        return self.predictor(multi_scale, mask_features)
