# -*- coding: utf-8 -*-
r"""
ContentKNN
################################################

A training-free content baseline: items are scored by the similarity of their frozen features to the user's
recent history. It brackets the content models from below on new and cold items (no training signal at all,
yet every item has a vector), as Pop and ID SASRec bracket them on popular items.

Reference:
    Pasquale Lops, Marco de Gemmis, Giovanni Semeraro. "Content-based Recommender Systems: State of the Art
    and Trends." Recommender Systems Handbook, 2011 (nearest-neighbour content scoring).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from recbole_mm.model.abstract import MODALITIES, MMSequentialRecommender
from recbole_mm.registry import register_model
from recbole_mm.utils import cfg_get

AGGREGATES = ("mean", "max")


class NormalizedFeatures(torch.nn.Module):
    """Item ids -> L2-normalised frozen features (several modalities: each normalised, concatenated, rescaled)."""

    def __init__(self, tables: list):
        super().__init__()
        table = torch.cat([F.normalize(t.float(), dim=-1) for t in tables], -1) / len(tables) ** 0.5
        self.register_buffer("table", table, persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table[ids]


@register_model
class ContentKNN(MMSequentialRecommender):
    r"""Score(item) = similarity of its frozen features to the user's last ``knn_history`` items.

    ``knn_aggregate: mean``: the cosine similarity to the recency-weighted mean of the history vectors (weight
    ``knn_decay ** age``, age 0 = the most recent item); ``max``: the largest ``knn_decay ** age`` x cosine
    similarity over the history items (with ``knn_decay: 1``, a 1-nearest-neighbour scorer). Features are the frozen ones MoRec's two-stage mode uses
    (same keys: ``text_encoder``, ``image_encoder``, ...), extracted on first use.

    NOTE:
        Nothing is trained: ``calculate_loss`` returns a zero parameter, as RecBole's Pop does, so RecBole's
        trainer runs its one configured epoch (``epochs: 1`` in ContentKNN.yaml) and evaluates.
    """

    def __init__(self, config, dataset):
        super().__init__(config, dataset)

        # load parameters info
        self.modality = cfg_get(config, "knn_modality", "text")
        self.history = int(cfg_get(config, "knn_history", 10))
        self.aggregate = cfg_get(config, "knn_aggregate", "mean")
        self.decay = float(cfg_get(config, "knn_decay", 1.0))
        if self.modality not in MODALITIES:
            raise ValueError(f"ContentKNN knn_modality must be one of {sorted(MODALITIES)}, got {self.modality!r}")
        if self.aggregate not in AGGREGATES:
            raise ValueError(f"ContentKNN knn_aggregate must be one of {AGGREGATES}, got {self.aggregate!r}")
        if self.history < 1 or not 0.0 < self.decay <= 1.0:
            raise ValueError("ContentKNN needs knn_history >= 1 and 0 < knn_decay <= 1")
        if self.history > self.max_seq_length:
            raise ValueError(f"ContentKNN knn_history ({self.history}) is longer than the history the dataset keeps "
                             f"(MAX_ITEM_LIST_LENGTH = {self.max_seq_length}): raise MAX_ITEM_LIST_LENGTH")
        if self.similarity != "dot":
            raise ValueError("ContentKNN always scores by cosine similarity: the similarity / temperature keys of the "
                             "trained models do not apply (leave them unset)")
        self.expensive_item_tower = False

        # define layers
        tables = [self.frozen_features(config, dataset, m) for m in MODALITIES[self.modality]]
        self.item_tower = NormalizedFeatures(tables)
        self.fake_loss = torch.nn.Parameter(torch.zeros(1))

    def calculate_loss(self, interaction):
        return self.fake_loss  # training-free (RecBole's Pop does the same)

    def _history_weights(self, seq: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``[B, L]``: ``decay ** age`` on the last ``knn_history`` items of each sequence, 0 elsewhere."""
        positions = torch.arange(seq.shape[1], device=seq.device).unsqueeze(0)
        age = lengths.unsqueeze(1) - 1 - positions
        keep = (age >= 0) & (age < self.history) & (seq > 0)
        return torch.where(keep, self.decay ** age.clamp(min=0).float(), torch.zeros((), device=seq.device))

    def _history(self, interaction):
        seq, lengths = interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]
        return self.item_matrix()[seq], self._history_weights(seq, lengths)  # [B, L, d], [B, L]

    def _aggregate(self, sims: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``sims [B, L, ...]`` (history item x candidate) -> ``[B, ...]`` by ``knn_aggregate``."""
        w = weights.view(*weights.shape, *([1] * (sims.dim() - 2)))
        if self.aggregate == "mean":
            return (sims * w).sum(1) / w.sum(1).clamp(min=1e-12)
        return (sims * w).masked_fill(w == 0, float("-inf")).max(1).values

    def full_sort_predict(self, interaction):
        history, weights = self._history(interaction)
        matrix = self.item_matrix()
        if self.aggregate == "mean":  # the weighted mean of the similarities = similarity to the weighted mean
            w = weights / weights.sum(1, keepdim=True).clamp(min=1e-12)
            return (history * w.unsqueeze(-1)).sum(1) @ matrix.t()
        return self._aggregate(history @ matrix.t(), weights)

    def predict(self, interaction):
        history, weights = self._history(interaction)
        items = self.item_matrix()[interaction[self.ITEM_ID]]  # [B, d]
        return self._aggregate(torch.einsum("bld,bd->bl", history, items), weights)
