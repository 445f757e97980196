"""Features follow the dataset folder they were extracted from, and float16 storage works end to end.

- The sidecar records its inputs' fingerprints: re-converting a dataset (an edited title, a new item, new image
  files) makes the file stale; the next use extracts it again, with a warning, instead of reading old rows.
- ``feature_dtype: float16``: the file, the sidecar and the model's feature buffer are float16; the model's
  outputs equal a float32 tower fed the same rounded rows.
"""

import logging
import os
import shutil

import numpy as np
import pytest
import torch

from recbole_mm.data import features as ff
from recbole_mm.extract import ExtractSpec, catalogue_tokens, get_or_extract, input_fingerprint

MOREC_TINY = {
    "embedding_size": 16, "n_layers": 1, "n_heads": 1, "dnn_layers": 1, "MAX_ITEM_LIST_LENGTH": 10,
    "text_max_length": 16, "text_pooling": "mean", "train_batch_size": 64, "epochs": 1, "mode": "two_stage",
    "modality": "text", "loss": "inbatch",
}


@pytest.fixture
def folder(tiny_root, tmp_path):
    """A private copy of mm-tiny (no caches): the tests edit its files as a re-conversion would."""
    dst = tmp_path / "data" / "mm-tiny"
    shutil.copytree(os.path.join(tiny_root, "mm-tiny"), dst, ignore=shutil.ignore_patterns("features", "image_store*"))
    return str(dst)


def _config(tiny_bert, **over):
    return dict({"text_encoder": tiny_bert, "text_pooling": "mean", "text_max_length": 16,
                 "text_fields": ["title", "genres"]}, **over)


def _spec(config):
    from recbole_mm.extract import spec_from_config

    return spec_from_config(config, "text")


def _edit_item_file(folder, change):
    """Rewrite ``mm-tiny.item`` as a re-conversion would: ``change(rows)`` gets and returns the data rows, each a
    list of tab-separated cells (column 0 the item token, column 1 the title); the header is kept."""
    path = os.path.join(folder, "mm-tiny.item")
    with open(path, encoding="utf-8") as f:
        header, *lines = f.read().rstrip("\n").split("\n")
    rows = change([line.split("\t") for line in lines])
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join([header] + ["\t".join(r) for r in rows]) + "\n")


def test_an_edited_title_makes_the_features_stale(folder, tiny_bert, caplog):
    config = _config(tiny_bert)
    path = get_or_extract(config, folder, "mm-tiny", _spec(config), progress=False)
    before = np.load(path).copy()
    tokens = ff.read_sidecar(path)["tokens"]
    assert ff.read_sidecar(path)["inputs"]["items"] == len(tokens)

    # unchanged folder: the file is reused as it is (same inode, no warning)
    inode = os.stat(path).st_ino
    with caplog.at_level(logging.WARNING):
        assert get_or_extract(config, folder, "mm-tiny", _spec(config), progress=False) == path
    assert os.stat(path).st_ino == inode and "other inputs" not in caplog.text

    # a re-conversion rewrote one item's title
    edited = tokens[7]

    def retitle(rows):
        for r in rows:
            if r[0] == edited:
                r[1] = "A completely different title"
        return rows

    _edit_item_file(folder, retitle)
    with caplog.at_level(logging.WARNING):
        assert get_or_extract(config, folder, "mm-tiny", _spec(config), progress=False) == path
    assert "the text of some items changed" in caplog.text
    after, side = ff.open_features(path, verify_checksum=True)
    assert side["tokens"] == tokens
    changed = np.nonzero(np.any(after != before, axis=1))[0].tolist()
    assert changed == [7]  # only the edited item's row differs (rows do not depend on each other)


def test_a_new_item_makes_the_features_stale(folder, tiny_bert, caplog):
    config = _config(tiny_bert)
    path = get_or_extract(config, folder, "mm-tiny", _spec(config), progress=False)
    n = len(ff.read_sidecar(path)["tokens"])

    def add(rows):
        return rows + [["99999"] + rows[0][1:]]

    _edit_item_file(folder, add)
    with caplog.at_level(logging.WARNING):
        get_or_extract(config, folder, "mm-tiny", _spec(config), progress=False)
    assert "the item list changed" in caplog.text
    side = ff.read_sidecar(path)
    assert len(side["tokens"]) == n + 1 and "99999" in side["tokens"]
    assert side["tokens"] == catalogue_tokens(folder, "mm-tiny")


def test_a_sidecar_without_inputs_is_judged_by_its_items(folder, tiny_bert, caplog):
    """Files extracted before inputs were recorded are still used while the item list is the same."""
    config = _config(tiny_bert)
    path = get_or_extract(config, folder, "mm-tiny", _spec(config), progress=False)
    side = ff.read_sidecar(path)
    del side["inputs"]
    ff.write_sidecar(path, side)
    inode = os.stat(path).st_ino
    get_or_extract(config, folder, "mm-tiny", _spec(config), progress=False)
    assert os.stat(path).st_ino == inode
    assert "inputs" not in ff.read_sidecar(path)

    _edit_item_file(folder, lambda rows: rows + [["99999"] + rows[0][1:]])  # a new item: the old rows do not cover it
    with caplog.at_level(logging.WARNING):
        get_or_extract(config, folder, "mm-tiny", _spec(config), progress=False)
    assert "the item list changed" in caplog.text
    assert ff.read_sidecar(path)["tokens"] == catalogue_tokens(folder, "mm-tiny")


