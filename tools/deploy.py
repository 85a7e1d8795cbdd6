"""Export a segmentor to ONNX (and a TensorRT engine) and check it against PyTorch.

Writes ``OUT_DIR/end2end.onnx`` (input ``input``: normalised float32 NCHW; output ``logits``:
(N, num_classes, H, W) at the input size; a panoptic kMaX-DeepLab / PEM config: ``cls_logits``
(N, Q, K+1) and ``mask_logits`` (N, Q, H/4, W/4), merged on the host as ``deploy.json``
records), ``OUT_DIR/deploy.json`` (classes, palette,
normalisation, shapes and their range, opset, deploy forms, versions) and ``OUT_DIR/parity.json``
(onnxruntime against PyTorch at every checked size), then prints one line::

    ONNX parity: max|Δlogit|=2.1e-06 argmax agreement=100.000% (16384 pixels; NxHxW 1x128x128)

and exits with status 1 when the class agreement is below ``--min-agreement`` at any checked size
(the model is then kept as ``end2end.rejected.onnx``, never as ``end2end.onnx``). With
``--dynamic``, the batch size and H and W stay symbolic within a range (``--dynamic 256 1024``:
sides from 256 to 1024 px; ``--dynamic`` alone: 64 to 8192); the check also runs at a second
size with a batch of two, which catches an export that was silently specialised, and the runners
refuse sizes outside the range.

``--backend tensorrt`` then builds ``end2end.engine`` from the checked ONNX file (``--fp16``,
``--int8 --calib-dir DIR``) with the TensorRT Python API on this machine's GPU, checks it the same
way and adds its numbers to parity.json. Without TensorRT or a GPU it stops before writing
anything and says what to install.

Examples::

    python tools/deploy.py CONFIG work_dirs/<stem>/iter_2000.pth --out-dir work_dirs/<stem>/onnx
    python tools/deploy.py CONFIG CKPT --out-dir D --dynamic 256 1024 --shape 512 512
    python tools/deploy.py CONFIG CKPT --out-dir D --backend tensorrt --fp16
"""

from __future__ import annotations

