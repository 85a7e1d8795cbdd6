"""ONNX export of mmseg-style segmentors, and an onnxruntime runner for the exported model.

The exported graph is the network only::

    input  'input'   float32 (N, 3, H, W), already normalised: (img - mean) / std, after the
                     optional BGR -> RGB flip, exactly as mmseg's SegDataPreProcessor does
    output 'logits'  float32 (N, num_classes, H, W), the decode head's logits resized bilinearly
                     to the input size, as EncoderDecoder.predict does for an unpadded image

Normalisation, resizing and argmax stay outside the graph so that the same file serves
onnxruntime, TensorRT and any pre/post-processing a deployment prefers; ``deploy.json`` next to
``end2end.onnx`` records what they must do (mean, std, channel order, input shape, classes,
palette) plus the versions that produced the file and the parity it reached.

Dynamic export declares H and W (and N) with ``torch.export.Dim``. ``torch.onnx.export`` on an
``nn.Module`` silently *refines* dims when the model branches on a size (it can pin a size or
restrict it to ``7*k - 6``) and still reports success; we therefore capture the graph with
``torch.export.export`` ourselves, accept only refinements of a dim's min/max range, and refuse
everything else. Parity is then checked at the export size and at a second size.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from effvision.ops import reference_ops

from .rewrites import make_exportable

__all__ = [
    'DEFAULT_OPSET',
    'META_FILE',
    'ONNX_FILE',
    'ExportError',
    'ORTSegmentor',
    'ParityResult',
    'SegLogitsWrapper',
    'check_parity',
    'export_onnx',
    'format_parity',
    'second_shape',
]

ONNX_FILE = 'end2end.onnx'
META_FILE = 'deploy.json'
REJECTED_ONNX_FILE = 'end2end.rejected.onnx'
REJECTED_META_FILE = 'deploy.rejected.json'
DEPLOY_FORMAT = 'effvision-onnx/1'
# Pinned rather than the exporter's default (20 with torch 2.15), so that the file does not change
# with the torch release; current onnxruntime and TensorRT releases read opset 18.
DEFAULT_OPSET = 18
# Dynamic H/W range declared to torch.export: below 2 rows at stride 32, a size-1 feature map is
# special-cased by the tracer (guards such as `H // 32 != 1`), so the range starts at 64 px unless
# the example is smaller.
_MIN_SIDE, _MAX_SIDE, _MAX_BATCH = 64, 8192, 1024


class ExportError(RuntimeError):
    """The model cannot be exported as asked (e.g. its H/W cannot stay dynamic)."""


# ---------------------------------------------------------------------------------------------
# Pre- and post-processing shared by export, parity check and runtime (numpy only)
# ---------------------------------------------------------------------------------------------


def normalize_image(
    img: np.ndarray, mean: Sequence[float], std: Sequence[float], bgr_to_rgb: bool
) -> np.ndarray:
    """Turns a BGR uint8 image into the graph input, as SegDataPreProcessor does.

    Args:
        img: (H, W, 3) uint8 BGR image.
        mean: Per-channel mean, in the channel order after the optional flip.
        std: Per-channel std, same order.
        bgr_to_rgb: Flip BGR to RGB before normalising.

    Returns:
        np.ndarray: (1, 3, H, W) float32.
    """
    if bgr_to_rgb:
        img = img[..., ::-1]
    x = (img.astype(np.float32) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def resize_bilinear(x: np.ndarray, size: tuple[int, int], align_corners: bool) -> np.ndarray:
    """Bilinear resize of (N, C, h, w) to (N, C, H, W), matching ``F.interpolate`` (no antialias).

    cv2.resize would do for ``align_corners=False`` but is capped at 512 channels; this is
    exact for both conventions and any number of classes.
    """
    out_h, out_w = size
    in_h, in_w = x.shape[-2:]
    if (in_h, in_w) == (out_h, out_w):
        return x

    def coords(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if align_corners:
            src = np.arange(n_out, dtype=np.float64) * ((n_in - 1) / max(n_out - 1, 1))
        else:
            src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
            src = np.clip(src, 0, None)
        lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, (src - lo).astype(np.float32)

    y0, y1, wy = coords(out_h, in_h)
    x0, x1, wx = coords(out_w, in_w)
    rows = x[..., y0, :] * (1 - wy)[:, None] + x[..., y1, :] * wy[:, None]
    return rows[..., x0] * (1 - wx) + rows[..., x1] * wx


def logits_to_labels(logits: np.ndarray, threshold: float | None = None) -> np.ndarray:
    """Class ids from (N, C, H, W) logits: argmax, or ``sigmoid > threshold`` when C == 1."""
    if logits.shape[1] == 1:
        thr = 0.3 if threshold is None else threshold
        return (1.0 / (1.0 + np.exp(-logits[:, 0])) > thr).astype(np.int64)
    return logits.argmax(axis=1)


# ---------------------------------------------------------------------------------------------
# onnxruntime runner
# ---------------------------------------------------------------------------------------------


class ORTSegmentor:
    """Runs an exported ``end2end.onnx`` with onnxruntime, driven by its ``deploy.json``.

    Pre- and post-processing are numpy/OpenCV; no mmseg model or config is involved.

    Args:
        onnx_file: Path of the ONNX model.
        meta: The ``deploy.json`` contents, or its path.
        providers: onnxruntime execution providers (default: CPU).

    Example::

        seg = ORTSegmentor.from_dir('work_dirs/deploy')
        labels = seg.predict('demo.jpg')  # (H, W) class ids at the image's size
    """

    def __init__(
        self,
        onnx_file: str | os.PathLike,
        meta: dict[str, Any] | str | os.PathLike,
        providers: Sequence[str] | None = None,
    ) -> None:
        import onnxruntime as ort

        if not isinstance(meta, dict):
            meta = json.loads(Path(meta).read_text())
        self.meta = meta
        options = ort.SessionOptions()
        options.log_severity_level = 3  # keep ORT's graph-optimisation chatter out of the CLI
        self.session = ort.InferenceSession(
            os.fspath(onnx_file),
            sess_options=options,
            providers=list(providers or ['CPUExecutionProvider']),
        )
        self.input_name = meta['input']['name']
        self.output_name = meta['output']['name']

    @classmethod
    def from_dir(
        cls, deploy_dir: str | os.PathLike, providers: Sequence[str] | None = None
    ) -> ORTSegmentor:
        """Loads ``<deploy_dir>/end2end.onnx`` with ``<deploy_dir>/deploy.json``."""
        deploy_dir = Path(deploy_dir)
        for name in (ONNX_FILE, META_FILE):
            if not (deploy_dir / name).is_file():
                raise FileNotFoundError(
                    f'{deploy_dir / name} not found; export the model first with '
                    f'`python tools/deploy.py CONFIG CHECKPOINT --out-dir {deploy_dir}`'
                )
        return cls(deploy_dir / ONNX_FILE, deploy_dir / META_FILE, providers)

    @property
    def classes(self) -> list[str]:
        """Class names, index = class id."""
        return list(self.meta['classes'])

    @property
    def palette(self) -> list[list[int]]:
        """RGB colour of each class."""
        return [list(c) for c in self.meta['palette']]

    @property
    def dynamic(self) -> bool:
        """Whether the graph accepts any H and W (else only ``input_size``)."""
        return bool(self.meta['dynamic'])

    @property
    def input_size(self) -> tuple[int, int]:
        """(H, W) the model was exported at; the only size a static model accepts."""
        h, w = self.meta['input']['example_shape'][2:]
        return int(h), int(w)

    def preprocess(self, img: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
        """Resizes (when needed) and normalises a BGR image into the graph input.

        Args:
            img: (H, W, 3) uint8 BGR image.
            size: (H, W) to feed the model. Default: the export size for a static model, the
                image's own size for a dynamic one.

        Returns:
            np.ndarray: (1, 3, h, w) float32.
        """
        import cv2

        if size is None:
            size = None if self.dynamic else self.input_size
        if size is not None and tuple(img.shape[:2]) != tuple(size):
            img = cv2.resize(img, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
        pre = self.meta['preprocess']
        return normalize_image(img, pre['mean'], pre['std'], pre['bgr_to_rgb'])

    def logits(self, inputs: np.ndarray) -> np.ndarray:
        """Runs the graph: (N, 3, H, W) normalised float32 -> (N, C, H, W) logits."""
        return self.session.run([self.output_name], {self.input_name: inputs})[0]

    def predict(
        self, img: np.ndarray | str | os.PathLike, size: tuple[int, int] | None = None
    ) -> np.ndarray:
        """Predicts the label map of one image, at the image's own size.

        Args:
            img: Image path or array (grayscale and RGBA are converted to BGR).
            size: (H, W) to run the model at; see :meth:`preprocess`.

        Returns:
            np.ndarray: (H, W) class ids, uint8 when the classes fit in it, else int32.
        """
        from effvision.apis.inference import read_image

        img = read_image(img)
        logits = self.logits(self.preprocess(img, size))
        logits = resize_bilinear(logits, img.shape[:2], self.meta['postprocess']['align_corners'])
        labels = logits_to_labels(logits, self.meta['postprocess'].get('threshold'))[0]
        return labels.astype(np.uint8 if logits.shape[1] <= 256 else np.int32)


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------


class SegLogitsWrapper(nn.Module):
    """The part of an ``EncoderDecoder`` that goes into the graph.

    ``extract_feat``, then the decode head's ``forward``, then a bilinear resize to the input size
    with the head's ``align_corners``: what ``EncoderDecoder.predict`` computes in whole mode for
    an unpadded image, without the data samples. mmseg's ``resize`` helper is avoided on purpose:
    with ``align_corners=True`` it calls ``int()`` on the sizes, which pins H and W under
    ``torch.export``.

    Args:
        segmentor: An mmseg ``EncoderDecoder`` (or a subclass with one ``decode_head``).
    """

    def __init__(self, segmentor: nn.Module) -> None:
        super().__init__()
        head = getattr(segmentor, 'decode_head', None)
        if (
            head is None
            or isinstance(head, nn.ModuleList)
            or not hasattr(segmentor, 'extract_feat')
        ):
            raise ExportError(
                f'{type(segmentor).__name__} is not supported for ONNX export: expected an '
                'EncoderDecoder-style segmentor with a single decode_head.'
            )
        self.segmentor = segmentor
        self.align_corners = bool(getattr(head, 'align_corners', False))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) normalised image -> (N, num_classes, H, W) logits."""
        feats = self.segmentor.extract_feat(input)
        logits = self.segmentor.decode_head.forward(feats)
        return F.interpolate(
            logits, size=input.shape[2:], mode='bilinear', align_corners=self.align_corners
        )


