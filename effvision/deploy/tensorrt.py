"""TensorRT backend: build an engine from the exported ``end2end.onnx``, and run it.

``build_engine`` turns the ONNX graph written by ``tools/deploy.py`` into a serialized TensorRT
engine (``end2end.engine``, next to it) with one optimisation profile taken from ``deploy.json``;
:class:`TRTSegmentor` runs that engine with the same pre- and post-processing as the onnxruntime
runner (:class:`~effvision.deploy.runner.SegmentorRunner`).

Precision:

- ``'fp32'``: TF32 is switched off, so that fp32 means fp32 (TensorRT enables TF32 by default).
- ``'fp16'``: fp16 kernels are allowed everywhere except in the layers that lose accuracy in
  fp16 in transformer backbones: normalisation (LayerNorm / GroupNorm), softmax, reductions and
  the elementwise POW of a decomposed LayerNorm (x - mean)^2 (nvbug 3464358; mmdeploy's Swin
  Mask R-CNN lost 5 box AP in fp16 without this). Those layers compute in fp32 and output fp32.
- ``'int8'``: INT8 with post-training entropy calibration (``IInt8EntropyCalibrator2``) on
  images of the target domain, fp16 allowed for the rest, the same layers kept in fp32.

TensorRT versions. 10.x builds fp16 / int8 with builder flags ("weak typing", deprecated since
10.12 but working). TensorRT 11 removed weak typing, the INT8 calibrators and per-layer precision:
there, fp32 builds the same way, fp16 goes through NVIDIA ModelOpt AutoCast (the ONNX graph is
converted to mixed fp16/fp32 with the same op types kept in fp32, then built strongly typed),
and int8 is refused with the fix. Engines are tied to the TensorRT version and the GPU model
they were built with: build on the machine (or an identical one) that will run them.

The ``tensorrt`` module is imported lazily, inside functions: importing this module works
without TensorRT or a GPU, and so do the argument checks and :func:`load_calibration_batches`.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .runner import META_FILE, InputShapeError, SegmentorRunner

__all__ = [
    'CALIBRATION_CACHE_FILE',
    'ENGINE_FILE',
    'FP32_LAYER_TYPES',
    'PRECISIONS',
    'CalibrationBatches',
    'TRTSegmentor',
    'TensorRTError',
    'TensorRTUnavailable',
    'build_engine',
    'engine_profile',
    'load_calibration_batches',
    'unavailable_reason',
]

ENGINE_FILE = 'end2end.engine'
CALIBRATION_CACHE_FILE = 'calibration.cache'
PRECISIONS = ('fp32', 'fp16', 'int8')
# Layers computed in fp32 in fp16 / int8 engines: 'LAYERTYPE' (a trt.LayerType name) or
# 'LAYERTYPE.OP' (ELEMENTWISE / UNARY / REDUCE with that operation only).
FP32_LAYER_TYPES: tuple[str, ...] = ('NORMALIZATION', 'SOFTMAX', 'REDUCE', 'ELEMENTWISE.POW')
# The ONNX op types behind each entry above, for ModelOpt AutoCast (TensorRT >= 11).
_ONNX_OP_TYPES = {
    'NORMALIZATION': ('LayerNormalization', 'GroupNormalization', 'InstanceNormalization'),
    'SOFTMAX': ('Softmax', 'LogSoftmax'),
    'REDUCE': (
        'ReduceMean', 'ReduceSum', 'ReduceMax', 'ReduceMin', 'ReduceProd', 'ReduceL1',
        'ReduceL2', 'ReduceLogSum', 'ReduceLogSumExp', 'ReduceSumSquare',
    ),
    'ELEMENTWISE.POW': ('Pow',),
}  # fmt: skip
_IMAGE_SUFFIXES = frozenset({'.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp', '.ppm'})
_NO_LIMIT = 2**31 - 1  # SegmentorRunner.input_range's "unbounded" for files without a range
_LAYER_SPEC = re.compile(r'^[A-Z][A-Z0-9_]*(\.[A-Z][A-Z0-9_]*)?$')

logger = logging.getLogger(__name__)


class TensorRTUnavailable(RuntimeError):
    """TensorRT or a CUDA GPU is missing; the message says which and how to get it."""


class TensorRTError(RuntimeError):
    """TensorRT could not parse, build or load a model; the message names the cause and the fix."""


# ---------------------------------------------------------------------------------------------
# Availability
# ---------------------------------------------------------------------------------------------


def _pip_name() -> str:
    """The TensorRT wheel matching this PyTorch's CUDA major version."""
    import torch

    cuda = torch.version.cuda or ''
    return 'tensorrt-cu12' if cuda.startswith('12') else 'tensorrt-cu13'


