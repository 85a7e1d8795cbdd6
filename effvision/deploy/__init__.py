"""Export to deployment formats, backend runners and parity checks."""

from .onnx import (
    DEFAULT_OPSET,
    META_FILE,
    ONNX_FILE,
    ExportError,
    ORTSegmentor,
    ParityResult,
    SegLogitsWrapper,
    check_parity,
    export_onnx,
    format_parity,
    second_shape,
)

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
