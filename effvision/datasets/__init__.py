"""Datasets and transforms that mmseg and mmdet lack."""

from .shapes import ShapesDataset

__all__ = ['ShapesDataset']
