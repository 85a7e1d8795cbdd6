"""Bipartite matching of queries to ground-truth masks, shared by the mask-classification losses.

The assignment itself is scipy's ``linear_sum_assignment`` (the Hungarian method, as DETR,
Mask2Former, kMaX-DeepLab and PEM use it), run per image on a (queries, targets) cost matrix that
the caller builds. Each criterion defines its own cost; this module only solves it and turns the
per-image answers into the flat indices that gather matched predictions and targets. It also
checks the shape of a prediction dict, which every criterion reads the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from scipy.optimize import linear_sum_assignment

MatchIndices = tuple[torch.Tensor, torch.Tensor]


@torch.no_grad()
def hungarian_match(cost: torch.Tensor) -> MatchIndices:
    """Minimum-cost one-to-one assignment of queries to targets.

    With more queries than targets every target gets a query (and vice versa); the unmatched side
    is left out. Ties are broken as scipy breaks them.

    Args:
        cost: (Q, N) cost of giving target n to query q; any float dtype and device.

    Returns:
        ``(query_idx, target_idx)``: two int64 tensors of length ``min(Q, N)`` on ``cost``'s
        device, ``query_idx`` ascending.
    """
    if cost.dim() != 2:
        raise ValueError(f'cost must be a (queries, targets) matrix, got shape {tuple(cost.shape)}')
    if not torch.isfinite(cost).all():
        raise ValueError(
            'the matching cost holds NaN or inf; the predictions are not finite (check the '
            'learning rate, the loss scale under mixed precision, or the model for a bad layer)'
        )
    # float64 on the CPU: scipy converts to it anyway, and float32 -> float64 is exact.
    rows, cols = linear_sum_assignment(cost.detach().to('cpu', torch.float64).numpy())
    return (
        torch.as_tensor(rows, dtype=torch.int64, device=cost.device),
        torch.as_tensor(cols, dtype=torch.int64, device=cost.device),
    )


def batched_hungarian_match(costs: Sequence[torch.Tensor]) -> list[MatchIndices]:
    """:func:`hungarian_match` on each image's (Q, N_i) cost; N_i may differ and may be 0."""
    return [hungarian_match(cost) for cost in costs]


def query_index(indices: Sequence[MatchIndices]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(batch_idx, query_idx)`` that pick the matched queries out of a (B, Q, ...) tensor."""
    return _flat_index([rows for rows, _ in indices])


def target_index(indices: Sequence[MatchIndices]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(batch_idx, target_idx)`` that pick the matched targets out of a (B, N_max, ...) tensor."""
    return _flat_index([cols for _, cols in indices])


def _flat_index(per_image: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    batch = torch.cat([torch.full_like(idx, i) for i, idx in enumerate(per_image)])
    return batch, torch.cat(per_image)


def check_prediction(
    output: dict, name: str, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``pred_logits`` (B, Q, K+1) and ``pred_masks`` (B, Q, h, w) of one prediction dict.

    Raises:
        KeyError: A key is missing.
        ValueError: A shape does not fit ``num_classes`` or the other tensor.
    """
    for key in ('pred_logits', 'pred_masks'):
        if key not in output:
            raise KeyError(f'{name} has no {key!r} (keys: {sorted(output)})')
    logits, masks = output['pred_logits'], output['pred_masks']
    if logits.dim() != 3 or logits.shape[-1] != num_classes + 1:
        raise ValueError(
            f'{name}["pred_logits"] must be (B, Q, num_classes + 1 = {num_classes + 1}), got '
            f'{tuple(logits.shape)}'
        )
    if masks.dim() != 4 or masks.shape[:2] != logits.shape[:2]:
        raise ValueError(
            f'{name}["pred_masks"] must be (B, Q, h, w) with B, Q of pred_logits '
            f'{tuple(logits.shape[:2])}, got {tuple(masks.shape)}'
        )
    return logits, masks


def check_target(target: dict, index: int, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``masks`` (N, H, W) and ``labels`` (N,) of one image's target dict, checked.

    Raises:
        ValueError: The shapes disagree or a label is outside ``[0, num_classes)``.
    """
    masks, labels = target['masks'], target['labels']
    if masks.dim() != 3 or labels.shape != masks.shape[:1]:
        raise ValueError(
            f'targets[{index}]: masks must be (N, H, W) and labels (N,), got '
            f'{tuple(masks.shape)} and {tuple(labels.shape)}'
        )
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f'targets[{index}]["labels"] must lie in [0, {num_classes}), got {labels.tolist()}'
        )
    return masks, labels
