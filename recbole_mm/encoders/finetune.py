"""Fine-tune policies for an encoder module: which parameters train.

- ``frozen``: nothing trains (use cached features when you can: it is much cheaper);
- ``full``: everything trains (except parameters that never reach the output, e.g. an unused BERT pooler);
- ``top_k``: the last ``k`` blocks of the backbone's block stack and everything after them (final norm,
  projection) train; embeddings and earlier blocks are frozen. Expressed by module position, not by
  parameter index (the seed code's ``freeze_paras_before`` breaks across model classes);
- ``lora``: LoRA adapters from peft on ``lora_target_modules`` (default: attention query / value projections
  of the architecture); the backbone is frozen;
- ``bitfit``: only bias terms train.

:func:`apply_finetune` works on :class:`~recbole_mm.encoders.text.TextEncoder` and
:class:`~recbole_mm.encoders.image.ImageEncoder` (their backbone is ``.model``).
"""

from __future__ import annotations

from typing import Optional, Sequence

from torch import nn

POLICIES = ("frozen", "full", "top_k", "lora", "bitfit")

# Default LoRA targets by the module names an architecture uses (first match wins).
_LORA_DEFAULTS = (("query", "value"), ("q_proj", "v_proj"), ("qkv",), ("q", "v"), ("conv_pwl",))


def _default_lora_targets(model: nn.Module) -> list[str]:
    leaf_names = {name.split(".")[-1] for name, _ in model.named_modules()}
    for group in _LORA_DEFAULTS:
        if all(g in leaf_names for g in group):
            return list(group)
    raise ValueError(
        f"no default LoRA target modules for {type(model).__name__}; set lora_target_modules "
        f"(module names such as {sorted(leaf_names)[:8]})"
    )


def _block_list(encoder: nn.Module):
    from recbole_mm.encoders.image import find_block_list

    return encoder.blocks if hasattr(type(encoder), "blocks") else find_block_list(encoder.model)


def apply_finetune(
    encoder: nn.Module,
    policy: str,
    top_k: int = 1,
    lora_r: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.1,
    lora_target_modules: Optional[Sequence[str]] = None,
) -> nn.Module:
    """Set ``requires_grad`` on ``encoder`` (in place; LoRA wraps ``encoder.model``). Returns the encoder."""
    if policy not in POLICIES:
        raise ValueError(f"unknown fine-tune policy {policy!r}; choose from {POLICIES}")
    unused = tuple(getattr(encoder, "unused_parameter_prefixes", lambda: [])())
    for p in encoder.parameters():
        p.requires_grad = policy == "full"
    if policy == "top_k":
        blocks = _block_list(encoder)
        if blocks is None:
            raise ValueError(f"top_k: {type(encoder.model).__name__} has no block stack; use full, lora or bitfit")
        k = int(top_k)
        if not 0 <= k <= len(blocks):
            raise ValueError(f"top_k={k} but the backbone has {len(blocks)} blocks")
        if k > 0:
            first_trainable = next(blocks[len(blocks) - k].parameters())
            trainable = False
            for _, p in encoder.model.named_parameters():
                trainable = trainable or p is first_trainable
                p.requires_grad = trainable
    elif policy == "bitfit":
        for name, p in encoder.named_parameters():
            p.requires_grad = name.endswith("bias")
    elif policy == "lora":
        from peft import LoraConfig, get_peft_model

        targets = list(lora_target_modules or _default_lora_targets(encoder.model))
        cfg = LoraConfig(r=int(lora_r), lora_alpha=int(lora_alpha), lora_dropout=float(lora_dropout), target_modules=targets)
        encoder.model = get_peft_model(encoder.model, cfg)
        if hasattr(type(encoder), "blocks"):
            from recbole_mm.encoders.image import find_block_list

            encoder.blocks = find_block_list(encoder.model)
    for name, p in encoder.named_parameters():
        if unused and name.startswith(unused):
            p.requires_grad = False
    return encoder


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts."""
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return trainable, total
