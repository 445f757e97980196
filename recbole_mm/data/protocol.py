"""The seed papers' evaluation protocol, in one place, for plugin and stock models alike.

- **History masking** (``mask_history``, default true). RecBole 1.2.1 masks the user's known items for general
  models only: for sequential models its full-sort loader returns no history index, so the items a user has
  already interacted with compete with the target. The seed papers (MoRec, PMMRec, IISAN, ODMT) set their
  scores to -inf. :class:`HistoryIndex` holds, per evaluation split, the items each user had before the
  target: valid masks the training items, test masks the training items and the valid target. The row's own
  target is never masked (a repeat consumption stays rankable), as RecBole does for general models
  (``used_ids - positive items``).
- **New items** (``new_item_ratio``): a random share of the catalogue (seeded by ``seed``) is held out of
  training entirely: their interactions leave the training part of every user's sequence, while valid / test
  targets on them stay and are scored. This is the setting in which the MoRec and PMMRec papers show content
  beating IDs: an ID model never sees these items, a content model encodes them from their text / image.
- **Item groups for metrics** (:func:`item_groups`): ``new`` = targets with no training interaction, ``cold``
  = targets with ``1..t`` training interactions, where ``t`` is ``cold_item_threshold`` or, when that is unset,
  chosen from ``cold_item_quantile``: the smallest count such that the items with at most ``t`` training
  interactions hold at least that share of the training interactions (the long tail; on leave-one-out data
  about that share of the test rows falls on them).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from recbole_mm.data.sequence_build import sorted_unique


class HistoryIndex:
    """Items each user had before an evaluation target, from sorted ``user * n_items + item`` keys."""

    def __init__(self, keys: np.ndarray, n_items: int, n_users: int):
        keys = sorted_unique(np.asarray(keys, dtype=np.int64))  # np.unique: ~100x slower on numpy 2.4
        self.n_items = int(n_items)
        users = keys // self.n_items
        self.indptr = torch.as_tensor(np.searchsorted(users, np.arange(int(n_users) + 1)), dtype=torch.int64)
        self.items = torch.as_tensor(keys % self.n_items, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.items)

    def items_of(self, user: int) -> np.ndarray:
        return self.items[self.indptr[user] : self.indptr[user + 1]].numpy()

    def mask_index(self, users: torch.Tensor, targets: Optional[torch.Tensor] = None):
        """``(rows, items)`` to set to -inf in a ``[len(users), n_items]`` score matrix; ``targets[r]`` (the row's
        own target) is left out."""
        users = users.detach().to("cpu", torch.int64)
        starts, ends = self.indptr[users], self.indptr[users + 1]
        counts = ends - starts
        total = int(counts.sum())
        rows = torch.repeat_interleave(torch.arange(len(users)), counts)
        if total == 0:
            return rows, rows.clone()
        first = torch.repeat_interleave(starts - (torch.cumsum(counts, 0) - counts), counts)
        items = self.items[first + torch.arange(total)]
        if targets is not None:
            keep = items != targets.detach().to("cpu", torch.int64)[rows]
            rows, items = rows[keep], items[keep]
        return rows, items


def interaction_keys(users: np.ndarray, items: np.ndarray, n_items: int) -> np.ndarray:
    return np.asarray(users, dtype=np.int64) * int(n_items) + np.asarray(items, dtype=np.int64)


def cold_threshold(train_counts: np.ndarray, quantile: float) -> int:
    """The smallest count ``t`` such that items with ``1..t`` training interactions hold at least ``quantile`` of
    the training interactions."""
    counts = np.asarray(train_counts, dtype=np.int64)
    counts = np.sort(counts[counts > 0])
    if len(counts) == 0:
        return 0
    share = np.cumsum(counts) / counts.sum()
    return int(counts[min(np.searchsorted(share, float(quantile)), len(counts) - 1)])


def item_groups(train_counts: np.ndarray, threshold: Optional[int] = None, quantile: Optional[float] = None) -> dict:
    """``{"cold": bool[n_items], "new": bool[n_items]}`` (and the threshold used, as ``"cold_threshold"``)."""
    counts = torch.as_tensor(np.asarray(train_counts, dtype=np.int64))
    groups = {"new": counts == 0}
    if threshold is None and quantile is not None:
        threshold = cold_threshold(counts.numpy(), quantile)
    if threshold is not None:
        groups["cold"] = (counts >= 1) & (counts <= int(threshold))
        groups["cold_threshold"] = int(threshold)
    groups["new"][0] = False  # padding
    return groups


def hold_out_new_items(df, uid_field: str, iid_field: str, time_field: str, ratio: float, seed: int,
                       min_kept: int = 4):
    """Rows of ``df`` to keep under the new-item protocol, and the held-out item tokens.

    ``ratio`` of the items (drawn with ``seed``) become new: their interactions are dropped from every user's
    sequence except the user's last two (the valid and test positions of a leave-one-out split). A user left
    with fewer than ``min_kept`` interactions would not get both a valid and a test row from RecBole's split
    (sequential datasets need 4: one training example, valid and test; general ones 3), so one of the kept new
    items would become a training row: such a user loses all of its new-item rows instead.
    """
    import pandas as pd

    items = sorted_unique(df[iid_field].to_numpy())
    rng = np.random.default_rng(int(seed))
    n_new = int(round(float(ratio) * len(items)))
    new = np.sort(rng.choice(items, size=n_new, replace=False)) if n_new else items[:0]
    users = df[uid_field].to_numpy()
    # RecBole orders sequences by its float32 copy of the timestamps (ties keep file order): so do we, so that
    # "the user's last two" are the rows RecBole's leave-one-out split will take as valid and test
    times = df[time_field].to_numpy().astype(np.float32)
    order = np.lexsort((np.arange(len(df)), times, users))
    sorted_users = users[order]
    from_end = np.empty(len(df), dtype=np.int64)  # position counted from each user's end: 0 = test, 1 = valid
    from_end[order] = pd.Series(sorted_users).groupby(sorted_users).cumcount(ascending=False).to_numpy()
    is_new = np.isin(df[iid_field].to_numpy(), new)
    keep = ~is_new | (from_end < 2)
    kept_per_user = pd.Series(keep).groupby(users).transform("sum").to_numpy()
    keep &= ~(is_new & (kept_per_user < int(min_kept)))
    return keep, new


def check_leave_one_out(config, what: str) -> None:
    """``what`` (a protocol option) needs RecBole's leave-one-out split by time: a clear error otherwise."""
    args = config["eval_args"] or {}
    split, order = args.get("split") or {}, args.get("order")
    if split.get("LS") != "valid_and_test" or order != "TO":
        raise ValueError(
            f"{what} needs the leave-one-out split by time: eval_args: {{split: {{LS: valid_and_test}}, order: TO}} "
            f"(got split {split}, order {order}); RecBole's default for general models is a random 8:1:1 split")
