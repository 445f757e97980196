"""Columnar interaction pipeline shared by every converter (pyarrow + numpy; no Python loop over rows).

Steps, in this order (each drop is counted in provenance with its reason and first examples):

1. read: :func:`read_string_table` (csv / tsv with every column as a string; lines with the wrong number of
   fields are "malformed" and skipped) or :func:`read_sequences` (``user<TAB>item item ...`` files, timestamp =
   position of the item in the user's sequence, 0-based);
2. :func:`build` checks ids (empty, or holding a tab / line break / double quote: malformed) and timestamps (not
   a number: malformed) and encodes ids to integer codes in order of first appearance;
3. optional drop of interactions whose item is absent from the item file (``--unknown-items drop``);
4. stable sort by (user in order of first appearance in the input, timestamp); ties keep the input order;
5. ``--dedup first``: one row per (user, item), the earliest; ``--dedup all``: repeats kept, only exact duplicate
   rows (same user, item and timestamp) dropped;
6. ``--keep-last N``: the last N interactions of each user (the papers keep 10 + 3 = 13);
7. ``--min-user-inter K``: users with fewer than K remaining interactions dropped (applied after step 6).

Integer ids that are written canonically (no sign, no leading zero) take a fast int64 path; the tokens written
are the same characters as in the input either way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from dataset_converters.errors import ConversionError
from dataset_converters.provenance import MAX_EXAMPLES, Provenance

SECTION = "interactions"
_NUMBER = r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$"
_BAD_TOKEN = r'[\t\n\r"]'


# --------------------------------------------------------------------------------------------- reading
def read_string_table(
    path: str,
    names: Sequence[str],
    prov: Provenance,
    delimiter: str = ",",
    skip_rows: int = 0,
    quote: bool = True,
    section: str = SECTION,
) -> pa.Table:
    """Read a delimited file with every column as a string; lines with another field count are skipped.

    The skipped lines are counted as ``malformed line`` drops; their examples (with line numbers) come from a
    second, single-threaded read that only happens when the file has such lines.
    """
    invalid: list = []
    examples: list[str] = []

    def count_only(row) -> str:
        invalid.append(row.number)
        return "skip"

    def with_examples(row) -> str:
        if len(examples) < MAX_EXAMPLES:
            line = row.number + skip_rows if row.number is not None else "?"
            examples.append(f"line {line}: {row.text[:80]!r} ({row.actual_columns} fields)")
        return "skip"

    handler = [count_only]

    def read(threads: bool) -> pa.Table:
        return pcsv.read_csv(
            path,
            read_options=pcsv.ReadOptions(
                column_names=list(names), skip_rows=skip_rows, use_threads=threads, block_size=1 << 24
            ),
            parse_options=pcsv.ParseOptions(
                delimiter=delimiter, quote_char='"' if quote else False, invalid_row_handler=lambda r: handler[0](r)
            ),
            convert_options=pcsv.ConvertOptions(
                column_types={n: pa.string() for n in names}, strings_can_be_null=False, quoted_strings_can_be_null=False
            ),
        )

    try:
        table = read(True)
    except (pa.ArrowInvalid, OSError) as e:
        raise ConversionError(f"cannot parse {path} as {len(names)} {delimiter!r}-separated columns {list(names)}: {e}")
    if invalid:
        n_bad = len(invalid)
        handler[0] = with_examples
        table = read(False)  # single-threaded: line numbers known, examples in file order
        prov.drop(section, f"malformed line (expected {len(names)} fields)", n_bad, examples)
    prov.count(section, "lines_read", table.num_rows + len(invalid))
    return combine_chunks(table)


# Arrow's ``string`` arrays hold at most 2 GiB of characters (32-bit offsets). A column read in several blocks is
# below it block by block but not once concatenated; such a column becomes ``large_string`` (64-bit offsets) first.
STRING_LIMIT = (1 << 31) - 1


def combine_chunks(table: pa.Table) -> pa.Table:
    """``table.combine_chunks()``, with string columns whose characters exceed :data:`STRING_LIMIT` made
    ``large_string`` so that the concatenation cannot overflow."""
    for k, col in enumerate(table.columns):
        if col.type == pa.string():
            chars = sum(c.buffers()[2].size if c.buffers()[2] is not None else 0 for c in col.chunks)
            if chars > STRING_LIMIT:
                table = table.set_column(k, table.field(k).with_type(pa.large_string()), pc.cast(col, pa.large_string()))
    return table.combine_chunks()


def split_sequence_lines(users: pa.Array, items: pa.Array) -> tuple[pa.Array, pa.Array, np.ndarray, np.ndarray]:
    """The ``user`` / ``items`` columns of sequence lines: the users trimmed, the items split at runs of Unicode
    whitespace (arrow's definition); returns ``(users, items, line of each item, items per line)``.

    The items are trimmed before the split: pyarrow's ``utf8_split_whitespace`` (measured on 26.0.1) reads one byte
    past a string that ends in whitespace, and when that byte does not start valid UTF-8 it leaves the string
    unsplit (``'a b '`` came out as ``['a b ']``). Past the last string of a buffer that byte is whatever memory
    follows, so the result changed from run to run. A trimmed string never ends in whitespace.
    """
    users = pc.utf8_trim_whitespace(users)
    pieces = pc.utf8_split_whitespace(pc.utf8_trim_whitespace(items))
    flat = pc.list_flatten(pieces)
    parents = pc.list_parent_indices(pieces).to_numpy(zero_copy_only=False)
    nonempty = pc.not_equal(flat, "")  # a whitespace-only field gives one empty piece
    flat = pc.filter(flat, nonempty)
    parents = parents[nonempty.to_numpy(zero_copy_only=False)].astype(np.int64)
    return users, flat, parents, np.bincount(parents, minlength=len(users)).astype(np.int64)


def read_sequences(path: str, prov: Provenance, section: str = SECTION) -> tuple[pa.Array, pa.Array, np.ndarray]:
    """Read ``user<TAB>item item ...`` lines; returns user tokens, item tokens and positions (0-based).

    Items are split at any run of whitespace. A line without items is malformed. A user on several lines gets
    its items concatenated in file order (positions continue), recorded as a detected quirk.
    """
    table = read_string_table(path, ["user", "items"], prov, delimiter="\t", quote=False, section=section)
    users, flat, parents, lengths = split_sequence_lines(table["user"].combine_chunks(), table["items"].combine_chunks())
    empty = np.flatnonzero(lengths == 0)
    if len(empty):
        prov.drop(section, "sequence line without items", len(empty),
                  [f"user {users[int(r)].as_py()!r}" for r in empty[:MAX_EXAMPLES]])
    user_rows = pc.take(users, pa.array(parents))
    starts = np.cumsum(lengths) - lengths
    positions = np.arange(len(flat), dtype=np.int64) - np.repeat(starts, lengths)
    n_lines = len(users) - len(empty)
    n_users = len(pc.unique(pc.filter(users, pa.array(lengths > 0))))
    if n_users < n_lines:
        codes = pc.dictionary_encode(user_rows).indices.to_numpy(zero_copy_only=False)
        order = np.argsort(codes, kind="stable")
        counts = np.bincount(codes)
        first = np.cumsum(counts) - counts
        positions = np.empty(len(codes), dtype=np.int64)
        positions[order] = np.arange(len(codes)) - first[codes[order]]
        prov.detect(
            f"{prov.rel(path)}: {n_lines - n_users} user line(s) repeat a user seen on an earlier line; the items are "
            "appended to that user's sequence in file order"
        )
    prov.count(section, "sequence_lines", n_lines)
    return user_rows, flat, positions


# --------------------------------------------------------------------------------------------- ids
@dataclass
class IdColumn:
    """Integer codes (order of first appearance) plus the token of each code."""

    codes: np.ndarray  # int64 per row
    tokens: pa.Array  # string token per code
    ints: Optional[np.ndarray] = None  # int64 value per code when the ids are canonical integers

    @property
    def size(self) -> int:
        return len(self.tokens)

    def take(self, codes: np.ndarray) -> pa.Array:
        if self.ints is not None:
            return pa.array(self.ints[codes])
        return pc.take(self.tokens, pa.array(codes))

    def token(self, code: int) -> str:
        return self.tokens[int(code)].as_py()


def encode_ids(col: pa.Array) -> IdColumn:
    """Codes in order of first appearance; canonical integer ids use a fast int64 hash path."""
    try:
        ints = pc.cast(col, pa.int64()).to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        ints = None
    if ints is not None:
        codes, uniques = pd.factorize(ints)
        tokens = pc.cast(pa.array(uniques), pa.string())
        canonical_len = pc.binary_length(tokens).to_numpy(zero_copy_only=False).astype(np.int64)
        if int(canonical_len[codes].sum()) == int(pc.sum(pc.binary_length(col)).as_py() or 0):
            return IdColumn(codes.astype(np.int64), tokens, uniques.astype(np.int64))
    enc = pc.dictionary_encode(col)
    return IdColumn(enc.indices.to_numpy(zero_copy_only=False).astype(np.int64), enc.dictionary)


def parse_timestamps(col: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """``(values, valid_mask)``: int64 when every valid value is an integer, else float64."""
    for typ in (pa.int64(), pa.float64()):
        try:
            return pc.cast(col, typ).to_numpy(zero_copy_only=False), np.ones(len(col), dtype=bool)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            pass
    valid = pc.match_substring_regex(col, _NUMBER).to_numpy(zero_copy_only=False)
    trimmed = pc.utf8_trim_whitespace(pc.if_else(pa.array(valid), col, "0"))
    for typ in (pa.int64(), pa.float64()):
        try:
            return pc.cast(trimmed, typ).to_numpy(zero_copy_only=False), valid
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            pass
    raise ConversionError("timestamps could not be parsed")  # unreachable: the regex only admits numbers


# --------------------------------------------------------------------------------------------- pipeline
@dataclass
class InteractionSet:
    """Encoded interactions plus the selected rows (``sel``, in output order)."""

    user: IdColumn
    item: IdColumn
    ts: np.ndarray
    extra: dict = field(default_factory=dict)  # name -> pa.Array of strings, aligned with the rows
    sel: np.ndarray = None
    positional: bool = False
    extra_types: dict = field(default_factory=dict)  # name -> atomic type ("float", "token")

    def __post_init__(self):
        if self.sel is None:
            self.sel = np.arange(len(self.ts), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.sel)

    def describe(self, rows: np.ndarray) -> list[str]:
        """Readable examples for the given row indices."""
        out = []
        for r in rows[:MAX_EXAMPLES]:
            ts = self.ts[r]
            out.append(f"user {self.user.token(self.user.codes[r])!r} item {self.item.token(self.item.codes[r])!r} "
                       f"{'position' if self.positional else 'timestamp'} {ts.item()!r}")
        return out

    def _apply(self, keep: np.ndarray, prov: Provenance, reason: str) -> None:
        dropped = self.sel[~keep]
        prov.drop(SECTION, reason, len(dropped), self.describe(dropped))
        self.sel = self.sel[keep]

    def drop_unknown_items(self, known: set, prov: Provenance, drop: bool) -> set:
        """Items absent from the item file: drop their interactions or keep them (returns the unknown tokens)."""
        tokens = self.item.tokens.to_pylist()
        present = np.zeros(len(tokens), dtype=bool)
        present[np.unique(self.item.codes[self.sel])] = True
        unknown_codes = np.array([c for c, t in enumerate(tokens) if present[c] and t not in known], dtype=np.int64)
        if len(unknown_codes) == 0:
            return set()
        is_unknown = np.zeros(len(tokens), dtype=bool)
        is_unknown[unknown_codes] = True
        row_unknown = is_unknown[self.item.codes[self.sel]]
        names = [tokens[c] for c in unknown_codes]
        if drop:
            self._apply(~row_unknown, prov, "item absent from the item file (--unknown-items drop)")
            return set()
        prov.issue(
            "interactions whose item is absent from the item file",
            int(row_unknown.sum()),
            [f"item {t!r}" for t in names[:MAX_EXAMPLES]],
            action=f"kept (--unknown-items keep); {len(names)} such item(s) get empty text fields in .item",
        )
        return set(names)

    def sort_user_time(self) -> None:
        """Stable sort of ``sel`` by (user code, timestamp)."""
        u = self.user.codes[self.sel]
        t = self.ts[self.sel]
        if len(t) == 0:
            return
        if t.dtype.kind == "i":
            tmin = int(t.min())
            span = int(t.max()) - tmin + 1
            if span > 0 and (int(u.max()) + 1) * span < 2**62:
                key = u * np.int64(span) + (t - np.int64(tmin))
                self.sel = self.sel[np.argsort(key, kind="stable")]
                return
        self.sel = self.sel[np.lexsort((t, u))]

    def dedup(self, mode: str, prov: Provenance) -> None:
        """``first``: keep the earliest row of each (user, item); ``all``: drop exact duplicate rows only.

        Requires ``sel`` sorted by (user, timestamp).
        """
        if mode not in ("first", "all"):
            raise ConversionError(f"--dedup must be 'first' or 'all', got {mode!r}")
        if len(self.sel) < 2:
            return
        pair = self.user.codes[self.sel] * np.int64(self.item.size) + self.item.codes[self.sel]
        order = np.argsort(pair, kind="stable")  # fast: runs per user are already grouped
        sorted_pair = pair[order]
        repeat = np.zeros(len(pair), dtype=bool)
        same = sorted_pair[1:] == sorted_pair[:-1]
        if mode == "all":
            ts_sorted = self.ts[self.sel][order]
            same &= ts_sorted[1:] == ts_sorted[:-1]
            reason = "exact duplicate row (same user, item and timestamp)"
        else:
            reason = "repeated (user, item) pair: the earliest is kept (--dedup first)"
        repeat[order[1:][same]] = True
        self._apply(~repeat, prov, reason)

    def _user_counts(self) -> tuple[np.ndarray, np.ndarray]:
        u = self.user.codes[self.sel]
        return u, np.bincount(u, minlength=self.user.size)

    def keep_last(self, n: int, prov: Provenance) -> None:
        """Keep each user's last ``n`` rows (``sel`` sorted by user, then time)."""
        if n is None or len(self.sel) == 0:
            return
        if n < 1:
            raise ConversionError(f"--keep-last must be >= 1, got {n}")
        u, counts = self._user_counts()
        first = np.cumsum(counts) - counts
        pos = np.arange(len(u), dtype=np.int64) - first[u]
        self._apply(pos >= counts[u] - n, prov, f"older than the user's last {n} interactions (--keep-last {n})")

    def min_user_inter(self, k: int, prov: Provenance) -> None:
        if not k or k <= 1 or len(self.sel) == 0:
            return
        u, counts = self._user_counts()
        self._apply(counts[u] >= k, prov, f"user with fewer than {k} interactions (--min-user-inter {k})")

    def table(self) -> pa.Table:
        """The output rows: ``user_id``, ``item_id``, ``timestamp`` then the extra columns."""
        cols = {
            "user_id": self.user.take(self.user.codes[self.sel]),
            "item_id": self.item.take(self.item.codes[self.sel]),
            "timestamp": pa.array(self.ts[self.sel]),
        }
        for name, arr in self.extra.items():
            cols[name] = pc.take(arr, pa.array(self.sel))
        return pa.table(cols)

    def batches(self) -> list[pa.Table]:
        """The output rows in pieces (one here; the out-of-core set streams record batches)."""
        return [self.table()]

    def n_users(self) -> int:
        return len(np.unique(self.user.codes[self.sel]))

    def item_tokens(self) -> list[str]:
        """Item tokens of the selected rows, in order of first appearance in the output."""
        codes = pd.unique(self.item.codes[self.sel])
        return pc.take(self.item.tokens, pa.array(codes)).to_pylist()

    def user_tokens(self) -> list[str]:
        codes = pd.unique(self.user.codes[self.sel])
        return pc.take(self.user.tokens, pa.array(codes)).to_pylist()


def build(
    user: pa.Array,
    item: pa.Array,
    ts: Optional[pa.Array | np.ndarray],
    prov: Provenance,
    extra: Optional[dict] = None,
    extra_types: Optional[dict] = None,
    positional: bool = False,
) -> InteractionSet:
    """Validate raw string columns and encode them (see the module docstring, step 2)."""
    user, item = _flat(user), _flat(item)
    if not isinstance(ts, np.ndarray):
        ts = _flat(ts)
    extra = {k: _flat(v) for k, v in (extra or {}).items()}
    n = len(user)
    prov.count(SECTION, "rows_parsed", n)
    keep = np.ones(n, dtype=bool)
    empty = (pc.equal(pc.binary_length(user), 0).to_numpy(zero_copy_only=False)
             | pc.equal(pc.binary_length(item), 0).to_numpy(zero_copy_only=False))
    if empty.any():
        rows = np.flatnonzero(empty)
        prov.drop(SECTION, "empty user or item id", len(rows),
                  [f"user {user[int(r)].as_py()!r} item {item[int(r)].as_py()!r}" for r in rows[:MAX_EXAMPLES]])
        keep &= ~empty
    if isinstance(ts, np.ndarray):
        values = ts
    else:
        values, valid = parse_timestamps(ts)
        bad = keep & ~valid
        if bad.any():
            rows = np.flatnonzero(bad)
            prov.drop(SECTION, "timestamp is not a number", len(rows),
                      [f"user {user[int(r)].as_py()!r} item {item[int(r)].as_py()!r} timestamp {ts[int(r)].as_py()!r}"
                       for r in rows[:MAX_EXAMPLES]])
            keep &= valid
    uid = encode_ids(user)
    iid = encode_ids(item)
    for col, name in ((uid, "user"), (iid, "item")):
        if col.ints is None:
            bad_code = pc.match_substring_regex(col.tokens, _BAD_TOKEN).to_numpy(zero_copy_only=False)
            if bad_code.any():
                bad_rows = keep & bad_code[col.codes]
                rows = np.flatnonzero(bad_rows)
                prov.drop(SECTION, f"{name} id holds a tab, line break or double quote", len(rows),
                          [f"{name} {col.token(col.codes[r])!r}" for r in rows[:MAX_EXAMPLES]])
                keep &= ~bad_rows
    sel = np.flatnonzero(keep).astype(np.int64)
    return InteractionSet(uid, iid, values, extra, sel, positional, dict(extra_types or {}))


def _flat(col) -> pa.Array:
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


@dataclass
class Protocol:
    """The row-selection options shared by the converters."""

    dedup: str = "first"
    keep_last: Optional[int] = None
    min_user_inter: Optional[int] = None

    def apply(self, inter: InteractionSet, prov: Provenance) -> None:
        inter.sort_user_time()
        inter.dedup(self.dedup, prov)
        inter.keep_last(self.keep_last, prov)
        inter.min_user_inter(self.min_user_inter, prov)
