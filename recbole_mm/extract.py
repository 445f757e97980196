"""Feature extraction: frozen encoder outputs for every item of a dataset folder, keyed by item token.

``recbole-mm extract`` and the models' automatic "extract on first use" both call :func:`extract_features`.

- Rows: every item token of the dataset folder (``<name>.item`` rows, else the items of ``<name>.inter``),
  sorted, so the file does not depend on RecBole's filtering or id order.
- Resumable: rows are written batch by batch into ``<stem>.partial.npy`` with a progress file
  ``<stem>.progress.json`` (written atomically after the rows it counts); a rerun after an interruption, even
  a ``kill -9``, continues at the next batch. Batches have fixed boundaries, so the result is byte-identical
  to an uninterrupted run.
- One extractor per file: the work runs under a lock (:class:`recbole_mm.atomic.BuildLock`, file
  ``.<stem>.npy.lock``); a second process asking for the same file waits, then uses it. Leftovers of a killed
  run that cannot be resumed (other settings, temporary files, a stale lock) are removed with a warning.
- Publication: the sidecar is written first, then the finished rows are renamed to ``<stem>.npy``; a file is
  complete when both exist.
- Sharded: ``shard=(i, n)`` computes rows ``[i*N/n, (i+1)*N/n)`` into ``<stem>.shard-i-of-n.npy``; when the
  last shard finishes, the shards are merged into ``<stem>.npy`` (and removed), under the lock of ``<stem>.npy``:
  shards finishing together merge once, the others wait and return the merged file.
- Provenance: the sidecar records encoder, pooling, taps, dtype, shape, token order, checksum and settings, and
  the fingerprints of its inputs (:func:`input_fingerprint`: the item tokens, and the texts read or the image
  files' size and mtime). A file whose inputs changed (a re-converted dataset: new items, edited titles, new
  images) is stale: it is extracted again, with a warning saying what changed, never read.
- Storage dtype: ``feature_dtype`` (pooled) / ``token_feature_dtype`` (tokens, taps): float32 or float16.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from recbole_mm.atomic import (BuildLock, atomic_write_json, leftover_temps, lock_path_for, read_json,
                               remove_leftovers, temp_path_for)
from recbole_mm.data import features as ff
from recbole_mm.data.content import catalogue_tokens
from recbole_mm.utils import cfg_get

logger = logging.getLogger(__name__)


@dataclass
class ExtractSpec:
    """What to extract. ``kind``: pooled | taps | tokens. ``taps``: hidden-state indices (``None`` = all)."""

    modality: str  # "text" | "image"
    encoder: str
    pooling: str = "mean"
    kind: str = "pooled"
    taps: Optional[list] = None
    max_length: int = 32  # text
    text_fields: list = field(default_factory=lambda: ["title"])  # text
    lowercase: bool = False  # text
    normalize: bool = False  # text: L2-normalise pooled vectors
    image_size: int = 224  # image
    image_pretrained: bool = True  # image
    image_weights: Optional[str] = None  # image
    image_mean: Optional[list] = None  # image: normalisation (None: the encoder's own)
    image_std: Optional[list] = None  # image
    dtype: str = "float32"
    tap_pooling: Optional[str] = None  # text taps: cls | mean (padding included) | masked_mean | last

    def __post_init__(self):
        if self.dtype not in ("float32", "float16"):
            raise ValueError(f"feature dtype must be float32 or float16 (feature_dtype / token_feature_dtype / "
                             f"--dtype), got {self.dtype!r}")
        if self.modality == "text":
            if isinstance(self.text_fields, str):
                self.text_fields = [self.text_fields]
            if not self.text_fields:
                raise ValueError(
                    "text_fields is empty, but text features need item text: set text_fields to one or more "
                    "columns of the dataset's .item file (config key text_fields, e.g. text_fields: [title]; "
                    "recbole-mm extract --text-fields title)"
                )

    def stem(self) -> str:
        """File stem naming everything that changes the vectors, e.g. ``text-mean-len32-title_genres``."""
        parts = [self.modality, self.pooling]
        if self.kind == "taps":
            parts.append("taps" if self.taps is None else "taps" + "_".join(map(str, self.taps)))
            if self.modality == "text" and self.tap_pooling:
                parts.append(f"tp{self.tap_pooling}")
        elif self.kind == "tokens":
            parts.append("tokens")
        if self.modality == "text":
            parts.append(f"len{self.max_length}")
            parts.append("_".join(self.text_fields))
            parts += [flag for flag, on in (("lower", self.lowercase), ("norm", self.normalize)) if on]
        else:
            parts.append(f"{self.image_size}px")
            if not self.image_pretrained:
                parts.append("random")
            elif self.image_weights:
                parts.append("w" + _short_hash(os.path.abspath(self.image_weights)))
            if self.image_mean is not None or self.image_std is not None:
                parts.append("n" + _short_hash(f"{self.image_mean}|{self.image_std}"))
        if self.dtype != "float32":
            parts.append(self.dtype)
        return "-".join(parts)

    def settings(self) -> dict:
        s = asdict(self)
        for k in ("modality", "encoder", "pooling", "kind", "taps"):
            s.pop(k)
        if self.kind != "taps" or self.modality != "text":
            s.pop("tap_pooling")
        if self.modality == "text":
            for k in ("image_size", "image_pretrained", "image_weights", "image_mean", "image_std"):
                s.pop(k)
        else:
            for k in ("max_length", "text_fields", "lowercase", "normalize"):
                s.pop(k)
        return s


def _short_hash(text: str) -> str:
    import hashlib

    return hashlib.sha1(text.encode()).hexdigest()[:8]


def default_feature_path(dataset_dir: str, spec: ExtractSpec, features_dir: Optional[str] = None) -> str:
    from recbole_mm.encoders.hub import slug

    root = features_dir or os.path.join(dataset_dir, "features")
    return os.path.join(root, slug(spec.encoder), spec.stem() + ".npy")


def build_encoder(spec: ExtractSpec):
    output = spec.kind
    if spec.modality == "text":
        from recbole_mm.encoders.text import TextEncoder

        return TextEncoder(spec.encoder, pooling=spec.pooling, output=output, taps=spec.taps, normalize=spec.normalize,
                           tap_pooling=spec.tap_pooling if spec.kind == "taps" else None)
    if spec.modality == "image":
        from recbole_mm.encoders.image import ImageEncoder

        return ImageEncoder(
            spec.encoder,
            image_size=spec.image_size,
            pretrained=spec.image_pretrained,
            weights=spec.image_weights,
            pooling=spec.pooling,
            output=output,
            taps=spec.taps,
            mean=spec.image_mean,
            std=spec.image_std,
        )
    raise ValueError(f"modality must be text or image, got {spec.modality!r}")


class _Inputs:
    """Encoder inputs for rows ``[lo, hi)`` of the token list (text: token ids; image: uint8 pixels)."""

    def __init__(self, spec: ExtractSpec, encoder, dataset_dir: str, dataset_name: str, tokens: Sequence[str], config):
        self.spec = spec
        self.tokens = list(tokens)
        from recbole_mm.data.content import ItemContent

        content = ItemContent(["[PAD]"] + self.tokens, dataset_dir, dataset_name, config or {"image_size": spec.image_size})
        if spec.modality == "text":
            texts = content.text(spec.text_fields)[1:]
            if spec.lowercase:
                texts = [t.lower() for t in texts]
            if texts:
                enc = encoder.tokenizer(
                    texts, padding="max_length", truncation=True, max_length=spec.max_length, return_tensors="pt"
                )
                self.ids, self.mask = enc["input_ids"], enc["attention_mask"]
            else:  # an empty shard
                self.ids = self.mask = torch.zeros((0, spec.max_length), dtype=torch.long)
        else:
            self.content = content
            self.workers = int(cfg_get(config, "worker", 0) or 0)  # RecBole's key: DataLoader decoding processes
            store, rows = content.image_rows(spec.image_size)
            self.store, self.rows = store, rows[1:]

    def batch(self, lo: int, hi: int):
        if self.spec.modality == "text":
            ids, mask = self.ids[lo:hi], self.mask[lo:hi]
            if self.spec.kind == "tokens" or (self.spec.kind == "taps" and self.spec.tap_pooling == "mean"):
                return (ids, mask)  # token states / a mean over every position: the fixed width, not the batch's
            width = max(int(mask.sum(1).max().item()), 1)  # trim padding shared by the whole batch
            return (ids[:, :width], mask[:, :width])
        return (self.store.read(self.rows[lo:hi]),)

    def batches(self, start: int, stop: int, batch_size: int):
        """``(lo, hi, inputs)`` for rows ``[start, stop)`` in batches of ``batch_size``. Images are decoded by
        ``worker`` DataLoader processes (RecBole's key; 0 = here) while the encoder runs on the previous batch."""
        if self.spec.modality == "text" or start >= stop:
            for lo in range(start, stop, batch_size):
                hi = min(lo + batch_size, stop)
                yield lo, hi, self.batch(lo, hi)
            return
        from recbole_mm.data.content import item_image_batches

        ids = torch.arange(start + 1, stop + 1)  # content ids: row r is id r + 1 (id 0 is padding)
        lo = start
        for _, pixels in item_image_batches(self.content, ids, batch_size, self.workers, self.spec.image_size):
            yield lo, lo + len(pixels), (pixels,)
            lo += len(pixels)


def _row_shape(encoder, spec: ExtractSpec) -> tuple:
    """Shape of one output row: pooled ``(d,)``, taps ``(n_taps, d)``, tokens ``(T, d)``."""
    d = encoder.hidden_size
    if spec.kind == "pooled":
        return (d,)
    if spec.kind == "taps":
        return (len(encoder.taps), getattr(encoder, "tap_width", d))
    if spec.modality == "text":
        return (spec.max_length, d)
    with torch.inference_mode():  # image tokens: as many as the backbone makes for this size
        probe = torch.full((1, spec.image_size, spec.image_size, 3), 128, dtype=torch.uint8)
        return tuple(encoder(probe).shape[1:])


def extract_features(
    dataset_dir: str,
    dataset_name: str,
    spec: ExtractSpec,
    out_path: Optional[str] = None,
    batch_size: int = 64,
    shard: Optional[tuple[int, int]] = None,
    progress: bool = True,
    config: Optional[dict] = None,
    device: str = "cpu",
    _stop_after_batches: Optional[int] = None,
    replace_stale: bool = True,
) -> str:
    """Extract features for every item of the dataset folder. Returns the path of the merged file (or, for a
    shard while other shards are missing, the shard file).

    Safe to run from several processes at once for the same file: one extracts, the others wait and return it.
    """
    out_path = out_path or default_feature_path(dataset_dir, spec)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tokens = catalogue_tokens(dataset_dir, dataset_name, cfg_get(config, "ITEM_ID_FIELD", "item_id"),
                              cfg_get(config, "benchmark_filename"))
    inputs = input_fingerprint(spec, dataset_dir, dataset_name, tokens, config)
    n_total = len(tokens)
    lo_all, hi_all = 0, n_total
    target = out_path
    if shard is not None:
        i, n = shard
        if not (n >= 1 and 0 <= i < n):
            raise ValueError(f"shard must be i/n with 0 <= i < n, got {i}/{n}")
        lo_all, hi_all = (i * n_total) // n, ((i + 1) * n_total) // n
        target = _shard_path(out_path, i, n)
    if shard is None and _fresh(target, inputs):  # no lock needed to use a finished file (read-only folders work)
        logger.info(f"features already extracted: {target}")
        return target
    with BuildLock(lock_path_for(target), what=f"features {target}", log=logger):
        merged = shard is not None and _fresh(out_path, inputs)
        if _fresh(target, inputs) or merged:
            logger.info(f"features already extracted: {out_path if merged else target}")
            remove_leftovers(_work_leftovers(target), "feature extraction", logger, reason="the file is complete")
        else:
            for path in {target, out_path}:
                reason = _stale_reason(path, inputs) if _complete(path) else None
                if reason and not replace_stale:
                    raise ff.FeatureFileError(
                        f"features {path} were extracted from other inputs than the dataset folder holds now "
                        f"({reason}), and a checkpoint trained on them is being loaded: the file is left as it is. "
                        "Evaluate with the dataset folder the run used, or train again (a run extracts the features "
                        "again)")
                if reason:
                    logger.warning(f"features {path} were extracted from other inputs ({reason}): extracting "
                                   "them again (a checkpoint trained on the old file no longer loads)")
            _extract_locked(dataset_dir, dataset_name, spec, tokens[lo_all:hi_all], lo_all, target, shard,
                            batch_size, progress, config, device, _stop_after_batches, inputs)
    return _maybe_merge(out_path, shard) if shard else target


def _complete(path: str) -> bool:
    """A feature file is complete when its rows and its sidecar exist (the sidecar is written first)."""
    return os.path.isfile(path) and os.path.isfile(ff.sidecar_path(path))


def _digest(values) -> str:
    h = hashlib.sha256()
    for v in values:
        h.update(str(v).encode("utf-8") + b"\0")
    return h.hexdigest()


def input_fingerprint(spec: ExtractSpec, dataset_dir: str, dataset_name: str, tokens: Sequence[str],
                      config=None) -> dict:
    """What the rows of ``spec`` are computed from, in the dataset folder as it is now: the item tokens (as a
    set) and, per item, the text the encoder reads (``text_fields`` joined) or the image file's size and
    modification time (an image never decoded is not read: this stays cheap for large catalogues) and the image
    store's format and quality (the pixels the encoder sees)."""
    from recbole_mm.data.content import ItemContent

    tokens = [str(t) for t in tokens]
    out = {"items": len(tokens), "tokens_sha256": _digest(sorted(tokens))}
    content = ItemContent(["[PAD]"] + tokens, dataset_dir, dataset_name, config or {})
    if spec.modality == "text":
        out["text_sha256"] = _digest(content.text(spec.text_fields)[1:])
    else:
        from recbole_mm.data.images import find_images

        files = find_images(content.image_dir())

        def stamp(token):
            if token not in files:
                return f"{token}:-"
            st = os.stat(files[token])
            return f"{token}:{st.st_size}:{st.st_mtime_ns}"

        out["images_sha256"] = _digest(stamp(t) for t in tokens)
        store = content.store_settings(spec.image_size)  # the pixels are decoded from this store
        out["image_store"] = store["fmt"] + (f"-q{store['quality']}" if store["fmt"] == "jpeg" else "")
    return out


_INPUT_NAMES = {"text_sha256": "the text of some items changed", "images_sha256": "image files changed",
                "image_store": "the image store format or quality changed"}


def _stale_reason(path: str, inputs: dict) -> Optional[str]:
    """Why the complete feature file ``path`` does not fit ``inputs`` (``None`` when it does). A sidecar without
    inputs (written before they were recorded, or by :func:`~recbole_mm.data.features.write_features` elsewhere)
    is judged by its set of item tokens alone (``inputs`` hashes the sorted catalogue)."""
    side = ff.read_sidecar(path)
    have = side.get("inputs")
    if have is None:
        # rows are matched by token: a file with the catalogue's items in another order is still this catalogue's
        return None if _digest(sorted(side["tokens"])) == inputs["tokens_sha256"] else "the item list changed"
    if have.get("tokens_sha256") != inputs["tokens_sha256"]:
        return f"the item list changed: {have.get('items')} items, now {inputs['items']}"
    changed = [_INPUT_NAMES.get(k, f"{k} changed") for k in inputs if have.get(k) != inputs[k]]
    return ", ".join(changed) or None


def _fresh(path: str, inputs: dict) -> bool:
    return _complete(path) and _stale_reason(path, inputs) is None


def _work_files(target: str) -> tuple[str, str]:
    stem = os.path.splitext(target)[0]
    return stem + ".partial.npy", stem + ".progress.json"


def _work_leftovers(target: str) -> list[str]:
    """Partial rows, progress record and temporary files of ``target`` that exist."""
    partial, progress_file = _work_files(target)
    found = [p for p in (partial, progress_file) if os.path.exists(p)]
    return found + leftover_temps(target, ff.sidecar_path(target), ff.verified_path(target), partial, progress_file)


def _partial_fits(path: str, shape: tuple, dtype) -> bool:
    try:
        arr = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return False
    return tuple(arr.shape) == tuple(shape) and arr.dtype == np.dtype(dtype)


def _extract_locked(dataset_dir, dataset_name, spec, tokens, lo_all, target, shard, batch_size, progress, config,
                    device, _stop_after_batches, fingerprint=None) -> None:
    """Extract rows ``tokens`` into ``target`` (resuming a partial run); the caller holds the target's lock."""
    from tqdm.auto import tqdm

    partial, progress_file = _work_files(target)
    remove_leftovers(leftover_temps(target, ff.sidecar_path(target), ff.verified_path(target), partial, progress_file),
                     "feature extraction", logger, reason="temporary files")
    encoder = build_encoder(spec).to(device).eval()
    inputs = _Inputs(spec, encoder, dataset_dir, dataset_name, tokens, config)
    n_rows = len(tokens)
    token_digest = hashlib.sha256("\n".join(tokens).encode("utf-8")).hexdigest()
    # What the rows depend on (JSON round trip: the record read back compares equal).
    meta = json.loads(json.dumps({"spec": asdict(spec), "rows": n_rows, "lo": lo_all, "tokens_sha256": token_digest,
                                  "inputs": fingerprint}))
    dtype = np.dtype(spec.dtype)
    shape = (n_rows,) + _row_shape(encoder, spec)
    done = 0
    saved = read_json(progress_file)
    if saved is not None and saved.get("meta") == meta and _partial_fits(partial, shape, dtype):
        done = int(saved["done"])
        if saved.get("batch_size") != batch_size:  # same batches as the interrupted run: same bytes
            logger.info(f"resuming with the interrupted run's batch size {saved['batch_size']} (not {batch_size})")
            batch_size = int(saved["batch_size"])
        logger.info(f"resuming extraction of {target} at row {done} of {n_rows}")
    else:
        stale = [p for p in (partial, progress_file) if os.path.exists(p)]
        why = "made with other settings or items" if saved is not None else "no readable progress record"
        remove_leftovers(stale, "feature extraction", logger, reason=why)
    array = np.load(partial, mmap_mode="r+") if done else np.lib.format.open_memmap(partial, "w+", dtype, shape)
    bar = tqdm(total=n_rows, initial=done, desc=f"extract {spec.modality} {spec.stem()}", unit="item", disable=not progress)
    batches = 0
    with torch.inference_mode():
        for lo, hi, batch in inputs.batches(done, n_rows, batch_size):
            rows = encoder(*[t.to(device) for t in batch]).float().cpu().numpy()
            if dtype == np.float16 and np.abs(rows).max(initial=0.0) > np.finfo(np.float16).max:
                raise ff.FeatureFileError(
                    f"{spec.encoder} gives values beyond float16's range ({np.abs(rows).max():.3g}) for items "
                    f"{lo}..{hi - 1}: extract as float32 (--dtype float32; models: token_feature_dtype: float32)")
            array[lo:hi] = rows.astype(dtype)
            array.flush()
            atomic_write_json(progress_file, {"meta": meta, "done": hi, "batch_size": batch_size})
            bar.update(hi - lo)
            batches += 1
            if _stop_after_batches is not None and batches >= _stop_after_batches and hi < n_rows:
                bar.close()
                raise KeyboardInterrupt("stopped on request (_stop_after_batches)")
    bar.close()
    array.flush()
    del array
    widths = getattr(encoder, "tap_widths", None) if spec.kind == "taps" else None
    side = _sidecar(partial, tokens, spec, encoder, extra={"shard": list(shard) if shard else None, "tap_widths": widths},
                    inputs=fingerprint)
    ff.write_sidecar(target, side)  # first the sidecar, then the rows: a complete pair appears at the rename
    os.replace(partial, target)
    if os.path.exists(progress_file):  # an empty shard has none
        os.remove(progress_file)
    logger.info(f"wrote {target}")


def _sidecar(path: str, tokens: Sequence[str], spec: ExtractSpec, encoder, extra: Optional[dict] = None,
             inputs: Optional[dict] = None) -> dict:
    """The sidecar of the rows in ``path`` (its sha256 included)."""
    arr = np.load(path, mmap_mode="r")
    settings = spec.settings()
    if extra:
        settings.update({k: v for k, v in extra.items() if v is not None})
    return ff.make_sidecar(
        arr.shape,
        arr.dtype,
        tokens,
        modality=spec.modality,
        kind=spec.kind,
        encoder=spec.encoder,
        pooling=spec.pooling,
        taps=getattr(encoder, "taps", None) if spec.kind == "taps" else None,
        settings=settings,
        sha256=ff.file_sha256(path),
        inputs=inputs,
    )


def _shard_path(out_path: str, i: int, n: int) -> str:
    stem, ext = os.path.splitext(out_path)
    return f"{stem}.shard-{i}-of-{n}{ext}"


def _maybe_merge(out_path: str, shard: tuple[int, int]) -> str:
    """Merge all shards into ``out_path`` once every shard is complete; else return this shard's path.

    The merge runs under the lock of ``out_path``: shards finishing together merge once; the others wait, then
    return the merged file. A ``<stem>.merge.lock`` left by an older, killed merge is removed (reported).
    """
    _, n = shard
    paths = [_shard_path(out_path, i, n) for i in range(n)]
    own = _shard_path(out_path, shard[0], n)
    if not _complete(out_path) and not all(_complete(p) for p in paths):
        return own
    with BuildLock(lock_path_for(out_path), what=f"merge of {out_path}", log=logger):
        legacy = os.path.splitext(out_path)[0] + ".merge.lock"
        if os.path.exists(legacy):
            remove_leftovers([legacy], "shard merge", logger, reason="a merge lock no process holds")
        if _complete(out_path):
            merged = [f for p in paths if _complete(p) for f in (p, ff.sidecar_path(p), ff.verified_path(p))
                      if os.path.exists(f)]
            remove_leftovers(merged, "shard merge", logger, reason="shards already merged")
            return out_path
        if not all(_complete(p) for p in paths):
            return own
        remove_leftovers(_work_leftovers(out_path), "shard merge", logger, reason="temporary files")
        return merge_shards(out_path, n)


def merge_shards(out_path: str, n: int) -> str:
    """Concatenate ``<stem>.shard-i-of-n.npy`` (i = 0..n-1) into ``out_path`` with one sidecar; remove shards.

    Each shard is checked against its sidecar's sha256 first. Call it through :func:`extract_features` (which
    holds the lock of ``out_path``) when other processes may be working on the same files.
    """
    paths = [_shard_path(out_path, i, n) for i in range(n)]
    arrays, sides = zip(*(ff.open_features(p, verify_checksum="cached") for p in paths))
    tokens = [t for s in sides for t in s["tokens"]]
    shape = (sum(a.shape[0] for a in arrays),) + arrays[0].shape[1:]
    tmp = temp_path_for(out_path)
    try:
        merged = np.lib.format.open_memmap(tmp, mode="w+", dtype=arrays[0].dtype, shape=shape)
        row = 0
        for a in arrays:
            merged[row : row + a.shape[0]] = a
            row += a.shape[0]
        merged.flush()
        del merged
        side = dict(sides[0])
        side.update(shape=list(shape), tokens=tokens, sha256=ff.file_sha256(tmp),
                    created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        side["settings"] = {k: v for k, v in side.get("settings", {}).items() if k != "shard"}
        side["settings"]["merged_from_shards"] = n
        ff.write_sidecar(out_path, side)
        os.replace(tmp, out_path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    for p in paths:
        for f in (p, ff.sidecar_path(p), ff.verified_path(p)):
            if os.path.exists(f):
                os.remove(f)
    return out_path


def spec_from_config(config, modality: str, kind: str = "pooled", taps=None) -> ExtractSpec:
    """An :class:`ExtractSpec` from a run's config keys (``text_encoder``, ``text_pooling``, ...). Text taps pool
    by ``tap_pooling``, by default the original IISAN's for the encoder (mean for decoder LLMs, else CLS)."""
    if taps is not None and (isinstance(taps, (str, bytes)) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                                     for t in taps)):
        raise ValueError(f"{modality}_taps must be a list of hidden-state indices (integers) or null (~: all), "
                         f"got {taps!r}")

    def get(key, default=None):
        return cfg_get(config, key, default)

    if modality == "text":
        tap_pooling = None
        if kind == "taps":
            from recbole_mm.encoders.text import default_tap_pooling

            tap_pooling = get("tap_pooling") or default_tap_pooling(get("text_encoder", "all-MiniLM-L6-v2"))
        return ExtractSpec(
            tap_pooling=tap_pooling,
            modality="text",
            encoder=get("text_encoder", "all-MiniLM-L6-v2"),
            pooling=get("text_pooling", "mean"),
            kind=kind,
            taps=taps,
            max_length=int(get("text_max_length", 32)),
            text_fields=_text_fields(get("text_fields", ["title"])),
            lowercase=bool(get("text_lowercase", False)),
            normalize=bool(get("text_normalize", False)),
            dtype=str(get("feature_dtype", "float32")),
        )
    return ExtractSpec(
        modality="image",
        encoder=get("image_encoder", "tf_efficientnet_lite0"),
        pooling=get("image_pooling", "default"),
        kind=kind,
        taps=taps,
        image_size=int(get("image_size", 224)),
        image_pretrained=bool(get("image_pretrained", True)),
        image_weights=get("image_weights"),
        image_mean=get("image_mean"),
        image_std=get("image_std"),
        dtype=str(get("feature_dtype", "float32")),
    )


def _text_fields(value) -> list:
    return [value] if isinstance(value, str) else list(value)


def get_or_extract(config, dataset_dir: str, dataset_name: str, spec: ExtractSpec, progress: bool = True,
                   replace_stale: bool = True) -> str:
    """Path of the features for ``spec`` in a dataset folder, extracting them first if they are missing.

    An existing file made with other settings (max length, text fields, image size, ...) is an error naming
    both, instead of silently using the wrong features. A file made with these settings from other inputs (the
    dataset was converted again: new items, other titles, new images) is extracted again (:func:`extract_features`),
    unless ``replace_stale`` is False (a checkpoint being loaded: an error, the file untouched).
    """
    features_dir = cfg_get(config, "features_dir")
    path = default_feature_path(dataset_dir, spec, features_dir)
    if os.path.isfile(path):
        side = ff.read_sidecar(path)
        want = spec.settings()
        have = {k: v for k, v in side.get("settings", {}).items() if k in want}
        diff = {k: (have.get(k), want[k]) for k in want if have.get(k) != want[k]}
        for key in ("encoder", "modality", "kind"):
            if side.get(key) != getattr(spec, key):
                diff[key] = (side.get(key), getattr(spec, key))
        if spec.kind == "taps":  # the requested list, or every hidden state from 0 when none is given
            have_taps = side.get("taps")
            if spec.taps is not None and have_taps != [int(t) for t in spec.taps]:
                diff["taps"] = (have_taps, list(spec.taps))
            elif spec.taps is None and (not have_taps or have_taps != list(range(len(have_taps)))):
                diff["taps"] = (have_taps, "all")
        if diff:
            raise ff.FeatureFileError(
                f"feature file {path} was extracted with other settings (file vs requested: {diff}); delete it, "
                f"or extract the new settings elsewhere (features_dir / recbole-mm extract --output)"
            )
    batch_size = int(cfg_get(config, "extract_batch_size", 64))
    return extract_features(dataset_dir, dataset_name, spec, out_path=path, batch_size=batch_size, progress=progress,
                            config=config, replace_stale=replace_stale)
