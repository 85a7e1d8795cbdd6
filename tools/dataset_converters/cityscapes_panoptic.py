"""Convert Cityscapes' fine annotations to COCO panoptic format, for mmdet's CocoPanopticDataset.

Example:
    python tools/dataset_converters/cityscapes_panoptic.py data/cityscapes --nproc 8

Reads ``<root>/gtFine/<split>/<city>/<name>_gtFine_instanceIds.png`` and writes, per split,
``<out>/cityscapes_panoptic_<split>.json`` and the PNGs ``<out>/cityscapes_panoptic_<split>/
<city>/<name>_leftImg8bit.png`` (``<out>`` defaults to ``<root>/gtFine``). See
docs/datasets/panoptic.md.

The ids are those of cityscapesScripts' ``preparation/createPanopticImgs.py`` (mcordts/
cityscapesScripts): the 19 evaluated classes are the categories, with their label ids (train ids
with ``--use-train-id``); a pixel's segment id is its instanceIds value, i.e. ``label id * 1000 +
n`` for an instance and the label id for a stuff region or a crowd region of a thing class (a
car group, ``iscrowd=1``); classes ignored in evaluation (unlabelled, ego vehicle, caravan, ...)
become VOID (id 0). Image ids are ``<city>_<seq>_<frame>``. Three things differ, because mmdet's
``CocoPanopticDataset`` reads the files this way: categories are listed things first (mmdet numbers
labels in JSON order and needs thing labels below the stuff ones); an image's ``file_name`` is
``<city>/<name>_leftImg8bit.png``, relative to ``leftImg8bit/<split>/`` (official: without the city
folder); and each PNG carries the image's name, in a folder per city (mmdet derives the PNG path
from the image's name; official: ``<name>_gtFine_panoptic.png``, flat).

Each split is written into temporary names and renamed into place when complete, so an
interrupted run leaves no half-written output; an existing output is kept unless ``--force``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from functools import partial
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image

INSTANCE_SUFFIX = '_gtFine_instanceIds.png'
IMAGE_SUFFIX = '_leftImg8bit.png'

# cityscapesScripts' label table (helpers/labels.py): label id -> (name, train id, category,
# has instances, ignored in evaluation, colour). License plates (id -1) are never drawn.
LABELS = {
    0: ('unlabeled', 255, 'void', False, True, (0, 0, 0)),
    1: ('ego vehicle', 255, 'void', False, True, (0, 0, 0)),
    2: ('rectification border', 255, 'void', False, True, (0, 0, 0)),
    3: ('out of roi', 255, 'void', False, True, (0, 0, 0)),
    4: ('static', 255, 'void', False, True, (0, 0, 0)),
    5: ('dynamic', 255, 'void', False, True, (111, 74, 0)),
    6: ('ground', 255, 'void', False, True, (81, 0, 81)),
    7: ('road', 0, 'flat', False, False, (128, 64, 128)),
    8: ('sidewalk', 1, 'flat', False, False, (244, 35, 232)),
    9: ('parking', 255, 'flat', False, True, (250, 170, 160)),
    10: ('rail track', 255, 'flat', False, True, (230, 150, 140)),
    11: ('building', 2, 'construction', False, False, (70, 70, 70)),
    12: ('wall', 3, 'construction', False, False, (102, 102, 156)),
    13: ('fence', 4, 'construction', False, False, (190, 153, 153)),
    14: ('guard rail', 255, 'construction', False, True, (180, 165, 180)),
    15: ('bridge', 255, 'construction', False, True, (150, 100, 100)),
    16: ('tunnel', 255, 'construction', False, True, (150, 120, 90)),
    17: ('pole', 5, 'object', False, False, (153, 153, 153)),
    18: ('polegroup', 255, 'object', False, True, (153, 153, 153)),
    19: ('traffic light', 6, 'object', False, False, (250, 170, 30)),
    20: ('traffic sign', 7, 'object', False, False, (220, 220, 0)),
    21: ('vegetation', 8, 'nature', False, False, (107, 142, 35)),
    22: ('terrain', 9, 'nature', False, False, (152, 251, 152)),
    23: ('sky', 10, 'sky', False, False, (70, 130, 180)),
    24: ('person', 11, 'human', True, False, (220, 20, 60)),
    25: ('rider', 12, 'human', True, False, (255, 0, 0)),
    26: ('car', 13, 'vehicle', True, False, (0, 0, 142)),
    27: ('truck', 14, 'vehicle', True, False, (0, 0, 70)),
    28: ('bus', 15, 'vehicle', True, False, (0, 60, 100)),
    29: ('caravan', 255, 'vehicle', True, True, (0, 0, 90)),
    30: ('trailer', 255, 'vehicle', True, True, (0, 0, 110)),
    31: ('train', 16, 'vehicle', True, False, (0, 80, 100)),
    32: ('motorcycle', 17, 'vehicle', True, False, (0, 0, 230)),
    33: ('bicycle', 18, 'vehicle', True, False, (119, 11, 32)),
}
EVALUATED = [i for i, label in LABELS.items() if not label[4]]
# Things first, each group in label-id order (see the module docstring).
CATEGORY_ORDER = [i for i in EVALUATED if LABELS[i][3]] + [i for i in EVALUATED if not LABELS[i][3]]


def categories(use_train_id: bool = False) -> list[dict]:
    """The 19 evaluated classes as COCO panoptic categories, things first."""
    return [
        {
            'id': LABELS[i][1] if use_train_id else i,
            'name': LABELS[i][0],
            'supercategory': LABELS[i][2],
            'isthing': int(LABELS[i][3]),
            'color': list(LABELS[i][5]),
        }
        for i in CATEGORY_ORDER
    ]


def find_annotations(root: Path, split: str) -> list[Path]:
    """The ``*_gtFine_instanceIds.png`` files of a split, sorted; a clear error when none."""
    split_dir = root / 'gtFine' / split
    expected = f'{root}/gtFine/{split}/<city>/<name>{INSTANCE_SUFFIX}'
    if not split_dir.is_dir():
        hint = ''
        if (root / split).is_dir() and root.name == 'gtFine':
            hint = f'; {root} looks like the gtFine folder itself, pass its parent {root.parent}'
        raise FileNotFoundError(
            f'{split_dir} does not exist: expected the Cityscapes layout {expected} '
            f'(gtFine_trainvaltest.zip unpacked into the dataset root){hint}'
        )
    files = sorted(split_dir.glob(f'*/*{INSTANCE_SUFFIX}'))
    if not files:
        raise FileNotFoundError(f'no file matches {expected}')
    return files


def _bbox(mask: np.ndarray) -> list[int]:
    cols = np.flatnonzero(mask.any(0))
    rows = np.flatnonzero(mask.any(1))
    return [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]


def convert_file(path: Path, out_dir: Path, use_train_id: bool = False) -> tuple[dict, dict]:
    """Write the panoptic PNG of one instanceIds map into ``out_dir/<city>/``.

    Args:
        path: A ``<city>/<name>_gtFine_instanceIds.png`` file.
        out_dir: The split's PNG folder.
        use_train_id: Category ids are train ids instead of label ids.

    Returns:
        The image entry and the annotation entry of the COCO panoptic JSON.
    """
    with Image.open(path) as image:
        ids = np.asarray(image).astype(np.int64)
    if ids.ndim != 2:
        raise ValueError(f'{path}: an instanceIds map has one channel, got shape {ids.shape}')
    city, name = path.parent.name, path.name[: -len(INSTANCE_SUFFIX)]
    file_name = f'{city}/{name}{IMAGE_SUFFIX}'
    panoptic = np.zeros(ids.shape, dtype=np.int64)
    segments = []
    for segment_id in np.unique(ids):
        label_id = int(segment_id) // 1000 if segment_id >= 1000 else int(segment_id)
        if label_id not in LABELS:
            raise ValueError(
                f'{path}: value {segment_id} is no Cityscapes label id (0-33) nor an instance '
                'id (label id * 1000 + n); is this an instanceIds map?'
            )
        _, train_id, _, has_instances, ignored, _ = LABELS[label_id]
        if ignored:
            continue  # VOID
        mask = ids == segment_id
        panoptic[mask] = segment_id
        segments.append(
            {
                'id': int(segment_id),
                'category_id': train_id if use_train_id else label_id,
                'area': int(mask.sum()),
                'bbox': _bbox(mask),
                # A thing class without an instance number is a group region (crowd).
                'iscrowd': int(has_instances and segment_id < 1000),
            }
        )
    rgb = np.stack([panoptic % 256, panoptic // 256 % 256, panoptic // 65536], -1).astype(np.uint8)
    (out_dir / city).mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(out_dir / file_name)
    height, width = ids.shape
    image = {'id': name, 'file_name': file_name, 'height': height, 'width': width}
    return image, {'image_id': name, 'file_name': file_name, 'segments_info': segments}


def _replace(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` is removed only once ``tmp`` is there."""
    if not final.exists():
        os.rename(tmp, final)
        return
    old = final.with_name(f'{final.name}.old-{os.getpid()}')
    os.rename(final, old)
    try:
        os.rename(tmp, final)
    except OSError:
        os.rename(old, final)
        raise
    if old.is_dir():
        shutil.rmtree(old)
    else:
        old.unlink()


