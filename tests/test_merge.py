"""Derived dataset folders (recbole_mm/data/merge.py): sources merged with prefixed tokens, items subsets."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
from PIL import Image

from recbole_mm.data.content import read_atomic
from recbole_mm.data.images import find_images
from recbole_mm.data.merge import merge_datasets, subset_items

TEXT_A = {
    "i1": "Amélie – Le fabuleux destin 🎬 \"quoted\"",
    "i2": "  spaced title  ",
    "i3": "日本語のタイトル",
}


def _write(path, header, rows):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write("\t".join(header) + "\n")
        for row in rows:
            f.write("\t".join(row) + "\n")


def _make_a(root):
    """Source a: three users, items i1-i3 (non-ASCII text), i9 interacted but absent from .item; a yaml."""
    d = os.path.join(root, "a")
    os.makedirs(d)
    rows = [("u1", "i1", "1"), ("u1", "i2", "2"), ("u2", "i2", "3"), ("u2", "i3", "4"), ("u3", "i1", "5"),
            ("u3", "i9", "6")]
    _write(os.path.join(d, "a.inter"), ["user_id:token", "item_id:token", "timestamp:float"], rows)
    _write(os.path.join(d, "a.item"), ["item_id:token", "title:token_seq", "genres:token_seq"],
           [(t, text, "Drama Comedy") for t, text in TEXT_A.items()])
    with open(os.path.join(d, "a.yaml"), "w", encoding="utf-8") as f:
        f.write("text_fields: [title, genres]\n")
    return d


def _make_b(root, extra_row=()):
    """Source b: the same raw tokens as a (u1, i1), an extra rating column, no genres, one image."""
    d = os.path.join(root, "b")
    os.makedirs(d, exist_ok=True)
    rows = [("u1", "i1", "4", "10"), ("u1", "i7", "5", "11"), ("u5", "i7", "3", "12")] + list(extra_row)
    _write(os.path.join(d, "b.inter"), ["user_id:token", "item_id:token", "rating:float", "timestamp:float"], rows)
    _write(os.path.join(d, "b.item"), ["item_id:token", "title:token_seq"], [("i1", "B one"), ("i7", "B seven")])
    os.makedirs(os.path.join(d, "images"), exist_ok=True)
    Image.new("RGB", (8, 8), (200, 10, 10)).save(os.path.join(d, "images", "i1.png"))
    return d


@pytest.fixture
def sources(tmp_path):
    root = str(tmp_path / "src")
    _make_a(root)
    _make_b(root)
    return root


def _merged(sources, tmp_path, **kw):
    out = str(tmp_path / "out")
    return out, merge_datasets([(sources, "a"), (sources, "b")], out, **kw)


def test_tokens_prefixed_disjoint_and_counted(sources, tmp_path):
    out, folder = _merged(sources, tmp_path)
    assert folder == os.path.join(out, "a+b")
    inter = read_atomic(os.path.join(folder, "a+b.inter"))
    assert list(inter.columns) == ["user_id", "item_id", "timestamp", "rating"]
    assert len(inter) == 6 + 3
    assert inter["user_id"].tolist()[:2] == ["a__u1", "a__u1"] and inter["user_id"].iloc[6] == "b__u1"
    a_items = set(inter["item_id"][:6])
    b_items = set(inter["item_id"][6:])
    assert a_items == {"a__i1", "a__i2", "a__i3", "a__i9"} and b_items == {"b__i1", "b__i7"}
    assert not set(inter["user_id"][:6]) & set(inter["user_id"][6:])
    assert inter["rating"].tolist() == [""] * 6 + ["4", "5", "3"]  # a has no rating: empty cells
    items = read_atomic(os.path.join(folder, "a+b.item"))
    assert list(items.columns) == ["item_id", "title", "genres"]
    assert items["item_id"].tolist() == ["a__i1", "a__i2", "a__i3", "a__i9", "b__i1", "b__i7"]
    assert items.set_index("item_id").loc["a__i9"].tolist() == ["", ""]  # interacted, no .item row
    prov = json.load(open(os.path.join(folder, "merge.json"), encoding="utf-8"))
    assert prov["counts"]["total"]["interactions"] == 9
    assert prov["counts"]["sources"]["a"] == {"interactions": 6, "users": 3, "items": 4, "item_rows": 4,
                                              "items_without_row": 1, "images": 0}
    assert [s["name"] for s in prov["sources"]] == ["a", "b"] and len(prov["sources"][0]["inter_sha256"]) == 64


def test_text_kept_byte_for_byte(sources, tmp_path):
    _, folder = _merged(sources, tmp_path)
    with open(os.path.join(folder, "a+b.item"), encoding="utf-8") as f:
        lines = f.read().split("\n")
    for tok, text in TEXT_A.items():
        assert f"a__{tok}\t{text}\tDrama Comedy" in lines
    assert "b__i1\tB one\t" in lines


def test_images_linked_and_yaml(sources, tmp_path):
    _, folder = _merged(sources, tmp_path)
    images = find_images(os.path.join(folder, "images"))
    assert list(images) == ["b__i1"]
    assert os.path.islink(images["b__i1"]) and os.path.isabs(os.readlink(images["b__i1"]))
    with Image.open(images["b__i1"]) as im:
        assert im.getpixel((0, 0)) == (200, 10, 10)
    import yaml

    cfg = yaml.safe_load(open(os.path.join(folder, "a+b.yaml"), encoding="utf-8"))
    assert cfg["load_col"] == {"inter": ["user_id", "item_id", "timestamp"]}
    assert cfg["TIME_FIELD"] == "timestamp" and cfg["image_dir"] == "images"
    assert cfg["text_fields"] == ["title"]  # a: [title, genres] (yaml); b: its token_seq columns, [title]
    assert all(" # (" in line for line in open(os.path.join(folder, "a+b.yaml")) if not line.startswith(("#", " ")))


def test_reused_then_rebuilt_when_a_source_changes(sources, tmp_path):
    out, folder = _merged(sources, tmp_path)
    inter = os.path.join(folder, "a+b.inter")
    mtime = os.stat(inter).st_mtime_ns
    os.makedirs(os.path.join(out, ".a+b.tmp-killed"))  # what a killed build leaves: removed by the next one
    assert _merged(sources, tmp_path)[1] == folder
    assert os.stat(inter).st_mtime_ns == mtime
    _make_b(sources, extra_row=[("u6", "i7", "1", "13")])
    _merged(sources, tmp_path)
    assert len(read_atomic(inter)) == 10
    assert not [e for e in os.listdir(out) if e.startswith(".")]  # no temporary folder or lock left


def test_reuse_does_not_rehash_unchanged_sources(sources, tmp_path, monkeypatch):
    """Every run's Config checks the merge: unchanged files (size, mtime, inode) are not hashed again; a touched
    but unchanged file is hashed and the merge still reused."""
    import recbole_mm.data.merge as merge

    out, folder = _merged(sources, tmp_path)
    inter = os.path.join(folder, "a+b.inter")
    mtime = os.stat(inter).st_mtime_ns
    hashed = []
    real = merge.file_sha256
    monkeypatch.setattr(merge, "file_sha256", lambda p: hashed.append(p) or real(p))
    assert _merged(sources, tmp_path)[1] == folder and hashed == []
    a_inter = os.path.join(sources, "a", "a.inter")
    st = os.stat(a_inter)
    os.utime(a_inter, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    _merged(sources, tmp_path)
    assert hashed == [a_inter] and os.stat(inter).st_mtime_ns == mtime  # re-hashed, same bytes: reused


def test_two_processes_merge_once(sources, tmp_path):
    code = textwrap.dedent(f"""
        import logging, sys
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
        from recbole_mm.data.merge import merge_datasets
        print(merge_datasets([({sources!r}, "a"), ({sources!r}, "b")], {str(tmp_path / "out")!r}))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert len({out.strip() for out, _ in outputs}) == 1
    assert sum("reusing dataset a+b" in err for _, err in outputs) == 1  # one built, the other waited
    assert len(read_atomic(os.path.join(outputs[0][0].strip(), "a+b.inter"))) == 9