def _data_preprocessor_meta(segmentor) -> dict[str, Any]:
    """mean / std / bgr_to_rgb of the model's SegDataPreProcessor, as plain lists."""
    dp = getattr(segmentor, 'data_preprocessor', None)
    mean = getattr(dp, 'mean', None)
    std = getattr(dp, 'std', None)
    if mean is None or std is None or not getattr(dp, '_enable_normalize', True):
        mean, std = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
    else:
        mean, std = mean.flatten().tolist(), std.flatten().tolist()
    # The buffers are float32: write the shortest decimal that round-trips (123.675, not
    # 123.67500305175781), which is what the config said.
    return dict(
        mean=[float(str(np.float32(v))) for v in mean],
        std=[float(str(np.float32(v))) for v in std],
        bgr_to_rgb=bool(getattr(dp, 'channel_conversion', False)),
    )


def _is_range_only(old: dict, new: dict) -> bool:
    """Whether a refined dynamic_shapes spec only narrows ranges (same names, no pins/relations)."""
    for axis, dim in old['input'].items():
        ref = new['input'].get(axis)
        # A pinned axis becomes an int, a related one a derived dim (a Dim subclass).
        if type(ref) is not type(dim) or ref.__name__ != dim.__name__:
            return False
    return True


def _size_oblivious():
    """Trace without specialising on sizes that happen to be 0 or 1 in the example.

    A window or token count of 1 in the example (e.g. Swin's last stage at 128x128) would
    otherwise be baked into the graph as a constant. Private torch config: without it, plain
    tracing (the checks below still refuse a pinned size).
    """
    try:
        import torch.fx.experimental._config as fx_config

        return fx_config.patch(backed_size_oblivious=True)
    except (ImportError, AttributeError):  # pragma: no cover - older/newer torch
        return contextlib.nullcontext()


