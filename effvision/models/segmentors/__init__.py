from .dacs import DACS

__all__ = ['DACS']
