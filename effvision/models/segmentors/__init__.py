from .dacs import DACS
from .mask_classifier import MaskClassificationFusionHead, PanopticMaskClassifier

__all__ = ['DACS', 'MaskClassificationFusionHead', 'PanopticMaskClassifier']
