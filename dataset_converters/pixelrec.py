"""PixelRec (``--variant`` Pixel200K / Pixel1M / Pixel8M / PixelRec / PixelRec50K) -> RecBole atomic files.

Inputs (searched in ``--input`` and two folder levels below; ``--interactions`` / ``--items`` name them
explicitly):

- interactions ``<Variant>.csv`` with a header **item_id,user_id,timestamp** (item first; the header decides
  the order); integer timestamps, kept as is (epoch seconds, inferred);
- item information, often **also named** ``<Variant>.csv`` in another folder (or ``item_info.csv``): the two
  are told apart by their header, not their name. Columns ``item_id``, the counters ``view_number,
  comment_number, thumbup_number, share_number, coin_number, favorite_number, barrage_number`` (written as
  ``:float``) and the Chinese texts ``title, tag, description`` (``:token_seq``); the separator (comma or tab)
  is detected from the header; absent columns are simply not written;
- covers ``cover/i<N>.jpg`` (or ``covers/``, ``images/``).
"""

from __future__ import annotations

import argparse
import os

from dataset_converters import common
from dataset_converters.dataset import DatasetBuild, FieldTable, write_dataset
from dataset_converters.dataset_yaml import YamlSpec
from dataset_converters.errors import ConversionError
from dataset_converters.files import find, head_line, require_file
from dataset_converters.provenance import MAX_EXAMPLES, Provenance
from dataset_converters.text import DecodedFile, clean_text

NAME = "pixelrec"
INTER_ALIASES = {"item": ("item_id", "item"), "user": ("user_id", "user"), "timestamp": ("timestamp", "time")}
COUNTERS = ("view_number", "comment_number", "thumbup_number", "share_number", "coin_number", "favorite_number",
            "barrage_number")
TEXTS = ("title", "tag", "description")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--variant", default=None, help="Pixel200K, Pixel1M, Pixel8M, PixelRec or PixelRec50K")
    p.add_argument("--interactions", default=None, metavar="FILE", help="interaction csv (default: detected)")
    p.add_argument("--items", default=None, metavar="FILE", help="item information csv (default: detected)")
    p.add_argument("--covers", default=None, metavar="DIR", help="cover folder (default: cover or covers)")
    common.add_protocol_arguments(p)


def _kind(path: str) -> str:
    try:
        line, _ = head_line(path)
    except (ConversionError, OSError):
        return "other"
    names = {f.strip().strip('"').lower() for f in line.replace("\t", ",").split(",")}
    if "item_id" in names and ("title" in names or "view_number" in names):
        return "items"
    if {"item_id", "user_id"} <= names:
        return "interactions"
    return "other"


def _locate(root: str, variant: str | None, kind: str) -> str:
    candidates = [p for p in find(root, ["*.csv"]) if _kind(p) == kind]
    if variant:
        named = [p for p in candidates if os.path.splitext(os.path.basename(p))[0].lower() == variant.lower()]
        if not named and kind == "items":
            named = [p for p in candidates if os.path.basename(p).lower() == "item_info.csv"]
        candidates = named
    what = "interaction csv with header item_id,user_id,timestamp" if kind == "interactions" else \
        "item information csv with header item_id,...,title,tag,description"
    if not candidates:
        raise ConversionError(f"missing required {what}" + (f" named {variant}.csv" if variant else "") + f" in {root}")
    if len(candidates) > 1:
        raise ConversionError(f"several candidates for the {what} in {root}: "
                              + ", ".join(os.path.relpath(p, root) for p in candidates)
                              + "; pass --variant or --" + ("interactions" if kind == "interactions" else "items"))
    return candidates[0]


def read_items(path: str, prov: Provenance) -> tuple[list[tuple[str, str]], dict[str, list[str]]]:
    prov.add_input(path, "items")
    doc = DecodedFile(path)
    rel = prov.rel(path)
    first = doc.first_line()
    delimiter = "\t" if "\t" in first else ","
    prov.detect(f"{rel}: item information, {'tab' if delimiter == chr(9) else 'comma'}-separated, header {first[:80]!r}")
    records = doc.csv_records(delimiter=delimiter)
    _, header = next(records, (0, []))
    header = [h.strip().lower() for h in header]
    if "item_id" not in header:
        raise ConversionError(f"unreadable header in {path}: {first[:120]!r}; expected item_id and the item fields")
    idx = header.index("item_id")
    counters = [c for c in COUNTERS if c in header]
    texts = [c for c in TEXTS if c in header]
    ignored = [h for h in header if h not in counters and h not in texts and h != "item_id"]
    if ignored:
        prov.note(f"{rel}: columns not written: {', '.join(ignored)}")
    fields = [(c, "float") for c in counters] + [(c, "token_seq") for c in texts]
    cols = [header.index(c) for c in counters] + [header.index(c) for c in texts]
    malformed = [f"line {n}: not UTF-8 {b}" for n, b in doc.bad_lines]
    duplicates: list[str] = []
    bad_numbers: list[str] = []
    out: dict[str, list[str]] = {}
    for number, values in records:
        if values[0] == "\x00csv-error" or len(values) != len(header) or not values[idx].strip():
            malformed.append(f"line {number}: {len(values)} fields (expected {len(header)})")
            continue
        item = values[idx].strip()
        if item in out:
            duplicates.append(f"item {item!r} (line {number})")
            continue
        row = [common.parse_counter(values[c], item, header[c], bad_numbers) for c in cols[: len(counters)]]
        row += [clean_text(values[c]) for c in cols[len(counters):]]
        out[item] = row
    common.report_item_lines(prov, malformed, duplicates, "item information")
    prov.issue("counter values that are not numbers", len(bad_numbers), bad_numbers[:MAX_EXAMPLES],
               action="written empty")
    prov.count("items", "item_rows", len(out))
    return fields, out


def convert(args: argparse.Namespace) -> str:
    root = args.input
    if not os.path.isdir(root):
        raise ConversionError(f"input folder {root} does not exist")
    inter_path = require_file(args.interactions, "interaction csv") if args.interactions else \
        _locate(root, args.variant, "interactions")
    item_path = require_file(args.items, "item information csv") if args.items else _locate(root, args.variant, "items")
    name = args.name or args.variant or os.path.splitext(os.path.basename(inter_path))[0]
    prov = Provenance(NAME, name, root, {"variant": args.variant, "images": args.images, **common.protocol_options(args)})
    prov.add_input(inter_path, "interactions")
    inter = common.read_pairs(inter_path, prov, INTER_ALIASES, ("item", "user", "timestamp"),
                              "item_id,user_id,timestamp", engine=common.engine_from_args(args, inter_path))
    fields, item_rows = read_items(item_path, prov)
    inter.drop_unknown_items(set(item_rows), prov, drop=args.unknown_items == "drop")
    common.protocol_from_args(args).apply(inter, prov)
    items = FieldTable(fields, {t: item_rows[t] for t in inter.item_tokens() if t in item_rows},
                       text_fields=[f for f, _ in fields if f == "title"])
    cover_dir = args.covers
    if cover_dir is None:
        dirs = find(root, ["cover", "covers", "images"], want_dir=True)
        cover_dir = dirs[0] if dirs else None
    spec = YamlSpec(converter=NAME, time_unit="integer timestamps as in the interaction file (epoch seconds, inferred)",
                    text_fields=["title"], text_fields_comment="Chinese; [title, tag, description] adds the others")
    return write_dataset(DatasetBuild(name, inter, items, spec, cover_dir=cover_dir), args.output, prov,
                         images=args.images, overwrite=args.overwrite)
