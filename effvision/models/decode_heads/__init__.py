from .daformer_head import DAFormerHead, SegFormerAdapter

__all__ = ['DAFormerHead', 'SegFormerAdapter']
