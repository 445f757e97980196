"""Item content (text, images, frozen features) aligned once to RecBole's internal item ids.

Where content lives in a dataset folder ``<data_path>/<name>/``:

- text: columns of ``<name>.item`` named by ``text_fields`` (joined with a space when several). Read here with
  pandas as plain UTF-8 strings, exactly as written; RecBole itself does not need to load them
  (``load_col``), so long texts never enter RecBole's batches.
- images: ``<image_dir>/<item_token>.<jpg|jpeg|png|webp|bmp|gif>``; decoded and resized once into the on-disk
  uint8 store of :class:`ImageStore` (``image_store/<S>px/``).
- frozen features: ``features/<encoder>/<stem>.npy`` + sidecar (:mod:`recbole_mm.data.features`), checked
  against the sidecar's sha256 when loaded (cached verdict); :attr:`ItemContent.loaded_feature_fingerprints`
  keeps the fingerprint of every file loaded (for checkpoints).

Alignment: RecBole numbers items by first appearance in ``.inter`` after filtering (not by token order), and
id 0 is ``[PAD]``. :class:`ItemContent` maps every internal id to its token once (``field2id_token``) and
gathers content by token. Row 0 is always padding: empty text, the placeholder image, a zero vector.
"""

from __future__ import annotations

import csv
import logging
import os
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import torch

from recbole_mm.data import features as feature_files
from recbole_mm.data.images import ImageStore
from recbole_mm.utils import cfg_get

logger = logging.getLogger(__name__)

PAD = "[PAD]"


def read_atomic(path: str, columns: Optional[Sequence[str]] = None, id_columns: Sequence[str] = ()) -> pd.DataFrame:
    """Read an atomic file (``.item``, ``.inter``, ...) as strings, names without the ``:type`` suffix.

    Texts are kept exactly (no quote processing, no NA guessing). ``id_columns`` are normalised the way
    RecBole reads ids (a token written as ``"q"`` is ``q``), so tokens match RecBole's ``field2id_token``.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"atomic file {path} does not exist")
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\r\n").lstrip("\ufeff").split("\t")
    names = [h.split(":")[0] for h in header]
    if columns is not None:
        missing = [c for c in columns if c not in names]
        if missing:
            raise KeyError(f"atomic file {path} has no column(s) {missing}; its columns are {names}")
    usecols = None if columns is None else [names.index(c) for c in columns]
    df = pd.read_csv(path, sep="\t", header=None, skiprows=1, names=names, usecols=usecols, dtype=str,
                     keep_default_na=False, quoting=csv.QUOTE_NONE, encoding="utf-8", engine="c")
    for col in id_columns:
        quoted = df[col].str.len().ge(2) & df[col].str.startswith('"') & df[col].str.endswith('"')
        if quoted.any():
            df.loc[quoted, col] = df.loc[quoted, col].str.slice(1, -1).str.replace('""', '"', regex=False)
    return df


def read_item_table(path: str, columns: Optional[Sequence[str]] = None, item_field: str = "item_id") -> pd.DataFrame:
    """The ``.item`` file as strings; ``item_field`` normalised as RecBole reads ids (:func:`read_atomic`)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"item file {path} does not exist (item text is read from it)")
    ids = [item_field] if columns is None or item_field in columns else []
    return read_atomic(path, columns, id_columns=ids)


def check_text_fields(fields: Sequence[str], item_path: str, item_field: str = "item_id") -> None:
    """A ``ValueError`` naming ``text_fields`` and the columns of ``item_path`` when ``fields`` cannot give texts:
    empty, or naming a column the file does not have."""
    if fields and all(isinstance(f, str) and f for f in fields) and not os.path.isfile(item_path):
        return  # read_item_table says the file is missing
    columns = _item_columns(item_path)
    text_columns = [c for c in columns if c != item_field]
    if not fields:
        raise ValueError(
            f"text_fields is empty, but this run needs item text (a text modality or text tokens): set text_fields "
            f"to one or more columns of {item_path} (config key text_fields, e.g. text_fields: "
            f"[{text_columns[0] if text_columns else 'title'}]); its columns: {text_columns}"
        )
    unknown = [f for f in fields if f not in columns or f == item_field]
    if unknown:
        raise ValueError(
            f"text_fields names {unknown}, not text column(s) of {item_path}; its columns: {text_columns} "
            f"(set text_fields to some of them)"
        )


