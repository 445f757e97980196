"""Item content aligned to RecBole's internal ids: text, features (token-keyed files), images."""

import logging
import os

import numpy as np
import pytest
import torch
from recbole.data import data_preparation

from recbole_mm.config import Config
from recbole_mm.data import features as ff
from recbole_mm.data.content import ItemContent
from recbole_mm.data.dataset import MMDataset, MMSequentialDataset
from recbole_mm.data.utils import create_dataset


def _dataset(tiny_config, model="SASRec", **extra):
    cfg = dict(tiny_config, **extra)
    config = Config(model=model, dataset="mm-tiny", config_dict=cfg)
    return config, create_dataset(config)


def _token_vectors(tokens, dim=4):
    """Row for token t = [int(t), 2*int(t), ...]: checkable after any permutation."""
    base = np.array([int(t) for t in tokens], dtype=np.float32)[:, None]
    return base * np.arange(1, dim + 1, dtype=np.float32)[None, :]


def test_content_follows_recbole_ids_not_token_order(tiny_config):
    config, dataset = _dataset(tiny_config)
    content = dataset.item_content
    iid = dataset.iid_field
    assert content.tokens[0] == "[PAD]"
    assert list(content.tokens) == list(dataset.field2id_token[iid])
    # RecBole numbers items by first appearance in .inter: id 1 is the first item of the file, not token '1'.
    with open(os.path.join(config["data_path"], "mm-tiny.inter"), encoding="utf-8") as f:
        f.readline()
        first_item = f.readline().split("\t")[1]
    assert content.tokens[1] == first_item
    texts = content.text()
    assert texts[0] == ""
    titles = {}
    with open(os.path.join(config["data_path"], "mm-tiny.item"), encoding="utf-8") as f:
        f.readline()
        for line in f:
            tok, title, genres, _ = line.rstrip("\n").split("\t")
            titles[tok] = f"{title} {genres}"
    for i in (1, 2, len(content.tokens) - 1):
        assert texts[i] == titles[content.tokens[i]]
    assert dataset.item_feat is None  # item text never enters RecBole's per-batch join


def test_split_datasets_share_content(tiny_config):
    config, dataset = _dataset(tiny_config)
    train, valid, test = data_preparation(config, dataset)
    assert isinstance(train._dataset, MMSequentialDataset)
    assert train._dataset.item_content is dataset.item_content is test._dataset.item_content


def test_general_models_get_content_too(tiny_config):
    config, dataset = _dataset(tiny_config, model="BPR", embedding_size=8)
    assert isinstance(dataset, MMDataset)
    assert dataset.item_content.n_items == dataset.item_num


def test_permuted_feature_file_gives_identical_inputs(tiny_config, tmp_path):
    _, dataset = _dataset(tiny_config)
    content = dataset.item_content
    tokens = sorted(content.tokens[1:].tolist()) + ["999999"]  # plus an item the filtered dataset lacks
    vectors = _token_vectors(tokens)
    ff.write_features(str(tmp_path / "a.npy"), vectors, tokens, modality="text", kind="pooled", encoder="test")
    perm = np.random.default_rng(0).permutation(len(tokens))
    ff.write_features(str(tmp_path / "b.npy"), vectors[perm], [tokens[i] for i in perm], modality="text",
                      kind="pooled", encoder="test")
    a = content.features(str(tmp_path / "a.npy"))
    b = content.features(str(tmp_path / "b.npy"))
    assert torch.equal(a, b)
    assert a.shape == (dataset.item_num, 4)
    assert torch.all(a[0] == 0)
    expected = torch.from_numpy(_token_vectors(content.tokens[1:].tolist()))
    assert torch.equal(a[1:], expected)


def test_truncated_feature_file_is_refused_with_name_and_token(tiny_config, tmp_path):
    _, dataset = _dataset(tiny_config)
    tokens = sorted(dataset.item_content.tokens[1:].tolist())
    path = str(tmp_path / "feat.npy")
    ff.write_features(path, _token_vectors(tokens, dim=8), tokens, modality="text", kind="pooled", encoder="test")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 3 * 8 * 4 - 5)  # the last 3 rows and a bit of the one before
    with pytest.raises(ff.FeatureFileError) as err:
        dataset.item_content.features(path)
    msg = str(err.value)
    assert path in msg and "truncated" in msg
    assert f"first bad token: {tokens[-4]}" in msg


