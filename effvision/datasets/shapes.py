"""The synthetic shapes dataset for semantic segmentation (ADE20K layout)."""

from __future__ import annotations

from mmseg.datasets import BaseSegDataset

from effvision.registry import DATASETS

from .synthetic import CLASSES, PALETTE


@DATASETS.register_module()
class ShapesDataset(BaseSegDataset):
    """Street-scene-like synthetic images written by ``tools/dataset_converters/make_shapes.py``.

    Images and label maps are PNGs with the same file names under ``images/<split>/`` and
    ``annotations/<split>/``. Label maps hold class ids ``0..8`` directly (no zero label to
    reduce) and 255 for ignore; see :mod:`effvision.datasets.synthetic` for the other formats
    written alongside (COCO instances, COCO panoptic).

    Args:
        img_suffix: Suffix of the images.
        seg_map_suffix: Suffix of the label maps.
        reduce_zero_label: Must stay False: class 0 (sky) is a real class.
        **kwargs: Passed to :class:`mmseg.datasets.BaseSegDataset`.
    """

    METAINFO = dict(classes=CLASSES, palette=[list(color) for color in PALETTE])

    def __init__(
        self,
        img_suffix: str = '.png',
        seg_map_suffix: str = '.png',
        reduce_zero_label: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(
            img_suffix=img_suffix,
            seg_map_suffix=seg_map_suffix,
            reduce_zero_label=reduce_zero_label,
            **kwargs,
        )
