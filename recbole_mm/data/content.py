"""Item content (text, images, frozen features) aligned once to RecBole's internal item ids.

Where content lives in a dataset folder ``<data_path>/<name>/``:

- text: columns of ``<name>.item`` named by ``text_fields`` (joined with a space when several). Read here with
  pandas as plain UTF-8 strings, exactly as written; RecBole itself does not need to load them
  (``load_col``), so long texts never enter RecBole's batches.
- images: ``<image_dir>/<item_token>.<jpg|jpeg|png|webp|bmp|gif>``; resized once into the on-disk store of
  :mod:`recbole_mm.data.images` (JPEG tar shards ``image_store/<S>px-jpeg-q<Q>/`` by default, raw pixels
  ``image_store/<S>px/`` with ``image_store_format: raw``). Training batches of models that encode pixels carry
  their items' decoded pixels, decoded by :class:`ImageBatchCollate` in RecBole's DataLoader workers (``worker``),
  not in ``forward``; :class:`ItemImages` does the same for passes over the whole catalogue.
- frozen features: ``features/<encoder>/<stem>.npy`` + sidecar (:mod:`recbole_mm.data.features`), checked
  against the sidecar's sha256 when loaded (cached verdict); :attr:`ItemContent.loaded_feature_fingerprints`
  keeps the fingerprint of every file loaded (for checkpoints).

Alignment: RecBole numbers items by first appearance in ``.inter`` after filtering (not by token order), and
id 0 is ``[PAD]``. :class:`ItemContent` maps every internal id to its token once (``field2id_token``) and
gathers content by token. Row 0 is always padding: empty text, the placeholder image, a zero vector.
"""

from __future__ import annotations

