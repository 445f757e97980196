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
    created       ISO time; ``recbole_mm`` version
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from datetime import datetime, timezone
from typing import Iterable, Optional, Sequence

import numpy as np

FORMAT = "recbole_mm.features/1"
KINDS = ("pooled", "taps", "tokens")


class FeatureFileError(ValueError):
    """A feature file or its sidecar is missing, malformed, or does not match the dataset."""


def sidecar_path(npy_path: str) -> str:
    return os.path.splitext(npy_path)[0] + ".json"


def file_sha256(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _atomic_write_text(path: str, text: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


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
) -> dict:
    """The sidecar dict. ``created``: ISO time, ``"now"`` (default) or ``None`` (reproducible files)."""
    from recbole_mm import __version__

    if kind not in KINDS:
        raise ValueError(f"feature kind must be one of {KINDS}, got {kind!r}")
    expected_ndim = 2 if kind == "pooled" else 3
    if len(array_shape) != expected_ndim:
        raise ValueError(f"kind {kind!r} needs a {expected_ndim}-d array, got shape {tuple(array_shape)}")
    if len(tokens) != array_shape[0]:
        raise ValueError(f"{len(tokens)} tokens for {array_shape[0]} rows")
    return {
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


def write_sidecar(npy_path: str, sidecar: dict) -> None:
    _atomic_write_text(sidecar_path(npy_path), json.dumps(sidecar, ensure_ascii=False, indent=1) + "\n")


def write_features(npy_path: str, array: np.ndarray, tokens: Sequence[str], **meta) -> dict:
    """Write ``array`` (rows keyed by ``tokens``) and its sidecar atomically. Returns the sidecar dict.

    ``meta``: modality, kind, encoder, pooling, taps, settings, created (see :func:`make_sidecar`).
    """
    array = np.ascontiguousarray(array)
    if len(set(map(str, tokens))) != len(tokens):
        raise ValueError("feature tokens must be unique")
    os.makedirs(os.path.dirname(os.path.abspath(npy_path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(npy_path)), prefix=".tmp-", suffix=".npy")
    with os.fdopen(fd, "wb") as f:
        np.save(f, array)
    side = make_sidecar(array.shape, array.dtype, tokens, sha256=file_sha256(tmp), **meta)
    os.replace(tmp, npy_path)
    write_sidecar(npy_path, side)
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


def open_features(npy_path: str, verify_checksum: bool = False) -> tuple[np.ndarray, dict]:
    """Memory-map a feature file after checking it against its sidecar.

    Raises :class:`FeatureFileError` naming the file and the first bad token when the file is truncated, has
    extra rows, or has another shape / dtype than the sidecar says.
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
    if verify_checksum and side.get("sha256"):
        digest = file_sha256(npy_path)
        if digest != side["sha256"]:
            raise FeatureFileError(f"feature file {npy_path} does not match the sha256 in its sidecar")
    array = np.load(npy_path, mmap_mode="r")
    return array, side


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
