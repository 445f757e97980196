"""On-disk image stores: every item image decoded and resized once, in one of two formats.

``image_store_format: jpeg`` (the default): the resized images re-encoded as JPEG (``image_store_quality``), in tar
shards of the WebDataset layout, under ``image_store/<S>px-jpeg-q<Q>/``::

    shard-<key>-00000.tar ...   members ``<position:09d>.jpg`` (position in the sorted token list); items without a
                                usable image have no member
    index.json                  {"format": "jpeg", "size", "quality", "tokens", "missing", "corrupt", "source_dir",
                                 "files", "shards" (file names), "shard_bytes", "entries" (per token:
                                 [shard, data offset, length], [-1, 0, 0] = placeholder), "complete"}

Why tar shards: the format is the stdlib's (``tarfile`` writes it, nothing to install), any tool lists it, and
WebDataset / ``tar`` read the shards as they are. Random access needs no library: the index keeps each JPEG's byte
offset and length, read with ``os.pread`` (no shared file position, so descriptors inherited through ``fork`` by
DataLoader workers are safe; they are opened lazily and dropped when the store is pickled for ``spawn``).
At 224 px a JPEG q90 item is ~10-25 KB instead of 150 KB of raw pixels (``benchmarks/bench_images.py``), so the
store of a large catalogue fits the page cache. Decoding is deterministic: the same bytes give the same pixels
(libjpeg, no random dithering), and the decoded image is exactly S x S. The shard names carry a hash of what the
bytes depend on (images, their fingerprints, size, quality): a rebuild never overwrites a shard an older index
points to.

The build encodes shards in a process pool (``image_store_workers``, default: the CPU cores; 1 = in this process),
writes each shard atomically (temporary file, rename) in shard order and records it in ``progress.partial.json``;
a killed build resumes at the first shard not recorded, and ends with the same bytes as an uninterrupted one.

``image_store_format: raw``: uint8 pixels in one memory map, layout of ``image_store/<S>px/`` (the format of
earlier releases; cheap for tiny datasets, 150 KB per item at 224 px)::

    pixels.npy    uint8 [n + 1, S, S, 3]; row 0 is the placeholder (mid grey)
    index.json    {"size", "tokens" (row r + 1 = tokens[r]), "missing", "corrupt", "source_dir",
                   "files" (token -> [size, mtime_ns] of the file decoded), "complete"}

Both formats: images are resized to S x S without keeping the aspect ratio, as the seed papers do (their transform
is a square resize, no crop). A missing, truncated or corrupt image gets the placeholder (mid grey) and is counted
in one warning that names the first few. A store is rebuilt when its image folder changes: another folder, a file
added, removed or modified (size / mtime), or items it does not cover yet; and when it was made with another format,
size or quality (the index records them: a store is never read with other settings).

Several processes may open the same store at once (data-parallel runs, a tuning sweep): the check and the build
run under one lock (:class:`recbole_mm.atomic.BuildLock`, file ``.<folder>.lock`` beside the store folder), so one
process builds and the others wait, then open the result. Raw build: ``pixels.partial.npy`` and, after every
chunk, ``progress.partial.json`` (atomically); the finished pixels are renamed into place before ``index.json`` is
written, so a reader never pairs an index with other pixels. Both formats remove the old index before writing
anything new. Leftovers of a killed build that cannot be resumed (other settings, temporary files) are removed
with a warning naming them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional, Sequence

import numpy as np

from recbole_mm.atomic import (BuildLock, atomic_write_bytes, atomic_write_json, leftover_temps, lock_path_for, read_json,
                              remove_leftovers)

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


def _warn_placeholders(index: dict, total: int, image_dir: str) -> None:
    """One warning each for the missing and the corrupt images of a finished build (they got the placeholder)."""
    for label, key in (("are missing", "missing"), ("are truncated or corrupt", "corrupt")):
        msg = _summarise(label, index[key], total, image_dir)
        if msg:
            logger.warning(msg)


def _summarise(label: str, tokens: Sequence[str], total: int, where: str) -> Optional[str]:
    if not tokens:
        return None
    first = ", ".join(map(str, list(tokens)[:5]))
    return f"{len(tokens)} of {total} item images {label} in {where} (placeholder used); first: {first}"


class ImageStore:
    """Read access to a built raw-pixel store (``image_store_format: raw``); :meth:`open_or_build` builds it when
    needed (use that one). The JPEG store is :class:`JpegImageStore`."""

    fmt = "raw"

    def __init__(self, store_dir: str):
        self.store_dir = store_dir
        with open(os.path.join(store_dir, INDEX), encoding="utf-8") as f:
            self.index = json.load(f)
        if not self.index.get("complete") or self.index.get("format", "raw") != "raw":
            raise RuntimeError(f"image store {store_dir} is incomplete or not a raw-pixel store; open it with "
                               "ImageStore.open_or_build")
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
        self.reads = 0  # images read by this process (tests and benchmarks check where decoding happens)

    def rows_for(self, tokens: Sequence[str]) -> np.ndarray:
        """Row of each token; 0 (placeholder) for tokens without a usable image."""
        return np.array([0 if t in self._bad else self._row.get(t, 0) for t in tokens], dtype=np.int64)

    def decode_rows(self, rows: np.ndarray) -> np.ndarray:
        """uint8 ``[len(rows), S, S, 3]`` (sorted reads from the memory map)."""
        uniq, inverse = np.unique(np.asarray(rows, dtype=np.int64).reshape(-1), return_inverse=True)
        self.reads += int((uniq > 0).sum())
        return np.ascontiguousarray(self.pixels[uniq])[inverse.reshape(-1)]

    def read(self, rows: "torch.Tensor") -> "torch.Tensor":
        import torch  # here, not at the top: building a store needs no torch

        rows_np = rows.numpy()
        uniq, inverse = np.unique(rows_np, return_inverse=True)  # sorted reads from the memory map
        self.reads += int((uniq > 0).sum())
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
                if index.get("format", "raw") != "raw":
                    reason = f"made in format {index.get('format')!r}, not raw"
                reason = reason or _pixels_problem(store_dir, index)
                if reason is None:
                    _remove_build_leftovers(store_dir, "store is complete")
                    return cls(store_dir)
                logger.info(f"image store {store_dir}: {reason}; rebuilding it")
            _build_locked(image_dir, store_dir, size, tokens, workers, progress)
            return cls(store_dir)


    @classmethod
    def _open_if_fresh(cls, image_dir: str, store_dir: str, size: int, tokens: Sequence[str]) -> Optional["ImageStore"]:
        """The store when it is complete, raw and up to date, opened without the lock; else ``None``."""
        return _open_unlocked(cls, store_dir, lambda index: (
            bool(index.get("complete")) and index.get("format", "raw") == "raw"
            and _stale_reason(index, image_dir, size, tokens) is None))


def _open_unlocked(cls: type, store_dir: str, fresh: Callable[[dict], bool]) -> Optional[ImageStore | JpegImageStore]:
    """``cls(store_dir)`` when its index passes ``fresh``, opened without the lock; else ``None`` (both formats).

    The index is read again after the store is opened: a rebuild publishing meanwhile (it removes the index before
    renaming new pixels or writing new shards) makes the reads differ, and the caller takes the lock path.
    """
    index = read_json(os.path.join(store_dir, INDEX))
    if index is None or not fresh(index):
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
    _warn_placeholders(index, len(tokens), image_dir)
    return index


def _partial_fits(path: str, shape: tuple) -> bool:
    try:
        arr = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return False
    return tuple(arr.shape) == tuple(shape) and arr.dtype == np.uint8


# ------------------------------------------------------------------------------------------- JPEG tar shards
FORMATS = ("jpeg", "raw")
JPEG_VERSION = 1  # bump when the bytes a build writes change (the shard names and the index record it)
_SHARD_ITEMS = 1024  # images per shard (~15 MB at 224 px q90): one unit of work, of resumption and of files


def store_folder_name(size: int, fmt: str = "jpeg", quality: int = 90) -> str:
    """Folder of a store inside ``image_store_dir``: ``<S>px`` (raw: the name of earlier releases) or
    ``<S>px-jpeg-q<Q>``."""
    if fmt not in FORMATS:
        raise ValueError(f"image_store_format must be one of {FORMATS}, got {fmt!r}")
    return f"{int(size)}px" if fmt == "raw" else f"{int(size)}px-jpeg-q{int(quality)}"


def encode_jpeg(pixels: np.ndarray, quality: int) -> bytes:
    """uint8 ``[S, S, 3]`` -> baseline JPEG bytes (4:2:0, no optimisation pass: the same pixels give the same bytes)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="JPEG", quality=int(quality), subsampling="4:2:0",
                                        optimize=False, progressive=False)
    return buf.getvalue()


