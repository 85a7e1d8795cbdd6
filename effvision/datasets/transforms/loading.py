"""COCO panoptic annotation loading without panopticapi.

mmdet 3.3's ``LoadPanopticAnnotations`` needs panopticapi (``cocodataset/panopticapi``, not on the
package registry) for one function: ``rgb2id``, which decodes a panoptic PNG into segment ids.
:class:`LoadCocoPanopticAnnotations` is that transform with our own decoder and nothing else
changed, so its output is mmdet's to the dtype: ``gt_bboxes``, ``gt_bboxes_labels`` and
``gt_ignore_flags`` from the dataset's ``instances``, ``gt_masks`` (``BitmapMasks``, one per thing
segment, crowd regions excluded) and ``gt_seg_map`` (the label of every listed segment, things,
stuff and crowd regions alike; 255 where no listed segment is, i.e. VOID).
"""

from __future__ import annotations

import numpy as np
from mmdet.datasets.transforms import LoadPanopticAnnotations
from mmdet.datasets.transforms.loading import LoadAnnotations

from effvision.registry import TRANSFORMS


def rgb2id(color: np.ndarray) -> np.ndarray:
    """Segment ids of a COCO panoptic PNG: ``id = R + 256 * G + 256**2 * B``.

    Args:
        color: ``(H, W, 3)`` RGB image (channel order R, G, B), any integer dtype.

    Returns:
        ``(H, W)`` ids; int32 for uint8 input (as panopticapi returns, which mmdet's ``gt_seg_map``
        dtype inherits), int64 otherwise.
    """
    if color.ndim != 3 or color.shape[-1] != 3:
        raise ValueError(
            f'a panoptic PNG must decode to an (H, W, 3) RGB array, got shape {color.shape}; '
            "read it with flag='color', channel_order='rgb'"
        )
    if not np.issubdtype(color.dtype, np.integer):
        raise ValueError(f'a panoptic PNG holds integer colours, got {color.dtype}')
    color = color.astype(np.int32 if color.dtype == np.uint8 else np.int64)
    return color[..., 0] + 256 * color[..., 1] + 256 * 256 * color[..., 2]


@TRANSFORMS.register_module()
class LoadCocoPanopticAnnotations(LoadPanopticAnnotations):
    """mmdet's ``LoadPanopticAnnotations``, without its panopticapi dependency.

    Use it where an mmdet config has ``dict(type='LoadPanopticAnnotations')``::

        dict(type='effvision.LoadCocoPanopticAnnotations')

    Args:
        with_bbox: Load ``gt_bboxes`` (and ``gt_ignore_flags``).
        with_label: Load ``gt_bboxes_labels``.
        with_mask: Load ``gt_masks`` (one bitmap per thing segment).
        with_seg: Load ``gt_seg_map`` (thing and stuff labels; 255 is VOID).
        box_type: Box type of ``gt_bboxes``.
        imdecode_backend: Image decoding backend of ``mmcv.imfrombytes``.
        backend_args: File backend arguments.
    """

    def __init__(
        self,
        with_bbox: bool = True,
        with_label: bool = True,
        with_mask: bool = True,
        with_seg: bool = True,
        box_type: str = 'hbox',
        imdecode_backend: str = 'cv2',
        backend_args: dict | None = None,
    ) -> None:
        # LoadPanopticAnnotations.__init__ only adds the panopticapi import to its parent's, so
        # we call the parent's directly and supply the decoder ourselves.
        LoadAnnotations.__init__(
            self,
            with_bbox=with_bbox,
            with_label=with_label,
            with_mask=with_mask,
            with_seg=with_seg,
            with_keypoints=False,
            box_type=box_type,
            imdecode_backend=imdecode_backend,
            backend_args=backend_args,
        )
        self.rgb2id = rgb2id
