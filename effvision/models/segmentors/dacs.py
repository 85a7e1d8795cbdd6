"""DACS self-training as DAFormer configures it, on mmengine: unsupervised domain adaptation.

Hoyer et al., "DAFormer", CVPR 2022 (lhoyer/DAFormer ``mmseg/models/uda/dacs.py``), built on
Tranheden et al., "DACS: Domain Adaptation via Cross-domain Mixed Sampling", WACV 2021; the
optional masked image consistency is from Hoyer et al., "MIC", CVPR 2023 (lhoyer/MIC).

One training iteration (``train_step``), as the official loop does it:

1. EMA teacher: copy of the student at the first iteration, then
   ``teacher = a * teacher + (1 - a) * student`` on parameters only (buffers are not averaged),
   ``a = min(1 - 1 / (t + 1), alpha)``.
2. Supervised loss on the source batch; backward (graph kept when the feature distance follows).
3. ImageNet feature distance (optional): L2 distance between the student's last backbone feature
   and a frozen copy of the initial (ImageNet) backbone's, on cells whose downscaled source label
   is a thing class covering ``imnet_feature_dist_scale_min_ratio`` of the cell; weighted by
   ``imnet_feature_dist_lambda``; its own backward.
4. Pseudo-labels: the teacher (train mode, so batch-norm uses batch statistics; dropout and drop
   path off) predicts the target batch; the arg-max is the label and the fraction of pixels whose
   top probability reaches ``pseudo_threshold`` is one weight for every pixel of the batch; rows
   at the top and bottom can be given weight 0.
5. ClassMix: per image, half of the classes in the batch's source labels are pasted onto the
   target image (labels and weights likewise, source pixels weigh 1), then colour jitter and
   blur; weighted loss on the mixed batch; its own backward.
6. (MIC, off by default) loss on colour-augmented target images with random patches masked,
   against the same pseudo-labels and weights; its own backward.
7. One optimizer step.

The student is what ``predict`` (validation, testing) uses, as in the official evaluation.
Differences from the official code: all random numbers come from one ``torch.Generator`` saved
in the checkpoint (the official code mixes Python's, numpy's and PyTorch's global generators);
the feature distance is 0 instead of NaN for a batch without thing-class cells; the teacher's
prediction runs without autograd (same numbers, less memory); no debug images. Single process
only, like the official code (an EMA teacher with batch statistics differs per rank under DDP).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from mmcv.cnn.bricks.drop import DropPath as MMCVDropPath
from mmengine.optim import OptimWrapper
from mmengine.structures import PixelData
from mmseg.models.segmentors.base import BaseSegmentor
from mmseg.structures import SegDataSample
from timm.layers import DropPath as TimmDropPath
from torch import nn
from torch.nn.modules.dropout import _DropoutNd

from effvision.registry import MODELS

from .uda_augment import (
    block_mask,
    class_mix_masks,
    downscale_label_ratio,
    mix,
    strong_transform,
)

_RANDOM_LAYERS = (_DropoutNd, TimmDropPath, MMCVDropPath)
_MIC_KEYS = {'mask_ratio', 'block_size', 'loss_weight', 'color_aug'}


class _FixedPixelWeights:
    """Stands in for a decode head's pixel sampler: returns the given per-pixel loss weights."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight

    def sample(self, seg_logits: torch.Tensor, seg_label: torch.Tensor) -> torch.Tensor:
        expected = seg_label.shape[:1] + seg_label.shape[2:]
        if self.weight.shape != expected:
            raise ValueError(f'pixel weights {tuple(self.weight.shape)} != labels {expected}')
        return self.weight