def decode_jpeg(data: bytes, size: int) -> np.ndarray:
    """JPEG bytes of the store -> uint8 ``[size, size, 3]`` (deterministic). Raises OSError on other shapes."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    if arr.shape != (size, size, 3):
        raise OSError(f"stored image has shape {arr.shape}, not {(size, size, 3)}")
    return arr


def _encode_item(job: tuple) -> tuple:
    """``(token, path or None, size, quality) -> (token, jpeg bytes or None, problem)`` (pool worker)."""
    token, path, size, quality = job
    if path is None:
        return token, None, "missing"
    try:
        return token, encode_jpeg(decode_image(path, size), quality), None
    except Exception:  # PIL raises many types for truncated / corrupt files
        return token, None, "corrupt"


def _die_with_parent(parent: int) -> None:
    """Pool initializer: a worker of a killed build must not outlive it (Linux: ``PR_SET_PDEATHSIG``)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the worker ends when it next reads its closed task queue
        pass
    if os.getppid() != parent:  # the builder died before prctl took effect
        os._exit(1)


def _encode_shard(job: tuple) -> list:
    """One shard's items encoded (a pool task: the parent writes the shard, so a killed build leaves no writer)."""
    items, size, quality = job
    return [_encode_item((token, path, size, quality)) for token, path in items]