def _capture(wrapper, example, dynamic: bool):
    """torch.export the wrapper, refusing any refinement that would pin or tie H/W/N."""
    from torch.export import Dim

    if not dynamic:
        return torch.export.export(wrapper, (example,), strict=False)
    n, _, h, w = example.shape
    spec = {
        'input': {
            0: Dim('batch', min=1, max=max(_MAX_BATCH, n)),
            2: Dim('height', min=min(_MIN_SIDE, h), max=max(_MAX_SIDE, h)),
            3: Dim('width', min=min(_MIN_SIDE, w), max=max(_MAX_SIDE, w)),
        }
    }
    for _ in range(3):
        try:
            with _size_oblivious():
                return torch.export.export(wrapper, (example,), dynamic_shapes=spec, strict=False)
        except torch._dynamo.exc.UserError as err:
            msg = getattr(err, 'msg', str(err))
            try:
                refined = torch.export.dynamic_shapes.refine_dynamic_shapes_from_suggested_fixes(
                    msg, spec
                )
            except Exception:
                refined = None
            if refined is None or not _is_range_only(spec, refined):
                what = msg.splitlines()[0].split('!')[0].strip()
                fixes = msg.split('Suggested fixes:', 1)[1] if 'Suggested fixes:' in msg else ''
                fixes = ', '.join(line.strip() for line in fixes.splitlines() if line.strip())
                raise ExportError(
                    'the model cannot keep N/H/W dynamic: it branches on or pins the input size '
                    f'(torch.export: {what}' + (f'; suggested: {fixes}' if fixes else '') + '). '
                    'Export without --dynamic, or make the model size-agnostic (padding and '
                    'reshapes computed from tensor shapes, no int() on sizes).'
                ) from None
            spec = refined
    raise ExportError('torch.export kept asking for other dynamic-shape ranges; export static.')


