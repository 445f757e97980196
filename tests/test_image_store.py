"""The JPEG image store (tar shards) and decoding in DataLoader workers.

- pixels equal an independent decode (``tarfile`` + PIL on the stored member) and are close to the source image
  resized; missing / corrupt images are placeholders without a member;
- the pool build equals the serial build byte for byte; 4 processes building at once: one builds, same bytes;
- SIGKILL at every publication step and at random moments, then a rerun: the same bytes, nothing left behind;
- migration: a raw-pixel store of an earlier release is still read exactly with ``image_store_format: raw`` and
  never used as a JPEG store; a store of another quality or format in the JPEG folder is rebuilt, not read;
- training an end-to-end image model with ``worker: 2`` gives the losses of ``worker: 0``, and the image store is
  not read inside the model (the batches carry their decoded pixels).
"""

import io
import json
import os
import random
import shutil
import tarfile

import numpy as np
import pytest
import torch

from tests._procs import SEED, built_once, file_sha, replay_hint, run_killed_after, run_killed_at, run_together

N_IMAGES = 240
SHARD = 16  # images per shard in these tests: 15 shards, many publication steps


def _picture(k: int) -> np.ndarray:
    """A smooth image (gradients: JPEG keeps it close), different for every k."""
    y, x = np.mgrid[0:40, 0:36].astype(np.float64)
    r = x / 35 * (150 + k % 50) + k % 53
    g = y / 39 * (150 + (3 * k) % 50) + (7 * k) % 53
    b = np.full_like(x, (k * 37) % 256)
    return np.stack([r, g, b], -1).astype(np.uint8)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    from PIL import Image

    folder = tmp_path_factory.mktemp("images") / "images"
    folder.mkdir()
    tokens = [f"{k:04d}" for k in range(N_IMAGES)]
    for k, tok in enumerate(tokens):
        Image.fromarray(_picture(k)).save(folder / f"{tok}.png")
    (folder / "0003.png").write_bytes(b"broken")  # corrupt
    os.remove(folder / "0007.png")  # missing
    return str(folder), tokens


@pytest.fixture
def small_shards(monkeypatch):
    import recbole_mm.data.images as images

    monkeypatch.setattr(images, "_SHARD_ITEMS", SHARD)


@pytest.fixture(scope="module")
def reference_store(image_folder, tmp_path_factory):
    """The JPEG store built in this process, serially, uninterrupted, alone; and the time it took."""
    import time

    import recbole_mm.data.images as images

    image_dir, tokens = image_folder
    store = str(tmp_path_factory.mktemp("ref-jpeg") / "32px-jpeg-q90")
    old, images._SHARD_ITEMS = images._SHARD_ITEMS, SHARD
    try:
        start = time.time()
        images.build_jpeg_store(image_dir, store, 32, tokens, quality=90, workers=1, progress=False)
        took = time.time() - start
    finally:
        images._SHARD_ITEMS = old
    return store, took


def _tree(root):
    return {name: file_sha(os.path.join(root, name)) for name in sorted(os.listdir(root))}


def _assert_same_store(store_dir, reference):
    names = sorted(os.listdir(store_dir))
    assert names == sorted(os.listdir(reference))  # no partial, progress or temporary file
    assert names[0] == "index.json" and all(n.startswith("shard-") and n.endswith(".tar") for n in names[1:])
    assert os.listdir(os.path.dirname(store_dir)) == [os.path.basename(store_dir)]  # no lock file
    assert _tree(store_dir) == _tree(reference)


