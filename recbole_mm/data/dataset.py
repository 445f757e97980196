"""Dataset classes: RecBole's ``Dataset`` / ``SequentialDataset`` plus item content and the papers' protocol.

What they add to RecBole's classes (nothing else changes):

- a dataset folder that does not exist is a clear error (RecBole would try to download it, offline, after a
  ``torch.distributed.barrier()``);
- ``keep_last_n`` (int, default ``None``): keep only each user's last N interactions (by time) before
  splitting, as the seed papers do with N = L + 3; items that then have no interaction leave the catalogue;
- :attr:`item_content`: the item text / images / frozen features of :mod:`recbole_mm.data.content`, aligned
  once to RecBole's internal item ids;
- (sequential) ``train_item_counts`` on every split: interactions per item in the training split (for logQ
  corrections and cold-item metrics); ``train_user_item_keys``: the sorted ``user * item_num + item`` keys of
  the training interactions (negatives outside a user's training sequence); ``seq_mode``: the mode applied;
- (sequential) the seed papers' all-position training data: when the model class has
  ``supports_all_position`` and ``seq_mode: all_position``, the training split keeps one example per window of
  ``L + 1`` items (``L = MAX_ITEM_LIST_LENGTH``): for each user, the prefix examples whose target is the
  user's last training item, the one ``L`` before it, and so on. Each example is then trained at every
  position, so every training target is predicted exactly once per epoch, with up to ``L`` items of history
  (with ``keep_last_n: L + 3`` this is exactly the originals' one example per user).
"""

from __future__ import annotations

import numpy as np
from recbole.data.dataset import Dataset, SequentialDataset


class DatasetNotFoundError(FileNotFoundError):
    pass


def missing_folder_message(path: str, name: str) -> str:
    return (
        f"dataset folder {path} does not exist. Convert raw data with `recbole-mm convert ...`, or set data_path "
        f"to the folder that holds {name}/{name}.inter (recbole_mm never downloads datasets)."
    )


class MMDatasetMixin:
    """Shared by :class:`MMDataset` and :class:`MMSequentialDataset` (see the module docstring)."""

    def _download(self):
        raise DatasetNotFoundError(missing_folder_message(self.dataset_path, self.dataset_name))

    def _data_filtering(self):
        super()._data_filtering()
        keep_last_n = self.config["keep_last_n"]
        if keep_last_n:
            self._keep_last_n_per_user(int(keep_last_n))
        ratio = self.config["new_item_ratio"]
        if ratio:
            self._hold_out_new_items(float(ratio))

    def _hold_out_new_items(self, ratio: float) -> None:
        from recbole_mm.data.protocol import check_leave_one_out, hold_out_new_items

        check_leave_one_out(self.config, "new_item_ratio")
        if not 0.0 < ratio < 1.0:
            raise ValueError(f"new_item_ratio must be in (0, 1), got {ratio}")
        if self.uid_field is None or self.time_field is None or self.time_field not in self.inter_feat:
            raise ValueError("new_item_ratio needs the user id and timestamp fields loaded (load_col.inter)")
        df = self.inter_feat
        min_kept = 4 if isinstance(self, SequentialDataset) else 3
        keep, new = hold_out_new_items(df, self.uid_field, self.iid_field, self.time_field, ratio,
                                       int(self.config["seed"] or 0), min_kept=min_kept)
        self.inter_feat = df[keep]
        self._reset_index()
        self.new_item_tokens = [str(t) for t in new]
        self.logger.info(f"new_item_ratio={ratio}: {len(new)} items held out of training; "
                         f"kept {int(keep.sum())} of {len(keep)} interactions")

    def _keep_last_n_per_user(self, n: int) -> None:
        if self.uid_field is None or self.time_field is None or self.time_field not in self.inter_feat:
            raise ValueError("keep_last_n needs the user id and timestamp fields loaded (load_col.inter)")
        df = self.inter_feat
        before = len(df)
        order = np.lexsort((np.arange(len(df)), df[self.time_field].to_numpy(), df[self.uid_field].to_numpy()))
        df = df.iloc[order]
        from_end = df.groupby(self.uid_field, sort=False).cumcount(ascending=False).to_numpy()
        df = df[from_end < n]
        self.inter_feat = df
        self._reset_index()
        self.logger.info(f"keep_last_n={n}: kept {len(self.inter_feat)} of {before} interactions")

    @property
    def item_content(self):
        """:class:`~recbole_mm.data.content.ItemContent` of this dataset (built once, not pickled)."""
        content = self.__dict__.get("_item_content")
        if content is None:
            from recbole_mm.data.content import ItemContent

            content = ItemContent.from_dataset(self)
            self.__dict__["_item_content"] = content
        return content

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_item_content", None)
        return state

    def copy(self, new_inter_feat):
        nxt = super().copy(new_inter_feat)
        # The split datasets share their parent's content (keyed by item id; creating it reads nothing yet).
        nxt.__dict__["_item_content"] = self.item_content
        return nxt


