"""User (sequence) encoders over item vectors: the seed papers' SASRec block, or RecBole's TransformerEncoder.

Both take right-padded item vectors ``[B, L, D]`` (RecBole's layout) with the sequence lengths and return the
hidden state at every position ``[B, L, D]``; position ``t`` only attends to positions ``<= t``.

``paper`` (MoRec / PMMRec / IISAN / ODMT ``User_Encoder``, specs/models.md §1.1):

- learnable absolute positions aligned to the most recent item, as the originals' left-padded windows are
  (the last real item always has position ``L - 1``);
- ``H0 = Dropout(LayerNorm(E + P))`` with LayerNorm eps 1e-6;
- post-LN blocks: multi-head self-attention whose Q, K, V, O projections have no bias, then
  ``LN(x + Dropout(attn))``; FFN ``D -> 4D -> D`` with ReLU, ``LN(x + Dropout(ffn))``;
- causal and key-padding masks; Xavier-normal init of every Linear / Embedding, zero biases.

``recbole``: RecBole's ``TransformerEncoder`` with RecBole SASRec's position embedding (aligned to the first
item), LayerNorm, dropout and N(0, initializer_range) init, so that an ID baseline and a modality model can share
exactly one block.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class PaperSelfAttention(nn.Module):
    def __init__(self, d: int, n_heads: int, dropout: float):
        super().__init__()
        if d % n_heads:
            raise ValueError(f"hidden size {d} is not a multiple of n_heads {n_heads}")
        self.n_heads, self.d_head = n_heads, d // n_heads
        self.q = nn.Linear(d, d, bias=False)
        self.k = nn.Linear(d, d, bias=False)
        self.v = nn.Linear(d, d, bias=False)
        self.o = nn.Linear(d, d, bias=False)
        self.attn_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, length, d = x.shape

        def heads(t):
            return t.view(b, length, self.n_heads, self.d_head).transpose(1, 2)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        scores = q @ k.transpose(-1, -2) / self.d_head**0.5 + mask
        attn = self.attn_dropout(torch.softmax(scores, dim=-1))
        return self.o((attn @ v).transpose(1, 2).reshape(b, length, d))


class PaperBlock(nn.Module):
    def __init__(self, d: int, n_heads: int, dropout: float):
        super().__init__()
        self.attn = PaperSelfAttention(d, n_heads, dropout)
        self.ln1 = nn.LayerNorm(d, eps=1e-6)
        self.ffn_in = nn.Linear(d, 4 * d)
        self.ffn_out = nn.Linear(4 * d, d)
        self.ln2 = nn.LayerNorm(d, eps=1e-6)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.ln1(x + self.dropout(self.attn(x, mask)))
        return self.ln2(x + self.dropout(self.ffn_out(F.relu(self.ffn_in(x)))))


def causal_padding_mask(lengths: torch.Tensor, max_len: int, dtype=torch.float32) -> torch.Tensor:
    """Additive mask ``[B, 1, L, L]``: 0 where query ``t`` may attend key ``s`` (``s <= t`` and ``s`` real)."""
    pos = torch.arange(max_len, device=lengths.device)
    real = pos[None, :] < lengths[:, None]  # [B, L] keys that hold an item
    causal = pos[None, :] <= pos[:, None]  # [L, L]
    allowed = causal[None] & real[:, None, :]
    allowed = allowed | torch.eye(max_len, dtype=torch.bool, device=lengths.device)[None]  # padded queries: self
    return torch.where(allowed, 0.0, -1e9).to(dtype).unsqueeze(1)


class PaperSASRec(nn.Module):
    """The seed papers' SASRec user encoder (module docstring)."""

    def __init__(self, d: int, n_layers: int = 2, n_heads: int = 2, dropout: float = 0.1, max_len: int = 20):
        super().__init__()
        self.max_len = max_len
        self.position = nn.Embedding(max_len, d)
        self.ln = nn.LayerNorm(d, eps=1e-6)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(PaperBlock(d, n_heads, dropout) for _ in range(n_layers))
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.xavier_normal_(module.weight)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, item_vecs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        b, length, _ = item_vecs.shape
        pos = torch.arange(length, device=item_vecs.device)[None, :] + (length - lengths)[:, None]
        pos = pos.clamp(min=0, max=self.max_len - 1)  # recency-aligned: last real item at L - 1
        x = self.dropout(self.ln(item_vecs + self.position(pos)))
        mask = causal_padding_mask(lengths, length, x.dtype)
        for block in self.blocks:
            x = block(x, mask)
        return x


class RecBoleSASRec(nn.Module):
    """RecBole SASRec's position embedding + LayerNorm + TransformerEncoder over given item vectors."""

    def __init__(self, d, n_layers=2, n_heads=2, inner_size=256, hidden_dropout=0.5, attn_dropout=0.5,
                 hidden_act="gelu", layer_norm_eps=1e-12, initializer_range=0.02, max_len=50):
        super().__init__()
        from recbole.model.layers import TransformerEncoder

        self.position = nn.Embedding(max_len, d)
        self.encoder = TransformerEncoder(n_layers=n_layers, n_heads=n_heads, hidden_size=d, inner_size=inner_size,
                                          hidden_dropout_prob=hidden_dropout, attn_dropout_prob=attn_dropout,
                                          hidden_act=hidden_act, layer_norm_eps=layer_norm_eps)
        self.ln = nn.LayerNorm(d, eps=layer_norm_eps)
        self.dropout = nn.Dropout(hidden_dropout)
        self.initializer_range = initializer_range
        self.apply(self._init)

    def _init(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=self.initializer_range)
        elif isinstance(module, nn.LayerNorm):
            module.bias.data.zero_()
            module.weight.data.fill_(1.0)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()

    def forward(self, item_vecs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        b, length, _ = item_vecs.shape
        pos = torch.arange(length, device=item_vecs.device).unsqueeze(0).expand(b, -1)
        x = self.dropout(self.ln(item_vecs + self.position(pos)))
        mask = causal_padding_mask(lengths, length, x.dtype)
        mask = torch.where(mask < 0, -10000.0, 0.0).to(x.dtype)  # RecBole SASRec's mask values
        return self.encoder(x, mask, output_all_encoded_layers=False)[-1]


def build_sequence_encoder(config, d: int) -> nn.Module:
    """``seq_encoder: paper | recbole`` with the usual RecBole keys (n_layers, n_heads, dropout ...)."""
    kind = config["seq_encoder"] or "paper"
    max_len = config["MAX_ITEM_LIST_LENGTH"]
    if kind == "paper":
        return PaperSASRec(d, config["n_layers"], config["n_heads"], config["dropout_prob"], max_len)
    if kind == "recbole":
        return RecBoleSASRec(
            d, config["n_layers"], config["n_heads"], config["inner_size"] or 4 * d,
            config["hidden_dropout_prob"] if config["hidden_dropout_prob"] is not None else config["dropout_prob"],
            config["attn_dropout_prob"] if config["attn_dropout_prob"] is not None else config["dropout_prob"],
            config["hidden_act"] or "gelu", config["layer_norm_eps"] or 1e-12, config["initializer_range"] or 0.02, max_len,
        )
    raise ValueError(f"seq_encoder must be paper or recbole, got {kind!r}")
