"""Item towers: item ids -> item vectors ``[n, D]``, from one modality each.

- :class:`FeatureTower` (two-stage): a frozen feature table (``[n_items, d]``, aligned to internal ids) ->
  ``Linear(d, D)`` + GELU -> ``dnn_layers`` blocks of ``Dropout -> Linear(D, D) -> GELU`` (MoRec's TS head).
- :class:`TextTower` (end-to-end): token ids of each item (tokenised once, a buffer) -> text encoder under a
  fine-tune policy -> ``Linear(d, D)`` + GELU (MoRec's E2E head).
- :class:`ImageTower` (end-to-end): uint8 pixels -> image encoder -> ``Linear(d, D)`` + GELU. The pixels come from
  the training batch (decoded in DataLoader workers by :class:`~recbole_mm.data.content.ImageBatchCollate`, made
  available by ``ItemContent.batch_images`` around the model's item pass); ids the batch lacks, and passes outside
  a batch, read the store (:meth:`~recbole_mm.data.content.ItemContent.pixels`).
- :class:`TokenFeatureTower` (two-stage, token level): frozen token features ``[n_items, T, d]`` read from a
  memory map (fp16 on disk) -> ``Linear(d, D)`` per token (PMMRec's / MMSR's ``text_proj`` / ``cv_proj``),
  returned with the token mask as a pair ``(tokens [n, T', D], mask [n, T'])`` (T' = the batch's longest row).
- ``TextTower`` / ``ImageTower`` with ``tokens=True`` (end-to-end, token level): the encoder's token states
  (text: last hidden states and the attention mask; image: ViT CLS + patches, CNN feature map flattened, all
  real) -> ``Linear(d, D)``, returned as the same pair.
- :class:`IDTower`: a zero-initialised ID embedding, added to the content vector where a model mixes IDs in.
- :class:`TapTower` (IISAN): per-layer taps of both modalities, cached (a memory map) or computed by the frozen
  encoders at every call (:class:`FrozenTextTaps`, :class:`FrozenImageTaps`), through a side network.
- :class:`FusedItemTower`: one tower per modality and a fusion (``recbole_mm.layers.fusion``); with one
  modality, token pairs are mean-pooled over their real tokens.

Buffers holding content are not saved in checkpoints (``persistent=False``): they are rebuilt from the dataset.
Frozen parts of an encoder stay in eval mode while training (BatchNorm statistics and dropout of frozen
layers do not change).
"""

from __future__ import annotations

import torch
from torch import nn

from recbole_mm.layers.fusion import pooled


def _linear(d_in: int, d_out: int) -> nn.Linear:
    lin = nn.Linear(d_in, d_out)
    nn.init.xavier_normal_(lin.weight)
    nn.init.zeros_(lin.bias)
    return lin