def test_image_fingerprint_follows_the_image_files(folder):
    """The image part of the fingerprint: a rewritten, removed or added image file changes it; nothing else does."""
    spec = ExtractSpec(modality="image", encoder="x", image_size=16)
    tokens = catalogue_tokens(folder, "mm-tiny")
    base = input_fingerprint(spec, folder, "mm-tiny", tokens)
    assert input_fingerprint(spec, folder, "mm-tiny", tokens) == base
    images = os.path.join(folder, "images")
    files = sorted(os.listdir(images))
    target = os.path.join(images, files[0])
    data = open(target, "rb").read()
    os.remove(target)
    gone = input_fingerprint(spec, folder, "mm-tiny", tokens)
    assert gone["images_sha256"] != base["images_sha256"] and gone["tokens_sha256"] == base["tokens_sha256"]
    with open(target, "wb") as f:  # written again, as a converter copying the images would
        f.write(data + b"\0")
    again = input_fingerprint(spec, folder, "mm-tiny", tokens)
    assert again["images_sha256"] not in (base["images_sha256"], gone["images_sha256"])
    # the pixels come from the image store: its format and quality are inputs too
    assert base["image_store"] == "jpeg-q90"
    assert input_fingerprint(spec, folder, "mm-tiny", tokens, {"image_store_quality": 80})["image_store"] == "jpeg-q80"
    assert input_fingerprint(spec, folder, "mm-tiny", tokens, {"image_store_format": "raw"})["image_store"] == "raw"


def test_feature_dtype_is_checked():
    with pytest.raises(ValueError, match="float32 or float16"):
        ExtractSpec(modality="text", encoder="x", dtype="bfloat16")


def test_float16_features_end_to_end(tiny_config, tiny_bert):
    """feature_dtype float16: the file (name, sidecar, rows = the float32 rows rounded), the model's buffer (half
    the bytes) and its outputs (equal to a float32 tower fed the rounded rows)."""
    from recbole_mm.layers.towers import FeatureTower
    from recbole_mm.testing import build_run

    runs = {}
    for dtype in ("float32", "float16"):
        cfg = dict(tiny_config, **MOREC_TINY, text_encoder=tiny_bert, feature_dtype=dtype)
        runs[dtype] = build_run("MoRec", "mm-tiny", cfg)
    towers = {}
    for dtype, (config, dataset, *_rest, model, trainer) in runs.items():
        tower = next(m for m in model.modules() if isinstance(m, FeatureTower))
        towers[dtype] = tower
        (path,) = model.feature_fingerprints()
        assert path.endswith("-float16.npy") == (dtype == "float16")
        assert tower.features.dtype == getattr(torch, dtype)
    f32, f16 = towers["float32"], towers["float16"]
    assert f16.features.nbytes * 2 == f32.features.nbytes
    assert torch.equal(f16.features, f32.features.half())  # extraction rounds the float32 encoder output once

    # the same weights on the rounded rows: identical outputs, forward and catalogue pass
    reference = FeatureTower(f32.features.half().float(), f32.head[0].out_features, dnn_layers=1)
    reference.load_state_dict(f16.state_dict())
    f16.eval(), reference.eval()
    ids = torch.arange(1, f16.features.shape[0])
    with torch.no_grad():
        assert torch.equal(f16(ids), reference(ids))
        assert torch.equal(f16.catalogue(), reference.catalogue())
    # and it trains: a step changes the head, the buffer stays float16
    config, dataset, train, valid, test, model, trainer = runs["float16"]
    batch = next(iter(train))
    model.train()
    loss = model.calculate_loss(batch)
    loss.backward()
    assert torch.isfinite(loss) and f16.head[0].weight.grad is not None
    assert f16.features.dtype == torch.float16


def test_cli_extract_follows_feature_dtype(tiny_root, tiny_bert, tmp_path):
    from recbole_mm.cli import main

    out = tmp_path / "feats"
    rc = main(["extract", "--dataset", "mm-tiny", "--data-path", tiny_root, "--modality", "text", "--encoder", tiny_bert,
               "--no-progress", f"features_dir={out}", "feature_dtype=float16", "text_max_length=16"])
    assert rc == 0
    (npy,) = [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs if f.endswith(".npy")]
    assert npy.endswith("-float16.npy")
    assert np.load(npy).dtype == np.float16 and ff.read_sidecar(npy)["dtype"] == "float16"


def test_evaluating_a_checkpoint_on_stale_features_leaves_the_file(folder, tiny_bert, tmp_path):
    """A checkpoint trained on features that a re-conversion made stale: evaluate_checkpoint is an error naming
    why, and the feature file the checkpoint needs stays as it was (before: it was extracted again, then the
    checkpoint was refused and told the user to restore the file just replaced). A run extracts them again."""
    import hashlib

    import recbole_mm
    from recbole_mm.quick_start import evaluate_checkpoint
    from tests.conftest import TINY_SEQ

    cfg = dict(TINY_SEQ, **_config(tiny_bert), data_path=os.path.dirname(folder), checkpoint_dir=str(tmp_path / "s"),
               embedding_size=16, modality="text", mode="two_stage")
    run = recbole_mm.run_recbole(model="MoRec", dataset="mm-tiny", config_dict=cfg)
    path = get_or_extract(cfg, folder, "mm-tiny", _spec(cfg), progress=False)
    digest = hashlib.sha256(open(path, "rb").read()).hexdigest()

    def retitle(rows):
        rows[3][1] = "A completely different title"
        return rows

    _edit_item_file(folder, retitle)
    with pytest.raises(ff.FeatureFileError, match="the text of some items changed"):
        evaluate_checkpoint(run["checkpoint_file"])
    assert hashlib.sha256(open(path, "rb").read()).hexdigest() == digest
    assert get_or_extract(cfg, folder, "mm-tiny", _spec(cfg), progress=False) == path  # a run: extracted again
    assert hashlib.sha256(open(path, "rb").read()).hexdigest() != digest
