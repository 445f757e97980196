"""Item images: ``images/<item_token>.<ext>`` copied (``--images copy``), symlinked (``link``) or skipped.

Each source image is checked before it is written: PIL must open and ``verify()`` it, and a JPEG must end with
its end-of-image marker (a truncated download fails when decoded later). Corrupt images are not written; they
and missing images are counted and summarised in one warning line each. The platform turns an absent image
into a placeholder when it loads the dataset. The source extension is kept (``.jpg`` usually); when several
files share an item's name, the first extension of ``EXTENSIONS`` wins.
"""

from __future__ import annotations

import io
import os
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence

from PIL import Image

from dataset_converters.provenance import MAX_EXAMPLES, Provenance

EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
MODES = ("copy", "link", "skip")


def index_images(cover_dir: str) -> dict[str, str]:
    """``{stem: file name}`` of the image files in ``cover_dir`` (deterministic choice between extensions)."""
    found: dict[str, tuple[int, str]] = {}
    for entry in sorted(os.listdir(cover_dir)):
        stem, ext = os.path.splitext(entry)
        rank = EXTENSIONS.index(ext.lower()) if ext.lower() in EXTENSIONS else -1
        if rank < 0:
            continue
        if stem not in found or rank < found[stem][0]:
            found[stem] = (rank, entry)
    return {stem: name for stem, (_, name) in found.items()}


# Parts of an exception message that change from run to run: object reprs with a memory address
# (PIL: "cannot identify image file <_io.BytesIO object at 0x7f...>"), bare addresses, absolute paths.
_OBJECT_REPR = re.compile(r"<[^<>]*? at 0x[0-9A-Fa-f]+>")
_ADDRESS = re.compile(r"\b0x[0-9A-Fa-f]{6,}\b")


def normalise_reason(text: str, name: str = "", folder: str = "") -> str:
    """An error message made reproducible: an object repr becomes ``name`` (or ``<data>``), an address ``0x?``,
    the absolute ``folder`` prefix is dropped. Keeps ``provenance.json`` byte-identical across runs."""
    text = _OBJECT_REPR.sub(repr(name) if name else "<data>", text)
    text = _ADDRESS.sub("0x?", text)
    if folder:
        text = text.replace(os.path.join(os.path.abspath(folder), ""), "").replace(os.path.abspath(folder), ".")
    return text


def check_image(data: bytes, name: str = "") -> Optional[str]:
    """``None`` when the bytes are a readable image, else the reason (reproducible: :func:`normalise_reason`)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format
            img.verify()
    except Exception as e:  # PIL raises many types for bad files
        return normalise_reason(f"{type(e).__name__}: {e}", name)[:120]
    if fmt == "JPEG" and b"\xff\xd9" not in data[-1024:]:
        return "truncated JPEG (no end-of-image marker)"
    return None


def export_images(
    tokens: Sequence[str],
    cover_dir: Optional[str],
    out_dir: str,
    mode: str,
    prov: Provenance,
    workers: int = 4,
) -> None:
    """Write the images of ``tokens`` into ``out_dir/images`` and count missing / corrupt ones."""
    if mode not in MODES:
        raise ValueError(f"--images must be one of {MODES}, got {mode!r}")
    if mode == "skip":
        prov.count("images", "mode", "skip")
        return
    if cover_dir is None:
        prov.issue("items without image", len(tokens), [f"item {t!r}" for t in tokens[:MAX_EXAMPLES]],
                   action="no cover folder found in the input")
        prov.count("images", "written", 0)
        return
    index = index_images(cover_dir)
    prov.add_input_dir(cover_dir, "covers", len(index))
    image_dir = os.path.join(out_dir, "images")
    os.makedirs(image_dir, exist_ok=True)

    def one(token: str) -> tuple[str, Optional[str]]:
        name = index.get(token)
        if name is None:
            return "missing", None
        src = os.path.join(cover_dir, name)
        try:
            with open(src, "rb") as f:
                data = f.read()
        except OSError as e:
            return "corrupt", f"{name}: " + normalise_reason(f"{type(e).__name__}: {e.strerror or e}", name, cover_dir)
        reason = check_image(data, name)
        if reason is not None:
            return "corrupt", f"{name}: {reason}"
        dst = os.path.join(image_dir, token + os.path.splitext(name)[1])
        if mode == "link":
            os.symlink(os.path.abspath(src), dst)
        else:
            with open(dst, "wb") as f:
                f.write(data)
        return "written", None

    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(one, tokens))
    missing = [t for t, (status, _) in zip(tokens, results) if status == "missing"]
    corrupt = [why for status, why in results if status == "corrupt"]
    written = sum(1 for status, _ in results if status == "written")
    prov.count("images", "mode", mode)
    prov.count("images", "written", written)
    prov.count("images", "missing", len(missing))
    prov.count("images", "corrupt", len(corrupt))
    prov.issue("items without image (missing cover file)", len(missing), [f"item {t!r}" for t in missing[:MAX_EXAMPLES]],
               action="no image written; the platform uses a placeholder")
    prov.issue("corrupt images (PIL cannot read them)", len(corrupt), corrupt[:MAX_EXAMPLES],
               action="not written; the platform uses a placeholder")