def test_collision_and_type_mismatch_are_errors(tmp_path):
    root = str(tmp_path / "src")
    for name, item in (("x", "y__z"), ("x__y", "z")):
        os.makedirs(os.path.join(root, name))
        _write(os.path.join(root, name, f"{name}.inter"), ["user_id:token", "item_id:token"], [("u", item)])
    with pytest.raises(ValueError, match=r"x__y__z.*source x .*'y__z'.*source x__y"):
        merge_datasets([(root, "x"), (root, "x__y")], str(tmp_path / "out"))
    os.makedirs(os.path.join(root, "r"))
    _write(os.path.join(root, "r", "r.inter"), ["user_id:token", "item_id:token", "rating:token"], [("u", "i", "5")])
    os.makedirs(os.path.join(root, "s"))
    _write(os.path.join(root, "s", "s.inter"), ["user_id:token", "item_id:token", "rating:float"], [("u", "i", "5")])
    with pytest.raises(ValueError, match=r"'rating' is rating:token in source r but rating:float in source s"):
        merge_datasets([(root, "r"), (root, "s")], str(tmp_path / "out"))
    with pytest.raises(ValueError, match="must differ"):
        merge_datasets([(root, "r"), (root, "r")], str(tmp_path / "out"))


def test_recbole_loads_the_merged_folder(sources, tmp_path):
    import recbole_mm  # noqa: F401  (compat shims)
    from recbole_mm.config import Config
    from recbole_mm.data.utils import create_dataset

    out, folder = _merged(sources, tmp_path)
    config = Config(model="Pop", dataset="a+b", config_dict={
        "data_path": out, "checkpoint_dir": str(tmp_path / "saved"), "state": "WARNING", "show_progress": False})
    dataset = create_dataset(config)
    assert dataset.inter_num == 9 and dataset.user_num == 1 + 5 and dataset.item_num == 1 + 6
    content = dataset.item_content
    texts = dict(zip(content.tokens[1:], content.text()[1:]))
    assert texts["a__i1"] == TEXT_A["i1"] and texts["b__i7"] == "B seven" and texts["a__i9"] == ""


