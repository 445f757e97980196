"""Out-of-core interaction pipeline: the steps of :mod:`dataset_converters.interactions` on DuckDB, in bounded memory.

Why DuckDB: every step of the protocol is a relational operation DuckDB runs out of core under a hard
``memory_limit``, spilling to ``temp_directory`` (hash aggregates and joins, window functions partitioned by user,
``ORDER BY``): first appearance of each user / item (``GROUP BY`` + ``min(row)``), ``--dedup`` (``row_number()``
over (user, item)), ``--keep-last`` (``row_number()`` over user, newest first), ``--min-user-inter`` (``count()``
over user) and the final per-user time sort. The in-memory path needs ~160 bytes per input row (PixelRec 8M's
158M interactions: ~25 GB); this one keeps the rows in DuckDB's buffer pool, capped by ``--memory-limit``, and
spills the rest to a work folder (``--temp-dir``), plus ~1 GB for Python, pyarrow's reader and the item table.

The output is the in-memory path's, byte for byte (``tests/test_outofcore.py`` compares both on every fixture and
on random inputs), because the semantics are reproduced exactly:

- the csv is read by the same pyarrow parser (streamed, one block of ``block_size`` bytes at a time: no column is
  ever concatenated, so arrow's 2 GiB limit per string array never applies), malformed lines counted the same way;
- a sequence file (``user<TAB>item item ...``) is read by the same parser (tab-separated, no quoting), each line
  exploded into one row per item in the block (:class:`SequenceColumns`) with its position as the timestamp;
  positions continue over the lines of a user found on several lines (a window over ``rn`` per user in DuckDB);
  a line longer than a block makes the reader start again with blocks twice as large (memory: the longest line);
- each row keeps its index ``rn`` in the parsed table; a user's (item's) order of first appearance is the smallest
  ``rn`` among all its rows, *including* rows dropped later, as the in-memory id codes are;
- timestamps are parsed per block with the same pyarrow casts; the in-memory rule "int64 if the whole column casts
  to int64, else float64, else the regex path" is global, so each block records whether its casts succeeded and
  the column is re-read in the regex mode only when neither cast succeeds on every block;
- ties are broken by ``rn`` everywhere (the in-memory sorts are stable on input order);
- tokens are written as read (strings), timestamps as int64 / float64 through pyarrow's csv writer.

Drop counts and their first examples (provenance) come from the same rows in the same order.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import shutil
import tempfile
import time
import weakref
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from dataset_converters.errors import ConversionError
from dataset_converters.interactions import _BAD_TOKEN, _NUMBER, SECTION, split_sequence_lines
from dataset_converters.provenance import MAX_EXAMPLES, Provenance

logger = logging.getLogger("dataset_converters")

WORK_PREFIX = "dataset_converters-work-"
BLOCK_SIZE = 1 << 24  # bytes of csv per streamed block (same as the in-memory reader's block size)
OUT_BATCH_ROWS = 1 << 20  # rows per record batch fetched from DuckDB for writing
# The in-memory path peaks at ~6.3x the csv size (docs/benchmarks.md, 10M rows: 1.80 GB for 284 MB); ``auto``
# switches to DuckDB when 8x the interaction file would exceed the memory cap.
MEMORY_PER_INPUT_BYTE = 8
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MB": 1 << 20, "MIB": 1 << 20,
          "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30, "T": 1 << 40, "TB": 1 << 40, "TIB": 1 << 40}
_BAD_BYTES = np.array([9, 10, 13, 34], dtype=np.uint8)  # \t \n \r " (the bytes _BAD_TOKEN matches)
_HEX_BYTES = np.array([ord("x"), ord("X")], dtype=np.uint8)


# --------------------------------------------------------------------------------------------- settings
def parse_size(text: str) -> int:
    """``"8GB"``, ``"512MiB"``, ``"2.5G"``, ``"1000000"`` -> bytes (binary units: 1 GB = 2**30 bytes)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise ConversionError(f"--memory-limit {text!r} is not a size: write it like 8GB, 512MB or 2.5G")
    value = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if value < 64 << 20:
        raise ConversionError(f"--memory-limit {text!r} is below 64MB, too small for the conversion")
    return value


