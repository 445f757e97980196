"""Embedded datasets, built on first use from data that ships with installed packages.

``ml-100k-mm``: MovieLens-100K with item text and images, built (deterministically, in seconds) from the copy of
ml-100k inside the installed ``recbole`` package; we do not redistribute it.

- ``ml-100k-mm.inter``: the real 100,000 interactions with ratings and timestamps;
- ``ml-100k-mm.item``: ``title`` (real title plus release year, e.g. ``Toy Story (1995)``) and ``genres``;
- ``ml-100k-mm.user``: ``age``, ``gender``, ``occupation`` (sensitive attributes for fairness models);
- ``images/<item>.jpg``: a **rendered** poster, not a real one: colour bands and a stripe pattern chosen by the
  movie's genres, with its title written on it. The image path therefore carries genre signal (and a little
  title signal) but nothing a real poster would add.

Where: ``<data_path>/ml-100k-mm`` when that folder exists, else the cache folder
``<cache>/datasets/ml-100k-mm``, built there once; ``<cache>`` is ``$RECBOLE_MM_HOME``, else
``$XDG_CACHE_HOME/recbole_mm``, else ``~/.cache/recbole_mm`` (:func:`recbole_mm.paths.cache_root`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile

logger = logging.getLogger(__name__)

EMBEDDED_DATASETS = ("ml-100k-mm",)
POSTER_SIZE = 224

# One colour per MovieLens genre (RGB), fixed so that posters are deterministic.
GENRE_COLOURS = {
    "Action": (200, 30, 30),
    "Adventure": (230, 120, 20),
    "Animation": (250, 210, 40),
    "Children's": (120, 220, 90),
    "Comedy": (250, 150, 180),
    "Crime": (60, 60, 60),
    "Documentary": (150, 150, 120),
    "Drama": (90, 40, 140),
    "Fantasy": (170, 100, 230),
    "Film-Noir": (20, 20, 30),
    "Horror": (100, 0, 0),
    "Musical": (240, 90, 200),
    "Mystery": (40, 50, 110),
    "Romance": (230, 60, 110),
    "Sci-Fi": (40, 200, 220),
    "Thriller": (120, 120, 130),
    "War": (90, 100, 50),
    "Western": (180, 130, 70),
    "unknown": (200, 200, 200),
}
_STRIPES = ("horizontal", "vertical", "diagonal", "dots", "none")
# The header line of each atomic file the builder writes (they also tell a copy of the files under another name).
EMBEDDED_HEADERS = {
    "ml-100k-mm": {
        "inter": "user_id:token\titem_id:token\trating:float\ttimestamp:float",
        "item": "item_id:token\ttitle:token_seq\tgenres:token_seq\trelease_year:token",
        "user": "user_id:token\tage:token\tgender:token\toccupation:token",
    },
}


def cache_root() -> str:
    from recbole_mm.paths import cache_root as root

    return root()


def embedded_dataset_dir(name: str) -> str:
    return os.path.join(cache_root(), "datasets", name)


def _recbole_ml100k_dir() -> str:
    import recbole

    return os.path.join(os.path.dirname(recbole.__file__), "dataset_example", "ml-100k")


def _first_line(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.readline().rstrip("\r\n")
    except (OSError, UnicodeDecodeError):
        return None


def embedded_origin(folder: str, dataset: str | None = None) -> str | None:
    """The embedded dataset a folder was built as, else ``None``: its ``provenance.json`` names it (a copy of the
    whole folder keeps the file), or, for a copy of the atomic files alone, ``<dataset>.inter`` and
    ``<dataset>.item`` have the header lines the builder writes."""
    try:
        with open(os.path.join(folder, "provenance.json"), encoding="utf-8") as f:
            name = json.load(f).get("dataset")
        if name in EMBEDDED_DATASETS:
            return name
    except (OSError, ValueError, AttributeError):
        pass
    dataset = dataset or os.path.basename(os.path.normpath(folder))
    for name, headers in EMBEDDED_HEADERS.items():
        if all(_first_line(os.path.join(folder, f"{dataset}.{suffix}")) == headers[suffix] for suffix in ("inter", "item")):
            return name
    return None


def embedded_config_file(name: str) -> str:
    """The package's yaml of an embedded dataset (``properties/dataset/<name>.yaml``): the keys that describe its
    files (id, rating and time fields, ``load_col``, ``text_fields``, ``image_dir``, ...)."""
    from recbole_mm.paths import properties_dir

    return os.path.join(properties_dir(), "dataset", f"{name}.yaml")


def copy_without_config_message(folder: str, dataset: str, config=None) -> str | None:
    """What is wrong when ``folder`` (the folder of dataset ``dataset``) is a copy of an embedded dataset under
    another name without a ``<dataset>.yaml``: the package's yaml of the embedded dataset applies to its own name
    only, so RecBole reads the copy with its defaults (only ``user_id`` and ``item_id`` loaded: "[timestamp] is not
    exist in interaction", no item text ...). ``None`` when that is not the case, or when ``config`` (the run's)
    already has every value of that yaml (given in a config file or dict)."""
    origin = embedded_origin(folder, dataset)
    if origin is None or dataset == origin or os.path.isfile(os.path.join(folder, f"{dataset}.yaml")):
        return None
    source = embedded_config_file(origin)
    if not os.path.isfile(source) or os.path.isfile(embedded_config_file(dataset)):
        return None
    import yaml

    with open(source, encoding="utf-8") as f:
        values = yaml.safe_load(f) or {}
    missing = [k for k, v in values.items() if config is None or config[k] != v]  # the file's order
    if not missing:
        return None
    target = os.path.join(folder, f"{dataset}.yaml")
    return (f"dataset folder {folder} is a copy of the embedded dataset {origin!r} named {dataset!r}, and it has no "
            f"{dataset}.yaml: the keys that describe its files ({', '.join(missing)}) are in {source}, which applies "
            f"to the name {origin!r} only, so RecBole read the copy with its defaults (load_col: only user_id and "
            f"item_id). Copy that file next to the data: cp {source} {target} (or give those keys in a config file, "
            f"-c), or keep the folder and file names {origin!r}")


def build_embedded(name: str, target_dir: str) -> str:
    if name != "ml-100k-mm":
        raise ValueError(f"unknown embedded dataset {name!r}; known: {EMBEDDED_DATASETS}")
    return build_ml100k_mm(target_dir)


def render_poster(title: str, genres: list[str], size: int = POSTER_SIZE):
    """A deterministic poster: one colour band per genre, a genre-chosen pattern, the title in a box."""
    from PIL import Image, ImageDraw, ImageFont

    genres = genres or ["unknown"]
    img = Image.new("RGB", (size, size), (245, 245, 240))
    draw = ImageDraw.Draw(img)
    band = size / len(genres)
    for i, g in enumerate(genres):
        draw.rectangle([0, int(i * band), size, int((i + 1) * band)], fill=GENRE_COLOURS.get(g, (128, 128, 128)))
    pattern = _STRIPES[sorted(GENRE_COLOURS).index(genres[0]) % len(_STRIPES)] if genres[0] in GENRE_COLOURS else "none"
    ink = (255, 255, 255)
    step = 16
    if pattern == "horizontal":
        for y in range(0, size, step):
            draw.line([0, y, size, y], fill=ink, width=2)
    elif pattern == "vertical":
        for x in range(0, size, step):
            draw.line([x, 0, x, size], fill=ink, width=2)
    elif pattern == "diagonal":
        for k in range(-size, size, step):
            draw.line([k, 0, k + size, size], fill=ink, width=2)
    elif pattern == "dots":
        for y in range(step // 2, size, step):
            for x in range(step // 2, size, step):
                draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=ink)
    font = ImageFont.load_default()
    words, lines, line = title.split(), [], ""
    for w in words:
        cand = (line + " " + w).strip()
        if len(cand) > 22 and line:
            lines.append(line)
            line = w
        else:
            line = cand
    lines.append(line)
    lines = lines[:5]
    box_h = 14 * len(lines) + 10
    top = size - box_h - 8
    draw.rectangle([8, top, size - 8, size - 8], fill=(0, 0, 0))
    for i, text in enumerate(lines):
        draw.text((14, top + 5 + 14 * i), text, fill=(255, 255, 255), font=font)
    return img


def build_ml100k_mm(target_dir: str) -> str:
    """Write ml-100k-mm into ``target_dir`` (atomically: a temporary folder renamed at the end).

    One builder at a time (:class:`recbole_mm.atomic.BuildLock`, file ``.ml-100k-mm.lock`` beside the folder):
    a concurrent caller waits and then finds the folder built. Temporary folders of a killed build
    (``.ml-100k-mm.tmp-*``) are removed with a warning.
    """
    from recbole_mm.atomic import BuildLock, leftover_temps, lock_path_for, remove_leftovers

    name = "ml-100k-mm"
    parent = os.path.dirname(os.path.abspath(target_dir))
    os.makedirs(parent, exist_ok=True)
    with BuildLock(lock_path_for(target_dir), what=f"embedded dataset {target_dir}", log=logger):
        remove_leftovers(leftover_temps(target_dir), f"build of {name}", logger)
        if os.path.isfile(os.path.join(target_dir, f"{name}.inter")):
            return target_dir  # built meanwhile by another process
        return _build_ml100k_mm_locked(target_dir, parent, name)


def _build_ml100k_mm_locked(target_dir: str, parent: str, name: str) -> str:
    from tqdm.auto import tqdm

    from recbole_mm.data.content import read_atomic

    src = _recbole_ml100k_dir()
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    try:
        inter = read_atomic(os.path.join(src, "ml-100k.inter"))
        with open(os.path.join(tmp, f"{name}.inter"), "w", encoding="utf-8", newline="\n") as f:
            f.write(EMBEDDED_HEADERS[name]["inter"] + "\n")
            inter[["user_id", "item_id", "rating", "timestamp"]].to_csv(f, sep="\t", header=False, index=False)

        items = read_atomic(os.path.join(src, "ml-100k.item"))
        items["title"] = [
            f"{t} ({y})" if y else t for t, y in zip(items["movie_title"].str.strip(), items["release_year"].str.strip())
        ]
        items["genres"] = items["class"].str.strip()
        with open(os.path.join(tmp, f"{name}.item"), "w", encoding="utf-8", newline="\n") as f:
            f.write(EMBEDDED_HEADERS[name]["item"] + "\n")
            items[["item_id", "title", "genres", "release_year"]].to_csv(f, sep="\t", header=False, index=False)

        users = read_atomic(os.path.join(src, "ml-100k.user"))
        with open(os.path.join(tmp, f"{name}.user"), "w", encoding="utf-8", newline="\n") as f:
            f.write(EMBEDDED_HEADERS[name]["user"] + "\n")
            users[["user_id", "age", "gender", "occupation"]].to_csv(f, sep="\t", header=False, index=False)

        img_dir = os.path.join(tmp, "images")
        os.makedirs(img_dir)
        for item_id, title, genres in tqdm(
            zip(items["item_id"], items["title"], items["genres"]), total=len(items), desc="rendering posters", unit="img"
        ):
            poster = render_poster(title, genres.split())
            poster.save(os.path.join(img_dir, f"{item_id}.jpg"), format="JPEG", quality=90)

        provenance = {
            "dataset": name,
            "source": "recbole/dataset_example/ml-100k (shipped inside the installed recbole package)",
            "inputs": {
                f: {
                    "size": os.path.getsize(os.path.join(src, f)),
                    "sha256": hashlib.sha256(open(os.path.join(src, f), "rb").read()).hexdigest(),
                }
                for f in ("ml-100k.inter", "ml-100k.item", "ml-100k.user")
            },
            "rows": {"inter": len(inter), "item": len(items), "user": len(users)},
            "images": "rendered posters (genre colour bands + pattern + title), not real posters",
            "text_fields": ["title", "genres"],
        }
        with open(os.path.join(tmp, "provenance.json"), "w", encoding="utf-8") as f:
            json.dump(provenance, f, indent=1)
        with open(os.path.join(tmp, "README.txt"), "w", encoding="utf-8") as f:
            f.write(
                "ml-100k-mm: MovieLens-100K (from the recbole package) with item text and RENDERED posters.\n"
                "The images are drawn from each movie's genres and title; they are not real posters.\n"
            )
        if os.path.isdir(target_dir):
            # An empty or partial folder (e.g. a user-created data_path/ml-100k-mm): fill it, the .inter file
            # last (its presence means "built").
            inter = f"{name}.inter"
            for entry in sorted(os.listdir(tmp), key=lambda e: e == inter):
                dest = os.path.join(target_dir, entry)
                if os.path.isdir(dest) and not os.path.islink(dest):
                    shutil.rmtree(dest)  # a partial copy of ours (the folder has no .inter yet)
                os.replace(os.path.join(tmp, entry), dest)
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target_dir)
        logger.info(f"built {name} in {target_dir}")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target_dir
