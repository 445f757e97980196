"""Pieces the MicroLens, NineRec and PixelRec converters share: reading pair files by header, item-table helpers
and the command-line options of the interaction protocol."""

from __future__ import annotations

import argparse
import os
import re
from typing import Optional, Sequence

from dataset_converters.errors import ConversionError
from dataset_converters.files import head_line, is_number
from dataset_converters.interactions import Protocol, build, read_string_table
from dataset_converters.interactions import read_sequences as interactions_read_sequences
from dataset_converters.provenance import MAX_EXAMPLES, Provenance
from dataset_converters.text import clean_text

QUOTED = re.compile(r'^"(?:[^"]|"")*"$')


def add_protocol_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("interaction protocol")
    g.add_argument("--keep-last", type=int, default=None, metavar="N",
                   help="keep each user's last N interactions (the papers keep 10 + 3 = 13); default: all")
    g.add_argument("--min-user-inter", type=int, default=None, metavar="K",
                   help="drop users with fewer than K interactions (applied after --keep-last)")
    g.add_argument("--dedup", choices=("first", "all"), default="first",
                   help="first: one row per (user, item), the earliest (default); all: keep repeats, drop only "
                        "exact duplicate rows")
    g.add_argument("--unknown-items", choices=("keep", "drop"), default="keep",
                   help="interactions whose item is absent from the item file: keep them (the item gets empty "
                        "text, default) or drop them; counted either way")
    add_engine_arguments(p)


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("memory (large inputs)")
    g.add_argument("--engine", choices=("auto", "memory", "duckdb"), default="auto",
                   help="memory: numpy in RAM (fastest, ~160 bytes per input row); duckdb: out of core, bounded by "
                        "--memory-limit, spilling to --temp-dir; auto (default): duckdb when 8x the interaction "
                        "file exceeds --memory-limit. Same output either way (user,item,timestamp csv and "
                        "user<TAB>items sequence .tsv inputs alike)")
    g.add_argument("--memory-limit", default=None, metavar="SIZE",
                   help="memory cap of the out-of-core engine, e.g. 8GB or 512MB (default: half of the RAM, or of "
                        "the container's limit)")
    g.add_argument("--temp-dir", default=None, metavar="DIR",
                   help="folder for the out-of-core database and its spill files (default: the system temp folder "
                        "$TMPDIR; needs about 32 bytes per input row free)")


def protocol_from_args(args: argparse.Namespace) -> Protocol:
    return Protocol(dedup=args.dedup, keep_last=args.keep_last, min_user_inter=args.min_user_inter)


def protocol_options(args: argparse.Namespace) -> dict:
    return {"keep_last": args.keep_last, "min_user_inter": args.min_user_inter, "dedup": args.dedup,
            "unknown_items": args.unknown_items}


def engine_from_args(args: argparse.Namespace, path: str):
    """The :class:`~dataset_converters.outofcore.Engine` for the interaction file ``path`` (``--engine`` ...).

    Namespaces built without the engine options (older callers) get the in-memory engine.
    """
    from dataset_converters.outofcore import Engine, choose_engine

    choice = getattr(args, "engine", None)
    if choice is None:
        return Engine("memory")
    return choose_engine(choice, getattr(args, "memory_limit", None), getattr(args, "temp_dir", None),
                         os.path.getsize(path))


def read_sequences(path: str, prov: Provenance, engine=None):
    """Read a ``user<TAB>item item ...`` sequence file (timestamp = 0-based position in the user's sequence).

    With an out-of-core ``engine`` (:func:`engine_from_args`) the file is streamed in blocks into DuckDB
    (:func:`dataset_converters.outofcore.read_sequences`); otherwise
    :func:`~dataset_converters.interactions.read_sequences` reads it in memory. Same output either way.
    """
    if engine is not None and engine.out_of_core:
        from dataset_converters import outofcore

        return outofcore.read_sequences(path, prov, engine)
    users, items, positions = interactions_read_sequences(path, prov)
    return build(users, items, positions, prov, positional=True)


def header_columns(path: str, delimiter: str, aliases: dict[str, Sequence[str]], expected: str,
                   prov: Provenance) -> tuple[Optional[list[str]], list[str]]:
    """Detect whether ``path`` has a header naming the ``aliases`` columns.

    Returns ``(names, fields)``: ``names`` maps each column position to a canonical name (``None`` when the file
    has no header, i.e. its first line is all numbers), ``fields`` the first line split. A first line that is
    neither raises an "unreadable header" error naming the file and ``expected``.
    """
    line, bom = head_line(path)
    if bom:
        prov.detect(f"{prov.rel(path)}: starts with a UTF-8 byte-order mark (skipped)")
    fields = [f.strip().strip('"').strip() for f in line.split(delimiter)]
    if not line.strip():
        raise ConversionError(f"unreadable header in {path}: the file is empty; expected {expected}")
    lookup = {a.lower(): canon for canon, names in aliases.items() for a in names}
    names = [lookup.get(f.lower(), f) for f in fields]
    if all(c in names for c in aliases):
        return names, fields
    if all(is_number(f) for f in fields):
        return None, fields
    raise ConversionError(f"unreadable header in {path}: first line {line[:120]!r}; expected {expected}")


def read_pairs(path: str, prov: Provenance, aliases: dict[str, Sequence[str]], default_order: Sequence[str],
               expected: str, delimiter: str = ",", engine=None):
    """Read a ``user/item/timestamp`` csv by its header names (or ``default_order`` when it has none).

    With an out-of-core ``engine`` (:func:`engine_from_args`) the rows go to DuckDB
    (:class:`~dataset_converters.outofcore.DuckInteractions`); otherwise an in-memory
    :class:`~dataset_converters.interactions.InteractionSet`.
    """
    names, fields = header_columns(path, delimiter, aliases, expected, prov)
    if names is None:
        if len(fields) != len(default_order):
            raise ConversionError(
                f"unreadable header in {path}: no header and {len(fields)} fields on the first line; expected {expected}"
            )
        names = list(default_order)
        skip = 0
        prov.detect(f"{prov.rel(path)}: no header line; columns taken as {','.join(default_order)}")
    else:
        skip = 1
        prov.detect(f"{prov.rel(path)}: header {','.join(fields)}")
    unique = [n if n not in names[:i] else f"{n}_{i}" for i, n in enumerate(names)]
    if engine is not None and engine.out_of_core:
        from dataset_converters import outofcore

        return outofcore.read_pairs(path, unique, prov, engine, delimiter=delimiter, skip_rows=skip)
    table = read_string_table(path, unique, prov, delimiter=delimiter, skip_rows=skip)
    return build(table["user"], table["item"], table["timestamp"], prov)


def parse_counter(value: str, token: str, field: str, bad: list) -> str:
    """A numeric field as written in the source, or ``""`` (and noted in ``bad``) when it is not a number."""
    value = value.strip()
    if value == "" or is_number(value):
        return value
    bad.append(f"item {token!r} {field}={value!r}")
    return ""


def unquote_field(text: str) -> tuple[str, bool]:
    """Undo CSV quoting when ``text`` is exactly one quoted field (doubled quotes inside become single)."""
    if QUOTED.match(text):
        return text[1:-1].replace('""', '"'), True
    return text, False


def report_item_lines(prov: Provenance, malformed: list, duplicates: list, what: str) -> None:
    prov.drop("items", f"malformed {what} line", len(malformed), malformed[:MAX_EXAMPLES])
    prov.drop("items", f"repeated item id in the {what} file (the first row is kept)", len(duplicates),
              duplicates[:MAX_EXAMPLES])


def clean(value: str) -> str:
    return clean_text(value)