def test_feature_file_mismatches_are_clear_errors(tiny_config, tmp_path):
    _, dataset = _dataset(tiny_config)
    content = dataset.item_content
    tokens = sorted(content.tokens[1:].tolist())
    # a dataset item without a row
    path = str(tmp_path / "missing.npy")
    ff.write_features(path, _token_vectors(tokens[1:]), tokens[1:], modality="text", kind="pooled", encoder="t")
    with pytest.raises(ff.FeatureFileError, match=f"first missing token: '{tokens[0]}'"):
        content.features(path)
    # more rows than the sidecar lists
    path = str(tmp_path / "extra.npy")
    ff.write_features(path, _token_vectors(tokens), tokens, modality="text", kind="pooled", encoder="t")
    np.save(path, _token_vectors(tokens + ["1000001"]))
    with pytest.raises(ff.FeatureFileError, match="extra rows"):
        content.features(path)
    # another row shape than the sidecar says
    np.save(path, np.zeros((len(tokens), 5), dtype=np.float32))
    with pytest.raises(ff.FeatureFileError, match=r"rows of shape \(5,\), sidecar says \(4,\)"):
        content.features(path)
    # no sidecar at all
    os.remove(ff.sidecar_path(path))
    with pytest.raises(ff.FeatureFileError, match="sidecar .* is missing"):
        content.features(path)


def test_keep_last_n_truncates_each_user_before_splitting(tiny_config):
    _, full = _dataset(tiny_config)
    _, cut = _dataset(tiny_config, keep_last_n=5)
    uid, iid, t = full.uid_field, full.iid_field, full.time_field
    per_user = full.inter_feat[uid].value_counts()
    assert len(cut.inter_feat) == int(np.minimum(per_user.values, 5).sum())
    assert cut.inter_feat[uid].value_counts().max() == 5
    # the kept rows are each user's 5 latest (by timestamp)
    u = per_user.index[0]
    user_rows = full.inter_feat[full.inter_feat[uid] == u]
    want = sorted(user_rows.sort_values(t, kind="stable")[t].tolist()[-5:])
    kept = cut.inter_feat[cut.inter_feat[uid] == cut.token2id(uid, full.id2token(uid, u))]
    assert sorted(kept[t].tolist()) == want
    assert cut.item_num < full.item_num  # items seen only in dropped history leave the catalogue


def test_text_is_kept_exactly(tmp_path):
    folder = tmp_path / "uni"
    folder.mkdir()
    (folder / "uni.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\nu1\ta\t1\nu1\tb\t2\n", encoding="utf-8")
    texts = {"a": "韩国电影，《女教师》 🎬 café", "b": 'say "hi", x'}
    (folder / "uni.item").write_text(
        "item_id:token\ttitle:token_seq\n" + "".join(f"{k}\t{v}\n" for k, v in texts.items()), encoding="utf-8"
    )
    content = ItemContent(["[PAD]", "b", "a"], str(folder), "uni", {"text_fields": ["title"]})
    assert content.text() == ["", texts["b"], texts["a"]]
    content = ItemContent(["[PAD]", "c"], str(folder), "uni", {"text_fields": ["title"]})
    with pytest.raises(ff.FeatureFileError, match="first missing token: 'c'"):
        content.text()


