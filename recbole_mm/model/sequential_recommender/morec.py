# -*- coding: utf-8 -*-
r"""
MoRec
################################################

Reference:
    Zheng Yuan, Fajie Yuan, Yu Song, Youhua Li, Junchen Fu, Fei Yang, Yunzhu Pan, Yongxin Ni. "Where to Go Next
    for Recommender Systems? ID- vs. Modality-based Recommender Models Revisited." SIGIR 2023.

Reference:
    https://github.com/westlake-repl/IDvs.MoRec (code)
"""

from __future__ import annotations

from recbole_mm.layers.fusion import build_fusion, is_token_fusion
from recbole_mm.layers.sequence import build_sequence_encoder
from recbole_mm.layers.towers import FusedItemTower, IDTower
from recbole_mm.model.abstract import MMSequentialRecommender
from recbole_mm.registry import register_model
from recbole_mm.utils import cfg_get


@register_model
class MoRec(MMSequentialRecommender):
    r"""SASRec whose item-ID embedding is replaced by a pretrained modality encoder (text, image or both).

    ``mode: end2end`` fine-tunes the encoder(s) under ``finetune`` (full / top_k / lora / bitfit / frozen), each
    item vector being ``GELU(Linear(encoder(item)))``. ``mode: two_stage`` reads frozen features extracted once
    (automatically on first use, cached in the dataset folder) through ``Linear + GELU`` and ``dnn_layers``
    blocks of ``Dropout -> Linear -> GELU``. The user encoder is the seed papers' SASRec block (``seq_encoder:
    paper``) or RecBole's (``recbole``). Losses: ``bce`` (the paper), ``inbatch`` (the README's debiased
    in-batch softmax), ``ce`` (two-stage only).

    NOTE:
        Deviations from the original code (also in docs/models.md and properties/model/MoRec.yaml):

        - Sequences are RecBole's right-padded lists; the paper block aligns positions to the most recent item, so
          it sees the same positions as the originals' left-padded windows.
        - Training examples: windows of ``L + 1`` items counted from each user's end, one loss per position
          (the originals keep only each user's last ``L + 3`` interactions and train one window per user; set
          ``keep_last_n: L + 3`` for exactly that).
        - Freezing is by module position (``finetune: top_k``) instead of by parameter index
          (``freeze_paras_before``); the unused BERT pooler is always frozen.
        - The in-batch loss has one column per unique batch item weighted by its number of batch slots; this is
          the same softmax as the original's one column per slot (checked against a per-slot reference). Items
          of the same user's other windows in the batch are masked too (the original has one window per user).
        - BCE negatives avoid the user's whole training sequence (the original: the user's truncated sequence,
          which is the same with ``keep_last_n: L + 3``).
        - Under ``top_k`` / ``lora``, fully frozen encoder blocks run in eval mode (no dropout, no BatchNorm
          statistics updates); the original keeps the whole encoder in train mode.
        - LoRA adapters learn with ``learning_rate`` (new weights, like the heads), not ``encoder_learning_rate``.
        - Two modalities (``text+image``) are fused by ``add`` (plain sum, the default) or a pooled fusion of the
          MMSR catalogue (``sum``, ``concat``, ``film``, ``gated``, ``*_dnn``); the paper studies one modality at
          a time.
        - Images: square resize to ``image_size`` and the encoder's own normalisation (the original uses mean /
          std 0.5, which is also EfficientNet-Lite0's).
    """

    def __init__(self, config, dataset):
        super().__init__(config, dataset)

        # load parameters info
        modalities = self.read_content_keys(config, "text", "add")

        # define layers
        if is_token_fusion(self.fusion_kind):
            raise ValueError(f"fusion {self.fusion_kind!r} is token-level, but MoRec's item towers give one vector per "
                             "item: use fusion add | sum | concat | film | gated (or their *_dnn variants) with MoRec, or "
                             "model MMSR / PMMRec for co_att and merge_attn")
        towers = {m: self.build_content_tower(config, dataset, m, self.mode, self.embedding_size,
                                              head_layers=cfg_get(config, "dnn_layers", 0)) for m in modalities}
        fusion = build_fusion(self.fusion_kind, self.embedding_size, len(towers),
                              dropout=float(cfg_get(config, "dropout_prob", 0.1)),
                              dnn_layers=int(cfg_get(config, "fusion_dnn_layers", 3)))
        item_tower = FusedItemTower(towers, fusion)
        if cfg_get(config, "id_tower", False):  # content + a zero-initialised ID vector (summed)
            item_tower = FusedItemTower({"content": item_tower, "id": IDTower(self.n_items, self.embedding_size)},
                                        build_fusion("add", self.embedding_size, 2))
        self.item_tower = item_tower
        self.seq_encoder = build_sequence_encoder(config, self.embedding_size)

    # forward / calculate_loss / predict / full_sort_predict: MMSequentialRecommender (shared by every multimodal model)
