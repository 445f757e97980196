"""MMRec-format folder (also FMMRec's) -> RecBole atomic files, benchmark split files and token-keyed features.

Inputs (``--input``):

- ``<name>.inter``: tab-separated with a header; ``userID``, ``itemID`` (MMRec's contiguous 0-based ids),
  optional ``rating`` / ``timestamp``, ``x_label`` (0 train, 1 valid, 2 test) and FMMRec's user attributes
  ``u_*`` (e.g. ``u_gender u_age u_occupation``);
- ``u_id_mapping.csv`` / ``i_id_mapping.csv``: tab-separated, header ``<raw column>  userID`` / ``itemID``; the
  raw ids become the tokens of the output (when a mapping is absent the contiguous ids are the tokens, warned);
- ``image_feat.npy`` / ``text_feat.npy`` / ``audio_feat.npy``: ``[n_items, d]``, row i = item id i.

Outputs: ``NAME.inter`` (all rows), ``NAME.train.inter`` / ``NAME.valid.inter`` / ``NAME.test.inter`` from
``x_label`` for RecBole's ``benchmark_filename``, ``NAME.user`` with the ``u_*`` attributes, ``NAME.item`` (ids
only: MMRec ships no text), ``features/mmrec/<image|text|audio>.npy`` written with
:func:`recbole_mm.data.features.write_features` (rows keyed by the raw item token). Without a ``timestamp``
column the timestamp is the row's 0-based position among the user's rows in file order. ``rating`` is kept as
``rating:float``.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dataset_converters.dataset import DatasetBuild, FieldTable, write_dataset
from dataset_converters.dataset_yaml import YamlSpec
from dataset_converters.errors import ConversionError
from dataset_converters.files import find, head_line
from dataset_converters.interactions import SECTION, InteractionSet, build, read_string_table
from dataset_converters.provenance import MAX_EXAMPLES, Provenance

NAME = "mmrec"
SPLITS = {"0": "train", "1": "valid", "2": "test"}
MODALITIES = {"image_feat.npy": "image", "text_feat.npy": "text", "audio_feat.npy": "audio"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--inter", default=None, metavar="FILE",
                   help="the MMRec .inter file (default: the only *.inter file of --input)")


def read_mapping(path: str | None, id_column: str, prov: Provenance, what: str) -> pa.Array | None:
    """Raw token per contiguous id (index = id) from an MMRec mapping csv, or None when absent."""
    if path is None:
        return None
    prov.add_input(path, f"{what}_mapping")
    line, _ = head_line(path)
    delimiter = "\t" if "\t" in line else ","
    names = [h.strip() for h in line.split(delimiter)]
    if id_column not in names or len(names) != 2:
        raise ConversionError(f"unreadable header in {path}: {line[:120]!r}; expected two columns, a raw id and "
                              f"{id_column}")
    raw_name = names[1 - names.index(id_column)]
    table = read_string_table(path, names, prov, delimiter=delimiter, skip_rows=1, section=f"{what}_mapping")
    try:
        ids = pc.cast(table[id_column], pa.int64()).to_numpy(zero_copy_only=False)
    except pa.ArrowInvalid as e:
        raise ConversionError(f"{path}: column {id_column} must hold integers ({e})") from e
    n = int(ids.max()) + 1 if len(ids) else 0
    if len(ids) != n or len(np.unique(ids)) != n:
        raise ConversionError(f"{path}: {id_column} must be the contiguous ids 0..{n - 1}, each once "
                              f"({len(ids)} rows, {len(np.unique(ids))} distinct)")
    raw = pc.take(table[raw_name], pa.array(np.argsort(ids)))
    if len(pc.unique(raw)) != n:
        raise ConversionError(f"{path}: the raw ids of column {raw_name} are not unique")
    prov.detect(f"{prov.rel(path)}: {n} {what}s, raw id column {raw_name!r}")
    return raw


def _map_ids(col: pa.Array, mapping: pa.Array | None, what: str, prov: Provenance) -> tuple[pa.Array, np.ndarray]:
    """Raw tokens for MMRec ids plus a validity mask (ids that are not integers or not mapped are invalid)."""
    valid = pc.match_substring_regex(col, r"^\s*\d+\s*$").to_numpy(zero_copy_only=False)
    ints = pc.cast(pc.utf8_trim_whitespace(pc.if_else(pa.array(valid), col, "0")), pa.int64()).to_numpy(
        zero_copy_only=False)
    if mapping is None:
        return pc.cast(pa.array(ints), pa.string()), valid
    valid &= ints < len(mapping)
    ints = np.where(valid, ints, 0)
    return pc.take(mapping, pa.array(ints)), valid


def _features(root: str, tokens: list[str], prov: Provenance):
    """A writer for ``features/mmrec/<modality>.npy`` (called with the temporary output folder)."""
    files = {m: p for p in find(root, list(MODALITIES), depth=0) for m in [MODALITIES[os.path.basename(p)]]}
    arrays = {}
    for modality, path in sorted(files.items()):
        prov.add_input(path, f"{modality}_features")
        array = np.load(path, mmap_mode="r")
        if array.ndim != 2:
            raise ConversionError(f"{path}: expected a 2-d array [n_items, d], got shape {array.shape}")
        if array.shape[0] < len(tokens):
            raise ConversionError(f"{path}: {array.shape[0]} rows for {len(tokens)} items (row i must be item id i)")
        if array.shape[0] > len(tokens):
            prov.issue(f"{modality} feature rows beyond the last item id", array.shape[0] - len(tokens),
                       [f"{os.path.basename(path)}: {array.shape[0]} rows, {len(tokens)} items"], action="not written")
        arrays[modality] = (path, array)
        prov.count("features", modality, list(array.shape))

    def write(tmp: str) -> None:
        from recbole_mm.data.features import write_features

        for modality, (path, array) in arrays.items():
            out = os.path.join(tmp, "features", "mmrec", f"{modality}.npy")
            write_features(out, np.asarray(array[: len(tokens)]), tokens, modality=modality, kind="pooled",
                           encoder="mmrec", pooling="unknown", created=None,  # reproducible: no wall-clock time
                           settings={"source": prov.rel(path), "source_rows": int(array.shape[0])})

    return write if arrays else None


def convert(args: argparse.Namespace) -> str:
    root = args.input
    if not os.path.isdir(root):
        raise ConversionError(f"input folder {root} does not exist")
    if args.inter:
        inter_path = args.inter
        if not os.path.isfile(inter_path):
            raise ConversionError(f"missing required interactions: {inter_path} does not exist")
    else:
        hits = find(root, ["*.inter"], depth=0)
        if args.name:
            hits = [h for h in hits if os.path.basename(h) == f"{args.name}.inter"] or hits
        if len(hits) != 1:
            raise ConversionError(f"missing required interactions: expected one <name>.inter file in {root}, found "
                                  f"{[os.path.basename(h) for h in hits] or 'none'}; pass --inter")
        inter_path = hits[0]
    name = args.name or os.path.splitext(os.path.basename(inter_path))[0]
    prov = Provenance(NAME, name, root, {"images": args.images})
    prov.add_input(inter_path, "interactions")
    line, _ = head_line(inter_path)
    header = line.split("\t")
    for required in ("userID", "itemID", "x_label"):
        if required not in header:
            raise ConversionError(f"unreadable header in {inter_path}: {line[:120]!r}; expected tab-separated columns "
                                  "userID, itemID, [rating, timestamp,] x_label")
    table = read_string_table(inter_path, header, prov, delimiter="\t", skip_rows=1)

    u_map = read_mapping(next(iter(find(root, ["u_id_mapping.csv"], depth=0)), None), "userID", prov, "user")
    i_map = read_mapping(next(iter(find(root, ["i_id_mapping.csv"], depth=0)), None), "itemID", prov, "item")
    for what, mapping in (("user", u_map), ("item", i_map)):
        if mapping is None:
            prov.issue(f"no {what[0]}_id_mapping.csv", 1, [f"{what} tokens are MMRec's contiguous ids"],
                       action="the contiguous ids are used as tokens")
    _, u_ok = _map_ids(table["userID"], u_map, "user", prov)
    _, i_ok = _map_ids(table["itemID"], i_map, "item", prov)
    l_ok = pc.is_in(pc.utf8_trim_whitespace(table["x_label"]), pa.array(list(SPLITS))).to_numpy(zero_copy_only=False)
    bad = ~(u_ok & i_ok & l_ok)
    if bad.any():
        rows = np.flatnonzero(bad)
        prov.drop(SECTION, "userID / itemID not an id of the mapping, or x_label not 0/1/2", len(rows),
                  [f"row {r + 1}: userID {table['userID'][int(r)].as_py()!r} itemID {table['itemID'][int(r)].as_py()!r} "
                   f"x_label {table['x_label'][int(r)].as_py()!r}" for r in rows[:MAX_EXAMPLES]])
        table = table.filter(pa.array(~bad))
    users, _ = _map_ids(table["userID"], u_map, "user", prov)
    items, _ = _map_ids(table["itemID"], i_map, "item", prov)
    label = pc.utf8_trim_whitespace(table["x_label"])
    extra, extra_types = {}, {}
    if "rating" in header:
        extra["rating"], extra_types["rating"] = table["rating"], "float"
    if "timestamp" in header:
        ts, positional = table["timestamp"], False
        time_unit = "as in the MMRec .inter file"
    else:
        positional = True
        codes = pc.dictionary_encode(users).indices.to_numpy(zero_copy_only=False)
        order = np.argsort(codes, kind="stable")
        counts = np.bincount(codes)
        ts = np.empty(len(codes), dtype=np.int64)
        ts[order] = np.arange(len(codes)) - (np.cumsum(counts) - counts)[codes[order]]
        prov.detect(f"{prov.rel(inter_path)}: no timestamp column; timestamp = position of the row among the user's rows")
        time_unit = "0-based position of the row among the user's rows (the MMRec file has no time)"
    inter = build(users, items, ts, prov, extra=extra, extra_types=extra_types, positional=positional)
    labels = label.to_numpy(zero_copy_only=False)
    inter.sort_user_time()
    splits = {}
    for code, split in SPLITS.items():
        part = InteractionSet(inter.user, inter.item, inter.ts, inter.extra, inter.sel[labels[inter.sel] == code],
                              positional, extra_types)
        splits[split] = part
        prov.count(SECTION, f"x_label_{code}_{split}", len(part))

    users_table = _user_attributes(table, header, inter, prov)
    if i_map is not None:
        item_tokens = i_map.to_pylist()
    else:  # tokens are the contiguous ids: every id up to the largest seen (or the feature rows)
        n_items = max((int(t) + 1 for t in inter.item_tokens()), default=0)
        for path in find(root, list(MODALITIES), depth=0):
            n_items = max(n_items, int(np.load(path, mmap_mode="r").shape[0]))
        item_tokens = [str(i) for i in range(n_items)]
    feature_writer = _features(root, item_tokens, prov)
    spec = YamlSpec(converter=NAME, time_unit=time_unit, text_fields=[], image_dir=None, protocol="benchmark",
                    text_fields_comment="MMRec ships features, no text (features/mmrec/*.npy)")
    build_ = DatasetBuild(name, inter, FieldTable([]), spec, users=users_table, splits=splits,
                          extra_writers=[feature_writer] if feature_writer else [], extra_items=item_tokens)
    return write_dataset(build_, args.output, prov, images="skip", overwrite=args.overwrite)


def _user_attributes(table: pa.Table, header: list[str], inter: InteractionSet, prov: Provenance) -> FieldTable | None:
    """``NAME.user`` rows from FMMRec's ``u_*`` columns (first value per user; disagreements counted)."""
    attrs = [h for h in header if h.startswith("u_")]
    if not attrs:
        return None
    codes = inter.user.codes[inter.sel]
    first_pos = np.unique(codes, return_index=True)[1]  # first row of each user in output order
    user_codes = codes[first_pos]
    slot = np.empty(inter.user.size, dtype=np.int64)
    slot[user_codes] = np.arange(len(user_codes))
    rows = {inter.user.token(c): [] for c in user_codes}
    conflicts = []
    for a in attrs:
        col = pc.utf8_trim_whitespace(pc.take(table[a], pa.array(inter.sel)))
        first_val = pc.take(col, pa.array(first_pos))
        differ = pc.sum(pc.not_equal(col, pc.take(first_val, pa.array(slot[codes])))).as_py() or 0
        if differ:
            conflicts.append(f"{a}: {differ} rows")
        for c, v in zip(user_codes, first_val.to_pylist()):
            rows[inter.user.token(c)].append(v)
    prov.issue("user attributes that change between a user's rows", len(conflicts), conflicts[:MAX_EXAMPLES],
               action="the first value is kept")
    prov.detect(f"user attribute columns {', '.join(attrs)} written to the .user file")
    return FieldTable([(a, "token") for a in attrs], rows)
