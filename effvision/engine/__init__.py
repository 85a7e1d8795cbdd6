"""Training-loop pieces mmengine lacks."""

from .schedulers import DeepLabPolyLR

__all__ = ['DeepLabPolyLR']
