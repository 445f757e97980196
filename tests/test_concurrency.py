"""Shared artefacts built by several processes at once, and builds killed with SIGKILL, then rerun.

Real processes (``subprocess``, started by tests/_procs.py): the workers import the package under test, wait at a
barrier (a "go" file) so that they start the build at the same moment, then build. Kills are either at a chosen
publication step (the worker SIGKILLs itself at its n-th ``os.replace``, before or after it runs, or in the middle
of writing a pickle) or at a random moment of the build (seed printed on failure; set RECBOLE_MM_TEST_SEED to
replay).

What every test checks: all workers succeed, one process builds, the result has the same bytes as an
uninterrupted build in this process, and nothing is left in the folder (temporary files, partial files, locks).
"""

import json
import os
import random
import shutil
import textwrap
import time

import numpy as np
import pytest

from tests._procs import (SEED, built_once, file_sha, read_tree, replay_hint, run_killed_after, run_killed_at,
                          run_together)

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "converters")


# ------------------------------------------------------------------------------------------------ image store
N_IMAGES = 240


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    from PIL import Image

    folder = tmp_path_factory.mktemp("images") / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    tokens = [f"{k:04d}" for k in range(N_IMAGES)]
    for tok in tokens:
        Image.fromarray(rng.integers(0, 255, size=(40, 36, 3), dtype=np.uint8)).save(folder / f"{tok}.png")
    (folder / "0003.png").write_bytes(b"broken")  # corrupt
    os.remove(folder / "0007.png")  # missing
    return str(folder), tokens


@pytest.fixture(scope="module")
def reference_store(image_folder, tmp_path_factory):
    """The store built in this process, uninterrupted, alone."""
    from recbole_mm.data.images import build_image_store

    image_dir, tokens = image_folder
    store = str(tmp_path_factory.mktemp("ref-store") / "32px")
    start = time.time()
    build_image_store(image_dir, store, 32, tokens, workers=1, progress=False)
    return store, time.time() - start


def _store_code(image_dir, store_dir, tokens, kill=""):
    return f"""
        import hashlib, json
        import numpy as np
        import recbole_mm.data.images as images
        images._CHUNK = 16  # many progress records: many points to be killed at
        {kill}
        barrier()
        store = images.ImageStore.open_or_build({image_dir!r}, {store_dir!r}, 32, {tokens!r}, workers=1, progress=False)
        print(json.dumps({{"pixels": hashlib.sha256(np.ascontiguousarray(store.pixels).tobytes()).hexdigest(),
                          "rows": store.rows_for({tokens!r}).tolist()}}))
    """


def _assert_same_store(store_dir, reference):
    assert sorted(os.listdir(store_dir)) == ["index.json", "pixels.npy"]  # no partial, progress or temporary file
    assert os.listdir(os.path.dirname(store_dir)) == [os.path.basename(store_dir)]  # no lock file
    for name in ("pixels.npy", "index.json"):
        assert file_sha(os.path.join(store_dir, name)) == file_sha(os.path.join(reference, name)), name


def test_four_processes_build_one_image_store(image_folder, reference_store, tmp_path):
    image_dir, tokens = image_folder
    store_dir = str(tmp_path / "store" / "32px")
    workers = run_together(_store_code(image_dir, store_dir, tokens), str(tmp_path), 4)
    rows = json.loads(built_once(workers, "item images are missing"))["rows"]
    assert rows[3] == 0 and rows[7] == 0 and rows[0] == 1  # corrupt and missing images use the placeholder
    _assert_same_store(store_dir, reference_store[0])


# n-th os.replace of a build of 240 images in chunks of 16: 1-15 progress records, 16 pixels, 17 index; and what
# the rerun must report.
REMOVED = "removed what an interrupted image store build left"
STORE_KILLS = {
    "before-first-progress": (1, False, REMOVED),  # partial rows without a record, a temporary record file
    "mid-build": (8, True, "resuming an interrupted build at image 128"),
    "before-pixels-rename": (16, False, "resuming an interrupted build at image 240"),
    "before-index-rename": (17, False, REMOVED),  # pixels published, temporary index and progress record left
    "after-index-rename": (17, True, "stale lock"),  # the store complete, only the lock file left behind
}


