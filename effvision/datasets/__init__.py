"""Datasets and transforms that mmseg and mmdet lack."""

from .gta import GTA5Dataset
from .shapes import ShapesDataset, ShapesPanopticDataset
from .synthia import SynthiaDataset
from .transforms import LoadCocoPanopticAnnotations
from .uda import UDADataset

__all__ = [
    'GTA5Dataset',
    'LoadCocoPanopticAnnotations',
    'ShapesDataset',
    'ShapesPanopticDataset',
    'SynthiaDataset',
    'UDADataset',
]
