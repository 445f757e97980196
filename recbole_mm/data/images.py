"""On-disk uint8 image store: every item image decoded and resized once, then memory-mapped.

Layout of ``image_store/<S>px/``::

    pixels.npy    uint8 [n + 1, S, S, 3]; row 0 is the placeholder (mid grey)
    index.json    {"size", "tokens" (row r + 1 = tokens[r]), "missing", "corrupt", "source_dir",
                   "files" (token -> [size, mtime_ns] of the file decoded), "complete"}

Images are resized to S x S without keeping the aspect ratio, as the seed papers do (their transform is a
square resize, no crop). A missing, truncated or corrupt image gets the placeholder row and is counted in one
warning that names the first few. The build is resumable: progress is written every chunk, and a rerun
continues where an interrupted build stopped. A store is rebuilt when its image folder changes: another folder,
a file added, removed or modified (size / mtime), or items it does not cover yet.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
PLACEHOLDER_VALUE = 128
_CHUNK = 256


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
    """Read access to a built store; :meth:`open_or_build` builds it when needed."""

    def __init__(self, store_dir: str):
        self.store_dir = store_dir
        with open(os.path.join(store_dir, "index.json"), encoding="utf-8") as f:
            self.index = json.load(f)
        if not self.index.get("complete"):
            raise RuntimeError(f"image store {store_dir} is incomplete; open it with ImageStore.open_or_build")
        self.size = int(self.index["size"])
        self.pixels = np.load(os.path.join(store_dir, "pixels.npy"), mmap_mode="r")
        self._row = {t: i + 1 for i, t in enumerate(self.index["tokens"])}
        self._bad = set(self.index.get("missing", [])) | set(self.index.get("corrupt", []))

    def rows_for(self, tokens: Sequence[str]) -> np.ndarray:
        """Row of each token; 0 (placeholder) for tokens without a usable image."""
        return np.array([0 if t in self._bad else self._row.get(t, 0) for t in tokens], dtype=np.int64)

    def read(self, rows: torch.Tensor) -> torch.Tensor:
        rows_np = rows.numpy()
        uniq, inverse = np.unique(rows_np, return_inverse=True)  # sorted reads from the memory map
        block = torch.from_numpy(np.ascontiguousarray(self.pixels[uniq]))
        return block[torch.from_numpy(inverse.reshape(-1))]

    @classmethod
    def open_or_build(
        cls, image_dir: str, store_dir: str, size: int, tokens: Sequence[str], workers: int = 2, progress: bool = True
    ) -> "ImageStore":
        index_path = os.path.join(store_dir, "index.json")
        if os.path.isfile(index_path):
            with open(index_path, encoding="utf-8") as f:
                index = json.load(f)
            reason = _stale_reason(index, image_dir, size, tokens) if index.get("complete") else "incomplete"
            if reason is None:
                return cls(store_dir)
            logger.info(f"image store {store_dir}: {reason}; rebuilding it")
        build_image_store(image_dir, store_dir, size, tokens, workers=workers, progress=progress)
        return cls(store_dir)


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


def build_image_store(
    image_dir: str, store_dir: str, size: int, tokens: Sequence[str], workers: int = 2, progress: bool = True
) -> dict:
    """Decode the images of ``tokens`` into ``store_dir`` (resumable). Returns the index dict."""
    from tqdm.auto import tqdm

    os.makedirs(store_dir, exist_ok=True)
    tokens = sorted(set(map(str, tokens)))
    files = find_images(image_dir)
    partial_pixels = os.path.join(store_dir, "pixels.partial.npy")
    progress_path = os.path.join(store_dir, "progress.partial.json")
    state = {"size": size, "tokens": tokens, "done": 0, "missing": [], "corrupt": []}
    if os.path.isfile(progress_path) and os.path.isfile(partial_pixels):
        with open(progress_path, encoding="utf-8") as f:
            old = json.load(f)
        if old.get("size") == size and old.get("tokens") == tokens:
            state = old
    mode = "r+" if state["done"] else "w+"
    pixels = np.lib.format.open_memmap(partial_pixels, mode=mode, dtype=np.uint8, shape=(len(tokens) + 1, size, size, 3))
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
            with open(progress_path, "w", encoding="utf-8") as f:
                json.dump(state, f)
            bar.update(len(chunk))
    bar.close()
    del pixels
    index = {
        "size": size,
        "tokens": tokens,
        "missing": state["missing"],
        "corrupt": state["corrupt"],
        "source_dir": os.path.abspath(image_dir),
        "files": {t: _fingerprint(files[t]) for t in tokens if t in files},
        "complete": True,
    }
    os.replace(partial_pixels, os.path.join(store_dir, "pixels.npy"))
    with open(os.path.join(store_dir, "index.json"), "w", encoding="utf-8") as f:
        json.dump(index, f, ensure_ascii=False)
    os.remove(progress_path)
    for label, key in (("are missing", "missing"), ("are truncated or corrupt", "corrupt")):
        msg = _summarise(label, index[key], len(tokens), image_dir)
        if msg:
            logger.warning(msg)
    return index
