# -*- coding: utf-8 -*-
r"""
IISAN
################################################

Reference:
    Junchen Fu, Xuri Ge, Xin Xin, Alexandros Karatzoglou, Ioannis Arapakis, Jie Wang, Joemon M. Jose. "IISAN:
    Efficiently Adapting Multimodal Representation for Sequential Recommendation with Decoupled PEFT." SIGIR 2024.

Reference:
    https://github.com/GAIR-Lab/IISAN (code: ``Code_Cached``, ``Code_Uncached``; IISAN-Versa: ``Code_Cached_Asym``)
"""

from __future__ import annotations

from recbole_mm.layers.sequence import build_sequence_encoder
from recbole_mm.layers.side_network import IISANSideNetwork, layerdrop_taps
from recbole_mm.layers.towers import TapTower
from recbole_mm.model.abstract import MMSequentialRecommender
from recbole_mm.registry import register_model
from recbole_mm.utils import cfg_get

MODES = ("cached",)


@register_model
class IISAN(MMSequentialRecommender):
    r"""Decoupled side networks on the cached per-layer hidden states ("taps") of frozen text and image encoders.

    Every item's taps are extracted once (``[n_items, n_taps, d]`` float16 memory maps, ``recbole-mm extract
    --kind taps``; text taps pooled by ``tap_pooling``, image taps by ``image_pooling``); training and evaluation
    read them and run only the side network (intra-modal SANs for text and image, an inter-modal SAN, their heads
    and ``com_dense``; :mod:`recbole_mm.layers.side_network`) and the papers' SASRec user encoder, with the
    in-batch loss. ``text_taps`` / ``image_taps`` choose the cached hidden states (``~``: all of them, then
    LayerDrop keeps every other one counting back from the last when ``layerdrop: True``).

    NOTE:
        - Only ``mode: cached`` is built so far (issue 9): ``uncached`` (the backbones running frozen in every
          step, for the efficiency comparison) is not.
        - CNN image encoders (EfficientNet stages of different widths) cannot be tapped into one ``[n, n_taps, d]``
          cache yet: use a transformer image encoder (ViT, CLIP vision, ...).
        - Side-network deviations: :mod:`recbole_mm.layers.side_network`.
    """

    def __init__(self, config, dataset):
        super().__init__(config, dataset)

        # load parameters info
        self.embedding_size = int(config["embedding_size"])
        self.mode = cfg_get(config, "mode", "cached")
        if self.mode not in MODES:
            raise ValueError(f"{type(self).__name__} mode must be one of {MODES} (uncached is not built yet), "
                             f"got {self.mode!r}")
        self.expensive_item_tower = False  # cached taps: the whole catalogue is a cheap pass

        # define layers
        text = self.frozen_features(config, dataset, "text", kind="taps", taps=cfg_get(config, "text_taps"))
        image = self.frozen_features(config, dataset, "image", kind="taps", taps=cfg_get(config, "image_taps"))
        text_index, image_index = self.tap_indices(config, text.shape[1], image.shape[1])
        side = IISANSideNetwork(
            text.shape[-1], text.shape[1], image.shape[-1], image.shape[1], self.embedding_size,
            bottleneck=int(cfg_get(config, "san_bottleneck", 64)),
            activation=cfg_get(config, "san_activation", "relu"),
            fusion=cfg_get(config, "san_fusion", "gated"),
            gate_temperature=float(cfg_get(config, "gate_temperature", 0.1)),
            modality=cfg_get(config, "san_modality", "intra_inter"),
            schedule=cfg_get(config, "tap_schedule", "surplus"),
            text_index=text_index, image_index=image_index,
        )
        self.item_tower = TapTower(text, image, side)
        self.seq_encoder = build_sequence_encoder(config, self.embedding_size)

    def tap_indices(self, config, n_text: int, n_image: int):
        """Which cached taps the side network reads: all, or LayerDrop's (``layerdrop: True``) when both caches hold
        every hidden state of encoders of the same depth. Unequal depths need IISANVersa."""
        if n_text != n_image:
            raise ValueError(f"IISAN pairs text and image taps one to one, but the text cache holds {n_text} taps and "
                             f"the image cache {n_image}: use model IISANVersa (any depths), or give text_taps / "
                             "image_taps lists of the same length")
        explicit = cfg_get(config, "text_taps") is not None or cfg_get(config, "image_taps") is not None
        if cfg_get(config, "layerdrop", True) and not explicit:
            keep = layerdrop_taps(n_text)
            return keep, keep
        return None, None


@register_model
class IISANVersa(IISAN):
    r"""IISAN for any pair of encoders (IISAN-Versa): text and image encoders of different depths and widths.

    Unequal tap counts are paired by ``tap_schedule``: ``surplus`` (the deeper side's surplus taps run first
    through its intra SAN alone, then both in lock-step) or ``group`` (group layer-dropping: one tap per group so
    both sides give the same number); the wider side's taps are mapped to the narrower width (one Linear per tap)
    before the inter SAN.

    NOTE:
        The released code is a draft folder (``Code_Cached_Asym``); the group layer-drop rule is inferred from its
        tap lists (:func:`recbole_mm.layers.side_network.group_layer_drop`).
    """

    def tap_indices(self, config, n_text: int, n_image: int):
        return None, None  # every cached tap; the schedule pairs unequal counts
