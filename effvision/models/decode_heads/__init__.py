from .daformer_head import DAFormerHead, SegFormerAdapter
from .kmax_head import KMaXHead
from .mask_classification import MaskClassificationHead
from .pem_head import PEMHead

__all__ = ['DAFormerHead', 'KMaXHead', 'MaskClassificationHead', 'PEMHead', 'SegFormerAdapter']
