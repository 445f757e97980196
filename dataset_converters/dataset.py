"""Writing one converted dataset: the atomic files, images, features, yaml and provenance, atomically.

Output (``OUT_ROOT/NAME/``):

- ``NAME.inter``: ``user_id:token  item_id:token  timestamp:float`` then extra columns; rows grouped by user in
  order of the user's first appearance in the input, each user's rows by time (ties in input order);
- ``NAME.item``: ``item_id:token`` then the dataset's fields, one row per item of ``NAME.inter`` in order of
  first appearance there; texts are ``:token_seq`` columns cleaned by :func:`dataset_converters.text.clean_text`;
- ``NAME.user`` when the data has user attributes; ``NAME.<split>.inter`` for benchmark splits (MMRec);
- ``images/``, ``features/``, ``NAME.yaml`` and ``provenance.json``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Optional

from dataset_converters import output
from dataset_converters.dataset_yaml import YamlSpec, render_yaml
from dataset_converters.images import export_images
from dataset_converters.interactions import InteractionSet
from dataset_converters.provenance import MAX_EXAMPLES, Provenance

INTER_HEADER = ["user_id:token", "item_id:token", "timestamp:float"]


@dataclass
class FieldTable:
    """Rows of ``.item`` or ``.user``: ``rows[token]`` holds one cleaned string per field of ``fields``."""

    fields: list[tuple[str, str]]  # (name, atomic type) without the id column
    rows: dict[str, list[str]] = field(default_factory=dict)
    text_fields: list[str] = field(default_factory=list)  # fields whose emptiness is reported

    def header(self, id_field: str) -> list[str]:
        return [f"{id_field}:token"] + [f"{n}:{t}" for n, t in self.fields]


@dataclass
class DatasetBuild:
    """Everything a converter hands to :func:`write_dataset`."""

    name: str
    inter: InteractionSet
    items: FieldTable
    yaml: YamlSpec
    users: Optional[FieldTable] = None
    cover_dir: Optional[str] = None
    splits: dict = field(default_factory=dict)  # split name -> InteractionSet (benchmark files)
    extra_writers: list[Callable[[str], None]] = field(default_factory=list)  # called with the temp folder
    extra_items: list[str] = field(default_factory=list)  # item tokens to add to .item after the .inter ones


def _inter_header(inter: InteractionSet) -> list[str]:
    return INTER_HEADER + [f"{n}:{inter.extra_types.get(n, 'token')}" for n in inter.extra]


def write_items(path: str, tokens: list[str], items: FieldTable, prov: Provenance) -> int:
    empty = [""] * len(items.fields)
    names = [n for n, _ in items.fields]
    text_idx = [names.index(f) for f in items.text_fields if f in names]
    no_text = {f: [] for f in items.text_fields if f in names}
    rows = []
    for tok in tokens:
        values = items.rows.get(tok, empty)
        for i in text_idx:
            if values[i] == "":
                no_text[names[i]].append(tok)
        rows.append([tok] + values)
    for f, toks in no_text.items():
        prov.issue(f"items without {f}", len(toks), [f"item {t!r}" for t in toks[:MAX_EXAMPLES]],
                   action=f"written with an empty {f}")
    return output.write_rows(path, items.header("item_id"), rows)


def write_dataset(build: DatasetBuild, out_root: str, prov: Provenance, images: str = "copy",
                  overwrite: bool = False) -> str:
    """Write ``build`` into ``out_root/NAME`` atomically; returns the final folder."""
    try:
        _write(build, out_root, prov, images, overwrite)
    finally:
        prov.close()
        close = getattr(build.inter, "close", None)  # the out-of-core set's database and work folder
        if close is not None:
            close()
    return os.path.join(os.path.abspath(out_root), build.name)


def _write(build: DatasetBuild, out_root: str, prov: Provenance, images: str, overwrite: bool) -> None:
    name = build.name
    with output.AtomicDir(out_root, name, overwrite) as tmp:
        output.write_table_columnar(os.path.join(tmp, f"{name}.inter"), _inter_header(build.inter),
                                    build.inter.batches())
        prov.count("interactions", "written", len(build.inter))
        prov.count("users", "written", build.inter.n_users())
        for split, part in build.splits.items():
            output.write_table_columnar(os.path.join(tmp, f"{name}.{split}.inter"), _inter_header(part), part.batches())
            prov.count("interactions", f"written_{split}", len(part))
        item_tokens = build.inter.item_tokens()
        seen = set(item_tokens)
        item_tokens += [t for t in build.extra_items if t not in seen]
        n_items = write_items(os.path.join(tmp, f"{name}.item"), item_tokens, build.items, prov)
        prov.count("items", "written", n_items)
        if build.users is not None:
            empty = [""] * len(build.users.fields)
            rows = ([u] + build.users.rows.get(u, empty) for u in build.inter.user_tokens())
            output.write_rows(os.path.join(tmp, f"{name}.user"), build.users.header("user_id"), rows)
        export_images(item_tokens, build.cover_dir, tmp, images, prov)
        for writer in build.extra_writers:
            writer(tmp)
        with open(os.path.join(tmp, f"{name}.yaml"), "w", encoding="utf-8", newline="\n") as f:
            f.write(render_yaml(build.yaml, name))
        prov.log_warnings()
        prov.write(os.path.join(tmp, "provenance.json"))
