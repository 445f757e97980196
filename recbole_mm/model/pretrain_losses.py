"""PMMRec's pre-training objectives as pure functions (specs/models.md §3b), all anchors / positions at once.

Reference: Li, Du, Ni, Zhao, Guo, Yuan, Zhou. "Multi-Modality is All You Need for Transferable Recommender
Systems". ICDE 2024, arXiv 2312.09602.
Reference: https://github.com/ICDE24/PMMRec (the released code is the downstream stage only; the one
pre-training objective ever released is NICL, class ``metric_learning_8`` in ``model/model.py`` at commit
``488352f``, removed again at ``8ae025a``; its settings are in ``parameters.py`` at ``0d64c3e``).

- :func:`nicl_loss`: next-item enhanced cross-modal contrastive learning (NICL), **as coded at** ``488352f``:
  anchor = text vector of an item slot; positives = the image vectors of the same slot and of the next slot
  of the same sequence; negatives = image vectors of the other in-batch slots, cosine / ``tau``
  (``UI_temp = 0.1``; the total there is ``(1 - UI_alpha) * L_rec + UI_alpha * L_NICL`` with ``UI_alpha = 0.4``).
- :func:`corrupt_sequences` + :func:`nid_loss`: noised item detection (NID). The paper abstract names the
  task (detect noised items to denoise user sequences, self-supervised); corruption types, rate and the
  per-position binary classifier trained with BCE are a **reconstruction**.
- :func:`rcl_loss`: robustness-aware contrastive learning (RCL). The abstract names it; the InfoNCE form
  between a user's clean and noised sequence representation is a **reconstruction**.

Reconstructions (not in any released code nor in the abstract; defaults are project choices):
``corrupt_sequences``: rate 0.15 (BERT-style), replace / shuffle mix 0.5, uniform replacement ids, shuffling
inside a row; ``nid_loss``: mean BCE over real positions; ``rcl_loss``: cosine / tau with tau 0.1 (borrowed
from NICL), in-batch negatives, symmetric; ``nicl_loss(symmetric=True)``: the image -> text direction; the
weights of NID and RCL in the total loss (left to the model configuration).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch.nn import functional as F


def _nicl_direction(anchor, other, ids, rows, same_seq, tau):
    """Mean NICL loss with ``anchor [N, D]`` and ``other [N, D]`` (unit vectors of the real slots, in batch
    order), ``ids [N]``, ``rows [N]`` (window of each slot) and ``same_seq [N, N]``."""
    n = ids.shape[0]
    idx = torch.arange(n, device=ids.device)
    nxt = (idx + 1).clamp(max=n - 1)
    has_next = (idx < n - 1) & (rows[nxt] == rows)  # the next real slot belongs to the same window
    next_ids = torch.where(has_next, ids[nxt], ids)
    sims = anchor @ other.t() / tau  # [N, N] cosine / tau
    pos = torch.eye(n, dtype=torch.bool, device=ids.device)
    pos[idx[has_next], nxt[has_next]] = True  # own image and the next slot's image
    # negatives: every real slot (duplicates counted) whose id is neither positive id, outside the sequence
    neg = (ids[None, :] != ids[:, None]) & (ids[None, :] != next_ids[:, None]) & ~same_seq
    pos_sum = (sims * pos.to(sims.dtype)).sum(-1)
    lse = torch.logsumexp(sims.masked_fill(~(pos | neg), float("-inf")), -1)  # subtracted once per anchor
    per_anchor = -(pos_sum - lse) / pos.sum(-1).to(sims.dtype)
    return per_anchor.sum() / n


def nicl_loss(
    text: torch.Tensor,
    image: torch.Tensor,
    items: torch.Tensor,
    tau: float = 0.1,
    symmetric: bool = False,
    users: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Next-item enhanced cross-modal contrastive loss, as coded in ``ICDE24/PMMRec`` at ``488352f``.

    Args:
        text: ``[B, S, D]`` text vector of every window slot (after NICL's projector; normalised here).
        image: ``[B, S, D]`` image vector of every window slot.
        items: ``[B, S]`` item ids, 0 = padding; right-padded (real slots first, the history then the target).
        tau: temperature (``UI_temp``, 0.1 in the code).
        symmetric: also the image -> text direction, averaged with text -> image (an extension, not coded).
        users: ``[B]`` user of each window; windows of the same user count as one sequence. ``None``: each
            window is its own sequence (the original: one window per user).

    Returns:
        Scalar ``sum_a loss_a / N`` over the ``N`` real slots ``a`` (every real slot is an anchor), with
        ``loss_a = -(sum_{p in Pos} cos(a, p) / tau - log sum_{x in Pos + Neg} exp(cos(a, x) / tau)) / |Pos|``.

    ``Pos`` = the image of the anchor's own slot and of the next real slot of its window (own image only at
    the last real slot); if both slots hold the same item, both count (``|Pos| = 2``), as coded. ``Neg`` = the
    image of every real slot of the batch **per slot** (an item in three slots counts three times, as coded)
    whose id differs from both positives' ids and which is not in the anchor's sequence (same window, or with
    ``users`` a window of the same user; exclusion by slot, as coded: the anchor's items still count as
    negatives where they occur in other users' windows).

    NOTE (deviations from ``metric_learning_8``):
    - at the last real slot the code takes every in-batch slot with another id as a negative, including the
      anchor's own sequence; here the own sequence is excluded there too (specs/models.md §3b decision);
    - the code selects slots with the history mask ``log_mask [B, L]`` flattened against the
      ``[B * (L + 1)]`` slot arrays, so from the second window on the selected slots are shifted (they cross
      window boundaries and include padding and targets); here the real slots are read from ``items > 0``.
      Its intent was history slots only; here the target counts too (it is the last history item's next
      item). To leave it out, pass its id as 0;
    - the code's "each id once" guard compares tensors by identity and never fires: every slot is an anchor,
      as here.
    """
    b, s, d = text.shape
    real = (items > 0).reshape(-1)
    n = int(real.sum())
    if n == 0:
        return (text.sum() + image.sum()) * 0.0
    t = F.normalize(text.reshape(b * s, d)[real], dim=-1)
    v = F.normalize(image.reshape(b * s, d)[real], dim=-1)
    ids = items.reshape(-1)[real]
    rows = torch.arange(b, device=items.device).repeat_interleave(s)[real]
    group = rows if users is None else users[rows]
    same_seq = group[:, None] == group[None, :]
    loss = _nicl_direction(t, v, ids, rows, same_seq, tau)
    if symmetric:
        loss = (loss + _nicl_direction(v, t, ids, rows, same_seq, tau)) / 2
    return loss