@pytest.mark.parametrize("case", list(STORE_KILLS))
def test_killed_image_store_build_resumes_to_the_same_bytes(image_folder, reference_store, tmp_path, caplog, case):
    from recbole_mm.data.images import ImageStore

    n, after, expected = STORE_KILLS[case]
    image_dir, tokens = image_folder
    store_dir = str(tmp_path / "store" / "32px")
    run_killed_at(_store_code(image_dir, store_dir, tokens, kill=f"kill_at_replace({n}, after={after})"),
                  str(tmp_path), "killed")
    with caplog.at_level("INFO"):
        ImageStore.open_or_build(image_dir, store_dir, 32, tokens, progress=False)
    assert "stale lock" in caplog.text  # the killed process held the lock
    assert expected in caplog.text
    _assert_same_store(store_dir, reference_store[0])


@pytest.mark.parametrize("k", range(2))
def test_image_store_killed_at_a_random_moment(image_folder, reference_store, tmp_path, k):
    from recbole_mm.data.images import ImageStore

    image_dir, tokens = image_folder
    rng = random.Random(SEED * 10 + k)
    delay = rng.uniform(0, 1.5 * reference_store[1])
    store_dir = str(tmp_path / "store" / "32px")
    run_killed_after(_store_code(image_dir, store_dir, tokens), str(tmp_path), "killed", delay)
    ImageStore.open_or_build(image_dir, store_dir, 32, tokens, progress=False)
    with replay_hint(delay):
        _assert_same_store(store_dir, reference_store[0])


# ------------------------------------------------------------------------------------------------ features
def _extract_code(folder, encoder, out, kill=""):
    return f"""
        from recbole_mm.extract import ExtractSpec, extract_features
        spec = ExtractSpec(modality="text", encoder={encoder!r}, pooling="mean", text_fields=["title", "genres"],
                           max_length=16)
        {kill}
        barrier()
        print(extract_features({folder!r}, "mm-tiny", spec, out_path={out!r}, batch_size=64, progress=False))
    """