def _tar_bytes(first: int, encoded: list) -> tuple[bytes, list]:
    """The shard file for ``encoded`` (positions from ``first``) and each item's ``[data offset, length]`` (or None).

    Deterministic: fixed member names, mtime 0, no owner names, USTAR headers."""
    import io
    import tarfile

    buf = io.BytesIO()
    spans = []
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for j, (_, data, _) in enumerate(encoded):
            if data is None:
                spans.append(None)
                continue
            info = tarfile.TarInfo(f"{first + j:09d}.jpg")
            info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = (
                len(data), 0, 0o644, 0, 0, "", "")
            tar.addfile(info, io.BytesIO(data))
            # the data ends the archive so far, padded to whole 512-byte blocks
            spans.append([tar.offset - -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE, len(data)])
    return buf.getvalue(), spans


class JpegImageStore:
    """Read access to a built JPEG store (use :meth:`open_or_build`): ``read(rows)`` decodes to uint8 pixels.

    Rows as for :class:`ImageStore`: row ``r + 1`` is ``tokens[r]``, row 0 (and every item without a usable image)
    the placeholder. File descriptors are opened on first read in each process and never shared through pickling.
    """

    fmt = "jpeg"

    def __init__(self, store_dir: str):
        self.store_dir = store_dir
        with open(os.path.join(store_dir, INDEX), encoding="utf-8") as f:
            self.index = json.load(f)
        if not self.index.get("complete") or self.index.get("format") != "jpeg":
            raise RuntimeError(f"image store {store_dir} is incomplete or not a JPEG store; open it with "
                               "JpegImageStore.open_or_build")
        self.size = int(self.index["size"])
        self.quality = int(self.index["quality"])
        problem = _shards_problem(store_dir, self.index)
        if problem:
            raise RuntimeError(f"image store {store_dir}: {problem}; delete the folder (it is rebuilt on the next use)")
        entries = np.asarray(self.index["entries"], dtype=np.int64).reshape(-1, 3)
        self.entries = np.concatenate([np.array([[-1, 0, 0]], dtype=np.int64), entries])  # row 0: placeholder
        self._row = {t: i + 1 for i, t in enumerate(self.index["tokens"])}
        self._fds: dict = {}
        self._pid = os.getpid()
        self.reads = 0  # images decoded by this process (tests and benchmarks check where decoding happens)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_fds"] = {}  # descriptors are per process
        return state

    def __del__(self):
        if getattr(self, "_pid", None) == os.getpid():
            for fd in getattr(self, "_fds", {}).values():
                try:
                    os.close(fd)
                except OSError:
                    pass

    def rows_for(self, tokens: Sequence[str]) -> np.ndarray:
        """Row of each token; 0 (placeholder) for tokens without a usable image."""
        rows = np.array([self._row.get(t, 0) for t in tokens], dtype=np.int64)
        rows[self.entries[rows, 0] < 0] = 0
        return rows

    def _fd(self, shard: int) -> int:
        # a forked child (DataLoader worker) keeps the inherited descriptors: pread has no shared file position
        fd = self._fds.get(shard)
        if fd is None:
            path = os.path.join(self.store_dir, self.index["shards"][shard])
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError as e:
                raise RuntimeError(f"image store {self.store_dir} lost {path} (rebuilt by another process while "
                                   "this one was reading it?): restart the run") from e
            self._fds[shard] = fd
        return fd

    def read_bytes(self, row: int) -> Optional[bytes]:
        """The stored JPEG of ``row`` (``None`` for the placeholder)."""
        shard, offset, length = (int(v) for v in self.entries[row])
        if shard < 0:
            return None
        data = os.pread(self._fd(shard), length, offset)
        if len(data) != length:
            raise RuntimeError(f"image store {self.store_dir}: short read in {self.index['shards'][shard]}; delete "
                               "the folder (it is rebuilt on the next use)")
        return data

    def decode_rows(self, rows: np.ndarray) -> np.ndarray:
        """uint8 ``[len(rows), S, S, 3]``; each distinct row decoded once, in file order."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        uniq, inverse = np.unique(rows, return_inverse=True)
        block = np.empty((len(uniq), self.size, self.size, 3), dtype=np.uint8)
        order = np.lexsort((self.entries[uniq, 1], self.entries[uniq, 0]))
        for k in order:
            data = self.read_bytes(int(uniq[k]))
            block[k] = PLACEHOLDER_VALUE if data is None else decode_jpeg(data, self.size)
        self.reads += int((self.entries[uniq, 0] >= 0).sum())
        return block[inverse.reshape(-1)]

    def read(self, rows: "torch.Tensor") -> "torch.Tensor":
        import torch

        return torch.from_numpy(self.decode_rows(rows.numpy()))

    @classmethod
    def open_or_build(cls, image_dir: str, store_dir: str, size: int, tokens: Sequence[str], quality: int = 90,
                      workers: Optional[int] = None, progress: bool = True) -> "JpegImageStore":
        """The JPEG store of ``tokens`` in ``store_dir``, built (or rebuilt, or resumed) first when needed.

        As :meth:`ImageStore.open_or_build`: one process builds, the others wait; a fresh store opens without the
        lock. ``workers``: encoding processes (``None``: the CPU cores)."""
        store = cls._open_if_fresh(image_dir, store_dir, size, tokens, quality)
        if store is not None and not os.path.exists(lock_path_for(store_dir)):
            return store
        with BuildLock(lock_path_for(store_dir), what=f"image store {store_dir}", log=logger):
            index = read_json(os.path.join(store_dir, INDEX))
            if index is not None:
                reason = _jpeg_stale_reason(index, image_dir, size, tokens, quality)
                reason = reason or _shards_problem(store_dir, index)
                if reason is None:
                    _remove_jpeg_leftovers(store_dir, index, "store is complete")
                    return cls(store_dir)
                logger.info(f"image store {store_dir}: {reason}; rebuilding it")
            _build_jpeg_locked(image_dir, store_dir, size, tokens, quality, workers, progress)
            return cls(store_dir)

    @classmethod
    def _open_if_fresh(cls, image_dir: str, store_dir: str, size: int, tokens: Sequence[str],
                       quality: int) -> Optional["JpegImageStore"]:
        """The store when it is complete, JPEG of this version and quality and up to date, opened without the lock;
        else ``None``."""
        return _open_unlocked(cls, store_dir, lambda index: (
            _jpeg_stale_reason(index, image_dir, size, tokens, quality) is None))


def _jpeg_stale_reason(index: dict, image_dir: str, size: int, tokens: Sequence[str], quality: int) -> Optional[str]:
    if not index.get("complete"):
        return "incomplete"
    if index.get("format", "raw") != "jpeg" or int(index.get("version", -1)) != JPEG_VERSION:
        return f"made in format {index.get('format', 'raw')!r} (version {index.get('version')}), not jpeg {JPEG_VERSION}"
    if int(index.get("quality", -1)) != int(quality):
        return f"made with JPEG quality {index.get('quality')}, not {quality}"
    return _stale_reason(index, image_dir, size, tokens)


def _shards_problem(store_dir: str, index: dict) -> Optional[str]:
    """Why the shard files do not fit ``index`` (missing, other length), else ``None``."""
    for name, n_bytes in zip(index.get("shards", []), index.get("shard_bytes", [])):
        try:
            actual = os.path.getsize(os.path.join(store_dir, name))
        except OSError:
            return f"{name} is missing"
        if actual != n_bytes:
            return f"{name} has {actual} bytes, its index says {n_bytes}"
    if len(index.get("entries", [])) != len(index.get("tokens", [])):
        return "index entries do not match its tokens"
    return None


def _shard_names(store_dir: str) -> list[str]:
    if not os.path.isdir(store_dir):
        return []
    return sorted(n for n in os.listdir(store_dir) if n.startswith("shard-") and n.endswith(".tar"))


def _remove_jpeg_leftovers(store_dir: str, index: Optional[dict], reason: str) -> None:
    """Temporary files, a progress record and shards no index names (a killed or older build); under the lock."""
    keep = set(index.get("shards", [])) if index else set()
    paths = [os.path.join(store_dir, n) for n in _shard_names(store_dir) if n not in keep]
    paths += [p for p in (os.path.join(store_dir, PROGRESS),) if os.path.exists(p)]
    paths += [os.path.join(store_dir, n) for n in (PIXELS, PARTIAL_PIXELS) if os.path.exists(os.path.join(store_dir, n))]
    paths += glob_temps(store_dir)
    remove_leftovers(paths, "image store build", logger, reason=reason)


def glob_temps(store_dir: str) -> list[str]:
    """Temporary files of this package's atomic writes in ``store_dir`` (``.<name>.tmp-*``)."""
    import glob

    return glob.glob(os.path.join(glob.escape(store_dir), ".*.tmp-*"))


