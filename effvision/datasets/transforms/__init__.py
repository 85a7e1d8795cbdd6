"""Data transforms that mmseg and mmdet lack (or that need packages the registry does not have)."""

from .loading import LoadCocoPanopticAnnotations, rgb2id

__all__ = ['LoadCocoPanopticAnnotations', 'rgb2id']