@contextlib.contextmanager
def pixel_weights(segmentor: nn.Module, weight: torch.Tensor) -> Iterator[None]:
    """Within the block, every decode head of ``segmentor`` weighs its loss per pixel.

    mmseg's ``BaseDecodeHead.loss_by_feat`` passes its pixel sampler's weights to the losses;
    the sampler is replaced by ``weight`` (B, H, W) for the duration. With mmseg's default
    ``avg_non_ignore=False`` the mean runs over all pixels, zero-weight ones included, as in the
    mmseg 0.16 that DAFormer used.
    """
    heads = [segmentor.decode_head]
    if getattr(segmentor, 'with_auxiliary_head', False):
        aux = segmentor.auxiliary_head
        heads.extend(aux if isinstance(aux, nn.ModuleList) else [aux])
    for head in heads:
        if not hasattr(head, 'sampler'):
            raise TypeError(
                f'{type(head).__name__} has no pixel sampler: UDA pixel weights need a head '
                'derived from mmseg.models.decode_heads.decode_head.BaseDecodeHead'
            )
    saved = [head.sampler for head in heads]
    try:
        for head in heads:
            head.sampler = _FixedPixelWeights(weight)
        yield
    finally:
        for head, sampler in zip(heads, saved):
            head.sampler = sampler


def _prefixed(log_vars: dict, prefix: str) -> dict:
    return {f'{prefix}.{k}': v for k, v in log_vars.items() if k != 'loss'}


