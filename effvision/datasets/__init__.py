"""Datasets and transforms that mmseg and mmdet lack."""

from .gta import GTA5Dataset
from .shapes import ShapesDataset
from .synthia import SynthiaDataset
from .uda import UDADataset

__all__ = ['GTA5Dataset', 'ShapesDataset', 'SynthiaDataset', 'UDADataset']
