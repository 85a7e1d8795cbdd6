"""ONNX export of mmseg-style segmentors, and an onnxruntime runner for the exported model.

The exported graph is the network only::

    input  'input'   float32 (N, 3, H, W), already normalised: (img - mean) / std, after the
                     optional BGR -> RGB flip, exactly as mmseg's SegDataPreProcessor does
    output 'logits'  float32 (N, num_classes, H, W), the decode head's logits resized bilinearly
                     to the input size, as EncoderDecoder.predict does for an unpadded image

(a panoptic kMaX-DeepLab / PEM model has class and mask logits instead, merged on the host:
:mod:`effvision.deploy.panoptic`).

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
from .runner import (
    META_FILE,
    InputShapeError,
    SegmentorRunner,
    logits_to_labels,
    normalize_image,
)

__all__ = [
    'DEFAULT_OPSET',
    'META_FILE',
    'ONNX_FILE',
    'PARITY_FILE',
    'ExportError',
    'InputShapeError',
    'ORTSegmentor',
    'ParityResult',
    'SegLogitsWrapper',
    'check_parity',
    'export_onnx',
    'format_parity',
    'second_shape',
]

ONNX_FILE = 'end2end.onnx'
PARITY_FILE = 'parity.json'
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
# onnxruntime runner
# ---------------------------------------------------------------------------------------------


class ORTSegmentor(SegmentorRunner):
    """Runs an exported ``end2end.onnx`` with onnxruntime, driven by its ``deploy.json``.

    Pre- and post-processing are numpy/OpenCV (:class:`SegmentorRunner`); no mmseg model or
    config is involved.

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

        super().__init__(meta)
        options = ort.SessionOptions()
        options.log_severity_level = 3  # keep ORT's graph-optimisation chatter out of the CLI
        self.session = ort.InferenceSession(
            os.fspath(onnx_file),
            sess_options=options,
            providers=list(providers or ['CPUExecutionProvider']),
        )

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

    def run(self, inputs: np.ndarray) -> dict[str, np.ndarray]:
        """Runs the graph on (N, 3, H, W) normalised float32: every output, by name.

        Raises:
            InputShapeError: The shape is outside what the model was exported for.
        """
        self.check_input(inputs.shape)
        outputs = self.session.run(self.output_names, {self.input_name: inputs})
        return dict(zip(self.output_names, outputs))


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
                f'{type(segmentor).__name__} has no ONNX export yet: semantic segmentors '
                '(EncoderDecoder with one decode_head, DACS) and panoptic mask-classification '
                'models (kMaX-DeepLab, PEM) export; detection models (Mask R-CNN) do not. '
                'Evaluate those with --backend pytorch.'
            )
        self.segmentor = segmentor
        self.align_corners = bool(getattr(head, 'align_corners', False))
        from effvision.models.decode_heads.mask_classification import MaskClassificationHead

        self.mask_classification = isinstance(head, MaskClassificationHead)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) normalised image -> (N, num_classes, H, W) logits.

        For a mask-classification head (kMaX-DeepLab, PEM) the output is its semantic score
        map: class probabilities times mask probabilities summed over the queries, as its
        ``predict`` gives mmseg.
        """
        feats = self.segmentor.extract_feat(input)
        head = self.segmentor.decode_head
        size = input.shape[2:]
        if self.mask_classification:
            from effvision.models.decode_heads.mask_classification import semantic_inference

            outputs = head.forward(feats)
            masks = F.interpolate(
                outputs['pred_masks'], size=size, mode='bilinear',
                align_corners=head.upsample_align_corners(tuple(size)),
            )  # fmt: skip
            return semantic_inference(outputs['pred_logits'], masks, head.mask_activation)
        logits = head.forward(feats)
        return F.interpolate(logits, size=size, mode='bilinear', align_corners=self.align_corners)


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
    meta = dict(
        mean=[float(str(np.float32(v))) for v in mean],
        std=[float(str(np.float32(v))) for v in std],
        # mmseg's SegDataPreProcessor names it channel_conversion, mmengine's (mmdet's) with _
        bgr_to_rgb=bool(
            getattr(dp, 'channel_conversion', getattr(dp, '_channel_conversion', False))
        ),
    )
    if hasattr(dp, 'pad_size_divisor'):  # mmdet: what the host pads a batch to
        meta['pad_size_divisor'] = int(dp.pad_size_divisor)
        meta['pad_value'] = float(dp.pad_value)
    if hasattr(dp, 'canvas'):  # kMaX: every batch is padded to one canvas, zeros after normalising
        meta['canvas'] = list(dp.canvas)
    return meta


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


def _capture(wrapper, example, dynamic: bool, side_range: tuple[int, int] | None = None):
    """torch.export the wrapper, refusing any refinement that would pin or tie H/W/N.

    Returns:
        (exported program, accepted range: {'batch'|'height'|'width': (min, max)}).
    """
    from torch.export import Dim

    n, _, h, w = example.shape
    if not dynamic:
        exported = torch.export.export(wrapper, (example,), strict=False)
        return exported, {'batch': (n, n), 'height': (h, h), 'width': (w, w)}
    lo, hi = side_range or (min(_MIN_SIDE, h, w), max(_MAX_SIDE, h, w))
    spec = {
        'input': {
            0: Dim('batch', min=1, max=max(_MAX_BATCH, n)),
            2: Dim('height', min=lo, max=hi),
            3: Dim('width', min=lo, max=hi),
        }
    }
    for _ in range(3):
        try:
            with _size_oblivious():
                exported = torch.export.export(
                    wrapper, (example,), dynamic_shapes=spec, strict=False
                )
            dims = spec['input']
            return exported, {
                name: (int(dims[axis].min), int(dims[axis].max))
                for axis, name in ((0, 'batch'), (2, 'height'), (3, 'width'))
            }
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
    # panoptic exports: fraction of pixels with the same panoptic id after the host's merging
    panoptic_agreement: float | None = None

    @property
    def ok_shape(self) -> bool:
        return self.error is None

    def passes(self, min_agreement: float) -> bool:
        """Ran, and the class (and panoptic) agreement reach ``min_agreement``."""
        return (
            self.ok_shape
            and self.agreement >= min_agreement
            and (self.panoptic_agreement is None or self.panoptic_agreement >= min_agreement)
        )


def second_shape(
    h: int,
    w: int,
    height_range: tuple[int, int] | None = None,
    width_range: tuple[int, int] | None = None,
) -> tuple[int, int]:
    """The second size a dynamic export is checked at: 32 and 64 px larger (smaller where that
    leaves the range), so that H and W differ from the example by different amounts (a swapped
    or pinned axis shows up)."""

    def move(size: int, step: int, bounds: tuple[int, int] | None) -> int:
        lo, hi = bounds or (1, size + step)
        return size + step if size + step <= hi else max(lo, size - step)

    return move(h, 32, height_range), move(w, 64, width_range)


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
    if runner.task == 'panoptic':
        from .panoptic import check_panoptic_parity

        return check_panoptic_parity(segmentor, runner, img, sizes)
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
    panoptic = [r.panoptic_agreement for r in results if r.panoptic_agreement is not None]
    panoptic_text = f' panoptic agreement={100 * min(panoptic):.3f}%' if panoptic else ''
    return (
        f'ONNX parity: max|Δlogit|={max_diff:.3g} argmax agreement={100 * agreement:.3f}%'
        f'{panoptic_text} ({pixels} pixels; NxHxW {sizes})'
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
    dynamic_range: tuple[int, int] | None = None,
) -> tuple[bool, list[ParityResult], Path]:
    """Exports a segmentor to ``out_dir/end2end.onnx`` + ``deploy.json`` and checks parity.

    The graph is traced from a copy of the model in its deploy form (BatchNorms folded where a
    backbone has ``switch_to_deploy``, fused ops as their reference, export-unsafe modules
    swapped; :func:`effvision.deploy.rewrites.make_exportable`). The files are written under
    temporary names, checked with onnxruntime against the original PyTorch model on ``img`` (at
    ``shape``, and for a dynamic export also at :func:`second_shape` and ``extra_sizes``), and
    only then renamed into place: a failed export or a failed check never leaves a half-written
    or unchecked ``end2end.onnx`` (files from an earlier export stay as they were). A model that
    fails the check is kept as ``end2end.rejected.onnx`` (with ``deploy.rejected.json`` and
    ``parity.rejected.json``) for inspection.

    Args:
        segmentor: An mmseg ``EncoderDecoder`` in eval mode on CPU (SyncBN reverted); a DACS
            model exports its student; a ``PanopticMaskClassifier`` exports its class and mask
            logits (:mod:`effvision.deploy.panoptic`).
        out_dir: Output directory, created if needed.
        img: (H, W, 3) uint8 BGR image for the example input and the parity check.
        shape: (H, W) of the example input; the only size a static export accepts.
        dynamic: Keep N, H and W symbolic.
        opset: ONNX opset version.
        min_agreement: Fraction of pixels whose class must agree, at every checked size.
        dataset_meta: ``classes`` and ``palette``; default ``segmentor.dataset_meta``.
        extra_meta: More keys for ``deploy.json`` (e.g. config and checkpoint paths).
        extra_sizes: More (H, W) sizes to check a dynamic export at.
        dynamic_range: ``(min, max)`` side length a dynamic export accepts for H and W
            (default: 64 to 8192, widened to the example). Recorded in ``deploy.json`` and
            enforced by the runners.

    Returns:
        (passed, parity results, path of the written or rejected ONNX file).

    Raises:
        ExportError: The model cannot be captured as asked (e.g. H/W cannot stay dynamic), or
            the sizes asked for are inconsistent.
    """
    import onnx

    from .panoptic import OUTPUT_NAMES, PanopticLogitsWrapper, is_panoptic

    dataset_meta = dataset_meta or getattr(segmentor, 'dataset_meta', None)
    segmentor = _exported_segmentor(segmentor).eval()
    _check_sizes(shape, dynamic, dynamic_range, extra_sizes)
    panoptic = is_panoptic(segmentor)
    wrapper_type = PanopticLogitsWrapper if panoptic else SegLogitsWrapper
    wrapper_type(segmentor)  # refuses unsupported models before anything is copied
    # the graph is traced from a rewritten copy; parity is checked against the original model
    exportable = make_exportable(segmentor, opset)
    wrapper = wrapper_type(exportable).eval()
    pre = _data_preprocessor_meta(segmentor)
    head = segmentor.panoptic_head if panoptic else segmentor.decode_head
    num_classes = int(getattr(head, 'out_channels', head.num_classes))
    output_names = list(OUTPUT_NAMES) if panoptic else ['logits']

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
            exported, accepted = _capture(wrapper, example, dynamic, dynamic_range)
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
                output_names=output_names,
                opset_version=opset,
                verbose=False,
                optimize=False,  # one optimiser pass below, with limits that fold weights too
            )
        except Exception as err:  # the exporter raises many types; name the op that failed
            raise ExportError(
                f'torch.onnx could not convert the model to ONNX opset {opset}: {_root_cause(err)}'
            ) from err
    model_proto = _fold_weight_constants(program.model_proto)
    if dynamic:
        _rename_dims(model_proto, _symbol_names(exported, tuple(example.shape)))

    meta = dict(dataset_meta or {})
    classes = list(meta.get('classes') or [f'class_{i}' for i in range(max(num_classes, 2))])
    palette = [list(map(int, c)) for c in (meta.get('palette') or [])]
    if panoptic:
        from .panoptic import panoptic_postprocess_meta

        outputs = _graph_outputs(model_proto)
        output, postprocess = outputs[0], panoptic_postprocess_meta(segmentor)
    else:
        outputs = None
        output = {
            'name': 'logits',
            'shape': ['batch', num_classes, 'height', 'width']
            if dynamic
            else [*example.shape[:1], num_classes, *example.shape[2:]],
        }
        postprocess = {
            'resize': 'bilinear',
            'align_corners': bool(getattr(head, 'align_corners', False)),
            'threshold': float(head.threshold) if num_classes == 1 else None,
        }
    deploy = {
        'format': DEPLOY_FORMAT,
        'task': 'panoptic' if panoptic else 'semantic',
        'onnx_file': ONNX_FILE,
        'created': datetime.datetime.now().isoformat(timespec='seconds'),
        'input': {
            'name': 'input',
            'layout': 'NCHW',
            'dtype': 'float32',
            'shape': ['batch', 3, 'height', 'width'] if dynamic else list(example.shape),
            'example_shape': [1, *example.shape[1:]],
            'range': {axis: list(bounds) for axis, bounds in accepted.items()},
        },
        'output': output,
        **({'outputs': outputs} if outputs else {}),
        'dynamic': bool(dynamic),
        'opset': int(
            next(o.version for o in model_proto.opset_import if o.domain in ('', 'ai.onnx'))
        ),
        'deploy_forms': [
            f'{name or "model"}: {type(exportable.get_submodule(name)).__name__}.switch_to_deploy()'
            for name in exportable.deploy_forms
        ]
        + [
            f'{name}: deformable conv as plain ops (opset < 19)'
            for name in exportable.reference_forms
        ],
        'preprocess': pre,
        'postprocess': postprocess,
        'num_classes': num_classes,
        'classes': classes,
        'palette': palette,
        'versions': _versions(),
        **(extra_meta or {}),
    }

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sizes = [tuple(shape)]
    if dynamic:
        sizes.append(second_shape(*shape, accepted['height'], accepted['width']))
        sizes += [tuple(size) for size in extra_sizes]
    final = {name: out_dir / name for name in (ONNX_FILE, META_FILE, PARITY_FILE)}
    rejected = {name: out_dir / _rejected_name(name) for name in final}
    temp = {name: _temp_path(path) for name, path in final.items()}
    try:
        onnx.save_model(model_proto, temp[ONNX_FILE])
        runner = ORTSegmentor(temp[ONNX_FILE], deploy)
        results = check_parity(segmentor, runner, np.ascontiguousarray(img), sizes)
        passed = all(r.passes(min_agreement) for r in results)
        reference = (
            'PanopticMaskClassifier extract_feat + panoptic_head.predict_mask_classification'
            if panoptic
            else 'mmseg EncoderDecoder.encode_decode'
        )
        parity = {
            'passed': passed,
            'backend': 'onnxruntime',
            'min_agreement': min_agreement,
            'reference': f'{reference} (PyTorch, CPU, float32)',
            'image': (extra_meta or {}).get('parity_image'),
            'max_abs_diff': max(r.max_abs_diff for r in results),
            'min_agreement_measured': min(r.agreement for r in results),
            **(
                {'min_panoptic_agreement_measured': min(r.panoptic_agreement for r in results)}
                if panoptic and all(r.ok_shape for r in results)
                else {}
            ),
            'results': [asdict(r) for r in results],
        }
        deploy['parity'] = {'passed': passed, 'file': PARITY_FILE}
        temp[PARITY_FILE].write_text(json.dumps(parity, indent=2) + '\n')
        temp[META_FILE].write_text(json.dumps(deploy, indent=2) + '\n')
        # Rename only now: readers never see a partial or unchecked end2end.onnx. A model that
        # failed the check is kept under names no loader picks up, for inspection.
        target = final if passed else rejected
        for name in (PARITY_FILE, ONNX_FILE, META_FILE):
            os.replace(temp[name], target[name])
    finally:
        for path in temp.values():
            path.unlink(missing_ok=True)
    return passed, results, target[ONNX_FILE]


def _graph_outputs(model_proto) -> list[dict[str, Any]]:
    """Name and shape (ints, or dim names such as 'batch') of every output of the graph."""
    return [
        {
            'name': value.name,
            'shape': [
                dim.dim_param if dim.HasField('dim_param') else int(dim.dim_value)
                for dim in value.type.tensor_type.shape.dim
            ],
        }
        for value in model_proto.graph.output
    ]


def _exported_segmentor(segmentor):
    """The EncoderDecoder that goes into the graph: the model, or a UDA model's student."""
    if getattr(segmentor, 'decode_head', None) is None and hasattr(segmentor, 'model'):
        return segmentor.model
    return segmentor