@MODELS.register_module()
class DACS(BaseSegmentor):
    """Domain-adaptive self-training around a segmentor (DAFormer's ``DACS``).

    Args:
        model: Config of the segmentor to adapt (an mmseg ``EncoderDecoder``); the student,
            the EMA teacher and the frozen ImageNet copy are three instances of it.
        data_preprocessor: Normally ``UDADataPreProcessor``; the inner ``model`` must not have
            its own.
        alpha: EMA teacher momentum (DAFormer 0.999, DACS 0.99).
        pseudo_threshold: Confidence for the pseudo-label weight (0.968).
        pseudo_weight_ignore_top: Rows at the top of the target crop whose weight is 0.
        pseudo_weight_ignore_bottom: Rows at the bottom whose weight is 0.
        imnet_feature_dist_lambda: Weight of the ImageNet feature distance; 0 disables it (and
            the frozen copy).
        imnet_feature_dist_classes: Classes whose cells count (DAFormer: the Cityscapes things
            ``[6, 7, 11, ..., 18]``); None uses every cell.
        imnet_feature_dist_scale_min_ratio: Minimum share of a cell its majority class needs.
        mix: Only ``'class'`` (ClassMix).
        blur: Blur the mixed images (with probability 0.5 per iteration).
        color_jitter_strength: Jitter range ``s`` of brightness/contrast/saturation/hue.
        color_jitter_probability: Jitter is applied when a uniform draw exceeds this (0.2).
        mask_consistency: MIC's masked image consistency, e.g. ``dict(mask_ratio=0.7,
            block_size=64, loss_weight=1.0, color_aug=True)``; None (default) disables it.
        seed: Seed of the generator behind mixing, jitter, blur and masks; None takes
            ``torch.initial_seed()`` (mmengine's ``randomness.seed``).
        init_cfg: Unused: the inner model initialises itself; the teacher and the frozen copy
            start as copies of it.
    """

    def __init__(
        self,
        model: dict,
        data_preprocessor: dict | None = None,
        *,
        alpha: float = 0.99,
        pseudo_threshold: float = 0.968,
        pseudo_weight_ignore_top: int = 0,
        pseudo_weight_ignore_bottom: int = 0,
        imnet_feature_dist_lambda: float = 0.0,
        imnet_feature_dist_classes: Sequence[int] | None = None,
        imnet_feature_dist_scale_min_ratio: float | None = None,
        mix: str = 'class',
        blur: bool = True,
        color_jitter_strength: float = 0.2,
        color_jitter_probability: float = 0.2,
        mask_consistency: dict | None = None,
        seed: int | None = None,
        init_cfg: dict | None = None,
    ) -> None:
        super().__init__(data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        if not isinstance(model, dict) or 'type' not in model:
            raise TypeError('DACS needs model=dict(type=..., ...), the segmentor to adapt')
        if model.get('data_preprocessor') is not None:
            raise ValueError(
                'set data_preprocessor on the DACS model (type=UDADataPreProcessor), '
                'not inside its model'
            )
        if mix != 'class':
            raise ValueError(f"only mix='class' (ClassMix) is implemented, got {mix!r}")
        if not 0 <= alpha < 1:
            raise ValueError(f'alpha must be in [0, 1), got {alpha}')
        if imnet_feature_dist_classes is not None and imnet_feature_dist_scale_min_ratio is None:
            raise ValueError(
                'imnet_feature_dist_classes needs imnet_feature_dist_scale_min_ratio (0.75)'
            )
        if mask_consistency is not None:
            unknown = set(mask_consistency) - _MIC_KEYS
            if unknown:
                raise ValueError(
                    f'unknown mask_consistency keys {sorted(unknown)}; known: {sorted(_MIC_KEYS)}'
                )
            mask_consistency = dict(
                dict(mask_ratio=0.7, block_size=64, loss_weight=1.0, color_aug=True),
                **mask_consistency,
            )
        self.model = MODELS.build(copy.deepcopy(model))
        self.ema_model = MODELS.build(copy.deepcopy(model))
        self.ema_model.requires_grad_(False)
        self.imnet_model = None
        if imnet_feature_dist_lambda > 0:
            self.imnet_model = MODELS.build(copy.deepcopy(model))
            self.imnet_model.requires_grad_(False)
        self.alpha = alpha
        self.pseudo_threshold = pseudo_threshold
        self.ignore_top = pseudo_weight_ignore_top
        self.ignore_bottom = pseudo_weight_ignore_bottom
        self.fdist_lambda = imnet_feature_dist_lambda
        self.fdist_classes = (
            None if imnet_feature_dist_classes is None else list(imnet_feature_dist_classes)
        )
        self.fdist_min_ratio = imnet_feature_dist_scale_min_ratio
        self.blur = blur
        self.jitter_strength = color_jitter_strength
        self.jitter_probability = color_jitter_probability
        self.mask_consistency = mask_consistency
        self.generator = torch.Generator().manual_seed(
            torch.initial_seed() if seed is None else seed
        )
        self.register_buffer('local_iter', torch.zeros((), dtype=torch.long))

    # ----------------------------------------------------------------- state
    def get_extra_state(self) -> dict:
        return dict(generator=self.generator.get_state())

    def set_extra_state(self, state: dict) -> None:
        self.generator.set_state(state['generator'])

    def init_weights(self) -> None:
        """Initialises the student; the teacher and the frozen copy start as exact copies."""
        self.model.init_weights()
        state = self.model.state_dict()
        self.ema_model.load_state_dict(state)
        if self.imnet_model is not None:
            self.imnet_model.load_state_dict(state)

    def train(self, mode: bool = True) -> DACS:
        """The teacher trains (batch statistics) without dropout; the frozen copy is in eval."""
        super().train(mode)
        if mode:
            for module in self.ema_model.modules():
                if isinstance(module, _RANDOM_LAYERS):
                    module.training = False
        if self.imnet_model is not None:
            self.imnet_model.eval()
        return self

    @torch.no_grad()
    def update_teacher(self) -> None:
        """Step 1: the first call copies the student, later ones average parameters."""
        step = int(self.local_iter)
        pairs = zip(self.ema_model.parameters(), self.model.parameters())
        if step == 0:
            for teacher, student in pairs:
                teacher.copy_(student)
            return
        alpha = min(1 - 1 / (step + 1), self.alpha)
        for teacher, student in pairs:
            teacher.copy_(alpha * teacher + (1 - alpha) * student)

    # -------------------------------------------------------------- training
    def train_step(self, data: dict, optim_wrapper: OptimWrapper) -> dict[str, torch.Tensor]:
        """One DACS iteration: up to four backward passes, then one optimizer step.

        Args:
            data: A UDA batch (``inputs``, ``data_samples``, ``target_inputs``,
                ``target_data_samples``), see :class:`effvision.datasets.UDADataset`.
            optim_wrapper: The runner's optimizer wrapper (no gradient accumulation).

        Returns:
            The logged values: the source losses (``decode.loss_ce``, ``decode.acc_seg``, ...),
            ``src.loss_imnet_feat_dist``, ``mix.*``, ``masked.*``, the pseudo-label weight
            ``pseudo_weight`` and their sum ``loss``.
        """
        if getattr(optim_wrapper, '_accumulative_counts', 1) != 1:
            raise ValueError('DACS does not support accumulative_counts > 1 in optim_wrapper')
        data = self.data_preprocessor(data, True)
        if 'target_inputs' not in data:
            raise KeyError(
                'DACS trains on source + target batches: use UDADataset as the train dataset and '
                'UDADataPreProcessor as the data preprocessor'
            )
        self.update_teacher()
        gen = self.generator
        jitter = bool(torch.rand(1, generator=gen) > self.jitter_probability)
        blur = self.blur and bool(torch.rand(1, generator=gen) > 0.5)

        src, src_samples = data['inputs'], data['data_samples']
        tgt, tgt_samples = data['target_inputs'], data['target_data_samples']
        gt = torch.stack([s.gt_sem_seg.data for s in src_samples]).long()
        total = []

        # 2. source
        with optim_wrapper.optim_context(self):
            feats = self.model.extract_feat(src)
            losses = self.model._decode_head_forward_train(feats, src_samples)
            if self.model.with_auxiliary_head:
                losses.update(self.model._auxiliary_head_forward_train(feats, src_samples))
        loss, log_vars = self.parse_losses(losses)
        optim_wrapper.backward(loss, retain_graph=self.imnet_model is not None)
        total.append(loss.detach())
        log_vars.pop('loss')

        # 3. ImageNet feature distance
        if self.imnet_model is not None:
            with optim_wrapper.optim_context(self):
                fd_loss = self.fdist_lambda * self.feature_distance(src, gt, feats[-1])
            optim_wrapper.backward(fd_loss)
            total.append(fd_loss.detach())
            log_vars['src.loss_imnet_feat_dist'] = fd_loss.detach()
        del feats, loss

        # 4. pseudo-labels
        label, confident = self.pseudo_label(tgt)
        weight = torch.full(label.shape, confident, device=label.device)
        log_vars['pseudo_weight'] = torch.tensor(confident)
        if self.ignore_top > 0:
            weight[:, : self.ignore_top] = 0
        if self.ignore_bottom > 0:
            weight[:, -self.ignore_bottom :] = 0

        # 5. ClassMix + strong augmentation
        masks = class_mix_masks(gt, gen).to(src.device)
        mean, std = self._normalization(src)
        mixed_img, mixed_label, mixed_weight = [], [], []
        for i in range(src.shape[0]):
            img = mix(masks[i], src[i], tgt[i])[None]
            mixed_img.append(
                strong_transform(
                    img,
                    mean,
                    std,
                    jitter=jitter,
                    blur=blur,
                    jitter_strength=self.jitter_strength,
                    generator=gen,
                )
            )
            mixed_label.append(mix(masks[i][0], gt[i][0], label[i]).long())
            mixed_weight.append(mix(masks[i][0], torch.ones_like(weight[i]), weight[i]))
        mix_losses = self._weighted_loss(
            torch.cat(mixed_img),
            self._with_labels(src_samples, mixed_label),
            torch.stack(mixed_weight),
            optim_wrapper,
        )
        loss, mix_log = self.parse_losses(mix_losses)
        optim_wrapper.backward(loss)
        total.append(loss.detach())
        log_vars.update(_prefixed(mix_log, 'mix'))

        # 6. MIC
        if self.mask_consistency is not None:
            cfg = self.mask_consistency
            masked = tgt
            if cfg['color_aug']:
                masked = strong_transform(
                    tgt.clone(),
                    mean,
                    std,
                    jitter=bool(torch.rand(1, generator=gen) > self.jitter_probability),
                    blur=bool(torch.rand(1, generator=gen) > 0.5),
                    jitter_strength=self.jitter_strength,
                    generator=gen,
                )
            keep = block_mask(tuple(tgt.shape), cfg['mask_ratio'], cfg['block_size'], gen)
            masked_losses = self._weighted_loss(
                masked * keep.to(masked),
                self._with_labels(tgt_samples, list(label)),
                weight,
                optim_wrapper,
            )
            masked_losses = {
                k: v * cfg['loss_weight'] if 'loss' in k else v for k, v in masked_losses.items()
            }
            loss, masked_log = self.parse_losses(masked_losses)
            optim_wrapper.backward(loss)
            total.append(loss.detach())
            log_vars.update(_prefixed(masked_log, 'masked'))

        # 7. one step
        optim_wrapper.step()
        optim_wrapper.zero_grad()
        self.local_iter += 1
        log_vars['loss'] = torch.stack(total).sum()
        return log_vars

    def feature_distance(
        self, inputs: torch.Tensor, gt: torch.Tensor, feat: torch.Tensor
    ) -> torch.Tensor:
        """Mean L2 distance to the frozen copy's last feature, on thing-class cells.

        Args:
            inputs: (B, 3, H, W) normalised source images.
            gt: (B, 1, H, W) source labels.
            feat: (B, C, h, w) the student's last backbone (+neck) feature.

        Returns:
            A scalar (without the lambda weight).
        """
        with torch.no_grad():
            reference = self.imnet_model.extract_feat(inputs)[-1]
        dist = torch.norm(feat - reference, dim=1, p=2)
        if self.fdist_classes is not None:
            head = self.model.decode_head
            factor = gt.shape[-1] // feat.shape[-1]
            cells = downscale_label_ratio(
                gt, factor, self.fdist_min_ratio, head.num_classes, head.ignore_index
            )
            if cells.shape[-2:] != feat.shape[-2:]:
                raise ValueError(
                    f'labels {tuple(gt.shape[-2:])} do not pool onto the feature grid '
                    f'{tuple(feat.shape[-2:])}: use crops divisible by the backbone stride'
                )
            classes = torch.tensor(self.fdist_classes, device=gt.device)
            dist = dist[torch.isin(cells[:, 0], classes)]
        if dist.numel() == 0:  # the official mean would be NaN
            return feat.sum() * 0
        return dist.mean()

    @torch.no_grad()
    def pseudo_label(self, target: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The teacher's arg-max labels (B, H, W) and the batch's confident-pixel fraction."""
        teacher = self.ema_model
        logits = teacher.decode_head(teacher.extract_feat(target))
        logits = F.interpolate(
            logits,
            size=target.shape[2:],
            mode='bilinear',
            align_corners=teacher.decode_head.align_corners,
        )
        prob, label = torch.softmax(logits, dim=1).max(dim=1)
        return label, (prob >= self.pseudo_threshold).sum().item() / label.numel()

    def _normalization(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The preprocessor's RGB mean and std (0..255 scale), which the jitter undoes."""
        pre = self.data_preprocessor
        if not getattr(pre, '_enable_normalize', False):
            return like.new_zeros(3), like.new_ones(3)
        return pre.mean.flatten(), pre.std.flatten()

    def _with_labels(
        self, samples: Sequence[SegDataSample], labels: Sequence[torch.Tensor]
    ) -> list[SegDataSample]:
        out = []
        for sample, label in zip(samples, labels):
            new = SegDataSample(metainfo=sample.metainfo)
            new.gt_sem_seg = PixelData(data=label.reshape(1, *label.shape[-2:]).long())
            out.append(new)
        return out

    def _weighted_loss(self, inputs, samples, weight, optim_wrapper) -> dict:
        with optim_wrapper.optim_context(self), pixel_weights(self.model, weight):
            return self.model.loss(inputs, samples)

    # ------------------------------------------------------ the student's face
    def extract_feat(self, inputs: torch.Tensor) -> list[torch.Tensor]:
        return self.model.extract_feat(inputs)

    def encode_decode(self, inputs: torch.Tensor, batch_img_metas: list[dict]) -> torch.Tensor:
        return self.model.encode_decode(inputs, batch_img_metas)

    def loss(self, inputs: torch.Tensor, data_samples: list) -> dict:
        raise NotImplementedError(
            'DACS trains through train_step (several backward passes per iteration); run it '
            'with mmengine Runner or call model.train_step(data, optim_wrapper)'
        )

    def predict(self, inputs: torch.Tensor, data_samples: list | None = None) -> list:
        """The student's predictions (what the official evaluation reports)."""
        return self.model.predict(inputs, data_samples)

    def _forward(self, inputs: torch.Tensor, data_samples: list | None = None):
        return self.model._forward(inputs, data_samples)
