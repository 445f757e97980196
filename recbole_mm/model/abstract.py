"""``MMSequentialRecommender``: the base of the multimodal sequential models (MoRec, PMMRec, IISAN, ODMT).

A subclass builds ``self.item_tower`` (item ids -> ``[n, D]``) and ``self.seq_encoder`` (item vectors and
lengths -> states ``[B, L, D]``) in its ``__init__``; the base class does the rest:

- each unique item of a batch goes through the item tower once (:meth:`encode_items`);
- evaluation: the whole item matrix is computed once per evaluation pass (no grad, chunks of
  ``item_matrix_batch_size``, progress bar when ``show_progress``), reused by every ``full_sort_predict`` /
  ``predict`` batch of the pass, and dropped when training resumes (``train()``), when weights are loaded
  (``load_state_dict``) and when the next evaluation pass starts (:class:`~recbole_mm.trainer.MMTrainer`).
  ``items_encoded_eval`` counts the item tower's rows in eval mode: one evaluation pass adds ``n_items``;
- sequence modes (``seq_mode``): ``all_position`` (the seed papers: one example per window of ``L + 1`` items,
  a loss at every position; see :class:`~recbole_mm.data.dataset.MMSequentialDataset`) or ``prefix``
  (RecBole's augmentation: a loss at the last position of each prefix);
- losses (``loss``): ``inbatch`` (softmax over the batch's items, logQ-corrected with training-split counts,
  same-user items masked), ``bce`` (one uniform negative per position, outside the user's training
  sequence), ``ce``
  (softmax over all items: only when the item tower is cheap, i.e. cached features);
- parameter groups (:meth:`optimizer_groups`): encoder parameters get ``encoder_learning_rate`` /
  ``encoder_weight_decay``, the rest ``learning_rate`` / ``weight_decay``.
"""

from __future__ import annotations

import contextlib

import torch
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.utils import InputType

from recbole_mm.data.dataset import MMSequentialDataset, seq_mode_of, train_item_counts, training_user_item_keys
from recbole_mm.model import losses
from recbole_mm.model.content import (ContentMixin, FeatureMismatchError, is_restoring_checkpoint,  # noqa: F401
                                      restoring_checkpoint)  # (re-exported)
from recbole_mm.trainer import MMTrainer
from recbole_mm.utils import cfg_get

SEQ_MODES = ("all_position", "prefix")
MODALITIES = {"text": ["text"], "image": ["image"], "text+image": ["text", "image"]}
CONTENT_MODES = ("two_stage", "end2end")
SIMILARITIES = ("dot", "cosine")
LOSSES = ("inbatch", "bce", "ce")