def _root_cause(err: BaseException) -> str:
    """One line naming the innermost error and, when known, the operator being translated."""
    chain = [err]
    while chain[-1].__cause__ is not None and len(chain) < 20:
        chain.append(chain[-1].__cause__)
    root = chain[-1]
    first_line = (str(root).strip().splitlines() or [''])[0]
    text = f'{type(root).__name__}: {first_line}' if first_line else type(root).__name__
    for link in chain:
        target = re.search(r'target=([\w.:]+)', str(link))
        if target:
            return f'{text} (while translating {target.group(1)})'
    return text


def _rename_dims(model_proto, names: dict[str, str]) -> None:
    """Gives the graph's symbolic dims readable names (torch.export calls them s0, s1, ...)."""
    values = list(model_proto.graph.input) + list(model_proto.graph.output)
    values += list(model_proto.graph.value_info)
    pattern = re.compile(r'\b(' + '|'.join(map(re.escape, names)) + r')\b') if names else None
    for value in values:
        for dim in value.type.tensor_type.shape.dim:
            if pattern is not None and dim.HasField('dim_param'):
                # also inside expressions such as '((s16 - 1)//4) + 1'
                dim.dim_param = pattern.sub(lambda m: names[m.group(1)], dim.dim_param)


def _symbol_names(exported, example_shape: Sequence[int]) -> dict[str, str]:
    """Maps the exported program's input symbols to 'batch' / 'height' / 'width'."""
    node = next(n for n in exported.graph.nodes if n.op == 'placeholder' and n.name == 'input')
    names = {}
    for axis, label in ((0, 'batch'), (2, 'height'), (3, 'width')):
        size = node.meta['val'].shape[axis]
        if not isinstance(size, int) or size != example_shape[axis]:
            names[str(size)] = label
    return names


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    versions = {}
    for pkg in ('torch', 'onnx', 'onnxscript', 'onnxruntime', 'mmengine', 'mmsegmentation', 'mmcv'):
        with contextlib.suppress(md.PackageNotFoundError):
            versions[pkg] = md.version(pkg)
    from effvision import __version__

    versions['effvision'] = __version__
    return versions


