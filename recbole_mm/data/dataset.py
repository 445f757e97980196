"""Dataset classes: RecBole's ``Dataset`` / ``SequentialDataset`` plus item content and the papers' protocol.

What they add to RecBole's classes (nothing else changes):

- a dataset folder that does not exist is a clear error (RecBole would try to download it, offline, after a
  ``torch.distributed.barrier()``);
- ``keep_last_n`` (int, default ``None``): keep only each user's last N interactions (by time) before
  splitting, as the seed papers do with N = L + 3; items that then have no interaction leave the catalogue;
- :attr:`item_content`: the item text / images / frozen features of :mod:`recbole_mm.data.content`, aligned
  once to RecBole's internal item ids.
"""

from __future__ import annotations

import os

import numpy as np
from recbole.data.dataset import Dataset, SequentialDataset


class DatasetNotFoundError(FileNotFoundError):
    pass


class MMDatasetMixin:
    """Shared by :class:`MMDataset` and :class:`MMSequentialDataset` (see the module docstring)."""

    def _download(self):
        raise DatasetNotFoundError(
            f"dataset folder {self.dataset_path} does not exist. Convert raw data with `recbole-mm convert ...` "
            f"or point `data_path` at the folder that holds {self.dataset_name}/{self.dataset_name}.inter "
            f"(recbole_mm never downloads datasets)."
        )

    def _data_filtering(self):
        super()._data_filtering()
        keep_last_n = self.config["keep_last_n"]
        if keep_last_n:
            self._keep_last_n_per_user(int(keep_last_n))

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
        # The split datasets share the content of their parent (it is keyed by item id, not by interaction).
        if "_item_content" in self.__dict__:
            nxt.__dict__["_item_content"] = self.__dict__["_item_content"]
        return nxt


class MMDataset(MMDatasetMixin, Dataset):
    """RecBole ``Dataset`` with item content (general / context models)."""


class MMSequentialDataset(MMDatasetMixin, SequentialDataset):
    """RecBole ``SequentialDataset`` with item content (sequential models)."""


def dataset_folder_exists(config) -> bool:
    return os.path.isdir(config["data_path"])
