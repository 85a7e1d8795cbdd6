from .daformer_head import DAFormerHead, SegFormerAdapter
from .mask_classification import MaskClassificationHead
from .pem_head import PEMHead

__all__ = ['DAFormerHead', 'MaskClassificationHead', 'PEMHead', 'SegFormerAdapter']
