"""Fusion of per-modality item representations into one item vector: the MMSR catalogue (specs/models.md §4b).

Interface: ``build_fusion(kind, d, n_modalities, ...)`` returns a module whose ``forward(inputs)`` takes one entry
per modality in config order (text first, then image). Each entry is either a pooled tensor ``[n, D]`` or a pair
``(tokens [n, T, D], mask [n, T])`` (mask 1 / True = real token; ``T`` may differ between modalities). The output
is ``[n, D]``. The class attribute ``token_level`` tells which input a fusion needs: pooled fusions also accept
pairs and pool each one by masked mean first (MMSR: masked mean of the text tokens, mean of the image tokens);
token-level fusions (``TOKEN_FUSIONS``) reject pooled tensors.

Pooled fusions (one shared ``LN`` with eps 1e-6 on every input; Linear layers Xavier-normal, zero biases):

- ``sum``: ``sum_m W_m LN(v_m)`` (``W_t LN(t) + W_v LN(v)`` for two modalities).
- ``concat``: ``W [LN(v_1); ...; LN(v_M)]`` (``M*D -> D``).
- ``film``: ``[gamma; beta] = W LN(t)``, ``W_o(gamma * LN(v) + beta)``: text conditions image (2 modalities).
- ``gated``: ``W_o(sigmoid(W_t LN(t)) * W_v LN(v))``: text gates image (2 modalities).
- ``sum_dnn`` / ``concat_dnn`` / ``film_dnn`` / ``gated_dnn``: the same, then ``dnn_layers`` blocks of
  ``Dropout -> Linear(D, D) -> ReLU`` (3 in MMSR).
- ``add``: ``sum_m v_m`` without parameters. Not part of MMSR: MoRec uses it to add a content vector and a
  zero-initialised ID vector.

Token-level fusions (BERT-style post-LN layers: attention -> dropout -> ``LN(x + .)``, FFN ``D -> 4D`` GELU ``-> D``
-> dropout -> ``LN(x + .)``, LN eps 1e-12; every Linear / Embedding N(0, 0.02), zero biases):

- ``co_att`` (LXMERT-style, 2 modalities): learned modality-type embeddings are added; each of ``n_layers`` blocks
  runs one shared cross-attention layer in both directions (each stream attends to the other's real tokens), then
  per-modality self-attention and per-modality FFN; each stream is masked-mean pooled and
  ``Linear([t_bar; v_bar]) -> D``.
- ``merge_attn`` (MMSR's default, PMMRec's fusion, any number of modalities): the token sequences are concatenated
  along the token axis, ``n_layers`` BERT layers run with a key mask of the real tokens, and all real tokens are
  mean-pooled. No modality-type embedding: the original builds one but never adds it to the tokens.

A padded token never changes the output: padded positions are zeroed on entry, masked out as attention keys and
left out of every mean (a row without any real key gets a zero attention context instead of NaN).

NOTE: deviations from the MMSR code (``model/fushion_module.py``, ``model/modeling.py``):

- ``n_heads`` and ``dropout`` are arguments; MMSR takes 12 heads, dropout 0.1 and erf-GELU from the BERT-base config
  (``from_pretrained("bert-base-uncased")`` loads no weight into the fusion: no parameter name matches).
- Masks are boolean (``masked_fill`` with the dtype's minimum) instead of the additive ``-10000``.
- ``sum`` and ``concat`` take any number of modalities and ``merge_attn`` any number of token sequences; MMSR
  fixes two. ``merge_attn`` creates no unused type-embedding parameter.
"""

from __future__ import annotations