@pytest.fixture(scope="module")
def reference_features(tiny_root, tiny_bert, tmp_path_factory):
    from recbole_mm.extract import ExtractSpec, catalogue_tokens, extract_features

    folder = os.path.join(tiny_root, "mm-tiny")
    spec = ExtractSpec(modality="text", encoder=tiny_bert, pooling="mean", text_fields=["title", "genres"],
                       max_length=16)
    out = str(tmp_path_factory.mktemp("ref-features") / "f.npy")
    start = time.time()
    extract_features(folder, "mm-tiny", spec, out_path=out, batch_size=64, progress=False)
    n_batches = -(-len(catalogue_tokens(folder, "mm-tiny")) // 64)
    return out, time.time() - start, n_batches, spec


def _assert_same_features(out, reference):
    from recbole_mm.data import features as ff

    assert sorted(os.listdir(os.path.dirname(out))) == ["f.json", "f.npy"]  # no partial, progress, temp, lock
    assert file_sha(out) == file_sha(reference)
    a, b = ff.read_sidecar(out), ff.read_sidecar(reference)
    assert {k: v for k, v in a.items() if k != "created"} == {k: v for k, v in b.items() if k != "created"}
    ff.open_features(out, verify_checksum=True)


def test_four_processes_extract_the_same_features_once(tiny_root, tiny_bert, reference_features, tmp_path):
    out = str(tmp_path / "feats" / "f.npy")
    workers = run_together(_extract_code(os.path.join(tiny_root, "mm-tiny"), tiny_bert, out), str(tmp_path), 4)
    for w in workers:
        assert w.proc.returncode == 0, w.stderr[-3000:]
        assert w.stdout.strip() == out
    assert sum(w.stderr.count(f"wrote {out}") for w in workers) == 1  # one extractor, the others waited
    _assert_same_features(out, reference_features[0])


# n-th os.replace of an extraction: 1..n_batches progress records, then the sidecar, then the rows.
FEATURE_KILLS = ("before-first-progress", "mid-extraction", "before-rows-rename")


@pytest.mark.parametrize("case", FEATURE_KILLS)
def test_killed_extraction_resumes_to_the_same_bytes(tiny_root, tiny_bert, reference_features, tmp_path, caplog,
                                                       case):
    from recbole_mm.extract import extract_features

    ref, _, n_batches, spec = reference_features
    folder = os.path.join(tiny_root, "mm-tiny")
    out = str(tmp_path / "feats" / "f.npy")
    n, after, expected = {
        "before-first-progress": (1, False, "removed what an interrupted feature extraction left"),
        "mid-extraction": (n_batches // 2, True, f"resuming extraction of {out} at row {n_batches // 2 * 64} "),
        "before-rows-rename": (n_batches + 2, False, f"resuming extraction of {out} at row "),  # sidecar written
    }[case]
    run_killed_at(_extract_code(folder, tiny_bert, out, kill=f"kill_at_replace({n}, after={after})"), str(tmp_path),
                  "killed")
    with caplog.at_level("INFO"):
        extract_features(folder, "mm-tiny", spec, out_path=out, batch_size=64, progress=False)
    assert "stale lock" in caplog.text
    assert expected in caplog.text
    _assert_same_features(out, ref)


def test_extraction_killed_at_a_random_moment(tiny_root, tiny_bert, reference_features, tmp_path):
    from recbole_mm.extract import extract_features

    ref, duration, _, spec = reference_features
    folder = os.path.join(tiny_root, "mm-tiny")
    out = str(tmp_path / "feats" / "f.npy")
    delay = random.Random(SEED).uniform(0, 1.5 * duration)
    run_killed_after(_extract_code(folder, tiny_bert, out), str(tmp_path), "killed", delay)
    extract_features(folder, "mm-tiny", spec, out_path=out, batch_size=64, progress=False)
    with replay_hint(delay):
        _assert_same_features(out, ref)


def test_stale_merge_lock_of_a_killed_merge_is_removed(tiny_root, reference_features, tmp_path, caplog):
    from recbole_mm.data import features as ff
    from recbole_mm.extract import extract_features

    ref, _, _, spec = reference_features
    folder = os.path.join(tiny_root, "mm-tiny")
    out = str(tmp_path / "f.npy")
    (tmp_path / "f.merge.lock").write_text("")  # what a merge killed by older code left
    extract_features(folder, "mm-tiny", spec, out_path=out, batch_size=64, shard=(0, 2), progress=False)
    with caplog.at_level("WARNING"):
        merged = extract_features(folder, "mm-tiny", spec, out_path=out, batch_size=64, shard=(1, 2), progress=False)
    assert merged == out
    assert "f.merge.lock" in caplog.text and "removed" in caplog.text
    assert sorted(os.listdir(tmp_path)) == ["f.json", "f.npy"]
    a, _ = ff.open_features(out, verify_checksum=True)
    assert np.allclose(a, np.load(ref), atol=1e-5)


# ------------------------------------------------------------------------------------------------ dataset cache
def _dataset_code(cfg, kill=""):
    return f"""
        from recbole_mm.config import Config
        from recbole_mm.data.utils import create_dataset
        config = Config(model="SASRec", dataset="mm-tiny", config_dict={cfg!r})
        {kill}
        barrier()
        dataset = create_dataset(config)
        print(dataset.inter_num, dataset.item_num, dataset.user_num)
    """


@pytest.fixture
def dataset_cfg(tiny_config, tmp_path):
    return dict(tiny_config, save_dataset=True, checkpoint_dir=str(tmp_path / "ckpt"))


def test_two_processes_share_one_saved_dataset(dataset_cfg, tmp_path):
    workers = run_together(_dataset_code(dataset_cfg), str(tmp_path), 2)
    built_once(workers, "Saving filtered dataset")
    assert sum(w.stderr.count("Load filtered dataset from") for w in workers) == 1  # the other waited, then loaded
    assert os.listdir(dataset_cfg["checkpoint_dir"]) == ["mm-tiny-MMSequentialDataset.pth"]  # no lock, no temp


def test_dataset_save_killed_mid_write_leaves_no_partial_file(dataset_cfg, tmp_path, caplog):
    from recbole_mm.config import Config
    from recbole_mm.data.utils import create_dataset

    half_write = """
        import pickle
        real_dumps = pickle.dumps
        def half_dump(obj, f, *args, **kwargs):  # die in the middle of writing the pickle
            data = real_dumps(obj, *args, **kwargs)
            f.write(data[: len(data) // 2])
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        pickle.dump = half_dump
    """
    run_killed_at(_dataset_code(dataset_cfg, kill=textwrap.indent(textwrap.dedent(half_write), " " * 8).strip()),
                  str(tmp_path), "killed")
    ckpt = dataset_cfg["checkpoint_dir"]
    assert "mm-tiny-MMSequentialDataset.pth" not in os.listdir(ckpt)  # never a partial pickle under the real name
    config = Config(model="SASRec", dataset="mm-tiny", config_dict=dataset_cfg)
    with caplog.at_level("INFO"):
        dataset = create_dataset(config)
    assert "stale lock" in caplog.text and "removed what an interrupted dataset save left" in caplog.text
    assert "Saving filtered dataset" in caplog.text
    assert os.listdir(ckpt) == ["mm-tiny-MMSequentialDataset.pth"]
    caplog.clear()
    with caplog.at_level("INFO"):
        again = create_dataset(Config(model="SASRec", dataset="mm-tiny", config_dict=dataset_cfg))
    assert "Load filtered dataset from" in caplog.text
    assert again.inter_num == dataset.inter_num and again.item_num == dataset.item_num


# ------------------------------------------------------------------------------------------------ converters
def _convert_code(out, extra=(), kill=""):
    argv = ["microlens", "--input", os.path.join(FIXTURES, "microlens50k"), "--output", out, "-q", *extra]
    return f"""
        import dataset_converters.output as output
        from dataset_converters.cli import main
        {kill}
        barrier()
        sys.exit(main({argv!r}))
    """


@pytest.fixture(scope="module")
def reference_conversion(tmp_path_factory):
    from dataset_converters.cli import main

    out = tmp_path_factory.mktemp("ref-convert")
    start = time.time()
    assert main(["microlens", "--input", os.path.join(FIXTURES, "microlens50k"), "--output", str(out), "-q"]) == 0
    return read_tree(str(out / "MicroLens-50k")), time.time() - start


KILL_AFTER_FIRST_FILE = """
        real_write_rows = output.write_rows
        def write_rows(*args, **kwargs):  # die once the first row file of the temporary folder is written
            real_write_rows(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)
        output.write_rows = write_rows
"""
CONVERT_KILLS = {
    "mid-build": ((), KILL_AFTER_FIRST_FILE.strip()),
    "before-rename": ((), "kill_at_replace(1)"),
    "overwrite-between-renames": (("--overwrite",), "kill_at_replace(1, after=True)"),  # old moved away, new not in
}


@pytest.mark.parametrize("case", list(CONVERT_KILLS))
def test_killed_conversion_rerun_gives_identical_output_and_no_tmp_folder(reference_conversion, tmp_path, caplog,
                                                                          case):
    from dataset_converters.cli import main

    out = str(tmp_path / "out")
    extra, kill = CONVERT_KILLS[case]
    if "--overwrite" in extra:
        assert main(["microlens", "--input", os.path.join(FIXTURES, "microlens50k"), "--output", out, "-q"]) == 0
    run_killed_at(_convert_code(out, extra, kill), str(tmp_path), "killed")
    assert any(e.startswith(".MicroLens-50k.") for e in os.listdir(out))  # the killed run left something
    with caplog.at_level("INFO"):
        assert main(["microlens", "--input", os.path.join(FIXTURES, "microlens50k"), "--output", out,
                     "--overwrite"]) == 0
    assert "removed what an interrupted conversion left" in caplog.text and "stale lock" in caplog.text
    assert os.listdir(out) == ["MicroLens-50k"]  # no .MicroLens-50k.tmp-* / .old-* folder, no lock
    tree = read_tree(os.path.join(out, "MicroLens-50k"))
    assert sorted(tree) == sorted(reference_conversion[0])
    assert all(tree[k] == reference_conversion[0][k] for k in tree)


def test_conversion_killed_at_a_random_moment(reference_conversion, tmp_path):
    from dataset_converters.cli import main

    out = str(tmp_path / "out")
    delay = random.Random(SEED).uniform(0, 1.5 * reference_conversion[1])
    run_killed_after(_convert_code(out), str(tmp_path), "killed", delay)
    assert main(["microlens", "--input", os.path.join(FIXTURES, "microlens50k"), "--output", out, "-q",
                 "--overwrite"]) == 0
    assert os.listdir(out) == ["MicroLens-50k"], f"seed {SEED}, kill after {delay:.3f}s"
    assert read_tree(os.path.join(out, "MicroLens-50k")) == reference_conversion[0], f"seed {SEED}, delay {delay:.3f}s"


def test_provenance_is_byte_identical_with_an_unreadable_cover(tmp_path):
    from dataset_converters.cli import main

    raw = tmp_path / "raw"
    shutil.copytree(os.path.join(FIXTURES, "microlens50k"), raw)
    (raw / "MicroLens-50k_covers" / "12.jpg").write_bytes(b"this is not an image")  # PIL cannot identify it
    for run in ("a", "b"):
        assert main(["microlens", "--input", str(raw), "--output", str(tmp_path / run), "-q"]) == 0
    a = (tmp_path / "a" / "MicroLens-50k" / "provenance.json").read_bytes()
    b = (tmp_path / "b" / "MicroLens-50k" / "provenance.json").read_bytes()
    assert a == b
    text = a.decode("utf-8")
    assert "0x" not in text and "BytesIO" not in text  # no object address in any message
    corrupt = json.loads(text)["issues"]["corrupt images (PIL cannot read them)"]
    assert corrupt["count"] == 2 and any("12.jpg" in e and "cannot identify image file '12.jpg'" in e
                                         for e in corrupt["examples"])


def test_finished_store_and_features_open_without_a_lock(image_folder, reference_store, reference_features, tiny_root,
                                                         monkeypatch):
    """Using a finished artefact takes no lock (so read-only dataset folders work, and readers never wait)."""
    import recbole_mm.data.images as images
    import recbole_mm.extract as extract

    def no_lock(*args, **kwargs):
        raise AssertionError("took a lock to read a finished artefact")

    monkeypatch.setattr(images, "BuildLock", no_lock)
    monkeypatch.setattr(extract, "BuildLock", no_lock)
    image_dir, tokens = image_folder
    store = images.ImageStore.open_or_build(image_dir, reference_store[0], 32, tokens, progress=False)
    assert store.pixels.shape == (len(tokens) + 1, 32, 32, 3)
    ref, _, _, spec = reference_features
    assert extract.extract_features(os.path.join(tiny_root, "mm-tiny"), "mm-tiny", spec, out_path=ref,
                                    progress=False) == ref


def test_atomic_files_get_the_permissions_of_a_plain_open(tmp_path):
    """Sidecars, progress files and indexes are written through temporary files: they must be readable by the
    other users of a shared dataset folder as the .npy files are (mkstemp alone gives 0600)."""
    from recbole_mm.atomic import atomic_pickle, atomic_write_json

    old = os.umask(0o022)
    try:
        atomic_write_json(str(tmp_path / "side.json"), {"a": 1})
        atomic_pickle(str(tmp_path / "data.pth"), [1, 2])
        with open(tmp_path / "plain.txt", "w") as f:
            f.write("x")
    finally:
        os.umask(old)
    modes = {name: os.stat(tmp_path / name).st_mode & 0o777 for name in ("side.json", "data.pth", "plain.txt")}
    assert modes == {"side.json": 0o644, "data.pth": 0o644, "plain.txt": 0o644}