@dataclass
class ParityResult:
    """onnxruntime vs PyTorch on one input."""

    shape: tuple[int, ...]  # (N, 3, H, W) of the input
    max_abs_diff: float  # max |logit_ort - logit_torch|
    max_abs_logit: float  # max |logit_torch|, the scale of the above
    agreement: float  # fraction of pixels whose argmax (class id) agrees
    pixels: int  # N * H * W
    error: str | None = None  # onnxruntime refused the input (e.g. a pinned size)

    @property
    def ok_shape(self) -> bool:
        return self.error is None


def second_shape(h: int, w: int) -> tuple[int, int]:
    """The second size a dynamic export is checked at: larger by 32 and 64 px, so that H and W
    differ from the example by different amounts (a swapped or pinned axis shows up)."""
    return h + 32, w + 64


def check_parity(
    segmentor, runner: ORTSegmentor, img: np.ndarray, sizes: Sequence[tuple[int, int]]
) -> list[ParityResult]:
    """Compares onnxruntime with mmseg's own whole-image inference at each size.

    The PyTorch reference is ``segmentor.encode_decode`` (extract_feat, then the decode head's
    ``predict``), not the export wrapper, so a wrapper that drifts from mmseg is caught too.
    For every size after the first, a batch of two (the image and its mirror) is used, which
    also exercises a dynamic batch dimension.

    Args:
        segmentor: The PyTorch segmentor, in eval mode on CPU.
        runner: The exported model.
        img: (H, W, 3) uint8 BGR image.
        sizes: (H, W) sizes to check; the image is resized to each.

    Returns:
        list[ParityResult]: One per size.
    """
    results = []
    for i, size in enumerate(sizes):
        x = runner.preprocess(img, size)
        if i > 0:
            x = np.concatenate([x, np.ascontiguousarray(x[..., ::-1])], axis=0)
        n, _, h, w = x.shape
        metas = [dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w))] * n
        with torch.no_grad():
            ref = segmentor.encode_decode(torch.from_numpy(x), metas).numpy()
        try:
            out = runner.logits(x)
        except Exception as err:  # onnxruntime raises its own exception types
            results.append(
                ParityResult(tuple(x.shape), float('inf'), 0.0, 0.0, n * h * w, str(err))
            )
            continue
        if out.shape != ref.shape:
            results.append(
                ParityResult(
                    tuple(x.shape), float('inf'), 0.0, 0.0, n * h * w,
                    f'onnxruntime returned logits of shape {out.shape}, PyTorch {ref.shape}',
                )
            )  # fmt: skip
            continue
        threshold = runner.meta['postprocess'].get('threshold')
        agree = logits_to_labels(out, threshold) == logits_to_labels(ref, threshold)
        results.append(
            ParityResult(
                shape=tuple(x.shape),
                max_abs_diff=float(np.abs(out - ref).max()),
                max_abs_logit=float(np.abs(ref).max()),
                agreement=float(agree.mean()),
                pixels=int(agree.size),
            )
        )
    return results


