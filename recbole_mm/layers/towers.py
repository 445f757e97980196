"""Item towers: item ids -> item vectors ``[n, D]``, from one modality each.

- :class:`FeatureTower` (two-stage): a frozen feature table (``[n_items, d]``, aligned to internal ids) ->
  ``Linear(d, D)`` + GELU -> ``dnn_layers`` blocks of ``Dropout -> Linear(D, D) -> GELU`` (MoRec's TS head).
- :class:`TextTower` (end-to-end): token ids of each item (tokenised once, a buffer) -> text encoder under a
  fine-tune policy -> ``Linear(d, D)`` + GELU (MoRec's E2E head).
- :class:`ImageTower` (end-to-end): uint8 pixels from the image store -> image encoder -> ``Linear(d, D)`` + GELU.
- :class:`IDTower`: a zero-initialised ID embedding, added to the content vector where a model mixes IDs in.

Buffers holding content are not saved in checkpoints (``persistent=False``): they are rebuilt from the dataset.
Frozen parts of an encoder stay in eval mode while training (BatchNorm statistics and dropout of frozen
layers do not change).
"""

from __future__ import annotations

import torch
from torch import nn


def _head(d_in: int, d_out: int) -> nn.Sequential:
    lin = nn.Linear(d_in, d_out)
    nn.init.xavier_normal_(lin.weight)
    nn.init.zeros_(lin.bias)
    return nn.Sequential(lin, nn.GELU())


class FeatureTower(nn.Module):
    def __init__(self, features: torch.Tensor, d_out: int, dnn_layers: int = 0, dropout: float = 0.1):
        super().__init__()
        self.register_buffer("features", features.float(), persistent=False)
        self.head = _head(features.shape[-1], d_out)
        blocks = []
        for _ in range(int(dnn_layers)):
            lin = nn.Linear(d_out, d_out)
            nn.init.xavier_normal_(lin.weight)
            nn.init.zeros_(lin.bias)
            blocks += [nn.Dropout(dropout), lin, nn.GELU()]
        self.dnn = nn.Sequential(*blocks)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.dnn(self.head(self.features[ids]))


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
    def __init__(self, encoder, input_ids: torch.Tensor, attention_mask: torch.Tensor, d_out: int):
        super().__init__()
        self.encoder = encoder
        self.register_buffer("input_ids", input_ids, persistent=False)
        self.register_buffer("attention_mask", attention_mask, persistent=False)
        self.head = _head(encoder.hidden_size, d_out)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = self.attention_mask[ids]
        width = max(int(mask.sum(1).max().item()), 1)  # trim padding shared by the whole batch
        return self.head(self.encoder(self.input_ids[ids, :width], mask[:, :width]))


class ImageTower(_EncoderTower):
    def __init__(self, encoder, content, d_out: int):
        super().__init__()
        self.encoder = encoder
        self.content = content
        self.head = _head(encoder.hidden_size, d_out)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pixels = self.content.pixels(ids, self.encoder.image_size)
        return self.head(self.encoder(pixels.to(ids.device)))


class IDTower(nn.Module):
    """A learned vector per item id, initialised to zeros: summed with a content tower (``id_tower: True``), an item
    never seen in training keeps a zero ID part and is represented by its content alone."""

    def __init__(self, n_items: int, d_out: int):
        super().__init__()
        self.embedding = nn.Embedding(n_items, d_out, padding_idx=0)
        nn.init.zeros_(self.embedding.weight)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(ids)


class FusedItemTower(nn.Module):
    """One tower per modality (``towers``, a dict in config order) fused into one ``[n, D]`` vector."""

    def __init__(self, towers: dict, fusion: nn.Module):
        super().__init__()
        self.towers = nn.ModuleDict(towers)
        self.fusion = fusion

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        vectors = [tower(ids) for tower in self.towers.values()]
        return vectors[0] if len(vectors) == 1 else self.fusion(vectors)
