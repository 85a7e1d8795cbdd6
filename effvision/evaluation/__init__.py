"""Evaluation metrics mmseg lacks."""

from .metrics import SubsetIoUMetric

__all__ = ['SubsetIoUMetric']
