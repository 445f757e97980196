"""Tests of the dataset converters (``dataset_converters``) on the hand-made raw files of tests/fixtures/converters.

Every quirk of docs/datasets.md has a fixture line and an assertion here: column order, headers, BOM, timestamp
units and positions, Chinese / emoji text kept byte-exact, malformed lines, duplicates, unknown items, corrupt and
missing covers, keep-last / dedup / user-filter semantics, atomic output, byte-identical reruns, and RecBole
loading the result.
"""

from __future__ import annotations

import csv
import filecmp
import json
import os
import shutil

import sys

import numpy as np
import pandas as pd
import pytest

if __package__ in (None, "") or "dataset_converters" not in sys.modules:  # run from a checkout without reinstall
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dataset_converters import ConversionError, output
from dataset_converters.cli import main
from dataset_converters.text import clean_text

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "converters")


def fixture(name: str) -> str:
    return os.path.join(FIXTURES, name)


def convert(*argv: str) -> int:
    return main(list(argv) + ["-q"])


def read_atomic(path: str) -> pd.DataFrame:
    """Read an atomic file the way the platform does: tab-separated, no quoting, strings."""
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
    df = pd.read_csv(path, sep="\t", header=None, skiprows=1, names=header, dtype=str, keep_default_na=False,
                     quoting=csv.QUOTE_NONE, encoding="utf-8")
    return df


def provenance(folder: str) -> dict:
    with open(os.path.join(folder, "provenance.json"), encoding="utf-8") as f:
        return json.load(f)


def dropped(prov: dict, reason_start: str, section: str = "interactions") -> int:
    return sum(e["count"] for r, e in prov["dropped"].get(section, {}).items() if r.startswith(reason_start))


def by_user(df: pd.DataFrame) -> dict[str, list[str]]:
    return {u: list(g["item_id:token"]) for u, g in df.groupby("user_id:token", sort=False)}