def _item_columns(item_path: str) -> list[str]:
    if not os.path.isfile(item_path):
        return []
    with open(item_path, encoding="utf-8") as f:
        header = f.readline().rstrip("\r\n").lstrip("\ufeff").split("\t")
    return [h.split(":")[0] for h in header if h]


def join_text_fields(table: pd.DataFrame, fields: Sequence[str]) -> pd.Series:
    """Several text columns joined with a single space (empty ones skipped)."""
    joined = table[fields[0]]
    for f in fields[1:]:
        joined = joined.str.cat(table[f], sep=" ").str.strip()
    return joined


def catalogue_tokens(dataset_dir: str, name: str, item_field: str = "item_id", benchmark=None) -> list:
    """Every item token of a dataset folder, sorted: ``.item`` rows, ``.inter`` items and the items of the
    benchmark split files (``<name>.<suffix>.inter``). Independent of RecBole's filtering and id order.

    The item tokens of each ``.inter`` file are kept beside it in ``dataset_cache/<file>.items.json``, valid
    while the file keeps its size and mtime: only the first call after a conversion reads the whole ``.inter``
    (158M rows for PixelRec), later ones read ``.item`` and that small list (nothing is kept when the folder is
    read-only)."""
    from recbole_mm.atomic import atomic_write_json, read_json

    def inter_items(path: str) -> list:
        st = os.stat(path)
        stamp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "field": item_field}
        sidecar = os.path.join(os.path.dirname(path), "dataset_cache", os.path.basename(path) + ".items.json")
        cached = read_json(sidecar)
        if isinstance(cached, dict) and cached.get("stamp") == stamp:
            return cached["tokens"]
        found = sorted(set(read_atomic(path, [item_field], id_columns=[item_field])[item_field].tolist()))
        try:
            atomic_write_json(sidecar, {"stamp": stamp, "tokens": found})
        except OSError:
            pass
        return found

    tokens: set = set()
    paths = [os.path.join(dataset_dir, f"{name}.item"), os.path.join(dataset_dir, f"{name}.inter")]
    paths += [os.path.join(dataset_dir, f"{name}.{suffix}.inter") for suffix in (benchmark or [])]
    for path in paths:
        if os.path.isfile(path) and path.endswith(".inter"):
            tokens.update(inter_items(path))
        elif os.path.isfile(path):
            tokens.update(read_atomic(path, [item_field], id_columns=[item_field])[item_field].tolist())
    if not tokens:
        raise FileNotFoundError(f"no item tokens in {dataset_dir}: none of {[os.path.basename(p) for p in paths]} exists")
    return sorted(tokens)


