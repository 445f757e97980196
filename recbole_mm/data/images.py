"""On-disk uint8 image store: every item image decoded and resized once, then memory-mapped.

Layout of ``image_store/<S>px/``::

    pixels.npy    uint8 [n + 1, S, S, 3]; row 0 is the placeholder (mid grey)
    index.json    {"size", "tokens" (row r + 1 = tokens[r]), "missing", "corrupt", "source_dir",
                   "files" (token -> [size, mtime_ns] of the file decoded), "complete"}

Images are resized to S x S without keeping the aspect ratio, as the seed papers do (their transform is a
square resize, no crop). A missing, truncated or corrupt image gets the placeholder row and is counted in one
warning that names the first few. A store is rebuilt when its image folder changes: another folder, a file
added, removed or modified (size / mtime), or items it does not cover yet.

Several processes may open the same store at once (data-parallel runs, a tuning sweep): the check and the build
run under one lock (:class:`recbole_mm.atomic.BuildLock`, file ``.<S>px.lock`` beside the store folder), so one
process builds and the others wait, then memory-map the result. The build writes ``pixels.partial.npy`` and,
after every chunk, ``progress.partial.json`` (atomically); a build that is interrupted, even killed, resumes
there and ends with the same bytes as an uninterrupted one. The finished pixels are renamed into place before
``index.json`` is written, so a reader never pairs an index with other pixels. Leftovers of a killed build that
cannot be resumed (other settings, temporary files) are removed with a warning naming them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence

import numpy as np

from recbole_mm.atomic import BuildLock, atomic_write_json, leftover_temps, lock_path_for, read_json, remove_leftovers

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
PLACEHOLDER_VALUE = 128
_CHUNK = 256
PIXELS = "pixels.npy"
INDEX = "index.json"
PARTIAL_PIXELS = "pixels.partial.npy"
PROGRESS = "progress.partial.json"


def find_images(image_dir: str) -> dict[str, str]:
    """``token -> file`` for the images of a folder (first extension in IMAGE_EXTENSIONS order wins)."""
    found: dict[str, str] = {}
    if not os.path.isdir(image_dir):
        return found
    rank = {ext: i for i, ext in enumerate(IMAGE_EXTENSIONS)}
    for entry in sorted(os.listdir(image_dir)):
        stem, ext = os.path.splitext(entry)
        ext = ext.lower()
        if ext in rank and (stem not in found or rank[ext] < rank[os.path.splitext(found[stem])[1].lower()]):
            found[stem] = os.path.join(image_dir, entry)
    return found


def decode_image(path: str, size: int) -> np.ndarray:
    """Decode ``path`` to uint8 ``[size, size, 3]`` RGB (square resize). Raises OSError on bad files."""
    from PIL import Image

    with Image.open(path) as im:
        im.draft("RGB", (size, size))  # JPEG: decode at a reduced scale when the file is much larger
        im = im.convert("RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.BILINEAR, reducing_gap=3.0)
        arr = np.asarray(im, dtype=np.uint8)
    if arr.shape != (size, size, 3):
        raise OSError(f"decoded image has shape {arr.shape}")
    return arr


def _summarise(label: str, tokens: Sequence[str], total: int, where: str) -> Optional[str]:
    if not tokens:
        return None
    first = ", ".join(map(str, list(tokens)[:5]))
    return f"{len(tokens)} of {total} item images {label} in {where} (placeholder used); first: {first}"


class ImageStore:
    """Read access to a built store; :meth:`open_or_build` builds it when needed (use that one)."""

    def __init__(self, store_dir: str):
        self.store_dir = store_dir
        with open(os.path.join(store_dir, INDEX), encoding="utf-8") as f:
            self.index = json.load(f)
        if not self.index.get("complete"):
            raise RuntimeError(f"image store {store_dir} is incomplete; open it with ImageStore.open_or_build")
        self.size = int(self.index["size"])
        self.pixels = np.load(os.path.join(store_dir, PIXELS), mmap_mode="r")
        want = (len(self.index["tokens"]) + 1, self.size, self.size, 3)
        if self.pixels.shape != want or self.pixels.dtype != np.uint8:
            raise RuntimeError(
                f"image store {store_dir}: {PIXELS} holds {self.pixels.dtype} {self.pixels.shape}, its index says "
                f"uint8 {want}; delete the folder (it is rebuilt on the next use)"
            )
        self._row = {t: i + 1 for i, t in enumerate(self.index["tokens"])}
        self._bad = set(self.index.get("missing", [])) | set(self.index.get("corrupt", []))

    def rows_for(self, tokens: Sequence[str]) -> np.ndarray:
        """Row of each token; 0 (placeholder) for tokens without a usable image."""
        return np.array([0 if t in self._bad else self._row.get(t, 0) for t in tokens], dtype=np.int64)

    def read(self, rows: "torch.Tensor") -> "torch.Tensor":
        import torch  # here, not at the top: building a store needs no torch

        rows_np = rows.numpy()
        uniq, inverse = np.unique(rows_np, return_inverse=True)  # sorted reads from the memory map
        block = torch.from_numpy(np.ascontiguousarray(self.pixels[uniq]))
        return block[torch.from_numpy(inverse.reshape(-1))]

    @classmethod
    def open_or_build(
        cls, image_dir: str, store_dir: str, size: int, tokens: Sequence[str], workers: int = 2, progress: bool = True
    ) -> "ImageStore":
        """The store of ``tokens`` in ``store_dir``, built (or rebuilt, or resumed) first when needed.

        Safe to call from several processes at once: one builds, the others wait and then open its result.
        An up-to-date store is opened without the lock (read-only dataset folders work).
        """
        store = cls._open_if_fresh(image_dir, store_dir, size, tokens)
        if store is not None and not os.path.exists(lock_path_for(store_dir)):
            return store
        # a complete store beside a lock file: a build is running, or one killed after its last write left the file;
        # the locked path waits for the first and removes the second
        with BuildLock(lock_path_for(store_dir), what=f"image store {store_dir}", log=logger):
            index = read_json(os.path.join(store_dir, INDEX))
            if index is not None:
                reason = _stale_reason(index, image_dir, size, tokens) if index.get("complete") else "incomplete"
                reason = reason or _pixels_problem(store_dir, index)
                if reason is None:
                    _remove_build_leftovers(store_dir, "store is complete")
                    return cls(store_dir)
                logger.info(f"image store {store_dir}: {reason}; rebuilding it")
            _build_locked(image_dir, store_dir, size, tokens, workers, progress)
            return cls(store_dir)


    @classmethod
    def _open_if_fresh(cls, image_dir: str, store_dir: str, size: int, tokens: Sequence[str]) -> Optional["ImageStore"]:
        """The store when it is complete and up to date, opened without the lock; else ``None``.

        The index is read again after the pixels are mapped: a rebuild publishing meanwhile (it removes the index
        before renaming new pixels into place) makes the two reads differ, and the caller takes the lock path.
        """
        index = read_json(os.path.join(store_dir, INDEX))
        if index is None or not index.get("complete") or _stale_reason(index, image_dir, size, tokens) is not None:
            return None
        try:
            store = cls(store_dir)
        except (OSError, ValueError, RuntimeError):
            return None
        return store if store.index == index == read_json(os.path.join(store_dir, INDEX)) else None


def _fingerprint(path: str) -> list:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def _stale_reason(index: dict, image_dir: str, size: int, tokens: Sequence[str]) -> Optional[str]:
    """Why a built store no longer matches the image folder (``None`` when it does)."""
    if index.get("source_dir") != os.path.abspath(image_dir):
        return f"built from {index.get('source_dir')}, not {os.path.abspath(image_dir)}"
    if int(index.get("size", -1)) != size:
        return "built for another size"
    known = set(index["tokens"])
    new = [t for t in tokens if t not in known]
    if new:
        return f"{len(new)} item(s) not in the store (first: {new[0]})"
    files = find_images(image_dir)
    recorded = index.get("files", {})
    changed = [t for t in index["tokens"] if (_fingerprint(files[t]) if t in files else None) != recorded.get(t)]
    if changed:
        return f"{len(changed)} image file(s) added, removed or modified (first: {changed[0]})"
    return None


def _pixels_problem(store_dir: str, index: dict) -> Optional[str]:
    """Why ``pixels.npy`` does not fit ``index`` (missing, other shape), else ``None``."""
    path = os.path.join(store_dir, PIXELS)
    try:
        shape = np.load(path, mmap_mode="r").shape
    except (OSError, ValueError) as e:
        return f"{PIXELS} is missing or unreadable ({type(e).__name__})"
    want = (len(index.get("tokens", [])) + 1, int(index.get("size", -1)), int(index.get("size", -1)), 3)
    return None if tuple(shape) == want else f"{PIXELS} has shape {tuple(shape)}, not {want}"


def _remove_build_leftovers(store_dir: str, reason: str) -> None:
    paths = [os.path.join(store_dir, PARTIAL_PIXELS), os.path.join(store_dir, PROGRESS)]
    paths = [p for p in paths if os.path.exists(p)]
    paths += leftover_temps(*(os.path.join(store_dir, n) for n in (PIXELS, INDEX, PARTIAL_PIXELS, PROGRESS)))
    remove_leftovers(paths, "image store build", logger, reason=reason)


def build_image_store(
    image_dir: str, store_dir: str, size: int, tokens: Sequence[str], workers: int = 2, progress: bool = True
) -> dict:
    """Decode the images of ``tokens`` into ``store_dir`` (resumable, one builder at a time). Returns the index."""
    with BuildLock(lock_path_for(store_dir), what=f"image store {store_dir}", log=logger):
        return _build_locked(image_dir, store_dir, size, tokens, workers, progress)


def _build_locked(image_dir: str, store_dir: str, size: int, tokens: Sequence[str], workers: int, progress: bool) -> dict:
    """The build itself; the caller holds the store's lock."""
    from tqdm.auto import tqdm

    os.makedirs(store_dir, exist_ok=True)
    tokens = sorted(set(map(str, tokens)))
    files = find_images(image_dir)
    fingerprints = {t: _fingerprint(files[t]) for t in tokens if t in files}
    source = os.path.abspath(image_dir)
    partial_pixels = os.path.join(store_dir, PARTIAL_PIXELS)
    progress_path = os.path.join(store_dir, PROGRESS)
    shape = (len(tokens) + 1, size, size, 3)
    # What the rows depend on; a partial build is resumed only when it was made for exactly this.
    key = hashlib.sha256(json.dumps([size, tokens, source, fingerprints]).encode("utf-8")).hexdigest()
    remove_leftovers(leftover_temps(*(os.path.join(store_dir, n) for n in (PIXELS, INDEX, PARTIAL_PIXELS, PROGRESS))),
                     "image store build", logger, reason="temporary files")
    state = None
    old = read_json(progress_path)
    if old is not None and old.get("key") == key and _partial_fits(partial_pixels, shape):
        state = old
        logger.info(f"image store {store_dir}: resuming an interrupted build at image {state['done']} of {len(tokens)}")
    else:
        stale = [p for p in (partial_pixels, progress_path) if os.path.exists(p)]
        why = "made for other images or settings" if old is not None else "no readable progress record"
        remove_leftovers(stale, "image store build", logger, reason=why)
        state = {"key": key, "done": 0, "missing": [], "corrupt": []}
    if state["done"]:
        pixels = np.load(partial_pixels, mmap_mode="r+")
    else:
        pixels = np.lib.format.open_memmap(partial_pixels, mode="w+", dtype=np.uint8, shape=shape)
    pixels[0] = PLACEHOLDER_VALUE

    def load(token: str):
        path = files.get(token)
        if path is None:
            return token, None, "missing"
        try:
            return token, decode_image(path, size), None
        except Exception:  # PIL raises many types for truncated / corrupt files
            return token, None, "corrupt"

    bar = tqdm(total=len(tokens), initial=state["done"], desc=f"image store {size}px", unit="img", disable=not progress)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        start = state["done"]
        while start < len(tokens):
            chunk = tokens[start : start + _CHUNK]
            for j, (token, arr, problem) in enumerate(pool.map(load, chunk)):
                if problem is None:
                    pixels[start + j + 1] = arr
                else:
                    pixels[start + j + 1] = PLACEHOLDER_VALUE
                    state[problem].append(token)
            start += len(chunk)
            pixels.flush()
            state["done"] = start
            atomic_write_json(progress_path, state)  # after the rows it counts are on disk
            bar.update(len(chunk))
    bar.close()
    pixels.flush()
    del pixels
    index = {
        "size": size,
        "tokens": tokens,
        "missing": state["missing"],
        "corrupt": state["corrupt"],
        "source_dir": source,
        "files": fingerprints,
        "complete": True,
    }
    index_path = os.path.join(store_dir, INDEX)
    if os.path.exists(index_path):
        os.remove(index_path)  # an old index must never describe the new pixels (if we are killed below)
    os.replace(partial_pixels, os.path.join(store_dir, PIXELS))
    atomic_write_json(index_path, index, ensure_ascii=False)
    os.remove(progress_path)
    for label, key_ in (("are missing", "missing"), ("are truncated or corrupt", "corrupt")):
        msg = _summarise(label, index[key_], len(tokens), image_dir)
        if msg:
            logger.warning(msg)
    return index


def _partial_fits(path: str, shape: tuple) -> bool:
    try:
        arr = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return False
    return tuple(arr.shape) == tuple(shape) and arr.dtype == np.uint8
