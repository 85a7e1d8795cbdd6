"""`make demo`: the whole slice on the embedded default, from data to a checked ONNX model.

generate the synthetic shapes set (if absent) -> train the quickstart config -> evaluate it
(per-class IoU table) -> run the image demo on a validation image -> export to ONNX with dynamic
H and W and check it against PyTorch with onnxruntime at two sizes. Every step runs the same
command a user would type; their output streams through, and a summary with timings closes the
run. Exits non-zero as soon as a step fails.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = 'configs/quickstart/upernet_swin-nano_1xb8-800_shapes-128x128.py'


def run(step: str, cmd: list[str], timings: dict[str, float]) -> str:
    """Run one step, streaming its output; return the output for the summary."""
    print(f'\n=== {step}: {" ".join(cmd)}', flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        print(line, end='', flush=True)
        lines.append(line)
    if proc.wait() != 0:
        sys.exit(f'make demo: step "{step}" failed with exit code {proc.returncode}')
    timings[step] = time.perf_counter() - start
    return ''.join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--config', default=CONFIG)
    parser.add_argument('--data', default='data/shapes')
    parser.add_argument('--work-dir', default='work_dirs/quickstart')
    args = parser.parse_args()

    py = sys.executable
    timings: dict[str, float] = {}
    work_dir = Path(args.work_dir)
    if not (REPO / args.data / 'meta.json').exists():
        run(
            'generate data',
            [py, 'tools/dataset_converters/make_shapes.py', '--out', args.data],
            timings,
        )
    else:
        print(f'=== generate data: {args.data} exists, reused')
    # a fresh run each time: a stale checkpoint from another config must not be resumed
    run('train', [py, 'tools/train.py', args.config, '--work-dir', str(work_dir)], timings)
    checkpoint = (REPO / work_dir / 'last_checkpoint').read_text().strip()
    test_out = run('test', [py, 'tools/test.py', args.config, checkpoint,
                            '--work-dir', str(work_dir / 'test')], timings)  # fmt: skip
    val_dir = REPO / args.data / 'images' / 'validation'
    image = sorted(val_dir.glob('*.png'))[0]
    run(
        'image demo',
        [py, 'demo/image_demo.py', str(image), args.config, checkpoint,
         '--out-dir', str(work_dir / 'demo')],
        timings,
    )  # fmt: skip
    export_out = run(
        'onnx export',
        [py, 'tools/deploy.py', args.config, checkpoint, '--out-dir', str(work_dir / 'onnx'),
         '--image', str(image), '--dynamic'],
        timings,
    )  # fmt: skip

    miou = re.search(r'mIoU: ([0-9.]+)', test_out)
    parity = re.search(r'ONNX parity:.*', export_out)
    overlay = REPO / work_dir / 'demo' / f'{image.stem}_overlay.png'
    summary = {
        'config': args.config,
        'checkpoint': checkpoint,
        'val_mIoU': float(miou.group(1)) if miou else None,
        'overlay': str(overlay) if overlay.exists() else None,
        'onnx_parity': parity.group(0) if parity else None,
        'seconds': {k: round(v, 1) for k, v in timings.items()},
        'machine': f'{platform.machine()} python {platform.python_version()}',
    }
    (REPO / work_dir / 'summary.json').write_text(json.dumps(summary, indent=2))
    print('\n=== summary')
    print(f'val mIoU            {summary["val_mIoU"]}')
    print(f'overlay             {summary["overlay"]}')
    print(f'{summary["onnx_parity"]}')
    for step, seconds in summary['seconds'].items():
        print(f'time {step:<14} {seconds:7.1f} s')
    print(
        f'total               {sum(timings.values()):7.1f} s   (written to {work_dir}/summary.json)'
    )
    if summary['val_mIoU'] is None or summary['onnx_parity'] is None or not overlay.exists():
        sys.exit('make demo: a step did not report its result (see above)')


if __name__ == '__main__':
    main()
