"""Fusion of per-modality item vectors into one item vector (the MMSR catalogue extends this table).

Each fusion takes a list of ``[n, D]`` vectors (one per modality, in config order) and returns ``[n, D]``.
"""

from __future__ import annotations

import torch
from torch import nn


class SumFusion(nn.Module):
    """``sum_m v_m`` (no parameters)."""

    def __init__(self, d: int, n_modalities: int):
        super().__init__()

    def forward(self, vectors: list) -> torch.Tensor:
        return torch.stack(vectors, 0).sum(0)


class ConcatFusion(nn.Module):
    """``W [v_1; ...; v_M]`` (a Linear from ``M*D`` to ``D``)."""

    def __init__(self, d: int, n_modalities: int):
        super().__init__()
        self.proj = nn.Linear(d * n_modalities, d)
        nn.init.xavier_normal_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, vectors: list) -> torch.Tensor:
        return self.proj(torch.cat(vectors, -1))


FUSIONS = {"sum": SumFusion, "concat": ConcatFusion}


def build_fusion(kind: str, d: int, n_modalities: int) -> nn.Module:
    if kind not in FUSIONS:
        raise ValueError(f"unknown fusion {kind!r}; choose from {sorted(FUSIONS)}")
    return FUSIONS[kind](d, n_modalities)