class MMSequentialRecommender(ContentMixin, SequentialRecommender):
    """Base class (module docstring). Subclasses set ``item_tower`` and ``seq_encoder``."""

    input_type = InputType.POINTWISE
    dataset_class = MMSequentialDataset
    trainer_class = MMTrainer
    supports_all_position = True
    expensive_item_tower = True  # False: item vectors are cheap (cached features) and "ce" is allowed

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.init_content(config, dataset)
        self.seq_mode = seq_mode_of(config)
        self.loss_name = cfg_get(config, "loss", "inbatch")
        if self.seq_mode not in SEQ_MODES:
            raise ValueError(f"seq_mode must be one of {SEQ_MODES}, got {self.seq_mode!r}")
        applied = getattr(dataset, "seq_mode", self.seq_mode)
        if applied != self.seq_mode:
            raise ValueError(f"the training data was built for seq_mode {applied!r}, the model asks for {self.seq_mode!r}")
        if self.loss_name not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss_name!r}")
        self.logq_correction = bool(cfg_get(config, "logq_correction", True))
        self.similarity = cfg_get(config, "similarity", "dot")
        self.temperature = float(cfg_get(config, "temperature", 0.1))
        if self.similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {SIMILARITIES}, got {self.similarity!r}")
        if self.similarity == "cosine" and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        self.item_matrix_batch_size = int(cfg_get(config, "item_matrix_batch_size", 256))
        self.decode_workers = int(cfg_get(config, "worker", 0) or 0)  # RecBole's DataLoader workers: images decoded there
        # AMP only helps (and is only enabled) on CUDA; the trainer's autocast covers training
        self.amp = bool(cfg_get(config, "enable_amp", False)) and torch.device(config["device"]).type == "cuda"
        counts = torch.as_tensor(train_item_counts(dataset), dtype=torch.float64).clamp(min=1.0)
        self.register_buffer("log_pop", (counts / counts.sum()).log().float(), persistent=False)
        keys = getattr(dataset, "train_user_item_keys", None)
        keys = keys if keys is not None else training_user_item_keys(dataset)
        self.register_buffer("train_keys", torch.as_tensor(keys, dtype=torch.int64), persistent=False)
        # weights loaded from a checkpoint (directly or through a wrapper such as DDP) make the cache stale
        self._register_load_state_dict_pre_hook(lambda *args, **kwargs: self.invalidate_item_matrix())
        self.items_encoded_train = 0
        self.items_encoded_eval = 0
        self._item_matrix = None

    # ------------------------------------------------------------------ items
    def read_content_keys(self, config, default_modality: str, default_fusion: str) -> list:
        """Read and check the content keys shared by the content models (``modality``, ``mode``, ``fusion``,
        ``embedding_size``); returns the modalities in order (text first)."""
        name = type(self).__name__
        self.modality = cfg_get(config, "modality", default_modality)
        self.mode = cfg_get(config, "mode", "two_stage")
        self.embedding_size = int(config["embedding_size"])
        self.fusion_kind = cfg_get(config, "fusion", default_fusion)
        if self.modality not in MODALITIES:
            raise ValueError(f"{name} modality must be one of {sorted(MODALITIES)}, got {self.modality!r}")
        if self.mode not in CONTENT_MODES:
            raise ValueError(f"{name} mode must be one of {CONTENT_MODES}, got {self.mode!r}")
        self.expensive_item_tower = self.mode == "end2end"
        if self.expensive_item_tower and self.loss_name == "ce":  # refused before any encoder is loaded
            raise ValueError(f"{name}: loss 'ce' scores every item at every step, too costly with mode end2end: use "
                             "loss inbatch or bce, or mode two_stage (cached features)")
        return MODALITIES[self.modality]

    def build_content_tower(self, config, dataset, modality: str, mode: str, d: int, tokens: bool = False,
                            head_layers: int = 0, activation: bool = True):
        """The item tower of one modality (``recbole_mm.layers.towers``), from the run's encoder keys.

        ``mode``: ``two_stage`` (frozen features, extracted on first use) or ``end2end`` (the encoder trains under
        ``finetune``). ``tokens``: token-level output ``(tokens [n, T, D], mask)`` instead of ``[n, D]``.
        ``head_layers``: pooled two-stage towers' extra ``Dropout -> Linear -> GELU`` blocks (``dnn_layers``);
        ``activation=False``: pooled two-stage towers end in a plain Linear (MMSR's projection)."""
        from recbole_mm.encoders import ImageEncoder, TextEncoder, apply_finetune
        from recbole_mm.layers.towers import FeatureTower, ImageTower, TextTower, TokenFeatureTower

        text_keys = dict(max_length=int(cfg_get(config, "text_max_length", 32)), fields=cfg_get(config, "text_fields"),
                         lowercase=bool(cfg_get(config, "text_lowercase", False)))
        if mode == "two_stage":
            if not tokens:
                return FeatureTower(self.frozen_features(config, dataset, modality, as_stored=True), d, head_layers,
                                    cfg_get(config, "dropout_prob", 0.1), activation=activation)
            lookup = self.frozen_features(config, dataset, modality, kind="tokens")
            if modality == "text":
                from recbole_mm.encoders.text import load_tokenizer

                tokenizer = load_tokenizer(cfg_get(config, "text_encoder", "all-MiniLM-L6-v2"))
                _, mask = self.content.tokenize(tokenizer, text_keys["max_length"], text_keys["fields"],
                                                lowercase=text_keys["lowercase"])
                mask[0, 0] = 1  # padding row: one (zero) token, so that pooling it is defined
            else:
                mask = torch.ones(lookup.shape[:2], dtype=torch.bool)
            if tuple(mask.shape) != tuple(lookup.shape[:2]):
                raise ValueError(f"{modality} token features have {lookup.shape[1]} tokens per item but the "
                                 f"tokenizer gives {mask.shape[1]}: re-extract with the run's text_max_length")
            return TokenFeatureTower(lookup, mask, lookup.shape[-1], d)
        finetune = dict(
            policy=cfg_get(config, "finetune", "full"),
            top_k=cfg_get(config, "finetune_top_k", 1),
            lora_r=cfg_get(config, "lora_r", 8),
            lora_alpha=cfg_get(config, "lora_alpha", 16),
            lora_dropout=cfg_get(config, "lora_dropout", 0.1),
            lora_target_modules=cfg_get(config, "lora_target_modules"),
        )
        output = "tokens" if tokens else "pooled"
        if modality == "text":
            encoder = TextEncoder(cfg_get(config, "text_encoder", "all-MiniLM-L6-v2"),
                                  pooling=cfg_get(config, "text_pooling", "cls"), output=output)
            apply_finetune(encoder, **finetune)
            ids, mask = self.content.tokenize(encoder.tokenizer, text_keys["max_length"], text_keys["fields"],
                                              lowercase=text_keys["lowercase"])
            return TextTower(encoder, ids, mask, d, tokens=tokens)
        self.require_images()
        encoder = ImageEncoder(
            cfg_get(config, "image_encoder", "tf_efficientnet_lite0"),
            image_size=int(cfg_get(config, "image_size", 224)),
            pretrained=bool(cfg_get(config, "image_pretrained", True)),
            weights=cfg_get(config, "image_weights"),
            pooling=cfg_get(config, "image_pooling", "default"),
            output=output,
            mean=cfg_get(config, "image_mean"),
            std=cfg_get(config, "image_std"),
        )
        apply_finetune(encoder, **finetune)
        return ImageTower(encoder, self.content, d, tokens=tokens)

    def encode_items(self, ids: torch.Tensor) -> torch.Tensor:
        """Item vectors for ``ids`` (any shape) -> ``ids.shape + (D,)``; each unique id is encoded once."""
        flat = ids.reshape(-1)
        uniq, inverse = torch.unique(flat, return_inverse=True)
        vecs = self.item_tower(uniq)
        self._count(len(uniq))
        return vecs[inverse].view(*ids.shape, -1)

    def catalogue_vectors(self) -> torch.Tensor:
        """``item_tower(arange(1, n_items))`` (every real item, in id order); two-stage towers read their cached
        rows in place instead of gathering them (the full-softmax loss needs the whole catalogue at every step)."""
        catalogue = getattr(self.item_tower, "catalogue", None)
        out = catalogue(1) if catalogue is not None else None
        return out if out is not None else self.item_tower(torch.arange(1, self.n_items, device=self.log_pop.device))

    def _count(self, n: int) -> None:
        if self.training:
            self.items_encoded_train += n
        else:
            self.items_encoded_eval += n

    def item_matrix(self) -> torch.Tensor:
        """``[n_items, D]`` for every item (row 0 = padding, zeros). In eval mode it is computed in chunks of
        ``item_matrix_batch_size`` without gradients and cached; in training (loss ``ce``) in one pass. In a
        distributed evaluation with an expensive item tower (an encoder in forward), each rank encodes a block of the
        chunks and the blocks are all-gathered: every rank must call this once per evaluation pass (the trainer
        does, before the batches)."""
        if self._item_matrix is not None and not self.training:
            return self._item_matrix
        ids = torch.arange(self.n_items, device=self.log_pop.device)
        if self.training:
            matrix = self.item_tower(ids)
            self._count(self.n_items)
        else:
            from recbole_mm import distributed

            chunks = ids.split(self.item_matrix_batch_size)
            # fewer chunks than ranks (a catalogue smaller than world_size * item_matrix_batch_size): all on each rank
            shared = (self.expensive_item_tower and distributed.is_distributed()
                      and len(chunks) >= distributed.get_world_size())
            if shared:  # each rank encodes its block of chunks (the chunks of one process: same rows, same numbers)
                chunks = [chunks[i] for i in distributed.shard_chunks(len(chunks))]
            passes = self._catalogue_passes(chunks)
            if self.show_progress:
                from tqdm.auto import tqdm

                passes = tqdm(passes, total=len(chunks), desc="item matrix", unit="chunk", leave=False)
            with torch.no_grad(), torch.autocast("cuda", enabled=self.amp):
                parts = []
                for chunk, images in passes:
                    with images:
                        parts.append(self.item_tower(chunk).float())
                    self._count(len(chunk))
                if shared:  # then every rank gets every block: each item encoded once across the ranks
                    matrix = distributed.all_gather_rows(torch.cat(parts, 0))
                else:
                    matrix = torch.cat(parts, 0)
        matrix = torch.cat([torch.zeros_like(matrix[:1]), matrix[1:]], 0)
        if not self.training:
            self._item_matrix = matrix
        return matrix

    def _catalogue_passes(self, chunks):
        """``(chunk, context)`` for each chunk of ids: the item pass runs inside the context. Models encoding pixels
        get each chunk's images decoded ahead by ``worker`` DataLoader processes (while the encoder runs) and
        attached (:meth:`~recbole_mm.data.content.ItemContent.batch_images`); other models an empty context."""
        size = getattr(self.content, "batch_image_size", None)
        if size is None or not chunks:
            return ((chunk, contextlib.nullcontext()) for chunk in chunks)
        from types import SimpleNamespace

        from recbole_mm.data.content import item_image_batches

        device = chunks[0].device
        # the chunks are consecutive runs of item_matrix_batch_size ids (only the catalogue's last may be shorter):
        # batches of that size over their concatenation are the same chunks
        loader = item_image_batches(self.content, torch.cat(list(chunks)).cpu(), self.item_matrix_batch_size,
                                    self.decode_workers, size)
        return ((ids.to(device), self.content.batch_images(SimpleNamespace(image_ids=ids, image_pixels=px,
                                                                           image_size=size)))
                for ids, px in loader)

    def invalidate_item_matrix(self) -> None:
        self._item_matrix = None

    def train(self, mode: bool = True):
        if mode:
            self.invalidate_item_matrix()  # parameters will change: the cached matrix is stale
        return super().train(mode)

    # --------------------------------------------------------------- scoring
    def score_users(self, states: torch.Tensor) -> torch.Tensor:
        """User states in the scoring space: as they are (``similarity: dot``, the papers) or unit length divided
        by ``temperature`` (``cosine``), so that ``score_users(u) @ score_items(v).T`` are the logits."""
        if self.similarity == "cosine":
            return torch.nn.functional.normalize(states, dim=-1) / self.temperature
        return states

    def score_items(self, vecs: torch.Tensor) -> torch.Tensor:
        if self.similarity == "cosine":
            return torch.nn.functional.normalize(vecs, dim=-1)
        return vecs

    # --------------------------------------------------------------- batches
    def sequence_targets(self, interaction):
        """``(inputs [B, L], lengths [B], targets [B, L], seq_items [B, L + 1])`` for the current ``seq_mode``."""
        seq = interaction[self.ITEM_SEQ]
        lengths = interaction[self.ITEM_SEQ_LEN]
        pos = interaction[self.POS_ITEM_ID]
        b, length = seq.shape
        rows = torch.arange(b, device=seq.device)
        full = torch.cat([seq, torch.zeros_like(seq[:, :1])], 1)
        full[rows, lengths] = pos  # the whole window: history then the target
        if self.seq_mode == "all_position":
            targets = full[:, 1:].clone()  # position t predicts item t + 1
        else:
            targets = torch.zeros_like(seq)
            targets[rows, lengths - 1] = pos
        return seq, lengths, targets, full

    def user_states(self, seq: torch.Tensor, lengths: torch.Tensor, seq_vecs: torch.Tensor) -> torch.Tensor:
        return self.seq_encoder(seq_vecs * (seq > 0).unsqueeze(-1).to(seq_vecs.dtype), lengths)

    def calculate_loss(self, interaction):
        if self.loss_name == "ce":
            seq, lengths, targets, full = self.sequence_targets(interaction)
            if self.expensive_item_tower:
                raise ValueError(f"{type(self).__name__}: loss 'ce' needs every item vector at every step; use cached "
                                 "features (two-stage) or the inbatch / bce losses")
            real = self.catalogue_vectors()  # every item once
            self._count(self.n_items - 1)
            states = self.user_states(seq, lengths, real[(seq - 1).clamp(min=0)])  # padding zeroed there
            return losses.full_softmax_loss(self.score_users(states), targets, self.score_items(real), first_id=1)
        return self.recommendation_loss(self.loss_inputs(interaction))

    def loss_inputs(self, interaction, extra_ids: torch.Tensor = None, with_modalities: bool = False) -> dict:
        """Everything the ``inbatch`` / ``bce`` losses need, each unique item encoded once: ``seq``, ``lengths``,
        ``targets``, ``full`` (the windows), ``users``, ``all_ids`` (windows, then BCE negatives), ``uniq``,
        ``counts`` (batch slots of each unique id in ``all_ids``), ``uniq_vecs``, ``inverse`` (``all_ids`` ->
        row of ``uniq``). ``extra_ids`` (any shape) are encoded in the same pass but are not candidates of the
        in-batch softmax: ``extra_inverse`` maps them. ``with_modalities``: also ``modalities``, each modality's
        pooled vectors of ``uniq`` (models whose item tower is a :class:`~recbole_mm.layers.towers.FusedItemTower`).
        """
        seq, lengths, targets, full = self.sequence_targets(interaction)
        users = interaction[self.USER_ID] if self.USER_ID in interaction else None
        all_ids = full
        if self.loss_name == "bce":
            # drawn by the collate step when it decodes images (their pixels come with the batch), else here
            negatives = getattr(interaction, "sampled_negatives", None)
            if negatives is None or tuple(negatives.shape) != (seq.shape[0], seq.shape[1]):
                negatives = losses.sample_negatives(full, self.n_items, seq.shape[1], users=users,
                                                    forbidden_keys=self.train_keys if users is not None else None)
            negatives = negatives.to(full.device)
            all_ids = torch.cat([full, negatives * (targets > 0)], 1)  # negatives only where there is a loss
        flat = all_ids.reshape(-1)
        ids = flat if extra_ids is None else torch.cat([flat, extra_ids.reshape(-1)])
        uniq, inverse = torch.unique(ids, return_inverse=True)
        out = dict(seq=seq, lengths=lengths, targets=targets, full=full, users=users, all_ids=all_ids, uniq=uniq,
                   counts=torch.bincount(inverse[: flat.numel()], minlength=len(uniq)),
                   inverse=inverse[: flat.numel()].view(all_ids.shape))
        if extra_ids is not None:
            out["extra_inverse"] = inverse[flat.numel():].view(extra_ids.shape)
        content = getattr(self, "content", None)
        # pixels decoded by the collate step (DataLoader workers) are used by the image towers in this block
        with content.batch_images(interaction) if content is not None else contextlib.nullcontext():
            if with_modalities:
                out["uniq_vecs"], out["modalities"] = self.item_tower(uniq, with_modalities=True)
            else:
                out["uniq_vecs"] = self.item_tower(uniq)
        self._count(len(uniq))
        return out

    def recommendation_loss(self, b: dict) -> torch.Tensor:
        """The next-item loss (``inbatch`` or ``bce``) from :meth:`loss_inputs`; the user states at every position
        are left in ``b["states"]`` for models that add terms."""
        seq, lengths, targets, uniq, counts = b["seq"], b["lengths"], b["targets"], b["uniq"], b["counts"]
        length = seq.shape[1]
        vecs = b["uniq_vecs"][b["inverse"]]
        states = b["states"] = self.user_states(seq, lengths, vecs[:, :length])
        if self.loss_name == "inbatch":
            keep = (uniq > 0) & (counts > 0)
            return losses.inbatch_softmax_loss(
                self.score_users(states), targets, uniq[keep], self.score_items(b["uniq_vecs"][keep]), b["full"],
                b["users"], self.log_pop[uniq[keep]] if self.logq_correction else None, counts[keep]
            )
        valid = targets > 0
        item_vecs = self.score_items(vecs)
        return losses.bce_loss(self.score_users(states[valid]), item_vecs[:, 1 : length + 1][valid],
                               item_vecs[:, length + 1 :][valid])

    # ------------------------------------------------------------- inference
    def forward(self, item_seq, item_seq_len):
        # [B, L] ids -> [B, D]: the user state after the last item (RecBole's SASRec contract)
        states = self.user_states(item_seq, item_seq_len, self.encode_items(item_seq))
        return self.gather_indexes(states, item_seq_len - 1)

    def user_vector(self, interaction) -> torch.Tensor:
        seq = interaction[self.ITEM_SEQ]
        lengths = interaction[self.ITEM_SEQ_LEN]
        matrix = self.item_matrix()
        states = self.user_states(seq, lengths, matrix[seq])
        return self.gather_indexes(states, lengths - 1)

    def full_sort_predict(self, interaction):
        return self.score_users(self.user_vector(interaction)) @ self.score_items(self.item_matrix()).t()

    def predict(self, interaction):
        user = self.score_users(self.user_vector(interaction))
        return (user * self.score_items(self.item_matrix()[interaction[self.ITEM_ID]])).sum(-1)

    # ------------------------------------------------------------- optimizer
    def encoder_parameter_names(self) -> set:
        """Names of the pretrained encoders' own parameters (their own learning-rate group)."""
        from recbole_mm.encoders import ImageEncoder, TextEncoder

        names = set()
        for prefix, module in self.named_modules():
            if isinstance(module, (TextEncoder, ImageEncoder)):
                # adapters (LoRA) are new weights: they learn with the model's rate, like the heads
                names |= {f"{prefix}.{n}" for n, _ in module.named_parameters() if "lora_" not in n}
        return names

    def optimizer_groups(self, config) -> list:
        enc_names = self.encoder_parameter_names()
        enc, rest = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                (enc if name in enc_names else rest).append(p)
        lr, wd = config["learning_rate"], config["weight_decay"] or 0.0
        groups = [{"name": "model", "params": rest, "lr": lr, "weight_decay": wd}]
        if enc:
            groups.append({
                "name": "encoder",
                "params": enc,
                "lr": cfg_get(config, "encoder_learning_rate", lr),
                "weight_decay": cfg_get(config, "encoder_weight_decay", wd),
            })
        return [g for g in groups if g["params"]]
