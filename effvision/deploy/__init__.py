"""Export to deployment formats, backend runners and parity checks."""

from .onnx import (
    DEFAULT_OPSET,
    META_FILE,
    ONNX_FILE,
    PARITY_FILE,
    ExportError,
    InputShapeError,
    ORTSegmentor,
    ParityResult,
    SegLogitsWrapper,
    check_parity,
    export_onnx,
    format_parity,
    second_shape,
)
from .panoptic import PanopticLogitsWrapper
from .runner import SegmentorRunner
from .segmentor import (
    DeployedModelError,
    DeployedPanopticSegmentor,
    DeployedSegmentor,
    deployed_model_cfg,
    init_deployed_model,
)

__all__ = [
    'DEFAULT_OPSET',
    'DeployedModelError',
    'DeployedPanopticSegmentor',
    'DeployedSegmentor',
    'META_FILE',
    'ONNX_FILE',
    'PARITY_FILE',
    'ExportError',
    'InputShapeError',
    'ORTSegmentor',
    'PanopticLogitsWrapper',
    'ParityResult',
    'SegLogitsWrapper',
    'SegmentorRunner',
    'check_parity',
    'deployed_model_cfg',
    'export_onnx',
    'format_parity',
    'init_deployed_model',
    'second_shape',
]
