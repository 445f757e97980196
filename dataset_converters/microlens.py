"""MicroLens (50K / 100K / 1M) raw download -> RecBole atomic files.

Inputs (``<P>`` is the file prefix, e.g. ``MicroLens-50k``; see docs/datasets.md):

- ``<P>_pairs.csv``: ``user,item,timestamp`` with a header, timestamps in epoch **milliseconds** (kept as is);
  the header names the columns, so another order is read correctly; a file without header is read as
  ``user,item,timestamp`` and the fact recorded;
- or ``<P>_pairs.tsv`` (``--interactions tsv``): ``user<TAB>item item ...``, chronological, no time: the
  timestamp is the 0-based position in the sequence (what the official baselines read);
- titles (required): 50K ``<P>_titles.csv`` has a header ``item,title`` and CSV quoting (titles with commas,
  quotes, emoji, possibly line breaks); 100K ``<P>_title_en.csv`` has **no header**, is split at the first comma
  like the official reader, may start with a BOM, and has empty titles; 1M ``<P>_title.csv`` is detected the
  same way. A title that is exactly one CSV-quoted field is unquoted. ``--fill-titles-from`` fills empty or
  absent titles from another titles file (e.g. the 50K one for 100K), counted;
- optional ``<P>_likes_and_views.txt`` (``item<TAB>likes<TAB>views``, no header) -> ``likes:float views:float``
  (likes > views is reported, kept as is: issue #10); optional ``tags_to_summary.csv`` (item, tag) ->
  ``tag:token``;
- covers ``<P>_covers/<item>.jpg`` (or ``covers/``), copied to ``images/``.
"""

from __future__ import annotations

import argparse
import os
from typing import Optional

from dataset_converters import common
from dataset_converters.dataset import DatasetBuild, FieldTable, write_dataset
from dataset_converters.dataset_yaml import YamlSpec
from dataset_converters.errors import ConversionError
from dataset_converters.files import find, find_one, is_number, require_file
from dataset_converters.provenance import MAX_EXAMPLES, Provenance
from dataset_converters.text import DecodedFile, clean_text

NAME = "microlens"
PAIR_ALIASES = {
    "user": ("user", "user_id", "userid"),
    "item": ("item", "item_id", "itemid", "video_id", "videoid"),
    "timestamp": ("timestamp", "time", "ts"),
}
ITEM_HEADER_NAMES = {"item", "item_id", "itemid", "video_id", "videoid", "id"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--variant", default=None,
                   help="file prefix to use when the folder holds several (e.g. MicroLens-50k or just 50k)")
    p.add_argument("--interactions", choices=("auto", "csv", "tsv"), default="auto",
                   help="csv: <P>_pairs.csv with real timestamps (default when present); tsv: <P>_pairs.tsv "
                        "sequences, timestamp = position")
    p.add_argument("--fill-titles-from", default=None, metavar="FILE",
                   help="another MicroLens titles file whose titles fill empty or absent ones (e.g. the 50K titles "
                        "for 100K)")
    p.add_argument("--covers", default=None, metavar="DIR", help="cover folder (default: <P>_covers or covers)")
    common.add_protocol_arguments(p)


def _prefix(root: str, variant: Optional[str]) -> str:
    hits = find(root, ["*_pairs.csv", "*_pairs.tsv"])
    prefixes = sorted({os.path.basename(h).rsplit("_pairs.", 1)[0] for h in hits})
    if variant:
        chosen = [p for p in prefixes if p.lower() == variant.lower() or p.lower().endswith(variant.lower())]
        if len(chosen) != 1:
            raise ConversionError(f"--variant {variant!r} matches {chosen or 'none'} of the pair files {prefixes} in {root}")
        return chosen[0]
    if not prefixes:
        raise ConversionError(f"missing required interactions: expected a file named *_pairs.csv or *_pairs.tsv in {root}")
    if len(prefixes) > 1:
        raise ConversionError(f"several MicroLens variants in {root}: {prefixes}; pass --variant")
    return prefixes[0]


