"""The synthetic shapes dataset: semantic (ADE20K layout) and panoptic (COCO layout, mmdet)."""

from __future__ import annotations

import json
from pathlib import Path

from mmdet.datasets import CocoPanopticDataset
from mmseg.datasets import BaseSegDataset

from effvision.registry import DATASETS

from .synthetic import CLASSES, PALETTE, STUFF_CLASSES, THING_CLASSES


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


def _check_generator_version(data_root: str, minimum: tuple[int, int]) -> None:
    """Refuses a synthetic set written by a generator older than ``minimum``."""
    meta_file = Path(data_root or '.') / 'meta.json'
    if not meta_file.is_file():
        return  # not a generated root (e.g. a hand-made folder in a test): nothing to check
    version = json.loads(meta_file.read_text()).get('generator_version', '0.0')
    if tuple(int(v) for v in version.split('.')) < minimum:
        raise ValueError(
            f'{data_root} was written by shapes generator {version}, whose panoptic JSON lists '
            f'stuff before things (wrong labels for mmdet); regenerate it with '
            f'`python tools/dataset_converters/make_shapes.py --out {data_root} --force`'
        )


@DATASETS.register_module()
class ShapesPanopticDataset(CocoPanopticDataset):
    """The synthetic shapes set as COCO panoptic data (mmdet), things first.

    mmdet numbers the classes in the order of the JSON's categories and wants thing labels below
    stuff labels; generator 1.1 writes them so (cars ... cones = 0-4, sky ... road = 5-8), and an
    older set is refused with the command that rewrites it.
    """

    METAINFO = dict(
        classes=THING_CLASSES + STUFF_CLASSES,
        thing_classes=THING_CLASSES,
        stuff_classes=STUFF_CLASSES,
        palette=[list(PALETTE[CLASSES.index(name)]) for name in THING_CLASSES + STUFF_CLASSES],
    )

    def load_data_list(self) -> list[dict]:
        _check_generator_version(self.data_root, (1, 1))
        return super().load_data_list()