import torch
from torch import nn


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the real tokens ``[n, T, D] -> [n, D]`` (zeros for a row without real tokens)."""
    keep = (mask != 0).unsqueeze(-1)
    total = torch.where(keep, tokens, torch.zeros((), dtype=tokens.dtype, device=tokens.device)).sum(1)
    return total / keep.sum(1).clamp(min=1).to(tokens.dtype)


def pooled(entry) -> torch.Tensor:
    """One vector per item: ``[n, D]`` as it is, a ``(tokens, mask)`` pair mean-pooled over its real tokens."""
    return entry if isinstance(entry, torch.Tensor) else masked_mean(*entry)


def _xavier_init(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.xavier_normal_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def _bert_init(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class _Fusion(nn.Module):
    """Shared checks: the number of modalities (``n_modalities``) and its allowed values (``exact_modalities``)."""

    kind = ""
    token_level = False
    exact_modalities = None  # an int when the fusion is defined for exactly that many modalities

    def __init__(self, d: int, n_modalities: int):
        super().__init__()
        if n_modalities < 1:
            raise ValueError(f"fusion {self.kind!r} needs at least one modality, got {n_modalities}")
        if self.exact_modalities is not None and n_modalities != self.exact_modalities:
            raise ValueError(f"fusion {self.kind!r} fuses exactly {self.exact_modalities} modalities (text, image), "
                             f"got {n_modalities}")
        self.d, self.n_modalities = d, n_modalities

    def _check(self, inputs) -> None:
        if len(inputs) != self.n_modalities:
            raise ValueError(f"fusion {self.kind!r} was built for {self.n_modalities} modalities, got {len(inputs)}")

    def _token_pairs(self, inputs) -> list:
        """``[(tokens [n, T, D] with padding zeroed, mask [n, T] bool)]``; pooled tensors are rejected."""
        self._check(inputs)
        pairs = []
        for entry in inputs:
            if isinstance(entry, torch.Tensor):
                raise ValueError(f"token-level fusion {self.kind!r} needs token inputs (tokens [n, T, D], mask [n, T]) "
                                 f"for every modality, got a pooled tensor of shape {tuple(entry.shape)}")
            tokens, mask = entry
            mask = mask != 0
            zero = torch.zeros((), dtype=tokens.dtype, device=tokens.device)
            pairs.append((torch.where(mask.unsqueeze(-1), tokens, zero), mask))
        return pairs


# ----------------------------------------------------------------------------------------------- pooled fusions
class AddFusion(_Fusion):
    """``sum_m v_m`` with no parameters (not in MMSR: MoRec adds a content vector and a zero-initialised ID vector)."""

    kind = "add"

    def __init__(self, d: int, n_modalities: int, **kwargs):
        super().__init__(d, n_modalities)

    def forward(self, inputs: list) -> torch.Tensor:
        self._check(inputs)
        return torch.stack([pooled(x) for x in inputs], 0).sum(0)


class _LNFusion(_Fusion):
    """One shared ``LayerNorm(eps=1e-6)`` on every pooled input, ``fuse`` (per class), then the optional DNN."""

    use_dnn = False

    def __init__(self, d: int, n_modalities: int, dropout: float = 0.1, dnn_layers: int = 3, **kwargs):
        super().__init__(d, n_modalities)
        self.layer_norm = nn.LayerNorm(d, eps=1e-6)
        self.build(d, n_modalities)
        blocks = []
        for _ in range(int(dnn_layers) if self.use_dnn else 0):
            blocks += [nn.Dropout(dropout), nn.Linear(d, d), nn.ReLU()]
        self.dnn = nn.Sequential(*blocks)
        self.apply(_xavier_init)

    def build(self, d: int, n_modalities: int) -> None:
        raise NotImplementedError

    def fuse(self, vectors: list) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, inputs: list) -> torch.Tensor:
        self._check(inputs)
        return self.dnn(self.fuse([self.layer_norm(pooled(x)) for x in inputs]))


class SumFusion(_LNFusion):
    """``sum_m W_m LN(v_m)``."""

    kind = "sum"

    def build(self, d, n_modalities):
        self.proj = nn.ModuleList(nn.Linear(d, d) for _ in range(n_modalities))

    def fuse(self, vectors):
        return torch.stack([proj(v) for proj, v in zip(self.proj, vectors)], 0).sum(0)


class ConcatFusion(_LNFusion):
    """``W [LN(v_1); ...; LN(v_M)]``."""

    kind = "concat"

    def build(self, d, n_modalities):
        self.proj = nn.Linear(d * n_modalities, d)

    def fuse(self, vectors):
        return self.proj(torch.cat(vectors, -1))


class FiLMFusion(_LNFusion):
    """``[gamma; beta] = W LN(t)``, ``W_o(gamma * LN(v) + beta)`` (Perez et al., 2018)."""

    kind = "film"
    exact_modalities = 2

    def build(self, d, n_modalities):
        self.film = nn.Linear(d, 2 * d)
        self.out = nn.Linear(d, d)

    def fuse(self, vectors):
        text, image = vectors
        gamma, beta = self.film(text).split(self.d, dim=-1)
        return self.out(gamma * image + beta)


class GatedFusion(_LNFusion):
    """``W_o(sigmoid(W_t LN(t)) * W_v LN(v))`` (Kiela et al., 2018)."""

    kind = "gated"
    exact_modalities = 2

    def build(self, d, n_modalities):
        self.gate = nn.Linear(d, d)
        self.value = nn.Linear(d, d)
        self.out = nn.Linear(d, d)

    def fuse(self, vectors):
        text, image = vectors
        return self.out(torch.sigmoid(self.gate(text)) * self.value(image))


class SumDNNFusion(SumFusion):
    kind, use_dnn = "sum_dnn", True


class ConcatDNNFusion(ConcatFusion):
    kind, use_dnn = "concat_dnn", True


class FiLMDNNFusion(FiLMFusion):
    kind, use_dnn = "film_dnn", True


class GatedDNNFusion(GatedFusion):
    kind, use_dnn = "gated_dnn", True


# ----------------------------------------------------------------------------------------------- token-level fusions
class BertAttention(nn.Module):
    """Multi-head attention of ``x [n, Tq, D]`` over ``context [n, Tk, D]`` restricted to the real keys, then
    ``LN(x + Dropout(Dense(.)))`` (BERT's attention + output sub-layer)."""

    def __init__(self, d: int, n_heads: int, dropout: float):
        super().__init__()
        if d % n_heads:
            raise ValueError(f"fusion attention: embedding_size {d} is not a multiple of fusion_heads {n_heads}")
        self.n_heads, self.d_head = n_heads, d // n_heads
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.dense = nn.Linear(d, d)
        self.attn_dropout = nn.Dropout(dropout)
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(d, eps=1e-12)

    def forward(self, x: torch.Tensor, context: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        n, t_q, d = x.shape

        def heads(t):
            return t.view(n, t.shape[1], self.n_heads, self.d_head).transpose(1, 2)  # [n, h, T, d_head]

        q, k, v = heads(self.query(x)), heads(self.key(context)), heads(self.value(context))
        scores = q @ k.transpose(-1, -2) / self.d_head**0.5  # [n, h, Tq, Tk]
        keep = key_mask[:, None, None, :]
        probs = torch.softmax(scores.masked_fill(~keep, torch.finfo(scores.dtype).min), dim=-1)
        probs = self.attn_dropout(probs * keep)  # a row without any real key attends to nothing (no NaN)
        out = (probs @ v).transpose(1, 2).reshape(n, t_q, d)
        return self.layer_norm(x + self.dropout(self.dense(out)))


class BertFFN(nn.Module):
    """``LN(x + Dropout(Linear(GELU(Linear(x)))))`` with inner size ``4D``."""

    def __init__(self, d: int, dropout: float):
        super().__init__()
        self.fc_in, self.fc_out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.act = nn.GELU()
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(d, eps=1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer_norm(x + self.dropout(self.fc_out(self.act(self.fc_in(x)))))


class BertLayer(nn.Module):
    """Self-attention over the real tokens, then the FFN."""

    def __init__(self, d: int, n_heads: int, dropout: float):
        super().__init__()
        self.attention = BertAttention(d, n_heads, dropout)
        self.ffn = BertFFN(d, dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.ffn(self.attention(x, x, mask))


class CoAttentionBlock(nn.Module):
    """Shared bidirectional cross-attention -> per-modality self-attention -> per-modality FFN."""

    def __init__(self, d: int, n_heads: int, dropout: float):
        super().__init__()
        self.cross = BertAttention(d, n_heads, dropout)  # one layer, used in both directions
        self.text_self, self.image_self = BertAttention(d, n_heads, dropout), BertAttention(d, n_heads, dropout)
        self.text_ffn, self.image_ffn = BertFFN(d, dropout), BertFFN(d, dropout)

    def forward(self, text, text_mask, image, image_mask):
        text, image = self.cross(text, image, image_mask), self.cross(image, text, text_mask)
        text, image = self.text_self(text, text, text_mask), self.image_self(image, image, image_mask)
        return self.text_ffn(text), self.image_ffn(image)


class CoAttentionFusion(_Fusion):
    """LXMERT-style co-attention (module docstring)."""

    kind = "co_att"
    token_level = True
    exact_modalities = 2

    def __init__(self, d: int, n_modalities: int, n_heads: int = 2, n_layers: int = 1, dropout: float = 0.1,
                 **kwargs):
        super().__init__(d, n_modalities)
        self.type_embedding = nn.Embedding(2, d)
        self.blocks = nn.ModuleList(CoAttentionBlock(d, n_heads, dropout) for _ in range(n_layers))
        self.out = nn.Linear(2 * d, d)
        self.apply(_bert_init)

    def forward(self, inputs: list) -> torch.Tensor:
        (text, text_mask), (image, image_mask) = self._token_pairs(inputs)
        text = text + self.type_embedding.weight[0]
        image = image + self.type_embedding.weight[1]
        for block in self.blocks:
            text, image = block(text, text_mask, image, image_mask)
        return self.out(torch.cat([masked_mean(text, text_mask), masked_mean(image, image_mask)], -1))


class MergeAttentionFusion(_Fusion):
    """Merge-attention (PMMRec / MMSR default; module docstring). No modality-type embedding, as in the original."""

    kind = "merge_attn"
    token_level = True

    def __init__(self, d: int, n_modalities: int, n_heads: int = 2, n_layers: int = 1, dropout: float = 0.1,
                 **kwargs):
        super().__init__(d, n_modalities)
        self.layers = nn.ModuleList(BertLayer(d, n_heads, dropout) for _ in range(n_layers))
        self.apply(_bert_init)

    def forward(self, inputs: list) -> torch.Tensor:
        pairs = self._token_pairs(inputs)
        x = torch.cat([tokens for tokens, _ in pairs], 1)  # [n, T_1 + ... + T_M, D]
        mask = torch.cat([m for _, m in pairs], 1)
        for layer in self.layers:
            x = layer(x, mask)
        return masked_mean(x, mask)


FUSIONS = {cls.kind: cls for cls in (
    AddFusion, SumFusion, ConcatFusion, FiLMFusion, GatedFusion, SumDNNFusion, ConcatDNNFusion, FiLMDNNFusion,
    GatedDNNFusion, CoAttentionFusion, MergeAttentionFusion,
)}
TOKEN_FUSIONS = frozenset(name for name, cls in FUSIONS.items() if cls.token_level)


def _check_kind(kind: str) -> None:
    if kind not in FUSIONS:
        raise ValueError(f"unknown fusion {kind!r}; choose from {sorted(FUSIONS)}")


def is_token_fusion(kind: str) -> bool:
    """Whether fusion ``kind`` needs ``(tokens, mask)`` pairs (ValueError for an unknown kind)."""
    _check_kind(kind)
    return kind in TOKEN_FUSIONS


def build_fusion(kind: str, d: int, n_modalities: int, n_heads: int = 2, n_layers: int = 1, dropout: float = 0.1,
                 dnn_layers: int = 3) -> nn.Module:
    """Build fusion ``kind`` for ``n_modalities`` inputs of size ``d`` (``FUSIONS`` lists the kinds).

    Args:
        kind: a key of ``FUSIONS``.
        d: the item vector size D (inputs and output).
        n_modalities: the number of entries ``forward`` receives.
        n_heads, n_layers: attention heads and layers of ``co_att`` / ``merge_attn``.
        dropout: dropout of the attention fusions and of the ``*_dnn`` blocks.
        dnn_layers: the number of ``Dropout -> Linear -> ReLU`` blocks of the ``*_dnn`` fusions.

    Returns:
        an ``nn.Module`` mapping a list of ``[n, D]`` tensors or ``(tokens, mask)`` pairs to ``[n, D]``.
    """
    _check_kind(kind)
    return FUSIONS[kind](d, n_modalities, n_heads=n_heads, n_layers=n_layers, dropout=dropout, dnn_layers=dnn_layers)
