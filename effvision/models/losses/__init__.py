from .kmax_loss import KMaXCriterion
from .mask2former_loss import Mask2FormerCriterion

__all__ = ['KMaXCriterion', 'Mask2FormerCriterion']
