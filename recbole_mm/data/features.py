"""Frozen item features on disk: ``<stem>.npy`` plus a ``<stem>.json`` sidecar, keyed by item token.

Layout (inside a dataset folder)::

    features/<encoder_slug>/<stem>.npy    float array, row r = item token tokens[r]
    features/<encoder_slug>/<stem>.json   sidecar (see below)

The sidecar is the single source of truth about the rows: which item token each row belongs to, and how the
vectors were made. Rows are never assumed to follow RecBole's internal ids (RecBole remaps ids by first
appearance in ``.inter``): :func:`align_rows` maps tokens to internal ids once.

Sidecar keys::

    format        "recbole_mm.features/1"
    modality      "text" | "image" | any string (e.g. "audio" from an MMRec folder)
    kind          "pooled" [n, d] | "taps" [n, n_taps, d] | "tokens" [n, T, d]
    encoder       encoder id or path the vectors came from (or "external" for imported files)
    pooling       "cls" | "mean" | "none" | ...
    taps          list of hidden-state indices for kind "taps", else null
    dtype, shape  of the array in the .npy file
    tokens        list of item tokens, one per row, in row order
    sha256        of the .npy file bytes
    settings      dict of extraction settings (max_length, text fields, image size, ...)
    inputs        fingerprints of the inputs (item tokens; the texts read, or the image files' size and mtime), or
                  null for files made elsewhere: extraction compares them with the dataset folder and extracts
                  again when they differ (a re-converted dataset never reads stale features)
    created       ISO time; ``recbole_mm`` version

Integrity: loading a file for a model (:meth:`ItemContent.features`) checks its bytes against the sidecar's
``sha256`` (:func:`verify_sha256`), so rows changed behind the sidecar's back (permuted, overwritten, partly
copied) are an error naming the file and what to do. The verdict is cached in ``<stem>.verified.json`` (written
atomically) keyed by the file's size, mtime, ctime and inode, so later loads, in this process or another, do
not read the file again. A verdict is trusted only for a file whose last modification is older than the
verification by more than ``RACY_SECONDS`` (git's "racily clean" rule: a change in the same timestamp tick as
the verification would not show in size and mtime); a fresher file is simply hashed again next time.

:func:`feature_fingerprint` summarises a verified file (sha256, shape, dtype, encoder, ...) for checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from datetime import datetime, timezone
from typing import Iterable, Optional, Sequence, Union

import numpy as np

from recbole_mm.atomic import atomic_write_text, read_json, temp_path_for

logger = logging.getLogger(__name__)

FORMAT = "recbole_mm.features/1"
VERIFIED_FORMAT = "recbole_mm.features.verified/1"
KINDS = ("pooled", "taps", "tokens")
RACY_SECONDS = 2.0


class FeatureFileError(ValueError):
    """A feature file or its sidecar is missing, malformed, or does not match the dataset."""


def sidecar_path(npy_path: str) -> str:
    return os.path.splitext(npy_path)[0] + ".json"


def verified_path(npy_path: str) -> str:
    """Where the cached checksum verdict of ``npy_path`` lives: ``<stem>.verified.json``."""
    return os.path.splitext(npy_path)[0] + ".verified.json"


def file_sha256(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _atomic_write_text(path: str, text: str) -> None:
    atomic_write_text(path, text)


def make_sidecar(
    array_shape: Sequence[int],
    dtype,
    tokens: Sequence[str],
    *,
    modality: str,
    kind: str,
    encoder: str,
    pooling: str = "none",
    taps: Optional[Sequence[int]] = None,
    settings: Optional[dict] = None,
    sha256: Optional[str] = None,
    created: Optional[str] = "now",
    inputs: Optional[dict] = None,
) -> dict:
    """The sidecar dict. ``created``: ISO time, ``"now"`` (default) or ``None`` (reproducible files). ``inputs``:
    fingerprints of what the rows were computed from (:func:`recbole_mm.extract.input_fingerprint`)."""
    from recbole_mm._version import __version__

    if kind not in KINDS:
        raise ValueError(f"feature kind must be one of {KINDS}, got {kind!r}")
    expected_ndim = 2 if kind == "pooled" else 3
    if len(array_shape) != expected_ndim:
        raise ValueError(f"kind {kind!r} needs a {expected_ndim}-d array, got shape {tuple(array_shape)}")
    if len(tokens) != array_shape[0]:
        raise ValueError(f"{len(tokens)} tokens for {array_shape[0]} rows")
    side = {
        "format": FORMAT,
        "modality": modality,
        "kind": kind,
        "encoder": encoder,
        "pooling": pooling,
        "taps": list(taps) if taps is not None else None,
        "dtype": np.dtype(dtype).name,
        "shape": [int(s) for s in array_shape],
        "tokens": [str(t) for t in tokens],
        "sha256": sha256,
        "settings": settings or {},
        "created": datetime.now(timezone.utc).replace(microsecond=0).isoformat() if created == "now" else created,
        "recbole_mm_version": __version__,
    }
    if inputs is not None:
        side["inputs"] = inputs
    return side


def write_sidecar(npy_path: str, sidecar: dict) -> None:
    _atomic_write_text(sidecar_path(npy_path), json.dumps(sidecar, ensure_ascii=False, indent=1) + "\n")


def write_features(npy_path: str, array: np.ndarray, tokens: Sequence[str], **meta) -> dict:
    """Write ``array`` (rows keyed by ``tokens``) and its sidecar atomically. Returns the sidecar dict.

    ``meta``: modality, kind, encoder, pooling, taps, settings, created (see :func:`make_sidecar`).
    """
    array = np.ascontiguousarray(array)
    if len(set(map(str, tokens))) != len(tokens):
        raise ValueError("feature tokens must be unique")
    tmp = temp_path_for(npy_path)
    try:
        with open(tmp, "wb") as f:
            np.save(f, array)
        side = make_sidecar(array.shape, array.dtype, tokens, sha256=file_sha256(tmp), **meta)
        write_sidecar(npy_path, side)  # first the sidecar, then the rows it describes appear
        os.replace(tmp, npy_path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return side


def read_sidecar(npy_path: str) -> dict:
    sp = sidecar_path(npy_path)
    if not os.path.isfile(sp):
        raise FeatureFileError(f"feature sidecar {sp} is missing (every .npy needs its .json with the row tokens)")
    try:
        with open(sp, encoding="utf-8") as f:
            side = json.load(f)
    except json.JSONDecodeError as e:
        raise FeatureFileError(f"feature sidecar {sp} is not valid JSON: {e}") from e
    for key in ("tokens", "shape", "dtype", "kind"):
        if key not in side:
            raise FeatureFileError(f"feature sidecar {sp} has no {key!r} key")
    if len(side["tokens"]) != side["shape"][0]:
        raise FeatureFileError(
            f"feature sidecar {sp} lists {len(side['tokens'])} tokens for shape {side['shape']}"
        )
    return side


def open_features(npy_path: str, verify_checksum: Union[bool, str] = False) -> tuple[np.ndarray, dict]:
    """Memory-map a feature file after checking it against its sidecar.

    Raises :class:`FeatureFileError` naming the file and the first bad token when the file is truncated, has
    extra rows, or has another shape / dtype than the sidecar says. ``verify_checksum``: ``False`` (header and
    size only), ``"cached"`` (the sha256 too, through the cached verdict: :func:`verify_sha256`) or ``True``
    (the sha256, always re-hashed).
    """
    if not os.path.isfile(npy_path):
        raise FeatureFileError(f"feature file {npy_path} does not exist")
    side = read_sidecar(npy_path)
    tokens = side["tokens"]
    want_shape = tuple(side["shape"])
    try:
        with open(npy_path, "rb") as f:
            major, _ = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(f)
            offset = f.tell()
    except (ValueError, OSError) as e:
        raise FeatureFileError(f"feature file {npy_path} is not a readable .npy file: {e}") from e
    if np.dtype(dtype).name != side["dtype"]:
        raise FeatureFileError(f"feature file {npy_path} holds {np.dtype(dtype).name}, sidecar says {side['dtype']}")
    if tuple(shape[1:]) != want_shape[1:]:
        raise FeatureFileError(
            f"feature file {npy_path} has rows of shape {tuple(shape[1:])}, sidecar says {want_shape[1:]}; "
            f"first bad token: {tokens[0] if tokens else '-'}"
        )
    if shape[0] != want_shape[0]:
        if shape[0] > want_shape[0]:
            raise FeatureFileError(
                f"feature file {npy_path} has {shape[0]} rows but its sidecar lists {want_shape[0]} tokens "
                f"(extra rows after token {tokens[-1] if tokens else '-'})"
            )
        raise FeatureFileError(
            f"feature file {npy_path} has {shape[0]} rows but its sidecar lists {want_shape[0]} tokens; "
            f"first bad token: {tokens[shape[0]]}"
        )
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize
    size = os.path.getsize(npy_path)
    complete_rows = (size - offset) // row_bytes if row_bytes else shape[0]
    if complete_rows < shape[0]:
        raise FeatureFileError(
            f"feature file {npy_path} is truncated: {complete_rows} complete rows of {shape[0]}; "
            f"first bad token: {tokens[complete_rows]}"
        )
    if size - offset > shape[0] * row_bytes:
        raise FeatureFileError(
            f"feature file {npy_path} has {size - offset - shape[0] * row_bytes} bytes after its last row "
            f"(token {tokens[-1] if tokens else '-'})"
        )
    if verify_checksum:
        verify_sha256(npy_path, side, force=verify_checksum is True)
    array = np.load(npy_path, mmap_mode="r")
    return array, side


def _stat_key(st: os.stat_result) -> dict:
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "ino": st.st_ino}


def _cached_sha256(npy_path: str, st: os.stat_result) -> Optional[str]:
    """The sha256 recorded for exactly this file state, if the record can be trusted."""
    record = read_json(verified_path(npy_path))
    if not isinstance(record, dict) or record.get("format") != VERIFIED_FORMAT:
        return None
    if record.get("file") != os.path.basename(npy_path) or record.get("stat") != _stat_key(st):
        return None
    verified_at = record.get("verified_at_ns")
    if not isinstance(verified_at, int) or st.st_mtime_ns > verified_at - int(RACY_SECONDS * 1e9):
        return None  # modified too shortly before the verification to tell a later change by size and mtime
    return record.get("sha256")


def _record_sha256(npy_path: str, st: os.stat_result, digest: str, started_ns: int) -> None:
    record = {"format": VERIFIED_FORMAT, "file": os.path.basename(npy_path), "stat": _stat_key(st),
              "sha256": digest, "verified_at_ns": started_ns}
    try:
        atomic_write_text(verified_path(npy_path), json.dumps(record) + "\n")
    except OSError as e:  # a read-only dataset folder: verify again next time
        logger.debug(f"cannot cache the checksum verdict of {npy_path}: {e}")


def file_sha256_cached(npy_path: str, force: bool = False) -> str:
    """sha256 of a feature file, from the verdict cache when the file is unchanged since it was recorded."""
    st = os.stat(npy_path)
    if not force:
        cached = _cached_sha256(npy_path, st)
        if cached:
            return cached
    started = time.time_ns()
    digest = file_sha256(npy_path)
    after = os.stat(npy_path)
    trusted = after.st_mtime_ns <= started - int(RACY_SECONDS * 1e9)  # else the record could not be trusted
    if trusted and _stat_key(after) == _stat_key(st):  # and not modified while we read it
        _record_sha256(npy_path, after, digest, started)
    return digest


def verify_sha256(npy_path: str, side: Optional[dict] = None, force: bool = False) -> str:
    """Check ``npy_path`` against the sha256 of its sidecar; returns the file's sha256.

    The verdict is cached (``<stem>.verified.json``), so an unchanged file is read once, not at every load.
    A sidecar without ``sha256`` (an imported file) has nothing to check: the file's sha256 is returned.
    Raises :class:`FeatureFileError` naming the file and what to do when they differ.
    """
    side = side if side is not None else read_sidecar(npy_path)
    digest = file_sha256_cached(npy_path, force=force)
    want = side.get("sha256")
    if want and digest != want:
        raise FeatureFileError(
            f"feature file {npy_path} does not match its sidecar {sidecar_path(npy_path)}: the file's sha256 is "
            f"{digest[:16]}..., the sidecar records {want[:16]}... (its rows were changed, e.g. permuted or "
            f"overwritten, after the sidecar was written). Delete both files and extract again (recbole-mm "
            f"extract, or let the model extract on first use); if the new rows are right, rewrite the pair with "
            f"recbole_mm.data.features.write_features."
        )
    return digest


def feature_fingerprint(npy_path: str, side: Optional[dict] = None, sha256: Optional[str] = None) -> dict:
    """What identifies a feature file, for checkpoints: the file's verified sha256 and the sidecar's description.

    Keys: ``file`` (base name), ``sha256`` (of the .npy bytes, checked against the sidecar), ``shape``, ``dtype``,
    ``modality``, ``kind``, ``encoder``, ``pooling``, ``taps``, ``settings``, ``tokens_sha256`` (of the row
    order: the tokens joined by newlines). Uses the cached verdict, so it costs nothing for a verified file.
    ``side`` / ``sha256``: already read / verified by the caller.
    """
    side = side if side is not None else read_sidecar(npy_path)
    digest = sha256 if sha256 is not None else verify_sha256(npy_path, side)
    return {
        "file": os.path.basename(npy_path),
        "sha256": digest,
        "shape": [int(s) for s in side["shape"]],
        "dtype": side["dtype"],
        "modality": side.get("modality"),
        "kind": side.get("kind"),
        "encoder": side.get("encoder"),
        "pooling": side.get("pooling"),
        "taps": side.get("taps"),
        "settings": side.get("settings", {}),
        "tokens_sha256": hashlib.sha256("\n".join(side["tokens"]).encode("utf-8")).hexdigest(),
    }


def align_rows(file_tokens: Sequence[str], wanted_tokens: Iterable[str], source: str) -> np.ndarray:
    """Row index in a token-keyed file for each wanted token (``-1`` for the padding token ``[PAD]``).

    Raises :class:`FeatureFileError` naming ``source`` and the first token that has no row.
    """
    index = {t: i for i, t in enumerate(file_tokens)}
    wanted = list(wanted_tokens)
    rows = np.empty(len(wanted), dtype=np.int64)
    missing = []
    for j, tok in enumerate(wanted):
        if tok == "[PAD]":
            rows[j] = -1
            continue
        r = index.get(tok)
        if r is None:
            missing.append(tok)
            rows[j] = -1
        else:
            rows[j] = r
    if missing:
        raise FeatureFileError(
            f"{source} has no row for {len(missing)} item token(s) of the dataset; first missing token: "
            f"{missing[0]!r} (others: {missing[1:4]})"
        )
    return rows