def read_titles(path: str, prov: Provenance, role: str = "titles") -> dict[str, str]:
    """``{item: cleaned title}`` from a MicroLens titles file (header / no header, quoting, BOM detected)."""
    prov.add_input(path, role)
    doc = DecodedFile(path)
    rel = prov.rel(path)
    if doc.had_bom:
        prov.detect(f"{rel}: starts with a UTF-8 byte-order mark (stripped)")
    malformed = [f"line {n}: not UTF-8 {b}" for n, b in doc.bad_lines]
    first = doc.first_line()
    head = first.split(",", 1)[0].strip().strip('"').lower()
    titles: dict[str, str] = {}
    duplicates: list[str] = []
    if not first:
        raise ConversionError(f"unreadable header in {path}: the file is empty; expected item,title lines")
    if head in ITEM_HEADER_NAMES:
        prov.detect(f"{rel}: header line {first[:40]!r}; parsed as CSV with quoting")
        records = doc.csv_records()
        next(records, None)
        rejoined = 0
        for number, fields in records:
            if fields[0] == "\x00csv-error" or len(fields) < 2 or not fields[0].strip():
                malformed.append(f"line {number}: {','.join(fields)[:60]!r}")
                continue
            if len(fields) > 2:
                rejoined += 1
            item, title = fields[0].strip(), ",".join(fields[1:])
            if item in titles:
                duplicates.append(f"item {item!r} (line {number})")
                continue
            titles[item] = clean_text(title)
        if rejoined:
            prov.detect(f"{rel}: {rejoined} title(s) with unquoted commas, rejoined at the commas")
    else:
        prov.detect(f"{rel}: no header line; each line split at its first comma (official reader)")
        unquoted = 0
        for number, text in doc.lines:
            if not text.strip():
                continue
            if "," not in text:
                malformed.append(f"line {number}: {text[:60]!r} (no comma)")
                continue
            item, title = text.split(",", 1)
            item = item.strip()
            if not item or any(c.isspace() for c in item):
                malformed.append(f"line {number}: {text[:60]!r} (bad item id)")
                continue
            title, was_quoted = common.unquote_field(title)
            unquoted += was_quoted
            if item in titles:
                duplicates.append(f"item {item!r} (line {number})")
                continue
            titles[item] = clean_text(title)
        if unquoted:
            prov.detect(f"{rel}: {unquoted} title(s) written as one CSV-quoted field, unquoted")
    common.report_item_lines(prov, malformed, duplicates, role)
    prov.count("items", f"{role}_rows", len(titles))
    return titles


def read_likes_views(path: str, prov: Provenance) -> dict[str, list[str]]:
    prov.add_input(path, "likes_and_views")
    doc = DecodedFile(path)
    out: dict[str, list[str]] = {}
    malformed = [f"line {n}: not UTF-8 {b}" for n, b in doc.bad_lines]
    bad_numbers: list[str] = []
    duplicates: list[str] = []
    more_likes: list[str] = []
    lines = [(n, t) for n, t in doc.lines if t.strip()]
    if lines and len(lines[0][1].split("\t")) == 3 and not is_number(lines[0][1].split("\t")[1]):
        prov.detect(f"{prov.rel(path)}: header line {lines[0][1][:40]!r} skipped")
        lines = lines[1:]
    for number, text in lines:
        fields = text.split("\t")
        if len(fields) != 3 or not fields[0].strip():
            malformed.append(f"line {number}: {text[:60]!r}")
            continue
        item = fields[0].strip()
        if item in out:
            duplicates.append(f"item {item!r} (line {number})")
            continue
        likes = common.parse_counter(fields[1], item, "likes", bad_numbers)
        views = common.parse_counter(fields[2], item, "views", bad_numbers)
        if likes and views and float(likes) > float(views):
            more_likes.append(f"item {item!r} likes {likes} > views {views}")
        out[item] = [likes, views]
    common.report_item_lines(prov, malformed, duplicates, "likes_and_views")
    prov.issue("likes / views values that are not numbers", len(bad_numbers), bad_numbers[:MAX_EXAMPLES],
               action="written empty")
    prov.issue("items with more likes than views", len(more_likes), more_likes[:MAX_EXAMPLES],
               action="kept as is (MicroLens issue #10)")
    return out


def read_tags(path: str, prov: Provenance, known: set) -> dict[str, str]:
    prov.add_input(path, "tags")
    doc = DecodedFile(path)
    rows = [(n, f) for n, f in doc.csv_records() if f[0] != "\x00csv-error"]
    if rows and rows[0][1][0].strip() not in known:
        rows = rows[1:]  # a header line
    out: dict[str, str] = {}
    extra: list[str] = []
    for number, fields in rows:
        if len(fields) < 2:
            continue
        item = fields[0].strip()
        if item in out:
            extra.append(f"item {item!r} (line {number})")
            continue
        out[item] = clean_text(",".join(fields[1:]))
    matched = sum(1 for k in out if k in known)
    if out and matched < len(out) / 2:
        prov.issue("tags file not keyed by item id", 1, [f"{prov.rel(path)}: {matched} of {len(out)} keys are items"],
                   action="ignored")
        return {}
    prov.issue("items with several tags", len(extra), extra[:MAX_EXAMPLES], action="the first tag is kept")
    return out


