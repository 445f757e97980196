"""Locating input files in a raw download folder and peeking at their first line (BOM-aware)."""

from __future__ import annotations

import fnmatch
import os
from typing import Optional, Sequence

from dataset_converters.errors import ConversionError


def _walk(root: str, depth: int) -> list[str]:
    """Files and folders under ``root`` up to ``depth`` levels deep, sorted, hidden entries skipped."""
    found = []
    level = [root]
    for _ in range(depth + 1):
        nxt = []
        for d in level:
            try:
                entries = sorted(os.listdir(d))
            except OSError:
                continue
            for e in entries:
                if e.startswith("."):
                    continue
                p = os.path.join(d, e)
                found.append(p)
                if os.path.isdir(p):
                    nxt.append(p)
        level = nxt
    return found


def find(root: str, patterns: Sequence[str], want_dir: bool = False, depth: int = 2) -> list[str]:
    """Paths under ``root`` whose base name matches one of ``patterns`` (case-insensitive), shallowest first."""
    hits = []
    for p in _walk(root, depth):
        if os.path.isdir(p) != want_dir:
            continue
        base = os.path.basename(p).lower()
        if any(fnmatch.fnmatchcase(base, pat.lower()) for pat in patterns):
            hits.append(p)
    hits.sort(key=lambda p: (p.count(os.sep), p))
    return hits


def find_one(root: str, patterns: Sequence[str], what: str, required: bool = True, want_dir: bool = False,
             depth: int = 2) -> Optional[str]:
    """The single match of ``patterns`` (the shallowest if several are equally deep is an error)."""
    hits = find(root, patterns, want_dir, depth)
    if not hits:
        if required:
            raise ConversionError(
                f"missing required {what}: expected a {'folder' if want_dir else 'file'} named "
                f"{' or '.join(patterns)} in {root}"
            )
        return None
    top = [h for h in hits if h.count(os.sep) == hits[0].count(os.sep)]
    if len(top) > 1:
        raise ConversionError(
            f"several candidates for the {what} in {root}: {', '.join(os.path.relpath(h, root) for h in top)}; "
            "pass the one to use explicitly"
        )
    return hits[0]


def require_file(path: str, what: str) -> str:
    if not os.path.isfile(path):
        raise ConversionError(f"missing required {what}: {path} does not exist")
    return path


def head_line(path: str, limit: int = 1 << 16) -> tuple[str, bool]:
    """``(first line, had_bom)`` of a UTF-8 file, line ending and BOM removed."""
    with open(path, "rb") as f:
        raw = f.read(limit)
    bom = raw.startswith(b"\xef\xbb\xbf")
    if bom:
        raw = raw[3:]
    line = raw.split(b"\n", 1)[0].rstrip(b"\r")
    try:
        return line.decode("utf-8"), bom
    except UnicodeDecodeError as e:
        raise ConversionError(f"unreadable header in {path}: the first line is not UTF-8 ({e})") from e


def is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return text.strip() not in ("", "nan", "inf", "-inf", "NaN")