def build_jpeg_store(image_dir: str, store_dir: str, size: int, tokens: Sequence[str], quality: int = 90,
                     workers: Optional[int] = None, progress: bool = True) -> dict:
    """Encode the images of ``tokens`` into JPEG shards in ``store_dir`` (resumable, one builder at a time)."""
    with BuildLock(lock_path_for(store_dir), what=f"image store {store_dir}", log=logger):
        return _build_jpeg_locked(image_dir, store_dir, size, tokens, quality, workers, progress)


def default_workers() -> int:
    """Encoding processes by default: the cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _build_jpeg_locked(image_dir: str, store_dir: str, size: int, tokens: Sequence[str], quality: int,
                       workers: Optional[int], progress: bool) -> dict:
    """The build itself; the caller holds the store's lock."""
    from tqdm.auto import tqdm

    os.makedirs(store_dir, exist_ok=True)
    tokens = sorted(set(map(str, tokens)))
    files = find_images(image_dir)
    fingerprints = {t: _fingerprint(files[t]) for t in tokens if t in files}
    source = os.path.abspath(image_dir)
    per = int(_SHARD_ITEMS)
    n_shards = max(1, -(-len(tokens) // per))
    key = hashlib.sha256(json.dumps(["jpeg", JPEG_VERSION, size, int(quality), per, tokens, source, fingerprints])
                         .encode("utf-8")).hexdigest()
    names = [f"shard-{key[:12]}-{i:05d}.tar" for i in range(n_shards)]
    progress_path = os.path.join(store_dir, PROGRESS)
    index_path = os.path.join(store_dir, INDEX)
    if os.path.exists(index_path):
        os.remove(index_path)  # the old index must never describe files of this build (if we are killed below)
    old = read_json(progress_path)
    done: dict = {}
    if old is not None and old.get("key") == key:
        # recorded shards whose file is whole (it was renamed into place before being recorded)
        done = {int(i): r for i, r in old["shards"].items()
                if os.path.isfile(os.path.join(store_dir, names[int(i)]))
                and os.path.getsize(os.path.join(store_dir, names[int(i)])) == r["bytes"]}
    keep = {names[i] for i in done}
    stale = [os.path.join(store_dir, n) for n in _shard_names(store_dir) if n not in keep]
    stale += [os.path.join(store_dir, n) for n in (PIXELS, PARTIAL_PIXELS) if os.path.exists(os.path.join(store_dir, n))]
    stale += glob_temps(store_dir)
    if old is not None and old.get("key") != key:
        stale.append(progress_path)
    remove_leftovers(stale, "image store build", logger,
                     reason="temporary files, shards not recorded as finished, or made for other images or settings")
    if done:
        logger.info(f"image store {store_dir}: resuming an interrupted build at shard {min(set(range(n_shards)) - set(done), default=n_shards)} "
                    f"of {n_shards} ({len(done)} done)")
    todo = [i for i in range(n_shards) if i not in done]
    state = {"key": key, "shards": {str(i): r for i, r in sorted(done.items())}}
    jobs = {i: ([(t, files.get(t)) for t in tokens[i * per:(i + 1) * per]], size, int(quality)) for i in todo}
    workers = default_workers() if workers is None else max(1, int(workers))
    bar = tqdm(total=len(tokens), initial=sum(len(r["spans"]) for r in done.values()), desc=f"image store {size}px jpeg",
               unit="img", disable=not progress)

    def publish(i: int, encoded: list) -> None:
        data, spans = _tar_bytes(i * per, encoded)
        atomic_write_bytes(os.path.join(store_dir, names[i]), data)
        state["shards"][str(i)] = {"bytes": len(data), "spans": spans,
                                   "missing": [t for t, _, p in encoded if p == "missing"],
                                   "corrupt": [t for t, _, p in encoded if p == "corrupt"]}
        atomic_write_json(progress_path, state)  # after the shard it records is in place
        bar.update(len(encoded))

    if workers == 1 or len(todo) <= 1:
        for i in todo:
            publish(i, _encode_shard(jobs[i]))
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # fork when the platform has it (fast start; the children only run _encode_shard); at most 2 shards per
        # worker in flight, published in shard order
        ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
        with ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=ctx, initializer=_die_with_parent,
                                 initargs=(os.getpid(),)) as pool:
            pending = {}
            queue = list(todo)
            while queue or pending:
                while queue and len(pending) < 2 * workers:
                    i = queue.pop(0)
                    pending[i] = pool.submit(_encode_shard, jobs[i])
                i = min(pending)
                publish(i, pending.pop(i).result())
    bar.close()
    records = [state["shards"][str(i)] for i in range(n_shards)]
    entries = []
    for i, r in enumerate(records):
        entries += [[-1, 0, 0] if s is None else [i, s[0], s[1]] for s in r["spans"]]
    index = {
        "format": "jpeg",
        "version": JPEG_VERSION,
        "size": size,
        "quality": int(quality),
        "tokens": tokens,
        "missing": [t for r in records for t in r["missing"]],
        "corrupt": [t for r in records for t in r["corrupt"]],
        "source_dir": source,
        "files": fingerprints,
        "shards": names,
        "shard_bytes": [r["bytes"] for r in records],
        "entries": entries,
        "complete": True,
    }
    atomic_write_json(index_path, index, ensure_ascii=False)
    os.remove(progress_path)
    _warn_placeholders(index, len(tokens), image_dir)
    return index