# ------------------------------------------------------------------------------------------------ reading
def test_pixels_equal_an_independent_decode_and_the_source(image_folder, reference_store):
    from PIL import Image

    from recbole_mm.data.images import JpegImageStore

    image_dir, tokens = image_folder
    store = JpegImageStore(reference_store[0])
    rows = store.rows_for(tokens)
    pixels = store.decode_rows(rows)
    assert pixels.shape == (N_IMAGES, 32, 32, 3) and pixels.dtype == np.uint8
    # independent: every shard opened with tarfile, members by name (position in the sorted token list)
    members = {}
    for name in store.index["shards"]:
        with tarfile.open(os.path.join(reference_store[0], name)) as tar:
            for m in tar.getmembers():
                members[int(m.name.split(".")[0])] = np.asarray(Image.open(io.BytesIO(tar.extractfile(m).read()))
                                                                .convert("RGB"))
    assert sorted(members) == [k for k in range(N_IMAGES) if k not in (3, 7)]  # no member for bad images
    for k, tok in enumerate(tokens):
        if k in (3, 7):
            assert rows[k] == 0 and np.all(pixels[k] == 128), tok  # placeholder
            continue
        assert np.array_equal(pixels[k], members[k]), tok
        source = np.asarray(Image.fromarray(_picture(k)).resize((32, 32), Image.BILINEAR), dtype=np.float64)
        assert np.abs(pixels[k] - source).mean() < 6.0, tok  # JPEG q90 of a smooth image
    assert store.index["missing"] == ["0007"] and store.index["corrupt"] == ["0003"]
    # the same bytes give the same pixels, in any order and any process
    again = store.decode_rows(rows[::-1])[::-1]
    assert np.array_equal(again, pixels)


def test_pool_build_equals_the_serial_build(image_folder, reference_store, tmp_path, small_shards):
    from recbole_mm.data.images import build_jpeg_store

    image_dir, tokens = image_folder
    store_dir = str(tmp_path / "32px-jpeg-q90")
    build_jpeg_store(image_dir, store_dir, 32, tokens, quality=90, workers=2, progress=False)
    _assert_same_store(store_dir, reference_store[0])


def test_reads_in_forked_workers(image_folder, reference_store):
    """Descriptors opened before a fork are used by pread in the children (DataLoader workers) safely."""
    from recbole_mm.data.images import JpegImageStore

    image_dir, tokens = image_folder
    store = JpegImageStore(reference_store[0])
    want = store.decode_rows(np.arange(1, N_IMAGES + 1))  # opens every shard here

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return N_IMAGES

        def __getitem__(self, i):
            return torch.from_numpy(store.decode_rows(np.array([i + 1]))[0])

    got = torch.cat([b for b in torch.utils.data.DataLoader(Rows(), batch_size=17, num_workers=2)])
    assert np.array_equal(got.numpy(), want)


# ------------------------------------------------------------------------------------------------ processes
def _store_code(image_dir, store_dir, tokens, kill="", workers=2):
    return f"""
        import hashlib, json
        import numpy as np
        import recbole_mm.data.images as images
        images._SHARD_ITEMS = {SHARD}
        {kill}
        barrier()
        store = images.JpegImageStore.open_or_build({image_dir!r}, {store_dir!r}, 32, {tokens!r}, quality=90,
                                                    workers={workers}, progress=False)
        px = store.decode_rows(store.rows_for({tokens!r}))
        print(json.dumps({{"pixels": hashlib.sha256(px.tobytes()).hexdigest(), "rows": store.rows_for({tokens!r}).tolist()}}))
    """


def test_four_processes_build_one_jpeg_store(image_folder, reference_store, tmp_path):
    image_dir, tokens = image_folder
    store_dir = str(tmp_path / "store" / "32px-jpeg-q90")
    workers = run_together(_store_code(image_dir, store_dir, tokens), str(tmp_path), 4)
    rows = json.loads(built_once(workers, "item images are missing"))["rows"]
    assert rows[3] == 0 and rows[7] == 0 and rows[0] == 1  # corrupt and missing images use the placeholder
    _assert_same_store(store_dir, reference_store[0])


# n-th os.replace of a build of 240 images in shards of 16: shard i is renamed at 2i + 1, recorded at 2i + 2
# (i = 0..14), the index at 31; and what the rerun must report.
REMOVED = "removed what an interrupted image store build left"
STORE_KILLS = {
    "first-shard-temporary": (1, False, REMOVED),  # a temporary shard file
    "first-shard-unrecorded": (2, False, REMOVED),  # shard 0 in place but not recorded: removed, rebuilt
    "mid-build": (16, True, "resuming an interrupted build at shard 8"),
    "shard-unrecorded": (15, True, "resuming an interrupted build at shard 7"),  # shard 7 in place, not recorded
    "before-index": (30, True, "resuming an interrupted build at shard 15"),  # every shard recorded, no index
    "index-temporary": (31, False, REMOVED),
    "after-index": (31, True, "stale lock"),  # the store complete, the progress record and the lock left
}