def test_subset_items_keeps_items_and_drops_short_users(tmp_path):
    root = str(tmp_path / "src")
    d = os.path.join(root, "m")
    os.makedirs(os.path.join(d, "images"))
    rows, genres = [], {"1": "Horror", "2": "Horror Drama", "3": "Comedy", "4": "Drama"}
    for u, items in (("10", "1 2 3 4 1 2"), ("11", "3 4 3 4 3 1"), ("12", "1 2 1 2 1 3 4 4 4 3")):
        rows += [(u, i, str(k)) for k, i in enumerate(items.split())]
    _write(os.path.join(d, "m.inter"), ["user_id:token", "item_id:token", "timestamp:float"], rows)
    _write(os.path.join(d, "m.item"), ["item_id:token", "title:token_seq", "genres:token_seq"],
           [(i, f"Título {i}", g) for i, g in genres.items()])
    _write(os.path.join(d, "m.user"), ["user_id:token", "age:token"], [("10", "20"), ("11", "30"), ("12", "40")])
    for i in genres:
        Image.new("RGB", (4, 4)).save(os.path.join(d, "images", f"{i}.jpg"))
    os.makedirs(os.path.join(d, "image_store"))  # a derived cache: never carried over
    horror = [i for i, g in genres.items() if "Horror" in g.split()]
    rest = [i for i in genres if i not in horror]
    out = str(tmp_path / "out")
    tgt = subset_items(d, "m", out, "m-tgt", horror, min_user_inter=5, notes={"genres": ["Horror"]})
    src = subset_items(d, "m", out, "m-src", rest, min_user_inter=5)
    t_inter, s_inter = read_atomic(os.path.join(tgt, "m-tgt.inter")), read_atomic(os.path.join(src, "m-src.inter"))
    assert set(t_inter["item_id"]) == {"1", "2"} and set(t_inter["user_id"]) == {"12"}  # 10: 4 horror, 11: 1
    assert set(s_inter["user_id"]) == {"11", "12"} and set(s_inter["item_id"]) == {"3", "4"}
    assert not set(t_inter["item_id"]) & set(s_inter["item_id"])
    assert read_atomic(os.path.join(tgt, "m-tgt.item"))["title"].tolist() == ["Título 1", "Título 2"]
    assert read_atomic(os.path.join(tgt, "m-tgt.user"))["user_id"].tolist() == ["12"]
    assert sorted(find_images(os.path.join(tgt, "images"))) == ["1", "2"]
    assert not os.path.exists(os.path.join(tgt, "image_store"))
    split = json.load(open(os.path.join(tgt, "split.json"), encoding="utf-8"))
    assert split["counts"]["interactions"] == 5 and split["counts"]["users_dropped"] == 2
    assert split["notes"] == {"genres": ["Horror"]}
    mtime = os.stat(os.path.join(tgt, "m-tgt.inter")).st_mtime_ns
    subset_items(d, "m", out, "m-tgt", horror, min_user_inter=5, notes={"genres": ["Horror"]})
    assert os.stat(os.path.join(tgt, "m-tgt.inter")).st_mtime_ns == mtime  # same inputs: reused
