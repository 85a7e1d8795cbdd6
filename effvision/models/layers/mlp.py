"""The transformer MLP of the token-layout backbones (Swin, CSWin, BiFormer, EfficientFormer)."""

from __future__ import annotations

import torch
from torch import nn


class Mlp(nn.Module):
    """Linear -> GELU -> dropout -> linear -> dropout on the last dim.

    State-dict names are ``fc1``/``fc2``, as in every official checkpoint that uses it.
    """

    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., dim) -> (..., dim)."""
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))