@pytest.mark.parametrize("case", list(STORE_KILLS))
def test_killed_jpeg_build_resumes_to_the_same_bytes(image_folder, reference_store, tmp_path, caplog, case,
                                                      small_shards):
    from recbole_mm.data.images import JpegImageStore

    n, after, expected = STORE_KILLS[case]
    image_dir, tokens = image_folder
    store_dir = str(tmp_path / "store" / "32px-jpeg-q90")
    run_killed_at(_store_code(image_dir, store_dir, tokens, kill=f"kill_at_replace({n}, after={after})"),
                  str(tmp_path), "killed")
    with caplog.at_level("INFO"):
        JpegImageStore.open_or_build(image_dir, store_dir, 32, tokens, quality=90, workers=2, progress=False)
    assert "stale lock" in caplog.text  # the killed process held the lock
    assert expected in caplog.text
    _assert_same_store(store_dir, reference_store[0])


@pytest.mark.parametrize("k", range(2))
def test_jpeg_build_killed_at_a_random_moment(image_folder, reference_store, tmp_path, k, small_shards):
    from recbole_mm.data.images import JpegImageStore

    image_dir, tokens = image_folder
    rng = random.Random(SEED * 10 + k)
    delay = rng.uniform(0, 1.5 * reference_store[1])
    store_dir = str(tmp_path / "store" / "32px-jpeg-q90")
    run_killed_after(_store_code(image_dir, store_dir, tokens), str(tmp_path), "killed", delay)
    JpegImageStore.open_or_build(image_dir, store_dir, 32, tokens, quality=90, workers=2, progress=False)
    with replay_hint(delay):
        _assert_same_store(store_dir, reference_store[0])


# ------------------------------------------------------------------------------------------------ migration
def _content(folder, tokens, **keys):
    from recbole_mm.data.content import ItemContent

    return ItemContent(["[PAD]"] + tokens, str(folder), "imgs", dict({"image_size": 32, "image_store_workers": 1}, **keys))


def test_raw_store_of_an_earlier_release(image_folder, tmp_path, caplog, small_shards):
    """An earlier release's raw store (``<S>px/pixels.npy``) keeps being read exactly with ``image_store_format: raw``;
    the default (jpeg) builds its own store beside it, says so, and never reads the raw one as JPEG."""
    from recbole_mm.data.images import build_image_store

    image_dir, tokens = image_folder
    folder = tmp_path / "imgs"
    shutil.copytree(image_dir, folder / "images")
    raw_dir = folder / "image_store" / "32px"
    build_image_store(str(folder / "images"), str(raw_dir), 32, tokens, workers=1, progress=False)  # "old release"
    raw = np.load(raw_dir / "pixels.npy")
    before = _tree(str(raw_dir))
    ids = torch.arange(1, N_IMAGES + 1)
    assert np.array_equal(_content(folder, tokens, image_store_format="raw").pixels(ids).numpy(), raw[1:])
    with caplog.at_level("INFO"):
        jpeg = _content(folder, tokens).pixels(ids).numpy()
    assert "raw-pixel image store" in caplog.text and str(raw_dir) in caplog.text
    assert sorted(os.listdir(folder / "image_store")) == ["32px", "32px-jpeg-q90"]
    assert _tree(str(raw_dir)) == before  # left as it was
    good = [k for k in range(N_IMAGES) if k not in (3, 7)]
    assert not np.array_equal(jpeg[good], raw[1:][good])  # really decoded from JPEG, not the raw pixels
    assert np.abs(jpeg.astype(np.float64) - raw[1:]).mean() < 3.0


@pytest.mark.parametrize("what", ["quality", "raw-index"])
def test_a_store_made_with_other_settings_is_rebuilt_not_read(image_folder, tmp_path, caplog, what, small_shards):
    from recbole_mm.data.images import JpegImageStore, build_image_store, build_jpeg_store

    image_dir, tokens = image_folder
    target = str(tmp_path / "store" / "32px-jpeg-q80")
    if what == "quality":  # a q90 store under the q80 name (renamed by hand, or written by a buggy tool)
        build_jpeg_store(image_dir, str(tmp_path / "q90"), 32, tokens, quality=90, workers=1, progress=False)
        shutil.copytree(tmp_path / "q90", target)
    else:  # a raw-pixel store under the JPEG name
        build_image_store(image_dir, target, 32, tokens, workers=1, progress=False)
    fresh = str(tmp_path / "fresh" / "32px-jpeg-q80")
    build_jpeg_store(image_dir, fresh, 32, tokens, quality=80, workers=1, progress=False)
    with caplog.at_level("INFO"):
        store = JpegImageStore.open_or_build(image_dir, target, 32, tokens, quality=80, workers=1, progress=False)
    assert "rebuilding it" in caplog.text
    assert store.quality == 80 and _tree(target) == _tree(fresh)  # old files removed, same bytes as a fresh build