import argparse
import os
import os.path as osp
import sys
from typing import NoReturn


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses the command line."""
    from mmengine.config import DictAction

    parser = argparse.ArgumentParser(description='Export a segmentor to ONNX (+ parity check)')
    parser.add_argument('config', help='model config file')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--out-dir', required=True, help='directory for end2end.onnx, deploy.json')
    parser.add_argument(
        '--shape',
        type=int,
        nargs=2,
        metavar=('H', 'W'),
        help='input size to export at (the only size of a static model; the example size of a '
        "dynamic one). Default: the config's crop size (data_preprocessor.size or crop_size)",
    )
    parser.add_argument(
        '--backend',
        choices=('onnxruntime', 'tensorrt'),
        default='onnxruntime',
        help='onnxruntime: the ONNX file; tensorrt: also an engine for this GPU (default: '
        'onnxruntime)',
    )
    parser.add_argument(
        '--dynamic',
        nargs='*',
        type=int,
        metavar=('MIN', 'MAX'),
        help='keep batch, height and width symbolic; optionally the range of H and W in pixels '
        '(e.g. --dynamic 256 1024; default 64 8192)',
    )
    parser.add_argument('--fp16', action='store_true', help='tensorrt: fp16 engine')
    parser.add_argument(
        '--int8', action='store_true', help='tensorrt: int8 engine, calibrated on --calib-dir'
    )
    parser.add_argument('--calib-dir', help='tensorrt --int8: folder of calibration images')
    parser.add_argument(
        '--max-batch',
        type=int,
        default=None,
        help='tensorrt: largest batch the engine takes (default: 1, or 2 for a dynamic export, '
        'the batch of the second parity check)',
    )
    parser.add_argument(
        '--max-size',
        type=int,
        nargs=2,
        metavar=('H', 'W'),
        help='tensorrt: largest input the engine takes, within the dynamic range (TensorRT '
        'reserves memory for it; default: the top of the range)',
    )
    parser.add_argument(
        '--calib-images',
        type=int,
        default=64,
        help='tensorrt --int8: at most this many calibration images (default: 64)',
    )
    parser.add_argument(
        '--check-sizes',
        nargs='+',
        default=[],
        metavar='HxW',
        type=_size,
        help='with --dynamic: more sizes to check besides the example and a second one, '
        'e.g. 200x264 512x512',
    )
    parser.add_argument(
        '--image',
        help="image for the parity check. Default: the first image of the config's val dataset",
    )
    parser.add_argument(
        '--min-agreement',
        type=float,
        default=0.999,
        help='fraction of pixels whose class must agree between onnxruntime and PyTorch at every '
        'checked size (default: 0.999)',
    )
    parser.add_argument('--opset', type=int, default=None, help='ONNX opset (default: 18)')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override some settings in the used config, in xxx=yyy format',
    )
    return parser.parse_args(argv)


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split('x'))
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected HxW, e.g. 200x264, got {text!r}') from None
    return h, w


def _fail(message: str) -> NoReturn:
    """Exits with one line on stderr and status 1."""
    sys.exit(f'deploy.py: error: {message}')


def default_shape(cfg) -> tuple[int, int] | None:
    """The (H, W) a config runs at: its preprocessor's ``size`` or ``canvas`` (kMaX-DeepLab
    pads every batch to it), else ``crop_size``."""
    preprocessor = cfg.model.get('data_preprocessor') or {}
    size = preprocessor.get('size') or preprocessor.get('canvas') or cfg.get('crop_size')
    if size is None:
        return None
    size = (size, size) if isinstance(size, int) else tuple(size)
    return int(size[0]), int(size[1])


def first_val_image(cfg) -> str:
    """Path of the first image of the config's val (else test) dataset."""
    from effvision.registry import DATASETS

    for key in ('val_dataloader', 'test_dataloader'):
        dataset_cfg = (cfg.get(key) or {}).get('dataset')
        if not dataset_cfg:
            continue
        dataset = DATASETS.build(dataset_cfg)
        if len(dataset) == 0:
            continue
        return dataset.get_data_info(0)['img_path']
    raise FileNotFoundError('the config has no val or test dataset with images')


# Agreement an engine must reach when it computes in reduced precision (fp32 engines must reach
# --min-agreement); the dataset metric is the real test: tools/test.py --backend tensorrt.
REDUCED_PRECISION_AGREEMENT = {'fp16': 0.99, 'int8': 0.95}


