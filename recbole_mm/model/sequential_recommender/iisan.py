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
from recbole_mm.layers.towers import FrozenImageTaps, FrozenTextTaps, TapTower
from recbole_mm.model.abstract import MMSequentialRecommender
from recbole_mm.registry import register_model
from recbole_mm.utils import cfg_get, preserved_rng

MODES = ("cached", "uncached")


@register_model
class IISAN(MMSequentialRecommender):
    r"""Decoupled side networks on the cached per-layer hidden states ("taps") of frozen text and image encoders.

    Every item's taps are extracted once (``[n_items, n_taps, d]`` float16 memory maps, ``recbole-mm extract
    --kind taps``; text taps pooled by ``tap_pooling``, image taps by ``image_pooling``); training and evaluation
    read them and run only the side network (intra-modal SANs for text and image, an inter-modal SAN, their heads
    and ``com_dense``; :mod:`recbole_mm.layers.side_network`) and the papers' SASRec user encoder, with the
    in-batch loss. ``text_taps`` / ``image_taps`` choose the cached hidden states (``~``: all of them); with
    ``layerdrop: True`` LayerDrop then keeps every other cached tap counting back from the last (``layerdrop: False``
    reads an explicit list as it is).

    ``mode: uncached`` (the original's ``Code_Uncached``, for the efficiency comparison) runs the frozen encoders
    on every batch's items instead (no gradients, eval mode); the same weights give the same item vectors as a
    cache of the same dtype.

    NOTE:
        - CNN image encoders (EfficientNet, ...; not in the original): the taps are the stem output and every
          stage's output, spatially mean-pooled; stages of different widths are zero-padded to the widest in the
          cache and mapped to it by one Linear per tap (:class:`~recbole_mm.layers.side_network.StageAlign`).
        - ``mode: uncached`` checkpoints hold the frozen encoders' weights too (they are part of the module).
        - Side-network deviations: :mod:`recbole_mm.layers.side_network`.
    """

    def __init__(self, config, dataset):
        super().__init__(config, dataset)

        # load parameters info
        self.embedding_size = int(config["embedding_size"])
        self.mode = cfg_get(config, "mode", "cached")
        if self.mode not in MODES:
            raise ValueError(f"{type(self).__name__} mode must be one of {MODES}, got {self.mode!r}")
        # cached taps: the whole catalogue is a cheap pass; uncached: the backbones run on every item
        self.expensive_item_tower = self.mode == "uncached"
        if self.expensive_item_tower and self.loss_name == "ce":
            raise ValueError(f"{type(self).__name__}: loss 'ce' scores every item at every step, too costly with mode "
                             "uncached: use loss inbatch or bce, or mode cached")

        # define layers
        text, text_widths, text_shape = self.tap_source(config, dataset, "text")
        image, image_widths, image_shape = self.tap_source(config, dataset, "image")
        text_index, image_index = self.tap_indices(config, text_shape[0], image_shape[0])
        side = IISANSideNetwork(
            text_shape[1], text_shape[0], image_shape[1], image_shape[0], self.embedding_size,
            bottleneck=int(cfg_get(config, "san_bottleneck", 64)),
            activation=cfg_get(config, "san_activation", "relu"),
            fusion=cfg_get(config, "san_fusion", "gated"),
            gate_temperature=float(cfg_get(config, "gate_temperature", 0.1)),
            modality=cfg_get(config, "san_modality", "intra_inter"),
            schedule=cfg_get(config, "tap_schedule", "surplus"),
            text_index=text_index, image_index=image_index,
            text_tap_widths=text_widths, image_tap_widths=image_widths,
        )
        self.item_tower = TapTower(text, image, side)
        self.seq_encoder = build_sequence_encoder(config, self.embedding_size)

    def tap_source(self, config, dataset, modality: str):
        """``(lookup, tap_widths, (n_taps, d))`` of one modality: the tap cache (``mode: cached``, extracted on first
        use) or the frozen encoder itself (``uncached``). ``tap_widths``: each tap's true width (None: all ``d``)."""
        taps = cfg_get(config, f"{modality}_taps")
        if self.mode == "cached":
            lookup = self.frozen_features(config, dataset, modality, kind="taps", taps=taps)
            widths = lookup.sidecar.get("settings", {}).get("tap_widths")
            return lookup, widths, tuple(lookup.shape[1:])
        from recbole_mm.extract import build_encoder, spec_from_config

        spec = spec_from_config(config, modality, kind="taps", taps=taps)
        if modality == "image":
            self.require_images()
        with preserved_rng():  # as a cached run: building the encoder must not change the side network's init
            encoder = build_encoder(spec)
        encoder.requires_grad_(False)
        encoder.eval()
        if modality == "text":
            ids, mask = self.content.tokenize(encoder.tokenizer, spec.max_length, spec.text_fields,
                                              lowercase=spec.lowercase)
            return (FrozenTextTaps(encoder, ids, mask, full_width=spec.tap_pooling == "mean"), None,
                    (len(encoder.taps), encoder.hidden_size))
        return FrozenImageTaps(encoder, self.content), encoder.tap_widths, (len(encoder.taps), encoder.tap_width)

    def tap_indices(self, config, n_text: int, n_image: int):
        """Which cached taps the side network reads: all, or LayerDrop's (``layerdrop: True``: every other cached
        tap counting back from the last). IISAN pairs the taps one to one: unequal counts need IISANVersa."""
        if n_text != n_image:
            raise ValueError(f"IISAN pairs text and image taps one to one, but the text cache holds {n_text} taps and "
                             f"the image cache {n_image}: use model IISANVersa (any depths), or give text_taps / "
                             "image_taps lists of the same length")
        if cfg_get(config, "layerdrop", True):
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
