"""Losses shared by the multimodal sequential models (specs/models.md §1.3-1.4), all positions at once.

Shapes: ``B`` examples, ``L`` positions, ``D`` dimensions, ``C`` candidate items. ``target_ids[b, t]`` is the
item to predict from position ``t`` (0 = no loss at this position).

- :func:`inbatch_softmax_loss`: softmax over the batch's items with logQ popularity correction (Yi et al.,
  RecSys 2019) and masking of the user's own other items (false negatives), vectorised (no loop over users).
- :func:`bce_loss`: one-negative binary cross-entropy, ``mean BCE(pos, 1) + mean BCE(neg, 0)``.
- :func:`sample_negatives`: uniform negatives outside each user's training sequence.
- :func:`full_softmax_loss`: softmax over every item (only where item vectors are cheap: cached features).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.nn import functional as F

MASK_VALUE = -1e4


def inbatch_softmax_loss(
    user_vecs: torch.Tensor,
    target_ids: torch.Tensor,
    cand_ids: torch.Tensor,
    cand_vecs: torch.Tensor,
    example_items: torch.Tensor,
    example_users: Optional[torch.Tensor] = None,
    log_pop: Optional[torch.Tensor] = None,
    cand_counts: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """In-batch softmax over unique candidates with logQ correction and same-user masking.

    Args:
        user_vecs: ``[B, L, D]`` user state at every position.
        target_ids: ``[B, L]`` next item per position, 0 where there is none.
        cand_ids: ``[C]`` unique item ids of the batch (every target must be among them).
        cand_vecs: ``[C, D]`` their vectors.
        example_items: ``[B, S]`` all item ids of each example's sequence (0 = padding).
        example_users: ``[B]`` user of each example; items of other examples of the same user are masked as
            well (a user may appear in several windows of one batch). ``None``: own example only.
        log_pop: ``[C]`` ``log p(item)`` from training-split counts, subtracted from the logits.
        cand_counts: ``[C]`` how many batch slots hold each candidate. A negative then weighs
            ``count * exp(logit - log p)``, as in the originals' one-column-per-slot softmax (the sampling
            correction assumes negatives drawn with multiplicity). ``None``: each candidate once.

    For the row of example ``b`` at position ``t``, every candidate that occurs in ``b``'s user's sequence(s) is
    masked except the target itself; the label is the target's candidate column. Mean over positions with a
    target. This equals the originals' one-column-per-slot softmax (tests/test_losses.py checks it against a
    per-slot reference): there too, every slot holding an item of the user's sequence is masked except the
    target's own slot, so copies of the target in other users' slots are not negatives either.
    """
    valid = target_ids > 0
    rows = valid.nonzero(as_tuple=True)[0]  # example of each position with a target
    targets = target_ids[valid]
    logits = user_vecs[valid] @ cand_vecs.t()  # [N, C]: only positions that have a loss
    if log_pop is not None:
        logits = logits - log_pop.to(logits.dtype)[None, :]
    own = (example_items[:, :, None] == cand_ids[None, None, :]).any(1)  # [B, C]
    if example_users is not None:
        same_user = (example_users[:, None] == example_users[None, :]).to(logits.dtype)
        own = (same_user @ own.to(logits.dtype)) > 0
    own = own[rows]
    if cand_counts is not None:
        logits = logits + torch.where(own, 0.0, cand_counts.to(logits.dtype).log()[None, :])
    is_target = targets[:, None] == cand_ids[None, :]  # [N, C]
    if not torch.all(is_target.any(-1)):
        raise ValueError("every target id must be one of the candidates")
    logits = logits.masked_fill(own & ~is_target, MASK_VALUE)
    return F.cross_entropy(logits, is_target.to(torch.int8).argmax(-1))


def bce_loss(user_vecs: torch.Tensor, pos_vecs: torch.Tensor, neg_vecs: torch.Tensor) -> torch.Tensor:
    """``mean BCE(u.p, 1) + mean BCE(u.n, 0)`` over rows of ``[N, D]`` (two separate means, summed)."""
    pos = (user_vecs * pos_vecs).sum(-1)
    neg = (user_vecs * neg_vecs).sum(-1)
    return F.binary_cross_entropy_with_logits(pos, torch.ones_like(pos)) + F.binary_cross_entropy_with_logits(
        neg, torch.zeros_like(neg)
    )


def sample_negatives(
    example_items: torch.Tensor,
    n_items: int,
    n_per_example: int,
    generator: Optional[torch.Generator] = None,
    max_tries: int = 20,
    users: Optional[torch.Tensor] = None,
    forbidden_keys: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``[B, n_per_example]`` item ids drawn uniformly from ``1 .. n_items - 1``, redrawn (vectorised, up to
    ``max_tries`` rounds) while they occur in the example's own sequence or, with ``users`` and
    ``forbidden_keys`` (sorted ``user * n_items + item`` of each user's training items), in the user's
    training sequence."""
    b = example_items.shape[0]
    device = example_items.device

    def clashes(neg):
        hit = (neg[:, :, None] == example_items[:, None, :]).any(-1)
        if forbidden_keys is not None and len(forbidden_keys):
            keys = users[:, None].to(torch.int64) * n_items + neg
            pos = torch.searchsorted(forbidden_keys, keys).clamp(max=len(forbidden_keys) - 1)
            hit = hit | (forbidden_keys[pos] == keys)
        return hit

    neg = torch.randint(1, n_items, (b, n_per_example), generator=generator, device=device)
    for _ in range(max_tries):
        clash = clashes(neg)
        if not clash.any():
            break
        redraw = torch.randint(1, n_items, (int(clash.sum()),), generator=generator, device=device)
        neg = neg.masked_scatter(clash, redraw)
    return neg


def full_softmax_loss(
    user_vecs: torch.Tensor, target_ids: torch.Tensor, item_matrix: torch.Tensor, first_id: int = 0
) -> torch.Tensor:
    """Cross-entropy over all items at positions with a target. ``item_matrix`` row ``r`` is item
    ``first_id + r``; with ``first_id=0`` its row 0 is padding and is excluded."""
    valid = target_ids > 0
    logits = user_vecs[valid] @ item_matrix.t()
    if first_id == 0:
        logits[:, 0] = float("-inf")
    return F.cross_entropy(logits, target_ids[valid] - first_id)