def corrupt_sequences(
    seq: torch.Tensor,
    lengths: torch.Tensor,
    n_items: int,
    rate: float = 0.15,
    replace_share: float = 0.5,
    generator: Optional[torch.Generator] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """NID's sequence corruption (a reconstruction: the paper gives no types nor rate).

    Args:
        seq: ``[B, L]`` right-padded item ids (0 = padding).
        lengths: ``[B]`` number of real positions of each row.
        n_items: item ids are ``1 .. n_items - 1`` (RecBole's count, padding included).
        rate: probability that a real position is corrupted.
        replace_share: probability that a corrupted position is replaced (else it is shuffled).
        generator: a ``torch.Generator`` on ``seq``'s device, for reproducible draws.

    Returns:
        ``(noised [B, L], labels [B, L])``: replaced positions hold a uniform id in ``[1, n_items)`` other than
        the original; the shuffle-chosen positions of a row are permuted among themselves (one such position:
        nothing moves). ``labels`` (float) is 1 where ``noised != seq`` (so a shuffle that leaves an id in
        place, or swaps equal ids, is not labelled), 0 elsewhere; padding stays 0 in both.
    """
    if n_items < 3:
        raise ValueError(f"corrupt_sequences needs at least two real item ids (n_items >= 3), got {n_items}")
    b, length = seq.shape
    device = seq.device
    pos = torch.arange(length, device=device)
    real = pos[None, :] < lengths[:, None]
    # always the same draws, whatever the outcome, so one generator state gives one result
    chosen = (torch.rand(b, length, generator=generator, device=device) < rate) & real
    replace = torch.rand(b, length, generator=generator, device=device) < replace_share
    shuffle_key = torch.rand(b, length, generator=generator, device=device)
    draw = torch.randint(1, n_items - 1, (b, length), generator=generator, device=device)
    shuffled = chosen & ~replace
    replaced = chosen & replace
    # shuffle: the k-th shuffled position (in index order) receives the item of the k-th in random order;
    # the other positions come after, in index order, in both orders, so they keep their own item
    by_index = torch.sort(torch.where(shuffled, pos[None, :], length + pos[None, :]), dim=1, stable=True)[1]
    at_random = torch.sort(torch.where(shuffled, shuffle_key, 2.0 + pos[None, :]), dim=1, stable=True)[1]
    noised = seq.scatter(1, by_index, seq.gather(1, at_random))
    # replace: uniform over [1, n_items) without the original (skip it by shifting draws at or above it)
    new_ids = draw + (draw >= seq).to(draw.dtype)
    noised = torch.where(replaced, new_ids, noised)
    labels = (noised != seq).to(torch.float32)
    return noised, labels


def nid_loss(logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy with logits of ``logits [B, L]`` against ``labels [B, L]`` where ``valid``."""
    if not bool(valid.any()):
        return logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(logits[valid], labels[valid].to(logits.dtype))


def rcl_loss(
    clean: torch.Tensor, noised: torch.Tensor, tau: float = 0.1, users: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Robustness-aware contrastive loss (a reconstruction): symmetric in-batch InfoNCE on cosine / ``tau``.

    Args:
        clean: ``[B, D]`` user representation of each clean sequence.
        noised: ``[B, D]`` user representation of its corrupted version (the positive of row ``i``).
        tau: temperature.
        users: ``[B]`` user of each row; other rows of the same user are not negatives.

    Returns:
        Scalar: the mean over rows of clean -> noised (negatives: other rows' noised vectors) and noised -> clean
        (negatives: other rows' clean vectors), averaged.
    """
    sims = F.normalize(clean, dim=-1) @ F.normalize(noised, dim=-1).t() / tau  # [B, B]
    labels = torch.arange(sims.shape[0], device=sims.device)
    if users is not None:
        other_same = (users[:, None] == users[None, :]) & (labels[:, None] != labels[None, :])
        sims = sims.masked_fill(other_same, float("-inf"))
    return (F.cross_entropy(sims, labels) + F.cross_entropy(sims.t(), labels)) / 2