def unavailable_reason() -> str | None:
    """Why TensorRT cannot be used here, or None when it can.

    Returns:
        None when ``import tensorrt`` works and PyTorch sees a CUDA GPU; else one line naming
        what is missing and the fix.
    """
    try:
        import tensorrt
    except ImportError:
        return (
            f'TensorRT is not installed: `pip install {_pip_name()}` (tensorrt-cu13 for CUDA 13, '
            'tensorrt-cu12 for CUDA 12) on a machine with an NVIDIA GPU'
        )
    except Exception as err:  # a wheel for another CUDA, a missing libnvinfer, ...
        first = (str(err).strip().splitlines() or [''])[0]
        return (
            f'TensorRT is installed but cannot be loaded ({type(err).__name__}: {first}): '
            f'reinstall the wheel that matches your CUDA (`pip install --force-reinstall '
            f'{_pip_name()}`)'
        )
    version = str(getattr(tensorrt, '__version__', '0'))
    if not version.split('.')[0].isdigit() or int(version.split('.')[0]) < 10:
        return (
            f'TensorRT {version} is too old: effvision needs TensorRT >= 10 (`pip install -U '
            f'{_pip_name()}`)'
        )
    import torch

    if torch.version.cuda is None:
        return (
            'PyTorch is a CPU-only build: install a CUDA build of torch; TensorRT engines are '
            'built and run on the GPU they are for'
        )
    if not torch.cuda.is_available():
        return (
            'no CUDA GPU is visible: TensorRT engines are built and run on the GPU they are for '
            '(check `nvidia-smi` and CUDA_VISIBLE_DEVICES)'
        )
    return None


def _require_tensorrt():
    """Imports tensorrt, or raises :class:`TensorRTUnavailable` with the reason."""
    reason = unavailable_reason()
    if reason is not None:
        raise TensorRTUnavailable(reason)
    import tensorrt as trt

    return trt


_LOGGER = None


def _trt_logger(trt):
    """The one TensorRT logger of the process: forwards to ``logging``, keeps the errors.

    TensorRT keeps the first logger it is given for process-wide messages, so one instance is
    shared by every builder and runtime made here.
    """
    global _LOGGER
    if _LOGGER is None:

        class _Logger(trt.ILogger):
            def __init__(self) -> None:
                trt.ILogger.__init__(self)
                self.errors: list[str] = []

            def log(self, severity, msg: str) -> None:
                sev = trt.ILogger.Severity
                if severity in (sev.INTERNAL_ERROR, sev.ERROR):
                    self.errors.append(str(msg))
                    logger.error('TensorRT: %s', msg)
                elif severity == sev.WARNING:
                    logger.warning('TensorRT: %s', msg)
                else:
                    logger.debug('TensorRT: %s', msg)

        _LOGGER = _Logger()
    return _LOGGER


def _errors_since(log, start: int) -> str:
    lines = [' '.join(line.split()) for line in log.errors[start:] if line.strip()]
    return '; '.join(lines[-5:]) if lines else 'no error message from TensorRT'


# ---------------------------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------------------------


def _as_runner(meta: Any) -> SegmentorRunner:
    return meta if isinstance(meta, SegmentorRunner) else SegmentorRunner(meta)


def engine_profile(
    meta: dict[str, Any] | str | os.PathLike | SegmentorRunner,
    max_batch: int = 1,
    max_size: tuple[int, int] | None = None,
) -> dict[str, tuple[int, int, int, int]]:
    """The optimisation profile of an engine for an export: min / opt / max input shapes.

    Batch: min and opt are the smallest batch the export accepts (1), max is
    ``min(max_batch, export's max)``. Height and width: the export's range (a static export has
    one size), the max clamped to ``max_size``; opt is the export size (clamped into the range),
    the size TensorRT tunes its kernels for.

    Args:
        meta: ``deploy.json`` contents or path, or a runner built from it.
        max_batch: Largest batch the engine must take.
        max_size: (H, W) upper bound of the engine's sizes, below the export's range. TensorRT
            sizes the execution memory for the max shape, so a dynamic export's range (up to
            8192 px) usually needs one.

    Returns:
        dict: ``'min'``, ``'opt'``, ``'max'``: (N, 3, H, W) each.

    Raises:
        ValueError: The bounds are empty or unbounded.
    """
    if int(max_batch) < 1:
        raise ValueError(f'max_batch must be >= 1, got {max_batch}')
    runner = _as_runner(meta)
    ranges = runner.input_range
    b_lo, b_hi = ranges['batch']
    if max_batch < b_lo:
        raise ValueError(
            f'the export takes batches of {b_lo}..{b_hi}; max_batch={max_batch} is below that'
        )
    lo, hi = [b_lo], [min(int(max_batch), b_hi)]
    opt = [b_lo]
    for i, axis in enumerate(('height', 'width')):
        a_lo, a_hi = ranges[axis]
        if max_size is not None:
            if int(max_size[i]) < a_lo:
                raise ValueError(
                    f"max_size {tuple(max_size)} is below the export's smallest {axis} {a_lo}; "
                    f'give a max_size of at least {a_lo} px'
                )
            a_hi = min(a_hi, int(max_size[i]))
        if a_hi >= _NO_LIMIT:
            raise ValueError(
                f'{META_FILE} declares no upper bound for the {axis} (an export without a '
                'range): pass max_size=(H, W) for the largest input the engine must take, or '
                're-export with tools/deploy.py --dynamic MIN MAX'
            )
        lo.append(a_lo)
        hi.append(a_hi)
        opt.append(min(max(runner.input_size[i], a_lo), a_hi))
    return {
        'min': (lo[0], 3, lo[1], lo[2]),
        'opt': (opt[0], 3, opt[1], opt[2]),
        'max': (hi[0], 3, hi[1], hi[2]),
    }