def _check_args(args: argparse.Namespace) -> None:
    """Refuses inconsistent options before anything is loaded or written."""
    for label, path in (('config', args.config), ('checkpoint', args.checkpoint)):
        if not osp.isfile(path):
            _fail(f'{label} file not found: {path!r}; pass the path of an existing file.')
    if args.image is not None and not osp.isfile(args.image):
        _fail(f'image not found: {args.image!r}; pass an existing image to --image.')
    if not 0.0 <= args.min_agreement <= 1.0:
        _fail(f'--min-agreement is a fraction in [0, 1], got {args.min_agreement}.')
    if args.dynamic is not None and len(args.dynamic) not in (0, 2):
        _fail(f'--dynamic takes no value or MIN MAX (e.g. --dynamic 256 1024), got {args.dynamic}.')
    if args.dynamic and not 1 <= args.dynamic[0] <= args.dynamic[1]:
        _fail(f'--dynamic MIN MAX needs 1 <= MIN <= MAX, got {args.dynamic[0]} {args.dynamic[1]}.')
    if args.check_sizes and args.dynamic is None:
        _fail('--check-sizes needs --dynamic: a static model has one size.')
    trt_only = [
        flag
        for flag, given in (
            ('--fp16', args.fp16), ('--int8', args.int8), ('--calib-dir', args.calib_dir),
            ('--max-batch', args.max_batch), ('--max-size', args.max_size),
        )
        if given
    ]  # fmt: skip
    if trt_only and args.backend != 'tensorrt':
        _fail(f'{" ".join(trt_only)}: TensorRT options; add --backend tensorrt.')
    if args.fp16 and args.int8:
        _fail('pass --fp16 or --int8, not both (an int8 engine falls back to fp16 by itself).')
    if args.int8 and not args.calib_dir:
        _fail('--int8 needs --calib-dir DIR: a folder of images like the ones the model sees.')
    if args.calib_dir and not args.int8:
        _fail('--calib-dir is for --int8 calibration; add --int8 or drop --calib-dir.')
    if args.calib_dir and not osp.isdir(args.calib_dir):
        _fail(f'--calib-dir {args.calib_dir!r} is not a folder; pass a folder of images.')
    if args.backend == 'tensorrt':
        from effvision.deploy.tensorrt import unavailable_reason

        reason = unavailable_reason()
        if reason is not None:
            _fail(f'--backend tensorrt: {reason} (nothing was written; --backend onnxruntime '
                  'exports without it).')  # fmt: skip


def _in_profile(runner, shape) -> bool:
    try:
        runner.check_input(shape)
    except ValueError:
        return False
    return True


def build_tensorrt(args, model, img, out_dir: str, sizes) -> bool:
    """Builds ``end2end.engine`` from the checked ONNX file, checks it, records it.

    Returns:
        Whether the engine passed its check (else it is kept as ``end2end.rejected.engine``).
    """
    import json

    from effvision.deploy.onnx import (
        META_FILE,
        ONNX_FILE,
        PARITY_FILE,
        ORTSegmentor,
        check_parity,
        format_parity,
    )
    from effvision.deploy.tensorrt import (
        ENGINE_FILE,
        TensorRTError,
        TRTSegmentor,
        build_engine,
        load_calibration_batches,
    )

    meta_path, parity_path = osp.join(out_dir, META_FILE), osp.join(out_dir, PARITY_FILE)
    with open(meta_path) as f:
        meta = json.load(f)
    precision = 'int8' if args.int8 else 'fp16' if args.fp16 else 'fp32'
    calib = None
    if args.int8:
        ort_runner = ORTSegmentor.from_dir(out_dir)
        calib = load_calibration_batches(args.calib_dir, ort_runner, limit=args.calib_images)
    engine_path = osp.join(out_dir, ENGINE_FILE)
    try:
        info = build_engine(
            osp.join(out_dir, ONNX_FILE),
            engine_path,
            meta,
            precision=precision,
            calib_batches=calib,
            max_batch=args.max_batch or max(shape[0] for shape in sizes),
            max_size=tuple(args.max_size) if args.max_size else None,
        )
    except (TensorRTError, ValueError) as err:
        _fail(f'{err} (the checked ONNX export in {out_dir} is kept; end2end.engine was not '
              'written)')  # fmt: skip
    runner = TRTSegmentor(engine_path, meta)
    # the sizes of the ONNX check that the engine's profile takes
    sizes = [shape for shape in sizes if _in_profile(runner, shape)]
    if not sizes:
        _fail('the engine takes none of the checked sizes: widen --max-size/--max-batch')
    results = check_parity(model, runner, img, [shape[2:] for shape in sizes])
    needed = REDUCED_PRECISION_AGREEMENT.get(precision, args.min_agreement)
    passed = all(r.passes(needed) for r in results)
    print(format_parity(results).replace('ONNX parity', f'TensorRT {precision} parity'))
    if not passed:
        rejected = osp.join(out_dir, 'end2end.rejected.engine')
        os.replace(engine_path, rejected)
        print(
            f'deploy.py: error: TensorRT {precision} agreement below {needed}; the engine was '
            f'kept as {rejected}, end2end.engine was not written.',
            file=sys.stderr,
        )
        return False
    from dataclasses import asdict

    with open(parity_path) as f:
        parity = json.load(f)
    parity['tensorrt'] = {
        'passed': passed,
        'precision': precision,
        'min_agreement': needed,
        'max_abs_diff': max(r.max_abs_diff for r in results),
        'min_agreement_measured': min(r.agreement for r in results),
        'results': [asdict(r) for r in results],
    }
    meta['tensorrt'] = {'engine_file': ENGINE_FILE, **info}
    for path, content in ((parity_path, parity), (meta_path, meta)):
        tmp = f'{path}.tmp'
        with open(tmp, 'w') as f:
            f.write(json.dumps(content, indent=2) + '\n')
        os.replace(tmp, path)
    return True


