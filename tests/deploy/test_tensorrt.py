"""effvision.deploy.tensorrt: engine build, INT8 calibration data, the TensorRT runner.

Three tiers. Everywhere (CI has neither TensorRT nor a GPU): availability messages, argument
checks, the optimisation profile, calibration batches from an image folder. Everywhere too, the
build and run logic (flags, fp32 layers, calibration, atomic writes, I/O buffers, profile
checks, error paths) against a stand-in ``tensorrt`` module that mimics the parts of the
TensorRT 10 / 11 Python API used here; it checks our logic, not TensorRT's behaviour. With
TensorRT and a GPU only: real engines compared with onnxruntime.
"""

from __future__ import annotations

import builtins
import contextlib
import ctypes
import json
import math
import sys
import types
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import effvision.deploy.tensorrt as trt_mod
from effvision.apis.inference import ImageReadError
from effvision.deploy.runner import InputShapeError, SegmentorRunner
from effvision.deploy.tensorrt import (
    CALIBRATION_CACHE_FILE,
    ENGINE_FILE,
    TensorRTError,
    TensorRTUnavailable,
    TRTSegmentor,
    build_engine,
    engine_profile,
    load_calibration_batches,
    unavailable_reason,
)

REASON = unavailable_reason()
needs_trt = pytest.mark.skipif(REASON is not None, reason=f'needs TensorRT and a GPU: {REASON}')
without_trt = pytest.mark.skipif(REASON is None, reason='TensorRT and a GPU are available here')

MEAN, STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]


def make_meta(size=(64, 64), dynamic=False, side=(48, 160), declared=True, batch=(1, 1024)):
    """A deploy.json as tools/deploy.py writes it (the fields the runners read)."""
    h, w = size
    meta = {
        'input': {
            'name': 'input',
            'shape': ['batch', 3, 'height', 'width'] if dynamic else [1, 3, h, w],
            'example_shape': [1, 3, h, w],
        },
        'output': {'name': 'logits'},
        'dynamic': dynamic,
        'preprocess': {'mean': MEAN, 'std': STD, 'bgr_to_rgb': True},
        'postprocess': {'resize': 'bilinear', 'align_corners': False, 'threshold': None},
        'num_classes': 9,
        'classes': [f'c{i}' for i in range(9)],
        'palette': [[i, i, i] for i in range(9)],
    }
    if declared:
        meta['input']['range'] = (
            {'batch': list(batch), 'height': list(side), 'width': list(side)}
            if dynamic
            else {'batch': [1, 1], 'height': [h, h], 'width': [w, w]}
        )
    return meta


def export_dir(tmp_path: Path, meta: dict | None = None) -> Path:
    """A deploy folder with deploy.json and a placeholder end2end.onnx."""
    out = tmp_path / 'deploy'
    out.mkdir()
    (out / 'deploy.json').write_text(json.dumps(meta or make_meta()))
    (out / 'end2end.onnx').write_bytes(b'onnx placeholder')
    return out


def listing(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden temp files included) with its content."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob('*') if p.is_file()
    }


# ---------------------------------------------------------------------------------------------
# Availability
# ---------------------------------------------------------------------------------------------


@without_trt
def test_unavailable_reason_is_one_line_naming_the_fix():
    assert isinstance(REASON, str) and '\n' not in REASON
    assert 'pip install tensorrt-cu1' in REASON or 'GPU' in REASON


def test_unavailable_reason_for_each_missing_piece(monkeypatch):
    monkeypatch.setitem(sys.modules, 'tensorrt', None)  # `import tensorrt` -> ImportError
    monkeypatch.setattr(torch.version, 'cuda', '13.2')
    assert unavailable_reason().startswith('TensorRT is not installed: `pip install tensorrt-cu13`')
    monkeypatch.setattr(torch.version, 'cuda', '12.8')
    assert '`pip install tensorrt-cu12`' in unavailable_reason()

    # installed but broken (e.g. a wheel for another CUDA): says so, names the reinstall
    real_import = builtins.__import__

    def broken_import(name, *args, **kwargs):
        if name == 'tensorrt':
            raise OSError('libnvinfer.so.10: cannot open shared object file\nmore detail')
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, '__import__', broken_import)
    reason = unavailable_reason()
    assert 'cannot be loaded (OSError: libnvinfer.so.10' in reason and '\n' not in reason
    assert '--force-reinstall tensorrt-cu12' in reason
    monkeypatch.setattr(builtins, '__import__', real_import)

    old = types.ModuleType('tensorrt')
    old.__version__ = '8.6.1'
    monkeypatch.setitem(sys.modules, 'tensorrt', old)
    assert unavailable_reason() == (
        'TensorRT 8.6.1 is too old: effvision needs TensorRT >= 10 (`pip install -U tensorrt-cu12`)'
    )
    new = types.ModuleType('tensorrt')
    new.__version__ = '10.16.1.11'
    monkeypatch.setitem(sys.modules, 'tensorrt', new)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    assert unavailable_reason().startswith('no CUDA GPU is visible')
    monkeypatch.setattr(torch.version, 'cuda', None)
    assert unavailable_reason().startswith('PyTorch is a CPU-only build')
    monkeypatch.setattr(torch.version, 'cuda', '13.2')
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    assert unavailable_reason() is None


@without_trt
@pytest.mark.parametrize('precision', ['fp32', 'fp16', 'int8'])
def test_build_engine_without_tensorrt_raises_and_writes_nothing(precision, tmp_path):
    out = export_dir(tmp_path)
    before = listing(out)
    batches = [np.zeros((1, 3, 64, 64), np.float32)] if precision == 'int8' else None
    with pytest.raises(TensorRTUnavailable) as info:
        build_engine(
            out / 'end2end.onnx', out / ENGINE_FILE, out / 'deploy.json',
            precision=precision, calib_batches=batches,
        )  # fmt: skip
    assert str(info.value) == REASON
    assert listing(out) == before


@without_trt
def test_runner_without_tensorrt_raises(tmp_path):
    out = export_dir(tmp_path)
    (out / ENGINE_FILE).write_bytes(b'not an engine')
    with pytest.raises(TensorRTUnavailable, match=REASON.split(':')[0]):
        TRTSegmentor(out / ENGINE_FILE, out / 'deploy.json')
    with pytest.raises(TensorRTUnavailable):
        TRTSegmentor.from_dir(out)