def _check_layer_spec(fp32_layer_types: Sequence[str]) -> tuple[str, ...]:
    if isinstance(fp32_layer_types, str):
        raise ValueError(
            'fp32_layer_types must be a sequence of names such as ("SOFTMAX", "ELEMENTWISE.POW"), '
            f'not the string {fp32_layer_types!r}'
        )
    spec = tuple(str(s) for s in fp32_layer_types)
    bad = [s for s in spec if not _LAYER_SPEC.match(s)]
    if bad:
        raise ValueError(
            f'fp32_layer_types entries must be trt.LayerType names, optionally with an operation '
            f'("REDUCE", "ELEMENTWISE.POW"); got {bad}'
        )
    return spec


def _check_build_args(
    precision: str,
    calib_batches: Iterable[np.ndarray] | None,
    max_batch: int,
    workspace_gib: float | None,
    fp32_layer_types: Sequence[str],
) -> tuple[str, ...]:
    """Argument checks that need no TensorRT (so that they run, and are tested, everywhere)."""
    if precision not in PRECISIONS:
        raise ValueError(f'unknown precision {precision!r}; choose one of {", ".join(PRECISIONS)}')
    if precision == 'int8':
        if calib_batches is None:
            raise ValueError(
                "precision='int8' needs calibration data: pass calib_batches, e.g. "
                'load_calibration_batches(IMAGE_DIR, SegmentorRunner(meta)) over a few dozen '
                "images of the target domain, or build with precision='fp16'"
            )
        if hasattr(calib_batches, '__len__') and len(calib_batches) == 0:
            raise ValueError('calib_batches is empty: give at least one (N, 3, H, W) batch')
    elif calib_batches is not None:
        raise ValueError(f"calib_batches is only used with precision='int8', not {precision!r}")
    if int(max_batch) < 1:
        raise ValueError(f'max_batch must be >= 1, got {max_batch}')
    if workspace_gib is not None and not workspace_gib > 0:
        raise ValueError(
            f'workspace_gib must be > 0 (or None for all GPU memory), got {workspace_gib}'
        )
    return _check_layer_spec(fp32_layer_types)


def _format_parser_errors(parser) -> str:
    """The ONNX parser's errors, one per line: operator, node and description."""
    lines = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        try:
            where = f'{err.node_operator()} node {err.node_name()!r}' if err.node_name() else ''
            lines.append(f'{where}: {err.desc()}' if where else str(err.desc()))
        except AttributeError:  # an older parser without node_name / node_operator
            lines.append(str(err))
    return '\n  '.join(lines) if lines else 'no error reported by the parser'


def _layer_key(trt, layer) -> tuple[str, str | None]:
    """(LayerType name, operation name or None) of a network layer."""
    kind = layer.type.name
    classes = {
        'ELEMENTWISE': 'IElementWiseLayer',
        'UNARY': 'IUnaryLayer',
        'REDUCE': 'IReduceLayer',
    }
    if kind in classes and hasattr(trt, classes[kind]):
        # get_layer returns the base ILayer; the subclass exposes .op (as polygraphy does).
        layer.__class__ = getattr(trt, classes[kind])
        return kind, layer.op.name
    return kind, None


def _is_float(trt, tensor) -> bool:
    return tensor is not None and tensor.dtype in (
        trt.DataType.FLOAT,
        trt.DataType.HALF,
        getattr(trt.DataType, 'BF16', trt.DataType.FLOAT),
    )


def _keep_fp32(trt, network, spec: Sequence[str]) -> dict[str, int]:
    """Runs the layers named by ``spec`` in fp32 with fp32 outputs (TensorRT 10 weak typing).

    Only layers whose inputs and outputs are all floating point are touched: the same layer
    types also compute shapes (int32/int64), which must keep their type.

    Returns:
        dict: How many layers of each spec entry were forced.
    """
    known = set(trt.LayerType.__members__)
    unknown = [s for s in spec if s.split('.')[0] not in known]
    if unknown:
        raise ValueError(
            f'fp32_layer_types {unknown} are not TensorRT layer types; known: {sorted(known)}'
        )
    counts = dict.fromkeys(spec, 0)
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        kind, op = _layer_key(trt, layer)
        entry = next((s for s in (f'{kind}.{op}', kind) if s in counts), None)
        if entry is None:
            continue
        inputs = [layer.get_input(j) for j in range(layer.num_inputs)]
        outputs = [layer.get_output(j) for j in range(layer.num_outputs)]
        if not outputs or not all(_is_float(trt, t) for t in outputs):
            continue
        if not all(t is None or _is_float(trt, t) for t in inputs):
            continue
        with warnings.catch_warnings():  # deprecated since 10.12, superseded by strong typing
            warnings.simplefilter('ignore', DeprecationWarning)
            layer.precision = trt.DataType.FLOAT
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.DataType.FLOAT)
        counts[entry] += 1
    return counts


def _make_calibrator(trt, batches: Iterator[np.ndarray], first: np.ndarray, device):
    """An ``IInt8EntropyCalibrator2`` feeding ``first`` then ``batches`` from GPU memory.

    TensorRT swallows exceptions raised inside ``get_batch`` (it prints them and ends the
    calibration early), so a bad batch is recorded in ``.error`` and re-raised after the build.
    """

    class _Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.shape = tuple(first.shape)
            self.pending: np.ndarray | None = first
            self.batches = batches
            self.count = 0
            self.error: Exception | None = None
            self.cache: bytes | None = None
            self._buffer = None  # keeps the current batch alive on the GPU

        def get_batch_size(self) -> int:
            return self.shape[0]  # deprecated (implicit batch); the shapes come from the profile

        def get_batch(self, names):
            try:
                if self.pending is not None:
                    batch, self.pending = self.pending, None
                else:
                    batch = next(self.batches, None)
                if batch is None:
                    return None
                batch = _check_calibration_batch(batch, self.shape, self.count)
                self._buffer = _to_device(batch, device)
                self.count += 1
                return [int(self._buffer.data_ptr())] * len(names)
            except Exception as err:  # TensorRT would swallow it
                self.error = err
                return None

        def read_calibration_cache(self):
            # Never reuse a cache: one from another model or data set would silently
            # calibrate this engine wrongly. Calibration is cheap next to the build.
            return None

        def write_calibration_cache(self, cache) -> None:
            self.cache = bytes(cache)

    return _Calibrator()


