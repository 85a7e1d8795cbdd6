"""Segment one image or every image in a folder, and save the overlay and the label map.

For each input ``<stem>.<ext>`` it writes, in ``--out-dir``:

* ``<stem>_overlay.png``: the prediction, coloured with the dataset palette, blended over the image
  (``--opacity`` is the weight of the colours);
* ``<stem>_label.png``: the class id of every pixel (uint8; uint16 for more than 256 classes).

A panoptic model (kMaX-DeepLab, PEM with an mmdet config) also writes:

* ``<stem>_panoptic.png``: every segment in its class colour (each thing instance a shade of it),
  with white segment borders, blended over the image;
* ``<stem>_panoptic_ids.png``: the segment ids in the COCO panoptic PNG encoding
  (``id = R + 256 G + 256^2 B``) with mmdet's ids (stuff: class id; thing:
  ``class id + 1000 * instance``; unassigned: the number of classes).

``--backend onnxruntime`` runs the model exported by ``tools/deploy.py`` instead: the third
argument is then that folder, and the config's test pipeline and mmseg's post-processing are
used as for the PyTorch model (semantic segmentation only).

Grayscale and RGBA images are converted to BGR. An unreadable image is reported on its line and
skipped; the exit status is 1 if any image failed.

Examples::

    python demo/image_demo.py demo/images CONFIG work_dirs/<stem>/iter_2000.pth --out-dir outputs
    python demo/image_demo.py demo/images CONFIG DEPLOY_DIR --backend onnxruntime
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

INSTANCE_OFFSET = 1000  # mmdet's panoptic id encoding: label + instance * 1000
IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp')


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses the command line."""
    parser = argparse.ArgumentParser(description='Segment images and save overlays and labels')
    parser.add_argument('img', help='an image file, or a folder of images')
    parser.add_argument('config', help='config file')
    parser.add_argument(
        'checkpoint',
        help='checkpoint file; with --backend onnxruntime/tensorrt, the folder tools/deploy.py '
        'wrote',
    )
    parser.add_argument(
        '--backend',
        choices=('pytorch', 'onnxruntime', 'tensorrt'),
        default='pytorch',
        help='run the PyTorch checkpoint (default) or the exported model with onnxruntime or '
        'TensorRT (its end2end.engine, built by tools/deploy.py --backend tensorrt)',
    )
    parser.add_argument('--out-dir', default='outputs', help='output folder (default: outputs)')
    parser.add_argument('--device', default='cpu', help='device, e.g. cpu or cuda:0')
    parser.add_argument(
        '--opacity',
        type=float,
        default=0.5,
        help='weight of the class colours over the image, in [0, 1] (default: 0.5)',
    )
    return parser.parse_args(argv)


def list_images(source: Path, out_dir: Path) -> list[Path]:
    """The image files to process: ``source`` itself, or the images directly inside it."""
    if source.is_file():
        return [source]
    files = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    # A rerun with --out-dir inside the input folder must not segment its own outputs.
    if out_dir.resolve() == source.resolve():
        outputs = ('_overlay', '_label', '_panoptic', '_panoptic_ids')
        files = [p for p in files if not p.stem.endswith(outputs)]
    return files


def colorize(labels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) uint8 BGR colours, from an (K, 3) RGB palette."""
    bgr = np.ascontiguousarray(palette[:, ::-1]).astype(np.uint8)
    return bgr[np.clip(labels, 0, len(bgr) - 1)]


def overlay(img: np.ndarray, labels: np.ndarray, palette: np.ndarray, opacity: float) -> np.ndarray:
    """Blends the coloured labels over a BGR image; ``opacity`` is the colours' weight."""
    blended = img.astype(np.float32) * (1 - opacity) + colorize(labels, palette) * opacity
    return np.clip(blended + 0.5, 0, 255).astype(np.uint8)


def panoptic_colors(panoptic: np.ndarray, palette: np.ndarray, num_classes: int) -> np.ndarray:
    """(H, W) mmdet panoptic ids -> (H, W, 3) uint8 BGR; instances are shades of their class."""
    out = np.zeros((*panoptic.shape, 3), np.float32)
    for segment in np.unique(panoptic):
        label, instance = int(segment % INSTANCE_OFFSET), int(segment // INSTANCE_OFFSET)
        if label >= num_classes:  # void stays black
            continue
        color = palette[label, ::-1].astype(np.float32)
        if instance:  # spread instances of a class over darker and lighter shades
            color = color * (0.55 + 0.9 * ((instance * 0.618034) % 1.0))
        out[panoptic == segment] = color
    return np.clip(out, 0, 255).astype(np.uint8)


def panoptic_overlay(
    img: np.ndarray, panoptic: np.ndarray, palette: np.ndarray, num_classes: int, opacity: float
) -> np.ndarray:
    """Blends the coloured segments over a BGR image and draws the segment borders in white."""
    colors = panoptic_colors(panoptic, palette, num_classes).astype(np.float32)
    blended = img.astype(np.float32) * (1 - opacity) + colors * opacity
    border = np.zeros(panoptic.shape, bool)
    border[:-1] |= panoptic[:-1] != panoptic[1:]
    border[:, :-1] |= panoptic[:, :-1] != panoptic[:, 1:]
    blended[border] = 255
    return np.clip(blended + 0.5, 0, 255).astype(np.uint8)


def ids_to_rgb(ids: np.ndarray) -> np.ndarray:
    """(H, W) segment ids -> (H, W, 3) uint8 BGR of the COCO panoptic encoding (for cv2)."""
    ids = ids.astype(np.uint32)
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536 % 256], axis=-1)
    return rgb[..., ::-1].astype(np.uint8)


