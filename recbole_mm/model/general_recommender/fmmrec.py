# -*- coding: utf-8 -*-
r"""
FMMRec
################################################

Reference:
    Weixin Chen, Li Chen, Yongxin Ni, Yuhan Zhao, Fajie Yuan, Yongfeng Zhang. "FMMRec: Fairness-aware Multimodal
    Recommendation." arXiv 2310.17373; journal version "Causality-Inspired Fair Representation Learning for
    Multimodal Recommendation." ACM TOIS 43(6), 2025.

Reference:
    https://github.com/WeixinChen98/FMMRec (``src/BMMF*.py``, ``src/models/fairness_models/bfmmr.py``,
    ``src/common/trainer.py``; behaviour only, no code reused)
"""

from __future__ import annotations

import os

import torch
from torch import nn

from recbole_mm import distributed
from recbole_mm.config import yaml_keys
from recbole_mm.fairness import Attacker, as_fields, sensitive_labels
from recbole_mm.layers.fair import SensitiveFilter, attacker_loss, frozen_call
from recbole_mm.layers.graph import bipartite_counts, knn_graph, row_normalize, sym_normalize
from recbole_mm.model import fmmrec_stages
from recbole_mm.model.general import MMGeneralRecommender
from recbole_mm.paths import properties_dir
from recbole_mm.registry import register_model
from recbole_mm.utils import cfg_get

UUGRAPH_WEIGHTS = {"text": 0.2, "image": 0.6, "audio": 0.2}  # the original's ml1m weights