def main(argv: list[str] | None = None) -> int:
    """Exports, checks parity, prints the parity line(s); returns the exit status."""
    args = parse_args(argv)
    _check_args(args)

    from mmengine.config import Config

    from effvision.apis import init_model, read_image
    from effvision.deploy.onnx import DEFAULT_OPSET, ExportError, export_onnx, format_parity
    from effvision.utils import CheckpointError

    cfg = Config.fromfile(args.config)
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    shape = tuple(args.shape) if args.shape else default_shape(cfg)
    if shape is None:
        _fail(
            'the config defines no crop size (data_preprocessor.size, crop_size); pass --shape H W.'
        )
    if min(shape) <= 0:
        _fail(f'--shape must be positive, got {shape}.')

    try:
        model = init_model(cfg, args.checkpoint, device='cpu')
    except CheckpointError as err:
        _fail(str(err))
    if (cfg.model.get('test_cfg') or {}).get('mode', 'whole') != 'whole':
        print(
            'deploy.py: note: the config tests in slide mode; the ONNX graph is the whole-image '
            'network, so run it on crops of the export size to reproduce slide inference.',
            file=sys.stderr,
        )
    image_path = args.image
    if image_path is None:
        try:
            image_path = first_val_image(cfg)
        except Exception as err:  # missing data dir, unknown dataset type, ...
            _fail(f'no image for the parity check ({err}); pass one with --image.')
    try:
        img = read_image(image_path)
    except OSError as err:
        _fail(str(err))

    try:
        passed, results, onnx_file = export_onnx(
            model,
            args.out_dir,
            img,
            shape=shape,
            dynamic=args.dynamic is not None,
            dynamic_range=tuple(args.dynamic) if args.dynamic else None,
            opset=args.opset or DEFAULT_OPSET,
            min_agreement=args.min_agreement,
            extra_sizes=args.check_sizes,
            extra_meta={
                'config': osp.abspath(args.config),
                'checkpoint': osp.abspath(args.checkpoint),
                'parity_image': osp.abspath(image_path),
            },
        )
    except ExportError as err:
        _fail(str(err))
    print(format_parity(results))
    if not passed:
        print(
            f'deploy.py: error: parity below --min-agreement {args.min_agreement}; the model was '
            f'kept as {onnx_file} for inspection, end2end.onnx was not written.',
            file=sys.stderr,
        )
        return 1
    stale = osp.join(args.out_dir, 'end2end.engine')
    if osp.exists(stale):  # built from the ONNX file just replaced: it would run the old model
        os.remove(stale)
        print(f'deploy.py: note: removed {stale}, built from the previous export.', file=sys.stderr)
    written = [str(onnx_file), osp.join(args.out_dir, 'deploy.json'), 'parity.json']
    if args.backend == 'tensorrt':
        if not build_tensorrt(args, model, img, args.out_dir, [r.shape for r in results]):
            return 1
        written.insert(1, 'end2end.engine')
    print('wrote ' + ', '.join(written))
    return 0


if __name__ == '__main__':
    sys.exit(main())