def _head(d_in: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(_linear(d_in, d_out), nn.GELU())


def _width(mask: torch.Tensor) -> int:
    """Token positions up to the batch's longest row (trailing positions that are padding in every row dropped)."""
    return max(int(mask.sum(1).max().item()), 1) if mask.numel() else 1


def _trim(tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    width = _width(mask)
    return tokens[:, :width], mask[:, :width]


class FeatureTower(nn.Module):
    """``activation=False``: a plain ``Linear(d, D)`` head (MMSR's token projection applied to mean-pooled
    features: the linear map of a mean equals the mean of the linear maps).

    The frozen features stay in their dtype (``feature_dtype: float16`` halves the buffer); the rows read are cast
    to the head's dtype."""

    def __init__(self, features: torch.Tensor, d_out: int, dnn_layers: int = 0, dropout: float = 0.1,
                 activation: bool = True):
        super().__init__()
        if not features.is_floating_point():
            features = features.float()
        self.register_buffer("features", features, persistent=False)
        self.head = _head(features.shape[-1], d_out) if activation else _linear(features.shape[-1], d_out)
        blocks = []
        for _ in range(int(dnn_layers)):
            lin = nn.Linear(d_out, d_out)
            nn.init.xavier_normal_(lin.weight)
            nn.init.zeros_(lin.bias)
            blocks += [nn.Dropout(dropout), lin, nn.GELU()]
        self.dnn = nn.Sequential(*blocks)

    def _rows(self, rows: torch.Tensor) -> torch.Tensor:
        weight = self.head[0].weight if isinstance(self.head, nn.Sequential) else self.head.weight
        return rows if rows.dtype == weight.dtype else rows.to(weight.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.dnn(self.head(self._rows(self.features[ids])))

    def catalogue(self, first: int = 1) -> torch.Tensor:
        """``forward(arange(first, n_items))`` reading the feature rows in place (a slice, not a gather)."""
        return self.dnn(self.head(self._rows(self.features[first:])))


class TokenFeatureTower(nn.Module):
    """Frozen token features (``lookup(ids) -> [n, T, d]``, e.g. :class:`~recbole_mm.data.content.FeatureLookup`)
    and their mask ``[n_items, T]`` -> ``(Linear(tokens), mask)`` trimmed to the batch's longest row."""

    token_level = True

    def __init__(self, lookup, mask: torch.Tensor, d_in: int, d_out: int):
        super().__init__()
        self.lookup = lookup
        self.register_buffer("mask", mask.bool(), persistent=False)
        self.proj = _linear(d_in, d_out)

    def forward(self, ids: torch.Tensor):
        tokens, mask = _trim(self.lookup(ids), self.mask[ids])
        return self.proj(tokens.to(device=ids.device, dtype=self.proj.weight.dtype)), mask


class _EncoderTower(nn.Module):
    """Keeps frozen encoder modules in eval mode during training."""

    encoder: nn.Module

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:
            for module in self.encoder.modules():
                params = list(module.parameters())
                if params and not any(p.requires_grad for p in params):
                    module.eval()  # fully frozen: no dropout, no BatchNorm statistics updates
        return self


class TextTower(_EncoderTower):
    """Pooled: ``GELU(Linear(encoder(text)))`` (MoRec's E2E head); ``tokens=True`` (the encoder built with
    ``output="tokens"``): ``(Linear(token states), mask)``."""

    def __init__(self, encoder, input_ids: torch.Tensor, attention_mask: torch.Tensor, d_out: int,
                 tokens: bool = False):
        super().__init__()
        self.encoder = encoder
        self.token_level = tokens
        self.register_buffer("input_ids", input_ids, persistent=False)
        self.register_buffer("attention_mask", attention_mask, persistent=False)
        self.head = _linear(encoder.hidden_size, d_out) if tokens else _head(encoder.hidden_size, d_out)

    def forward(self, ids: torch.Tensor):
        ids_, mask = _trim(self.input_ids[ids], self.attention_mask[ids])  # padding shared by the whole batch
        out = self.head(self.encoder(ids_, mask))
        return (out, mask.bool()) if self.token_level else out


class ImageTower(_EncoderTower):
    """Pooled: ``GELU(Linear(encoder(image)))``; ``tokens=True``: ``(Linear(patch / grid tokens), all-true mask)``."""

    def __init__(self, encoder, content, d_out: int, tokens: bool = False):
        super().__init__()
        self.encoder = encoder
        self.content = content
        self.token_level = tokens
        self.head = _linear(encoder.hidden_size, d_out) if tokens else _head(encoder.hidden_size, d_out)
        if hasattr(content, "request_batch_images"):
            content.request_batch_images(encoder.image_size)  # training batches carry decoded pixels

    def forward(self, ids: torch.Tensor):
        # the batch's pixels, decoded by the collate step (DataLoader workers); the store only for ids it lacks
        pixels = self.content.pixels(ids, self.encoder.image_size)
        out = self.head(self.encoder(pixels.to(ids.device)))
        if self.token_level:
            return out, torch.ones(out.shape[:2], dtype=torch.bool, device=out.device)
        return out


class IDTower(nn.Module):
    """A learned vector per item id, initialised to zeros: summed with a content tower (``id_tower: True``), an item
    never seen in training keeps a zero ID part and is represented by its content alone."""

    def __init__(self, n_items: int, d_out: int):
        super().__init__()
        self.embedding = nn.Embedding(n_items, d_out, padding_idx=0)
        nn.init.zeros_(self.embedding.weight)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(ids)

    def catalogue(self, first: int = 1) -> torch.Tensor:
        return self.embedding.weight[first:]


class FusedItemTower(nn.Module):
    """One tower per modality (``towers``, a dict in config order) fused into one ``[n, D]`` vector.

    ``forward(ids, with_modalities=True)`` also returns each modality's pooled vector ``[n, D]`` (the inputs of
    PMMRec's cross-modal contrastive loss), from the same tower outputs."""

    def __init__(self, towers: dict, fusion: nn.Module):
        super().__init__()
        self.towers = nn.ModuleDict(towers)
        self.fusion = fusion

    @property
    def token_level(self) -> bool:
        return any(getattr(t, "token_level", False) for t in self.towers.values())

    def forward(self, ids: torch.Tensor, with_modalities: bool = False):
        outputs = [tower(ids) for tower in self.towers.values()]
        fused = pooled(outputs[0]) if len(outputs) == 1 else self.fusion(outputs)
        if with_modalities:
            return fused, [pooled(o) for o in outputs]
        return fused

    def catalogue(self, first: int = 1):
        """``forward(arange(first, n_items))`` when every tower reads its rows in place (``catalogue``), else None."""
        towers = list(self.towers.values())
        if not all(hasattr(t, "catalogue") for t in towers):
            return None
        outputs = [t.catalogue(first) for t in towers]
        return pooled(outputs[0]) if len(outputs) == 1 else self.fusion(outputs)


class FrozenTextTaps(_EncoderTower):
    """Uncached taps: a frozen text encoder (``output="taps"``) run on the items' token ids at every call, without
    gradients and in eval mode -> ``[n, n_taps, d]`` (padding id 0: zeros, as in a cache). ``full_width``: the
    fixed text length (a mean over every position, padding included), else trimmed as in extraction."""

    def __init__(self, encoder, input_ids: torch.Tensor, attention_mask: torch.Tensor, full_width: bool):
        super().__init__()
        self.encoder = encoder
        self.full_width = full_width
        self.register_buffer("input_ids", input_ids, persistent=False)
        self.register_buffer("attention_mask", attention_mask, persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.reshape(-1)
        ids_, mask = self.input_ids[ids], self.attention_mask[ids]
        if not self.full_width:
            ids_, mask = _trim(ids_, mask)
        with torch.no_grad():
            return self.encoder(ids_, mask) * (ids > 0).view(-1, 1, 1)


class FrozenImageTaps(_EncoderTower):
    """Uncached taps of a frozen image encoder (``output="taps"``) on the image store's pixels (padding: zeros)."""

    def __init__(self, encoder, content):
        super().__init__()
        self.encoder = encoder
        self.content = content
        if hasattr(content, "request_batch_images"):
            content.request_batch_images(encoder.image_size)  # training batches carry decoded pixels

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.reshape(-1)
        pixels = self.content.pixels(ids, self.encoder.image_size).to(ids.device)
        with torch.no_grad():
            return self.encoder(pixels) * (ids > 0).view(-1, 1, 1)


class TapTower(nn.Module):
    """Per-layer taps of each modality (``lookup(ids) -> [n, n_taps, d]``: a cache's
    :class:`~recbole_mm.data.content.FeatureLookup`, where the backbones never run, or :class:`FrozenTextTaps` /
    :class:`FrozenImageTaps`) through a side network (:class:`~recbole_mm.layers.side_network.IISANSideNetwork`)
    -> ``[n, D]``."""

    def __init__(self, text_lookup, image_lookup, side: nn.Module):
        super().__init__()
        self.text_lookup, self.image_lookup = text_lookup, image_lookup
        self.side = side

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        dtype = next(self.side.parameters()).dtype
        text = self.text_lookup(ids).to(device=ids.device, dtype=dtype)
        image = self.image_lookup(ids).to(device=ids.device, dtype=dtype)
        return self.side(text, image)

