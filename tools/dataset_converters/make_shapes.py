"""Generate the synthetic "shapes" dataset (semantic, COCO instance and COCO panoptic labels).

Example:
    python tools/dataset_converters/make_shapes.py --out data/shapes
    python tools/dataset_converters/make_shapes.py --out data/shapes_target --domain target

The defaults (400 training and 60 validation images at 128x128) are what the quickstart configs
expect; see ``effvision/datasets/synthetic.py`` for the layout and label conventions.
``--domain target`` renders the same scenes (byte-identical labels) in the shifted look used as
the unlabelled target domain of domain adaptation (docs/datasets/shapes.md).
"""

from __future__ import annotations

import argparse
import time

from effvision.datasets.synthetic import CLASSES, DOMAINS, PALETTE, THING_IDS, generate_shapes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Generate the synthetic shapes dataset.')
    parser.add_argument('--out', default='data/shapes', help='dataset root to create')
    parser.add_argument('--num-train', type=int, default=400, help='training images')
    parser.add_argument('--num-val', type=int, default=60, help='validation images')
    parser.add_argument(
        '--size', type=int, nargs=2, default=(128, 128), metavar=('H', 'W'), help='image size'
    )
    parser.add_argument('--seed', type=int, default=0, help='dataset seed')
    parser.add_argument(
        '--domain',
        choices=DOMAINS,
        default='source',
        help='appearance: source (default) or target (same scenes and labels, shifted look)',
    )
    parser.add_argument('--force', action='store_true', help='replace an existing dataset root')
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        meta = generate_shapes(
            args.out,
            num_train=args.num_train,
            num_val=args.num_val,
            size=tuple(args.size),
            seed=args.seed,
            domain=args.domain,
            force=args.force,
        )
    except (FileExistsError, ValueError) as err:
        raise SystemExit(f'error: {err}') from None
    elapsed = time.perf_counter() - start

    height, width = args.size
    print(
        f'wrote {args.out} in {elapsed:.1f} s ({height}x{width}, seed {args.seed}, '
        f'{args.domain} domain)'
    )
    for split, counts in meta['counts'].items():
        per_class = ', '.join(f'{name} {n}' for name, n in counts['instances_per_class'].items())
        images, instances = counts['images'], counts['instances']
        print(f'  {split}: {images} images, {instances} instances ({per_class})')
    print('  classes (id name [thing] palette):')
    for class_id, name in enumerate(CLASSES):
        kind = 'thing' if class_id in THING_IDS else 'stuff'
        print(f'    {class_id} {name} [{kind}] {PALETTE[class_id]}')


if __name__ == '__main__':
    main()
