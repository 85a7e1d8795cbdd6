"""Inference entry points used by demo/ and tools/."""

from .inference import ImageReadError, inference_model, init_model, read_image

__all__ = ['ImageReadError', 'inference_model', 'init_model', 'read_image']
