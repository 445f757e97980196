"""ml-100k-mm: built from the recbole package, deterministic, fast, with real interactions."""

import hashlib
import os
import time

from recbole_mm.data.embedded import build_ml100k_mm


def _digest(folder):
    """Hash of the built files (features / image stores that runs add later are not part of the build)."""
    h = hashlib.sha256()
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if d not in ("features", "image_store", "dataset_cache"))  # not walked
        for name in sorted(files):
            path = os.path.join(root, name)
            h.update(os.path.relpath(path, folder).encode())
            h.update(open(path, "rb").read())
    return h.hexdigest()


def test_build_is_deterministic_and_fast(tmp_path, ml100k_mm):
    start = time.time()
    folder = build_ml100k_mm(str(tmp_path / "ml-100k-mm"))
    assert time.time() - start < 60
    assert _digest(folder) == _digest(ml100k_mm)
    names = set(os.listdir(folder))
    assert {"ml-100k-mm.inter", "ml-100k-mm.item", "ml-100k-mm.user", "images", "provenance.json"} <= names
    assert len(os.listdir(os.path.join(folder, "images"))) == 1682
    with open(os.path.join(folder, "ml-100k-mm.inter"), encoding="utf-8") as f:
        assert sum(1 for _ in f) == 100001
    with open(os.path.join(folder, "ml-100k-mm.item"), encoding="utf-8") as f:
        header, first = f.readline(), f.readline()
    assert header.startswith("item_id:token\ttitle:token_seq\tgenres:token_seq")
    assert first.split("\t")[:3] == ["1", "Toy Story (1995)", "Animation Children's Comedy"]
    with open(os.path.join(folder, "ml-100k-mm.user"), encoding="utf-8") as f:
        assert f.readline().strip() == "user_id:token\tage:token\tgender:token\toccupation:token"


def test_posters_carry_genre_colour(ml100k_mm):
    import numpy as np
    from PIL import Image

    from recbole_mm.data.embedded import GENRE_COLOURS

    # item 1 (Toy Story): Animation / Children's / Comedy bands, top to bottom
    img = np.asarray(Image.open(os.path.join(ml100k_mm, "images", "1.jpg")).convert("RGB")).astype(int)
    top = np.median(img[5:60, 5:200].reshape(-1, 3), axis=0)
    assert np.abs(top - GENRE_COLOURS["Animation"]).max() < 20


def test_killed_build_leftovers_are_removed_and_a_built_folder_is_reused(tmp_path, caplog):
    leftover = tmp_path / ".ml-100k-mm.tmp-k1ll3d"  # what a build killed with SIGKILL leaves
    leftover.mkdir()
    (leftover / "ml-100k-mm.inter").write_text("user_id:token\n")
    with caplog.at_level("WARNING"):
        folder = build_ml100k_mm(str(tmp_path / "ml-100k-mm"))
    assert "removed what an interrupted build of ml-100k-mm left" in caplog.text and leftover.name in caplog.text
    assert os.listdir(tmp_path) == ["ml-100k-mm"]  # no temporary folder, no lock file
    inter = os.path.join(folder, "ml-100k-mm.inter")
    before = os.stat(inter).st_mtime_ns
    assert build_ml100k_mm(folder) == folder  # built meanwhile (another process): used as it is
    assert os.stat(inter).st_mtime_ns == before
