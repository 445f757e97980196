# -*- coding: utf-8 -*-
r"""
MMSR
################################################

Reference:
    Youhua Li, Hanwen Du, Yongxin Ni, et al. (Li, Du, Ni, He, Fu, Liu, Guo). "An Empirical Study of Training
    ID-Agnostic Multi-modal Sequential Recommenders." arXiv 2403.17372.

Reference:
    https://github.com/MMSR23/MMSR (code)
"""

from __future__ import annotations

from recbole_mm.layers.fusion import build_fusion, is_token_fusion
from recbole_mm.layers.sequence import build_sequence_encoder
from recbole_mm.layers.towers import FusedItemTower
from recbole_mm.model.abstract import MMSequentialRecommender
from recbole_mm.registry import register_model
from recbole_mm.utils import cfg_get


@register_model
class MMSR(MMSequentialRecommender):
    r"""An ID-free multimodal sequential recommender: text and image token towers, a fusion from the MMSR catalogue
    (``fusion``: sum, concat, film, gated, their ``*_dnn`` variants, ``co_att``, ``merge_attn``) and a user encoder
    (``seq_encoder``: ``paper`` = the papers' SASRec block, ``gru4rec``, ``nextitnet``).

    Each modality's tokens are projected to D by a Linear layer (text: the encoder's last hidden states with their
    padding mask; image: ViT CLS + patches, or a CNN's last feature map flattened). Token-level fusions read the
    tokens; the others read each modality's mean over its real tokens. ``mode: two_stage`` reads frozen features
    extracted once and cached (tokens as float16 ``[n, T, d]`` memory maps, ``recbole-mm extract --kind tokens``);
    ``mode: end2end`` trains the encoders under ``finetune`` (the paper: the top two blocks, ``finetune: top_k``,
    ``finetune_top_k: 2``). Loss: ``bce`` (the paper: one uniform negative per position) or ``inbatch``.

    NOTE:
        Deviations from the original code (also in docs/models.md and properties/model/MMSR.yaml):

        - Pooled fusions in ``two_stage`` mode read mean-pooled features through the Linear projection instead of
          projecting every token and then averaging: the same vectors (a Linear map of a mean is the mean of the
          Linear maps), without storing tokens.
        - The original freezes the parameters with index > 164 (the top blocks), the opposite of its comment
          ("only two top transformer blocks"); ``finetune: top_k`` trains the top blocks, as the comment and
          PMMRec say.
        - ResNet grid tokens: the original's 3x3 Conv2d "grid encoder" over an unreleased truncated backbone is not
          reproduced; CNN tokens are the last feature map flattened, projected by the Linear layer.
        - History masking at test time covers the whole training history plus the valid item (the original masks
          only the valid window).
        - Encoders are any HF / timm model by name (the original's local encoder folders and OpenAI ``clip``
          package are not needed).
    """

    def __init__(self, config, dataset):
        super().__init__(config, dataset)

        # load parameters info
        modalities = self.read_content_keys(config, "text+image", "merge_attn")
        fusion = build_fusion(
            self.fusion_kind, self.embedding_size, len(modalities),
            n_heads=int(cfg_get(config, "fusion_heads", 2)),
            n_layers=int(cfg_get(config, "fusion_layers", 1)),
            dropout=float(cfg_get(config, "dropout_prob", 0.1)),
            dnn_layers=int(cfg_get(config, "fusion_dnn_layers", 3)),
        )
        # token towers where tokens are read: token-level fusions over two modalities, and end-to-end encoders
        # (whose token states are projected then pooled, as the original); otherwise pooled features + Linear
        self.token_towers = (is_token_fusion(self.fusion_kind) and len(modalities) > 1) or self.mode == "end2end"
        # every item through a token-level fusion at every step (loss ce) costs too much: refused like end2end
        self.expensive_item_tower = self.expensive_item_tower or self.token_towers
        if self.loss_name == "ce" and self.token_towers and self.mode == "two_stage":
            raise ValueError(f"loss 'ce' scores every item at every step, too costly through the token-level fusion "
                             f"{self.fusion_kind!r}: use loss inbatch or bce, or a pooled fusion (sum, concat, film, "
                             "gated, *_dnn)")

        # define layers
        towers = {m: self.build_content_tower(config, dataset, m, self.mode, self.embedding_size,
                                              tokens=self.token_towers, activation=False) for m in modalities}
        self.item_tower = FusedItemTower(towers, fusion)
        self.seq_encoder = build_sequence_encoder(config, self.embedding_size)

    # forward / calculate_loss / predict / full_sort_predict: MMSequentialRecommender
