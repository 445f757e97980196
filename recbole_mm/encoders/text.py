"""Text encoder over any transformers model (BERT / RoBERTa / MiniLM, CLIP text tower, Llama, ...).

Outputs, chosen by ``output``:

- ``"pooled"``: ``[n, d]`` with ``pooling`` = ``cls`` (first token), ``mean`` (attention-mask weighted mean, as
  sentence-transformers), ``last`` (last real token, for decoder LLMs) or ``pooler`` (the model's pooler);
- ``"taps"``: ``[n, len(taps), d]``, the pooled vector of each selected hidden state (index 0 = embedding
  output, i = layer i), as IISAN's side network reads them;
- ``"tokens"``: ``[n, T, d]`` last hidden states (ODMT, PMMRec fusion).

``normalize=True`` L2-normalises pooled outputs (sentence-transformers' all-MiniLM-L6-v2 recipe).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from recbole_mm.encoders.hub import quiet_loading, resolve_hf_path

TEXT_POOLINGS = ("cls", "mean", "last", "pooler")
# Per-layer taps (IISAN): "mean" averages every position up to the fixed text length, padding included (the
# original's mean for decoder LLMs); "masked_mean" the real tokens only.
TAP_POOLINGS = ("cls", "mean", "masked_mean", "last")
DECODER_FAMILIES = ("llama", "mistral", "mixtral", "gemma", "gemma2", "qwen2", "phi", "phi3", "gpt2", "gpt_neox",
                    "opt", "falcon", "bloom")


def default_tap_pooling(name: str) -> str:
    """The original IISAN's tap pooling for an encoder: ``mean`` (padding included) for decoder LLMs, ``cls``
    for BERT-like encoders."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(resolve_hf_path(name), local_files_only=True)
    return "mean" if cfg.model_type in DECODER_FAMILIES else "cls"


def pool_tokens(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool ``hidden`` ``[n, T, d]`` with attention ``mask`` ``[n, T]``."""
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    if pooling == "last":
        last = mask.long().sum(1).clamp(min=1) - 1
        return hidden[torch.arange(hidden.size(0), device=hidden.device), last]
    if pooling == "masked_mean":
        return pool_tokens(hidden, mask, "mean")
    if pooling == "all_mean":  # every position, padding included
        return hidden.mean(1)
    raise ValueError(f"unknown text pooling {pooling!r}; choose from {TEXT_POOLINGS}")


def _load_backbone(path: str):
    from transformers import AutoConfig, AutoModel

    cfg = AutoConfig.from_pretrained(path, local_files_only=True)
    with quiet_loading():
        if cfg.model_type == "clip":  # the text tower of a CLIP checkpoint
            from transformers import CLIPTextModel

            return CLIPTextModel.from_pretrained(path, local_files_only=True)
        return AutoModel.from_pretrained(path, local_files_only=True)


def load_tokenizer(name: str):
    """The tokenizer of a text encoder, right-padded, with a pad token (decoder LLMs have none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_hf_path(name), local_files_only=True)
    if tokenizer.pad_token is None:  # decoder LLM tokenizers
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    # Right padding everywhere: batches are trimmed to their longest text and "last" pooling indexes the
    # last real token (LLM tokenizers often default to left padding).
    tokenizer.padding_side = "right"
    return tokenizer


class TextEncoder(nn.Module):
    """A transformers text model with pooling / layer taps / token outputs (module docstring).

    Args:
        name: HF id in the local cache, local folder, or an offline preset (``all-MiniLM-L6-v2``).
        pooling: ``cls`` | ``mean`` | ``last`` | ``pooler``.
        output: ``pooled`` | ``taps`` | ``tokens``.
        taps: hidden-state indices for ``output="taps"`` (``None`` = all).
        normalize: L2-normalise pooled / tapped vectors.
    """

    def __init__(
        self,
        name: str,
        pooling: str = "mean",
        output: str = "pooled",
        taps: Optional[Sequence[int]] = None,
        normalize: bool = False,
        tap_pooling: Optional[str] = None,
    ):
        super().__init__()
        if pooling not in TEXT_POOLINGS:
            raise ValueError(f"unknown text pooling {pooling!r}; choose from {TEXT_POOLINGS}")
        if output not in ("pooled", "taps", "tokens"):
            raise ValueError(f"text encoder output must be pooled, taps or tokens, got {output!r}")
        self.name = name
        self.path = resolve_hf_path(name)
        self.model = _load_backbone(self.path)
        self.tokenizer = load_tokenizer(name)
        self.pooling = pooling
        self.output = output
        if tap_pooling is not None and tap_pooling not in TAP_POOLINGS:
            raise ValueError(f"unknown tap_pooling {tap_pooling!r}; choose from {TAP_POOLINGS}")
        self.tap_pooling = tap_pooling
        self.normalize = normalize
        n_states = self.num_hidden_layers + 1
        self.taps = list(range(n_states)) if taps is None else [int(t) for t in taps]
        bad = [t for t in self.taps if not -n_states <= t < n_states]
        if bad:
            raise ValueError(f"taps {bad} out of range for {name}: it has {n_states} hidden states (0 = the embedding "
                             f"output, i = layer i's output), so text_taps take indices 0..{n_states - 1} (or negative)")

    @property
    def hidden_size(self) -> int:
        cfg = self.model.config
        return getattr(cfg, "hidden_size", None) or getattr(cfg, "d_model")

    @property
    def num_hidden_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        want_states = self.output == "taps"
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=want_states, return_dict=True
        )
        if self.output == "tokens":
            return out.last_hidden_state
        if self.output == "taps":
            states = out.hidden_states
            vecs = torch.stack([pool_tokens(states[t], attention_mask, self._token_pooling()) for t in self.taps], 1)
            return nn.functional.normalize(vecs, dim=-1) if self.normalize else vecs
        if self.pooling == "pooler":
            vec = out.pooler_output
        else:
            vec = pool_tokens(out.last_hidden_state, attention_mask, self.pooling)
        return nn.functional.normalize(vec, dim=-1) if self.normalize else vec

    def _token_pooling(self) -> str:
        if self.tap_pooling is not None:
            return "all_mean" if self.tap_pooling == "mean" else self.tap_pooling
        return "cls" if self.pooling == "pooler" else self.pooling

    def unused_parameter_prefixes(self) -> list[str]:
        """Parameters that never influence the output (kept frozen by every fine-tune policy)."""
        return [] if self.pooling == "pooler" and self.output == "pooled" else ["model.pooler."]