def _to_device(batch: np.ndarray, device):
    """A float32 copy of ``batch`` on ``device`` (a torch tensor; its data_ptr feeds TensorRT)."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(device)


def _check_calibration_batch(batch: Any, shape: tuple[int, ...] | None, index: int) -> np.ndarray:
    """A calibration batch as C-contiguous float32 (N, 3, H, W) of ``shape`` (when given)."""
    if not isinstance(batch, np.ndarray):
        raise TypeError(
            f'calibration batch {index} is a {type(batch).__name__}; calib_batches must yield '
            '(N, 3, H, W) float32 numpy arrays (see load_calibration_batches)'
        )
    if batch.ndim != 4 or batch.shape[1] != 3:
        raise ValueError(
            f'calibration batch {index} has shape {batch.shape}; expected (N, 3, H, W) '
            'normalised images (see load_calibration_batches)'
        )
    if not np.issubdtype(batch.dtype, np.floating):
        raise ValueError(
            f'calibration batch {index} is {batch.dtype}; expected float32 normalised images, '
            'as runner.preprocess gives (not raw uint8 pixels)'
        )
    if shape is not None and tuple(batch.shape) != tuple(shape):
        raise ValueError(
            f'calibration batch {index} has shape {tuple(batch.shape)} but the first had '
            f'{tuple(shape)}; INT8 calibration runs at one shape: give every batch the same '
            'size (load_calibration_batches resizes to one size)'
        )
    return np.ascontiguousarray(batch, dtype=np.float32)


def _autocast_fp16(onnx_file: Path, op_types: Sequence[str], sample: dict[str, np.ndarray]):
    """The ONNX model in mixed fp16 / fp32 by ModelOpt AutoCast (for TensorRT >= 11).

    ``op_types`` stay in fp32; inputs and outputs stay fp32 (``keep_io_types``), so the engine
    is fed and read like an fp32 one.
    """
    try:
        from modelopt.onnx.autocast import convert_to_mixed_precision
    except ImportError:
        raise TensorRTError(
            'TensorRT >= 11 builds fp16 only from an fp16 ONNX graph (weak typing was removed): '
            "`pip install 'nvidia-modelopt[onnx]'` (AutoCast converts the graph), or install "
            "TensorRT 10 (`pip install 'tensorrt-cu13<11'`), or build with precision='fp32'"
        ) from None
    with tempfile.TemporaryDirectory(prefix='effvision-autocast-') as tmp:
        # AutoCast runs the graph on this input to keep large-magnitude nodes in fp32.
        data = Path(tmp) / 'sample.npz'
        np.savez(data, **sample)
        return convert_to_mixed_precision(
            onnx_path=str(onnx_file),
            low_precision_type='fp16',
            op_types_to_exclude=list(op_types),
            keep_io_types=True,
            calibration_data=str(data),
        )


def _parse(trt, builder, log, onnx_file: Path, runner, precision: str, spec, opt_shape):
    """Parses the ONNX file into a new network (through AutoCast for fp16 on TensorRT >= 11).

    Returns:
        (network, parser, fp32 layer counts when AutoCast decided them, else None).
    """
    network = builder.create_network(0)  # explicit batch (the only mode since 10.0)
    parser = trt.OnnxParser(network, log)
    counts = None
    if precision == 'fp16' and not hasattr(trt.BuilderFlag, 'FP16'):
        rng = np.random.default_rng(0)  # AutoCast's reference input, at the tuned shape
        sample = {runner.input_name: rng.standard_normal(opt_shape, dtype=np.float32)}
        op_types = [op for s in spec for op in _ONNX_OP_TYPES[s]]
        mixed = _autocast_fp16(onnx_file, op_types, sample)
        counts = {s: sum(n.op_type in _ONNX_OP_TYPES[s] for n in mixed.graph.node) for s in spec}
        parsed = parser.parse(mixed.SerializeToString())
    else:
        parsed = parser.parse_from_file(str(onnx_file))
    if not parsed:
        raise TensorRTError(
            f'TensorRT {trt.__version__} cannot import {onnx_file}:\n  '
            f'{_format_parser_errors(parser)}\nThe graph uses an operator or pattern this '
            'TensorRT does not support: run the model with onnxruntime (--backend '
            'onnxruntime), or re-export with another opset (tools/deploy.py --opset) or with '
            'the unsupported op rewritten (effvision/deploy/rewrites.py)'
        )
    inputs = [network.get_input(i).name for i in range(network.num_inputs)]
    if inputs != [runner.input_name]:
        raise TensorRTError(
            f'{onnx_file} has inputs {inputs} but {META_FILE} describes one input '
            f'{runner.input_name!r}; the two files are from different exports: export again'
        )
    return network, parser, counts


def build_engine(
    onnx_file: str | os.PathLike,
    engine_file: str | os.PathLike,
    meta: dict[str, Any] | str | os.PathLike,
    *,
    precision: str = 'fp32',
    calib_batches: Iterable[np.ndarray] | None = None,
    max_batch: int = 1,
    max_size: tuple[int, int] | None = None,
    workspace_gib: float | None = None,
    fp32_layer_types: Sequence[str] = FP32_LAYER_TYPES,
    device: int = 0,
) -> dict[str, Any]:
    """Builds a TensorRT engine from an exported ONNX model and writes it atomically.

    One optimisation profile (:func:`engine_profile`) covers the shapes the engine accepts. The
    engine is written under a temporary name and renamed into place only after a successful
    build, so a failed build leaves any earlier ``engine_file`` as it was and nothing
    half-written. With ``precision='int8'`` the calibration cache is written next to the engine
    as ``calibration.cache`` (for inspection and for other tools; it is never read back).

    Args:
        onnx_file: ``end2end.onnx`` written by ``tools/deploy.py``.
        engine_file: Output path, usually ``<deploy_dir>/end2end.engine``.
        meta: The export's ``deploy.json`` contents or path.
        precision: ``'fp32'``, ``'fp16'`` or ``'int8'`` (see the module docstring).
        calib_batches: For ``'int8'`` only: an iterable of (N, 3, H, W) float32 normalised
            batches, all of one shape the export accepts (:func:`load_calibration_batches`).
        max_batch: Largest batch the engine takes (clamped to the export's).
        max_size: (H, W) upper bound of the engine's input sizes (see :func:`engine_profile`).
        workspace_gib: Cap on TensorRT's scratch memory during the build and at run time
            (default: TensorRT's, the GPU's memory).
        fp32_layer_types: For fp16 / int8: layers kept in fp32, as ``trt.LayerType`` names,
            optionally restricted to one operation (``'ELEMENTWISE.POW'``). Pass ``()`` to let
            TensorRT choose everywhere.
        device: CUDA device index to build on (the engine runs on this GPU model only).

    Returns:
        dict: Build record for ``deploy.json`` (store it under ``'tensorrt'``; :class:`TRTSegmentor`
        reads it to explain a failed load): ``tensorrt_version``, ``precision``, ``typing``,
        ``profile`` (min/opt/max shapes), ``fp32_layers`` (count) and ``fp32_layer_counts``,
        ``tf32``, ``calibration``, ``build_seconds``, ``gpu``, ``compute_capability``,
        ``engine_file``, ``engine_bytes``.

    Raises:
        ValueError: Bad arguments (unknown precision, int8 without calibration batches, ...).
        TensorRTUnavailable: No TensorRT or no GPU here.
        FileNotFoundError: ``onnx_file`` does not exist.
        TensorRTError: The ONNX graph cannot be parsed or the engine cannot be built.
    """
    spec = _check_build_args(precision, calib_batches, max_batch, workspace_gib, fp32_layer_types)
    runner = _as_runner(meta)
    profile = engine_profile(runner, max_batch=max_batch, max_size=max_size)
    trt = _require_tensorrt()
    import torch

    onnx_file, engine_file = Path(onnx_file), Path(engine_file)
    if not onnx_file.is_file():
        raise FileNotFoundError(
            f'{onnx_file} not found; export the model first with `python tools/deploy.py CONFIG '
            f'CHECKPOINT --out-dir {onnx_file.parent}`'
        )
    weak_typing = hasattr(trt.BuilderFlag, 'FP16')  # removed in TensorRT 11
    if precision == 'int8' and not weak_typing:
        raise TensorRTError(
            f'TensorRT {trt.__version__} has no INT8 calibration (removed in 11.0 in favour of '
            "explicit Q/DQ quantization): install TensorRT 10 (`pip install 'tensorrt-cu13<11'`) "
            "for int8, or build with precision='fp16'"
        )
    unknown = [s for s in spec if s not in _ONNX_OP_TYPES]
    if precision == 'fp16' and not weak_typing and unknown:
        raise ValueError(
            f'with TensorRT >= 11, fp32_layer_types can only name {sorted(_ONNX_OP_TYPES)} '
            f'(mapped to ONNX op types for AutoCast); got {unknown}'
        )
    first = batches = None
    if precision == 'int8':
        batches = iter(calib_batches)
        first = next(batches, None)
        if first is None:
            raise ValueError('calib_batches is empty: give at least one (N, 3, H, W) batch')
        first = _check_calibration_batch(first, None, 0)
        runner.check_input(first.shape)

    device = torch.device('cuda', int(device))
    log = _trt_logger(trt)
    start_errors = len(log.errors)
    t0 = time.perf_counter()
    with torch.cuda.device(device):
        builder = trt.Builder(log)
        # the parser owns the weights the network points to: keep it alive until the build ends
        network, parser, fp32_counts = _parse(
            trt, builder, log, onnx_file, runner, precision, spec, profile['opt']
        )
        config = builder.create_builder_config()
        if hasattr(trt.BuilderFlag, 'TF32'):
            config.clear_flag(trt.BuilderFlag.TF32)  # on by default; fp32 layers stay fp32
        if workspace_gib is not None:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
        opt_profile = builder.create_optimization_profile()
        opt_profile.set_shape(runner.input_name, profile['min'], profile['opt'], profile['max'])
        config.add_optimization_profile(opt_profile)

        calibrator = None
        typing = 'strong (ModelOpt AutoCast fp16/fp32 ONNX)' if fp32_counts is not None else 'fp32'
        if precision in ('fp16', 'int8') and weak_typing:
            typing = 'weak (builder flags, per-layer fp32 constraints)'
            config.set_flag(trt.BuilderFlag.FP16)
            if precision == 'int8':
                config.set_flag(trt.BuilderFlag.INT8)
                calibrator = _make_calibrator(trt, batches, first, device)
                config.int8_calibrator = calibrator
                # calibration runs at one shape: the batches' own
                calib_profile = builder.create_optimization_profile()
                shape = tuple(first.shape)
                calib_profile.set_shape(runner.input_name, shape, shape, shape)
                config.set_calibration_profile(calib_profile)
            fp32_counts = _keep_fp32(trt, network, spec)
            # OBEY, not PREFER: PREFER lets TensorRT silently run a constrained layer in fp16
            # when it finds that faster, which is exactly the accuracy loss these constraints
            # exist to prevent. Every layer type kept here has fp32 kernels, so OBEY cannot
            # make the build fail for want of an implementation.
            if any(fp32_counts.values()):
                config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        fp32_counts = fp32_counts or {}

        serialized = builder.build_serialized_network(network, config)
        if calibrator is not None and calibrator.error is not None:
            raise calibrator.error  # raised inside get_batch, where TensorRT swallowed it
        if serialized is None:
            raise TensorRTError(
                f'TensorRT {trt.__version__} could not build the engine: '
                f'{_errors_since(log, start_errors)}. If it ran out of memory, lower max_batch or '
                "max_size (the profile's max shape sizes the memory); if a layer has no "
                "implementation at this precision, build with precision='fp32'"
            )
        if calibrator is not None and calibrator.count == 0:
            raise ValueError('INT8 calibration used no batch: calib_batches yielded nothing usable')
        build_seconds = time.perf_counter() - t0
        gpu = torch.cuda.get_device_name(device)
        capability = '.'.join(map(str, torch.cuda.get_device_capability(device)))

    engine_file.parent.mkdir(parents=True, exist_ok=True)
    data = memoryview(serialized)
    _write_atomic(engine_file, data)
    calibration = None
    if calibrator is not None:
        calibration = {'batches': calibrator.count, 'shape': list(calibrator.shape)}
        if calibrator.cache:
            _write_atomic(engine_file.parent / CALIBRATION_CACHE_FILE, calibrator.cache)
            calibration['cache'] = CALIBRATION_CACHE_FILE
    return {
        'engine_file': engine_file.name,
        'tensorrt_version': str(trt.__version__),
        'precision': precision,
        'typing': typing,
        'profile': {key: list(shape) for key, shape in profile.items()},
        'fp32_layers': int(sum(fp32_counts.values())),
        'fp32_layer_counts': fp32_counts,
        'tf32': False,
        'workspace_gib': workspace_gib,
        'calibration': calibration,
        'build_seconds': round(build_seconds, 2),
        'gpu': gpu,
        'compute_capability': capability,
        'engine_bytes': int(data.nbytes),
    }


def _write_atomic(path: Path, data: bytes | memoryview) -> None:
    """Writes ``data`` to a temporary file next to ``path``, then renames it into place."""
    from .onnx import _temp_path

    tmp = _temp_path(path)
    try:
        with open(tmp, 'wb') as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Calibration data
# ---------------------------------------------------------------------------------------------


class CalibrationBatches:
    """Calibration batches read lazily from image files; iterable any number of times.

    Built by :func:`load_calibration_batches`, which checks the folder up front.

    Args:
        files: Image paths, in order.
        runner: Gives the preprocessing (:meth:`SegmentorRunner.preprocess`).
        size: (H, W) every image is resized to.
        batch_size: Images per batch; the images after the last full batch are not used.
    """

    def __init__(
        self,
        files: Sequence[Path],
        runner: SegmentorRunner,
        size: tuple[int, int],
        batch_size: int,
    ) -> None:
        self.files = list(files)
        self.runner = runner
        self.size = (int(size[0]), int(size[1]))
        self.batch_size = int(batch_size)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(N, 3, H, W) of every batch."""
        return (self.batch_size, 3, *self.size)

    def __len__(self) -> int:
        return len(self.files) // self.batch_size

    def __iter__(self) -> Iterator[np.ndarray]:
        from effvision.apis.inference import ImageReadError, read_image

        for b in range(len(self)):
            images = []
            for path in self.files[b * self.batch_size : (b + 1) * self.batch_size]:
                try:
                    img = read_image(path)
                except (ImageReadError, FileNotFoundError) as err:
                    raise ImageReadError(
                        f'{err}; remove it from the calibration folder or replace it'
                    ) from None
                images.append(self.runner.preprocess(img, self.size))
            yield np.concatenate(images, axis=0)


def load_calibration_batches(
    calib_dir: str | os.PathLike,
    runner: SegmentorRunner | dict[str, Any] | str | os.PathLike,
    size: tuple[int, int] | None = None,
    limit: int | None = 64,
    batch_size: int = 1,
) -> CalibrationBatches:
    """INT8 calibration batches from the images of a folder, preprocessed as at inference.

    Images (jpg, png, bmp, tif, webp, ppm) are found in ``calib_dir`` and its subfolders, in
    sorted path order, so that the same folder always gives the same batches. Each image is
    resized to ``size`` and normalised with ``runner.preprocess``; images are read when the
    batches are iterated, not here.

    Args:
        calib_dir: Folder of images from the target domain (a few dozen suffice).
        runner: A runner of the export (``SegmentorRunner(meta)``), or its ``deploy.json``.
        size: (H, W) of the calibration inputs. Default: the export size, the shape the engine
            is tuned for. INT8 calibration runs at one shape, so all images are resized to it.
        limit: Use at most this many images (the first in sorted order); None for all.
        batch_size: Images per batch. Images after the last full batch are not used.

    Returns:
        CalibrationBatches: Iterable of (batch_size, 3, H, W) float32 arrays; ``len()`` is
        the number of batches.

    Raises:
        FileNotFoundError: ``calib_dir`` does not exist.
        NotADirectoryError: ``calib_dir`` is a file.
        ValueError: No images in the folder, fewer than ``batch_size``, a bad ``limit`` or
            ``batch_size``, or a ``size`` the export does not accept.
    """
    runner = _as_runner(runner)
    if int(batch_size) < 1:
        raise ValueError(f'batch_size must be >= 1, got {batch_size}')
    if limit is not None and int(limit) < 1:
        raise ValueError(f'limit must be >= 1 (or None for all images), got {limit}')
    folder = Path(calib_dir).expanduser()
    if not folder.exists():
        raise FileNotFoundError(
            f'calibration image folder not found: {folder} (resolved from {Path.cwd()}); give a '
            'folder of images from the target domain (e.g. some validation images)'
        )
    if not folder.is_dir():
        raise NotADirectoryError(f'{folder} is a file; give the folder of calibration images')
    files = sorted(
        (p for p in folder.rglob('*') if p.suffix.lower() in _IMAGE_SUFFIXES and p.is_file()),
        key=lambda p: p.relative_to(folder).as_posix(),
    )
    if not files:
        raise ValueError(
            f'no images in {folder} (looked for {", ".join(sorted(_IMAGE_SUFFIXES))}, '
            'subfolders included); put a few dozen images of the target domain there'
        )
    if limit is not None:
        files = files[: int(limit)]
    if len(files) < batch_size:
        raise ValueError(
            f'{len(files)} calibration image(s) in {folder} (limit {limit}) do not fill one '
            f'batch of {batch_size}: add images or lower batch_size'
        )
    size = tuple(runner.input_size if size is None else (int(size[0]), int(size[1])))
    runner.check_input((int(batch_size), 3, *size))
    return CalibrationBatches(files, runner, size, int(batch_size))


# ---------------------------------------------------------------------------------------------
# Runner
# ---------------------------------------------------------------------------------------------


def _torch_dtype(trt, dtype):
    import torch

    table = {
        trt.DataType.FLOAT: torch.float32,
        trt.DataType.HALF: torch.float16,
        trt.DataType.INT32: torch.int32,
        trt.DataType.INT64: torch.int64,
        trt.DataType.INT8: torch.int8,
        trt.DataType.BOOL: torch.bool,
    }
    if hasattr(trt.DataType, 'BF16'):
        table[trt.DataType.BF16] = torch.bfloat16
    if dtype not in table:
        raise TensorRTError(f'the engine has an I/O tensor of type {dtype}, which is not supported')
    return table[dtype]


class TRTSegmentor(SegmentorRunner):
    """Runs a TensorRT ``end2end.engine`` built by :func:`build_engine`, driven by ``deploy.json``.

    Pre- and post-processing are those of :class:`SegmentorRunner`. The shapes it accepts are
    those of the engine's optimisation profile (read from the engine itself), which can be
    narrower than the ONNX export's range. One instance is not safe to call from several
    threads at once (one execution context).

    Args:
        engine_file: Path of the serialized engine.
        meta: The ``deploy.json`` contents, or its path.
        device: CUDA device index (or ``'cuda:N'``) to run on; the GPU model the engine was
            built for.

    Example::

        seg = TRTSegmentor.from_dir('work_dirs/deploy')
        labels = seg.predict('demo.jpg')  # (H, W) class ids at the image's size
    """

    def __init__(
        self,
        engine_file: str | os.PathLike,
        meta: dict[str, Any] | str | os.PathLike,
        device: int | str | Any = 0,
    ) -> None:
        super().__init__(meta)
        trt = _require_tensorrt()
        import torch

        self._trt = trt
        if isinstance(device, int):
            device = torch.device('cuda', device)
        self.device = torch.device(device)
        if self.device.type != 'cuda':
            raise ValueError(f'TensorRT runs on a CUDA device, not {self.device}')
        index = self.device.index or 0
        if index >= torch.cuda.device_count():
            raise ValueError(
                f'CUDA device {index} does not exist ({torch.cuda.device_count()} visible); '
                'pass device=0 or check CUDA_VISIBLE_DEVICES'
            )
        self.device = torch.device('cuda', index)
        engine_file = Path(engine_file)
        if not engine_file.is_file():
            raise FileNotFoundError(
                f'{engine_file} not found; build it with `python tools/deploy.py CONFIG '
                f'CHECKPOINT --out-dir {engine_file.parent} --backend tensorrt`'
            )
        log = _trt_logger(trt)
        start_errors = len(log.errors)
        with torch.cuda.device(self.device):
            self._runtime = trt.Runtime(log)
            try:
                self.engine = self._runtime.deserialize_cuda_engine(engine_file.read_bytes())
            except Exception as err:  # some releases raise instead of returning None
                log.errors.append(f'{type(err).__name__}: {err}')
                self.engine = None
            if self.engine is None:
                raise TensorRTError(self._load_failure(engine_file, log, start_errors))
            self.context = self.engine.create_execution_context()
            if self.context is None:
                raise TensorRTError(
                    f'TensorRT could not create an execution context for {engine_file}: '
                    f'{_errors_since(log, start_errors)}. It needs GPU memory for the largest '
                    'shape of the profile: free GPU memory, or rebuild with a smaller max_batch '
                    '/ max_size'
                )
            self.stream = torch.cuda.Stream(self.device)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._outputs = [n for n in names if n not in inputs]
        if inputs != [self.input_name] or not set(self.output_names) <= set(self._outputs):
            raise TensorRTError(
                f'{engine_file} has inputs {inputs} and outputs {self._outputs} but {META_FILE} '
                f'describes input {self.input_name!r} and outputs {self.output_names}: the '
                'engine was built from another export; rebuild it (tools/deploy.py ... --backend '
                'tensorrt)'
            )
        lo, opt, hi = (tuple(d) for d in self.engine.get_tensor_profile_shape(self.input_name, 0))
        self.profile = {'min': lo, 'opt': opt, 'max': hi}

    def _load_failure(self, engine_file: Path, log, start_errors: int) -> str:
        """Why the engine did not deserialise, with what it was built with when known."""
        import torch

        built = self.meta.get('tensorrt') or {}
        here_gpu = torch.cuda.get_device_name(self.device)
        here = f'TensorRT {self._trt.__version__} on {here_gpu}'
        there = ''
        if built.get('tensorrt_version') or built.get('gpu'):
            there = (
                f' It was built with TensorRT {built.get("tensorrt_version", "?")} on '
                f'{built.get("gpu", "?")}; this machine has {here}.'
            )
        return (
            f'TensorRT could not load {engine_file}: {_errors_since(log, start_errors)}.{there} '
            'An engine only loads with the TensorRT version and on the GPU model it was built '
            'with (or the file is truncated): rebuild it on this machine with `python '
            f'tools/deploy.py CONFIG CHECKPOINT --out-dir {engine_file.parent} --backend tensorrt`'
        )

    @classmethod
    def from_dir(cls, deploy_dir: str | os.PathLike, device: int | str = 0) -> TRTSegmentor:
        """Loads ``<deploy_dir>/end2end.engine`` with ``<deploy_dir>/deploy.json``."""
        deploy_dir = Path(deploy_dir)
        for name in (ENGINE_FILE, META_FILE):
            if not (deploy_dir / name).is_file():
                raise FileNotFoundError(
                    f'{deploy_dir / name} not found; build the engine first with '
                    f'`python tools/deploy.py CONFIG CHECKPOINT --out-dir {deploy_dir} '
                    '--backend tensorrt`'
                )
        return cls(deploy_dir / ENGINE_FILE, deploy_dir / META_FILE, device)

    @property
    def input_range(self) -> dict[str, tuple[int, int]]:
        """Inclusive ``(min, max)`` of 'batch', 'height', 'width': the engine's profile."""
        lo, hi = self.profile['min'], self.profile['max']
        return {'batch': (lo[0], hi[0]), 'height': (lo[2], hi[2]), 'width': (lo[3], hi[3])}

    def check_input(self, shape: Sequence[int]) -> None:
        """Raises :class:`InputShapeError` for a shape outside the engine's profile."""
        try:
            super().check_input(shape)
        except InputShapeError as err:
            lo, hi = self.profile['min'], self.profile['max']
            raise InputShapeError(
                f'{err} (the TensorRT engine takes batch {lo[0]}..{hi[0]}, height '
                f'{lo[2]}..{hi[2]}, width {lo[3]}..{hi[3]}: its optimisation profile; rebuild '
                'with a larger max_batch / max_size to widen it)'
            ) from None

    def run(self, inputs: np.ndarray) -> dict[str, np.ndarray]:
        """Runs the engine on (N, 3, H, W) normalised float32: every output, float32, by name.

        Raises:
            InputShapeError: The shape is outside the engine's profile.
            TensorRTError: TensorRT refused the shape or failed to run.
        """
        import torch

        self.check_input(inputs.shape)
        trt, engine, context = self._trt, self.engine, self.context
        x = np.ascontiguousarray(inputs, dtype=np.float32)
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            if not context.set_input_shape(self.input_name, tuple(x.shape)):
                raise TensorRTError(f'TensorRT refused the input shape {tuple(x.shape)}')
            inp = torch.from_numpy(x).to(self.device)
            inp = inp.to(_torch_dtype(trt, engine.get_tensor_dtype(self.input_name)))
            buffers = {self.input_name: inp}
            for name in self._outputs:
                shape = tuple(context.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise TensorRTError(f'TensorRT could not infer the shape of output {name!r}')
                dtype = _torch_dtype(trt, engine.get_tensor_dtype(name))
                buffers[name] = torch.empty(shape, dtype=dtype, device=self.device)
            for name, tensor in buffers.items():
                context.set_tensor_address(name, tensor.data_ptr())
            if not context.execute_async_v3(self.stream.cuda_stream):
                raise TensorRTError(
                    f'TensorRT failed to run the engine on an input of shape {tuple(x.shape)}'
                )
            outputs = {name: buffers[name].float().cpu() for name in self.output_names}
        self.stream.synchronize()
        return {name: out.numpy() for name, out in outputs.items()}
