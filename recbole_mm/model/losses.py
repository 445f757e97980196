"""Losses shared by the multimodal sequential models (specs/models.md §1.3-1.4), all positions at once.

Shapes: ``B`` examples, ``L`` positions, ``D`` dimensions, ``C`` candidate items. ``target_ids[b, t]`` is the
item to predict from position ``t`` (0 = no loss at this position).

- :func:`inbatch_softmax_loss`: softmax over the batch's items with logQ popularity correction (Yi et al.,
  RecSys 2019) and masking of the user's own other items (false negatives), vectorised (no loop over users).
- :func:`bce_loss`: one-negative binary cross-entropy, ``mean BCE(pos, 1) + mean BCE(neg, 0)``.
- :func:`sample_negatives`: uniform negatives outside each user's training sequence.
- :func:`full_softmax_loss`: softmax over every item (only where item vectors are cheap: cached features).
- :func:`inbatch_logits`: the in-batch logits and labels themselves; :func:`kd_loss` / :func:`kd_rampup`: ODMT's
  online distillation between branches and its epoch ramp-up.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.nn import functional as F

MASK_VALUE = -1e4


def inbatch_logits(
    user_vecs: torch.Tensor,
    target_ids: torch.Tensor,
    cand_ids: torch.Tensor,
    cand_vecs: torch.Tensor,
    example_items: torch.Tensor,
    example_users: Optional[torch.Tensor] = None,
    log_pop: Optional[torch.Tensor] = None,
    cand_counts: Optional[torch.Tensor] = None,
    return_log_counts: bool = False,
):
    """The logits ``[N, C]`` and labels ``[N]`` of :func:`inbatch_softmax_loss` (one row per position with a
    target, in ``target_ids[target_ids > 0]`` order): logQ-corrected, multiplicity-weighted, same-user items
    masked to ``MASK_VALUE``. Models that combine several branches' logits (ODMT's distillation) start here.
    ``return_log_counts``: also the ``[N, C]`` log-multiplicity added to each column (0 where none was), which
    :func:`kd_loss` needs to distil over the batch's slots rather than over its merged columns."""
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
    log_counts = torch.zeros_like(logits)
    if cand_counts is not None:
        log_counts = torch.where(own, 0.0, cand_counts.to(logits.dtype).log()[None, :])
        logits = logits + log_counts
    is_target = targets[:, None] == cand_ids[None, :]  # [N, C]
    if not torch.all(is_target.any(-1)):
        raise ValueError("every target id must be one of the candidates")
    out = logits.masked_fill(own & ~is_target, MASK_VALUE), is_target.to(torch.int8).argmax(-1)
    return out + (log_counts,) if return_log_counts else out


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
    return F.cross_entropy(*inbatch_logits(user_vecs, target_ids, cand_ids, cand_vecs, example_items, example_users,
                                           log_pop, cand_counts))


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


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float, detach_teacher: bool = False,
            log_counts: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Soft-target distillation over logits ``[N, C]``: ``tau^2 * mean_n -sum_c softmax(T/tau) log_softmax(S/tau)``
    (cross-entropy to the teacher's softened distribution: KL plus the teacher's entropy). ``detach_teacher=False``
    (ODMT's online distillation): gradients flow into the teacher too. Computed in float32 at least.

    ``log_counts`` (from :func:`inbatch_logits`): the logits are merged in-batch columns, column ``c`` standing for
    ``n_c = exp(log_counts[c])`` batch slots with its count already added. The distillation is then the original's
    over the slots (each slot's logit divided by ``tau``, not the count):
    ``-tau^2 mean_n sum_c P_c (log_softmax(S'/tau + w)_c - w_c)`` with ``S' = S - w``, ``P = softmax(T'/tau + w)``."""
    if detach_teacher:
        teacher = teacher.detach()
    t = float(temperature)
    dtype = torch.promote_types(student.dtype, torch.float32)  # half-precision logits (AMP) in float32 at least
    student, teacher = student.to(dtype), teacher.to(dtype)
    if log_counts is None:
        soft = F.softmax(teacher / t, dim=-1)
        return -(soft * F.log_softmax(student / t, dim=-1)).sum(-1).mean() * t * t
    w = log_counts.to(dtype)
    soft = F.softmax((teacher - w) / t + w, dim=-1)
    return -(soft * (F.log_softmax((student - w) / t + w, dim=-1) - w)).sum(-1).mean() * t * t


def kd_rampup(epoch: int, alpha: float) -> float:
    """ODMT's distillation weight at ``epoch`` (0-based): ``exp(-5 (1 - min(epoch, alpha) / alpha)^2)``, a sigmoid
    ramp-up reaching 1 at ``alpha`` epochs; ``alpha < 1``: the constant ``alpha`` (0 switches distillation off)."""
    import math

    alpha = float(alpha)
    if alpha < 1:
        return alpha
    return math.exp(-5.0 * (1.0 - min(float(epoch), alpha) / alpha) ** 2)