import contextlib
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
    (158M rows for PixelRec), once for all the processes that call it together (the others wait for its
    :class:`~recbole_mm.atomic.BuildLock`, then read the list); later ones read ``.item`` and that small list
    (nothing is kept, and no lock is taken, when the folder is read-only)."""
    from recbole_mm.atomic import (BuildLock, atomic_write_json, leftover_temps, lock_path_for, read_json,
                                   remove_leftovers)

    def inter_items(path: str) -> list:
        st = os.stat(path)
        stamp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "field": item_field}
        sidecar = os.path.join(os.path.dirname(path), "dataset_cache", os.path.basename(path) + ".items.json")

        def cached():
            found = read_json(sidecar)
            return found["tokens"] if isinstance(found, dict) and found.get("stamp") == stamp else None

        found = cached()
        if found is not None:
            return found
        # First call after a conversion: one process reads the .inter (every DDP rank / trial may get here at
        # once); the others wait for the lock, then read the sidecar it wrote.
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(BuildLock(lock_path_for(sidecar), what=f"item list {sidecar}"))
                locked = True
            except OSError:  # read-only folder: no lock, no sidecar
                locked = False
            if locked:
                remove_leftovers(leftover_temps(sidecar), "item list", reason="temporary files")
                found = cached()  # written meanwhile by the process that held the lock?
                if found is not None:
                    return found
            found = sorted(set(read_atomic(path, [item_field], id_columns=[item_field])[item_field].tolist()))
            if locked:
                with contextlib.suppress(OSError):
                    atomic_write_json(sidecar, {"stamp": stamp, "tokens": found})
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
        self._batch = None  # (sorted ids, pixels, size) attached to the current training batch (batch_images)
        self._in_batch = False  # inside batch_images (the model's item pass over a training batch)
        self.batch_image_size: Optional[int] = None  # set when a tower asks for decoded pixels in the batches
        # images read from the store inside the model because the batch did not carry them (e.g. BCE negatives)
        self.store_reads_in_forward = 0
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
    def store_settings(self, size: Optional[int] = None) -> dict:
        """The image store of this run: ``size``, ``fmt`` (``image_store_format``), ``quality``
        (``image_store_quality``), ``workers`` (``image_store_workers``, ``None`` = the cores) and ``dir``."""
        from recbole_mm.data.images import FORMATS, store_folder_name

        size = int(size or self._cfg("image_size", 224))
        fmt = self._cfg("image_store_format", "jpeg") or "jpeg"
        if fmt not in FORMATS:
            raise ValueError(f"image_store_format must be one of {FORMATS}, got {fmt!r}")
        quality = int(self._cfg("image_store_quality", 90) or 90)
        if not 1 <= quality <= 95:
            raise ValueError(f"image_store_quality must be between 1 and 95 (PIL's useful range), got {quality}")
        workers = self._cfg("image_store_workers")
        root = self._cfg("image_store_dir") or os.path.join(self.dataset_dir, "image_store")
        return dict(size=size, fmt=fmt, quality=quality, workers=None if workers is None else int(workers),
                    dir=os.path.join(root, store_folder_name(size, fmt, quality)))

    def image_store(self, size: Optional[int] = None):
        """The dataset's image store (:class:`~recbole_mm.data.images.JpegImageStore` or the raw
        :class:`~recbole_mm.data.images.ImageStore`), built on first use."""
        from recbole_mm.data.images import JpegImageStore

        s = self.store_settings(size)
        catalogue = self._catalogue_tokens()
        if s["fmt"] == "raw":
            return ImageStore.open_or_build(self.image_dir(), s["dir"], s["size"], catalogue,
                                            workers=s["workers"] or 2)
        _mention_raw_store(os.path.join(os.path.dirname(s["dir"]), f"{s['size']}px"), s["dir"])
        return JpegImageStore.open_or_build(self.image_dir(), s["dir"], s["size"], catalogue, quality=s["quality"],
                                            workers=s["workers"])

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

    def image_rows(self, size: Optional[int] = None) -> tuple:
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

    def decode(self, item_ids, size: Optional[int] = None) -> torch.Tensor:
        """uint8 ``[n, S, S, 3]`` read from the store for internal item ids (any shape is flattened): the decoding
        itself, for DataLoader workers (:class:`ImageBatchCollate`, :class:`ItemImages`)."""
        store, rows = self.image_rows(size)
        ids = torch.as_tensor(item_ids).reshape(-1).cpu()
        return torch.from_numpy(store.decode_rows(rows[ids].numpy()))

    def request_batch_images(self, size: int) -> None:
        """Called by the towers that encode pixels (end-to-end image towers, uncached image taps): the training
        batches of this dataset should carry their items' decoded pixels of side ``size`` (:class:`ImageBatchCollate`).
        The store is opened here, before DataLoader workers fork, so that they share it."""
        self.image_rows(size)
        self.batch_image_size = int(size)

    @contextlib.contextmanager
    def batch_images(self, interaction):
        """While the block runs, :meth:`pixels` takes the pixels a collate step attached to ``interaction``
        (:func:`with_images`) instead of reading the store; ids the batch lacks (or every id, when nothing is
        attached) are read, and counted in :attr:`store_reads_in_forward`. Anything else (no images attached) changes nothing."""
        ids = getattr(interaction, "image_ids", None)
        previous = self._batch, self._in_batch
        self._batch = None if ids is None else (ids.cpu(), interaction.image_pixels, interaction.image_size)
        self._in_batch = True
        try:
            yield
        finally:
            self._batch, self._in_batch = previous

    def pixels(self, item_ids: torch.Tensor, size: Optional[int] = None) -> torch.Tensor:
        """uint8 images ``[n, S, S, 3]`` for internal item ids (any shape is flattened): from the batch's attached
        pixels inside :meth:`batch_images`, else read (and decoded) from the store here."""
        size = int(size or self._cfg("image_size", 224))
        flat = item_ids.reshape(-1).cpu()
        batch = self._batch
        if batch is not None and batch[2] == size and len(batch[0]):
            ids, px, _ = batch
            pos = torch.searchsorted(ids, flat).clamp(max=len(ids) - 1)
            found = ids[pos] == flat
            if bool(found.all()):
                return px[pos]
            out = torch.empty((len(flat), size, size, 3), dtype=torch.uint8)
            out[found] = px[pos[found]]
            lacking = flat[~found]
            self.store_reads_in_forward += int(torch.unique(lacking).numel())
            out[~found] = self.decode(lacking, size)
            return out
        if self._in_batch:  # a training batch without attached pixels (its loader was not wrapped)
            self.store_reads_in_forward += int(torch.unique(flat).numel())
        return self.decode(flat, size)

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



_MENTIONED: set = set()


def _mention_raw_store(raw_dir: str, jpeg_dir: str) -> None:
    """Once per process: an earlier release's raw-pixel store beside the JPEG store is not used (other format); say
    so, with its size, so that it can be removed (it is still read with ``image_store_format: raw``)."""
    pixels = os.path.join(raw_dir, "pixels.npy")
    if raw_dir in _MENTIONED or not os.path.isfile(pixels):
        return
    _MENTIONED.add(raw_dir)
    logger.info(f"a raw-pixel image store ({os.path.getsize(pixels) / 2**30:.2f} GB) is in {raw_dir}; this run uses the "
                f"JPEG store {jpeg_dir} (image_store_format: jpeg). Delete {raw_dir} unless runs with "
                "image_store_format: raw still use it")


def with_images(interaction, ids: torch.Tensor, pixels: torch.Tensor, size: int, sampled_negatives=None):
    """``interaction`` (a RecBole ``Interaction``) carrying the decoded pixels of its items: ``image_ids`` (sorted
    unique internal ids), ``image_pixels`` (uint8 ``[len(ids), S, S, 3]``) and ``image_size``.

    They are attributes, not fields: RecBole takes a batch's length from its fields, and ``len(ids)`` differs from
    the batch size. ``to(device)`` keeps them (the pixels stay on the CPU: the tower moves the rows it uses)."""
    out = _image_interaction_class()(interaction.interaction)
    out.image_ids, out.image_pixels, out.image_size = ids, pixels, int(size)
    out.sampled_negatives = sampled_negatives  # BCE negatives drawn by the collate step (or None)
    return out


_IMAGE_INTERACTION = None


def _image_interaction_class():
    """``ImageBatch``: a RecBole ``Interaction`` whose ``to`` keeps the attached images (built on first use: this
    module is importable without RecBole's data package loaded)."""
    global _IMAGE_INTERACTION
    if _IMAGE_INTERACTION is None:
        from recbole.data.interaction import Interaction

        class ImageBatch(Interaction):
            def to(self, device, selected_field=None):
                moved = super().to(device, selected_field)
                negatives = self.sampled_negatives
                return with_images(moved, self.image_ids, self.image_pixels, self.image_size,
                                   None if negatives is None else negatives.to(device))

            def __reduce__(self):  # picklable from DataLoader workers (a class defined in a function is not)
                return (with_images, (Interaction(self.interaction), self.image_ids, self.image_pixels,
                                      self.image_size, self.sampled_negatives))

        _IMAGE_INTERACTION = ImageBatch
    return _IMAGE_INTERACTION


class ImageBatchCollate:
    """A RecBole dataloader's ``collate_fn`` followed by decoding the batch's item images: runs where the collate
    runs, i.e. in torch DataLoader workers when RecBole's ``worker`` > 0 (in the main process, still outside
    ``forward``, with ``worker: 0``).

    The items are those of the batch's item fields (``item_id``, ``item_id_list``, ``neg_item_id`` when present),
    each decoded once. Nothing is attached until a tower asks for pixels (:meth:`ItemContent.request_batch_images`),
    so wrapping the loaders of a text-only model costs nothing.

    ``loss: bce`` (sequential models): the negatives are drawn here (:func:`sample_window_negatives`, attached as
    ``sampled_negatives``), so that their images are decoded with the batch's; the model uses them instead of
    drawing its own. Their generator is seeded by the run's ``seed`` and the batch's rows, so the draw does not
    depend on ``worker`` (nor on which worker collates the batch).
    """

    def __init__(self, collate_fn, content: "ItemContent", config, train_keys=None):
        self.collate_fn = collate_fn
        self.content = content
        self.item_fields = item_fields_of(config)
        self.user_field = cfg_get(config, "USER_ID_FIELD", "user_id")
        self.seed = int(cfg_get(config, "seed", 2020) or 0)
        self.bce = cfg_get(config, "loss") == "bce"
        self.train_keys = None if train_keys is None else torch.as_tensor(train_keys, dtype=torch.int64)

    def __call__(self, index):
        batch = self.collate_fn(index)
        size = self.content.batch_image_size
        inter = batch[0] if isinstance(batch, tuple) else batch
        if size is None or not hasattr(inter, "interaction"):
            return batch
        fields = inter.interaction
        parts = [fields[f].reshape(-1) for f in self.item_fields if f in fields]
        if not parts:
            return batch
        negatives = None
        item, seq = self.item_fields[0], self.item_fields[1]
        if self.bce and item in fields and seq in fields:
            window = torch.cat([fields[seq], fields[item].view(-1, 1)], 1)
            users = fields.get(self.user_field)
            negatives = sample_window_negatives(window, self.content.n_items, fields[seq].shape[1],
                                                _batch_generator(self.seed, index), users,
                                                self.train_keys if users is not None else None)
            parts.append(negatives.reshape(-1))
        ids = torch.unique(torch.cat(parts).long())
        out = with_images(inter, ids, self.content.decode(ids, size), size, negatives)
        return (out,) + batch[1:] if isinstance(batch, tuple) else out


def _batch_generator(seed: int, index) -> torch.Generator:
    """A generator seeded by the run's seed and the batch's rows (the same wherever the batch is collated)."""
    import hashlib

    rows = np.asarray(index, dtype=np.int64)
    digest = hashlib.sha256(np.int64(seed).tobytes() + rows.tobytes()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def sample_window_negatives(window: torch.Tensor, n_items: int, n_per_example: int, generator=None, users=None,
                            forbidden_keys=None, max_tries: int = 20) -> torch.Tensor:
    """``[B, n_per_example]`` ids drawn uniformly from ``1 .. n_items - 1``, redrawn (up to ``max_tries`` vectorised
    rounds) while they occur in the example's window (its items, any order) or, with ``users`` and ``forbidden_keys``
    (sorted ``user * n_items + item``), in the user's training items: the rule of the models' BCE negatives
    (:func:`recbole_mm.model.losses.sample_negatives`), drawn in the data layer so that a collate step can decode
    their images."""
    neg = torch.randint(1, n_items, (window.shape[0], n_per_example), generator=generator)
    keys_ok = forbidden_keys is not None and len(forbidden_keys) and users is not None
    for _ in range(max_tries):
        clash = (neg[:, :, None] == window[:, None, :]).any(-1)
        if keys_ok:
            keys = users[:, None].to(torch.int64) * n_items + neg
            pos = torch.searchsorted(forbidden_keys, keys).clamp(max=len(forbidden_keys) - 1)
            clash = clash | (forbidden_keys[pos] == keys)
        if not clash.any():
            break
        neg = neg.masked_scatter(clash, torch.randint(1, n_items, (int(clash.sum()),), generator=generator))
    return neg


class ItemImages(torch.utils.data.Dataset):
    """Decoded images of a list of internal item ids, one item per index: ``(id, uint8 [S, S, 3])``, for a torch
    ``DataLoader`` whose workers decode while the model encodes (catalogue passes, feature extraction)."""

    def __init__(self, content: "ItemContent", item_ids, size: Optional[int] = None):
        self.content = content
        self.item_ids = torch.as_tensor(item_ids, dtype=torch.long).reshape(-1)
        self.size = int(size or content._cfg("image_size", 224))
        content.image_rows(self.size)  # open (or build) the store before workers fork

    def __len__(self) -> int:
        return len(self.item_ids)

    def __getitem__(self, i):
        item = self.item_ids[i]
        return item, self.content.decode(item.view(1), self.size)[0]

    def __getitems__(self, indices):  # one call per batch (torch >= 2.1): rows decoded in file order
        ids = self.item_ids[torch.as_tensor(indices, dtype=torch.long)]
        return [(ids, self.content.decode(ids, self.size))]


def _collate_item_images(samples):
    if len(samples) == 1 and samples[0][0].dim() == 1:  # from __getitems__: already a batch
        return samples[0]
    return torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples])


def item_image_batches(content: "ItemContent", item_ids, batch_size: int, workers: int = 0,
                       size: Optional[int] = None):
    """Batches ``(ids [b], uint8 pixels [b, S, S, 3])`` of ``item_ids`` in order, decoded by ``workers`` DataLoader
    processes (0: in this process) while the caller encodes the previous batch."""
    data = ItemImages(content, item_ids, size)
    return torch.utils.data.DataLoader(data, batch_size=max(1, int(batch_size)), shuffle=False,
                                       num_workers=max(0, int(workers)), collate_fn=_collate_item_images,
                                       prefetch_factor=2 if workers else None, persistent_workers=False)


def item_fields_of(config) -> list:
    """The item fields of RecBole batches: ``item_id``, ``item_id_list`` and ``neg_item_id`` (from the config)."""
    item = cfg_get(config, "ITEM_ID_FIELD", "item_id")
    return [item, item + cfg_get(config, "LIST_SUFFIX", "_list"), cfg_get(config, "NEG_PREFIX", "neg_") + item]