def convert_split(
    root: str | Path,
    split: str,
    out_dir: str | Path | None = None,
    *,
    use_train_id: bool = False,
    nproc: int = 1,
    force: bool = False,
) -> Path:
    """Convert one split; returns the path of its JSON.

    Args:
        root: Cityscapes root, holding ``gtFine/``.
        split: ``'train'``, ``'val'`` or ``'test'``.
        out_dir: Output folder; defaults to ``<root>/gtFine``.
        use_train_id: Category ids are train ids (0-18) instead of label ids.
        nproc: Worker processes.
        force: Replace an existing output.
    """
    root = Path(root)
    out_dir = Path(out_dir) if out_dir is not None else root / 'gtFine'
    base = f'cityscapes_panoptic_{split}' + ('_trainId' if use_train_id else '')
    json_path, png_dir = out_dir / f'{base}.json', out_dir / base
    existing = [str(p) for p in (json_path, png_dir) if p.exists()]
    if existing and not force:
        raise FileExistsError(f'{" and ".join(existing)} already exist; pass --force to replace')
    files = find_annotations(root, split)

    out_dir.mkdir(parents=True, exist_ok=True)
    tmp_dir = out_dir / f'.{base}.tmp-{os.getpid()}'
    tmp_json = out_dir / f'.{base}.json.tmp-{os.getpid()}'
    shutil.rmtree(tmp_dir, ignore_errors=True)  # left by an earlier, killed run with this pid
    tmp_dir.mkdir()
    try:
        work = partial(convert_file, out_dir=tmp_dir, use_train_id=use_train_id)
        if nproc > 1 and len(files) > 1:
            with Pool(min(nproc, len(files))) as pool:
                entries = pool.map(work, files, chunksize=max(1, len(files) // (8 * nproc)))
        else:
            entries = [work(path) for path in files]
        content = {
            'images': [image for image, _ in entries],
            'annotations': [annotation for _, annotation in entries],
            'categories': categories(use_train_id),
        }
        tmp_json.write_text(json.dumps(content))
        # The PNG folder first, the JSON last: a JSON in place means its PNGs are complete.
        _replace(tmp_dir, png_dir)
        _replace(tmp_json, json_path)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        tmp_json.unlink(missing_ok=True)
        raise
    return json_path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Convert Cityscapes gtFine instanceIds maps to COCO panoptic format.'
    )
    parser.add_argument('root', help='Cityscapes root, holding gtFine/ and leftImg8bit/')
    parser.add_argument('-o', '--out-dir', help='output folder (default: <root>/gtFine)')
    parser.add_argument(
        '--splits', nargs='+', default=['train', 'val'], help='splits to convert (train val)'
    )
    parser.add_argument(
        '--use-train-id', action='store_true', help='category ids 0-18 instead of label ids'
    )
    parser.add_argument('--nproc', type=int, default=4, help='worker processes')
    parser.add_argument('--force', action='store_true', help='replace existing outputs')
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    for split in args.splits:
        start = time.perf_counter()
        try:
            path = convert_split(
                args.root,
                split,
                args.out_dir,
                use_train_id=args.use_train_id,
                nproc=args.nproc,
                force=args.force,
            )
        except (FileNotFoundError, FileExistsError, ValueError) as err:
            raise SystemExit(f'error: {err}') from None
        count = len(json.loads(path.read_text())['images'])
        print(f'{split}: {count} images in {time.perf_counter() - start:.1f} s -> {path}')


if __name__ == '__main__':
    main()
