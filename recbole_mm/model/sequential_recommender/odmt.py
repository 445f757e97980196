# -*- coding: utf-8 -*-
r"""
ODMT
################################################

Reference:
    Wei Ji, Xiangyan Liu, An Zhang, Yinwei Wei, Yongxin Ni, Xiang Wang. "Online Distillation-enhanced Multi-modal
    Transformer for Sequential Recommendation." ACM MM 2023 (arXiv 2308.04067).

Reference:
    https://github.com/xyliugo/ODMT (code)
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from recbole_mm.layers.fusion import masked_mean
from recbole_mm.layers.imt import BRANCHES, IMTItemTower
from recbole_mm.layers.sequence import build_sequence_encoder
from recbole_mm.model import losses
from recbole_mm.model.abstract import MMSequentialRecommender
from recbole_mm.registry import register_model
from recbole_mm.utils import cfg_get

ID_INITS = ("mean", "text", "image", "xavier")


class BranchSequenceEncoders(nn.Module):
    """One user encoder per branch over ``[B, L, 3 D]`` item vectors (ID, text, image) -> ``[B, L, 3 D]``."""

    def __init__(self, config, d: int):
        super().__init__()
        self.d = d
        self.encoders = nn.ModuleList(build_sequence_encoder(config, d) for _ in BRANCHES)

    def forward(self, vecs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        parts = vecs.split(self.d, dim=-1)
        return torch.cat([enc(part, lengths) for enc, part in zip(self.encoders, parts)], -1)


@register_model
class ODMT(MMSequentialRecommender):
    r"""ID-aware multimodal transformer with online distillation between its ID, text and image branches.

    Each item's frozen text and image tokens (``recbole-mm extract --kind tokens``, float16 memory maps, extracted on
    first use) and its ID vector go through the IMT (:mod:`recbole_mm.layers.imt`: the v1 mask keeps modal tokens
    from attending to the ID token), which yields three item views; three user encoders (the papers' SASRec block)
    score them. Loss: the three branches' in-batch softmax (logQ) plus ``w(epoch)`` times the distillation terms
    ``KD(text <- id) + KD(image <- id) + KD(id <- ensemble)`` (temperature ``kd_temperature``, teacher not detached
    unless ``kd_detach_teacher``; ``w`` ramps up over ``kd_alpha`` epochs; ``kd_alpha: 0`` switches it off);
    ``calculate_loss`` returns ``(ce, kd)`` so both are logged. ``full_sort_predict`` averages the three branches'
    scores; the trainer also reports each branch's metrics (``branch_valid_result`` / ``branch_test_result``).

    NOTE:
        - ``id_init``: ``mean`` (the original's ``init=1``: (text CLS + image CLS) / 2) needs text and image
          features of one width; ``text`` (``init=3``), ``image`` or ``xavier`` (``init=0``). The ID table keeps the
          feature width and a Linear maps it to D (the original projects ID, text and image 768 -> 768 likewise).
        - ``text_view`` / ``image_view``: the original reads the IMT output at the first text / image position
          (``cls``); a CNN image encoder has no CLS token, so the image view is then the mean over the image
          positions (``mean``, the default with EfficientNet-Lite0). The ID initialisation reads the same view of the
          frozen features.
        - ``token_type_embeddings`` (built, unused in the original) are not built; the IMT's heads and layers are
          separate keys (tied in the original); rank lists are not dumped.
        - The epoch of the ramp-up is 0-based (RecBole's epoch index).
    """

    def __init__(self, config, dataset):
        super().__init__(config, dataset)

        # load parameters info
        self.embedding_size = int(config["embedding_size"])
        self.id_init = cfg_get(config, "id_init", "text")
        self.kd_temperature = float(cfg_get(config, "kd_temperature", 0.4))
        self.kd_alpha = float(cfg_get(config, "kd_alpha", 20))
        self.kd_detach_teacher = bool(cfg_get(config, "kd_detach_teacher", False))
        self.mode = cfg_get(config, "mode", "two_stage")
        if self.id_init not in ID_INITS:
            raise ValueError(f"ODMT id_init must be one of {ID_INITS}, got {self.id_init!r}")
        if self.loss_name != "inbatch":
            raise ValueError(f"ODMT distils between the branches' in-batch logits: loss must be inbatch, got "
                             f"{self.loss_name!r}")
        if self.similarity != "dot":
            raise ValueError("ODMT scores each branch by a dot product (the ensemble averages them): similarity must "
                             f"be dot, got {self.similarity!r}")
        if self.mode != "two_stage":
            raise ValueError(f"ODMT reads frozen token features: mode must be two_stage, got {self.mode!r}")
        if self.kd_temperature <= 0 or self.kd_alpha < 0:
            raise ValueError(f"kd_temperature must be > 0 and kd_alpha >= 0, got {self.kd_temperature}, {self.kd_alpha}")
        self.epoch = 0
        self.eval_branch = None  # None: the ensemble; else one of BRANCHES (per-branch evaluation)
        self.branches = BRANCHES

        # define layers
        d = self.embedding_size
        text = self.build_content_tower(config, dataset, "text", "two_stage", d, tokens=True)
        image = self.build_content_tower(config, dataset, "image", "two_stage", d, tokens=True)
        views = {"text": cfg_get(config, "text_view", "cls"), "image": cfg_get(config, "image_view", "mean")}
        id_table = self.initial_id_table({"text": text, "image": image}, views)
        self.item_tower = IMTItemTower(
            text, image, id_table, d, n_layers=int(cfg_get(config, "imt_layers", 2)),
            n_heads=int(cfg_get(config, "imt_heads", 2)), dropout=float(cfg_get(config, "dropout_prob", 0.1)),
            text_view=views["text"], image_view=views["image"])
        self.seq_encoder = BranchSequenceEncoders(config, d)

    def feature_view(self, tower, view: str, chunk: int = 4096) -> torch.Tensor:
        """``[n_items, d]``: the frozen tokens of every item read by ``view`` (first token, or mean of the real ones)."""
        rows = []
        for ids in torch.arange(self.n_items).split(chunk):
            tokens, mask = tower.lookup(ids), tower.mask[ids]
            rows.append(tokens[:, 0] if view == "cls" else masked_mean(tokens, mask))
        return torch.cat(rows)

    def initial_id_table(self, towers: dict, views: dict) -> nn.Embedding:
        if self.id_init == "xavier":
            table = nn.Embedding(self.n_items, self.embedding_size)
            nn.init.xavier_normal_(table.weight)
            return table
        sources = ["text", "image"] if self.id_init == "mean" else [self.id_init]
        rows = [self.feature_view(towers[m], views[m]) for m in sources]
        if len({r.shape[1] for r in rows}) > 1:
            raise ValueError(f"id_init mean averages text and image features, but their widths differ "
                             f"({rows[0].shape[1]} and {rows[1].shape[1]}): use id_init text, image or xavier")
        return nn.Embedding.from_pretrained(sum(rows) / len(rows), freeze=False)

    # -------------------------------------------------------------- training
    def set_epoch(self, epoch: int) -> None:
        """Called by :class:`~recbole_mm.trainer.MMTrainer` before each training epoch (0-based)."""
        self.epoch = int(epoch)

    def branch_logits(self, b: dict) -> tuple[list, torch.Tensor, torch.Tensor]:
        """Each branch's in-batch logits ``[N, C]`` (ID, text, image), the labels and the columns' log-multiplicity
        (:func:`~recbole_mm.model.losses.inbatch_logits`), from :meth:`loss_inputs`."""
        seq, lengths, uniq, counts = b["seq"], b["lengths"], b["uniq"], b["counts"]
        vecs = b["uniq_vecs"][b["inverse"]]
        states = self.user_states(seq, lengths, vecs[:, : seq.shape[1]])
        keep = (uniq > 0) & (counts > 0)
        cand = b["uniq_vecs"][keep]
        log_pop = self.log_pop[uniq[keep]] if self.logq_correction else None
        logits = []
        for u, v in zip(states.split(self.embedding_size, -1), cand.split(self.embedding_size, -1)):
            z, labels, log_counts = losses.inbatch_logits(u, b["targets"], uniq[keep], v, b["full"], b["users"],
                                                          log_pop, counts[keep], return_log_counts=True)
            logits.append(z)
        return logits, labels, log_counts

    def calculate_loss(self, interaction):
        logits, labels, log_counts = self.branch_logits(self.loss_inputs(interaction))
        ce = sum(F.cross_entropy(z, labels) for z in logits)
        weight = losses.kd_rampup(self.epoch, self.kd_alpha)
        if weight == 0:
            return ce, torch.zeros_like(ce)
        z_id, z_text, z_image = logits
        z_ens = (z_id + z_text + z_image) / 3
        kd = sum(losses.kd_loss(student, teacher, self.kd_temperature, self.kd_detach_teacher, log_counts)
                 for student, teacher in ((z_text, z_id), (z_image, z_id), (z_id, z_ens)))
        return ce, weight * kd

    # ------------------------------------------------------------- inference
    def score_users(self, states: torch.Tensor) -> torch.Tensor:
        """The ensemble (mean of the three branches' dot products), or one branch's (``eval_branch``)."""
        if self.eval_branch is None:
            return states / len(BRANCHES)
        k = BRANCHES.index(self.eval_branch)
        d = self.embedding_size
        out = torch.zeros_like(states)
        out[..., k * d:(k + 1) * d] = states[..., k * d:(k + 1) * d]
        return out
