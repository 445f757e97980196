"""Sequential training data built with numpy and cached as memory maps: RecBole's sequence fields without a loop.

RecBole 1.2.1's ``SequentialDataset.data_augmentation`` makes one example per interaction but each user's first
(``item_id_list`` = the up to ``MAX_ITEM_LIST_LENGTH`` previous items, ``item_length``, and a ``<field>_list`` of
every other ``.inter`` field) with a Python loop: ~27 us and ~490 B per interaction, i.e. an hour and 55-78 GB for
158M interactions, in every process that builds the dataset (DDP ranks, tuning trials). Then ``build()`` sorts
by time, groups by user with another loop, and copies every split out of the full table.

This module computes the same thing with array operations, and (:func:`load_or_build`) publishes it once as
``.npy`` files that every process memory-maps:

- :func:`augmentation_plan`: sort by (user, time) as RecBole does (stable: ties keep the file order), each
  row's position in its user's sequence; the examples are the rows at position >= 1, with history length
  ``min(position, L)`` starting ``length`` rows earlier (RecBole's sliding window, truncated from the left).
- :func:`gather_lists`: the ``[n, L, ...]`` list fields by chunked gathers (left-aligned, zero padding).
- :func:`split_blocks`: RecBole's ``build()`` (time order, then ``LS`` leave-one-out / ``RS`` ratios per user or
  overall) as index arrays; then the seed papers' all-position windows of the training split
  (:func:`window_end_mask`).
- The cache folder ``<dataset_cache_dir>/seq-<key>`` holds one ``.npy`` per field with the rows of all splits
  one after the other (training rows kept, valid, test, training rows the all-position mode leaves out), so
  that each split is a slice of the memory map (no copy), plus the training item counts and user-item keys.
  Its key hashes the exact input arrays (after RecBole's filtering and id remapping), the size and mtime of the
  atomic files, and every config key the build reads: a re-converted ``.inter`` or another
  ``MAX_ITEM_LIST_LENGTH`` makes a new folder, never a stale read. It is built under
  :class:`recbole_mm.atomic.FolderBuild` (one builder, atomic rename, leftovers of a killed build removed).

Results are identical to RecBole's (rows, order, values, dtypes): see tests/test_dataset_build.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Optional, Sequence

import numpy as np

logger = logging.getLogger(__name__)

CACHE_VERSION = 1
META = "meta.json"
#: elements gathered per chunk of a list field (bounds the builder's scratch memory to ~100 MB per chunk)
CHUNK_ELEMENTS = 1 << 23
BLOCKS = ("train", "valid", "test", "train_rest")


# ------------------------------------------------------------------------------------------------ the arrays
def sorted_unique(values: np.ndarray) -> np.ndarray:
    """``np.unique`` of a 1-d array by sorting (numpy 2.3+'s hash-based ``np.unique`` is ~100x slower than a sort
    on 1M int64 keys on this stack)."""
    s = np.sort(np.asarray(values), kind="stable")
    if len(s) < 2:
        return s
    keep = np.ones(len(s), dtype=bool)
    keep[1:] = s[1:] != s[:-1]
    return s[keep]


def augmentation_plan(users: np.ndarray, times: np.ndarray, max_len: int):
    """RecBole's sequential examples as index arrays.

    Args:
        users: user id per interaction, ``[N]``.
        times: timestamp per interaction, ``[N]`` (the values RecBole sorts: its float32 tensor).
        max_len: ``MAX_ITEM_LIST_LENGTH``.

    Returns:
        ``(order, targets, starts, lengths)``: ``order[p]`` = the interaction at sorted position ``p`` (by user,
        then time, ties in file order: RecBole's two stable sorts); ``targets`` = sorted positions of the
        examples (every position but each user's first, increasing: RecBole's row order); ``starts`` and
        ``lengths`` = sorted position and length of each example's history.
    """
    n = len(users)
    order = np.lexsort((times, users))  # stable: equal (user, time) keep the file order
    sorted_users = users[order]
    new_user = np.ones(n, dtype=bool)
    if n > 1:
        new_user[1:] = sorted_users[1:] != sorted_users[:-1]
    positions = np.arange(n, dtype=np.int64)
    user_start = np.maximum.accumulate(np.where(new_user, positions, 0))
    rank = positions - user_start
    del positions, user_start, sorted_users
    targets = np.flatnonzero(rank >= 1)
    lengths = np.minimum(rank[targets], max_len).astype(np.int64)
    starts = targets - lengths
    return order, targets, starts, lengths


def gather_lists(values: np.ndarray, starts: np.ndarray, lengths: np.ndarray, max_len: int,
                 out: Optional[np.ndarray] = None, progress: str = "") -> np.ndarray:
    """``out[r, :lengths[r]] = values[starts[r]:starts[r] + lengths[r]]``, zeros after (RecBole's list fields).

    ``values`` may have trailing dimensions (sequence fields, numerical features); ``out`` (e.g. a memory map)
    is filled in chunks of rows, so the scratch memory stays ~:data:`CHUNK_ELEMENTS` elements.
    """
    m = len(starts)
    tail = values.shape[1:]
    if out is None:
        out = np.zeros((m, max_len) + tail, dtype=values.dtype)
    per_row = max_len * max(1, int(np.prod(tail, dtype=np.int64)))
    step = max(1, CHUNK_ELEMENTS // per_row)
    cols = np.arange(max_len, dtype=np.int64)
    chunks = range(0, m, step)
    if progress and len(chunks) > 4:
        from tqdm import tqdm

        chunks = tqdm(chunks, desc=progress, unit="chunk", leave=False)
    for a in chunks:
        b = min(a + step, m)
        idx = starts[a:b, None] + cols[None, :]
        valid = cols[None, :] < lengths[a:b, None]
        np.minimum(idx, len(values) - 1, out=idx)  # padded slots read some row, then are zeroed
        block = values[idx]
        block[~valid] = 0
        out[a:b] = block
    return out


def calcu_split_ids(tot: int, ratios: Sequence[float]) -> list:
    """RecBole's ``Dataset._calcu_split_ids`` (it uses nothing of the dataset)."""
    from recbole.data.dataset import Dataset

    return Dataset._calcu_split_ids(None, tot=tot, ratios=ratios)


def _group_ranks(users: np.ndarray):
    """RecBole's ``_grouped_index``: users in order of first appearance, each user's rows in row order.

    Returns ``(grouped, pos, count)``: the rows in grouped order, each one's position in its group and its
    group's size."""
    n = len(users)
    by_user = np.argsort(users, kind="stable")
    s = users[by_user]
    starts = np.ones(n, dtype=bool)
    if n > 1:
        starts[1:] = s[1:] != s[:-1]
    inverse = np.empty(n, dtype=np.int64)
    inverse[by_user] = np.cumsum(starts) - 1  # user's number, by user id
    first = by_user[starts]  # first row of each user (stable sort)
    grouped = np.argsort(first[inverse], kind="stable")
    counts = np.bincount(inverse, minlength=len(first))
    g_users = inverse[grouped]
    new = np.ones(n, dtype=bool)
    if n > 1:
        new[1:] = g_users[1:] != g_users[:-1]
    positions = np.arange(n, dtype=np.int64)
    pos = positions - np.maximum.accumulate(np.where(new, positions, 0))
    return grouped, pos, counts[g_users]


def supported_split(split_args, group_by) -> bool:
    """Whether :func:`split_rows` reproduces this ``eval_args`` split (else RecBole's own code runs)."""
    if not isinstance(split_args, dict) or len(split_args) != 1:
        return False
    mode, value = next(iter(split_args.items()))
    if mode == "LS":
        return value in ("valid_and_test", "valid_only", "test_only")
    if mode == "RS":
        return isinstance(value, list) and (group_by is None or str(group_by).lower() in ("none", "user"))
    return False


def split_rows(users: np.ndarray, split_args: dict, group_by) -> Optional[list]:
    """RecBole's split of rows already in time order: a list of index arrays (train, valid, test).

    ``LS`` (valid_and_test / valid_only / test_only) and ``RS`` (per user or overall); ``None`` for anything
    else (the caller then uses RecBole's own code)."""
    mode = list(split_args)[0]
    if mode == "LS":
        leave = {"valid_and_test": 2, "valid_only": 1, "test_only": 1}.get(split_args["LS"])
        if leave is None:
            return None
        grouped, pos, count = _group_ranks(users)
        from_end = count - 1 - pos
        legal = np.minimum(leave, count - 1)
        part = np.where(from_end >= legal, 0, leave - from_end)
        parts = [grouped[part == p] for p in range(leave + 1)]
        empty = np.zeros(0, dtype=np.int64)
        if split_args["LS"] == "valid_only":
            parts = parts + [empty]
        elif split_args["LS"] == "test_only":
            parts = [parts[0], empty, parts[1]]
        return parts
    if mode == "RS":
        ratios = split_args["RS"]
        if not isinstance(ratios, list):
            return None
        total = sum(ratios)
        ratios = [r / total for r in ratios]
        if group_by is None or str(group_by).lower() == "none":
            n = len(users)
            ids = calcu_split_ids(n, ratios)
            return [np.arange(a, b, dtype=np.int64) for a, b in zip([0] + ids, ids + [n])]
        if group_by != "user":
            return None
        grouped, pos, count = _group_ranks(users)
        sizes, which = np.unique(count, return_inverse=True)
        cuts = np.asarray([calcu_split_ids(int(c), ratios) for c in sizes], dtype=np.int64).reshape(len(sizes), -1)
        part = np.zeros(len(users), dtype=np.int64)
        for j in range(cuts.shape[1]):
            part += pos >= cuts[which, j]
        return [grouped[part == p] for p in range(len(ratios))]
    return None


def window_end_mask(users: np.ndarray, times: Optional[np.ndarray], max_len: int) -> np.ndarray:
    """The all-position mode's rows: those that end a window of ``L + 1`` items, counted from each user's last
    (by time, ties in row order; row order when ``times`` is None)."""
    n = len(users)
    if times is not None:
        order = np.lexsort((np.arange(n), times, users))
    else:
        order = np.lexsort((np.arange(n), users))
    s = users[order]
    last = np.ones(n, dtype=bool)
    if n > 1:
        last[:-1] = s[:-1] != s[1:]
    positions = np.arange(n, dtype=np.int64)
    group_end = np.minimum.accumulate(np.where(last, positions, n)[::-1])[::-1]
    keep = np.zeros(n, dtype=bool)
    keep[order] = (group_end - positions) % max_len == 0
    return keep


# ------------------------------------------------------------------------------------------------ the cache
def _digest(array: np.ndarray) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(np.ascontiguousarray(array).data)
    return h.hexdigest()


def file_fingerprints(folder: str, name: str) -> dict:
    """``{file: [size, mtime_ns]}`` of the dataset's atomic files (``<name>.*``) in ``folder``."""
    out = {}
    try:
        entries = sorted(os.listdir(folder))
    except OSError:
        return out
    for f in entries:
        if f.startswith(name + ".") and f.rsplit(".", 1)[-1] in ("inter", "item", "user", "kg", "link", "net"):
            st = os.stat(os.path.join(folder, f))
            out[f] = [st.st_size, st.st_mtime_ns]
    return out


def cache_key(columns: dict, settings: dict, files: dict) -> dict:
    """What the cached arrays depend on: each input column (name, dtype, shape, content hash), the settings the
    build reads, the atomic files' size and mtime, and this format's version."""
    return {
        "version": CACHE_VERSION,
        "columns": [[k, str(v.dtype), list(v.shape[1:]), _digest(v)] for k, v in columns.items()],
        "settings": settings,
        "files": files,
    }


def key_name(key: dict) -> str:
    return "seq-" + hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def build_arrays(out_dir: str, columns: dict, uid: str, iid: str, time: str, max_len: int, list_fields: dict,
                 length_field: str, split_args: dict, group_by, windows: bool, item_num: int) -> dict:
    """Write the examples of every split into ``out_dir`` (one ``.npy`` per field); returns the meta data.

    ``columns``: the base ``.inter`` fields (numpy, RecBole's dtypes, its field order); ``list_fields``:
    ``{field: list_field}`` for every field but the user id."""
    users, times = columns[uid], columns[time]
    order, targets, starts, lengths = augmentation_plan(users, times, max_len)
    base = order[targets]  # interaction of each example, in RecBole's augmentation order
    time_order = np.argsort(times[base], kind="stable")  # build(): sort(by=time_field)
    parts = split_rows(users[base[time_order]], split_args, group_by)
    parts = [time_order[p] for p in parts]  # rows of the augmented table
    train, rest = parts[0], np.zeros(0, dtype=np.int64)
    if windows:
        keep = window_end_mask(users[base[train]], times[base[train]], max_len)
        train, rest = train[keep], train[~keep]
    blocks = [train, parts[1], parts[2], rest]
    rows = np.concatenate(blocks)
    sizes = [int(len(b)) for b in blocks]

    # training item counts and user-item keys of the whole training split (targets and first items)
    full_train = parts[0]
    first = full_train[lengths[full_train] == 1]
    sorted_items = columns[iid][order]
    t_users = np.concatenate([users[base[full_train]], users[base[first]]]).astype(np.int64)
    t_items = np.concatenate([columns[iid][base[full_train]], sorted_items[starts[first]]]).astype(np.int64)
    counts = np.bincount(t_items, minlength=item_num)
    keys = sorted_unique(t_users * item_num + t_items)
    del t_users, t_items, sorted_items
    np.save(os.path.join(out_dir, "train_item_counts.npy"), counts)
    np.save(os.path.join(out_dir, "train_user_item_keys.npy"), keys)

    fields = []
    row_base, row_starts, row_lengths = base[rows], starts[rows], lengths[rows]
    del base, starts, lengths, targets
    for k, v in columns.items():
        np.save(os.path.join(out_dir, f"{k}.npy"), v[row_base])
        fields.append(k)
    np.save(os.path.join(out_dir, f"{length_field}.npy"), row_lengths)
    fields.append(length_field)
    for k, list_field in list_fields.items():
        v = columns[k]
        path = os.path.join(out_dir, f"{list_field}.npy")
        out = np.lib.format.open_memmap(path, mode="w+", dtype=v.dtype, shape=(len(rows), max_len) + v.shape[1:])
        gather_lists(v[order], row_starts, row_lengths, max_len, out=out, progress=f"dataset cache {list_field}")
        out.flush()
        del out
        fields.append(list_field)
    return {"fields": fields, "blocks": dict(zip(BLOCKS, sizes))}


def load_array(path: str) -> np.ndarray:
    """A cached array as a copy-on-write memory map (pages shared between processes until written)."""
    arr = np.load(path, mmap_mode="c")
    if arr.size == 0:
        arr = np.load(path)
    return arr


def load_or_build(cache_root: str, key: dict, build_kwargs: dict, log=None):
    """The cache folder of ``key`` under ``cache_root``: found, or built once (:class:`FolderBuild`).

    Returns ``(folder, meta, built)``. Call it only for a split :func:`supported_split` accepts."""
    from recbole_mm.atomic import FolderBuild, read_json

    log = log or logger
    name = key_name(key)
    folder = os.path.join(cache_root, name)
    meta = read_json(os.path.join(folder, META))
    if meta is not None and meta.get("key") == key:
        return folder, meta, False
    with FolderBuild(cache_root, name, f"dataset cache {folder}", log=log) as build:
        meta = read_json(os.path.join(folder, META))
        if meta is not None and meta.get("key") == key:  # another process built it while we waited
            return folder, meta, False
        tmp = build.tmp()
        log.info(f"building the dataset cache {folder}")
        arrays = build_arrays(tmp, **build_kwargs)
        meta = dict(arrays, key=key)
        with open(os.path.join(tmp, META), "w", encoding="utf-8") as f:
            json.dump(meta, f, sort_keys=True)
    return folder, meta, True
