"""SYNTHIA-RAND-CITYSCAPES (Ros et al. 2016) with Cityscapes' 19 train classes.

The source domain of DAFormer's SYNTHIA -> Cityscapes adaptation (Hoyer et al. 2022, official
code lhoyer/DAFormer: ``mmseg/datasets/synthia.py``, ``tools/convert_datasets/synthia.py``).
SYNTHIA's label maps (``GT/LABELS/<name>.png``) are 16-bit, 3-channel PNGs whose first channel
holds SYNTHIA's own class id; ``tools/dataset_converters/synthia.py`` maps those to Cityscapes
train ids (``GT/LABELS/<name>_labelTrainIds.png``) and writes the class statistics that rare class
sampling reads. SYNTHIA has no terrain, truck or train, so those train ids never occur, and
results are reported on 16 (and 13) classes: :data:`SYNTHIA_CLASS_SUBSETS`.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from effvision.registry import DATASETS

from .class_stats import TrainIdDataset, convert_label_maps, write_class_stats

# SYNTHIA class id -> Cityscapes train id, per the official converter (itself after SYNTHIA's
# README). SYNTHIA never uses 16 (terrain), 18 (truck) or 20 (train); kept for completeness.
SYNTHIA_ID_TO_TRAIN_ID = {
    3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 16: 9,
    1: 10, 10: 11, 17: 12, 8: 13, 18: 14, 19: 15, 20: 16, 12: 17, 11: 18,
}  # fmt: skip

# The UDA convention for SYNTHIA -> Cityscapes: mIoU over the 16 classes SYNTHIA labels (all but
# terrain 9, truck 14, train 16; DAFormer README), and over 13 (also without wall 3, fence 4,
# pole 5), with the same lists as YanchaoYang/FDA's evaluation_multi.py and later UDA code.
SYNTHIA_CLASS_SUBSETS = dict(
    mIoU16=(0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18),
    mIoU13=(0, 1, 2, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18),
)


def read_synthia_label(path: str) -> np.ndarray:
    """A SYNTHIA label map as its (H, W) class ids: the file's first channel, at 16 bits."""
    label = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if label is None:
        raise ValueError(f'{path}: not a readable image')
    if label.ndim == 2:
        return label
    # OpenCV orders channels B, G, R(, A): the file's first channel is index 2 (the official
    # converter's ``[:, :, -1]`` of a 3-channel map).
    return label[:, :, 2]


def convert_synthia(
    data_root: str | Path,
    *,
    label_dir: str = 'GT/LABELS',
    out_dir: str | Path | None = None,
    nproc: int = 1,
) -> list[dict]:
    """Write train-id maps next to SYNTHIA's label maps and the class statistics into ``out_dir``.

    Args:
        data_root: The SYNTHIA-RAND-CITYSCAPES root (holding ``RGB/`` and ``GT/LABELS/``).
        label_dir: Label folder, relative to ``data_root``.
        out_dir: Where the statistics go; defaults to ``data_root``, where
            :class:`~effvision.datasets.UDADataset` looks for them.
        nproc: Worker processes.

    Returns:
        The per-image class statistics written.
    """
    label_dir = Path(data_root) / label_dir
    stats = convert_label_maps(label_dir, read_synthia_label, SYNTHIA_ID_TO_TRAIN_ID, nproc=nproc)
    write_class_stats(stats, data_root if out_dir is None else out_dir)
    return stats


@DATASETS.register_module()
class SynthiaDataset(TrainIdDataset):
    """SYNTHIA-RAND-CITYSCAPES images with Cityscapes' 19 classes and palette.

    Layout (``data_prefix=dict(img_path='RGB', seg_map_path='GT/LABELS')``)::

        data/synthia/RGB/0000000.png
        data/synthia/GT/LABELS/0000000.png                  SYNTHIA's own map (16-bit)
        data/synthia/GT/LABELS/0000000_labelTrainIds.png    our converter's train ids

    The train-id maps are written by ``tools/dataset_converters/synthia.py``.

    Args:
        img_suffix: Suffix of the images.
        seg_map_suffix: Suffix of the converted label maps.
        **kwargs: Passed to :class:`~effvision.datasets.class_stats.TrainIdDataset` (and
            mmseg's ``BaseSegDataset``).
    """

    CONVERTER = 'python tools/dataset_converters/synthia.py {data_root}'
