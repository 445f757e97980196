"""NineRec (source Bili_2M / Bili_500K or a target domain, ``--domain``) -> RecBole atomic files.

Inputs for domain ``<D>`` (searched in ``--input`` and up to two folder levels below it):

- ``<D>_pair.csv``: three columns, no header in the released files (a header line is detected and skipped).
  The README says ``user, item, timestamp`` while the official ``get_behaviour.py`` reads it as
  ``item, user, timestamp``; the order is **detected from the id prefixes** (users ``u...``, items ``v...``)
  and recorded in provenance. Rows whose ids lack the expected prefix are malformed. ``", "`` separators
  (README example) are detected and the spaces removed from the ids;
- ``<D>_behaviour.tsv`` (``user<TAB>item item ...``), the only interaction file of QB and TN: no timestamps,
  so the timestamp is the 0-based position in the sequence, recorded in provenance;
- ``<D>_item.csv``: ``item, Chinese text, English text`` (no header, CSV quoting for English texts with commas):
  written as ``title:token_seq`` (Chinese) and ``title_en:token_seq`` (English); the yaml's ``text_fields``
  chooses (``[title_en]`` by default, ``[title]`` for Chinese);
- covers ``<D>_cover/<item>.jpg`` (Bili_500K shares ``Source_Bili_2M_cover``); missing and corrupt covers are
  expected and counted.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dataset_converters import common
from dataset_converters.dataset import DatasetBuild, FieldTable, write_dataset
from dataset_converters.dataset_yaml import YamlSpec
from dataset_converters.errors import ConversionError
from dataset_converters.files import find_one, head_line
from dataset_converters.interactions import SECTION, build, read_string_table
from dataset_converters.provenance import MAX_EXAMPLES, Provenance
from dataset_converters.text import DecodedFile, clean_text

NAME = "ninerec"
USER_PREFIX, ITEM_PREFIX = "u", "v"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--domain", required=True,
                   help="dataset prefix: Bili_2M, Bili_500K, Bili_Food, Bili_Dance, Bili_Movie, Bili_Cartoon, "
                        "Bili_Music, KU, QB, TN or DY")
    p.add_argument("--interactions", choices=("auto", "csv", "tsv"), default="auto",
                   help="csv: <D>_pair.csv with timestamps (default when present); tsv: <D>_behaviour.tsv, "
                        "timestamp = position")
    p.add_argument("--covers", default=None, metavar="DIR", help="cover folder (default: <D>_cover)")
    common.add_protocol_arguments(p)


def _looks_like_id(text: str) -> bool:
    text = text.strip().strip('"')
    return len(text) > 1 and text[0] in (USER_PREFIX, ITEM_PREFIX) and text[1:].isdigit()


PAIR_COLUMNS = ["c0", "c1", "c2"]
PADDED = r"^\s|\s$"
PREFIX_REASON = "id without the expected u / v prefix"


def _prefix_counts(col) -> tuple[int, int]:
    return (pc.sum(pc.starts_with(col, USER_PREFIX)).as_py() or 0), (pc.sum(pc.starts_with(col, ITEM_PREFIX)).as_py() or 0)


def _column_order(path: str, rel: str, counts: dict, n_rows: int, prov: Provenance) -> tuple[str, str, str]:
    """``(user, item, timestamp)`` column names from the per-column counts of ``u`` / ``v`` prefixed values."""
    n = max(n_rows, 1)
    share = {c: (u / n, v / n) for c, (u, v) in counts.items()}
    user_col = max(share, key=lambda c: share[c][0])
    item_col = max(share, key=lambda c: share[c][1])
    if share[user_col][0] < 0.5 or share[item_col][1] < 0.5 or user_col == item_col:
        raise ConversionError(
            f"cannot detect the column order of {path}: expected one column of '{USER_PREFIX}...' user ids and one "
            f"of '{ITEM_PREFIX}...' item ids (shares per column: "
            + ", ".join(f"{c}: u {s[0]:.0%} v {s[1]:.0%}" for c, s in share.items()) + ")"
        )
    ts_col = next(c for c in counts if c not in (user_col, item_col))
    order = {user_col: "user", item_col: "item", ts_col: "timestamp"}
    detected = ",".join(order[c] for c in counts)
    prov.detect(f"NineRec {rel} column order detected as {detected} from the id prefixes "
                f"(README says user,item,timestamp; official get_behaviour.py reads item,user,timestamp)")
    prov.count(SECTION, "column_order", detected)
    return user_col, item_col, ts_col


def _padded_note(rel: str) -> str:
    return f"{rel}: values padded with spaces (e.g. ', ' separators as in the README); spaces removed"


def read_pair_csv(path: str, prov: Provenance, engine=None):
    """Read ``<D>_pair.csv``, detecting header, separator spaces and the column order from the id prefixes.

    An out-of-core ``engine`` streams the file twice (detection, then DuckDB) instead of holding it in memory.
    """
    rel = prov.rel(path)
    line, _ = head_line(path)
    fields = line.split(",")
    if len(fields) != 3:
        raise ConversionError(f"unreadable header in {path}: first line {line[:120]!r}; expected 3 comma-separated "
                              "columns (user / item ids with u / v prefixes and a timestamp)")
    skip = 0
    if not any(_looks_like_id(f) for f in fields):
        skip = 1
        prov.detect(f"{rel}: header line {line[:60]!r} skipped")
    if engine is not None and engine.out_of_core:
        return _read_pair_csv_out_of_core(path, rel, skip, prov, engine)
    table = read_string_table(path, PAIR_COLUMNS, prov, skip_rows=skip)
    if any(pc.any(pc.match_substring_regex(table[c], PADDED)).as_py() for c in table.column_names):
        prov.detect(_padded_note(rel))
        table = pa.table({c: pc.utf8_trim_whitespace(table[c]) for c in table.column_names})
    counts = {c: _prefix_counts(table[c]) for c in table.column_names}
    user_col, item_col, ts_col = _column_order(path, rel, counts, table.num_rows, prov)
    user, item = table[user_col], table[item_col]
    bad = ~(pc.starts_with(user, USER_PREFIX).to_numpy(zero_copy_only=False)
            & pc.starts_with(item, ITEM_PREFIX).to_numpy(zero_copy_only=False))
    if bad.any():
        rows = np.flatnonzero(bad)
        prov.drop(SECTION, PREFIX_REASON, len(rows),
                  [f"row {r + 1}: {user[int(r)].as_py()!r}, {item[int(r)].as_py()!r}" for r in rows[:MAX_EXAMPLES]])
        keep = pa.array(~bad)
        user, item, ts = pc.filter(user, keep), pc.filter(item, keep), pc.filter(table[ts_col], keep)
    else:
        ts = table[ts_col]
    return build(user, item, ts, prov)


def _read_pair_csv_out_of_core(path: str, rel: str, skip: int, prov: Provenance, engine):
    """:func:`read_pair_csv` on DuckDB: a first streamed pass detects the padding and the column order, the
    second stages the rows (trimmed, prefix-checked) as :func:`dataset_converters.outofcore.read_pairs` does."""
    from dataset_converters import outofcore

    padded = [False]
    counts = {c: [0, 0, 0, 0] for c in PAIR_COLUMNS}  # u, v prefixes as read, then trimmed

    def visit(batch) -> None:
        for c in PAIR_COLUMNS:
            col = batch.column(c)
            if not padded[0] and pc.any(pc.match_substring_regex(col, PADDED)).as_py():
                padded[0] = True
            raw, trimmed = _prefix_counts(col), _prefix_counts(pc.utf8_trim_whitespace(col))
            counts[c] = [counts[c][0] + raw[0], counts[c][1] + raw[1], counts[c][2] + trimmed[0],
                         counts[c][3] + trimmed[1]]

    n_rows, n_bad, examples = outofcore.scan_csv(path, PAIR_COLUMNS, ",", skip, visit)
    if n_bad:  # recorded as read_string_table does
        prov.drop(SECTION, f"malformed line (expected {len(PAIR_COLUMNS)} fields)", n_bad, examples)
    prov.count(SECTION, "lines_read", n_rows + n_bad)
    if padded[0]:
        prov.detect(_padded_note(rel))
    k = 2 if padded[0] else 0
    user_col, item_col, ts_col = _column_order(path, rel, {c: tuple(v[k:k + 2]) for c, v in counts.items()},
                                               n_rows, prov)

    class PairColumns(outofcore.Columns):
        reason = PREFIX_REASON

        def __call__(self, batch, row0):
            cols = {c: batch.column(c) for c in PAIR_COLUMNS}
            if padded[0]:
                cols = {c: pc.utf8_trim_whitespace(v) for c, v in cols.items()}
            user, item = cols[user_col], cols[item_col]
            bad = ~(pc.starts_with(user, USER_PREFIX).to_numpy(zero_copy_only=False)
                    & pc.starts_with(item, ITEM_PREFIX).to_numpy(zero_copy_only=False))
            if not bad.any():
                return user, item, cols[ts_col], None
            rows = np.flatnonzero(bad)
            self.dropped += len(rows)
            for r in rows[: max(MAX_EXAMPLES - len(self.examples), 0)]:
                self.examples.append(f"row {row0 + r + 1}: {user[int(r)].as_py()!r}, {item[int(r)].as_py()!r}")
            return user, item, cols[ts_col], ~bad

    return outofcore.read_pairs(path, PAIR_COLUMNS, prov, engine, delimiter=",", skip_rows=skip,
                                columns=PairColumns(), record_read=False)


def read_items(path: str, prov: Provenance) -> dict[str, list[str]]:
    """``{item: [title (Chinese), title_en]}`` from ``<D>_item.csv``."""
    prov.add_input(path, "items")
    doc = DecodedFile(path)
    rel = prov.rel(path)
    if doc.had_bom:
        prov.detect(f"{rel}: starts with a UTF-8 byte-order mark (stripped)")
    first = doc.first_line()
    if not first:
        raise ConversionError(f"unreadable header in {path}: the file is empty; expected item, Chinese text, English text")
    data = [t for _, t in doc.lines[:50] if _looks_like_id(t.split(",", 1)[0]) and "," in t]
    spaced = sum(t.split(",", 1)[1].startswith(" ") for t in data) > len(data) / 2
    if spaced:
        prov.detect(f"{rel}: fields separated by ', ' (leading spaces of fields removed)")
    records = doc.csv_records(skipinitialspace=spaced)
    malformed = [f"line {n}: not UTF-8 {b}" for n, b in doc.bad_lines]
    duplicates: list[str] = []
    short: list[str] = []
    out: dict[str, list[str]] = {}
    for i, (number, fields) in enumerate(records):
        if i == 0 and not _looks_like_id(fields[0]):
            prov.detect(f"{rel}: header line {first[:60]!r} skipped")
            continue
        item = fields[0].strip()
        if fields[0] == "\x00csv-error" or len(fields) < 2 or not item:
            malformed.append(f"line {number}: {','.join(fields)[:60]!r}")
            continue
        if len(fields) != 3:
            short.append(f"line {number}: {len(fields)} fields")
        if item in out:
            duplicates.append(f"item {item!r} (line {number})")
            continue
        out[item] = [clean_text(fields[1]), clean_text(fields[2]) if len(fields) > 2 else ""]
    common.report_item_lines(prov, malformed, duplicates, "item")
    prov.issue("item lines with other than 3 fields", len(short), short[:MAX_EXAMPLES],
               action="first 3 fields used (as the official reader's usecols=[0,1,2])")
    prov.count("items", "item_rows", len(out))
    return out


def convert(args: argparse.Namespace) -> str:
    root = args.input
    if not os.path.isdir(root):
        raise ConversionError(f"input folder {root} does not exist")
    domain = args.domain
    name = args.name or domain
    prov = Provenance(NAME, name, root, {"domain": domain, "interactions": args.interactions, "images": args.images,
                                          **common.protocol_options(args)})
    pair = find_one(root, [f"{domain}_pair.csv"], "interactions", required=False)
    behaviour = find_one(root, [f"{domain}_behaviour.tsv", f"{domain}_behavior.tsv"], "interactions", required=False)
    mode = args.interactions if args.interactions != "auto" else ("csv" if pair else "tsv")
    if mode == "csv":
        if pair is None:
            raise ConversionError(f"missing required interactions: expected a file named {domain}_pair.csv in {root}")
        prov.add_input(pair, "interactions")
        inter = read_pair_csv(pair, prov, engine=common.engine_from_args(args, pair))
        time_unit = f"as in {domain}_pair.csv (unit not documented by NineRec; kept as is)"
    else:
        if behaviour is None:
            raise ConversionError(
                f"missing required interactions: expected a file named {domain}_behaviour.tsv (or {domain}_pair.csv) "
                f"in {root}"
            )
        prov.add_input(behaviour, "interactions")
        inter = common.read_sequences(behaviour, prov, engine=common.engine_from_args(args, behaviour))
        prov.detect(f"{prov.rel(behaviour)}: no timestamps (NineRec ships only behaviour.tsv for QB and TN); "
                    "timestamp = 0-based position in the user's sequence")
        time_unit = "0-based position of the item in the user's sequence (behaviour.tsv has no time)"
    item_path = find_one(root, [f"{domain}_item.csv"], "item file (item, Chinese text, English text)")
    item_rows = read_items(item_path, prov)
    inter.drop_unknown_items(set(item_rows), prov, drop=args.unknown_items == "drop")
    common.protocol_from_args(args).apply(inter, prov)
    items = FieldTable([("title", "token_seq"), ("title_en", "token_seq")],
                       {t: item_rows[t] for t in inter.item_tokens() if t in item_rows},
                       text_fields=["title", "title_en"])
    cover_names = [f"{domain}_cover", f"Source_{domain}_cover", "cover", "covers"]
    if domain == "Bili_500K":
        cover_names.insert(2, "Source_Bili_2M_cover")
    cover_dir = args.covers or find_one(root, cover_names, "covers", required=False, want_dir=True)
    spec = YamlSpec(converter=NAME, time_unit=time_unit, text_fields=["title_en"],
                    text_fields_comment="[title] gives the Chinese text, [title, title_en] both")
    return write_dataset(DatasetBuild(name, inter, items, spec, cover_dir=cover_dir), args.output, prov,
                         images=args.images, overwrite=args.overwrite)
