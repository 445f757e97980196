# -*- coding: utf-8 -*-
r"""
FREEDOM
################################################

Reference:
    Xin Zhou, Zhiqi Shen. "A Tale of Two Graphs: Freezing and Denoising Graph Structures for Multimodal
    Recommendation." ACM MM 2023.

Reference:
    https://github.com/enoche/MMRec (``src/models/freedom.py``, ``src/configs/model/FREEDOM.yaml``)
"""

from __future__ import annotations

import torch

from recbole_mm.layers.graph import bipartite_adjacency, degree_sensitive_prune, knn_graph, sym_normalize
from recbole_mm.model.general import MMGeneralRecommender, bpr_loss
from recbole_mm.registry import register_model
from recbole_mm.utils import cfg_get


@register_model
class FREEDOM(MMGeneralRecommender):
    r"""LightGCN on the user-item graph, denoised by degree-sensitive edge pruning at every epoch, plus a frozen
    item-item kNN graph built once from the items' frozen modality features.

    - Item-item graph: per modality, each item's ``knn_k`` most cosine-similar items (itself included), binary
      weights, ``D^-1/2 A D^-1/2``; the modalities mixed as ``mm_image_weight * image + (1 - mm_image_weight) *
      text``. Item ID embeddings propagated ``n_mm_layers`` times over it give ``h``.
    - User-item graph: LightGCN (``n_ui_layers``, mean over the layers, layer 0 included) over user and item ID
      embeddings; in training, a pruned copy of the graph keeps ``1 - edge_dropout`` of the edges sampled with
      probability ``1 / sqrt(deg_u deg_i)`` (re-drawn before every epoch through the trainer's ``set_epoch`` hook,
      then re-normalised); evaluation uses the whole graph.
    - Items: LightGCN item vector + ``h``; users: the LightGCN user vector.
    - Loss: BPR on those, plus ``reg_weight`` times BPR of the user vector against each modality's projected
      features (``Linear(d_m -> feat_embed_dim)`` of a trainable copy of the features).

    NOTE:
        - Items without any feature (RecBole's padding item 0, a row of zeros) get no kNN neighbours.
        - The pruned edge count is ``round((1 - edge_dropout) E)`` (the original truncates), sampled with
          Gumbel-top-k keys (the distribution of ``torch.multinomial`` without replacement, which the original uses).
        - ``edge_dropout`` is the original's ``dropout`` key (a name RecBole already uses for other things).
        - The original saves the item-item graph beside the dataset (``mm_adj_freedomdsp_<k>_<w>.pt``); here it is
          rebuilt from the cached features at construction (seconds; chunked, never a dense n x n matrix).
    """

    def __init__(self, config, dataset):
        super().__init__(config, dataset)

        # load parameters info
        self.embedding_size = int(config["embedding_size"])
        self.feat_embed_dim = int(cfg_get(config, "feat_embed_dim", self.embedding_size))
        self.knn_k = int(cfg_get(config, "knn_k", 10))
        self.mm_image_weight = float(cfg_get(config, "mm_image_weight", 0.1))
        self.n_mm_layers = int(cfg_get(config, "n_mm_layers", 1))
        self.n_ui_layers = int(cfg_get(config, "n_ui_layers", 2))
        self.reg_weight = float(cfg_get(config, "reg_weight", 1e-4))
        self.edge_dropout = float(cfg_get(config, "edge_dropout", 0.8))
        if self.feat_embed_dim != self.embedding_size:
            raise ValueError(f"FREEDOM scores users against projected features: feat_embed_dim ({self.feat_embed_dim}) "
                             f"must equal embedding_size ({self.embedding_size})")
        if not 0.0 <= self.edge_dropout < 1.0:
            raise ValueError(f"edge_dropout must be in [0, 1), got {self.edge_dropout}")
        if not 0.0 <= self.mm_image_weight <= 1.0:
            raise ValueError(f"mm_image_weight must be in [0, 1], got {self.mm_image_weight}")

        # graphs
        self.edges = self.training_edges(dataset)
        # graphs are buffers (they follow .to(); rebuilt at construction, not saved in checkpoints)
        self.register_buffer("norm_adj", bipartite_adjacency(*self.edges, self.n_users, self.n_items), persistent=False)
        self.register_buffer("masked_adj", self.norm_adj, persistent=False)
        features = {m: self.frozen_features(config, dataset, m) for m in self.modalities}
        weights = {"image": self.mm_image_weight, "text": 1.0 - self.mm_image_weight} if len(features) > 1 else None
        mm_adj = None
        for m, feats in features.items():
            adj = sym_normalize(knn_graph(feats, self.knn_k, self_loops=True, binary=True))
            adj = adj if weights is None else adj * weights[m]
            mm_adj = adj if mm_adj is None else (mm_adj + adj).coalesce()
        self.register_buffer("mm_adj", mm_adj, persistent=False)

        # define layers
        self.init_id_and_feature_layers(features, self.embedding_size, self.feat_embed_dim)

    def set_epoch(self, epoch: int) -> None:
        """Before every training epoch (MMTrainer): draw the pruned user-item graph of this epoch."""
        if self.edge_dropout <= 0:
            self.masked_adj = self.norm_adj
            return
        kept = degree_sensitive_prune(*self.edges, self.n_users, self.n_items, self.edge_dropout)
        self.masked_adj = bipartite_adjacency(*kept, self.n_users, self.n_items).to(self.norm_adj.device)

    def propagate(self, adj):
        h = self.item_id_embedding.weight
        for _ in range(self.n_mm_layers):
            h = torch.sparse.mm(self.mm_adj, h)
        users, items = self.lightgcn(adj, self.n_ui_layers)
        return users, items + h

    def user_item_matrices(self, training: bool):
        return self.propagate(self.masked_adj if training else self.norm_adj)

    def calculate_loss(self, interaction):
        users, pos, neg = interaction[self.USER_ID], interaction[self.ITEM_ID], interaction[self.NEG_ITEM_ID]
        user_vecs, item_vecs = self.user_item_matrices(training=True)
        u = user_vecs[users]
        loss = bpr_loss(u, item_vecs[pos], item_vecs[neg])
        for m, table in self.feature_tables.items():
            feats = self.feature_proj[m](table.weight)
            loss = loss + self.reg_weight * bpr_loss(u, feats[pos], feats[neg])
        return loss