def full_palette(dataset_meta: dict, num_classes: int) -> np.ndarray:
    """The dataset palette as a (K, 3) RGB array, extended with fixed random colours if short."""
    palette = [list(c) for c in (dataset_meta or {}).get('palette') or []]
    if len(palette) < num_classes:
        rng = np.random.RandomState(42)
        extra = rng.randint(0, 255, size=(num_classes - len(palette), 3))
        palette += extra.tolist()
    return np.asarray(palette, dtype=np.int64)


def main(argv: list[str] | None = None) -> int:
    """Runs the demo; returns the exit status."""
    args = parse_args(argv)
    source, out_dir = Path(args.img), Path(args.out_dir)
    for label, path in (('input', source), ('config', Path(args.config))):
        if not path.exists():
            sys.exit(f'image_demo.py: error: {label} not found: {str(path)!r}')
    if args.backend == 'pytorch' and not Path(args.checkpoint).is_file():
        sys.exit(f'image_demo.py: error: checkpoint file not found: {args.checkpoint!r}')
    if not 0.0 <= args.opacity <= 1.0:
        sys.exit(f'image_demo.py: error: --opacity must be in [0, 1], got {args.opacity}')
    images = list_images(source, out_dir)
    if not images:
        sys.exit(f'image_demo.py: error: no images ({", ".join(IMAGE_SUFFIXES)}) in {source}')

    import cv2

    from effvision.apis import inference_model, init_model, read_image
    from effvision.apis.inference import num_model_classes
    from effvision.deploy import DeployedModelError, init_deployed_model
    from effvision.utils import CheckpointError

    try:
        if args.backend == 'pytorch':
            model = init_model(args.config, args.checkpoint, device=args.device)
        else:
            model = init_deployed_model(args.config, args.checkpoint, args.backend)
    except (CheckpointError, DeployedModelError) as err:
        sys.exit(f'image_demo.py: error: {err}')
    num_classes = num_model_classes(model)
    palette = full_palette(model.dataset_meta, num_classes)
    out_dir.mkdir(parents=True, exist_ok=True)

    failed = 0
    for path in images:
        try:
            img = read_image(path)
        except OSError as err:
            print(f'{path}: skipped: {err}')
            failed += 1
            continue
        try:
            result = inference_model(model, img)
        except DeployedModelError as err:  # e.g. a static export asked for another size
            sys.exit(f'image_demo.py: error: {path}: {err}')
        sem_seg = result.pred_sem_seg
        labels = (sem_seg.data if 'data' in sem_seg else sem_seg.sem_seg)[0].cpu().numpy()
        overlay_file = out_dir / f'{path.stem}_overlay.png'
        label_file = out_dir / f'{path.stem}_label.png'
        cv2.imwrite(str(overlay_file), overlay(img, labels, palette, args.opacity))
        cv2.imwrite(str(label_file), labels.astype(np.uint8 if num_classes <= 256 else np.uint16))
        written = f'{overlay_file}, {label_file}'
        if 'pred_panoptic_seg' in result:
            panoptic = result.pred_panoptic_seg.sem_seg[0].cpu().numpy()
            panoptic_file = out_dir / f'{path.stem}_panoptic.png'
            ids_file = out_dir / f'{path.stem}_panoptic_ids.png'
            cv2.imwrite(
                str(panoptic_file),
                panoptic_overlay(img, panoptic, palette, num_classes, args.opacity),
            )
            cv2.imwrite(str(ids_file), ids_to_rgb(panoptic))
            things = int(np.sum(np.unique(panoptic) >= INSTANCE_OFFSET))
            written += f', {panoptic_file} ({things} instances), {ids_file}'
        present = np.unique(labels)
        names = model.dataset_meta['classes']
        shown = ', '.join(str(names[i]) if i < len(names) else str(i) for i in present[:6])
        more = f', +{len(present) - 6} more' if len(present) > 6 else ''
        print(
            f'{path} ({img.shape[1]}x{img.shape[0]}) -> {written} '
            f'[{len(present)} classes: {shown}{more}]'
        )
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
