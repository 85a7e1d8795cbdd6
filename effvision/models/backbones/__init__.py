from .swin import Swin

__all__ = ['Swin']
