"""Derived dataset folders: several sources merged into one (PMMRec-style pre-training on several datasets), or one
source restricted to an item subset (a transfer target whose catalogue is disjoint from its source's).

:func:`merge_datasets` writes ``OUT_ROOT/NAME/`` (NAME defaults to the source names joined with ``+``):

- ``NAME.inter`` / ``.item`` / ``.user`` (if a source has one): every source's rows, source by source, user and item
  tokens written ``<source name>__<token>`` (:data:`PREFIX_SEP`), so users and catalogues of different sources never
  meet (a token that still collides is an error). Columns: the ids, then the union of the sources' columns in
  first-seen order (a missing one is an empty cell; one name, one ``:type``). Items of ``.inter`` absent from
  ``.item`` get a row of empty cells. Every other cell is copied byte for byte.
- ``images/<prefixed token>.<ext>``: an absolute symlink to each source image (a copy where symlinks fail).
- ``NAME.yaml``: id fields, ``TIME_FIELD`` (if every source has it), ``load_col``, ``text_fields`` (those common to
  all sources: their yaml's, else their ``:token_seq`` columns) and ``image_dir``.
- ``merge.json``: the sources (folder, sha256 of ``.inter`` / ``.item`` / ``.user`` / yaml, image listing), counts.

:func:`subset_items` writes ``OUT_ROOT/NAME/`` from one source: the interactions on a given item set (rows copied
verbatim) minus users left with fewer than ``min_user_inter`` of them, the ``.item`` / ``.user`` rows of the items
and users kept, image symlinks, the source's yaml and ``split.json`` (source fingerprint, counts, caller's notes).

Both build under a :class:`~recbole_mm.atomic.BuildLock` (``OUT_ROOT/.NAME.lock``) into ``OUT_ROOT/.NAME.tmp-*``,
renamed into place at the end: a concurrent caller waits, then reuses the folder. A finished folder is reused when
its provenance file records the same inputs (the sources' sha256, the options) and rebuilt otherwise. Derived
caches (``features/``, ``image_store/``) and benchmark split files (``NAME.<part>.inter``) are not carried over.
Source folders are ``<data_path>/<name>``; embedded datasets (``ml-100k-mm``) are found or built in the cache.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from typing import Callable, Iterable, Optional

import yaml

from recbole_mm.atomic import FolderBuild, atomic_write_json, read_json
from recbole_mm.data.features import file_sha256
from recbole_mm.data.images import find_images
from recbole_mm.paths import properties_dir

logger = logging.getLogger(__name__)

PREFIX_SEP = "__"
FORMAT = 1
COMMENT_COLUMN = 40


# ------------------------------------------------------------------------------------------------ source folders
def source_dir(data_path: str, name: str) -> str:
    """``<data_path>/<name>``; an embedded dataset (``ml-100k-mm``) not found there is found (or built) in the cache."""
    folder = os.path.join(data_path, name)
    if not os.path.isdir(folder):
        from recbole_mm.data.embedded import EMBEDDED_DATASETS, build_embedded, embedded_dataset_dir

        if name not in EMBEDDED_DATASETS:
            raise FileNotFoundError(f"source dataset folder {folder} does not exist")
        folder = embedded_dataset_dir(name)
        if not os.path.isfile(os.path.join(folder, f"{name}.inter")):
            build_embedded(name, folder)
    return folder


class _Source:
    """One source folder: its files, yaml keys and fingerprint."""

    def __init__(self, folder: str, name: str):
        self.name, self.folder = name, os.path.abspath(folder)
        self.inter = self.path("inter")
        if not os.path.isfile(self.inter):
            raise FileNotFoundError(f"source dataset {name} has no interaction file {self.inter}")
        found = [p for p in (self.path("yaml"), os.path.join(properties_dir(), "dataset", f"{name}.yaml"))
                 if os.path.isfile(p)]  # the folder's yaml, else the package's (embedded datasets)
        self.yaml_path = found[0] if found else None
        with open(self.yaml_path or os.devnull, encoding="utf-8") as f:
            self.cfg = yaml.safe_load(f) or {}
        self.user_field = self.cfg.get("USER_ID_FIELD", "user_id")
        self.item_field = self.cfg.get("ITEM_ID_FIELD", "item_id")
        self.time_field = self.cfg.get("TIME_FIELD", "timestamp")
        self.images = find_images(os.path.join(self.folder, self.cfg.get("image_dir") or "images"))

    def path(self, suffix: str) -> str:
        return os.path.join(self.folder, f"{self.name}.{suffix}")

    def text_fields(self) -> list[str]:
        """``text_fields`` of the yaml, else the ``:token_seq`` columns of ``.item``."""
        fields = self.cfg.get("text_fields")
        if fields is not None:
            return [fields] if isinstance(fields, str) else list(fields)
        item = self.path("item")
        return [n for n, t in header(item) if t == "token_seq"] if os.path.isfile(item) else []

    def fingerprint(self, previous: Optional[dict] = None) -> dict:
        """sha256 of the source's files and its image listing. A file whose size, mtime and inode equal those in
        ``previous`` (this source's record in an earlier build's provenance) keeps its recorded sha256: every run
        builds its Config through here, and re-hashing large sources each time would cost seconds."""
        out = {"name": self.name, "path": self.folder}
        for key, path in (("inter", self.inter), ("item", self.path("item")), ("user", self.path("user")),
                          ("yaml", self.yaml_path)):
            if not path or not os.path.isfile(path):
                out[f"{key}_sha256"] = out[f"{key}_stat"] = None
                continue
            st = os.stat(path)
            sig = [st.st_size, st.st_mtime_ns, st.st_ino]
            same = previous and previous.get(f"{key}_stat") == sig and previous.get(f"{key}_sha256")
            out[f"{key}_sha256"] = previous[f"{key}_sha256"] if same else file_sha256(path)
            out[f"{key}_stat"] = sig
        listing = "\n".join(sorted(os.path.basename(p) for p in self.images.values()))
        out["images"] = {"count": len(self.images), "names_sha256": hashlib.sha256(listing.encode()).hexdigest()}
        return out


def _previous_sources(out_root: str, name: str, prov_file: str) -> dict:
    """Source records (by folder) of an earlier build's provenance, if any: :meth:`_Source.fingerprint`'s hint."""
    old = read_json(os.path.join(out_root, name, prov_file))
    sources = old.get("sources") or ([old["source"]] if old.get("source") else []) if isinstance(old, dict) else []
    return {s.get("path"): s for s in sources if isinstance(s, dict)}


def _comparable(value):
    """Provenance inputs without the file-stat hints (a touched but unchanged file is the same input)."""
    if isinstance(value, dict):
        return {k: _comparable(v) for k, v in value.items() if not k.endswith("_stat")}
    if isinstance(value, list):
        return [_comparable(v) for v in value]
    return value


# ------------------------------------------------------------------------------------------------ atomic files
def header(path: str) -> list[tuple[str, str]]:
    """``[(name, type)]`` of an atomic file's header (a leading BOM removed)."""
    with open(path, encoding="utf-8") as f:
        cells = f.readline().rstrip("\r\n").lstrip("\ufeff").split("\t")
    return [tuple(c.split(":", 1)) if ":" in c else (c, "token") for c in cells]


