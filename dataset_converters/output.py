"""Atomic output folder and the atomic-file writers (``.inter`` via pyarrow, ``.item`` / ``.user`` row by row).

The dataset is built in ``OUT_ROOT/.NAME.tmp-<random>`` and renamed to ``OUT_ROOT/NAME`` only when every file is
written, so an interrupted or failed run leaves no half-written dataset (the temporary folder is removed). An
existing ``OUT_ROOT/NAME`` is refused unless ``overwrite`` is set.

A run holds a lock (``OUT_ROOT/.NAME.lock``, :class:`recbole_mm.atomic.BuildLock` on ``filelock``) from start to
end, so two conversions into the same ``OUT_ROOT/NAME`` run one after the other. While holding it, a run removes
what a killed run left (``.NAME.tmp-*`` and ``.NAME.old-*`` folders, the stale lock) and says so in a warning.

Files are UTF-8, tab-separated, ``\\n`` line endings, no quoting: values never contain tabs or line breaks (the
text rule of :mod:`dataset_converters.text` and the id checks of :mod:`dataset_converters.interactions`
guarantee it), so a reader splits lines at ``\\t`` (pandas: ``sep="\\t", quoting=csv.QUOTE_NONE``).
"""

from __future__ import annotations

import logging
import os
from typing import Iterable, Sequence

import pyarrow as pa
import pyarrow.csv as pcsv

from dataset_converters.errors import ConversionError

logger = logging.getLogger("dataset_converters")


class AtomicDir:
    """Context manager yielding a temporary folder that becomes ``out_root/name`` on success
    (:class:`recbole_mm.atomic.FolderBuild`, which also holds the lock and removes leftovers of killed runs)."""

    def __init__(self, out_root: str, name: str, overwrite: bool = False):
        if not name or os.sep in name or name.startswith("."):
            raise ConversionError(f"invalid dataset name {name!r}")
        from recbole_mm.atomic import FolderBuild

        self.build = FolderBuild(out_root, name, what="conversion", log=logger)
        self.overwrite = overwrite

    def __enter__(self) -> str:
        self.build.__enter__()
        try:
            if os.path.exists(self.build.target) and not self.overwrite:
                raise ConversionError(f"output folder {self.build.target} already exists; pass --overwrite to replace it")
            return self.build.tmp()
        except BaseException as e:
            self.build.__exit__(type(e), e, e.__traceback__)
            raise

    def __exit__(self, exc_type, exc, tb) -> bool:
        return self.build.__exit__(exc_type, exc, tb)


def write_table_columnar(path: str, header: Sequence[str], table) -> None:
    """Write ``table`` (columns in ``header`` order) with the atomic header line, via pyarrow's csv writer.

    ``table`` is a ``pa.Table`` or an iterable of tables / record batches written one after the other (the
    out-of-core path streams its sorted rows this way).
    """
    pieces = [table] if isinstance(table, (pa.Table, pa.RecordBatch)) else table
    options = pcsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none", batch_size=1 << 16)
    with open(path, "wb") as f:
        f.write(("\t".join(header) + "\n").encode("utf-8"))
        for piece in pieces:
            if piece.num_rows:
                pcsv.write_csv(piece, f, options)


def write_rows(path: str, header: Sequence[str], rows: Iterable[Sequence[str]]) -> int:
    """Write string rows (already cleaned) under ``header``; returns the number of rows."""
    n = 0
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write("\t".join(header) + "\n")
        for row in rows:
            f.write("\t".join(row) + "\n")
            n += 1
    return n
