# -*- coding: utf-8 -*-
r"""
PMMRec
################################################

Reference:
    Youhua Li, Hanwen Du, Yongxin Ni, et al. (Li, Du, Ni, Zhao, Guo, Yuan, Zhou). "Multi-Modality is All You Need
    for Transferable Recommender Systems."
    ICDE 2024 (arXiv 2312.09602).

Reference:
    https://github.com/ICDE24/PMMRec (code: the transfer stage; the pre-training objectives were not released)
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from recbole_mm.model import pretrain_losses
from recbole_mm.model.abstract import is_restoring_checkpoint
from recbole_mm.model.sequential_recommender.mmsr import MMSR
from recbole_mm.registry import register_model
from recbole_mm.utils import cfg_get

logger = logging.getLogger(__name__)

TRAIN_STAGES = ("pretrain", "finetune", "scratch")
TRANSFERS = {"full": ("item_tower.", "seq_encoder."), "item_encoder": ("item_tower.",),
             "user_encoder": ("seq_encoder.",)}
# Keys that must agree between the pre-trained checkpoint and the fine-tuning run (they shape the weights or
# decide what the transferred weights mean).
TRANSFER_KEYS = {
    "item_tower.": ("modality", "mode", "fusion", "embedding_size", "fusion_heads", "fusion_layers",
                    "fusion_dnn_layers", "text_encoder", "image_encoder", "text_pooling", "image_pooling", "finetune"),
    "seq_encoder.": ("seq_encoder", "embedding_size", "n_layers", "n_heads"),
}
MODALITY_KEYS = {"text_encoder": "text", "text_pooling": "text", "image_encoder": "image", "image_pooling": "image"}


class TransferError(ValueError):
    """A pre-trained checkpoint that does not fit the fine-tuning model (``pretrained_path`` / ``transfer``)."""


def read_checkpoint(path: str, transfer: str, config, model_name: str) -> dict:
    """The checkpoint at ``path``, checked against this run's config for ``transfer`` (a :class:`TransferError`
    naming the key otherwise): done before the model builds its towers, so a mismatch costs no extraction."""
    if not os.path.isfile(path):
        raise TransferError(f"pretrained_path {path} does not exist")
    try:  # the user's own RecBole checkpoint (it pickles a Config): trusted, as RecBole loads it
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise TransferError(f"pretrained_path {path} is not a readable checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(checkpoint, dict) or checkpoint.get("state_dict") is None:
        raise TransferError(f"pretrained_path {path} has no state_dict: give the .pth file a PMMRec run saved")
    saved = checkpoint.get("config")
    saved_model = saved["model"] if saved is not None else None
    if saved_model is not None and saved_model != model_name:
        raise TransferError(f"pretrained_path {path} is a checkpoint of {saved_model}, not of {model_name}: pre-train "
                            f"with --model {model_name} train_stage=pretrain")
    if saved is not None and config is not None:
        modality = cfg_get(config, "modality", "text+image")
        for prefix in TRANSFERS[transfer]:
            for key in TRANSFER_KEYS[prefix]:
                if key in MODALITY_KEYS and MODALITY_KEYS[key] not in modality:
                    continue
                if saved[key] != config[key]:
                    raise TransferError(f"pretrained_path {path} was trained with {key}: {saved[key]!r}, this run has "
                                        f"{config[key]!r}; transfer {transfer!r} needs the same {key}")
    return checkpoint


class NICLProjector(nn.Module):
    """NICL's shared projector (the early commit): ``BN(Linear(2D -> D)(ReLU(Linear(D -> 2D)(x))))``."""

    def __init__(self, d: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, 2 * d), nn.ReLU(), nn.Linear(2 * d, d), nn.BatchNorm1d(d))
        for module in self.net:
            if isinstance(module, nn.Linear):
                nn.init.xavier_normal_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@register_model