def rows(path: str, width: int) -> Iterable[tuple[str, list[str]]]:
    """``(line, cells)`` of each data row (``\\n`` removed, cells padded to ``width``); blank lines skipped."""
    with open(path, encoding="utf-8", newline="\n") as f:
        f.readline()
        for n, line in enumerate(f, start=2):
            line = line.rstrip("\r\n")
            if not line:
                continue
            cells = line.split("\t")
            if len(cells) > width:
                raise ValueError(f"{path} line {n} has {len(cells)} fields, its header {width}")
            yield line, cells + [""] * (width - len(cells))


def norm_token(token: str) -> str:
    """A token as RecBole reads it (``"q"`` is ``q``), as :func:`recbole_mm.data.content.read_atomic` does."""
    if len(token) >= 2 and token[0] == token[-1] == '"':
        return token[1:-1].replace('""', '"')
    return token


def link_image(src: str, dst: str) -> None:
    """An absolute symlink ``dst -> src`` (resolved), or a copy where symlinks fail."""
    try:
        os.symlink(os.path.realpath(src), dst)
    except OSError:
        shutil.copy2(src, dst)


def _line(text: str, comment: str) -> str:
    return f"{text:<{COMMENT_COLUMN - 1}} # {comment}\n"


def _yaml(title: str, user: str, item: str, time: Optional[str], text_fields: list[str], text_note: str) -> str:
    """The dataset yaml (every key commented ``# (type) meaning``, as the converters write it)."""
    return "".join([
        f"# {title}\n",
        _line(f"USER_ID_FIELD: {user}", "(str) user id column of the .inter file"),
        _line(f"ITEM_ID_FIELD: {item}", "(str) item id column"),
        _line(f"TIME_FIELD: {time}", "(str) time column, in each source's unit (no user spans two)") if time else "",
        _line("load_col:", "(dict) columns RecBole loads; .item texts are read by recbole_mm, not RecBole"),
        f"  inter: [{', '.join([user, item] + ([time] if time else []))}]\n",
        _line(f"text_fields: [{', '.join(text_fields)}]", f"(list) .item text columns {text_note}, joined by a space"),
        _line("image_dir: images", "(str) folder of <item_token>.<ext> images (symlinks to the sources' files)")])


