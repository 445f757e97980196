"""User (sequence) encoders over item vectors: the seed papers' SASRec block, RecBole's TransformerEncoder, GRU4Rec
and NextItNet.

All take right-padded item vectors ``[B, L, D]`` (RecBole's layout: real items first, the caller has zeroed the
padded positions) with the sequence lengths and return the hidden state at every position ``[B, L, D]``; the state
at position ``t`` only depends on positions ``<= t``, so the states of real positions never see padding.

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

``gru4rec`` (PMMRec ``User_Encoder_GRU4Rec`` in ``src/model/user_encoders.py``, the same body as MMSR's
``GRU4Rec`` in ``model/user_encoders.py``; Hidasi et al. ICLR 2016, Tan et al. DLRS 2016): input dropout
(``dropout_prob``), then ``nn.GRU`` with ``n_layers`` layers (the originals' ``block_num``, default 2), hidden size
D, no biases, no dropout between layers, no output projection (RecBole's GRU4Rec adds a ``dense`` Linear because its
hidden size may differ from the embedding size; PMMRec's has none). Init as both originals and RecBole: Xavier-uniform
on the first layer's ``weight_ih`` / ``weight_hh`` only, PyTorch's default ``U(-1/sqrt(D), 1/sqrt(D))`` on deeper
layers (not Xavier-normal). NOTE: the originals run the GRU over left-padded windows; a bias-free GRU keeps ``h = 0``
over zero vectors, so where the padding vectors are zero (this caller, the originals' ID tower) this right-padded run
gives the originals' states at the real positions.

``nextitnet`` (PMMRec ``User_Encoder_NextItNet`` / MMSR ``NextItNet``, same files; Yuan et al. WSDM 2019): residual
blocks of type "b", one per entry of ``dilations * n_layers`` (the originals: ``[1, 4] * block_num``, i.e.
2 * ``block_num`` blocks; RecBole's NextItNet the same with its ``dilations`` key). A block with dilation ``d``:
causal conv (kernel ``kernel_size``, default 3, dilation ``d``, zero left padding ``(k - 1) d``) -> LayerNorm (eps
1e-8) -> ReLU -> causal conv (dilation ``2 d``) -> LayerNorm -> ReLU, plus the block input; convolutions D -> D with
bias; no dropout, no output projection (PMMRec's forward returns the block outputs; RecBole's NextItNet adds a
``final_layer``). Init: PyTorch's defaults, as the originals (their ``_init_weights`` only touch Linear / Embedding,
which the blocks do not have). NOTE: the originals left-pad the window, so there the padding slots before the first
item carry non-zero activations after the first convolution (its bias) and every state depends on how much padding
precedes the items (the receptive field, 60 positions for ``block_num = 2`` and kernel 3, covers the whole window);
here the sequence starts at position 0 and every convolution sees zeros before it, so a state depends on the items
only, not on ``L - length``.

PMMRec's ``item_encoder`` transfer mode re-initialises the user encoder with Xavier-normal on Linear / Embedding
modules only, which leaves the GRU and the convolutions of these two encoders as they were loaded.
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


class PaperGRU4Rec(nn.Module):
    """PMMRec's GRU4Rec user encoder: input dropout, bias-free ``n_layers``-layer GRU with hidden size D (module
    docstring)."""

    def __init__(self, d: int, n_layers: int = 2, dropout: float = 0.1):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.gru = nn.GRU(d, d, num_layers=n_layers, bias=False, batch_first=True)
        nn.init.xavier_uniform_(self.gru.weight_ih_l0)  # as the originals: first layer only
        nn.init.xavier_uniform_(self.gru.weight_hh_l0)

    def forward(self, item_vecs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(self.dropout(item_vecs))  # [B, L, D]; right padding comes after every real state
        return out


class NextItNetBlock(nn.Module):
    """NextItNet residual block "b": two causal dilated convolutions (dilation ``d`` then ``2 d``), each followed by
    LayerNorm and ReLU, plus the input."""

    def __init__(self, d: int, kernel_size: int = 3, dilation: int = 1):
        super().__init__()
        self.conv1 = nn.Conv1d(d, d, kernel_size, dilation=dilation)
        self.ln1 = nn.LayerNorm(d, eps=1e-8)
        self.conv2 = nn.Conv1d(d, d, kernel_size, dilation=2 * dilation)
        self.ln2 = nn.LayerNorm(d, eps=1e-8)

    @staticmethod
    def causal_conv(conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
        """``[B, L, D] -> [B, L, D]``; zero left padding ``(k - 1) * dilation`` so position t sees ``<= t`` only."""
        pad = (conv.kernel_size[0] - 1) * conv.dilation[0]
        return conv(F.pad(x.transpose(1, 2), (pad, 0))).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.ln1(self.causal_conv(self.conv1, x)))
        out = F.relu(self.ln2(self.causal_conv(self.conv2, out)))
        return out + x


class PaperNextItNet(nn.Module):
    """PMMRec's NextItNet user encoder: one block "b" per entry of ``dilations * n_blocks`` (module docstring)."""

    def __init__(self, d: int, n_blocks: int = 2, dilations=(1, 4), kernel_size: int = 3):
        super().__init__()
        dilations = list(dilations)
        if kernel_size < 1 or not dilations or any(int(x) != x or x < 1 for x in dilations):
            raise ValueError(f"nextitnet needs kernel_size >= 1 and positive integer dilations, got kernel_size "
                             f"{kernel_size!r}, dilations {dilations!r}")
        self.dilations = [int(x) for x in dilations] * n_blocks
        self.blocks = nn.Sequential(*(NextItNetBlock(d, kernel_size, x) for x in self.dilations))

    def forward(self, item_vecs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.blocks(item_vecs)  # [B, L, D]; causal, so right padding never reaches a real state


SEQ_ENCODERS = ("paper", "recbole", "gru4rec", "nextitnet")


def build_sequence_encoder(config, d: int) -> nn.Module:
    """``seq_encoder: paper | recbole | gru4rec | nextitnet`` with the usual RecBole keys (n_layers, n_heads,
    dropout_prob ...); gru4rec reads n_layers and dropout_prob, nextitnet n_layers (blocks of ``dilations``),
    kernel_size (default 3) and dilations (default [1, 4])."""
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
    if kind == "gru4rec":
        return PaperGRU4Rec(d, config["n_layers"], config["dropout_prob"])
    if kind == "nextitnet":
        return PaperNextItNet(d, config["n_layers"], config["dilations"] or [1, 4], config["kernel_size"] or 3)
    raise ValueError(f"seq_encoder must be one of {', '.join(SEQ_ENCODERS)}; got {kind!r}")
