"""Convert GTA5's label maps to Cityscapes train ids and write the class statistics for RCS.

Example:
    python tools/dataset_converters/gta.py data/gta --nproc 8

Reads ``data/gta/labels/<name>.png`` (palette PNGs of Cityscapes label ids), writes
``data/gta/labels/<name>_labelTrainIds.png`` (train ids 0..18, 255 elsewhere) and, into
``--out-dir`` (default: the data root), ``sample_class_stats.json`` and
``samples_with_class.json``. See docs/datasets/uda.md.
"""

from __future__ import annotations

import argparse
import time

from effvision.datasets.gta import convert_gta5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Convert GTA5 labels to Cityscapes train ids.')
    parser.add_argument('data_root', help='GTA5 root, holding images/ and labels/')
    parser.add_argument('--gt-dir', default='labels', help='label folder, relative to data_root')
    parser.add_argument('-o', '--out-dir', help='folder of the class statistics (data_root)')
    parser.add_argument('--nproc', type=int, default=4, help='worker processes')
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        stats = convert_gta5(
            args.data_root, label_dir=args.gt_dir, out_dir=args.out_dir, nproc=args.nproc
        )
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f'error: {err}') from None
    elapsed = time.perf_counter() - start
    out_dir = args.out_dir or args.data_root
    print(f'converted {len(stats)} label maps in {elapsed:.1f} s; class statistics in {out_dir}')


if __name__ == '__main__':
    main()