def test_runner_from_dir_without_an_engine_names_the_build_command(tmp_path):
    out = export_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r'end2end\.engine not found.*--backend tensorrt'):
        TRTSegmentor.from_dir(out)


# ---------------------------------------------------------------------------------------------
# Argument checks (before TensorRT is imported: they behave the same everywhere)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    'kwargs, match',
    [
        (dict(precision='fp8'), r"unknown precision 'fp8'; choose one of fp32, fp16, int8"),
        (dict(precision='int8'), r'needs calibration data.*load_calibration_batches'),
        (dict(precision='int8', calib_batches=[]), r'calib_batches is empty'),
        (dict(calib_batches=[np.zeros((1, 3, 64, 64))]), r"only used with precision='int8'"),
        (dict(max_batch=0), r'max_batch must be >= 1'),
        (dict(workspace_gib=0), r'workspace_gib must be > 0'),
        (dict(precision='fp16', fp32_layer_types='SOFTMAX'), r'a sequence of names'),
        (dict(precision='fp16', fp32_layer_types=['softmax']), r'trt.LayerType names'),
    ],
)
def test_build_engine_argument_errors(kwargs, match, tmp_path):
    out = export_dir(tmp_path)
    with pytest.raises(ValueError, match=match):
        build_engine(out / 'end2end.onnx', out / ENGINE_FILE, out / 'deploy.json', **kwargs)
    assert not (out / ENGINE_FILE).exists()


# ---------------------------------------------------------------------------------------------
# Optimisation profile
# ---------------------------------------------------------------------------------------------


def test_profile_of_a_static_export_is_its_one_shape():
    profile = engine_profile(make_meta(size=(64, 96)), max_batch=8)
    assert profile == {'min': (1, 3, 64, 96), 'opt': (1, 3, 64, 96), 'max': (1, 3, 64, 96)}


def test_profile_of_a_dynamic_export_follows_its_range():
    meta = make_meta(size=(64, 96), dynamic=True, side=(48, 160), batch=(1, 4))
    assert engine_profile(meta) == {
        'min': (1, 3, 48, 48), 'opt': (1, 3, 64, 96), 'max': (1, 3, 160, 160)
    }  # fmt: skip
    # max_batch is clamped to the export's; max_size narrows H/W and pulls opt into the range
    assert engine_profile(meta, max_batch=16, max_size=(128, 80)) == {
        'min': (1, 3, 48, 48), 'opt': (1, 3, 64, 80), 'max': (4, 3, 128, 80)
    }  # fmt: skip
    with pytest.raises(ValueError, match=r"below the export's smallest height 48"):
        engine_profile(meta, max_size=(32, 128))
    with pytest.raises(ValueError, match=r'max_batch must be >= 1'):
        engine_profile(meta, max_batch=0)


