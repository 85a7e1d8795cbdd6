"""Export a segmentor to ONNX and check it against PyTorch with onnxruntime.

Writes ``OUT_DIR/end2end.onnx`` (input ``input``: normalised float32 NCHW; output ``logits``:
(N, num_classes, H, W) at the input size) and ``OUT_DIR/deploy.json`` (classes, palette,
normalisation, shapes, opset, versions, parity), then prints one line::

    ONNX parity: max|Δlogit|=2.1e-06 argmax agreement=100.000% (16384 pixels; NxHxW 1x128x128)

and exits with status 1 when the class agreement is below ``--min-agreement`` at any checked size
(the model is then kept as ``end2end.rejected.onnx``, never as ``end2end.onnx``). With
``--dynamic``, H, W and the batch size stay symbolic, and the check also runs at a second size
(H+32, W+64) with a batch of two, which catches an export that was silently specialised.

Examples::

    python tools/deploy.py CONFIG work_dirs/<stem>/iter_2000.pth --out-dir work_dirs/<stem>/onnx
    python tools/deploy.py CONFIG CKPT --out-dir D --dynamic --shape 512 512 --image demo.jpg
"""

from __future__ import annotations

import argparse
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
        '--dynamic', action='store_true', help='keep batch, height and width symbolic'
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
    """The (H, W) a config trains at: ``data_preprocessor.size``, else ``crop_size``."""
    size = (cfg.model.get('data_preprocessor') or {}).get('size') or cfg.get('crop_size')
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


def main(argv: list[str] | None = None) -> int:
    """Exports, checks parity, prints the parity line; returns the exit status."""
    args = parse_args(argv)
    for label, path in (('config', args.config), ('checkpoint', args.checkpoint)):
        if not osp.isfile(path):
            _fail(f'{label} file not found: {path!r}; pass the path of an existing file.')
    if args.image is not None and not osp.isfile(args.image):
        _fail(f'image not found: {args.image!r}; pass an existing image to --image.')
    if not 0.0 <= args.min_agreement <= 1.0:
        _fail(f'--min-agreement is a fraction in [0, 1], got {args.min_agreement}.')

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
            dynamic=args.dynamic,
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
    print(f'wrote {onnx_file} and {osp.join(args.out_dir, "deploy.json")}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
