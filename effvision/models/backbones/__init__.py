from .base import DenseBackbone
from .biformer import BiFormer
from .cswin import CSWin
from .efficientformer import EfficientFormer
from .efficientformer_v2 import EfficientFormerV2
from .moat import MOAT
from .nextvit import NextViT
from .resnet_stem import ResNetWithStem
from .swin import Swin

__all__ = [
    'BiFormer',
    'CSWin',
    'DenseBackbone',
    'EfficientFormer',
    'EfficientFormerV2',
    'MOAT',
    'NextViT',
    'ResNetWithStem',
    'Swin',
]
