"""GTA5 ("Playing for Data", Richter et al. 2016) with Cityscapes' 19 train classes.

The source domain of DAFormer's GTA5 -> Cityscapes adaptation (Hoyer et al. 2022, official code
lhoyer/DAFormer: ``mmseg/datasets/gta.py``, ``tools/convert_datasets/gta.py``). GTA5's label maps
are palette PNGs whose indices are Cityscapes label ids; ``tools/dataset_converters/gta.py`` turns
them into train ids (``labels/<name>_labelTrainIds.png``) and writes the class statistics that
rare class sampling reads. The dataset then reads ``images/<name>.png`` with those maps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from effvision.registry import DATASETS

from .class_stats import TrainIdDataset, convert_label_maps, write_class_stats

# Cityscapes label id -> train id (cityscapesScripts' table; ids without a train id -> 255).
GTA5_ID_TO_TRAIN_ID = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip


def read_gta5_label(path: str) -> np.ndarray:
    """A GTA5 label map as its (H, W) Cityscapes label ids (the palette indices)."""
    with Image.open(path) as image:
        if image.mode not in ('P', 'L'):
            raise ValueError(
                f'{path}: GTA5 label maps are palette PNGs of Cityscapes label ids, got an '
                f'image of mode {image.mode!r}; use the labels_*.zip archives, not colour renders'
            )
        return np.asarray(image)


def convert_gta5(
    data_root: str | Path,
    *,
    label_dir: str = 'labels',
    out_dir: str | Path | None = None,
    nproc: int = 1,
) -> list[dict]:
    """Write train-id maps next to GTA5's label maps and the class statistics into ``out_dir``.

    Args:
        data_root: The GTA5 root (holding ``images/`` and ``labels/``).
        label_dir: Label folder, relative to ``data_root``.
        out_dir: Where the statistics go; defaults to ``data_root``, where
            :class:`~effvision.datasets.UDADataset` looks for them.
        nproc: Worker processes.

    Returns:
        The per-image class statistics written.
    """
    label_dir = Path(data_root) / label_dir
    stats = convert_label_maps(label_dir, read_gta5_label, GTA5_ID_TO_TRAIN_ID, nproc=nproc)
    write_class_stats(stats, data_root if out_dir is None else out_dir)
    return stats


@DATASETS.register_module()
class GTA5Dataset(TrainIdDataset):
    """GTA5 images with Cityscapes' 19 classes and palette.

    Layout (``data_prefix=dict(img_path='images', seg_map_path='labels')``)::

        data/gta/images/00001.png
        data/gta/labels/00001.png                  GTA5's own map (Cityscapes label ids)
        data/gta/labels/00001_labelTrainIds.png    written by tools/dataset_converters/gta.py

    Args:
        img_suffix: Suffix of the images.
        seg_map_suffix: Suffix of the converted label maps.
        **kwargs: Passed to :class:`~effvision.datasets.class_stats.TrainIdDataset` (and
            mmseg's ``BaseSegDataset``).
    """

    CONVERTER = 'python tools/dataset_converters/gta.py {data_root}'
