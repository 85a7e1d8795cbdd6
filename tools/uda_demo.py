"""`make demo-uda`: does DAFormer's self-training beat source-only training on a shifted domain?

generate the synthetic source domain (data/shapes) and target domain (data/shapes_target, same
kind of scenes in another look, other images) if absent -> write the source's class statistics
for rare class sampling -> train the source-only baseline -> train the UDA model for the same
iterations on the same source batches plus unlabelled target images -> evaluate both on the
target validation images -> print both mIoUs and the gain. Every step is the command a user would
type; the summary is also written to WORK_DIR/summary.json.
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

SOURCE_ONLY = 'configs/daformer/daformer_swin-nano_1xb4-800_shapes-srconly-128x128.py'
UDA = 'configs/daformer/daformer_swin-nano_1xb4-800_shapes2target-128x128.py'


def _domain(root: Path) -> str | None:
    meta = root / 'meta.json'
    return json.loads(meta.read_text()).get('domain', 'source') if meta.exists() else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--source', default='data/shapes')
    parser.add_argument('--target', default='data/shapes_target')
    parser.add_argument('--work-dir', default='work_dirs/demo_uda')
    parser.add_argument('--iters', type=int, default=None, help='override both schedules')
    args = parser.parse_args()

    py = sys.executable
    timings: dict[str, float] = {}
    for root, domain, seed in ((args.source, 'source', 0), (args.target, 'target', 1)):
        found = _domain(REPO / root)
        if found is None:
            run(
                f'generate {domain} domain',
                [py, 'tools/dataset_converters/make_shapes.py', '--out', root,
                 '--domain', domain, '--seed', str(seed)],
                timings,
            )  # fmt: skip
        elif found != domain:
            sys.exit(f'make demo-uda: {root} holds the {found} domain, expected {domain}; '
                     'remove it or pass another folder')  # fmt: skip
        else:
            print(f'=== generate {domain} domain: {root} exists, reused')
    run(
        'class statistics',
        [py, 'tools/dataset_converters/class_stats.py', args.source,
         '--ann-dir', 'annotations/training', '--suffix', '.png'],
        timings,
    )  # fmt: skip

    data = [
        f'train_dataloader.dataset.data_root={args.source}',
        f'val_dataloader.dataset.data_root={args.target}',
        f'test_dataloader.dataset.data_root={args.target}',
    ]
    results = {}
    for name, config in (('source-only', SOURCE_ONLY), ('UDA', UDA)):
        work_dir = Path(args.work_dir) / name
        options = list(data)
        if name == 'UDA':
            options[0:1] = [
                f'train_dataloader.dataset.source.data_root={args.source}',
                f'train_dataloader.dataset.target.data_root={args.target}',
            ]
        if args.iters:
            options += [f'train_cfg.max_iters={args.iters}', f'train_cfg.val_interval={args.iters}',
                        f'param_scheduler.1.end={args.iters}',
                        f'default_hooks.checkpoint.interval={args.iters}']  # fmt: skip
        run(f'train {name}', [py, 'tools/train.py', config, '--work-dir', str(work_dir),
                              '--cfg-options', *options], timings)  # fmt: skip
        checkpoint = (REPO / work_dir / 'last_checkpoint').read_text().strip()
        out = run(f'test {name} on target', [py, 'tools/test.py', config, checkpoint,
                                            '--work-dir', str(work_dir / 'test'),
                                            '--cfg-options', *options], timings)  # fmt: skip
        miou = re.search(r'mIoU: ([0-9.]+)', out)
        results[name] = float(miou.group(1)) if miou else None

    summary = {
        'target_val_mIoU': results,
        'gain': None
        if None in results.values()
        else round(results['UDA'] - results['source-only'], 2),
        'configs': {'source-only': SOURCE_ONLY, 'UDA': UDA},
        'seconds': {k: round(v, 1) for k, v in timings.items()},
        'machine': f'{platform.machine()} python {platform.python_version()}',
    }
    (REPO / args.work_dir / 'summary.json').write_text(json.dumps(summary, indent=2))
    print("\n=== summary (mIoU on the target domain's validation images)")
    for name, value in results.items():
        print(f'{name:<12} {value}')
    print(f'gain         {summary["gain"]}')
    for step, seconds in summary['seconds'].items():
        print(f'time {step:<26} {seconds:7.1f} s')
    if summary['gain'] is None:
        sys.exit('make demo-uda: a step did not report its mIoU (see above)')


if __name__ == '__main__':
    main()
