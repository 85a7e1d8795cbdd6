"""Write the class statistics rare class sampling reads, for label maps that hold train ids.

Examples:
    python tools/dataset_converters/class_stats.py data/shapes --ann-dir annotations/training \
        --suffix .png
    python tools/dataset_converters/class_stats.py data/cityscapes --ann-dir gtFine/train \
        --suffix _gtFine_labelTrainIds.png

Writes ``sample_class_stats.json`` and ``samples_with_class.json`` into ``--out`` (default: the
data root, where ``UDADataset`` looks). GTA5 and SYNTHIA need their converters instead
(tools/dataset_converters/{gta,synthia}.py), which also write the statistics.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from effvision.datasets.class_stats import collect_class_stats, write_class_stats


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Per-image class statistics of train-id maps.')
    parser.add_argument('data_root', help='dataset root')
    parser.add_argument('--ann-dir', required=True, help='label folder, relative to data_root')
    parser.add_argument('--suffix', required=True, help="end of the label maps' names")
    parser.add_argument('--out', help='folder of the statistics (default: data_root)')
    parser.add_argument('--ignore-index', type=int, default=255, help='label not counted')
    parser.add_argument('--nproc', type=int, default=1, help='worker processes')
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        stats = collect_class_stats(
            Path(args.data_root) / args.ann_dir,
            args.suffix,
            ignore_index=args.ignore_index,
            nproc=args.nproc,
        )
        paths = write_class_stats(stats, args.out or args.data_root)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f'error: {err}') from None
    classes = sorted({int(c) for entry in stats for c in entry if c != 'file'})
    print(f'{len(stats)} label maps, classes {classes}; wrote {", ".join(map(str, paths))}')


if __name__ == '__main__':
    main()
