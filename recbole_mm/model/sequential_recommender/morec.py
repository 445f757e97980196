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

from recbole_mm.encoders import ImageEncoder, TextEncoder, apply_finetune
from recbole_mm.layers.fusion import build_fusion
from recbole_mm.layers.sequence import build_sequence_encoder
from recbole_mm.layers.towers import FeatureTower, FusedItemTower, IDTower, ImageTower, TextTower
from recbole_mm.model.abstract import MMSequentialRecommender
from recbole_mm.registry import register_model
from recbole_mm.utils import cfg_get

MODALITIES = {"text": ["text"], "image": ["image"], "text+image": ["text", "image"]}
MODES = ("two_stage", "end2end")


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
        - Two modalities (``text+image``) are fused by ``sum`` or ``concat`` (the paper studies one modality at
          a time).
        - Images: square resize to ``image_size`` and the encoder's own normalisation (the original uses mean /
          std 0.5, which is also EfficientNet-Lite0's).
    """

    def __init__(self, config, dataset):
        super().__init__(config, dataset)

        # load parameters info
        self.modality = cfg_get(config, "modality", "text")
        self.mode = cfg_get(config, "mode", "two_stage")
        self.embedding_size = int(config["embedding_size"])
        self.fusion_kind = cfg_get(config, "fusion", "sum")
        if self.modality not in MODALITIES:
            raise ValueError(f"MoRec modality must be one of {sorted(MODALITIES)}, got {self.modality!r}")
        if self.mode not in MODES:
            raise ValueError(f"MoRec mode must be one of {MODES}, got {self.mode!r}")
        self.expensive_item_tower = self.mode == "end2end"

        # define layers
        modalities = MODALITIES[self.modality]
        towers = {m: self._build_tower(m, config, dataset) for m in modalities}
        item_tower = FusedItemTower(towers, build_fusion(self.fusion_kind, self.embedding_size, len(towers)))
        if cfg_get(config, "id_tower", False):  # content + a zero-initialised ID vector (summed)
            item_tower = FusedItemTower({"content": item_tower, "id": IDTower(self.n_items, self.embedding_size)},
                                        build_fusion("sum", self.embedding_size, 2))
        self.item_tower = item_tower
        self.seq_encoder = build_sequence_encoder(config, self.embedding_size)

    def _build_tower(self, modality, config, dataset):
        d = self.embedding_size
        if self.mode == "two_stage":
            return FeatureTower(self.frozen_features(config, dataset, modality), d, cfg_get(config, "dnn_layers", 0),
                                cfg_get(config, "dropout_prob", 0.1))
        finetune = dict(
            policy=cfg_get(config, "finetune", "full"),
            top_k=cfg_get(config, "finetune_top_k", 1),
            lora_r=cfg_get(config, "lora_r", 8),
            lora_alpha=cfg_get(config, "lora_alpha", 16),
            lora_dropout=cfg_get(config, "lora_dropout", 0.1),
            lora_target_modules=cfg_get(config, "lora_target_modules"),
        )
        if modality == "text":
            encoder = TextEncoder(cfg_get(config, "text_encoder", "all-MiniLM-L6-v2"), pooling=cfg_get(config, "text_pooling", "cls"))
            apply_finetune(encoder, **finetune)
            ids, mask = self.content.tokenize(
                encoder.tokenizer, int(cfg_get(config, "text_max_length", 30)), cfg_get(config, "text_fields"),
                lowercase=bool(cfg_get(config, "text_lowercase", False)),
            )
            return TextTower(encoder, ids, mask, d)
        encoder = ImageEncoder(
            cfg_get(config, "image_encoder", "tf_efficientnet_lite0"),
            image_size=int(cfg_get(config, "image_size", 224)),
            pretrained=bool(cfg_get(config, "image_pretrained", True)),
            weights=cfg_get(config, "image_weights"),
            pooling=cfg_get(config, "image_pooling", "default"),
            mean=cfg_get(config, "image_mean"),
            std=cfg_get(config, "image_std"),
        )
        apply_finetune(encoder, **finetune)
        return ImageTower(encoder, self.content, d)

    def forward(self, item_seq, item_seq_len):
        # [B, L] ids -> [B, D]: the user state after the last item (RecBole's SASRec contract)
        states = self.user_states(item_seq, item_seq_len, self.encode_items(item_seq))
        return self.gather_indexes(states, item_seq_len - 1)

    # calculate_loss / predict / full_sort_predict: MMSequentialRecommender (shared by every multimodal model)