def _write(path: str, cols: list[tuple[str, str]], lines: Iterable[str]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write("\t".join(f"{n}:{t}" for n, t in cols) + "\n")
        for line in lines:
            f.write(line + "\n")


def _build_once(out_root: str, name: str, prov_file: str, inputs: dict, build: Callable[[str], dict]) -> str:
    """Build ``out_root/name`` with ``build(tmp_folder) -> provenance`` (:class:`recbole_mm.atomic.FolderBuild`:
    locked, atomic) unless its ``prov_file`` records ``inputs`` already; the provenance (with ``inputs``) is
    written last."""
    if not name or name.startswith(".") or os.sep in name or "\t" in name:
        raise ValueError(f"invalid dataset name {name!r}")
    with FolderBuild(out_root, name, f"build of dataset {name}", log=logger) as folder:
        if os.path.exists(folder.target):
            old = read_json(os.path.join(folder.target, prov_file))
            if not isinstance(old, dict):
                raise FileExistsError(f"{folder.target} exists and was not built by recbole_mm.data.merge (no "
                                      f"{prov_file}); remove it or choose another name")
            if all(_comparable(old.get(k)) == _comparable(v) for k, v in inputs.items()):
                logger.info(f"reusing dataset {name} (inputs unchanged)")
                return folder.target
            logger.info(f"rebuilding dataset {name}: its inputs changed")
        tmp = folder.tmp()
        atomic_write_json(os.path.join(tmp, prov_file), dict(inputs, **build(tmp)), indent=1, ensure_ascii=False)
    return folder.target


# ------------------------------------------------------------------------------------------------------- merge
def _union(parts: list[tuple[_Source, list[tuple[str, str]]]], what: str, first: list[tuple[str, str]]) -> list:
    """Union of headers in first-seen order after the id columns ``first`` (``:token`` in every source); a name with
    two types is an error naming both sources."""
    cols, origin, types = list(first), {n: "(id field)" for n, _ in first}, dict(first)
    for src, cols_of in parts:
        if any(dict(cols_of).get(n) != t for n, t in first):
            raise ValueError(f"{what} of source {src.name} must have the id column(s) {[f'{n}:{t}' for n, t in first]} "
                             f"(prefixed ids are tokens); its header: {[f'{n}:{t}' for n, t in cols_of]}")
        for n, t in cols_of:
            if n not in types:
                types[n], origin[n] = t, src.name
                cols.append((n, t))
            elif types[n] != t:
                raise ValueError(f"{what} column {n!r} is {n}:{types[n]} in source {origin[n]} but {n}:{t} in "
                                 f"source {src.name}; the merged file needs one type per column")
    return cols


def merge_datasets(sources: list[tuple[str, str]], out_root: str, name: Optional[str] = None,
                   progress: bool = False) -> str:
    """Merge ``[(data_path, dataset_name), ...]`` into ``out_root/<name>/`` (module doc); returns that folder."""
    if not sources:
        raise ValueError("merge_datasets needs at least one source")
    srcs = [_Source(source_dir(path, n), n) for path, n in sources]
    names = [s.name for s in srcs]
    if len(set(names)) != len(names):
        raise ValueError(f"source names must differ (they prefix the tokens): {names}")
    name = name or "+".join(names)
    for key in ("user_field", "item_field"):
        if len({getattr(s, key) for s in srcs}) > 1:
            raise ValueError(f"sources disagree on {key}: " + ", ".join(f"{s.name}: {getattr(s, key)}" for s in srcs))
    previous = _previous_sources(out_root, name, "merge.json")
    inputs = {"format": FORMAT, "kind": "merge", "name": name,
              "sources": [s.fingerprint(previous.get(s.folder)) for s in srcs]}
    return _build_once(out_root, name, "merge.json", inputs, lambda tmp: _merge_into(tmp, name, srcs, progress))


def _merge_into(tmp: str, name: str, srcs: list[_Source], progress: bool) -> dict:
    from tqdm.auto import tqdm

    uf, itf = srcs[0].user_field, srcs[0].item_field
    heads = {kind: [(s, header(s.path(kind))) for s in srcs if os.path.isfile(s.path(kind))]
             for kind in ("inter", "item", "user")}
    cols = {"inter": _union(heads["inter"], ".inter", [(uf, "token"), (itf, "token")]),
            "item": _union(heads["item"], ".item", [(itf, "token")]),
            "user": _union(heads["user"], ".user", [(uf, "token")])}
    seen: dict = {}  # (kind, prefixed token) -> (source, raw token)

    def prefixed(kind: str, s: _Source, raw: str) -> str:
        tok = s.name + PREFIX_SEP + norm_token(raw)
        other = seen.setdefault((kind, tok), (s.name, raw))
        if other[0] != s.name:
            raise ValueError(f"{kind} token {tok!r} comes from source {other[0]} (token {other[1]!r}) and from source "
                             f"{s.name} (token {raw!r}); rename a source")
        return tok

    def table(kind: str, s: _Source) -> Iterable[list[str]]:
        """Rows of a source's file reordered to the merged columns (id columns first), ids prefixed."""
        own = header(s.path(kind))
        where = [next((j for j, (n, _) in enumerate(own) if n == c), None) for c, _ in cols[kind]]
        id_kinds = {"inter": ("user", "item"), "item": ("item",), "user": ("user",)}[kind]
        for _, cells in rows(s.path(kind), len(own)):
            out = [cells[j] if j is not None else "" for j in where]
            for k, id_kind in enumerate(id_kinds):
                out[k] = prefixed(id_kind, s, out[k])
            yield out

    counts: dict = {}
    os.makedirs(os.path.join(tmp, "images"))
    files = {kind: open(os.path.join(tmp, f"{name}.{kind}"), "w", encoding="utf-8", newline="\n")
             for kind in ("inter", "item", "user") if heads[kind] or kind != "user"}
    try:
        for kind, f in files.items():
            f.write("\t".join(f"{n}:{t}" for n, t in cols[kind]) + "\n")
        for s in tqdm(srcs, desc="merging", disable=not progress):
            c = counts[s.name] = {"interactions": 0}
            items: dict = {}
            users: set = set()
            for out in table("inter", s):
                items[out[1]] = None
                users.add(out[0])
                c["interactions"] += 1
                files["inter"].write("\t".join(out) + "\n")
            listed: set = set()
            if os.path.isfile(s.path("item")):
                for out in table("item", s):
                    listed.add(out[0])
                    files["item"].write("\t".join(out) + "\n")
            missing = [t for t in items if t not in listed]
            empty = "\t" * (len(cols["item"]) - 1)
            files["item"].writelines(t + empty + "\n" for t in missing)
            if "user" in files and os.path.isfile(s.path("user")):
                files["user"].writelines("\t".join(out) + "\n" for out in table("user", s))
            for tok, path in s.images.items():
                link_image(path, os.path.join(tmp, "images", s.name + PREFIX_SEP + tok + os.path.splitext(path)[1]))
            c.update(users=len(users), items=len(items), item_rows=len(listed) + len(missing),
                     items_without_row=len(missing), images=len(s.images))
    finally:
        for f in files.values():
            f.close()

    timed = all(s.time_field in dict(h) for s, h in heads["inter"]) and len({s.time_field for s in srcs}) == 1
    tf = srcs[0].time_field if timed else None
    per_source = [s.text_fields() for s in srcs]
    text_fields = [f for f in per_source[0] if all(f in p for p in per_source[1:]) and f in dict(cols["item"])]
    title = (f"{name}: merged by recbole_mm.data.merge from {', '.join(s.name for s in srcs)}; user and item tokens "
             f"are <source>{PREFIX_SEP}<token>.")
    with open(os.path.join(tmp, f"{name}.yaml"), "w", encoding="utf-8", newline="\n") as f:
        f.write(_yaml(title, uf, itf, tf, text_fields, "common to all sources"))
    total = {k: sum(c[k] for c in counts.values()) for k in next(iter(counts.values()))}
    return {"prefix_rule": f"user and item tokens become <source name>{PREFIX_SEP}<token>",
            "columns": {kind: [n for n, _ in cols[kind]] for kind in files},
            "text_fields": text_fields, "counts": {"total": total, "sources": counts}}


# ------------------------------------------------------------------------------------------------------ subset
def subset_items(src_dir: str, src_name: str, out_root: str, name: str, keep_item_tokens: Iterable[str],
                 min_user_inter: int = 5, notes: Optional[dict] = None) -> str:
    """``out_root/<name>/``: the source restricted to ``keep_item_tokens`` (module doc); returns that folder.

    User tokens are unchanged; ``notes`` (JSON-able) are recorded in ``split.json``.
    """
    s = _Source(src_dir, src_name)
    keep = sorted({str(t) for t in keep_item_tokens})
    inputs = {"format": FORMAT, "kind": "subset", "name": name,
              "source": s.fingerprint(_previous_sources(out_root, name, "split.json").get(s.folder)),
              "items_sha256": hashlib.sha256("\n".join(keep).encode("utf-8")).hexdigest(),
              "min_user_inter": int(min_user_inter), "notes": notes or {}}
    return _build_once(out_root, name, "split.json", inputs,
                       lambda tmp: _subset_into(tmp, name, s, set(keep), int(min_user_inter)))


def _subset_into(tmp: str, name: str, s: _Source, keep: set, min_user_inter: int) -> dict:
    cols = header(s.inter)
    names = [n for n, _ in cols]
    if s.user_field not in names or s.item_field not in names:
        raise ValueError(f"{s.inter} needs columns {s.user_field} and {s.item_field}; its columns: {names}")
    ui, ii = names.index(s.user_field), names.index(s.item_field)
    kept = [(norm_token(cells[ui]), norm_token(cells[ii]), line) for line, cells in rows(s.inter, len(cols))
            if norm_token(cells[ii]) in keep]
    per_user: dict = {}
    for u, _, _ in kept:
        per_user[u] = per_user.get(u, 0) + 1
    users = {u for u, n in per_user.items() if n >= min_user_inter}
    lines = [line for u, _, line in kept if u in users]
    items = dict.fromkeys(i for u, i, _ in kept if u in users)  # in order of first appearance
    _write(os.path.join(tmp, f"{name}.inter"), cols, lines)
    counts = {"interactions": len(lines), "users": len(users), "items": len(items),
              "users_dropped": len(per_user) - len(users), "items_requested": len(keep)}
    for suffix, wanted, field in (("item", items, s.item_field), ("user", users, s.user_field)):
        if os.path.isfile(s.path(suffix)):
            h = header(s.path(suffix))
            k = [n for n, _ in h].index(field)
            own = [line for line, cells in rows(s.path(suffix), len(h)) if norm_token(cells[k]) in wanted]
            _write(os.path.join(tmp, f"{name}.{suffix}"), h, own)
            counts[f"{suffix}_rows"] = len(own)
    os.makedirs(os.path.join(tmp, "images"))
    linked = [(t, p) for t, p in s.images.items() if t in items]
    for tok, path in linked:
        link_image(path, os.path.join(tmp, "images", tok + os.path.splitext(path)[1]))
    counts["images"] = len(linked)
    title = f"{name}: {s.name} restricted to {len(items)} items by recbole_mm.data.merge.subset_items."
    if s.yaml_path:  # the source's yaml as it is (same keys, same comments)
        with open(s.yaml_path, encoding="utf-8") as f:
            text = f"# {title}\n" + f.read()
    else:
        tf = s.time_field if s.time_field in names else None
        text = _yaml(title, s.user_field, s.item_field, tf, s.text_fields(), "of the source")
    with open(os.path.join(tmp, f"{name}.yaml"), "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
    return {"counts": counts}
