"""mmdet's ResNet that also returns its stem feature, for kMaX-DeepLab's five-stage decoder.

kMaX-DeepLab's Cityscapes models (bytedance/kmax-deeplab ``configs/cityscapes/
panoptic_segmentation/kmax_r50.yaml``: ``OUT_FEATURES: [stem, res2, res3, res4, res5]``) add a
fifth pixel-decoder stage fed by the ResNet stem: the 64-channel map after the max-pool, at
stride 4 like res2. mmdet's :class:`~mmdet.models.backbones.ResNet` has no way to return it;
this subclass does, with the same weights (its state dict is mmdet's ResNet's), so
``torchvision://resnet50`` and mmdet checkpoints load unchanged.
"""

from __future__ import annotations

from mmdet.models.backbones import ResNet
from torch import Tensor

from effvision.registry import MODELS


@MODELS.register_module()
class ResNetWithStem(ResNet):
    """mmdet's ResNet whose outputs also include the stem feature (after the max-pool).

    The stem feature (B, stem_channels, H/4, W/4) is inserted at ``stem_out_position`` among the
    stage outputs. The default 1 gives ``[res2, stem, res3, res4, res5]`` with
    ``out_indices=(0, 1, 2, 3)``: the order kMaX-DeepLab's official code feeds its decoder (it
    sorts features by stride, and its stride-4 stem lands after res2 there), which is what
    official Cityscapes checkpoints were trained with; pair it with
    ``in_channels=(256, 64, 512, 1024, 2048)`` in :class:`~effvision.models.decode_heads.KMaXHead`.

    Args:
        stem_out_position: Index of the stem feature in the returned tuple (0 to
            ``len(out_indices)``).
        **kwargs: mmdet ``ResNet`` arguments (``depth``, ``out_indices``, ``norm_cfg``, ...).
    """

    def __init__(self, *, stem_out_position: int = 1, **kwargs) -> None:
        super().__init__(**kwargs)
        if not 0 <= stem_out_position <= len(self.out_indices):
            raise ValueError(
                f'stem_out_position must be in [0, {len(self.out_indices)}] (the number of '
                f'stage outputs, out_indices={self.out_indices}); got {stem_out_position}'
            )
        self.stem_out_position = stem_out_position

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        """Runs the stem and the stages.

        Args:
            x: Images (B, 3, H, W).

        Returns:
            The stage outputs selected by ``out_indices`` ((B, C_i, H/s_i, W/s_i), strides 4,
            8, 16, 32) with the stem feature (B, stem_channels, H/4, W/4) inserted at
            ``stem_out_position``.
        """
        if self.deep_stem:
            x = self.stem(x)
        else:
            x = self.relu(self.norm1(self.conv1(x)))
        x = stem = self.maxpool(x)
        outs = []
        for i, name in enumerate(self.res_layers):
            x = getattr(self, name)(x)
            if i in self.out_indices:
                outs.append(x)
        outs.insert(self.stem_out_position, stem)
        return tuple(outs)