def physical_memory() -> int:
    """Bytes of RAM this process may use: the machine's, or a smaller cgroup (container) limit."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        ram = 8 << 30
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                text = f.read().strip()
            if text.isdigit():
                ram = min(ram, int(text))
        except OSError:
            pass
    return ram


def default_memory_limit() -> int:
    """Half of the usable RAM: room for the rest of the process and the OS page cache of the spill files."""
    return physical_memory() // 2


def format_size(n: int) -> str:
    return f"{n / 2**30:.1f}GB" if n >= 1 << 30 else f"{n / 2**20:.0f}MB"


@dataclass
class Engine:
    """How the interactions are processed: ``memory`` (numpy, :mod:`~dataset_converters.interactions`) or
    ``duckdb`` (this module) with a memory cap in bytes and a folder for the database and its spill files."""

    name: str = "memory"
    memory_limit: int = 0
    temp_dir: Optional[str] = None
    threads: Optional[int] = None

    @property
    def out_of_core(self) -> bool:
        return self.name == "duckdb"


def choose_engine(choice: str, memory_limit: Optional[str], temp_dir: Optional[str], input_bytes: int) -> Engine:
    """The engine for ``--engine choice`` (``auto``: DuckDB when the in-memory path would not fit the cap)."""
    limit = parse_size(memory_limit) if memory_limit else default_memory_limit()
    if temp_dir is not None and not os.path.isdir(temp_dir):
        raise ConversionError(f"--temp-dir {temp_dir} is not a folder; create it or pass another one")
    if choice not in ("auto", "memory", "duckdb"):
        raise ConversionError(f"--engine must be auto, memory or duckdb, got {choice!r}")
    if choice == "auto":
        choice = "duckdb" if input_bytes * MEMORY_PER_INPUT_BYTE > limit else "memory"
        if choice == "duckdb":
            logger.info("interactions of %s: out-of-core conversion (DuckDB, memory cap %s; --engine memory "
                        "forces the in-memory path)", format_size(input_bytes), format_size(limit))
    return Engine(choice, limit, temp_dir)


# --------------------------------------------------------------------------------------------- work folder
class WorkDir:
    """``<temp_dir>/dataset_converters-work-<random>/``: the DuckDB database and its spill files, removed at the
    end. The folder's ``owner.lock`` is held while the run lives; a folder whose lock nobody holds was left by a
    killed run and is removed (with a warning) by the next run using the same temp folder."""

    def __init__(self, temp_dir: Optional[str]):
        import filelock

        from recbole_mm.atomic import remove_leftovers

        root = os.path.abspath(temp_dir or tempfile.gettempdir())
        stale = []
        for path in glob.glob(os.path.join(root, WORK_PREFIX + "*")):
            lock = filelock.FileLock(os.path.join(path, "owner.lock"))
            try:
                lock.acquire(timeout=0)
            except (filelock.Timeout, OSError):
                continue  # a live run's folder
            stale.append(path)
            lock.release()
        remove_leftovers(stale, "out-of-core conversion", logger, reason="no process owned them")
        try:
            self.path = tempfile.mkdtemp(prefix=WORK_PREFIX, dir=root)
        except OSError as e:
            raise ConversionError(f"cannot create a work folder in {root} ({e}); pass --temp-dir") from e
        self.lock = filelock.FileLock(os.path.join(self.path, "owner.lock"))
        self.lock.acquire()
        self._finalizer = weakref.finalize(self, WorkDir._remove, self.path, self.lock)

    @staticmethod
    def _remove(path: str, lock) -> None:
        try:
            lock.release()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass
        shutil.rmtree(path, ignore_errors=True)

    def close(self) -> None:
        self._finalizer()


# --------------------------------------------------------------------------------------------- reading
def _has_bytes(arr: pa.Array, values: np.ndarray) -> bool:
    """Whether the character data of the string array ``arr`` holds any of the byte ``values`` (cheap scan)."""
    arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
    data = arr.buffers()[2]
    if data is None or data.size == 0:
        return False
    chars = np.frombuffer(data, dtype=np.uint8)
    if values is _BAD_BYTES and chars.min() > _BAD_BYTES.max():  # one fast pass: ids of digits / letters
        return False
    return bool(np.isin(chars, values).any())


def _bad_token_mask(arr: pa.Array) -> np.ndarray:
    if not _has_bytes(arr, _BAD_BYTES):  # the usual case: no regex over the block
        return np.zeros(len(arr), dtype=bool)
    return pc.match_substring_regex(arr, _BAD_TOKEN).to_numpy(zero_copy_only=False)


def _try_cast(col: pa.Array, typ: pa.DataType) -> Optional[pa.Array]:
    try:
        return pc.cast(col, typ)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None


class _Flags:
    def __init__(self):
        self.int_ok = True
        self.float_ok = True


def _parse_ts_block(col: pa.Array, regex_mode: bool, flags: _Flags) -> tuple[pa.Array, pa.Array, np.ndarray]:
    """``(ti, tf, valid)`` of one block: int64 / float64 casts (null where the block's cast failed)."""
    n = len(col)
    valid = np.ones(n, dtype=bool)
    if regex_mode:  # the in-memory path's fallback: numbers by regex, others set to "0", then trimmed
        valid = pc.match_substring_regex(col, _NUMBER).to_numpy(zero_copy_only=False)
        col = pc.utf8_trim_whitespace(pc.if_else(pa.array(valid), col, "0"))
    ti = _try_cast(col, pa.int64())
    tf = None
    if ti is None:
        flags.int_ok = False
        tf = _try_cast(col, pa.float64())
        if tf is None:
            flags.float_ok = False
    elif flags.float_ok and _has_bytes(col, _HEX_BYTES) and _try_cast(col, pa.float64()) is None:
        flags.float_ok = False  # "0x10" casts to int64 but not to float64: matters if another block is not int
    return (ti if ti is not None else pa.nulls(n, pa.int64()),
            tf if tf is not None else pa.nulls(n, pa.float64()), valid)


def _stream_blocks(path: str, names: Sequence[str], delimiter: str, skip_rows: int, quote: bool,
                   malformed: list, examples: Optional[list], block_size: int,
                   threads: bool = False) -> Iterator[pa.RecordBatch]:
    """The csv's blocks in file order, every column a string; lines with another field count are skipped and
    counted in ``malformed``, the first ones described in ``examples`` (single-threaded reads only: a threaded
    read does not know line numbers; :func:`_malformed_examples` gets them afterwards)."""
    def handler(row) -> str:
        malformed.append(1)
        if examples is not None and len(examples) < MAX_EXAMPLES:
            line = row.number + skip_rows if row.number is not None else "?"
            examples.append(f"line {line}: {row.text[:80]!r} ({row.actual_columns} fields)")
        return "skip"

    try:
        reader = pcsv.open_csv(
            path,
            read_options=pcsv.ReadOptions(column_names=list(names), skip_rows=skip_rows, use_threads=threads,
                                          block_size=block_size),
            parse_options=pcsv.ParseOptions(delimiter=delimiter, quote_char='"' if quote else False,
                                            invalid_row_handler=handler),
            convert_options=pcsv.ConvertOptions(column_types={n: pa.string() for n in names},
                                                strings_can_be_null=False, quoted_strings_can_be_null=False),
        )
        for batch in reader:
            yield batch
    except (pa.ArrowInvalid, OSError) as e:
        if "straddl" in str(e):
            raise _LineTooLong(f"{path}: a line is longer than the block size {block_size}") from e
        raise ConversionError(f"cannot parse {path} as {len(names)} {delimiter!r}-separated columns {list(names)}: {e}")


class _LineTooLong(ConversionError):
    """A line does not fit one block of the streamed reader: read again with larger blocks."""


RAW_SCHEMA = pa.schema([("rn", pa.int64()), ("u", pa.string()), ("i", pa.string()), ("ti", pa.int64()),
                        ("tf", pa.float64()), ("flag", pa.int8()), ("traw", pa.string())])
FLAG_EMPTY, FLAG_TS, FLAG_USER, FLAG_ITEM = 1, 2, 3, 4


def _raw_batches(path, names, delimiter, skip_rows, columns, regex_mode, flags, state, block_size, progress):
    """Blocks of the csv as rows of the staging table (see :data:`RAW_SCHEMA`)."""
    try:
        yield from _raw_rows(path, names, delimiter, skip_rows, columns, regex_mode, flags, state, block_size,
                             progress)
    except BaseException as e:  # DuckDB re-raises it as its own error: keep the original for the caller
        state["error"] = e
        raise


class Columns:
    """Picks the user, item and timestamp columns of each block. Subclasses may also clean them and drop rows
    before they are numbered (as a converter does before :func:`~dataset_converters.interactions.build`), counting
    the drops in ``dropped`` with the first ``examples`` (``row`` = 0-based index among the parsed rows)."""

    reason = ""
    quote = True  # double quotes delimit fields (csv); False: they are plain characters (tsv)
    positional = False  # the timestamps are positions (examples say "position")

    def __init__(self, user: str = "user", item: str = "item", timestamp: str = "timestamp"):
        self.names = (user, item, timestamp)
        self.reset()

    def reset(self) -> None:
        self.dropped, self.examples = 0, []

    def __call__(self, batch: pa.RecordBatch, row0: int):
        """``(user, item, timestamp, keep)`` of the block; ``keep`` is None (all rows) or a boolean mask.

        ``timestamp`` is a string array (parsed as the in-memory path parses it) or an int64 array (taken as is)."""
        return (*(batch.column(n) for n in self.names), None)

    def staged(self, inter: "DuckInteractions", prov: Provenance) -> None:
        """Called once the rows are staged (table ``raw``) and the drops above recorded, before ``rows_parsed``."""


class SequenceColumns(Columns):
    """``user<TAB>item item ...`` lines exploded into one row per item, as
    :func:`~dataset_converters.interactions.read_sequences` does: the user trimmed, the items split at runs of
    whitespace, timestamp = 0-based position in the line; a line without items is dropped ("sequence line without
    items"). A user on several lines gets positions that continue over its lines (set in SQL once every line is
    staged, :meth:`staged`)."""

    reason = "sequence line without items"
    quote = False
    positional = True

    def __init__(self, path: str):
        self.path = path
        super().__init__("user", "items", "")

    def reset(self) -> None:
        super().reset()
        self.n_lines = 0

    def __call__(self, batch: pa.RecordBatch, row0: int):
        users, flat, parents, lengths = split_sequence_lines(batch.column("user"), batch.column("items"))
        empty = np.flatnonzero(lengths == 0)
        if len(empty):
            self.dropped += len(empty)
            for r in empty[:max(MAX_EXAMPLES - len(self.examples), 0)]:
                self.examples.append(f"user {users[int(r)].as_py()!r}")
        self.n_lines += len(users) - len(empty)
        starts = np.cumsum(lengths) - lengths
        positions = np.arange(len(flat), dtype=np.int64) - np.repeat(starts, lengths)
        return pc.take(users, pa.array(parents, pa.int64())), flat, pa.array(positions, pa.int64()), None

    def staged(self, inter: "DuckInteractions", prov: Provenance) -> None:
        n_users = int(inter._one("SELECT count(DISTINCT u) FROM raw"))  # raw holds rows of non-empty lines only
        if n_users < self.n_lines:
            inter._timed("positions continued over each user's lines",
                         "CREATE OR REPLACE TABLE raw AS SELECT rn, u, i, "
                         "(row_number() OVER (PARTITION BY u ORDER BY rn) - 1)::BIGINT AS ti, tf, flag, traw FROM raw")
            prov.detect(
                f"{prov.rel(self.path)}: {self.n_lines - n_users} user line(s) repeat a user seen on an earlier line; "
                "the items are appended to that user's sequence in file order"
            )
        prov.count(SECTION, "sequence_lines", self.n_lines)


def _malformed_examples(path: str, names: Sequence[str], delimiter: str, skip_rows: int, quote: bool = True,
                        block_size: Optional[int] = None) -> list[str]:
    """The first malformed lines with their line numbers: a single-threaded read that stops once it has them."""
    malformed, examples = [], []
    for _ in _stream_blocks(path, names, delimiter, skip_rows, quote, malformed, examples, block_size or BLOCK_SIZE):
        if len(examples) >= MAX_EXAMPLES:
            break
    return examples


def scan_csv(path: str, names: Sequence[str], delimiter: str, skip_rows: int, visit) -> tuple[int, int, list]:
    """Stream a csv read as :func:`~dataset_converters.interactions.read_string_table` reads it, calling
    ``visit(batch)`` on each block; returns ``(rows, malformed lines, malformed examples)``."""
    malformed, rows = [], 0
    for batch in _stream_blocks(path, names, delimiter, skip_rows, True, malformed, None, BLOCK_SIZE, threads=True):
        rows += batch.num_rows
        visit(batch)
    examples = _malformed_examples(path, names, delimiter, skip_rows) if malformed else []
    return rows, len(malformed), examples


def _raw_rows(path, names, delimiter, skip_rows, columns, regex_mode, flags, state, block_size, progress):
    pick = columns if isinstance(columns, Columns) else Columns(*columns)
    pick.reset()
    rn0 = row0 = 0
    for batch in _stream_blocks(path, names, delimiter, skip_rows, pick.quote, state["malformed"], None, block_size,
                                threads=True):
        n = batch.num_rows
        if progress is not None:
            progress.update(n)
        if n == 0:
            continue
        u, i, t, keep = pick(batch, row0)
        row0 += n
        if keep is not None:
            mask = pa.array(keep)
            u, i, t = pc.filter(u, mask), pc.filter(i, mask), pc.filter(t, mask)
        n = len(u)  # the rows kept (or, for sequences, the items of the block's lines)
        if n == 0:
            continue
        if pa.types.is_integer(t.type):  # positions: numbers already
            ti, tf, valid = t, pa.nulls(n, pa.float64()), np.ones(n, dtype=bool)
        else:
            ti, tf, valid = _parse_ts_block(t, regex_mode, flags)
        flag = np.zeros(n, dtype=np.int8)
        empty = (pc.equal(pc.binary_length(u), 0).to_numpy(zero_copy_only=False)
                 | pc.equal(pc.binary_length(i), 0).to_numpy(zero_copy_only=False))
        flag[empty] = FLAG_EMPTY
        flag[(flag == 0) & ~valid] = FLAG_TS
        flag[(flag == 0) & _bad_token_mask(u)] = FLAG_USER
        flag[(flag == 0) & _bad_token_mask(i)] = FLAG_ITEM
        bad_ts = flag == FLAG_TS
        traw = pc.if_else(pa.array(bad_ts), t, pa.scalar(None, pa.string())) if bad_ts.any() else \
            pa.nulls(n, pa.string())
        yield pa.RecordBatch.from_arrays(
            [pa.array(np.arange(rn0, rn0 + n, dtype=np.int64)), u, i, ti, tf, pa.array(flag), traw],
            schema=RAW_SCHEMA)
        rn0 += n
    state["rows"], state["parsed"] = rn0, row0


def read_pairs(path: str, names: Sequence[str], prov: Provenance, engine: Engine, delimiter: str = ",",
               skip_rows: int = 0, columns=("user", "item", "timestamp"),
               record_read: bool = True) -> "DuckInteractions":
    """Out-of-core :func:`~dataset_converters.interactions.read_string_table` + :func:`~.interactions.build` of a
    ``user/item/timestamp`` file: the rows go to a DuckDB table, the counts and drops to ``prov`` as in memory.

    ``columns``: the three column names, or a :class:`Columns` that also cleans / drops rows first.
    ``record_read``: record the malformed lines and ``lines_read`` (False when a :func:`scan_csv` pass did).
    """
    inter = DuckInteractions(engine)
    try:
        inter._load(path, names, prov, delimiter, skip_rows, columns, record_read)
    except BaseException:
        inter.close()
        raise
    return inter


def read_sequences(path: str, prov: Provenance, engine: Engine) -> "DuckInteractions":
    """Out-of-core :func:`~dataset_converters.interactions.read_sequences` + :func:`~.interactions.build` (with
    ``positional=True``) of a ``user<TAB>item item ...`` file: streamed in blocks, each line exploded into one row
    per item (:class:`SequenceColumns`) staged in DuckDB as :func:`read_pairs` stages csv rows; same counts, drops
    and detected quirks as in memory."""
    return read_pairs(path, ["user", "items"], prov, engine, delimiter="\t", skip_rows=0,
                      columns=SequenceColumns(path))


# --------------------------------------------------------------------------------------------- pipeline
def _interactive() -> bool:
    """DuckDB's own progress bar (long queries) when progress is wanted and a person watches the terminal."""
    import sys

    return logger.isEnabledFor(logging.INFO) and sys.stderr.isatty()


class DuckInteractions:
    """The out-of-core counterpart of :class:`~dataset_converters.interactions.InteractionSet` (same methods the
    converters and :func:`~dataset_converters.dataset.write_dataset` call, same results).

    Tables of its (in-memory, spilling) DuckDB database: ``raw`` (every parsed row, dropped once encoded),
    ``users`` (``u`` token, ``uf`` = first row of the user: the user's integer key and sort key), ``items``
    (``i``, ``itf``) and the current selection (``rn, uf, itf, t``): ``sel0``, then after each step that drops
    rows a table ``flagN`` (the previous selection plus the step's drop flag ``d``) and a view ``selN`` of its
    kept rows.
    """

    positional = False

    def __init__(self, engine: Engine):
        import duckdb

        self.engine = engine
        self.work = WorkDir(engine.temp_dir)
        spill = os.path.join(self.work.path, "spill")
        os.makedirs(spill, exist_ok=True)
        # An in-memory database: its tables live in DuckDB's buffer pool, capped by memory_limit, and are evicted to
        # temp_directory beyond it. (A database file would also compress and checkpoint every table: 4-7x slower
        # to fill, measured on the 10M-row benchmark, for data that never outlives the run.)
        config = {"memory_limit": f"{max(engine.memory_limit // 2**20, 64)}MiB", "temp_directory": spill,
                  "preserve_insertion_order": False}
        if engine.threads:
            config["threads"] = engine.threads
        try:
            self.con = duckdb.connect(":memory:", config=config)
            self.con.execute(f"SET enable_progress_bar = {'true' if _interactive() else 'false'}")
        except duckdb.Error as e:
            self.work.close()
            raise ConversionError(f"cannot start DuckDB with its spill folder in {self.work.path}: {e}") from e
        self.extra: dict = {}
        self.extra_types: dict = {}
        self.sorted = False
        self._n: Optional[int] = None
        self._step = 0
        self.cur = None
        self._tables: list[str] = []
        self.ts_type = "BIGINT"

    # ------------------------------------------------------------------ plumbing
    def close(self) -> None:
        con, self.con = getattr(self, "con", None), None
        if con is not None:
            con.close()
        self.work.close()

    def _sql(self, query: str, params=None):
        try:
            return self.con.execute(query, params) if params is not None else self.con.execute(query)
        except Exception as e:  # duckdb.OutOfMemoryException, IOException (disk full) ...
            import duckdb

            if isinstance(e, duckdb.OutOfMemoryException):
                raise ConversionError(
                    f"the out-of-core conversion ran out of memory under --memory-limit "
                    f"{format_size(self.engine.memory_limit)}: raise it, or free memory ({e})") from e
            if isinstance(e, duckdb.IOException):
                raise ConversionError(f"the out-of-core conversion could not write its spill files in "
                                      f"{self.work.path} (disk full?): pass --temp-dir on a larger disk ({e})") from e
            raise

    def _one(self, query: str):
        return self._sql(query).fetchone()[0]

    def _timed(self, what: str, query: str) -> None:
        start = time.perf_counter()
        self._sql(query)
        logger.info("%s (%.1fs)", what, time.perf_counter() - start)

    # ------------------------------------------------------------------ loading (read + build)
    def _load(self, path, names, prov, delimiter, skip_rows, columns, record_read=True) -> None:
        from tqdm.auto import tqdm

        size = os.path.getsize(path)
        quote = columns.quote if isinstance(columns, Columns) else True
        self.positional = isinstance(columns, Columns) and columns.positional
        flags = None
        block_size = BLOCK_SIZE
        regex_mode = False
        while True:
            flags = _Flags()
            state = {"malformed": [], "examples": []}
            progress = tqdm(unit=" lines", unit_scale=True,
                            desc=f"reading {os.path.basename(path)} ({format_size(size)})",
                            disable=not logger.isEnabledFor(logging.INFO), leave=False)
            try:
                reader = pa.RecordBatchReader.from_batches(
                    RAW_SCHEMA, _raw_batches(path, names, delimiter, skip_rows, columns, regex_mode, flags, state,
                                             block_size, progress))
                self._sql("DROP TABLE IF EXISTS raw")
                self.con.register("raw_stream", reader)
                try:
                    self._timed("staged the interactions", "CREATE TABLE raw AS SELECT * FROM raw_stream")
                except Exception as e:
                    if "error" in state:
                        raise state["error"] from None
                    raise
                finally:
                    self.con.unregister("raw_stream")
            except _LineTooLong:
                # a line longer than a block (e.g. a long user sequence): start again with blocks twice as large;
                # memory stays bounded by the longest line
                block_size *= 2
                logger.info("%s: a line is longer than the read block; reading again with %s blocks",
                            os.path.basename(path), format_size(block_size))
                continue
            finally:
                progress.close()
            if flags.int_ok or flags.float_ok or regex_mode:
                break
            regex_mode = True
            logger.info("timestamps: some are not numbers; reading the file again to tell them apart")
        n_bad = len(state["malformed"])
        if record_read:
            if n_bad:
                prov.drop(SECTION, f"malformed line (expected {len(names)} fields)", n_bad,
                          _malformed_examples(path, names, delimiter, skip_rows, quote, block_size))
            prov.count(SECTION, "lines_read", state["parsed"] + n_bad)
        if isinstance(columns, Columns):
            if columns.dropped:
                prov.drop(SECTION, columns.reason, columns.dropped, columns.examples)
            columns.staged(self, prov)
        prov.count(SECTION, "rows_parsed", state["rows"])
        self.ts_type = "BIGINT" if flags.int_ok else "DOUBLE"
        t_expr = "ti" if flags.int_ok else "coalesce(tf, ti::DOUBLE)"
        for flag, reason, fmt in (
            (FLAG_EMPTY, "empty user or item id", lambda u, i, t: f"user {u!r} item {i!r}"),
            (FLAG_TS, "timestamp is not a number", lambda u, i, t: f"user {u!r} item {i!r} timestamp {t!r}"),
            (FLAG_USER, "user id holds a tab, line break or double quote", lambda u, i, t: f"user {u!r}"),
            (FLAG_ITEM, "item id holds a tab, line break or double quote", lambda u, i, t: f"item {i!r}"),
        ):
            n = self._one(f"SELECT count(*) FROM raw WHERE flag = {flag}")
            if n:
                rows = self._sql(f"SELECT u, i, traw FROM raw WHERE flag = {flag} ORDER BY rn LIMIT {MAX_EXAMPLES}")
                prov.drop(SECTION, reason, n, [fmt(*r) for r in rows.fetchall()])
        self._timed("first appearance of each user",
                    "CREATE TABLE users AS SELECT u, min(rn) AS uf FROM raw GROUP BY u")
        self._timed("first appearance of each item",
                    "CREATE TABLE items AS SELECT i, min(rn) AS itf FROM raw GROUP BY i")
        self._timed("encoded the valid rows",
                    f"CREATE TABLE sel0 AS SELECT r.rn, us.uf, it.itf, {t_expr}::{self.ts_type} AS t "
                    "FROM raw r JOIN users us ON r.u = us.u JOIN items it ON r.i = it.i WHERE r.flag = 0")
        self._sql("DROP TABLE raw")
        self.cur, self._tables = "sel0", ["sel0"]

    # ------------------------------------------------------------------ steps
    def __len__(self) -> int:
        if self._n is None:
            self._n = int(self._one(f"SELECT count(*) FROM {self.cur}"))
        return self._n

    def _order(self, prefix: str = "") -> str:
        return f"{prefix}uf, {prefix}t, {prefix}rn" if self.sorted else f"{prefix}rn"

    def _describe(self, where_table: str) -> list[str]:
        rows = self._sql(
            f"SELECT us.u, it.i, d.t FROM (SELECT * FROM {where_table} ORDER BY {self._order()} "
            f"LIMIT {MAX_EXAMPLES}) d JOIN users us ON d.uf = us.uf JOIN items it ON d.itf = it.itf "
            f"ORDER BY {self._order('d.')}").fetchall()
        word = "position" if self.positional else "timestamp"
        return [f"user {u!r} item {i!r} {word} {t!r}" for u, i, t in rows]

    def _filter(self, flag_expr: str, prov: Provenance, reason: str, what: str) -> None:
        """New selection = current rows where ``flag_expr`` (a boolean, True = drop) is false."""
        self._step += 1
        flagged, nxt = f"flag{self._step}", f"sel{self._step}"
        self._timed(what, f"CREATE TABLE {flagged} AS SELECT rn, uf, itf, t, ({flag_expr}) AS d FROM {self.cur}")
        n_drop = int(self._one(f"SELECT count(*) FROM {flagged} WHERE d"))
        if n_drop:
            prov.drop(SECTION, reason, n_drop, self._describe(f"{flagged} WHERE d"))
            # the next step reads the kept rows straight from the flagged table (no second copy)
            self._sql(f"CREATE VIEW {nxt} AS SELECT rn, uf, itf, t FROM {flagged} WHERE NOT d")
            self._drop_current()
            self.cur, self._tables = nxt, [flagged, nxt]
            self._n = None
        else:
            self._sql(f"DROP TABLE {flagged}")

    def _drop_current(self) -> None:
        for name in self._tables[::-1]:
            kind = "VIEW" if name.startswith("sel") and name != "sel0" else "TABLE"
            self._sql(f"DROP {kind} IF EXISTS {name}")

    def drop_unknown_items(self, known: set, prov: Provenance, drop: bool) -> set:
        """Items absent from the item file: drop their interactions or keep them (returns the unknown tokens)."""
        known_tab = pa.table({"i": pa.array(sorted(known), pa.string())})
        self.con.register("known_items", known_tab)
        try:
            self._sql("CREATE OR REPLACE TABLE unknown AS SELECT it.itf, it.i FROM items it "
                      f"WHERE it.itf IN (SELECT DISTINCT itf FROM {self.cur}) "
                      "AND it.i NOT IN (SELECT i FROM known_items)")
        finally:
            self.con.unregister("known_items")
        names = [r[0] for r in self._sql("SELECT i FROM unknown ORDER BY itf").fetchall()]
        if not names:
            return set()
        if drop:
            self._filter("itf IN (SELECT itf FROM unknown)", prov,
                         "item absent from the item file (--unknown-items drop)", "dropped unknown items")
            return set()
        n_rows = int(self._one(f"SELECT count(*) FROM {self.cur} WHERE itf IN (SELECT itf FROM unknown)"))
        prov.issue(
            "interactions whose item is absent from the item file",
            n_rows,
            [f"item {t!r}" for t in names[:MAX_EXAMPLES]],
            action=f"kept (--unknown-items keep); {len(names)} such item(s) get empty text fields in .item",
        )
        return set(names)

    def sort_user_time(self) -> None:
        """Rows are from now on ordered by (user's first appearance, timestamp, input row)."""
        self.sorted = True

    def dedup(self, mode: str, prov: Provenance) -> None:
        if mode not in ("first", "all"):
            raise ConversionError(f"--dedup must be 'first' or 'all', got {mode!r}")
        if len(self) < 2:
            return
        if mode == "all":
            # NaN timestamps are never equal (numpy's rule), though DuckDB groups them: each gets its own partition
            nan = ", CASE WHEN isnan(t) THEN rn END" if self.ts_type == "DOUBLE" else ""
            expr = f"row_number() OVER (PARTITION BY uf, itf, t{nan} ORDER BY rn) > 1"
            reason = "exact duplicate row (same user, item and timestamp)"
        else:
            expr = "row_number() OVER (PARTITION BY uf, itf ORDER BY t, rn) > 1"
            reason = "repeated (user, item) pair: the earliest is kept (--dedup first)"
        self._filter(expr, prov, reason, f"--dedup {mode}")

    def keep_last(self, n: int, prov: Provenance) -> None:
        if n is None or len(self) == 0:
            return
        if n < 1:
            raise ConversionError(f"--keep-last must be >= 1, got {n}")
        self._filter(f"row_number() OVER (PARTITION BY uf ORDER BY t DESC, rn DESC) > {int(n)}", prov,
                     f"older than the user's last {n} interactions (--keep-last {n})", f"--keep-last {n}")

    def min_user_inter(self, k: int, prov: Provenance) -> None:
        if not k or k <= 1 or len(self) == 0:
            return
        self._filter(f"count(*) OVER (PARTITION BY uf) < {int(k)}", prov,
                     f"user with fewer than {k} interactions (--min-user-inter {k})", f"--min-user-inter {k}")

    # ------------------------------------------------------------------ output
    def batches(self) -> Iterator[pa.RecordBatch]:
        """The output rows (``user_id``, ``item_id``, ``timestamp``) in output order, one record batch at a time."""
        query = (f"SELECT us.u AS user_id, it.i AS item_id, c.t AS timestamp FROM {self.cur} c "
                 f"JOIN users us ON c.uf = us.uf JOIN items it ON c.itf = it.itf ORDER BY {self._order('c.')}")
        start = time.perf_counter()
        try:
            rel = self.con.sql(query)  # streamed batch by batch: no copy of the whole result
            reader = rel.to_arrow_reader(OUT_BATCH_ROWS) if hasattr(rel, "to_arrow_reader") else \
                rel.fetch_record_batch(OUT_BATCH_ROWS)  # duckdb 1.x
        except Exception:
            self._sql(query)  # the same error, translated (memory, disk)
            raise
        logger.info("sorted the output rows (%.1fs)", time.perf_counter() - start)
        for batch in reader:
            yield batch

    def item_tokens(self) -> list[str]:
        """Item tokens of the selected rows, in order of first appearance in the output."""
        key = "struct_pack(a := uf, b := t, c := rn)" if self.sorted else "rn"
        rows = self._sql(f"SELECT it.i FROM (SELECT itf, min({key}) AS k FROM {self.cur} GROUP BY itf) f "
                         "JOIN items it ON f.itf = it.itf ORDER BY f.k").fetchall()
        return [r[0] for r in rows]

    def n_users(self) -> int:
        return int(self._one(f"SELECT count(DISTINCT uf) FROM {self.cur}"))

    def user_tokens(self) -> list[str]:
        if not self.sorted:
            raise NotImplementedError("user_tokens() of an unsorted out-of-core selection")
        rows = self._sql(f"SELECT us.u FROM (SELECT DISTINCT uf FROM {self.cur}) f JOIN users us ON f.uf = us.uf "
                         "ORDER BY f.uf").fetchall()
        return [r[0] for r in rows]
