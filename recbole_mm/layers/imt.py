"""ODMT's ID-aware multimodal transformer (IMT) and its item tower (specs/models.md §6a).

Reference: Wei Ji, Xiangyan Liu, An Zhang, Yinwei Wei, Yongxin Ni, Xiang Wang. "Online Distillation-enhanced
    Multi-modal Transformer for Sequential Recommendation." ACM MM 2023; https://github.com/xyliugo/ODMT
    (``code/model/model.py``, ``modules.py``).

Per item: frozen text tokens ``[T, d_t]`` (with their padding mask) and image tokens ``[P, d_i]`` (all real), each
projected to D; an ID vector (a table of width ``d_id``, optionally initialised from the frozen features) projected to
D. The IMT reads ``[text | image | ID]`` (input dropout, then the papers' post-LN block of
:mod:`~recbole_mm.layers.sequence`: bias-free attention, ReLU FFN 4D, LayerNorm eps 1e-6, Xavier init; as the
original's ``MergedAttentionFusion``) under the v1 mask:
text and image tokens cannot attend to the ID token, the ID token attends to everything, text padding is a key
padding mask. Three item views come out: the ID position, the text view (the first text position, ``cls``, or the
mean over the real text positions, ``mean``) and the image view (likewise), each through its own
``Linear -> LeakyReLU -> Linear``. The tower returns them concatenated ``[n, 3 D]`` (ID, text, image), so that the
base class's unique-item batching and per-evaluation item matrix carry the three views at once.
"""

from __future__ import annotations

import torch
from torch import nn

from recbole_mm.layers.fusion import masked_mean
from recbole_mm.layers.sequence import PaperBlock, PaperSASRec

BRANCHES = ("id", "text", "image")
VIEWS = ("cls", "mean")


def v1_attention_mask(n_modal: int) -> torch.Tensor:
    """``[S, S]`` boolean mask (True = may not attend) for ``S = n_modal + 1`` tokens, the ID token last: modal tokens
    cannot attend to the ID token; the ID token attends to everything."""
    mask = torch.zeros(n_modal + 1, n_modal + 1, dtype=torch.bool)
    mask[:n_modal, n_modal] = True
    return mask


def imt_mask(keep: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Additive mask ``[n, 1, S, S]`` from the real-token mask ``keep [n, S]`` (ID token last): the v1 rule, and no
    query attends to a padded key (a padded query keeps itself, so that no row is empty)."""
    s = keep.shape[1]
    allowed = ~v1_attention_mask(s - 1).to(keep.device)[None] & keep[:, None, :]
    allowed = allowed | torch.eye(s, dtype=torch.bool, device=keep.device)[None]
    return torch.where(allowed, 0.0, -1e9).to(dtype).unsqueeze(1)


def _branch_dnn(d: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d, d), nn.LeakyReLU(), nn.Linear(d, d))


class IMTItemTower(nn.Module):
    """``ids [n] -> [n, 3 D]`` (ID, text, image views). ``text_tower`` / ``image_tower``: token towers returning
    ``(tokens [n, T, D], mask [n, T])`` (:class:`~recbole_mm.layers.towers.TokenFeatureTower`); ``id_table``: an
    ``nn.Embedding(n_items, d_id)``."""

    def __init__(self, text_tower: nn.Module, image_tower: nn.Module, id_table: nn.Embedding, d: int, n_layers: int = 2,
                 n_heads: int = 2, dropout: float = 0.1, text_view: str = "cls", image_view: str = "cls"):
        super().__init__()
        for name, view in (("text_view", text_view), ("image_view", image_view)):
            if view not in VIEWS:
                raise ValueError(f"{name} must be one of {VIEWS}, got {view!r}")
        self.text_tower, self.image_tower = text_tower, image_tower
        self.id_table = id_table
        self.id_proj = nn.Linear(id_table.embedding_dim, d)
        self.text_view, self.image_view = text_view, image_view
        self.input_dropout = nn.Dropout(dropout)
        self.imt = nn.ModuleList(PaperBlock(d, n_heads, dropout) for _ in range(n_layers))
        self.imt.apply(PaperSASRec._init)
        self.dnn = nn.ModuleDict({b: _branch_dnn(d) for b in BRANCHES})

    @staticmethod
    def _view(states: torch.Tensor, mask: torch.Tensor, view: str) -> torch.Tensor:
        return states[:, 0] if view == "cls" else masked_mean(states, mask)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.reshape(-1)
        text, text_mask = self.text_tower(ids)  # [n T D], [n T]
        image, image_mask = self.image_tower(ids)  # [n P D], [n P]
        ident = self.id_proj(self.id_table(ids)).unsqueeze(1)  # [n 1 D]
        x = self.input_dropout(torch.cat([text, image.to(text.dtype), ident.to(text.dtype)], 1))
        t, p = text.shape[1], image.shape[1]
        keep = torch.cat([text_mask, image_mask, torch.ones_like(text_mask[:, :1])], 1).bool()
        mask = imt_mask(keep, x.dtype)
        out = x
        for block in self.imt:
            out = block(out, mask)
        views = {"id": out[:, -1], "text": self._view(out[:, :t], keep[:, :t], self.text_view),
                 "image": self._view(out[:, t:t + p], keep[:, t:t + p], self.image_view)}
        return torch.cat([self.dnn[b](views[b]) for b in BRANCHES], -1)