@register_model
class FMMRec(MMGeneralRecommender):
    r"""Fair multimodal recommendation on a trained graph backbone, in three stages run by one ``fit``.

    - Stage 0: the backbone's user / item vectors ``U``, ``I`` (``fmmrec_backbone``: a model trained first, or a
      checkpoint), frozen.
    - Stage 1 (BMMF): per modality, a biased and a filtered transform of the frozen item features, learned against
      attackers on user-level features (:class:`~recbole_mm.layers.fair.ModalDisentangler`).
    - Stage 2 (this model's parameters): per modality a user-user kNN graph (``knn_k_uugraph``, cosine, row-wise
      top-k, ``D^-1/2 A D^-1/2``) from the users' mean biased features and one from their mean filtered features,
      mixed across modalities with ``uugraph_weights`` into ``A^b`` and ``A^f``; neighbour enhancement
      ``U' = U + mg_weight (A^f^L U - A^b^L U)`` (``L = n_mg_uugraph_layers``); the shared sensitive filter with
      prompts gives ``Ũ = filter(U', user)``, ``Ĩ = filter(I, item)``; score ``<Ũ_u, Ĩ_i>``.
    - Loss: BPR with the batch's L2 term minus ``disc_reg_weight`` times, per sensitive attribute, the user
      attacker's loss on ``Ũ`` plus ``weight_i`` times the item attacker's loss on ``Â Ĩ`` (the mean fair item
      vector of the user's training items). After every optimizer step the attackers take ``d_steps`` steps on the
      batch's detached vectors (:meth:`after_optimizer_step`). The recommender loss reaches the attackers' inputs
      only (their parameters are detached); the attackers' loss reaches nothing of the recommender.

    NOTE:
        - The original builds the *audio* user-user graphs from the *text* features (copy-paste bug): fixed here;
          ``audio_graph_from_text: true`` reproduces it.
        - The original's multi-class "random label" for the filtered attacker is drawn from classes ``0 .. C-2``
          (``randint(0, C-1)``); here from all ``C`` classes.
        - Stage 1's item features are those of the last BMMF epoch (the original picked an epoch per modality by
          hand: v 90, t 70, a 80 on ml1m).
        - Graphs are sparse (chunked top-k); the original densifies ``n_users x n_users`` and ``n_users x n_items``.
        - ``filter_mode`` is ``shared`` (the original's default); its ``independent`` / ``user-only`` are not built.
        - ``uugraph_weights`` are used as given for the modalities present (the original's text 0.2, image 0.6,
          audio 0.2; without audio they sum to 0.8, as in the original with its audio weight set to 0).
    """

    supported_modalities = ("text", "image", "audio")
    BMMF_DEFAULTS = {"bmmf_epochs": 100, "bmmf_learning_rate": 1e-3, "bmmf_biased_weight": 0.1,
                     "bmmf_filtered_weight": 0.1, "bmmf_separation_weight": 0.1, "bmmf_d_steps": 1}

    def __init__(self, config, dataset):
        super().__init__(config, dataset)

        # load parameters info
        self.embedding_size = int(config["embedding_size"])
        self.reg_weight = float(cfg_get(config, "reg_weight", 1e-4))
        self.knn_k = int(cfg_get(config, "knn_k_uugraph", 10))
        self.n_mg_layers = int(cfg_get(config, "n_mg_uugraph_layers", 1))
        self.mg_weight = float(cfg_get(config, "mg_weight", 0.1))
        self.disc_reg_weight = float(cfg_get(config, "disc_reg_weight", 0.1))
        self.weight_i = float(cfg_get(config, "weight_i", 0.5))
        self.d_steps = int(cfg_get(config, "d_steps", 10))
        self.attacker_lr = float(cfg_get(config, "attacker_lr", 1e-3))
        self.attacker_weight_decay = float(cfg_get(config, "attacker_weight_decay", 0.0))
        self.audio_graph_from_text = bool(cfg_get(config, "audio_graph_from_text", False))
        weights = dict(UUGRAPH_WEIGHTS, **dict(cfg_get(config, "uugraph_weights", {}) or {}))
        self.uugraph_weights = {m: float(weights.get(m, 0.0)) for m in self.modalities}
        if cfg_get(config, "filter_mode", "shared") != "shared":
            raise ValueError("FMMRec: only filter_mode 'shared' is built (the original's default)")
        if self.audio_graph_from_text and "audio" in self.modalities and "text" not in self.modalities:
            raise ValueError("audio_graph_from_text reproduces the original's bug (audio graphs from text features): "
                             "it needs the text modality")

        # sensitive attributes of every internal user id (-1: no value)
        self.fields = as_fields(cfg_get(config, "sensitive_fields", ["gender", "age", "occupation"]))
        labels = sensitive_labels(dataset, self.fields, torch.arange(self.n_users), bins=cfg_get(config, "sensitive_bins"))
        self.n_classes = {f: len(classes) for f, (_, classes, _) in labels.items()}
        self.register_buffer("labels", torch.stack([labels[f][0] for f in self.fields], 1), persistent=False)

        # the training interactions: Â (row-normalised user x item) and the digest that keys the stage caches
        users, items = self.training_edges(dataset)
        self.batch_users = users
        self.edges_digest = fmmrec_stages.digest([fmmrec_stages.tensor_digest(users), fmmrec_stages.tensor_digest(items),
                                                  self.n_users, self.n_items])
        self.register_buffer("inter_norm", row_normalize(bipartite_counts(users, items, self.n_users, self.n_items)),
                             persistent=False)

        # frozen item features of each modality (stage 1's input; read here so that checkpoints record them)
        self.features = {m: self.frozen_features(config, dataset, m).float() for m in self.modalities}

        # stage inputs (set by before_fit, saved with the model): U' after neighbour enhancement, and I
        d = self.embedding_size
        self.register_buffer("user_input", torch.zeros(self.n_users, d))
        self.register_buffer("item_input", torch.zeros(self.n_items, d))
        self.register_buffer("stages_done", torch.zeros((), dtype=torch.bool))
        self.stage_info: dict = {}

        # define layers
        self.filter = SensitiveFilter(d, self.fields, prompt_mode=cfg_get(config, "prompt_mode", "concat"))
        self.user_attackers = nn.ModuleDict({f: Attacker(d, c) for f, c in self.n_classes.items()})
        self.item_attackers = nn.ModuleDict({f: Attacker(d, c) for f, c in self.n_classes.items()})
        self._attacker_optimizer = None
        self._last_batch = None

    @classmethod
    def own_config_keys(cls) -> set:
        """FMMRec's own keys (in its yaml, not in the backbones' yamls): they never reach the backbone."""
        yaml = lambda name: yaml_keys(os.path.join(properties_dir(), "model", f"{name}.yaml"))  # noqa: E731
        return yaml("FMMRec") - yaml("LATTICE") - yaml("FREEDOM")

    # ------------------------------------------------------------- stages 0 and 1
    def before_fit(self, config, train_data, valid_data, show_progress: bool = False) -> None:
        """Stages 0 and 1 (cached, :mod:`recbole_mm.model.fmmrec_stages`), then the stage-2 inputs. A model whose
        inputs are set (loaded from a checkpoint) keeps them."""
        if bool(self.stages_done):
            return
        dataset = train_data._dataset
        users, items, info = fmmrec_stages.backbone_representations(self, config, train_data, valid_data, show_progress)
        features = self.features
        user_feats = {m: torch.sparse.mm(self.inter_norm.cpu(), f) for m, f in features.items()}
        labels = {f: self.labels[:, k].cpu() for k, f in enumerate(self.fields)}
        disentangled = fmmrec_stages.disentangled_features(self, config, dataset, features, user_feats, self.batch_users,
                                                           labels, show_progress)
        self.set_stage_inputs(users, items, disentangled)
        self.stage_info = info

    def user_graph(self, item_feats: torch.Tensor) -> torch.Tensor:
        """``D^-1/2 A D^-1/2`` of the users' top-``knn_k_uugraph`` cosine neighbours (themselves included) by their
        mean item features ``Â F``."""
        user_feats = torch.sparse.mm(self.inter_norm.cpu(), item_feats.float().cpu())
        return sym_normalize(knn_graph(user_feats, self.knn_k, self_loops=True)).float()

    def set_stage_inputs(self, users: torch.Tensor, items: torch.Tensor, disentangled: dict) -> None:
        """``U' = U + mg_weight (A^f^L U - A^b^L U)`` from the stage-0 vectors and the stage-1 features."""
        views = {}
        for view, idx in (("biased", 0), ("filtered", 1)):
            adj = None
            for m in self.modalities:
                source = "text" if (m == "audio" and self.audio_graph_from_text) else m
                part = self.user_graph(disentangled[source][idx]) * self.uugraph_weights[m]
                adj = part if adj is None else (adj + part).coalesce()
            h = users.float().cpu()
            for _ in range(self.n_mg_layers):
                h = torch.sparse.mm(adj, h)
            views[view] = h
        enhanced = users.float().cpu() + self.mg_weight * (views["filtered"] - views["biased"])
        self.user_input.copy_(enhanced.to(self.user_input.device))
        self.item_input.copy_(items.float().to(self.item_input.device))
        self.stages_done.fill_(True)
        self.invalidate_matrices()

    # ------------------------------------------------------------- stage 2
    def user_item_matrices(self, training: bool):
        if not bool(self.stages_done):
            raise RuntimeError("FMMRec has no backbone vectors yet: train it (fit runs stages 0 and 1 first) or load "
                               "a checkpoint of a trained FMMRec")
        return self.filter(self.user_input, users=True), self.filter(self.item_input, users=False)

    def fairness_views(self) -> dict:
        """The vectors the attackers see: the fair users ``Ũ`` and the item-aggregated ``Â Ĩ``."""
        users, items = self.user_item_matrices(training=False)
        return {"user": users, "item_aggregated": torch.sparse.mm(self.inter_norm, items)}

    def optimizer_groups(self, config):
        """The recommender's parameters only: the attackers have their own optimizer (:meth:`after_optimizer_step`)."""
        attackers = {id(p) for p in list(self.user_attackers.parameters()) + list(self.item_attackers.parameters())}
        return [{"params": [p for p in self.parameters() if id(p) not in attackers]}]

    def adversarial_terms(self, fair_users: torch.Tensor, aggregated: torch.Tensor, labels: torch.Tensor,
                          frozen: bool, item_weight: float = 1.0) -> torch.Tensor:
        """``sum_k [ l(D^u_k(Ũ), s_k) + item_weight * l(D^i_k(Â Ĩ), s_k) ]`` over the rows with a label (the
        recommender's loss weighs the item attackers by ``weight_i``; each attacker trains on its own loss)."""
        call = frozen_call if frozen else (lambda module, x: module(x))
        total = fair_users.new_zeros(())
        for k, f in enumerate(self.fields):
            du, di = self.user_attackers[f], self.item_attackers[f]
            total = total + attacker_loss(du, call(du, fair_users), labels[:, k]) \
                + item_weight * attacker_loss(di, call(di, aggregated), labels[:, k])
        return total

    def calculate_loss(self, interaction):
        users, pos, neg = interaction[self.USER_ID], interaction[self.ITEM_ID], interaction[self.NEG_ITEM_ID]
        user_vecs, item_vecs = self.user_item_matrices(training=True)
        u, p, n = user_vecs[users], item_vecs[pos], item_vecs[neg]
        bpr = -torch.nn.functional.logsigmoid((u * p).sum(-1) - (u * n).sum(-1)).mean()
        reg = self.reg_weight * 0.5 * (u.pow(2).sum() + p.pow(2).sum() + n.pow(2).sum()) / users.numel()
        aggregated = torch.sparse.mm(self.inter_norm, item_vecs)[users]
        labels = self.labels[users]
        self._last_batch = (u.detach(), aggregated.detach(), labels)
        return bpr + reg - self.disc_reg_weight * self.adversarial_terms(u, aggregated, labels, frozen=True,
                                                                         item_weight=self.weight_i)

    def after_optimizer_step(self) -> None:
        """``d_steps`` Adam steps of every attacker on the last batch's detached vectors (MMTrainer calls this
        after each optimizer step)."""
        if self._last_batch is None or self.d_steps <= 0:
            return
        if self._attacker_optimizer is None:
            params = list(self.user_attackers.parameters()) + list(self.item_attackers.parameters())
            self._attacker_optimizer = torch.optim.Adam(params, lr=self.attacker_lr,
                                                        weight_decay=self.attacker_weight_decay)
        fair_users, aggregated, labels = self._last_batch
        params = [p for group in self._attacker_optimizer.param_groups for p in group["params"]]
        with torch.enable_grad():
            for _ in range(self.d_steps):
                self._attacker_optimizer.zero_grad(set_to_none=True)
                self.adversarial_terms(fair_users, aggregated, labels, frozen=False).backward()
                # the attackers step outside DDP's backward: their gradients are averaged here, or each rank's
                # attackers would learn from its share of the batch only and drift apart
                distributed.average_gradients(params)
                self._attacker_optimizer.step()
        self._attacker_optimizer.zero_grad(set_to_none=True)  # no stale gradients in the model's (clipping, counts)
        self._last_batch = None