class ItemContent:
    """Content of the items of one (filtered) RecBole dataset, by internal item id.

    Args:
        tokens: item token of each internal id (``tokens[0] == "[PAD]"``).
        dataset_dir: the dataset folder.
        dataset_name: its name (atomic files are ``<dataset_name>.<suffix>``).
        config: the run's Config (or a dict) for ``text_fields``, ``image_dir``, ``image_size``,
            ``image_store_dir``.
    """

    def __init__(self, tokens: Sequence[str], dataset_dir: str, dataset_name: str, config=None):
        self.tokens = np.asarray(tokens, dtype=object)
        if len(self.tokens) == 0 or self.tokens[0] != PAD:
            raise ValueError("tokens[0] must be RecBole's padding token '[PAD]'")
        self.dataset_dir = dataset_dir
        self.dataset_name = dataset_name
        self.config = config if config is not None else {}
        self._text_cache: dict = {}
        self._image_views: dict = {}
        # absolute path -> features.feature_fingerprint(...) of every feature file loaded through features()
        self.loaded_feature_fingerprints: dict[str, dict] = {}

    @classmethod
    def from_dataset(cls, dataset) -> "ItemContent":
        config = dataset.config
        tokens = dataset.field2id_token[dataset.iid_field]
        return cls(tokens, dataset.dataset_path, dataset.dataset_name, config)

    def _cfg(self, key, default=None):
        return cfg_get(self.config, key, default)

    @property
    def n_items(self) -> int:
        """Number of rows, padding included (RecBole's ``item_num``)."""
        return len(self.tokens)

    # ------------------------------------------------------------------ text
    def text(self, fields: Optional[Sequence[str]] = None) -> list[str]:
        """Item texts by internal id (``""`` for padding); several fields are joined with a space.

        ``fields``: columns of the ``.item`` file (default: the ``text_fields`` key). An empty list, or a column
        the file does not have, is a ``ValueError`` naming ``text_fields`` and the file's columns. Items missing
        from the ``.item`` file are an error naming the file and the first missing token.
        """
        fields = self._cfg("text_fields", ["title"]) if fields is None else fields
        fields = [fields] if isinstance(fields, str) else list(fields)
        key = tuple(fields)
        if key not in self._text_cache:
            path = os.path.join(self.dataset_dir, f"{self.dataset_name}.item")
            item_field = self._cfg("ITEM_ID_FIELD", "item_id")
            check_text_fields(fields, path, item_field)
            table = read_item_table(path, [item_field] + fields, item_field)
            table = table.drop_duplicates(subset=[item_field], keep="first")
            by_token = dict(zip(table[item_field], join_text_fields(table, fields)))
            missing = [t for t in self.tokens[1:] if t not in by_token]
            if missing:
                raise feature_files.FeatureFileError(
                    f"item file {path} has no row for {len(missing)} item(s) of the dataset; first missing token: "
                    f"{missing[0]!r}"
                )
            self._text_cache[key] = [""] + [by_token[t] for t in self.tokens[1:]]
        return self._text_cache[key]

    def tokenize(self, tokenizer, max_length: int, fields: Optional[Sequence[str]] = None, lowercase: bool = False):
        """``(input_ids, attention_mask)`` int64 tensors ``[n_items, max_length]`` (row 0 all zeros)."""
        texts = self.text(fields)
        if lowercase:
            texts = [t.lower() for t in texts]
        enc = tokenizer(texts[1:], padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
        ids = torch.zeros((self.n_items, max_length), dtype=torch.long)
        mask = torch.zeros((self.n_items, max_length), dtype=torch.long)
        ids[1:] = enc["input_ids"]
        mask[1:] = enc["attention_mask"]
        return ids, mask

    # ---------------------------------------------------------------- images
    def image_store(self, size: Optional[int] = None) -> ImageStore:
        size = int(size or self._cfg("image_size", 224))
        store_root = self._cfg("image_store_dir") or os.path.join(self.dataset_dir, "image_store")
        catalogue = self._catalogue_tokens()
        return ImageStore.open_or_build(self.image_dir(), os.path.join(store_root, f"{size}px"), size, catalogue)

    def _catalogue_tokens(self) -> list[str]:
        """Every item token of the dataset folder plus this dataset's (the image store covers them all)."""
        item_field = self._cfg("ITEM_ID_FIELD", "item_id")
        try:
            tokens = catalogue_tokens(self.dataset_dir, self.dataset_name, item_field, self._cfg("benchmark_filename"))
        except FileNotFoundError:
            tokens = []
        return sorted(set(tokens) | set(self.tokens[1:].tolist()))

    def image_dir(self) -> str:
        return os.path.join(self.dataset_dir, self._cfg("image_dir", "images"))

    def count_images(self) -> int:
        """How many items of this dataset have an image file in the dataset's image folder (files not checked)."""
        from recbole_mm.data.images import find_images

        files = find_images(self.image_dir())
        return sum(1 for t in self.tokens[1:] if t in files)

    def image_rows(self, size: Optional[int] = None) -> tuple[ImageStore, torch.Tensor]:
        """The image store and, per internal id, its row there (0 = placeholder: padding, missing, corrupt)."""
        size = int(size or self._cfg("image_size", 224))
        if size not in self._image_views:
            store = self.image_store(size)
            rows = store.rows_for(self.tokens[1:].tolist())
            n_placeholder = int((rows == 0).sum())
            if n_placeholder:
                names = [t for t, r in zip(self.tokens[1:], rows) if r == 0][:5]
                logger.warning(
                    f"{n_placeholder} of {len(rows)} items of {self.dataset_name} have no usable image and use "
                    f"the placeholder (first: {', '.join(map(str, names))})"
                )
            self._image_views[size] = (store, torch.from_numpy(np.concatenate([[0], rows]).astype(np.int64)))
        return self._image_views[size]

    def pixels(self, item_ids: torch.Tensor, size: Optional[int] = None) -> torch.Tensor:
        """uint8 images ``[n, S, S, 3]`` for internal item ids (any shape is flattened)."""
        store, rows = self.image_rows(size)
        return store.read(rows[item_ids.reshape(-1).cpu()])

    # -------------------------------------------------------------- features
    def feature_rows(self, npy_path: str) -> tuple[np.ndarray, np.ndarray, dict]:
        """Memory-mapped feature file, its row per internal id (-1 for padding) and its sidecar.

        The file is checked against its sidecar (shape, dtype, size, then sha256 through the cached verdict of
        :func:`~recbole_mm.data.features.verify_sha256`); its fingerprint is kept in
        :attr:`loaded_feature_fingerprints`.
        """
        array, side = feature_files.open_features(npy_path)
        digest = feature_files.verify_sha256(npy_path, side)
        rows = feature_files.align_rows(side["tokens"], self.tokens.tolist(), source=f"feature file {npy_path}")
        self.loaded_feature_fingerprints[os.path.abspath(npy_path)] = feature_files.feature_fingerprint(
            npy_path, side, sha256=digest)
        return array, rows, side

    def features(self, npy_path: str, dtype=np.float32) -> torch.Tensor:
        """Feature file aligned to internal ids: tensor ``[n_items, ...]`` with row 0 all zeros.

        A file whose bytes differ from its sidecar's sha256 is a :class:`~recbole_mm.data.features.FeatureFileError`;
        the fingerprint of the loaded file is recorded in :attr:`loaded_feature_fingerprints` (path -> dict).
        """
        array, rows, _ = self.feature_rows(npy_path)
        out = np.zeros((self.n_items,) + array.shape[1:], dtype=dtype)
        valid = rows >= 0
        order = np.argsort(rows[valid], kind="stable")  # read the memory map in file order
        ids = np.nonzero(valid)[0][order]
        out[ids] = array[rows[valid][order]]
        return torch.from_numpy(out)

    def feature_lookup(self, npy_path: str) -> "FeatureLookup":
        """Like :meth:`features` but reading rows on demand from the memory map (token features ``[n, T, d]``
        are too large to hold in memory for big catalogues): ``lookup(ids) -> float32 tensor``."""
        array, rows, side = self.feature_rows(npy_path)
        return FeatureLookup(array, rows, side)


class FeatureLookup:
    """Rows of a memory-mapped feature file by internal item id (row of padding = zeros), as float32 tensors."""

    def __init__(self, array: np.ndarray, rows: np.ndarray, sidecar: Optional[dict] = None):
        self.array = array
        self.rows = rows
        self.sidecar = dict(sidecar or {})
        self.shape = (len(rows),) + tuple(array.shape[1:])

    def __call__(self, item_ids: torch.Tensor) -> torch.Tensor:
        ids = item_ids.reshape(-1).cpu().numpy()
        rows = self.rows[ids]
        out = np.zeros((len(ids),) + self.shape[1:], dtype=np.float32)
        real = rows >= 0
        if real.any():
            order = np.argsort(rows[real], kind="stable")  # read the memory map in file order
            picked = np.nonzero(real)[0][order]
            out[picked] = self.array[rows[real][order]]
        return torch.from_numpy(out).view(*item_ids.shape, *self.shape[1:])

