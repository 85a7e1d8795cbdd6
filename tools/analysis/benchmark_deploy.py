"""Latency of one model across backends: PyTorch eager, torch.compile, onnxruntime, TensorRT.

    python tools/analysis/benchmark_deploy.py CONFIG [CONFIG ...] [--checkpoint CKPT]
        [--size 512] [--repeats 10] [--threads N] [--device cpu|cuda] [--out docs/...md]

For each config (random weights unless ``--checkpoint``, ``effvision.deploy.parity.build_model``;
latency does not depend on them), in a fresh process: the segmentor as mmseg runs it
(``EncoderDecoder.encode_decode``: backbone, head, resize to the input) in eager mode, the same
under ``torch.compile`` (default mode, compile time excluded), and the model exported by
:func:`effvision.deploy.onnx.export_onnx` (deploy form, static batch 1 at ``--size``; parity
checked on a synthetic image first) run by onnxruntime with the same number of threads. On a GPU
with TensorRT installed, fp32 and fp16 engines built from that ONNX file are timed too (through
``TRTSegmentor.logits``, host copies included; eager and compiled PyTorch are timed on device
tensors). Batch 1, float32 input, median of ``--repeats`` runs after warm-up. Prints the machine
and versions first, then one table row per config; ``--out`` also writes the table with the command
that made it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from effvision.utils.benchmark import machine, run_job, timed

COLUMNS = ('eager', 'compile', 'onnxruntime', 'tensorrt-fp32', 'tensorrt-fp16')


def _image(size: int) -> np.ndarray:
    """A smooth synthetic BGR image (the parity check needs some structure, not noise)."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = np.stack([128 + 100 * np.sin(6 * xx), 128 + 100 * np.cos(5 * yy), 255 * xx * yy], -1)
    return img.astype(np.uint8)


def measure(job: dict) -> dict:
    torch.set_num_threads(job['threads'])
    size, repeats, device = job['size'], job['repeats'], job['device']
    from effvision.deploy.onnx import _exported_segmentor
    from effvision.deploy.parity import build_model

    model = _exported_segmentor(build_model(job['config'], job.get('checkpoint'))).to(device)
    x = torch.randn(1, 3, size, size, device=device)
    metas = [dict(img_shape=(size, size), pad_shape=(size, size), ori_shape=(size, size))]
    result: dict = {}
    with torch.no_grad():
        result['eager'] = timed(lambda: model.encode_decode(x, metas), repeats) * 1e3
        try:
            compiled = torch.compile(lambda t: model.encode_decode(t, metas))
            compiled(x)  # compile outside the timing
            result['compile'] = timed(lambda: compiled(x), repeats) * 1e3
        except Exception as err:  # a graph break is fine, a failure is reported
            result['compile_error'] = f'{type(err).__name__}: {str(err).splitlines()[0][:80]}'
    model = model.cpu()
    with tempfile.TemporaryDirectory() as out:
        from effvision.deploy.onnx import ONNX_FILE, export_onnx

        passed, parity, _ = export_onnx(model, out, _image(size), shape=(size, size))
        result['parity'] = dict(
            passed=passed,
            max_abs_diff=max(r.max_abs_diff for r in parity),
            agreement=min(r.agreement for r in parity),
        )
        if not passed:
            return result
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = job['threads']
        options.log_severity_level = 3
        session = ort.InferenceSession(
            str(Path(out) / ONNX_FILE), options, providers=['CPUExecutionProvider']
        )
        inputs = {'input': x.cpu().numpy()}
        result['onnxruntime'] = timed(lambda: session.run(None, inputs), repeats) * 1e3
        if device == 'cuda':
            result.update(_tensorrt(out, inputs['input'], repeats))
    return result


def _tensorrt(out: str, x: np.ndarray, repeats: int) -> dict:
    """fp32 and fp16 TensorRT engines of the export in ``out``, when TensorRT is present."""
    from effvision.deploy.tensorrt import TRTSegmentor, build_engine, unavailable_reason

    reason = unavailable_reason()
    if reason is not None:
        return {'tensorrt_error': reason}
    meta = json.loads((Path(out) / 'deploy.json').read_text())
    result = {}
    for precision in ('fp32', 'fp16'):
        engine = Path(out) / f'{precision}.engine'
        build_engine(Path(out) / 'end2end.onnx', engine, meta, precision=precision)
        runner = TRTSegmentor(engine, meta)
        result[f'tensorrt-{precision}'] = timed(lambda r=runner: r.logits(x), repeats) * 1e3
    return result


def _row(name: str, res: dict, device: str) -> str:
    if 'error' in res:
        return f'| {name} | fails: {res["error"]} |' + ' |' * 6
    eager = res['eager']
    cells = [f'{res[c]:.1f}' if c in res else '—' for c in COLUMNS]
    ort_speedup = f'{eager / res["onnxruntime"]:.2f}x' if 'onnxruntime' in res else '—'
    trt_speedup = f'{eager / res["tensorrt-fp16"]:.2f}x' if 'tensorrt-fp16' in res else '—'
    parity = res.get('parity', {})
    agreement = f'{100 * parity["agreement"]:.2f}%' if parity else '—'
    return f'| {name} | ' + ' | '.join([*cells, ort_speedup, trt_speedup, agreement]) + ' |'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('configs', nargs='*', help='model config files')
    parser.add_argument('--checkpoint', help='weights (one config only); default random')
    parser.add_argument('--size', type=int, default=512)
    parser.add_argument('--repeats', type=int, default=10)
    parser.add_argument('--threads', type=int, default=torch.get_num_threads())
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    parser.add_argument('--out', type=Path, help='also write the markdown table here')
    parser.add_argument('--job', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        print(json.dumps(measure(json.loads(args.job))))
        return
    if not args.configs:
        parser.error('pass at least one config')
    if args.checkpoint and len(args.configs) != 1:
        parser.error('--checkpoint goes with exactly one config')
    import onnxruntime

    header = (
        machine() + f', onnxruntime {onnxruntime.__version__}; batch 1, {args.size}x{args.size}, '
        f'float32, {args.device}; median of {args.repeats} runs after warm-up (ms)'
    )
    print(header, flush=True)
    lines = [
        '| config | eager | torch.compile | onnxruntime | TensorRT fp32 | TensorRT fp16 | '
        'ORT vs eager | TRT fp16 vs eager | ORT argmax agreement |',
        '|---|---|---|---|---|---|---|---|---|',
    ]
    print('\n'.join(lines), flush=True)
    for config in args.configs:
        job = dict(config=config, checkpoint=args.checkpoint, size=args.size,
                   repeats=args.repeats, threads=args.threads, device=args.device)  # fmt: skip
        res = run_job(__file__, job)
        lines.append(_row(Path(config).stem, res, args.device))
        print(lines[-1], flush=True)
        for key in ('compile_error', 'tensorrt_error'):
            if key in res:
                print(f'  {Path(config).stem}: {key}: {res[key]}', flush=True)
    if args.out is not None:
        command = (
            f'python tools/analysis/benchmark_deploy.py {" ".join(args.configs)} --size '
            f'{args.size} --repeats {args.repeats} --threads {args.threads} --device {args.device}'
        )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(f'`{command}`\n\n{header}\n\n' + '\n'.join(lines) + '\n')


if __name__ == '__main__':
    main()