class MMDataset(MMDatasetMixin, Dataset):
    """RecBole ``Dataset`` with item content (general / context models)."""


class MMSequentialDataset(MMDatasetMixin, SequentialDataset):
    """RecBole ``SequentialDataset`` with item content, training counts and all-position windows."""

    def build(self):
        datasets = super().build()
        train = datasets[0]
        counts = _count_training_items(train)
        keys = training_user_item_keys(train)
        mode = seq_mode_of(self.config)
        if mode == "all_position" and _check_all_position(self.config):
            train = train.copy(train.inter_feat[_window_ends(train)])
            datasets = [train] + list(datasets[1:])
        for d in datasets:
            d.train_item_counts = counts
            d.train_user_item_keys = keys
            d.seq_mode = mode
        _attach_history(datasets, keys)
        self._check_new_items_untrained(counts)
        return datasets

    def _check_new_items_untrained(self, counts: np.ndarray) -> None:
        tokens = getattr(self, "new_item_tokens", None)
        if not tokens:
            return
        token_id = self.field2token_id[self.iid_field]
        leaked = [t for t in tokens if t in token_id and counts[token_id[t]]]
        if leaked:  # an invariant of the hold-out: a bug if it fails
            raise RuntimeError(f"new_item_ratio: held-out items reached the training split: {leaked[:5]}")


def _attach_history(datasets, train_keys: np.ndarray) -> None:
    """``history_index`` of the evaluation splits (:mod:`recbole_mm.data.protocol`): valid = the training items,
    test = the training items and the valid target."""
    from recbole_mm.data.protocol import HistoryIndex, interaction_keys

    if len(datasets) < 2:
        return
    train = datasets[0]
    known = train_keys
    for d in datasets[1:]:
        d.history_index = HistoryIndex(known, train.item_num, train.user_num)
        targets = interaction_keys(d.inter_feat[d.uid_field].numpy(), d.inter_feat[d.iid_field].numpy(), train.item_num)
        known = np.union1d(known, targets)


DEFAULT_SEQ_MODE = "prefix"


def seq_mode_of(config) -> str:
    """The sequence mode of a run (``seq_mode``; RecBole's ``prefix`` when unset): one default for data and model."""
    return config["seq_mode"] or DEFAULT_SEQ_MODE


def _check_all_position(config) -> bool:
    from recbole_mm.registry import model_class_of

    model_cls = model_class_of(config)
    if not getattr(model_cls, "supports_all_position", False):
        raise ValueError(f"seq_mode: all_position needs a model that trains at every position; {config['model']} "
                         f"does not (use seq_mode: prefix)")
    return True


def _count_training_items(train) -> np.ndarray:
    """Interactions per item in a sequential training split: each example's target, plus each user's first
    item (the history of the examples with one history item)."""
    iid = train.iid_field
    n = train.item_num
    targets = train.inter_feat[iid].numpy()
    seq = train.inter_feat[train.item_id_list_field].numpy()
    length = train.inter_feat[train.item_list_length_field].numpy()
    firsts = seq[length == 1, 0]
    return np.bincount(targets, minlength=n) + np.bincount(firsts, minlength=n)


def training_user_item_keys(train) -> np.ndarray:
    """Sorted unique ``user * item_num + item`` of every training interaction (targets and first items)."""
    uid, iid = train.uid_field, train.iid_field
    users = train.inter_feat[uid].numpy()
    targets = train.inter_feat[iid].numpy()
    seq = train.inter_feat[train.item_id_list_field].numpy()
    first = train.inter_feat[train.item_list_length_field].numpy() == 1
    all_users = np.concatenate([users, users[first]]).astype(np.int64)
    all_items = np.concatenate([targets, seq[first, 0]]).astype(np.int64)
    return np.unique(all_users * train.item_num + all_items)


def _window_ends(train) -> np.ndarray:
    """Boolean row mask: the prefix examples that end a window of L + 1 items (counted from each user's end)."""
    import pandas as pd

    users = train.inter_feat[train.uid_field].numpy()
    if train.time_field in train.inter_feat:
        times = train.inter_feat[train.time_field].numpy()
        order = np.lexsort((np.arange(len(users)), times, users))
    else:
        order = np.arange(len(users))
    ranks = pd.Series(users[order]).groupby(users[order]).cumcount(ascending=False).to_numpy()
    keep = np.zeros(len(users), dtype=bool)
    keep[order] = ranks % train.max_item_list_len == 0
    return keep


def train_item_counts(dataset) -> np.ndarray:
    """``train_item_counts`` of a split made by :class:`MMSequentialDataset`, else counted from its rows."""
    counts = getattr(dataset, "train_item_counts", None)
    return counts if counts is not None else _count_training_items(dataset)
