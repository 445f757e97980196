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

import os

import numpy as np
import torch
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

    def __init__(self, config):
        # The atomic files this dataset is made from (size, mtime), taken before they are read: saved dataloaders
        # (data_preparation) and saved datasets made from other files are not used.
        from recbole_mm.data.sequence_build import file_fingerprints

        self.source_files = file_fingerprints(config["data_path"], config["dataset"])
        super().__init__(config)

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

    def _load_feat(self, filepath, source):
        """RecBole's loader, with pandas' C parser for the ``.inter`` file: RecBole asks for the Python parser
        (~20 s per million rows on this machine: about an hour for PixelRec's 158M). Same DataFrame: float columns
        are tokenised by the C parser and converted as the Python parser converts them
        (:class:`~recbole_mm.data.csv_read.PythonEngineFloats`); ``.item`` / ``.user`` files (free text) keep RecBole's parser.

        Thread-safe: RecBole's module sees :class:`~recbole_mm.data.csv_read.CParserPandas` (installed once), which uses the C parser only
        in the thread that is inside this method; other threads' reads (any dataset class) are untouched."""
        from recbole.utils import FeatureSource

        if source != FeatureSource.INTERACTION or len(self.config["field_separator"] or "") != 1:
            return super()._load_feat(filepath, source)
        from recbole_mm.data.csv_read import c_parser_for_this_thread

        with c_parser_for_this_thread():
            return super()._load_feat(filepath, source)

    def _dataframe_to_interaction(self, data):
        """RecBole's conversion, without a second copy of plain token / float columns: ``torch.from_numpy`` of the
        int64 / float32 values RecBole's ``LongTensor`` / ``FloatTensor`` make (sharing an int64 column's memory
        with the DataFrame this replaces). Other columns go through RecBole's code."""
        from recbole.data.interaction import Interaction
        from recbole.utils import FeatureType

        numerical = set(self.config["numerical_features"] or [])
        fast, rest = {}, []
        for k in data:
            ftype, values = self.field2type[k], data[k].values
            dtype = {FeatureType.TOKEN: np.int64, FeatureType.FLOAT: np.float32}.get(ftype)
            if dtype is None or k in numerical or not isinstance(values, np.ndarray) or values.dtype.kind not in "biuf":
                rest.append(k)
                continue
            arr = np.ascontiguousarray(values, dtype=dtype)
            if not arr.flags.writeable:
                arr = arr.copy()
            fast[k] = torch.from_numpy(arr)
        if not rest:
            return Interaction(fast)
        slow = super()._dataframe_to_interaction(data[rest]).interaction
        return Interaction({k: fast[k] if k in fast else slow[k] for k in data})

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
    """RecBole ``SequentialDataset`` with item content, training counts and all-position windows.

    ``build()`` makes RecBole's sequence fields and splits with array operations and keeps them in a memory-mapped
    cache shared by every process (:mod:`recbole_mm.data.sequence_build`; ``dataset_cache``,
    ``dataset_cache_dir``): same rows, order, values and dtypes as RecBole's. After ``build()`` this dataset's
    own ``inter_feat`` holds the same rows as RecBole's in split order (train, valid, test) rather than time
    order. Splits the cache does not reproduce (``TS``, benchmark files) run RecBole's code, with the vectorised
    :meth:`data_augmentation`.
    """

    def build(self):
        cached = self._build_from_cache()
        mode = seq_mode_of(self.config)
        if cached is not None:
            datasets, counts, keys = cached
        else:
            datasets = super().build()
            train = datasets[0]
            counts = _count_training_items(train)
            keys = training_user_item_keys(train)
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

    def data_augmentation(self):
        """RecBole's ``data_augmentation`` (same Interaction: rows, order, fields, dtypes) without its per-row loop."""
        from recbole.data.interaction import Interaction

        from recbole_mm.data.sequence_build import augmentation_plan, gather_lists

        self._aug_presets()
        self._check_field("uid_field", "time_field")
        if self.time_field not in self.inter_feat:
            return super().data_augmentation()  # RecBole's own error
        max_len = self.config["MAX_ITEM_LIST_LENGTH"]
        columns = {k: self.inter_feat[k].numpy() for k in self.inter_feat}
        order, targets, starts, lengths = augmentation_plan(columns[self.uid_field], columns[self.time_field], max_len)
        base = order[targets]
        new = {k: torch.from_numpy(v[base]) for k, v in columns.items()}
        new[self.item_list_length_field] = torch.from_numpy(lengths)
        for k, v in columns.items():
            if k != self.uid_field:
                lists = gather_lists(v[order], starts, lengths, max_len)
                new[getattr(self, f"{k}_list_field")] = torch.from_numpy(lists)
        self.inter_feat = Interaction(new)

    def _build_from_cache(self):
        """``(splits, train_item_counts, train_user_item_keys)`` from the dataset cache (built on first use), or
        ``None`` when the cache is off or does not apply (RecBole's ``build()`` then runs)."""
        import pandas as pd
        from recbole.data.interaction import Interaction

        from recbole_mm.data import sequence_build as sb

        config = self.config
        if config["dataset_cache"] is False or self.benchmark_filename_list is not None:
            return None
        eval_args = config["eval_args"]
        if eval_args["order"] != "TO" or not sb.supported_split(eval_args["split"], eval_args["group_by"]):
            return None
        if not isinstance(self.inter_feat, pd.DataFrame) or self.uid_field is None or self.time_field is None:
            return None
        if self.uid_field not in self.inter_feat or self.time_field not in self.inter_feat:
            return None
        windows = seq_mode_of(config) == "all_position" and _check_all_position(config)
        Dataset._change_feat_format(self)  # base fields to tensors; the augmentation comes from the cache
        self._aug_presets()
        columns = {k: self.inter_feat[k].numpy() for k in self.inter_feat}
        list_fields = {k: getattr(self, f"{k}_list_field") for k in columns if k != self.uid_field}
        max_len = int(config["MAX_ITEM_LIST_LENGTH"])
        build_kwargs = dict(uid=self.uid_field, iid=self.iid_field, time=self.time_field, max_len=max_len,
                            list_fields=list_fields, length_field=self.item_list_length_field,
                            split_args=eval_args["split"], group_by=eval_args["group_by"], windows=windows,
                            item_num=int(self.item_num))
        settings = {k: v for k, v in build_kwargs.items()}
        key = sb.cache_key(columns, settings, sb.file_fingerprints(self.dataset_path, self.dataset_name))
        root = config["dataset_cache_dir"] or os.path.join(self.dataset_path, "dataset_cache")
        folder, meta, built = sb.load_or_build(root, key, dict(build_kwargs, columns=columns), log=self.logger)
        del columns
        self.dataset_cache_folder, self.dataset_cache_built = folder, built
        self.logger.info(f"dataset cache {'built' if built else 'reused'}: {folder}")

        self.inter_feat = Interaction({f: torch.from_numpy(sb.load_array(os.path.join(folder, f + ".npy")))
                                       for f in meta["fields"]})
        self._drop_unused_col()
        bounds = np.cumsum([0] + [meta["blocks"][b] for b in sb.BLOCKS])
        full = self.inter_feat.interaction
        splits = [self.copy(Interaction({k: v[bounds[i]:bounds[i + 1]] for k, v in full.items()}))
                  for i in range(3)]
        counts = np.load(os.path.join(folder, "train_item_counts.npy"))
        keys = sb.load_array(os.path.join(folder, "train_user_item_keys.npy"))
        return splits, counts, keys

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
    from recbole_mm.data.sequence_build import sorted_unique

    if len(datasets) < 2:
        return
    train = datasets[0]
    known = train_keys
    for d in datasets[1:]:
        d.history_index = HistoryIndex(known, train.item_num, train.user_num)
        targets = interaction_keys(d.inter_feat[d.uid_field].numpy(), d.inter_feat[d.iid_field].numpy(), train.item_num)
        known = sorted_unique(np.concatenate([known, targets]))  # np.union1d, by a sort (see sorted_unique)


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
    from recbole_mm.data.sequence_build import sorted_unique

    uid, iid = train.uid_field, train.iid_field
    users = train.inter_feat[uid].numpy()
    targets = train.inter_feat[iid].numpy()
    seq = train.inter_feat[train.item_id_list_field].numpy()
    first = train.inter_feat[train.item_list_length_field].numpy() == 1
    all_users = np.concatenate([users, users[first]]).astype(np.int64)
    all_items = np.concatenate([targets, seq[first, 0]]).astype(np.int64)
    return sorted_unique(all_users * train.item_num + all_items)


def _window_ends(train) -> np.ndarray:
    """Boolean row mask: the prefix examples that end a window of L + 1 items (counted from each user's end)."""
    from recbole_mm.data.sequence_build import window_end_mask

    users = train.inter_feat[train.uid_field].numpy()
    times = train.inter_feat[train.time_field].numpy() if train.time_field in train.inter_feat else None
    return window_end_mask(users, times, train.max_item_list_len)


def train_item_counts(dataset) -> np.ndarray:
    """``train_item_counts`` of a split made by :class:`MMSequentialDataset`, else counted from its rows."""
    counts = getattr(dataset, "train_item_counts", None)
    return counts if counts is not None else _count_training_items(dataset)