def convert(args: argparse.Namespace) -> str:
    root = args.input
    if not os.path.isdir(root):
        raise ConversionError(f"input folder {root} does not exist")
    prefix = _prefix(root, args.variant)
    name = args.name or prefix
    options = {"variant": prefix, "interactions": args.interactions, "images": args.images,
               "fill_titles_from": os.path.basename(args.fill_titles_from) if args.fill_titles_from else None,
               **common.protocol_options(args)}
    prov = Provenance(NAME, name, root, options)
    csv_path = find_one(root, [f"{prefix}_pairs.csv"], "interactions", required=False)
    tsv_path = find_one(root, [f"{prefix}_pairs.tsv"], "interactions", required=False)
    mode = args.interactions if args.interactions != "auto" else ("csv" if csv_path else "tsv")
    if mode == "csv":
        path = require_file(csv_path or os.path.join(root, f"{prefix}_pairs.csv"), "interactions (user,item,timestamp csv)")
        prov.add_input(path, "interactions")
        inter = common.read_pairs(path, prov, PAIR_ALIASES, ("user", "item", "timestamp"),
                                  "user,item,timestamp (header optional)", engine=common.engine_from_args(args, path))
        time_unit = "milliseconds since the Unix epoch, as in the MicroLens pairs.csv"
    else:
        path = require_file(tsv_path or os.path.join(root, f"{prefix}_pairs.tsv"), "interactions (user<TAB>items tsv)")
        prov.add_input(path, "interactions")
        inter = common.read_sequences(path, prov, engine=common.engine_from_args(args, path))
        prov.detect(f"{prov.rel(path)}: sequences without time; timestamp = 0-based position in the user's sequence")
        time_unit = "0-based position of the item in the user's sequence (the .tsv has no time)"

    title_path = find_one(root, [f"{prefix}_titles.csv", f"{prefix}_title_en.csv", f"{prefix}_title.csv"],
                          "titles file")
    titles = read_titles(title_path, prov)
    if args.fill_titles_from:
        fill = read_titles(require_file(args.fill_titles_from, "titles file for --fill-titles-from"), prov,
                           role="fill_titles")
        filled = [k for k, v in fill.items() if v and not titles.get(k)]
        for k in filled:
            titles[k] = fill[k]
        prov.count("items", "titles_filled_from_other_file", len(filled))
    fields = [("title", "token_seq")]
    extra_fields: list[tuple[dict, int]] = []
    lv_path = find_one(root, [f"{prefix}_likes_and_views.txt"], "likes and views", required=False)
    if lv_path:
        extra_fields.append((read_likes_views(lv_path, prov), 2))
        fields += [("likes", "float"), ("views", "float")]
    tag_path = find_one(root, ["tags_to_summary.csv"], "tags", required=False)
    if tag_path:
        tags = read_tags(tag_path, prov, set(titles))
        if tags:
            extra_fields.append(({k: [v] for k, v in tags.items()}, 1))
            fields.append(("tag", "token"))
    unknown = inter.drop_unknown_items(set(titles), prov, drop=args.unknown_items == "drop")
    common.protocol_from_args(args).apply(inter, prov)

    rows: dict[str, list[str]] = {}
    for item in inter.item_tokens():
        values = [titles.get(item, "")]
        for table, width in extra_fields:
            values += table.get(item, [""] * width)
        rows[item] = values
    items = FieldTable(fields, rows, text_fields=["title"])
    if unknown:
        prov.note(f"{len(unknown)} item(s) of the interactions are absent from {prov.rel(title_path)}")

    cover_dir = args.covers or find_one(root, [f"{prefix}_covers", "covers", f"{prefix}_cover", "cover"],
                                        "covers", required=False, want_dir=True)
    spec = YamlSpec(converter=NAME, time_unit=time_unit, text_fields=["title"],
                    text_fields_comment="MicroLens titles are English machine translations")
    return write_dataset(DatasetBuild(name, inter, items, spec, cover_dir=cover_dir), args.output, prov,
                         images=args.images, overwrite=args.overwrite)
