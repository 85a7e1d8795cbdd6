"""effvision: efficient vision transformers and decoders for dense prediction."""

from .version import __version__

__all__ = ['__version__']
