"""Evaluation metrics mmseg and mmdet lack (or that need packages the registry does not have)."""

from .metrics import DetSemSegIoUMetric, SubsetIoUMetric
from .panoptic_metric import PanopticQualityMetric

__all__ = ['DetSemSegIoUMetric', 'PanopticQualityMetric', 'SubsetIoUMetric']