def test_profile_of_an_export_without_a_range_needs_a_max_size():
    meta = make_meta(size=(64, 64), dynamic=True, declared=False)
    with pytest.raises(ValueError, match=r'no upper bound for the height.*max_size'):
        engine_profile(meta)
    assert engine_profile(meta, max_size=(256, 512)) == {
        'min': (1, 3, 1, 1), 'opt': (1, 3, 64, 64), 'max': (1, 3, 256, 512)
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Calibration batches
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def calib_dir(tmp_path) -> Path:
    """Seven images of assorted sizes and formats (one in a subfolder) and a non-image."""
    folder = tmp_path / 'calib'
    (folder / 'sub').mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = ['b.png', 'a.jpg', 'c.bmp', 'e.png', 'd.PNG', 'sub/f.png', 'g.jpeg']
    for i, name in enumerate(names):
        img = rng.integers(0, 256, (40 + 8 * i, 70 - 4 * i, 3), dtype=np.uint8)
        assert cv2.imwrite(str(folder / name), img)
    (folder / 'notes.txt').write_text('not an image')
    return folder


SORTED = ['a.jpg', 'b.png', 'c.bmp', 'd.PNG', 'e.png', 'g.jpeg', 'sub/f.png']


def test_calibration_batches_are_preprocessed_images_in_sorted_order(calib_dir):
    runner = SegmentorRunner(make_meta(size=(64, 96)))
    batches = load_calibration_batches(calib_dir, runner)
    assert len(batches) == 7 and batches.shape == (1, 3, 64, 96)
    arrays = list(batches)
    assert len(arrays) == 7
    for name, x in zip(SORTED, arrays, strict=True):
        expected = runner.preprocess(cv2.imread(str(calib_dir / name)), (64, 96))
        assert x.dtype == np.float32 and x.shape == (1, 3, 64, 96)
        np.testing.assert_array_equal(x, expected)
    # normalised (mean/std, RGB order), not raw pixels
    assert -3 < float(arrays[0].mean()) < 3 and float(arrays[0].std()) > 0.5
    # deterministic, and iterable again
    for a, b in zip(arrays, load_calibration_batches(calib_dir, runner.meta), strict=True):
        np.testing.assert_array_equal(a, b)


def test_calibration_limit_batch_size_and_size(calib_dir):
    runner = SegmentorRunner(make_meta(size=(64, 64), dynamic=True))
    batches = load_calibration_batches(calib_dir, runner, size=(48, 80), limit=5, batch_size=2)
    assert len(batches) == 2  # 5 images -> 2 full batches; the fifth is not used
    arrays = list(batches)
    assert [x.shape for x in arrays] == [(2, 3, 48, 80)] * 2
    expected = np.concatenate(
        [runner.preprocess(cv2.imread(str(calib_dir / n)), (48, 80)) for n in SORTED[:4]]
    )
    np.testing.assert_array_equal(np.concatenate(arrays), expected)
    assert len(load_calibration_batches(calib_dir, runner, limit=None)) == 7
    assert len(load_calibration_batches(calib_dir, runner, limit=3)) == 3


def test_calibration_errors(calib_dir, tmp_path):
    runner = SegmentorRunner(make_meta(size=(64, 64)))
    with pytest.raises(FileNotFoundError, match=r'calibration image folder not found: .*nowhere'):
        load_calibration_batches(tmp_path / 'nowhere', runner)
    with pytest.raises(NotADirectoryError, match=r'is a file'):
        load_calibration_batches(calib_dir / 'a.jpg', runner)
    empty = tmp_path / 'empty'
    empty.mkdir()
    (empty / 'readme.md').write_text('no images here')
    with pytest.raises(ValueError, match=r'no images in .*empty'):
        load_calibration_batches(empty, runner)
    with pytest.raises(ValueError, match=r'do not fill one batch of 8'):
        load_calibration_batches(calib_dir, runner, batch_size=8)
    with pytest.raises(ValueError, match=r'limit must be >= 1'):
        load_calibration_batches(calib_dir, runner, limit=0)
    with pytest.raises(ValueError, match=r'batch_size must be >= 1'):
        load_calibration_batches(calib_dir, runner, batch_size=0)
    # a static export takes one size only
    with pytest.raises(InputShapeError, match=r'height 32 \(64 only\)'):
        load_calibration_batches(calib_dir, runner, size=(32, 64))
    # a corrupt file is named when it is reached
    (calib_dir / 'a.jpg').write_bytes(b'\xff\xd8 truncated')
    batches = load_calibration_batches(calib_dir, runner)
    with pytest.raises(ImageReadError, match=r'a\.jpg.*remove it from the calibration folder'):
        list(batches)


# ---------------------------------------------------------------------------------------------
# build_engine against a stand-in tensorrt module
# ---------------------------------------------------------------------------------------------


class _Enum:
    """A pybind11 enum value: a name, identity comparison."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


def _enum(*names: str) -> types.SimpleNamespace:
    members = {n: _Enum(n) for n in names}
    return types.SimpleNamespace(__members__=members, **members)


class FakeTRT(types.ModuleType):
    """The parts of the TensorRT Python API that build_engine uses, strict about names.

    ``layers``: (LayerType, operation or None, output DataType) of the parsed network.
    ``version``: '10.x' has the weak-typing builder flags and calibrators, '11.x' has not.
    """

    def __init__(self, version: str = '10.16.1', layers=(), fail_build: bool = False) -> None:
        super().__init__('tensorrt')
        self.__version__ = version
        weak = version.startswith('10.')
        self.LayerType = _enum(
            'CONVOLUTION', 'ACTIVATION', 'ELEMENTWISE', 'UNARY', 'REDUCE', 'SOFTMAX',
            'NORMALIZATION', 'MATRIX_MULTIPLY', 'SHAPE', 'RESIZE',
        )  # fmt: skip
        self.ElementWiseOperation = _enum('SUM', 'PROD', 'SUB', 'DIV', 'POW')
        self.ReduceOperation = _enum('SUM', 'PROD', 'MAX', 'MIN', 'AVG')
        self.UnaryOperation = _enum('EXP', 'SQRT')
        self.DataType = _enum('FLOAT', 'HALF', 'BF16', 'INT8', 'INT32', 'INT64', 'BOOL')
        flags = ['TF32', 'REFIT', 'DEBUG']
        if weak:
            flags += ['FP16', 'INT8', 'OBEY_PRECISION_CONSTRAINTS', 'PREFER_PRECISION_CONSTRAINTS']
        self.BuilderFlag = _enum(*flags)
        self.MemoryPoolType = _enum('WORKSPACE')
        self.TensorIOMode = _enum('NONE', 'INPUT', 'OUTPUT')
        self.layer_spec = list(layers)
        self.fail_build = fail_build
        self.parse_errors: list = []
        self.built = []  # (network, config) of each build
        fake = self

        class ILogger:
            Severity = _enum('INTERNAL_ERROR', 'ERROR', 'WARNING', 'INFO', 'VERBOSE')

            def __init__(self) -> None:
                pass

        class ILayer:
            def __init__(self, kind, op, dtype, index):
                self.type = fake.LayerType.__members__[kind]
                self._op = op
                self.name = f'{kind.lower()}_{index}'
                dtype = fake.DataType.__members__[dtype]
                self._inputs = [types.SimpleNamespace(dtype=dtype)]
                self._outputs = [types.SimpleNamespace(dtype=dtype)]
                self.output_types = {}
                self._precision = None

            num_inputs = property(lambda self: len(self._inputs))
            num_outputs = property(lambda self: len(self._outputs))

            def get_input(self, i):
                return self._inputs[i]

            def get_output(self, i):
                return self._outputs[i]

            @property
            def precision(self):
                return self._precision or fake.DataType.FLOAT

            @precision.setter
            def precision(self, dtype):
                if not weak:
                    raise AttributeError('removed in TensorRT 11')
                self._precision = dtype

            def set_output_type(self, index, dtype):
                if not weak:
                    raise AttributeError('removed in TensorRT 11')
                self.output_types[index] = dtype

        class _WithOp(ILayer):
            @property
            def op(self):
                enum = {
                    'ELEMENTWISE': fake.ElementWiseOperation,
                    'REDUCE': fake.ReduceOperation,
                    'UNARY': fake.UnaryOperation,
                }[self.type.name]
                return enum.__members__[self._op]

        class IElementWiseLayer(_WithOp):
            pass

        class IReduceLayer(_WithOp):
            pass

        class IUnaryLayer(_WithOp):
            pass

        class Network:
            def __init__(self, flags):
                assert flags == 0
                self.layers = []
                self.inputs = []

            num_layers = property(lambda self: len(self.layers))
            num_inputs = property(lambda self: len(self.inputs))

            def get_layer(self, i):
                return self.layers[i]

            def get_input(self, i):
                return self.inputs[i]

        class ParserError:
            def __init__(self, op, node, desc):
                self._v = (op, node, desc)

            def node_operator(self):
                return self._v[0]

            def node_name(self):
                return self._v[1]

            def desc(self):
                return self._v[2]

        class OnnxParser:
            def __init__(self, network, logger):
                assert isinstance(logger, ILogger)
                self.network, self.errors, self.parsed = network, [], None

            num_errors = property(lambda self: len(self.errors))

            def get_error(self, i):
                return self.errors[i]

            def _load(self, data: bytes) -> bool:
                self.parsed = data
                if fake.parse_errors:
                    self.errors = [ParserError(*e) for e in fake.parse_errors]
                    return False
                self.network.inputs = [types.SimpleNamespace(name=fake.input_name)]
                self.network.layers = [
                    ILayer(kind, op, dtype, i)
                    for i, (kind, op, dtype) in enumerate(fake.layer_spec)
                ]
                return True

            def parse_from_file(self, path):
                return self._load(Path(path).read_bytes())

            def parse(self, model, path=None):
                return self._load(bytes(model))

        class Profile:
            def __init__(self):
                self.shapes = {}

            def set_shape(self, name, min, opt, max):  # noqa: A002 - TensorRT's keywords
                self.shapes[name] = (tuple(min), tuple(opt), tuple(max))

        class Config:
            def __init__(self):
                self.flags = {'TF32'}  # TensorRT's default
                self.pools, self.profiles = {}, []
                self.calibration_profile = None
                self._calibrator = None

            def set_flag(self, flag):
                assert flag in fake.BuilderFlag.__members__.values()
                self.flags.add(flag.name)

            def clear_flag(self, flag):
                assert flag in fake.BuilderFlag.__members__.values()
                self.flags.discard(flag.name)

            def set_memory_pool_limit(self, pool, size):
                assert pool is fake.MemoryPoolType.WORKSPACE and isinstance(size, int)
                self.pools[pool.name] = size

            def add_optimization_profile(self, profile):
                self.profiles.append(profile)
                return len(self.profiles) - 1

            @property
            def int8_calibrator(self):
                return self._calibrator

            @int8_calibrator.setter
            def int8_calibrator(self, calibrator):
                if not weak:
                    raise AttributeError('removed in TensorRT 11')
                assert isinstance(calibrator, IInt8EntropyCalibrator2)
                self._calibrator = calibrator

            def set_calibration_profile(self, profile):
                if not weak:
                    raise AttributeError('removed in TensorRT 11')
                self.calibration_profile = profile

        class Builder:
            def __init__(self, logger):
                assert isinstance(logger, ILogger)
                self.logger = logger

            def create_network(self, flags=0):
                return Network(flags)

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                fake.built.append((network, config))
                calibrator = config.int8_calibrator
                if calibrator is not None:
                    assert calibrator.read_calibration_cache() is None
                    fake.calibration = []
                    while (ptrs := calibrator.get_batch(['input'])) is not None:
                        fake.calibration.append(ptrs)
                    calibrator.write_calibration_cache(memoryview(b'calibration table'))
                if fake.fail_build:
                    self.logger.log(ILogger.Severity.ERROR, 'out of memory while building')
                    return None
                return b'serialized engine'

        class IInt8EntropyCalibrator2:
            def __init__(self) -> None:
                pass

        class Context:
            """Computes logits[:, c] = (c + 1) * input[:, c % 3] in the buffers it is given."""

            def __init__(self, engine):
                self.engine, self.shapes, self.addresses = engine, {}, {}

            def set_input_shape(self, name, shape):
                lo, _, hi = engine_spec(self.engine)['profile']
                if not all(a <= s <= b for a, s, b in zip(lo, shape, hi, strict=True)):
                    return False
                self.shapes[name] = tuple(shape)
                return True

            def get_tensor_shape(self, name):
                n, _, h, w = self.shapes[self.engine.input]
                return (n, 3, h, w) if name == self.engine.input else (n, 9, h, w)

            def set_tensor_address(self, name, ptr):
                assert isinstance(ptr, int) and ptr
                self.addresses[name] = ptr
                return True

            def execute_async_v3(self, stream_handle):
                assert isinstance(stream_handle, int)

                def view(name):
                    shape = self.get_tensor_shape(name)
                    raw = (ctypes.c_float * math.prod(shape)).from_address(self.addresses[name])
                    return np.ctypeslib.as_array(raw).reshape(shape)

                x, out = view(self.engine.input), view(self.engine.output)
                out[...] = np.stack([(c + 1) * x[:, c % 3] for c in range(9)], axis=1)
                return True

        def engine_spec(engine):
            return engine.spec

        class Engine:
            def __init__(self, spec):
                self.spec = spec
                self.input, self.output = spec['io']

            num_io_tensors = property(lambda self: 2)

            def get_tensor_name(self, i):
                return self.spec['io'][i]

            def get_tensor_mode(self, name):
                modes = fake.TensorIOMode
                return modes.INPUT if name == self.input else modes.OUTPUT

            def get_tensor_dtype(self, name):
                return fake.DataType.FLOAT

            def get_tensor_profile_shape(self, name, profile_index):
                assert name == self.input and profile_index == 0
                return [tuple(shape) for shape in self.spec['profile']]

            def create_execution_context(self):
                return Context(self)

        class Runtime:
            def __init__(self, logger):
                assert isinstance(logger, ILogger)
                self.logger = logger

            def deserialize_cuda_engine(self, data):
                if not bytes(data).startswith(b'ENGINE'):
                    self.logger.log(
                        ILogger.Severity.ERROR,
                        'IRuntime::deserializeCudaEngine: Error Code 1: Serialization\n'
                        '(Serialization assertion plan version mismatch)',
                    )
                    return None
                return Engine(json.loads(bytes(data)[len(b'ENGINE') :]))

        self.Runtime = Runtime
        self.ILogger, self.Builder, self.OnnxParser = ILogger, Builder, OnnxParser
        self.IElementWiseLayer, self.IReduceLayer, self.IUnaryLayer = (
            IElementWiseLayer, IReduceLayer, IUnaryLayer
        )  # fmt: skip
        if weak:
            self.IInt8EntropyCalibrator2 = IInt8EntropyCalibrator2
        self.input_name = 'input'


LAYERS = [
    ('CONVOLUTION', None, 'FLOAT'),
    ('NORMALIZATION', None, 'FLOAT'),  # nn.LayerNorm -> LayerNormalization
    ('REDUCE', 'AVG', 'FLOAT'),  # a decomposed LayerNorm: mean ...
    ('ELEMENTWISE', 'SUB', 'FLOAT'),
    ('ELEMENTWISE', 'POW', 'FLOAT'),  # ... (x - mean)^2 ...
    ('REDUCE', 'AVG', 'FLOAT'),  # ... mean of it
    ('UNARY', 'SQRT', 'FLOAT'),
    ('MATRIX_MULTIPLY', None, 'FLOAT'),
    ('SOFTMAX', None, 'FLOAT'),
    ('REDUCE', 'PROD', 'INT64'),  # a shape computation: must keep its type
    ('ELEMENTWISE', 'POW', 'INT32'),
    ('RESIZE', None, 'FLOAT'),
]


@pytest.fixture
def fake_trt(monkeypatch):
    """Installs a stand-in TensorRT 10 (``fake_trt(version=..., ...)`` for another one) and a
    pretend GPU: torch.cuda calls are answered, device buffers stay on the CPU."""

    def install(**kwargs) -> FakeTRT:
        fake = FakeTRT(**kwargs)
        monkeypatch.setitem(sys.modules, 'tensorrt', fake)
        return fake

    monkeypatch.setattr(torch.version, 'cuda', '13.2')
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device', lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda device=None: 'Pretend GPU')
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda device=None: (9, 0))
    monkeypatch.setattr(trt_mod, '_to_device', lambda batch, device: torch.from_numpy(batch))
    monkeypatch.setattr(trt_mod, '_LOGGER', None)  # the logger subclasses the module's ILogger
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)
    monkeypatch.setattr(
        torch.cuda, 'Stream', lambda device: types.SimpleNamespace(cuda_stream=7, synchronize=int)
    )
    monkeypatch.setattr(torch.cuda, 'stream', lambda stream: contextlib.nullcontext())
    return install


def _build(out: Path, **kwargs) -> dict:
    return build_engine(out / 'end2end.onnx', out / ENGINE_FILE, out / 'deploy.json', **kwargs)


def _forced(network) -> list[str]:
    """Names of the layers set to fp32 compute with fp32 outputs."""
    forced = []
    for layer in network.layers:
        if layer._precision is not None:
            assert layer._precision.name == 'FLOAT'
            assert {i: t.name for i, t in layer.output_types.items()} == {0: 'FLOAT'}
            forced.append(layer.name)
        else:
            assert not layer.output_types
    return forced


def test_fake_fp32_build(fake_trt, tmp_path):
    fake = fake_trt(layers=LAYERS)
    out = export_dir(tmp_path, make_meta(size=(64, 96), dynamic=True, side=(48, 160)))
    record = _build(out, max_batch=2, max_size=(128, 128), workspace_gib=1.5)
    assert (out / ENGINE_FILE).read_bytes() == b'serialized engine'
    assert sorted(listing(out)) == ['deploy.json', 'end2end.engine', 'end2end.onnx']
    network, config = fake.built[0]
    assert config.flags == set()  # TF32 off, nothing else
    assert config.pools == {'WORKSPACE': int(1.5 * 2**30)}
    (profile,) = config.profiles
    assert profile.shapes == {'input': ((1, 3, 48, 48), (1, 3, 64, 96), (2, 3, 128, 128))}
    assert _forced(network) == []
    assert record['profile'] == {
        'min': [1, 3, 48, 48], 'opt': [1, 3, 64, 96], 'max': [2, 3, 128, 128]
    }  # fmt: skip
    assert record['precision'] == 'fp32' and record['fp32_layers'] == 0 and not record['tf32']
    assert record['tensorrt_version'] == '10.16.1' and record['gpu'] == 'Pretend GPU'
    assert record['compute_capability'] == '9.0' and record['engine_file'] == ENGINE_FILE
    assert record['engine_bytes'] == len(b'serialized engine') and record['calibration'] is None
    assert isinstance(record['build_seconds'], float)
    json.dumps(record)  # goes into deploy.json


def test_fake_fp16_keeps_normalisation_softmax_reduce_and_pow_in_fp32(fake_trt, tmp_path):
    fake = fake_trt(layers=LAYERS)
    out = export_dir(tmp_path)
    record = _build(out, precision='fp16')
    network, config = fake.built[0]
    assert config.flags == {'FP16', 'OBEY_PRECISION_CONSTRAINTS'}
    assert _forced(network) == [
        'normalization_1', 'reduce_2', 'elementwise_4', 'reduce_5', 'softmax_8'
    ]  # fmt: skip
    assert record['fp32_layers'] == 5
    assert record['fp32_layer_counts'] == {
        'NORMALIZATION': 1, 'SOFTMAX': 1, 'REDUCE': 2, 'ELEMENTWISE.POW': 1
    }  # fmt: skip
    assert record['typing'].startswith('weak')

    # the list is the caller's: nothing forced (and no constraint flag) with an empty one
    fake.built.clear()
    assert _build(out, precision='fp16', fp32_layer_types=())['fp32_layers'] == 0
    network, config = fake.built[0]
    assert config.flags == {'FP16'} and _forced(network) == []
    fake.built.clear()
    _build(out, precision='fp16', fp32_layer_types=['UNARY.SQRT', 'MATRIX_MULTIPLY'])
    assert _forced(fake.built[0][0]) == ['unary_6', 'matrix_multiply_7']
    with pytest.raises(ValueError, match=r"\['ATTENTION'\] are not TensorRT layer types"):
        _build(out, precision='fp16', fp32_layer_types=['ATTENTION'])


def test_fake_int8_calibrates_at_the_batches_shape_and_writes_the_cache(fake_trt, tmp_path):
    fake = fake_trt(layers=LAYERS)
    out = export_dir(tmp_path, make_meta(size=(64, 64), dynamic=True, side=(48, 160)))
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((2, 3, 80, 96)).astype(np.float32) for _ in range(3)]
    record = _build(out, precision='int8', calib_batches=iter(batches), max_batch=4)
    network, config = fake.built[0]
    assert config.flags == {'FP16', 'INT8', 'OBEY_PRECISION_CONSTRAINTS'}
    assert len(_forced(network)) == 5
    assert config.calibration_profile.shapes == {'input': ((2, 3, 80, 96),) * 3}
    assert len(fake.calibration) == 3 and all(len(ptrs) == 1 for ptrs in fake.calibration)
    assert (out / CALIBRATION_CACHE_FILE).read_bytes() == b'calibration table'
    assert record['calibration'] == {
        'batches': 3, 'shape': [2, 3, 80, 96], 'cache': CALIBRATION_CACHE_FILE
    }  # fmt: skip
    assert sorted(listing(out)) == [
        CALIBRATION_CACHE_FILE, 'deploy.json', 'end2end.engine', 'end2end.onnx'
    ]  # fmt: skip


def test_fake_int8_bad_batch_fails_the_build_and_keeps_the_old_engine(fake_trt, tmp_path):
    fake_trt(layers=LAYERS)
    out = export_dir(tmp_path, make_meta(size=(64, 64), dynamic=True))
    (out / ENGINE_FILE).write_bytes(b'previous engine')
    before = listing(out)
    good, odd = np.zeros((1, 3, 64, 64), np.float32), np.zeros((1, 3, 64, 80), np.float32)
    # TensorRT swallows exceptions raised in get_batch: the error must still reach the caller
    with pytest.raises(ValueError, match=r'calibration batch 1 has shape \(1, 3, 64, 80\)'):
        _build(out, precision='int8', calib_batches=[good, odd, good])
    with pytest.raises(ValueError, match=r'expected float32 normalised images'):
        _build(out, precision='int8', calib_batches=[good, good.astype(np.uint8)])
    with pytest.raises(TypeError, match=r'must yield \(N, 3, H, W\) float32 numpy arrays'):
        _build(out, precision='int8', calib_batches=[good, torch.zeros(1, 3, 64, 64)])
    with pytest.raises(ValueError, match=r'calib_batches is empty'):
        _build(out, precision='int8', calib_batches=iter([]))
    # a shape the export refuses, caught before the build
    with pytest.raises(InputShapeError, match=r'height 32 \(accepted: 48..160\)'):
        _build(out, precision='int8', calib_batches=[np.zeros((1, 3, 32, 64), np.float32)])
    assert listing(out) == before


def test_fake_parse_failure_lists_the_operators_and_names_the_fix(fake_trt, tmp_path):
    fake = fake_trt(layers=LAYERS)
    fake.parse_errors = [('GridSample', 'node_grid', 'unsupported mode: bicubic')]
    out = export_dir(tmp_path)
    before = listing(out)
    with pytest.raises(TensorRTError) as info:
        _build(out)
    message = str(info.value)
    assert "GridSample node 'node_grid': unsupported mode: bicubic" in message
    assert '--backend onnxruntime' in message and 're-export' in message
    assert listing(out) == before


def test_fake_build_failure_keeps_the_old_engine_and_leaves_no_temp_file(fake_trt, tmp_path):
    fake_trt(layers=LAYERS, fail_build=True)
    out = export_dir(tmp_path)
    (out / ENGINE_FILE).write_bytes(b'previous engine')
    before = listing(out)
    with pytest.raises(TensorRTError, match=r'out of memory while building.*lower max_batch'):
        _build(out, precision='fp16')
    assert listing(out) == before


def test_fake_engine_and_meta_from_different_exports(fake_trt, tmp_path):
    fake = fake_trt(layers=LAYERS)
    fake.input_name = 'images'
    out = export_dir(tmp_path)
    with pytest.raises(TensorRTError, match=r"inputs \['images'\].*from different exports"):
        _build(out)
    assert not (out / ENGINE_FILE).exists()


def test_fake_missing_onnx_names_the_export_command(fake_trt, tmp_path):
    fake_trt(layers=LAYERS)
    out = export_dir(tmp_path)
    (out / 'end2end.onnx').unlink()
    with pytest.raises(FileNotFoundError, match=r'end2end\.onnx not found.*tools/deploy\.py'):
        _build(out)


def test_fake_tensorrt_11_builds_fp32_and_refuses_int8_with_the_fix(fake_trt, tmp_path):
    fake = fake_trt(version='11.1.0', layers=LAYERS)
    out = export_dir(tmp_path)
    record = _build(out)
    assert fake.built[0][1].flags == set() and record['tensorrt_version'] == '11.1.0'
    with pytest.raises(TensorRTError, match=r'no INT8 calibration.*tensorrt-cu13<11'):
        _build(out, precision='int8', calib_batches=[np.zeros((1, 3, 64, 64), np.float32)])


def test_fake_tensorrt_11_fp16_goes_through_modelopt_autocast(fake_trt, tmp_path, monkeypatch):
    fake = fake_trt(version='11.1.0', layers=LAYERS)
    # an export without a declared range: the engine's bounds come from max_size
    out = export_dir(tmp_path, make_meta(size=(64, 80), dynamic=True, declared=False))
    monkeypatch.setitem(sys.modules, 'modelopt', None)
    with pytest.raises(TensorRTError, match=r'nvidia-modelopt\[onnx\].*tensorrt-cu13<11'):
        _build(out, precision='fp16', max_size=(256, 256))
    assert not fake.built

    calls = []

    def convert_to_mixed_precision(**kwargs):
        calls.append(kwargs)
        sample = np.load(kwargs['calibration_data'])
        assert list(sample) == ['input'] and sample['input'].shape == (1, 3, 64, 80)  # opt
        nodes = [types.SimpleNamespace(op_type=t) for t in ('Conv', 'LayerNormalization', 'Pow')]
        return types.SimpleNamespace(
            graph=types.SimpleNamespace(node=nodes), SerializeToString=lambda: b'mixed model'
        )

    autocast = types.ModuleType('modelopt.onnx.autocast')
    autocast.convert_to_mixed_precision = convert_to_mixed_precision
    for name in ('modelopt', 'modelopt.onnx'):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, 'modelopt.onnx.autocast', autocast)
    record = _build(out, precision='fp16', max_size=(256, 256))
    (kwargs,) = calls
    assert kwargs['low_precision_type'] == 'fp16' and kwargs['keep_io_types'] is True
    assert kwargs['onnx_path'] == str(out / 'end2end.onnx')
    assert {'LayerNormalization', 'Softmax', 'ReduceMean', 'Pow'} <= set(
        kwargs['op_types_to_exclude']
    )
    network, config = fake.built[0]
    assert config.flags == set() and _forced(network) == []  # the types are in the graph
    assert record['fp32_layers'] == 2 and record['typing'].startswith('strong')
    with pytest.raises(ValueError, match=r'can only name'):
        _build(out, precision='fp16', max_size=(256, 256), fp32_layer_types=['UNARY.SQRT'])


def _fake_engine(path: Path, profile, io=('input', 'logits')) -> None:
    path.write_bytes(b'ENGINE' + json.dumps({'profile': profile, 'io': list(io)}).encode())


def _cpu_runner(runner: TRTSegmentor) -> TRTSegmentor:
    assert runner.device == torch.device('cuda', 0)
    runner.device = torch.device('cpu')  # no GPU here: the pretend engine works on host memory
    return runner


def test_fake_runner_runs_the_engine_within_its_profile(fake_trt, tmp_path):
    fake_trt()
    out = export_dir(tmp_path, make_meta(size=(64, 64), dynamic=True, side=(48, 160)))
    profile = [(1, 3, 48, 48), (1, 3, 64, 64), (2, 3, 128, 128)]
    _fake_engine(out / ENGINE_FILE, profile)
    runner = _cpu_runner(TRTSegmentor.from_dir(out))
    assert runner.profile == {'min': profile[0], 'opt': profile[1], 'max': profile[2]}
    # the engine's profile, narrower than the export's 48..160, decides what is accepted
    assert runner.input_range == {'batch': (1, 2), 'height': (48, 128), 'width': (48, 128)}

    x = np.random.default_rng(0).standard_normal((2, 3, 96, 112)).astype(np.float32)
    logits = runner.logits(x)
    expected = np.stack([(c + 1) * x[:, c % 3] for c in range(9)], axis=1)
    assert logits.dtype == np.float32 and logits.shape == (2, 9, 96, 112)
    np.testing.assert_array_equal(logits, expected)
    # float64 and non-contiguous (negative-stride) inputs are converted, not misread
    np.testing.assert_array_equal(runner.logits(x.astype(np.float64)), expected)
    np.testing.assert_array_equal(runner.logits(x[:, :, ::-1]), expected[:, :, ::-1])

    with pytest.raises(InputShapeError, match=r'height 160 \(accepted: 48..128\).*max_size'):
        runner.logits(np.zeros((1, 3, 160, 64), np.float32))
    with pytest.raises(InputShapeError, match=r'batch 3 \(accepted: 1..2\)'):
        runner.logits(np.zeros((3, 3, 64, 64), np.float32))
    # predict: preprocess at the image's size, run, resize back, argmax
    img = np.random.default_rng(1).integers(0, 256, (100, 120, 3), dtype=np.uint8)
    labels = runner.predict(img)
    x = runner.preprocess(img)
    assert labels.shape == (100, 120) and labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, runner.logits(x)[0].argmax(0))


def test_fake_runner_explains_an_engine_it_cannot_load(fake_trt, tmp_path):
    fake_trt()
    meta = make_meta()
    meta['tensorrt'] = {'tensorrt_version': '10.3.0', 'gpu': 'NVIDIA A100-SXM4-80GB'}
    out = export_dir(tmp_path, meta)
    (out / ENGINE_FILE).write_bytes(b'plan from elsewhere')
    with pytest.raises(TensorRTError) as info:
        TRTSegmentor.from_dir(out)
    message = str(info.value)
    assert 'Serialization (Serialization assertion plan version mismatch)' in message
    assert 'built with TensorRT 10.3.0 on NVIDIA A100-SXM4-80GB' in message
    assert 'this machine has TensorRT 10.16.1 on Pretend GPU' in message
    assert message.endswith(f'--out-dir {out} --backend tensorrt`')


def test_fake_runner_refuses_an_engine_of_another_export(fake_trt, tmp_path):
    fake_trt()
    out = export_dir(tmp_path)
    _fake_engine(out / ENGINE_FILE, [(1, 3, 64, 64)] * 3, io=('images', 'logits'))
    with pytest.raises(TensorRTError, match=r"inputs \['images'\].*rebuild it"):
        TRTSegmentor.from_dir(out)
    with pytest.raises(ValueError, match=r'CUDA device 3 does not exist \(1 visible\)'):
        TRTSegmentor(out / ENGINE_FILE, out / 'deploy.json', device=3)


# ---------------------------------------------------------------------------------------------
# Real engines (TensorRT and a GPU)
# ---------------------------------------------------------------------------------------------


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float((a.argmax(1) == b.argmax(1)).mean())


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
    """The tiny FCN exported static at 64x64 and dynamic over 48..160 (random weights)."""
    if REASON is not None:
        pytest.skip(f'needs TensorRT and a GPU: {REASON}')
    from effvision.apis import init_model
    from effvision.deploy.onnx import export_onnx
    from tests.conftest import TINY_CONFIG

    torch.manual_seed(0)
    model = init_model(TINY_CONFIG)
    img = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    root = tmp_path_factory.mktemp('trt')
    dirs = {'static': root / 'static', 'dynamic': root / 'dynamic'}
    passed, _, _ = export_onnx(model, dirs['static'], img, (64, 64))
    assert passed
    passed, _, _ = export_onnx(
        model, dirs['dynamic'], img, (64, 64), dynamic=True, dynamic_range=(48, 160)
    )
    assert passed
    return dirs


def _inputs(runner: SegmentorRunner, n: int, size: tuple[int, int], seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    imgs = [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(n)]
    # smooth images: logits of a random net on noise are close to ties everywhere
    imgs = [cv2.GaussianBlur(i, (0, 0), 3) for i in imgs]
    return np.concatenate([runner.preprocess(i, size) for i in imgs])


def _build_real(deploy: Path, name: str, **kwargs) -> tuple[dict, TRTSegmentor]:
    engine = deploy / f'{name}.engine'
    record = build_engine(deploy / 'end2end.onnx', engine, deploy / 'deploy.json', **kwargs)
    meta = {**json.loads((deploy / 'deploy.json').read_text()), 'tensorrt': record}
    return record, TRTSegmentor(engine, meta)


@needs_trt
def test_fp32_engine_matches_onnxruntime(exported):
    from effvision.deploy.onnx import ORTSegmentor

    ort = ORTSegmentor.from_dir(exported['static'])
    record, trt_runner = _build_real(exported['static'], 'fp32', precision='fp32')
    x = _inputs(ort, 1, (64, 64))
    ref, out = ort.logits(x), trt_runner.logits(x)
    assert out.dtype == np.float32 and out.shape == ref.shape == (1, 9, 64, 64)
    diff = float(np.abs(out - ref).max())
    print(f'TensorRT fp32: max|Δlogit|={diff:.3g} agreement={100 * _agreement(out, ref):.3f}%')
    assert _agreement(out, ref) >= 0.999
    assert diff < 1e-2 * max(1.0, float(np.abs(ref).max()))
    assert record['precision'] == 'fp32' and record['profile']['max'] == [1, 3, 64, 64]
    # a static engine takes its one shape only
    with pytest.raises(InputShapeError, match=r'height 96 \(64 only\)'):
        trt_runner.logits(_inputs(ort, 1, (96, 64)))
    # the full predict path: (H, W) labels at the image's size
    img = np.random.default_rng(3).integers(0, 256, (80, 100, 3), dtype=np.uint8)
    labels_trt, labels_ort = trt_runner.predict(img), ort.predict(img)
    assert labels_trt.shape == (80, 100) and (labels_trt == labels_ort).mean() >= 0.999


@needs_trt
def test_fp16_and_int8_engines(exported, tmp_path):
    from effvision.deploy.onnx import ORTSegmentor

    ort = ORTSegmentor.from_dir(exported['static'])
    x = _inputs(ort, 1, (64, 64))
    ref = ort.logits(x)
    _, fp16 = _build_real(exported['static'], 'fp16', precision='fp16')
    out = fp16.logits(x)
    agree = _agreement(out, ref)
    print(f'TensorRT fp16: max|Δlogit|={np.abs(out - ref).max():.3g} agreement={100 * agree:.3f}%')
    assert np.isfinite(out).all() and agree >= 0.98

    calib = tmp_path / 'calib'
    calib.mkdir()
    rng = np.random.default_rng(5)
    for i in range(8):
        img = cv2.GaussianBlur(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), (0, 0), 3)
        cv2.imwrite(str(calib / f'{i}.png'), img)
    batches = load_calibration_batches(calib, ort)
    record, int8 = _build_real(exported['static'], 'int8', precision='int8', calib_batches=batches)
    out = int8.logits(x)
    agree = _agreement(out, ref)
    print(f'TensorRT int8: max|Δlogit|={np.abs(out - ref).max():.3g} agreement={100 * agree:.3f}%')
    assert np.isfinite(out).all() and agree >= 0.5
    assert record['calibration']['batches'] == 8
    assert (exported['static'] / CALIBRATION_CACHE_FILE).stat().st_size > 0


@needs_trt
def test_fp16_keeps_layernorm_and_softmax_of_a_swin_model_in_fp32(tmp_path):
    """The quickstart Swin + UPerHead (random weights): LayerNorm and softmax are found and
    kept in fp32; fp16 with and without that is reported."""
    from effvision.apis import init_model
    from effvision.deploy.onnx import ORTSegmentor, export_onnx
    from tests.conftest import QUICKSTART

    torch.manual_seed(0)
    model = init_model(QUICKSTART)
    img = cv2.GaussianBlur(
        np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8), (0, 0), 3
    )
    passed, _, _ = export_onnx(model, tmp_path, img, (128, 128))
    assert passed
    ort = ORTSegmentor.from_dir(tmp_path)
    x = _inputs(ort, 1, (128, 128))
    ref = ort.logits(x)
    record, fp16 = _build_real(tmp_path, 'fp16', precision='fp16')
    counts = record['fp32_layer_counts']
    assert counts['NORMALIZATION'] + counts['REDUCE'] > 0 and counts['SOFTMAX'] > 0, counts
    _, plain = _build_real(tmp_path, 'fp16_plain', precision='fp16', fp32_layer_types=())
    results = {}
    for name, runner in (('fp16 (LN/softmax fp32)', fp16), ('fp16 (all fp16)', plain)):
        out = runner.logits(x)
        results[name] = _agreement(out, ref)
        print(
            f'Swin TensorRT {name}: max|Δlogit|={np.abs(out - ref).max():.3g} '
            f'agreement={100 * results[name]:.3f}% ({record["fp32_layers"]} fp32 layers: {counts})'
        )
        assert np.isfinite(out).all()
    assert results['fp16 (LN/softmax fp32)'] >= 0.98


@needs_trt
def test_dynamic_engine_takes_its_range_and_refuses_outside_it(exported):
    from effvision.deploy.onnx import ORTSegmentor

    ort = ORTSegmentor.from_dir(exported['dynamic'])
    record, trt_runner = _build_real(
        exported['dynamic'], 'dynamic', precision='fp32', max_batch=2, max_size=(128, 128)
    )
    assert record['profile'] == {
        'min': [1, 3, 48, 48], 'opt': [1, 3, 64, 64], 'max': [2, 3, 128, 128]
    }  # fmt: skip
    for n, size in ((1, (64, 64)), (2, (96, 128)), (1, (48, 80))):
        x = _inputs(ort, n, size, seed=n + size[0])
        out, ref = trt_runner.logits(x), ort.logits(x)
        assert out.shape == ref.shape == (n, 9, *size)
        assert _agreement(out, ref) >= 0.999, (n, size)
    # inside the export's range (48..160) but outside the engine's profile
    with pytest.raises(InputShapeError, match=r'height 160 \(accepted: 48..128\).*max_size'):
        trt_runner.logits(_inputs(ort, 1, (160, 64)))
    with pytest.raises(InputShapeError, match=r'batch 3 \(accepted: 1..2\)'):
        trt_runner.logits(_inputs(ort, 3, (64, 64)))


@needs_trt
def test_a_corrupt_engine_is_refused_with_the_rebuild_command(exported, tmp_path):
    engine = tmp_path / ENGINE_FILE
    engine.write_bytes(b'\x00' * 1024)
    meta = json.loads((exported['static'] / 'deploy.json').read_text())
    meta['tensorrt'] = {'tensorrt_version': '9.9.9', 'gpu': 'Some Other GPU'}
    with pytest.raises(
        TensorRTError,
        match=r'(?s)built with TensorRT 9\.9\.9 on Some Other GPU.*--backend tensorrt',
    ):
        TRTSegmentor(engine, meta)