def test_unknown_format_and_quality_are_clear_errors(tmp_path):
    from recbole_mm.data.content import ItemContent

    with pytest.raises(ValueError, match="image_store_format"):
        ItemContent(["[PAD]", "a"], str(tmp_path), "x", {"image_store_format": "png"}).store_settings()
    with pytest.raises(ValueError, match="image_store_quality"):
        ItemContent(["[PAD]", "a"], str(tmp_path), "x", {"image_store_quality": 101}).store_settings()


# ------------------------------------------------------------------------------------------------ training
MOREC = {
    "embedding_size": 16, "n_layers": 1, "n_heads": 1, "dnn_layers": 1, "MAX_ITEM_LIST_LENGTH": 10,
    "image_encoder": "test_vit", "image_pretrained": False, "image_size": 32, "image_pooling": "mean",
    "train_batch_size": 64, "epochs": 1, "learning_rate": 0.005, "encoder_learning_rate": 0.005,
    "mode": "end2end", "modality": "image", "finetune": "full", "image_store_workers": 1,
}


def _train_losses(cfg, worker, monkeypatch, n_batches=3):
    """Losses of the first training batches (one optimizer step each), with RecBole's ``worker``; the image decodes
    done in this process inside the model (must be none) and in total."""
    import recbole_mm.data.content as content_module
    from recbole_mm.data.utils import attach_image_decode
    from recbole_mm.testing import build_run

    config, dataset, train, valid, test, model, trainer = build_run("MoRec", "mm-tiny", dict(cfg, worker=worker))
    attach_image_decode(train)
    content = model.content
    calls = {"in_model": 0, "here": 0}
    real = content_module.ItemContent.decode

    def decode(self, item_ids, size=None):
        calls["here"] += 1
        if self._batch is not None:  # inside the model's item pass (loss_inputs)
            calls["in_model"] += 1
        return real(self, item_ids, size)

    monkeypatch.setattr(content_module.ItemContent, "decode", decode)
    model.train()
    losses, carried = [], []
    for i, batch in enumerate(train):
        if i == n_batches:
            break
        carried.append(int(len(batch.image_ids)))
        batch = batch.to(model.log_pop.device)
        trainer.optimizer.zero_grad()
        loss = model.calculate_loss(batch)
        loss.backward()
        trainer.optimizer.step()
        losses.append(loss.item())
    monkeypatch.setattr(content_module.ItemContent, "decode", real)
    return losses, calls, content.store_reads_in_forward, carried


@pytest.mark.parametrize("loss", ["bce", "inbatch"])
def test_worker_decode_gives_the_same_training_and_no_store_read_in_forward(tiny_config, tiny_vit, monkeypatch, loss):
    """bce: the negatives are drawn in the collate step too (their images come with the batch)."""
    cfg = dict(tiny_config, **dict(MOREC, image_encoder=tiny_vit, loss=loss))
    losses0, calls0, in_forward0, carried0 = _train_losses(cfg, 0, monkeypatch)
    losses2, calls2, in_forward2, carried2 = _train_losses(cfg, 2, monkeypatch)
    assert len(losses0) == 3 and all(np.isfinite(losses0))
    assert losses2 == pytest.approx(losses0, rel=1e-6, abs=1e-7)
    assert carried0 == carried2 and min(carried0) > 1
    assert calls0["in_model"] == 0 and in_forward0 == 0  # worker 0: decoded in the collate step, not in the model
    assert calls0["here"] >= 3
    assert calls2["here"] == 0 and in_forward2 == 0  # worker 2: nothing decoded in this process at all


