# -*- coding: utf-8 -*-
r"""
LATTICE
################################################

Reference:
    Jinghao Zhang, Yanqiao Zhu, Qiang Liu, Shu Wu, Shuhui Wang, Liang Wang. "Mining Latent Structures for
    Multimedia Recommendation." ACM MM 2021.

Reference:
    https://github.com/CRIPAC-DIG/LATTICE (paper code); https://github.com/enoche/MMRec (``src/models/lattice.py``,
    ``src/configs/model/LATTICE.yaml``, the version FMMRec's stage 0 uses)
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from recbole_mm.layers.graph import bipartite_adjacency, knn_graph, row_normalize, sym_normalize
from recbole_mm.model.general import MMGeneralRecommender, bpr_loss
from recbole_mm.registry import register_model
from recbole_mm.utils import cfg_get


def _edges(adj: torch.Tensor):
    adj = adj.coalesce()
    return adj.indices()[0], adj.indices()[1], adj.values()


def _propagate(rows, cols, values, h: torch.Tensor) -> torch.Tensor:
    """``A h`` for a graph given as (rows, cols, values), differentiable in ``values`` and ``h``."""
    return torch.zeros_like(h).index_add_(0, rows, values.unsqueeze(-1).to(h.dtype) * h[cols])


def _sym_normalized(rows, cols, values, n: int):
    """``D^-1/2 A D^-1/2`` (row sums) on edge lists, differentiable in ``values``; zero-degree rows stay zero."""
    deg = torch.zeros(n, dtype=values.dtype, device=values.device).index_add_(0, rows, values)
    scale = torch.where(deg > 0, deg.clamp(min=1e-12).rsqrt(), torch.zeros_like(deg))
    return values * scale[rows] * scale[cols]


@register_model
class LATTICE(MMGeneralRecommender):
    r"""LightGCN plus latent item-item graphs learned from the items' modality features.

    - Original graphs (built once): per modality, each item's ``knn_k`` most cosine-similar items (itself included)
      weighted by the similarity, ``D^-1/2 A D^-1/2``.
    - Learned graphs: the same kNN construction over the projected, trainable features (``Linear(d_m ->
      feat_embed_dim)`` of a trainable copy), mixed across modalities by softmax weights, normalised; the item graph
      is ``(1 - lambda_coeff) learned + lambda_coeff original`` (the original graphs mixed by the same weights).
      Item ID embeddings propagated ``n_layers`` times over it give ``h``.
    - User-item graph: ``D^-1 (A + I)`` (self-loops, row-normalised, as the original), LightGCN with ``n_ui_layers``
      layers (mean over the layers, layer 0 included); items = LightGCN item vector + ``normalize(h)``.
    - Loss: BPR + ``reg_weight`` times ``(|u|^2 + |i+|^2 + |i-|^2) / 2`` over the batch, divided by
      ``train_batch_size`` (as the original, also for a smaller last batch).

    NOTE:
        - As the original, the learned graph is rebuilt with gradients on the first batch of each epoch (the
          trainer's ``set_epoch`` hook) and reused, detached, by the epoch's other batches; evaluation rebuilds it.
        - The kNN graphs are sparse (edge lists, chunked top-k), never a dense ``n x n`` matrix (the original keeps
          dense ones); the learned edges' weights are the cosine similarities recomputed with gradients at the
          selected pairs.
        - Only the ``lightgcn`` collaborative model of the original (``cf_model``) is built (its ``ngcf`` and ``mf``
          options are not); ``n_ui_layers`` is the original's ``len(weight_size)``; MMRec's learning-rate scheduler
          (x 0.96 every 50 epochs) is not applied.
    """

    def __init__(self, config, dataset):
        super().__init__(config, dataset)

        # load parameters info
        self.embedding_size = int(config["embedding_size"])
        self.feat_embed_dim = int(cfg_get(config, "feat_embed_dim", self.embedding_size))
        self.knn_k = int(cfg_get(config, "knn_k", 10))
        self.lambda_coeff = float(cfg_get(config, "lambda_coeff", 0.9))
        self.n_layers = int(cfg_get(config, "n_layers", 1))
        self.n_ui_layers = int(cfg_get(config, "n_ui_layers", 2))
        self.reg_weight = float(cfg_get(config, "reg_weight", 1e-4))
        self.batch_size = int(config["train_batch_size"])
        if not 0.0 <= self.lambda_coeff <= 1.0:
            raise ValueError(f"lambda_coeff must be in [0, 1], got {self.lambda_coeff}")

        # graphs
        users, items = self.training_edges(dataset)
        n = self.n_users + self.n_items
        ui = bipartite_adjacency(users, items, self.n_users, self.n_items, normalize=False)
        eye = torch.sparse_coo_tensor(torch.arange(n).repeat(2, 1), torch.ones(n), (n, n), check_invariants=True)
        # graphs are buffers (they follow .to(); rebuilt at construction, not saved in checkpoints)
        self.register_buffer("norm_adj", row_normalize((ui + eye).coalesce()), persistent=False)
        features = {m: self.frozen_features(config, dataset, m) for m in self.modalities}
        for m, f in features.items():
            for part, t in zip(("rows", "cols", "values"), _edges(sym_normalize(knn_graph(f, self.knn_k, self_loops=True)))):
                self.register_buffer(f"original_{m}_{part}", t, persistent=False)
        self.build_graph = True
        self._item_graph = None

        # define layers
        self.init_id_and_feature_layers(features, self.embedding_size, self.feat_embed_dim)
        self.modal_weight = nn.Parameter(torch.full((len(features),), 1.0 / len(features)))

    def original(self, m: str):
        """``(rows, cols, values)`` of modality ``m``'s frozen kNN graph."""
        return tuple(getattr(self, f"original_{m}_{part}") for part in ("rows", "cols", "values"))

    def set_epoch(self, epoch: int) -> None:
        """Before every training epoch (MMTrainer): the epoch's first batch rebuilds the learned graph."""
        self.build_graph = True

    def item_graph(self):
        """``(rows, cols, values)`` of ``(1 - lambda) learned + lambda original``, both mixed by the modal weights (an
        edge list; pairs present in several parts are summed when propagating)."""
        weights = torch.softmax(self.modal_weight, 0)
        learned, original = [], []
        for k, m in enumerate(self.feature_tables):
            table = self.feature_tables[m].weight
            feats = self.feature_proj[m](table)
            valid = (table.detach().abs().sum(1) > 0).unsqueeze(-1)  # featureless items (padding): no edges
            r, c, _ = _edges(knn_graph(feats.detach() * valid, self.knn_k, self_loops=True))
            unit = F.normalize(feats, dim=-1)
            learned.append((r, c, weights[k] * (unit[r] * unit[c]).sum(-1)))
            o_r, o_c, o_v = self.original(m)
            original.append((o_r, o_c, weights[k] * o_v.to(feats.dtype)))
        l_r, l_c, l_v = (torch.cat(parts) for parts in zip(*learned))
        o_r, o_c, o_v = (torch.cat(parts) for parts in zip(*original))
        l_v = _sym_normalized(l_r, l_c, l_v, self.n_items)
        return (torch.cat([l_r, o_r]), torch.cat([l_c, o_c]),
                torch.cat([(1 - self.lambda_coeff) * l_v, self.lambda_coeff * o_v]))

    def user_item_matrices(self, training: bool):
        if not training or self.build_graph or self._item_graph is None:
            graph = self.item_graph()
            self.build_graph = False
        else:  # the epoch's other batches reuse its first batch's graph, detached (as the original)
            graph = self._item_graph
        self._item_graph = tuple(t.detach() for t in graph)
        h = self.item_id_embedding.weight
        for _ in range(self.n_layers):
            h = _propagate(*graph, h)
        users, items = self.lightgcn(self.norm_adj, self.n_ui_layers)
        return users, items + F.normalize(h, dim=-1)

    def calculate_loss(self, interaction):
        users, pos, neg = interaction[self.USER_ID], interaction[self.ITEM_ID], interaction[self.NEG_ITEM_ID]
        user_vecs, item_vecs = self.user_item_matrices(training=True)
        u, p, q = user_vecs[users], item_vecs[pos], item_vecs[neg]
        reg = 0.5 * (u.pow(2).sum() + p.pow(2).sum() + q.pow(2).sum()) / self.batch_size  # as the original
        return bpr_loss(u, p, q) + self.reg_weight * reg