def format_parity(results: Sequence[ParityResult]) -> str:
    """The one-line summary: worst logit difference and worst agreement over all sizes."""
    sizes = ', '.join(f'{r.shape[0]}x{r.shape[2]}x{r.shape[3]}' for r in results)
    failed = [r for r in results if not r.ok_shape]
    if failed:
        r = failed[0]
        return (
            f'ONNX parity: FAILED at input {tuple(r.shape)}: {r.error.splitlines()[0]} '
            f'(checked {sizes})'
        )
    max_diff = max(r.max_abs_diff for r in results)
    agreement = min(r.agreement for r in results)
    pixels = sum(r.pixels for r in results)
    return (
        f'ONNX parity: max|Δlogit|={max_diff:.3g} argmax agreement={100 * agreement:.3f}% '
        f'({pixels} pixels; NxHxW {sizes})'
    )


def export_onnx(
    segmentor,
    out_dir: str | os.PathLike,
    img: np.ndarray,
    shape: tuple[int, int],
    dynamic: bool = False,
    opset: int = DEFAULT_OPSET,
    min_agreement: float = 0.999,
    dataset_meta: dict[str, Any] | None = None,
    extra_meta: dict[str, Any] | None = None,
    extra_sizes: Sequence[tuple[int, int]] = (),
) -> tuple[bool, list[ParityResult], Path]:
    """Exports a segmentor to ``out_dir/end2end.onnx`` + ``deploy.json`` and checks parity.

    The files are written under temporary names, checked with onnxruntime against PyTorch on
    ``img`` (at ``shape``, and for a dynamic export also at :func:`second_shape`), and only then
    renamed into place: a failed export or a failed check never leaves a half-written or
    unchecked ``end2end.onnx`` (files from an earlier export stay as they were). A model that
    fails the check is kept as ``end2end.rejected.onnx`` (with ``deploy.rejected.json``) for
    inspection.

    Args:
        segmentor: An mmseg ``EncoderDecoder`` in eval mode on CPU (SyncBN reverted).
        out_dir: Output directory, created if needed.
        img: (H, W, 3) uint8 BGR image for the example input and the parity check.
        shape: (H, W) of the example input; the only size a static export accepts.
        dynamic: Keep N, H and W symbolic.
        opset: ONNX opset version.
        min_agreement: Fraction of pixels whose class must agree, at every checked size.
        dataset_meta: ``classes`` and ``palette``; default ``segmentor.dataset_meta``.
        extra_meta: More keys for ``deploy.json`` (e.g. config and checkpoint paths).
        extra_sizes: More (H, W) sizes to check a dynamic export at.

    Returns:
        (passed, parity results, path of the written or rejected ONNX file).

    Raises:
        ExportError: The model cannot be captured as asked (e.g. H/W cannot stay dynamic).
    """
    import onnx

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    segmentor = segmentor.eval()
    # the graph is traced from a rewritten copy; parity is checked against the original model
    wrapper = SegLogitsWrapper(make_exportable(segmentor)).eval()
    pre = _data_preprocessor_meta(segmentor)
    head = segmentor.decode_head
    num_classes = int(getattr(head, 'out_channels', head.num_classes))

    x = normalize_image(
        np.ascontiguousarray(
            img if tuple(img.shape[:2]) == tuple(shape) else _resize_image(img, shape)
        ),
        pre['mean'],
        pre['std'],
        pre['bgr_to_rgb'],
    )
    # A batch of 2 for dynamic export: torch.export pins a dim whose example size is 1.
    example = torch.from_numpy(np.concatenate([x, x]) if dynamic else x)
    # Fused ops are captured as their PyTorch reference: standard ops every ONNX backend runs
    # (torch.onnx.export on a module does this by itself; we capture with torch.export first).
    with torch.no_grad(), reference_ops():
        try:
            exported = _capture(wrapper, example, dynamic)
        except ExportError:
            raise
        except Exception as err:  # unsupported Python or ops inside the model
            raise ExportError(
                f'torch.export could not capture the model: {_root_cause(err)}'
            ) from err
        try:
            program = torch.onnx.export(
                exported,
                dynamo=True,
                input_names=['input'],
                output_names=['logits'],
                opset_version=opset,
                verbose=False,
                optimize=True,
            )
        except Exception as err:  # the exporter raises many types; name the op that failed
            raise ExportError(
                f'torch.onnx could not convert the model to ONNX opset {opset}: {_root_cause(err)}'
            ) from err
    model_proto = program.model_proto
    if dynamic:
        _rename_dims(model_proto, _symbol_names(exported, tuple(example.shape)))

    meta = dict(dataset_meta or getattr(segmentor, 'dataset_meta', None) or {})
    classes = list(meta.get('classes') or [f'class_{i}' for i in range(max(num_classes, 2))])
    palette = [list(map(int, c)) for c in (meta.get('palette') or [])]
    deploy = {
        'format': DEPLOY_FORMAT,
        'onnx_file': ONNX_FILE,
        'created': datetime.datetime.now().isoformat(timespec='seconds'),
        'input': {
            'name': 'input',
            'layout': 'NCHW',
            'dtype': 'float32',
            'shape': ['batch', 3, 'height', 'width'] if dynamic else list(example.shape),
            'example_shape': [1, *example.shape[1:]],
        },
        'output': {
            'name': 'logits',
            'shape': ['batch', num_classes, 'height', 'width']
            if dynamic
            else [*example.shape[:1], num_classes, *example.shape[2:]],
        },
        'dynamic': bool(dynamic),
        'opset': int(
            next(o.version for o in model_proto.opset_import if o.domain in ('', 'ai.onnx'))
        ),
        'preprocess': pre,
        'postprocess': {
            'resize': 'bilinear',
            'align_corners': bool(getattr(head, 'align_corners', False)),
            'threshold': float(head.threshold) if num_classes == 1 else None,
        },
        'num_classes': num_classes,
        'classes': classes,
        'palette': palette,
        'versions': _versions(),
        **(extra_meta or {}),
    }

    onnx_path, meta_path = out_dir / ONNX_FILE, out_dir / META_FILE
    rejected_onnx, rejected_meta = out_dir / REJECTED_ONNX_FILE, out_dir / REJECTED_META_FILE
    if extra_sizes and not dynamic:
        raise ExportError('extra check sizes need a dynamic export: a static graph has one size')
    sizes = [tuple(shape)] + ([second_shape(*shape), *map(tuple, extra_sizes)] if dynamic else [])
    tmp_onnx, tmp_meta = _temp_path(onnx_path), _temp_path(meta_path)
    try:
        onnx.save_model(model_proto, tmp_onnx)
        runner = ORTSegmentor(tmp_onnx, deploy)
        results = check_parity(segmentor, runner, np.ascontiguousarray(img), sizes)
        passed = all(r.ok_shape and r.agreement >= min_agreement for r in results)
        deploy['parity'] = {
            'passed': passed,
            'min_agreement': min_agreement,
            'reference': 'mmseg EncoderDecoder.encode_decode (PyTorch, CPU)',
            'results': [asdict(r) for r in results],
        }
        tmp_meta.write_text(json.dumps(deploy, indent=2) + '\n')
        # Rename only now: readers never see a partial or unchecked end2end.onnx. A model that
        # failed the check is kept under names no loader picks up, for inspection.
        final_onnx, final_meta = (
            (onnx_path, meta_path) if passed else (rejected_onnx, rejected_meta)
        )
        os.replace(tmp_onnx, final_onnx)
        os.replace(tmp_meta, final_meta)
    finally:
        tmp_onnx.unlink(missing_ok=True)
        tmp_meta.unlink(missing_ok=True)
    return passed, results, final_onnx


def _temp_path(path: Path) -> Path:
    """A fresh hidden file next to ``path`` (same filesystem, so the final rename is atomic)."""
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    os.close(fd)
    # mkstemp makes the file private (0600); give it the mode a plain open() would have.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return Path(tmp)


def _resize_image(img: np.ndarray, size: Sequence[int]) -> np.ndarray:
    import cv2

    return cv2.resize(img, (int(size[1]), int(size[0])), interpolation=cv2.INTER_LINEAR)