def _image_folder(tmp_path):
    from PIL import Image

    folder = tmp_path / "imgs"
    images = folder / "images"
    images.mkdir(parents=True)
    colours = {"a": (255, 0, 0), "b": (0, 255, 0), "c": (0, 0, 255), "d": (10, 20, 30)}
    for tok, col in colours.items():
        Image.new("RGB", (40, 30), col).save(images / f"{tok}.jpg" if tok != "c" else images / f"{tok}.png")
    good = (images / "a.jpg").read_bytes()
    (images / "d.jpg").write_bytes(good[: len(good) // 3])  # truncated
    (images / "e.jpg").write_bytes(b"not an image")  # corrupt
    return folder, colours


@pytest.mark.parametrize("fmt", ["jpeg", "raw"])
def test_image_store_placeholders_and_warning(tmp_path, caplog, fmt):
    folder, colours = _image_folder(tmp_path)
    tokens = ["[PAD]", "b", "e", "a", "missing1", "c", "d"]
    keys = {"image_size": 16, "image_store_format": fmt, "image_store_workers": 1}
    content = ItemContent(tokens, str(folder), "imgs", keys)
    with caplog.at_level(logging.WARNING):
        px = content.pixels(torch.arange(len(tokens)))
    assert px.shape == (len(tokens), 16, 16, 3) and px.dtype == torch.uint8
    for i, tok in enumerate(tokens):
        if tok in ("b", "a", "c"):
            assert np.abs(px[i].float().mean((0, 1)).numpy() - np.array(colours[tok])).max() < 8, tok
        else:
            assert torch.all(px[i] == 128), tok
    text = caplog.text
    assert "missing1" in text and "placeholder" in text
    assert "e" in text and "d" in text and "truncated or corrupt" in text
    # the store is reused, not rebuilt
    store = folder / "image_store" / ("16px" if fmt == "raw" else "16px-jpeg-q90")
    mtimes = {p.name: p.stat().st_mtime_ns for p in store.iterdir()}
    assert ("pixels.npy" in mtimes) == (fmt == "raw")
    ItemContent(tokens, str(folder), "imgs", keys).pixels(torch.tensor([1]))
    assert {p.name: p.stat().st_mtime_ns for p in store.iterdir()} == mtimes


def test_image_store_build_resumes(tmp_path, monkeypatch):
    import recbole_mm.data.images as images

    folder, _ = _image_folder(tmp_path)
    tokens = ["a", "b", "c", "d", "e", "missing"]
    monkeypatch.setattr(images, "_CHUNK", 2)
    reference = images.build_image_store(str(folder / "images"), str(tmp_path / "ref"), 16, tokens, progress=False)
    ref_pixels = np.load(tmp_path / "ref" / "pixels.npy")

    calls = {"n": 0}
    real = images.decode_image

    def flaky(path, size):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(path, size)

    monkeypatch.setattr(images, "decode_image", flaky)
    with pytest.raises(KeyboardInterrupt):
        images.build_image_store(str(folder / "images"), str(tmp_path / "st"), 16, tokens, workers=1, progress=False)
    assert not (tmp_path / "st" / "pixels.npy").exists()
    monkeypatch.setattr(images, "decode_image", real)
    index = images.build_image_store(str(folder / "images"), str(tmp_path / "st"), 16, tokens, progress=False)
    assert index["missing"] == reference["missing"] == ["missing"]
    assert index["corrupt"] == reference["corrupt"] == ["d", "e"]
    assert np.array_equal(np.load(tmp_path / "st" / "pixels.npy"), ref_pixels)


def test_quoted_and_unusual_tokens_match_recbole(tmp_path):
    folder = tmp_path / "odd"
    folder.mkdir()
    (folder / "odd.inter").write_text(
        'user_id:token\titem_id:token\ttimestamp:float\nu1\t"q"\t1\nu1\tü-1\t2\nu1\tx.y\t3\n', encoding="utf-8")
    (folder / "odd.item").write_text(
        'item_id:token\ttitle:token_seq\n"q"\tquoted\nü-1\tumlaut\nx.y\tdotted\n', encoding="utf-8")
    config = Config(model="SASRec", dataset="odd", config_dict={"data_path": str(tmp_path), "state": "WARNING",
                                                                 "load_col": {"inter": ["user_id", "item_id", "timestamp"]}})
    dataset = create_dataset(config)
    tokens = dataset.field2id_token[dataset.iid_field].tolist()
    assert "q" in tokens  # RecBole strips the quotes
    content = dataset.item_content
    assert dict(zip(content.tokens, content.text(["title"]))) == {"[PAD]": "", "q": "quoted", "ü-1": "umlaut", "x.y": "dotted"}


def test_catalogue_covers_items_missing_from_item_file(tmp_path):
    from recbole_mm.data.content import catalogue_tokens

    folder = tmp_path / "cat"
    folder.mkdir()
    (folder / "cat.inter").write_text("user_id:token\titem_id:token\nu\ta\nu\tc\n", encoding="utf-8")
    (folder / "cat.item").write_text("item_id:token\ttitle:token_seq\na\tA\nb\tB\n", encoding="utf-8")
    (folder / "cat.train.inter").write_text("user_id:token\titem_id:token\nu\td\n", encoding="utf-8")
    assert catalogue_tokens(str(folder), "cat") == ["a", "b", "c"]
    assert catalogue_tokens(str(folder), "cat", benchmark=["train"]) == ["a", "b", "c", "d"]


def test_image_store_follows_changes_of_the_image_folder(tmp_path):
    from PIL import Image

    folder, colours = _image_folder(tmp_path)
    tokens = ["[PAD]", "a", "missing1"]
    px = ItemContent(tokens, str(folder), "imgs", {"image_size": 8}).pixels(torch.arange(3))
    assert torch.all(px[2] == 128)
    Image.new("RGB", (8, 8), (0, 0, 250)).save(folder / "images" / "missing1.jpg")  # the missing image arrives
    Image.new("RGB", (8, 8), (250, 250, 0)).save(folder / "images" / "a.jpg")  # and one is replaced
    os.utime(folder / "images" / "a.jpg", ns=(1, 1))
    px = ItemContent(tokens, str(folder), "imgs", {"image_size": 8}).pixels(torch.arange(3))
    assert px[2, 0, 0, 2] > 200 and px[1, 0, 0, 0] > 200 and px[1, 0, 0, 2] < 50
    other = tmp_path / "imgs" / "images_v2"
    other.mkdir()
    Image.new("RGB", (8, 8), (0, 250, 0)).save(other / "a.jpg")
    px = ItemContent(tokens, str(folder), "imgs", {"image_size": 8, "image_dir": "images_v2"}).pixels(torch.arange(3))
    assert px[1, 0, 0, 1] > 200 and torch.all(px[2] == 128)


def test_saved_dataset_uses_this_runs_content_keys(tiny_config, tmp_path):
    cfg = dict(tiny_config, save_dataset=True, checkpoint_dir=str(tmp_path / "ck"))
    _, first = _dataset(cfg, text_fields=["title"])
    assert first.item_content.text()[1].endswith(")")  # "Title (year)"
    _, cached = _dataset(cfg, text_fields=["title", "genres"])
    assert cached.config["text_fields"] == ["title", "genres"]
    assert not cached.item_content.text()[1].endswith(")")


def test_saved_dataset_is_rebuilt_after_a_reconversion(tiny_root, tiny_config, tmp_path, caplog):
    """save_dataset: the pickle records its atomic files' size and mtime; a folder converted again (here: one
    interaction fewer) is never served from the old pickle."""
    import shutil

    root = tmp_path / "data"
    shutil.copytree(os.path.join(tiny_root, "mm-tiny"), root / "mm-tiny",
                    ignore=shutil.ignore_patterns("features", "image_store*", "dataset_cache"))
    cfg = dict(tiny_config, data_path=str(root), save_dataset=True, checkpoint_dir=str(tmp_path / "ck"))
    _, first = _dataset(cfg)
    _, again = _dataset(cfg)
    assert len(again.inter_feat) == len(first.inter_feat)
    inter = root / "mm-tiny" / "mm-tiny.inter"
    lines = inter.read_text(encoding="utf-8").splitlines(keepends=True)
    inter.write_text("".join(lines[:-1]), encoding="utf-8")  # the re-conversion dropped the last interaction
    with caplog.at_level("INFO"):
        _, rebuilt = _dataset(cfg)
    stale = [r for r in caplog.records if "was built from other atomic files" in r.getMessage()]
    assert len(stale) == 1 and stale[0].levelname == "WARNING"  # once, naming the changed file
    assert "mm-tiny.inter" in stale[0].getMessage()
    assert len(rebuilt.inter_feat) == len(first.inter_feat) - 1
