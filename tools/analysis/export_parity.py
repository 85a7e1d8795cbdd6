"""Export parity of shipped configs on the synthetic set: onnxruntime next to PyTorch.

    python tools/analysis/export_parity.py CONFIG [CONFIG ...] [--size 64] [--dynamic]
        [--checkpoint CKPT] [--num-val 4] [--out docs/...md]

For each config: the model (random weights and BatchNorm statistics unless ``--checkpoint``;
``effvision.deploy.parity.build_model``) is exported by ``export_onnx`` at ``--size`` (its
deploy form, parity-checked on the first validation image), then PyTorch and onnxruntime
predict the synthetic validation set (``--num-val`` images generated at ``--size``, seed 0):
worst logit difference, pixel agreement, and the mIoU of both. Prints the machine and versions
first; one table row per config. The same check, with thresholds, is
``tests/deploy/test_export_configs.py``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from effvision.utils.benchmark import machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('configs', nargs='+', help='model config files')
    parser.add_argument('--size', type=int, default=64, help='export and image size (square)')
    parser.add_argument('--dynamic', action='store_true', help='export with dynamic N/H/W')
    parser.add_argument('--checkpoint', help='weights (one config only); default random')
    parser.add_argument('--num-val', type=int, default=4, help='synthetic validation images')
    parser.add_argument('--out', type=Path, help='also write the markdown table here')
    args = parser.parse_args()
    if args.checkpoint and len(args.configs) != 1:
        parser.error('--checkpoint goes with exactly one config')

    import cv2
    import onnxruntime

    from effvision.apis import read_image
    from effvision.datasets.synthetic import generate_shapes
    from effvision.deploy.onnx import ORTSegmentor, export_onnx
    from effvision.deploy.parity import build_model, segmentation_parity

    header = (
        f'{machine()}, onnxruntime {onnxruntime.__version__}; export at {args.size}x{args.size} '
        f'({"dynamic" if args.dynamic else "static"}), synthetic validation set of '
        f'{args.num_val} images, {"checkpoint" if args.checkpoint else "random weights"}'
    )
    print(header, flush=True)
    lines = [
        '| config | deploy forms | max abs Δlogit | pixel agreement | mIoU PyTorch | '
        'mIoU onnxruntime | export (s) |',
        '|---|---|---|---|---|---|---|',
    ]
    print('\n'.join(lines), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / 'shapes'
        generate_shapes(root, num_train=1, num_val=args.num_val, size=(args.size,) * 2, seed=0)
        val = sorted((root / 'images' / 'validation').iterdir())
        images = [read_image(p) for p in val]
        labels = root / 'annotations' / 'validation'
        gts = [cv2.imread(str(labels / f'{p.stem}.png'), cv2.IMREAD_UNCHANGED) for p in val]
        for i, config in enumerate(args.configs):
            model = build_model(config, args.checkpoint)
            out = Path(tmp) / f'export{i}'
            start = time.perf_counter()
            try:
                passed, _, _ = export_onnx(
                    model, out, images[0], shape=(args.size,) * 2, dynamic=args.dynamic
                )
            except Exception as err:  # report and go on with the next config
                lines.append(f'| {Path(config).stem} | fails: {str(err).splitlines()[0][:120]} |'
                             + ' |' * 5)  # fmt: skip
                print(lines[-1], flush=True)
                continue
            seconds = time.perf_counter() - start
            runner = ORTSegmentor.from_dir(out) if passed else None
            if runner is None:
                lines.append(f'| {Path(config).stem} | parity check failed |' + ' |' * 5)
                print(lines[-1], flush=True)
                continue
            res = segmentation_parity(model, runner, images, gts)
            forms = len(runner.meta.get('deploy_forms', []))
            lines.append(
                f'| {Path(config).stem} | {forms} | {res["max_abs_diff"]:.2g} | '
                f'{100 * res["agreement"]:.3f}% | {res["miou_pytorch"]:.2f} | '
                f'{res["miou_backend"]:.2f} | {seconds:.0f} |'
            )
            print(lines[-1], flush=True)
    if args.out is not None:
        command = 'python tools/analysis/export_parity.py ' + ' '.join(args.configs)
        command += f' --size {args.size} --num-val {args.num_val}'
        command += ' --dynamic' if args.dynamic else ''
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(f'`{command}`\n\n{header}\n\n' + '\n'.join(lines) + '\n')


if __name__ == '__main__':
    main()