@pytest.fixture(scope="module")
def ml50k(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("ml50k")
    assert convert("microlens", "--input", fixture("microlens50k"), "--output", str(out)) == 0
    return str(out / "MicroLens-50k")


# ------------------------------------------------------------------------------------------------ text rule
def test_clean_text_only_replaces_tabs_and_line_breaks():
    assert clean_text("a\tb\r\nc\n\nd\u2028e") == "a b c d e"
    assert clean_text("  emoji 😀 \"q\" 中文 ") == "  emoji 😀 \"q\" 中文 "
    assert clean_text(None) == ""


# ------------------------------------------------------------------------------------------------ MicroLens
def test_microlens_csv_rows_order_and_header(ml50k):
    with open(os.path.join(ml50k, "MicroLens-50k.inter"), encoding="utf-8") as f:
        assert f.readline() == "user_id:token\titem_id:token\ttimestamp:float\n"
    df = read_atomic(os.path.join(ml50k, "MicroLens-50k.inter"))
    # 36 data lines - 1 malformed - 1 bad timestamp - 2 repeated (user, item) pairs
    assert len(df) == 32
    seqs = by_user(df)
    assert list(seqs) == ["102", "101", "103", "104", "105", "106", "107", "108"]  # order of first appearance
    assert seqs["108"] == ["11", "13", "15", "17"]  # sorted by time although written out of order
    assert seqs["107"] == ["19", "18", "17"]  # equal timestamps keep the input order
    assert seqs["101"] == ["11", "12", "13", "14", "15"]  # the later repeat of item 12 is dropped
    assert df["timestamp:float"].iloc[0] == "1583369010000"  # epoch milliseconds kept as is
    prov = provenance(ml50k)
    assert dropped(prov, "malformed line") == 1
    assert prov["dropped"]["interactions"]["malformed line (expected 3 fields)"]["examples"] == [
        "line 17: '103,16' (2 fields)"]
    assert dropped(prov, "timestamp is not a number") == 1
    assert dropped(prov, "repeated (user, item) pair") == 2
    assert prov["counts"]["interactions"] == {"lines_read": 36, "rows_parsed": 35, "written": 32}
    assert any("header user,item,timestamp" in d for d in prov["detected"])


def test_microlens_titles_kept_byte_exact(ml50k):
    items = read_atomic(os.path.join(ml50k, "MicroLens-50k.item"))
    assert list(items.columns) == ["item_id:token", "title:token_seq", "likes:float", "views:float"]
    title = dict(zip(items["item_id:token"], items["title:token_seq"]))
    assert title["11"].encode("utf-8") == "Hello, world 😀 #tag".encode("utf-8")
    assert title["13"] == 'He said "hi"'
    assert title["14"].encode("utf-8") == "中文标题 mixed".encode("utf-8")
    assert title["15"] == "Line one line two"  # quoted line break -> one space
    assert title["16"] == "Tab inside"  # tab -> space
    assert title["20"] == "" and title["999"] == ""  # empty title, and an item absent from the titles file
    assert len(items) == 11 and set(items["item_id:token"]) == set(read_atomic(
        os.path.join(ml50k, "MicroLens-50k.inter"))["item_id:token"])
    raw = open(os.path.join(ml50k, "MicroLens-50k.item"), "rb").read()
    assert "😀".encode("utf-8") in raw and b"\\u" not in raw  # no escaping of non-ASCII
    likes = dict(zip(items["item_id:token"], zip(items["likes:float"], items["views:float"])))
    assert likes["11"] == ("5", "100") and likes["13"] == ("", "10") and likes["16"] == ("", "")
    prov = provenance(ml50k)
    assert prov["issues"]["items without title"]["count"] == 2
    assert prov["issues"]["interactions whose item is absent from the item file"]["count"] == 1
    assert prov["issues"]["items with more likes than views"]["count"] == 1
    assert prov["issues"]["likes / views values that are not numbers"]["count"] == 1


def test_microlens_images_corrupt_and_missing_counted(ml50k):
    images = sorted(os.listdir(os.path.join(ml50k, "images")))
    assert images == [f"{i}.jpg" for i in range(11, 19)]  # 19 is corrupt, 20 and 999 have no cover
    src = os.path.join(fixture("microlens50k"), "MicroLens-50k_covers", "11.jpg")
    assert filecmp.cmp(src, os.path.join(ml50k, "images", "11.jpg"), shallow=False)
    counts = provenance(ml50k)["counts"]["images"]
    assert counts == {"mode": "copy", "written": 8, "missing": 2, "corrupt": 1}


def test_microlens_yaml_contract(ml50k):
    import yaml

    with open(os.path.join(ml50k, "MicroLens-50k.yaml"), encoding="utf-8") as f:
        text = f.read()
    cfg = yaml.safe_load(text)
    assert cfg["USER_ID_FIELD"] == "user_id" and cfg["ITEM_ID_FIELD"] == "item_id" and cfg["TIME_FIELD"] == "timestamp"
    assert cfg["load_col"] == {"inter": ["user_id", "item_id", "timestamp"]}
    assert cfg["eval_args"] == {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "full"}
    assert cfg["metrics"] == ["Hit", "NDCG"] and cfg["topk"] == [10, 20] and cfg["valid_metric"] == "NDCG@10"
    assert cfg["text_fields"] == ["title"] and cfg["image_dir"] == "images"
    for line in text.splitlines():
        if line and not line.startswith(("#", "  inter:")):
            assert "# (" in line, line  # every key is commented "# (type) meaning"


def test_microlens_dedup_all_keeps_repeats_drops_exact_duplicates(tmp_path):
    assert convert("microlens", "--input", fixture("microlens50k"), "--output", str(tmp_path), "--dedup", "all",
                   "--images", "skip") == 0
    folder = tmp_path / "MicroLens-50k"
    seqs = by_user(read_atomic(str(folder / "MicroLens-50k.inter")))
    assert seqs["101"] == ["11", "12", "13", "14", "15", "12"]  # the repeat of item 12 is kept
    assert seqs["104"] == ["16", "17", "18", "11"]  # the exact duplicate row is dropped
    prov = provenance(str(folder))
    assert dropped(prov, "exact duplicate row") == 1 and dropped(prov, "repeated") == 0
    assert prov["counts"]["interactions"]["written"] == 33
    assert not (folder / "images").exists()


def test_microlens_keep_last_and_user_filter(tmp_path):
    assert convert("microlens", "--input", fixture("microlens50k"), "--output", str(tmp_path), "--keep-last", "3",
                   "--min-user-inter", "3", "--images", "skip") == 0
    folder = tmp_path / "MicroLens-50k"
    seqs = by_user(read_atomic(str(folder / "MicroLens-50k.inter")))
    assert seqs == {
        "102": ["18", "19", "20"], "101": ["13", "14", "15"], "103": ["12", "14", "15"], "104": ["17", "18", "11"],
        "105": ["11", "12", "13"], "107": ["19", "18", "17"], "108": ["13", "15", "17"],
    }  # user 106 has only 2 interactions
    prov = provenance(str(folder))
    assert dropped(prov, "older than the user's last 3") == 32 - 21 - 2
    assert dropped(prov, "user with fewer than 3") == 2
    items = read_atomic(str(folder / "MicroLens-50k.item"))
    assert set(items["item_id:token"]) == {t for s in seqs.values() for t in s}


def test_microlens_unknown_items_drop(tmp_path):
    assert convert("microlens", "--input", fixture("microlens50k"), "--output", str(tmp_path), "--unknown-items",
                   "drop", "--images", "skip") == 0
    folder = tmp_path / "MicroLens-50k"
    df = read_atomic(str(folder / "MicroLens-50k.inter"))
    assert len(df) == 31 and "999" not in set(df["item_id:token"])
    assert "999" not in set(read_atomic(str(folder / "MicroLens-50k.item"))["item_id:token"])
    assert dropped(provenance(str(folder)), "item absent from the item file") == 1


def test_microlens_tsv_positional_timestamps(tmp_path):
    assert convert("microlens", "--input", fixture("microlens50k"), "--output", str(tmp_path), "--interactions",
                   "tsv", "--dedup", "all", "--keep-last", "13", "--images", "skip") == 0
    folder = tmp_path / "MicroLens-50k"
    df = read_atomic(str(folder / "MicroLens-50k.inter"))
    u101 = df[df["user_id:token"] == "101"]
    assert list(u101["item_id:token"]) == ["11", "12", "13", "14", "15", "12", "16"]  # second line appended
    assert list(u101["timestamp:float"]) == ["0", "1", "2", "3", "4", "5", "6"]
    assert list(df[df["user_id:token"] == "104"]["item_id:token"]) == ["16", "17", "18", "11"]  # double space
    assert len(df) == 7 + 7 + 3 + 4
    prov = provenance(str(folder))
    assert dropped(prov, "malformed line") == 1 and dropped(prov, "sequence line without items") == 1
    assert any("timestamp = 0-based position" in d for d in prov["detected"])
    assert any("repeat a user" in d for d in prov["detected"])
    assert "position" in open(folder / "MicroLens-50k.yaml", encoding="utf-8").read()


def test_microlens_100k_titles_without_header_and_bom(tmp_path):
    assert convert("microlens", "--input", fixture("microlens100k"), "--output", str(tmp_path), "--images",
                   "skip") == 0
    folder = tmp_path / "MicroLens-100k"
    items = read_atomic(str(folder / "MicroLens-100k.item"))
    assert list(items.columns) == ["item_id:token", "title:token_seq", "tag:token"]
    title = dict(zip(items["item_id:token"], items["title:token_seq"]))
    assert title == {"21": "First title, with comma", "22": "Quoted, title", "23": "", "24": "Emoji 🎬 title",
                     "25": ""}
    assert dict(zip(items["item_id:token"], items["tag:token"]))["22"] == "music"  # first tag kept
    prov = provenance(str(folder))
    assert any("byte-order mark" in d for d in prov["detected"])
    assert any("no header line; each line split at its first comma" in d for d in prov["detected"])
    assert dropped(prov, "malformed titles line", "items") == 1  # "25" has no comma
    assert prov["issues"]["items with several tags"]["count"] == 1
    assert "\ufeff" not in open(folder / "MicroLens-100k.item", encoding="utf-8").read()


def test_microlens_fill_titles_from_other_file(tmp_path):
    extra = os.path.join(fixture("microlens100k"), "extra_titles.csv")
    assert convert("microlens", "--input", fixture("microlens100k"), "--output", str(tmp_path), "--images", "skip",
                   "--fill-titles-from", extra) == 0
    folder = tmp_path / "MicroLens-100k"
    title = dict(read_atomic(str(folder / "MicroLens-100k.item")).iloc[:, :2].values)
    assert title["23"] == "Filled title" and title["21"] == "First title, with comma"  # only empty ones filled
    assert provenance(str(folder))["counts"]["items"]["titles_filled_from_other_file"] == 1


# ------------------------------------------------------------------------------------------------ NineRec
def test_ninerec_behaviour_tsv_positions_and_bilingual_text(tmp_path):
    assert convert("ninerec", "--input", fixture("ninerec"), "--domain", "QB", "--output", str(tmp_path)) == 0
    folder = tmp_path / "QB"
    df = read_atomic(str(folder / "QB.inter"))
    assert len(df) == 12
    assert list(df[df["user_id:token"] == "u3"]["timestamp:float"]) == ["0", "1", "2", "3", "4"]
    items = read_atomic(str(folder / "QB.item"))
    row = items[items["item_id:token"] == "v1"].iloc[0]
    assert row["title:token_seq"].encode("utf-8") == "韩国电影，《女教师》".encode("utf-8")
    assert row["title_en:token_seq"] == "Korean Movie, The Governess"
    assert items[items["item_id:token"] == "v4"].iloc[0]["title_en:token_seq"] == 'Music "live"'
    prov = provenance(str(folder))
    assert any("no timestamps" in d and "position" in d for d in prov["detected"])
    assert prov["counts"]["images"]["missing"] == 1  # v5
    text = open(folder / "QB.yaml", encoding="utf-8").read()
    assert "text_fields: [title_en]" in text and "[title] gives the Chinese text" in text


@pytest.mark.parametrize("domain,order,users", [("Bili_Food", "item,user,timestamp", {"u10": ["v11", "v12", "v10"],
                                                                                      "u11": ["v10", "v12"]}),
                                                ("KU", "user,item,timestamp", {"u7": ["v70", "v71"],
                                                                               "u8": ["v71", "v72"]})])
def test_ninerec_pair_column_order_detected_from_prefixes(tmp_path, domain, order, users):
    assert convert("ninerec", "--input", fixture("ninerec"), "--domain", domain, "--output", str(tmp_path),
                   "--images", "skip") == 0
    folder = tmp_path / domain
    assert by_user(read_atomic(str(folder / f"{domain}.inter"))) == users
    prov = provenance(str(folder))
    assert prov["counts"]["interactions"]["column_order"] == order
    assert any(f"column order detected as {order}" in d for d in prov["detected"])
    if domain == "Bili_Food":
        assert dropped(prov, "id without the expected u / v prefix") == 1
        title_en = dict(read_atomic(str(folder / "Bili_Food.item"))[["item_id:token", "title_en:token_seq"]].values)
        assert title_en["v10"] == "Braised pork, sweet"  # ", " separators and quoting


# ------------------------------------------------------------------------------------------------ PixelRec
def test_pixelrec_item_first_and_same_named_files(tmp_path):
    assert convert("pixelrec", "--input", fixture("pixelrec"), "--variant", "Pixel200K", "--output",
                   str(tmp_path)) == 0
    folder = tmp_path / "Pixel200K"
    df = read_atomic(str(folder / "Pixel200K.inter"))
    assert by_user(df) == {"u0": ["i1", "i2", "i0"], "u1": ["i1", "i3", "i0"], "u2": ["i2", "i3", "i4"]}
    items = read_atomic(str(folder / "Pixel200K.item"))
    assert list(items.columns)[:2] == ["item_id:token", "view_number:float"]
    assert list(items.columns)[-3:] == ["title:token_seq", "tag:token_seq", "description:token_seq"]
    row = items.set_index("item_id:token")
    assert row.loc["i0", "description:token_seq"] == "第一行 第二行"
    assert row.loc["i3", "description:token_seq"] == "好吃, 不贵"
    assert row.loc["i3", "view_number:float"] == ""  # "abc" is not a number
    assert row.loc["i2", "title:token_seq"] == ""
    prov = provenance(str(folder))
    roles = {e["role"]: e["path"] for e in prov["inputs"]}
    assert roles["interactions"] == "interaction/Pixel200K.csv" and roles["items"] == "item_info/Pixel200K.csv"
    assert prov["issues"]["items without title"]["count"] == 1
    assert sorted(os.listdir(folder / "images")) == ["i0.jpg", "i1.jpg", "i2.jpg", "i3.jpg"]


# ------------------------------------------------------------------------------------------------ MMRec
def test_mmrec_splits_tokens_users_and_features(tmp_path):
    assert convert("mmrec", "--input", fixture("mmrec"), "--output", str(tmp_path)) == 0
    folder = tmp_path / "toy"
    full = read_atomic(str(folder / "toy.inter"))
    assert list(full.columns) == ["user_id:token", "item_id:token", "timestamp:float", "rating:float"]
    assert len(full) == 18 and set(full["user_id:token"]) == {"A17", "B22", "C05", "D09"}
    assert list(full["item_id:token"])[:2] == ["B000X5", "B000X1"]  # by time within the user (99 < 100)
    sizes = {s: len(read_atomic(str(folder / f"toy.{s}.inter"))) for s in ("train", "valid", "test")}
    assert sizes == {"train": 10, "valid": 4, "test": 4}
    test = read_atomic(str(folder / "toy.test.inter"))
    assert list(test["item_id:token"]) == ["B000X4", "B000X1", "B000X3", "B000X9"]
    users = read_atomic(str(folder / "toy.user"))
    assert users.values.tolist() == [["A17", "1", "2"], ["B22", "0", "3"], ["C05", "1", "5"], ["D09", "0", "1"]]
    items = read_atomic(str(folder / "toy.item"))
    assert list(items["item_id:token"])[-1] == "B000X10"  # in the mapping and the features, in no interaction
    assert set(items["item_id:token"]) == {f"B000X{i}" for i in range(1, 11)}
    from recbole_mm.data.features import open_features

    array, side = open_features(str(folder / "features" / "mmrec" / "image.npy"), verify_checksum=True)
    src = np.load(os.path.join(fixture("mmrec"), "image_feat.npy"))
    assert side["tokens"] == [f"B000X{i}" for i in range(1, 11)] and side["modality"] == "image"
    np.testing.assert_array_equal(array[side["tokens"].index("B000X3")], src[2])  # row i = item id i
    text, _ = open_features(str(folder / "features" / "mmrec" / "text.npy"))
    assert text.shape == (10, 3)
    prov = provenance(str(folder))
    assert dropped(prov, "userID / itemID not an id of the mapping") == 2
    assert "benchmark_filename: [train, valid, test]" in open(folder / "toy.yaml", encoding="utf-8").read()


# ------------------------------------------------------------------------------------------------ robustness
def _tree_bytes(root: str) -> dict[str, bytes]:
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            out[os.path.relpath(p, root)] = open(p, "rb").read()
    return out


@pytest.mark.parametrize("argv,name", [(["microlens", "--input", fixture("microlens50k")], "MicroLens-50k"),
                                       (["mmrec", "--input", fixture("mmrec")], "toy")])
def test_reruns_are_byte_identical(tmp_path, argv, name):
    assert convert(*argv, "--output", str(tmp_path / "a")) == 0
    assert convert(*argv, "--output", str(tmp_path / "b")) == 0
    a, b = _tree_bytes(str(tmp_path / "a" / name)), _tree_bytes(str(tmp_path / "b" / name))
    assert sorted(a) == sorted(b) and len(a) > 4
    assert all(a[k] == b[k] for k in a)


def test_interrupted_run_leaves_no_output(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise KeyboardInterrupt("simulated interruption while writing")

    monkeypatch.setattr(output, "write_rows", boom)
    with pytest.raises(KeyboardInterrupt):
        convert("microlens", "--input", fixture("microlens50k"), "--output", str(tmp_path))
    assert os.listdir(tmp_path) == []  # neither the dataset nor its temporary folder


def test_existing_output_refused_unless_overwrite(tmp_path, caplog):
    args = ["ninerec", "--input", fixture("ninerec"), "--domain", "KU", "--output", str(tmp_path)]
    assert convert(*args) == 0
    marker = tmp_path / "KU" / "marker"
    marker.write_text("x")
    assert convert(*args) == 1
    assert "already exists" in caplog.text and marker.exists()
    assert convert(*args, "--overwrite") == 0
    assert not marker.exists() and sorted(os.listdir(tmp_path)) == ["KU"]


def test_missing_required_file_names_it(tmp_path, caplog):
    raw = tmp_path / "raw"
    shutil.copytree(fixture("microlens50k"), raw)
    os.remove(raw / "MicroLens-50k_titles.csv")
    assert convert("microlens", "--input", str(raw), "--output", str(tmp_path / "out")) == 1
    assert "MicroLens-50k_titles.csv" in caplog.text and "missing required titles file" in caplog.text
    assert not (tmp_path / "out" / "MicroLens-50k").exists()
    with pytest.raises(ConversionError, match="QB_item.csv"):
        from argparse import Namespace

        from dataset_converters import ninerec

        raw2 = tmp_path / "raw2"
        shutil.copytree(fixture("ninerec/QB"), raw2)
        os.remove(raw2 / "QB_item.csv")
        ninerec.convert(Namespace(input=str(raw2), output=str(tmp_path / "o2"), name=None, domain="QB",
                                  interactions="auto", covers=None, keep_last=None, min_user_inter=None, dedup="first",
                                  unknown_items="keep", images="skip", overwrite=False))


def test_unreadable_header_names_file_and_expectation(tmp_path, caplog):
    raw = tmp_path / "raw"
    shutil.copytree(fixture("microlens50k"), raw)
    (raw / "MicroLens-50k_pairs.csv").write_text("who,what,when\n1,2,3\n")
    assert convert("microlens", "--input", str(raw), "--output", str(tmp_path / "out")) == 1
    assert "unreadable header in" in caplog.text and "MicroLens-50k_pairs.csv" in caplog.text
    assert "expected user,item,timestamp" in caplog.text


def test_ninerec_undetectable_column_order_is_an_error(tmp_path, caplog):
    raw = tmp_path / "raw"
    shutil.copytree(fixture("ninerec/KU"), raw)
    (raw / "KU_pair.csv").write_text("7,70,5\n8,71,6\n")
    assert convert("ninerec", "--input", str(raw), "--domain", "KU", "--output", str(tmp_path / "out")) == 1
    assert "cannot detect the column order" in caplog.text and "KU_pair.csv" in caplog.text


def test_images_link_mode_uses_absolute_symlinks(tmp_path):
    assert convert("ninerec", "--input", fixture("ninerec"), "--domain", "QB", "--output", str(tmp_path), "--images",
                   "link") == 0
    link = tmp_path / "QB" / "images" / "v1.jpg"
    assert link.is_symlink() and os.path.isabs(os.readlink(link))
    assert os.path.samefile(link, os.path.join(fixture("ninerec"), "QB", "QB_cover", "v1.jpg"))


def test_help_everywhere(capsys):
    for argv in ([], ["microlens"], ["ninerec"], ["pixelrec"], ["mmrec"]):
        with pytest.raises(SystemExit) as e:
            main(argv + ["--help"])
        assert e.value.code == 0
    assert "--keep-last" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ RecBole
def _recbole_shims():
    np.float_ = np.float64
    np.complex_ = np.complex128
    np.unicode_ = np.str_
    np.bool8 = np.bool_
    import torch

    torch.set_num_threads(1)


def test_recbole_loads_converted_sequential_dataset(ml50k):
    _recbole_shims()
    from recbole.config import Config
    from recbole.data import create_dataset

    root, name = os.path.dirname(ml50k), os.path.basename(ml50k)
    config = Config(model="SASRec", dataset=name, config_file_list=[os.path.join(ml50k, f"{name}.yaml")],
                    config_dict={"data_path": root, "train_neg_sample_args": None, "show_progress": False})
    dataset = create_dataset(config)
    assert dataset.inter_num == 32 and dataset.user_num == 9 and dataset.item_num == 12  # + [PAD]
    assert dataset.time_field == "timestamp"


def test_recbole_loads_mmrec_benchmark_splits(tmp_path):
    _recbole_shims()
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation

    assert convert("mmrec", "--input", fixture("mmrec"), "--output", str(tmp_path)) == 0
    config = Config(model="BPR", dataset="toy", config_file_list=[str(tmp_path / "toy" / "toy.yaml")],
                    config_dict={"data_path": str(tmp_path), "show_progress": False})
    dataset = create_dataset(config)
    train, valid, test = data_preparation(config, dataset)
    assert len(train.dataset) == 10 and len(valid.dataset) == 4 and len(test.dataset) == 4


def test_end_to_end_convert_then_train_one_epoch(tmp_path):
    _recbole_shims()
    os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    import recbole_mm

    run_recbole = getattr(recbole_mm, "run_recbole", None)
    if run_recbole is None:
        pytest.skip("recbole_mm.run_recbole is not available yet")
    out = tmp_path / "data"
    assert convert("microlens", "--input", fixture("microlens50k"), "--output", str(out), "--keep-last", "13",
                   "--min-user-inter", "3") == 0
    result = run_recbole(model="SASRec", dataset="MicroLens-50k", config_dict={
        "data_path": str(out), "hidden_size": 16, "inner_size": 32, "n_layers": 1, "n_heads": 1,
        "MAX_ITEM_LIST_LENGTH": 20, "epochs": 1, "train_neg_sample_args": None, "show_progress": False,
        "topk": [5, 10],  # the fixture has 11 items
        "checkpoint_dir": str(tmp_path / "ckpt"),
    })
    assert "ndcg@10" in result["test_result"] and 0.0 <= result["test_result"]["ndcg@10"] <= 1.0