class PMMRec(MMSR):
    r"""MMSR with merge-attention fusion, pre-trained on source domains and transferred to a new one.

    ``train_stage``:

    - ``pretrain``: ``(1 - nicl_alpha) * L_next + nicl_alpha * L_NICL + nid_weight * L_NID + rcl_weight * L_RCL``
      (:mod:`recbole_mm.model.pretrain_losses`): the next-item loss (``loss``), next-item enhanced cross-modal
      contrastive learning between each item's text and image vectors, noised item detection (a per-position
      binary head on the user encoder over a corrupted copy of each sequence) and robustness-aware contrastive
      learning (the clean vs the corrupted user representation). ``source_datasets: [a, b]`` pre-trains on
      several dataset folders merged into one (tokens prefixed by their dataset).
    - ``finetune``: load ``pretrained_path`` (a checkpoint of a PMMRec run) by key prefix, as ``transfer`` says:
      ``full`` (item encoder = towers + fusion, and user encoder), ``item_encoder`` (the user encoder starts
      anew) or ``user_encoder`` (the item encoder starts anew). Target items are encoded from their content, so
      items never seen in pre-training need nothing else. ``epochs: 0`` evaluates the transferred model as it
      is (zero-shot).
    - ``scratch``: train on the target alone.

    NOTE:
        Reconstructions and deviations (also in docs/models.md and properties/model/PMMRec.yaml):

        - NID and RCL were never released: their corruption (``nid_rate``, ``nid_replace_share``), forms, weights
          (``nid_weight``, ``rcl_weight``) and ``rcl_temperature`` are reconstructions from the paper's abstract.
          NICL follows the early commit's code (tau 0.1, alpha 0.4, text -> image, next-item positives, same-user
          exclusion, at the last position too); ``nicl_symmetric`` adds image -> text.
        - ``transfer: user_encoder`` loads the user encoder's weights by key prefix (the original loads with
          full-model key names and ``strict=False``, which probably loads nothing); a checkpoint that does not
          fit is an error naming the keys (the original exits silently).
        - The merge-attention layer is freshly initialised N(0, 0.02) (the original's loader points at a dead
          URL and its names do not match BERT's); its unused modality-type embedding is not built.
    """

    def __init__(self, config, dataset):
        self.train_stage = cfg_get(config, "train_stage", "scratch")
        if self.train_stage not in TRAIN_STAGES:
            raise ValueError(f"train_stage must be one of {TRAIN_STAGES}, got {self.train_stage!r}")
        path, transfer = cfg_get(config, "pretrained_path"), cfg_get(config, "transfer", "full")
        checkpoint = None
        if self.train_stage != "finetune" and path:
            raise ValueError(f"pretrained_path is only read with train_stage finetune (this run: train_stage "
                             f"{self.train_stage!r}): set train_stage=finetune to transfer it, or drop pretrained_path")
        if self.train_stage == "finetune" and not is_restoring_checkpoint():
            if transfer not in TRANSFERS:
                raise ValueError(f"transfer must be one of {sorted(TRANSFERS)}, got {transfer!r}")
            if not path:
                raise TransferError("train_stage finetune needs pretrained_path: the checkpoint (.pth) of a PMMRec "
                                    "train_stage=pretrain run (its checkpoint_file)")
            checkpoint = read_checkpoint(path, transfer, config, type(self).__name__)  # before any extraction
        super().__init__(config, dataset)

        # load parameters info
        self.nicl_alpha = float(cfg_get(config, "nicl_alpha", 0.4))
        self.nicl_temperature = float(cfg_get(config, "nicl_temperature", 0.1))
        self.nicl_symmetric = bool(cfg_get(config, "nicl_symmetric", False))
        self.nid_weight = float(cfg_get(config, "nid_weight", 0.1))
        self.nid_rate = float(cfg_get(config, "nid_rate", 0.15))
        self.nid_replace_share = float(cfg_get(config, "nid_replace_share", 0.5))
        self.rcl_weight = float(cfg_get(config, "rcl_weight", 0.1))
        self.rcl_temperature = float(cfg_get(config, "rcl_temperature", 0.1))
        if not 0.0 <= self.nicl_alpha < 1.0:
            raise ValueError(f"nicl_alpha must be in [0, 1), got {self.nicl_alpha}")
        if self.train_stage == "pretrain" and self.nicl_alpha > 0 and self.modality != "text+image":
            raise ValueError(f"NICL contrasts each item's text with its image: train_stage pretrain with nicl_alpha "
                             f"{self.nicl_alpha} needs modality text+image, got {self.modality!r} (or set nicl_alpha: 0)")

        # define layers: the pre-training heads exist only in that stage (they are never transferred)
        if self.train_stage == "pretrain":
            self.nicl_head = NICLProjector(self.embedding_size)
            self.nid_head = nn.Linear(self.embedding_size, 1)
        self.transferred_keys: list = []
        if checkpoint is not None:
            self.load_pretrained(path, transfer, checkpoint=checkpoint)
            if int(cfg_get(config, "epochs", 1)) == 0 and transfer != "full":
                logger.warning(f"epochs: 0 evaluates the model as transferred, but transfer {transfer!r} leaves the "
                               f"{'user' if transfer == 'item_encoder' else 'item'} encoder untrained: zero-shot "
                               "needs transfer full")

    # ------------------------------------------------------------- transfer
    def load_pretrained(self, path: str, transfer: str, config=None, checkpoint=None) -> list:
        """Load the ``transfer`` part of the checkpoint at ``path`` (module docstring); returns the loaded keys."""
        if checkpoint is None:
            checkpoint = read_checkpoint(path, transfer, config, type(self).__name__)
        state = checkpoint["state_dict"]
        prefixes = TRANSFERS[transfer]
        own = self.state_dict()
        wanted = [k for k in own if k.startswith(prefixes)]
        missing = [k for k in wanted if k not in state]
        mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in wanted
                      if k in state and state[k].shape != own[k].shape]
        if missing or mismatched:
            detail = (f"missing {missing[:3]}" if missing else "") + (" " if missing and mismatched else "") + (
                f"shape (checkpoint vs model) {mismatched[:3]}" if mismatched else "")
            raise TransferError(f"pretrained_path {path} does not fit this model for transfer {transfer!r}: {detail} "
                                "(another width, user encoder, fusion or item-list length?)")
        own.update({k: state[k] for k in wanted})
        self.load_state_dict(own)
        self.transferred_keys = wanted
        fresh = [k for k in own if k not in set(wanted)]
        logger.info(f"{type(self).__name__}: transfer {transfer!r} loaded {len(wanted)} tensors "
                    f"({', '.join(p + '*' for p in prefixes)}) from {path}; {len(fresh)} start anew"
                    + (f" ({', '.join(sorted({k.split('.')[0] + '.*' for k in fresh}))})" if fresh else ""))
        return wanted

    # ----------------------------------------------------------------- loss
    def calculate_loss(self, interaction):
        """Scratch / finetune: the next-item loss. Pretrain: the weighted terms ``(next-item, NICL, NID, RCL)`` as a
        tuple (RecBole's trainer sums them and logs each as ``train_loss1..4``; a switched-off term is 0)."""
        if self.train_stage != "pretrain":
            return super().calculate_loss(interaction)
        if self.loss_name == "ce":
            raise ValueError("PMMRec pre-training uses the inbatch or bce next-item loss, not ce")
        seq, lengths = interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]
        noisy = self.nid_weight > 0 or self.rcl_weight > 0
        noised, labels = (pretrain_losses.corrupt_sequences(seq, lengths, self.n_items, self.nid_rate,
                                                            self.nid_replace_share) if noisy else (None, None))
        b = self.loss_inputs(interaction, extra_ids=noised, with_modalities=self.nicl_alpha > 0)
        zero = torch.zeros((), device=seq.device)
        nicl = nid = rcl = zero
        if self.nicl_alpha > 0:
            text, image = (self._project(v, b["uniq"]) for v in b["modalities"])
            window = b["inverse"][:, : b["full"].shape[1]]
            nicl = self.nicl_alpha * pretrain_losses.nicl_loss(
                text[window], image[window], b["full"], self.nicl_temperature, self.nicl_symmetric, b["users"])
        next_item = (1.0 - self.nicl_alpha) * self.recommendation_loss(b)
        if noisy:
            noised_states = self.user_states(noised, lengths, b["uniq_vecs"][b["extra_inverse"]])
            if self.nid_weight > 0:
                valid = torch.arange(seq.shape[1], device=seq.device)[None, :] < lengths[:, None]
                logits = self.nid_head(noised_states).squeeze(-1)
                nid = self.nid_weight * pretrain_losses.nid_loss(logits, labels, valid)
            if self.rcl_weight > 0:
                clean = self.gather_indexes(b["states"], lengths - 1)
                noisy_user = self.gather_indexes(noised_states, lengths - 1)
                rcl = self.rcl_weight * pretrain_losses.rcl_loss(clean, noisy_user, self.rcl_temperature, b["users"])
        return next_item, nicl, nid, rcl

    def _project(self, vecs: torch.Tensor, uniq: torch.Tensor) -> torch.Tensor:
        """NICL's projector over the real items (the padding row stays zero and out of BatchNorm's statistics)."""
        out = torch.zeros_like(vecs)
        real = uniq > 0
        out[real] = self.nicl_head(vecs[real])
        return out
