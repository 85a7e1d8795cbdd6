"""Train-id label maps: conversion from a dataset's own ids, and per-image class statistics.

DAFormer's rare class sampling (:class:`effvision.datasets.UDADataset`) reads two JSON files that
the official converters of ``lhoyer/DAFormer`` (``tools/convert_datasets/*.py``) write next to a
dataset; we write the same layout, so files made by either work with both:

``sample_class_stats.json``
    A list with one object per label map: ``{"<train id>": <pixels>, ..., "file": "<path>"}``,
    listing only the classes present.
``samples_with_class.json``
    ``{"<train id>": [["<path>", <pixels>], ...]}``: the label maps that contain each class.

Only the base name of ``file`` is used to find an image in a dataset, so the statistics stay
valid when the dataset folder moves. Both files are written to a temporary file and renamed, so
a reader never sees half a file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from mmengine import fileio
from mmseg.datasets import BaseSegDataset, CityscapesDataset
from PIL import Image

SAMPLE_CLASS_STATS = 'sample_class_stats.json'
SAMPLES_WITH_CLASS = 'samples_with_class.json'
TRAIN_ID_SUFFIX = '_labelTrainIds.png'

LabelReader = Callable[[str], np.ndarray]


def count_pixels(label: np.ndarray, ignore_index: int = 255) -> dict[int, int]:
    """Pixels of every class present in a label map.

    Args:
        label: (H, W) integer label map of train ids.
        ignore_index: Label not counted.

    Returns:
        ``{class id: pixel count}`` for the ids present, ascending.
    """
    if label.size and label.min() < 0:
        raise ValueError(f'label maps must hold non-negative ids, found {label.min()}')
    counts = np.bincount(label.ravel().astype(np.int64))
    return {int(c): int(counts[c]) for c in np.flatnonzero(counts) if c != ignore_index}


def map_ids(ids: np.ndarray, id_to_train_id: Mapping[int, int]) -> np.ndarray:
    """Replace a dataset's label ids by train ids; ids absent from the table become 255.

    Args:
        ids: (H, W) non-negative integer label map.
        id_to_train_id: ``{dataset id: train id}``.

    Returns:
        (H, W) uint8 train-id map.
    """
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f'label maps must hold integer ids, got {ids.dtype}')
    if ids.size and ids.min() < 0:
        raise ValueError(f'label maps must hold non-negative ids, found {ids.min()}')
    size = max(max(id_to_train_id) + 1, int(ids.max()) + 1 if ids.size else 0)
    table = np.full(size, 255, dtype=np.uint8)
    table[list(id_to_train_id)] = list(id_to_train_id.values())
    return table[ids]


def find_label_maps(label_dir: str | Path, suffix: str, exclude: str | None = None) -> list[str]:
    """Label maps under ``label_dir`` (recursively) whose names end with ``suffix``, sorted.

    Args:
        label_dir: Folder to search.
        suffix: End of the file names to keep, e.g. ``'.png'``.
        exclude: End of the file names to skip (e.g. the converter's own outputs).
    """
    label_dir = Path(label_dir)
    if not label_dir.is_dir():
        raise FileNotFoundError(f'label folder {label_dir} does not exist')
    files = [
        str(path)
        for path in label_dir.rglob(f'*{suffix}')
        if path.is_file() and not (exclude and path.name.endswith(exclude))
    ]
    if not files:
        raise FileNotFoundError(f'no label map ending with {suffix!r} under {label_dir}')
    return sorted(files)


def _map(func: Callable, items: Sequence, nproc: int) -> list:
    if nproc <= 1 or len(items) <= 1:
        return [func(item) for item in items]
    with Pool(min(nproc, len(items))) as pool:
        return pool.map(func, items, chunksize=max(1, len(items) // (8 * nproc)))


def _stats_of_file(path: str, ignore_index: int) -> dict:
    label = np.asarray(Image.open(path))
    if label.ndim != 2:
        raise ValueError(f'{path}: expected a single-channel train-id map, got shape {label.shape}')
    return {**count_pixels(label, ignore_index), 'file': path}


def collect_class_stats(
    label_dir: str | Path, suffix: str, *, ignore_index: int = 255, nproc: int = 1
) -> list[dict]:
    """Per-image class pixel counts of a folder of train-id label maps.

    Args:
        label_dir: Folder of single-channel PNGs holding train ids (searched recursively).
        suffix: End of the label maps' names, e.g. ``'_labelTrainIds.png'`` or ``'.png'``.
        ignore_index: Label not counted.
        nproc: Worker processes.

    Returns:
        One ``{class id: pixels, ..., 'file': path}`` entry per label map, sorted by path.
    """
    files = find_label_maps(label_dir, suffix)
    return _map(partial(_stats_of_file, ignore_index=ignore_index), files, nproc)


def _convert_file(path: str, reader: LabelReader, id_to_train_id: Mapping[int, int]) -> dict:
    train_ids = map_ids(reader(path), id_to_train_id)
    out = path[: -len('.png')] + TRAIN_ID_SUFFIX
    Image.fromarray(train_ids).save(out)
    return {**count_pixels(train_ids), 'file': out}


def convert_label_maps(
    label_dir: str | Path,
    reader: LabelReader,
    id_to_train_id: Mapping[int, int],
    *,
    nproc: int = 1,
) -> list[dict]:
    """Write ``<name>_labelTrainIds.png`` next to every ``<name>.png`` label map.

    Files already ending with ``_labelTrainIds.png`` are skipped, so a rerun converts the same
    files again rather than their outputs.

    Args:
        label_dir: Folder of the dataset's own label maps (searched recursively).
        reader: Loads one label map as an (H, W) array of the dataset's ids; a module-level
            function, so that worker processes can receive it.
        id_to_train_id: ``{dataset id: train id}``; other ids become 255.
        nproc: Worker processes.

    Returns:
        The class statistics of the written train-id maps, as :func:`collect_class_stats`.
    """
    files = find_label_maps(label_dir, '.png', exclude=TRAIN_ID_SUFFIX)
    func = partial(_convert_file, reader=reader, id_to_train_id=dict(id_to_train_id))
    return _map(func, files, nproc)


def _dump_atomically(obj, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
    try:
        with os.fdopen(fd, 'w') as f:
            json.dump(obj, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_class_stats(sample_class_stats: Iterable[Mapping], out_dir: str | Path) -> list[Path]:
    """Write ``sample_class_stats.json`` and ``samples_with_class.json`` into ``out_dir``.

    Args:
        sample_class_stats: ``{class id: pixels, ..., 'file': path}`` per label map.
        out_dir: Folder to write to (created if missing).

    Returns:
        The paths of the two files.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    per_image, with_class = [], {}
    for entry in sample_class_stats:
        counts = {int(c): int(n) for c, n in entry.items() if c != 'file'}
        per_image.append({**{str(c): n for c, n in sorted(counts.items())}, 'file': entry['file']})
        for c, n in counts.items():
            with_class.setdefault(c, []).append([entry['file'], n])
    with_class = {str(c): with_class[c] for c in sorted(with_class)}
    paths = [out_dir / SAMPLE_CLASS_STATS, out_dir / SAMPLES_WITH_CLASS]
    _dump_atomically(per_image, paths[0])
    _dump_atomically(with_class, paths[1])
    return paths


def require_label_maps(
    data_list: Sequence[dict], converter: str, backend_args: dict | None = None
) -> None:
    """Fail early, naming the converter, when a dataset's label maps have not been written.

    Checks the first entry only: a converter writes all maps or stops with an error.

    Args:
        data_list: A segmentation dataset's ``data_list`` (``img_path``, ``seg_map_path``).
        converter: The command that writes the maps, for the message.
        backend_args: The dataset's file backend arguments.
    """
    if not data_list or not data_list[0].get('seg_map_path'):
        return
    seg_map = data_list[0]['seg_map_path']
    if not fileio.exists(seg_map, backend_args=backend_args):
        raise FileNotFoundError(
            f'label map {seg_map} does not exist: the train-id maps are written by '
            f'`{converter}`; run it once on the dataset root'
        )


class TrainIdDataset(BaseSegDataset):
    """A source dataset whose label maps a converter turned into Cityscapes train ids.

    Reads ``<name><img_suffix>`` images with ``<name>_labelTrainIds.png`` maps, Cityscapes' 19
    classes and palette, and stops with the converter command (``CONVERTER``, formatted with the
    data root) when the converted maps are missing.
    """

    METAINFO = CityscapesDataset.METAINFO
    CONVERTER = ''

    def __init__(
        self, img_suffix: str = '.png', seg_map_suffix: str = TRAIN_ID_SUFFIX, **kwargs
    ) -> None:
        super().__init__(img_suffix=img_suffix, seg_map_suffix=seg_map_suffix, **kwargs)

    def load_data_list(self) -> list[dict]:
        data_list = super().load_data_list()
        converter = self.CONVERTER.format(data_root=self.data_root or 'DATA_ROOT')
        require_label_maps(data_list, converter, self.backend_args)
        return data_list