def _check_sizes(shape, dynamic, dynamic_range, extra_sizes) -> None:
    """Refuses sizes that contradict each other before minutes of tracing are spent."""
    if min(shape) <= 0:
        raise ExportError(f'the export size must be positive, got {tuple(shape)}')
    if not dynamic:
        if extra_sizes:
            raise ExportError(
                'extra check sizes need a dynamic export: a static graph has one size'
            )
        if dynamic_range is not None:
            raise ExportError('a size range needs a dynamic export (--dynamic MIN MAX)')
        return
    if dynamic_range is None:
        return
    lo, hi = dynamic_range
    if not 1 <= lo <= hi:
        raise ExportError(f'the dynamic range needs 1 <= MIN <= MAX, got {lo}..{hi}')
    outside = [tuple(s) for s in [shape, *extra_sizes] if not (lo <= min(s) and max(s) <= hi)]
    if outside:
        raise ExportError(
            f'sizes {outside} are outside the dynamic range {lo}..{hi}; pass an export size '
            '(--shape) and check sizes inside it, or widen the range'
        )


def _fold_weight_constants(model_proto):
    """The exporter's optimiser (onnxscript), folding every computation on weights alone.

    With its default limits the optimiser leaves nodes on tensors above 8192 elements unfolded
    (e.g. MOAT's padding of its depthwise kernels), and onnxruntime 1.31's own constant folding
    breaks on such a Pad (the graph then fails to load: "Node input 'pad_7' is not a graph
    input, initializer, or output of a previous node"). With the limits raised to any weight's
    size, the graph has the same numbers, every backend loads it, and TensorRT is spared the
    work.
    """
    import onnxscript.optimizer

    limit = 1 << 28
    return onnxscript.optimizer.optimize(
        model_proto, input_size_limit=limit, output_size_limit=limit
    )


def _rejected_name(name: str) -> str:
    stem, dot, ext = name.rpartition('.')
    return f'{stem}.rejected{dot}{ext}'


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
