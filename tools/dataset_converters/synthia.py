"""Convert SYNTHIA-RAND-CITYSCAPES label maps to Cityscapes train ids and write the class
statistics for RCS.

Example:
    python tools/dataset_converters/synthia.py data/synthia --nproc 8

Reads the first channel of ``data/synthia/GT/LABELS/<name>.png`` (16-bit SYNTHIA class ids),
writes ``data/synthia/GT/LABELS/<name>_labelTrainIds.png`` (Cityscapes train ids, 255 elsewhere)
and, into ``--out-dir`` (default: the data root), ``sample_class_stats.json`` and
``samples_with_class.json``. See docs/datasets/uda.md.
"""

from __future__ import annotations

import argparse
import time

from effvision.datasets.synthia import convert_synthia


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Convert SYNTHIA labels to Cityscapes train ids.')
    parser.add_argument('data_root', help='SYNTHIA-RAND-CITYSCAPES root, holding RGB/ and GT/')
    parser.add_argument('--gt-dir', default='GT/LABELS', help='label folder, relative to root')
    parser.add_argument('-o', '--out-dir', help='folder of the class statistics (data_root)')
    parser.add_argument('--nproc', type=int, default=4, help='worker processes')
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        stats = convert_synthia(
            args.data_root, label_dir=args.gt_dir, out_dir=args.out_dir, nproc=args.nproc
        )
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f'error: {err}') from None
    elapsed = time.perf_counter() - start
    out_dir = args.out_dir or args.data_root
    print(f'converted {len(stats)} label maps in {elapsed:.1f} s; class statistics in {out_dir}')


if __name__ == '__main__':
    main()
