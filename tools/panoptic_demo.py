"""`make demo-panoptic`: kMaX-DeepLab and PEM learn panoptic segmentation of the synthetic set.

generate the synthetic shapes set (data/shapes) if absent, or again if an older generator wrote
it -> for each head (PEM, kMaX-DeepLab, each on the same narrow Swin): train the panoptic config
with tools/train.py -> evaluate it with tools/test.py (PQ, SQ, RQ, things/stuff, and mIoU of the
semantic output, on the 60 validation images) -> render a validation image with
demo/image_demo.py (class overlay and panoptic overlay) -> print one table. Every step is the
command a user would type; the summary is also written to WORK_DIR/summary.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'tools'))

from quickstart import run  # noqa: E402  (the step runner `make demo` uses)

CONFIGS = {
    'PEM': 'configs/pem/pem_swin-nano_1xb8-2k_shapes-panoptic-128x128.py',
    'kMaX-DeepLab': (
        'configs/kmax_deeplab/kmax-deeplab_swin-nano_1xb8-2k_shapes-panoptic-128x128.py'
    ),
}
METRICS = ('PQ', 'SQ', 'RQ', 'PQ_th', 'PQ_st')


def _needs_data(root: Path) -> bool:
    """True when the set is absent or was written by another generator version."""
    from effvision.datasets.synthetic import GENERATOR_VERSION

    meta = root / 'meta.json'
    if not meta.exists():
        return True
    found = json.loads(meta.read_text()).get('generator_version')
    if found != GENERATOR_VERSION:
        print(f'=== {root} was written by generator {found}, not {GENERATOR_VERSION}: rewritten')
        return True
    return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--data', default='data/shapes')
    parser.add_argument('--work-dir', default='work_dirs/demo_panoptic')
    parser.add_argument('--iters', type=int, default=None, help='override both schedules')
    parser.add_argument('--heads', nargs='+', choices=sorted(CONFIGS), default=sorted(CONFIGS))
    args = parser.parse_args()

    py = sys.executable
    timings: dict[str, float] = {}
    if _needs_data(REPO / args.data):
        run('generate data', [py, 'tools/dataset_converters/make_shapes.py', '--out', args.data,
                              '--force'], timings)  # fmt: skip
    else:
        print(f'=== generate data: {args.data} exists, reused')
    options = [
        f'train_dataloader.dataset.data_root={args.data}',
        f'val_dataloader.dataset.data_root={args.data}',
        f'test_dataloader.dataset.data_root={args.data}',
    ]
    if args.iters:
        options += [f'train_cfg.max_iters={args.iters}', f'train_cfg.val_interval={args.iters}',
                    f'param_scheduler.1.T_max={args.iters}', f'param_scheduler.1.end={args.iters}',
                    f'default_hooks.checkpoint.interval={args.iters}']  # fmt: skip
    image = sorted((REPO / args.data / 'images' / 'validation').glob('*.png'))[0]
    results = {}
    for name in args.heads:
        config = CONFIGS[name]
        work_dir = Path(args.work_dir) / name
        run(f'train {name}', [py, 'tools/train.py', config, '--work-dir', str(work_dir),
                              '--cfg-options', *options], timings)  # fmt: skip
        checkpoint = (REPO / work_dir / 'last_checkpoint').read_text().strip()
        out = run(f'test {name}', [py, 'tools/test.py', config, checkpoint,
                                   '--work-dir', str(work_dir / 'test'),
                                   '--cfg-options', *options], timings)  # fmt: skip
        found = {m: re.search(rf'coco_panoptic/{m}: ([0-9.]+)', out) for m in METRICS}
        found['mIoU'] = re.search(r'mIoU: ([0-9.]+)', out)
        results[name] = {k: float(v.group(1)) if v else None for k, v in found.items()}
        run(f'render {name}', [py, 'demo/image_demo.py', str(image), config, checkpoint,
                               '--out-dir', str(work_dir / 'demo')], timings)  # fmt: skip
        results[name]['panoptic_overlay'] = str(work_dir / 'demo' / f'{image.stem}_panoptic.png')

    summary = {
        'validation': results,
        'configs': {name: CONFIGS[name] for name in args.heads},
        'iters': args.iters,
        'seconds': {k: round(v, 1) for k, v in timings.items()},
        'machine': f'{platform.machine()} python {platform.python_version()}',
    }
    (REPO / args.work_dir / 'summary.json').write_text(json.dumps(summary, indent=2))
    print('\n=== summary (synthetic validation set, 60 images)')
    print(f'{"head":<14}' + ''.join(f'{m:>8}' for m in (*METRICS, 'mIoU')))
    for name, values in results.items():
        row = ''.join(
            f'{values[m]:>8.2f}' if values[m] is not None else f'{"-":>8}'
            for m in (*METRICS, 'mIoU')
        )
        print(f'{name:<14}{row}')
    for step, seconds in summary['seconds'].items():
        print(f'time {step:<26} {seconds:7.1f} s')
    if any(v is None for values in results.values() for k, v in values.items() if k in METRICS):
        sys.exit('make demo-panoptic: a step did not report its PQ (see above)')


if __name__ == '__main__':
    main()