def test_without_attached_images_the_model_reads_the_store(tiny_config, tiny_vit):
    """A batch without pixels (a loader not wrapped) still trains: the tower reads the store, counted."""
    from recbole_mm.testing import build_run

    cfg = dict(tiny_config, **dict(MOREC, image_encoder=tiny_vit))
    config, dataset, train, valid, test, model, trainer = build_run("MoRec", "mm-tiny", cfg)
    batch = next(iter(train))
    assert not hasattr(batch, "image_ids")
    model.train()
    loss = model.calculate_loss(batch)
    assert torch.isfinite(loss) and model.content.store_reads_in_forward > 0


def test_item_image_batches_decode_in_workers(tiny_root):
    """The catalogue / extraction reader: batches in order, equal to a read in this process."""
    from recbole_mm.data.content import ItemContent, catalogue_tokens, item_image_batches

    folder = os.path.join(tiny_root, "mm-tiny")
    tokens = catalogue_tokens(folder, "mm-tiny")
    content = ItemContent(["[PAD]"] + tokens, folder, "mm-tiny", {"image_size": 32, "image_store_workers": 1})
    ids = torch.arange(len(tokens) + 1)
    want = content.decode(ids, 32)
    got_ids, got = zip(*item_image_batches(content, ids, 37, workers=2, size=32))
    assert torch.equal(torch.cat(got_ids), ids) and torch.equal(torch.cat(got), want)
    assert torch.all(want[0] == 128)  # padding: the placeholder


def test_negatives_drawn_in_the_collate_step_follow_the_rule():
    """Checked against plain loops: never an item of the example's window nor of the user's training items; every
    allowed item can be drawn; the same generator seed gives the same draw."""
    from recbole_mm.data.content import _batch_generator, sample_window_negatives

    n_items, rng = 30, np.random.default_rng(1)
    window = torch.as_tensor(rng.integers(0, n_items, size=(200, 6)))
    users = torch.as_tensor(rng.integers(0, 5, size=200))
    train = {(u, i) for u in range(5) for i in rng.choice(np.arange(1, n_items), size=8, replace=False).tolist()}
    keys = torch.as_tensor(sorted(u * n_items + i for u, i in train), dtype=torch.int64)
    neg = sample_window_negatives(window, n_items, 5, _batch_generator(7, [3, 1, 2]), users, keys)
    again = sample_window_negatives(window, n_items, 5, _batch_generator(7, [3, 1, 2]), users, keys)
    assert torch.equal(neg, again) and neg.shape == (200, 5)
    seen = set()
    for b in range(200):
        for v in neg[b].tolist():
            assert 1 <= v < n_items and v not in window[b].tolist() and (int(users[b]), v) not in train
            seen.add(v)
    allowed = set(range(1, n_items))
    assert len(seen) > 0.8 * len(allowed)
    other = sample_window_negatives(window, n_items, 5, _batch_generator(8, [3, 1, 2]), users, keys)
    assert not torch.equal(neg, other)


def test_a_run_decodes_every_image_in_workers(tiny_config, tiny_vit, monkeypatch):
    """Through the trainer (as run_recbole trains): with ``worker: 2`` neither the training batches nor the catalogue
    pass of evaluation decode an image in this process, and the item matrix equals one read in this process."""
    import recbole_mm.data.content as content_module
    from recbole_mm.testing import build_run

    cfg = dict(tiny_config, **dict(MOREC, image_encoder=tiny_vit, worker=2, item_matrix_batch_size=64))
    config, dataset, train, valid, test, model, trainer = build_run("MoRec", "mm-tiny", cfg)
    calls = []
    real = content_module.ItemContent.decode
    monkeypatch.setattr(content_module.ItemContent, "decode",
                        lambda self, ids, size=None: calls.append(len(ids)) or real(self, ids, size))
    trainer.fit(train, valid, saved=False)
    result = trainer.evaluate(test, load_best_model=False)
    assert calls == [] and model.content.store_reads_in_forward == 0
    assert set(result) and model.items_encoded_eval >= 2 * (model.n_items - 1)
    model.eval()
    from_workers = model.item_matrix()
    model.invalidate_item_matrix()
    model.decode_workers = 0  # decoded here, ahead of each chunk
    here = model.item_matrix()
    assert len(calls) > 0
    with torch.no_grad():  # and outside any batch: the tower reads the store itself
        direct = model.item_tower(torch.arange(1, model.n_items))
    assert torch.equal(from_workers, here)
    assert torch.allclose(from_workers[1:], direct, atol=1e-6)
