"""Feature files are checked against their sidecar's sha256 at load, the verdict is cached (also across processes),
fingerprints are recorded for checkpoints, and a missing / unknown ``text_fields`` is a clear error."""

import hashlib
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from recbole_mm.data import features as ff
from recbole_mm.data.content import ItemContent
from recbole_mm.extract import ExtractSpec, spec_from_config

TOKENS = [f"i{k}" for k in range(50)]
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(ff.__file__))))  # holds recbole_mm/


def _write(path, n_dim=8, seed=0):
    rows = np.random.default_rng(seed).normal(size=(len(TOKENS), n_dim)).astype(np.float32)
    ff.write_features(str(path), rows, TOKENS, modality="text", kind="pooled", encoder="enc-x", pooling="mean",
                      settings={"max_length": 16})
    return rows


def _age(path, seconds=3600):
    """Make the file look written an hour ago (a verdict is cached only for files older than RACY_SECONDS)."""
    t = time.time() - seconds
    os.utime(path, (t, t))


def _content(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir(exist_ok=True)
    (folder / "ds.item").write_text(
        "item_id:token\ttitle:token_seq\tgenres:token_seq\n" + "".join(f"{t}\ttitle {t}\tg\n" for t in TOKENS),
        encoding="utf-8")
    return ItemContent(["[PAD]"] + TOKENS[::-1], str(folder), "ds", {"text_fields": ["title"]})


@pytest.fixture
def count_hashing(monkeypatch):
    calls = []
    real = ff.file_sha256

    def counting(path, *args, **kwargs):
        calls.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(ff, "file_sha256", counting)
    return calls


# ------------------------------------------------------------------------------------------------ integrity
def test_permuted_rows_behind_the_sidecar_are_an_error(tmp_path):
    path = tmp_path / "f.npy"
    rows = _write(path)
    content = _content(tmp_path)
    np.save(path, rows[::-1].copy())  # same shape, dtype and size: only the sha256 can tell
    with pytest.raises(ff.FeatureFileError) as err:
        content.features(str(path))
    msg = str(err.value)
    assert str(path) in msg and "sha256" in msg
    assert "extract again" in msg and "Delete" in msg  # says what to do


def test_a_cached_verdict_does_not_hide_a_later_change(tmp_path, count_hashing):
    path = tmp_path / "f.npy"
    rows = _write(path)
    _age(path)
    content = _content(tmp_path)
    content.features(str(path))  # verified once, verdict cached
    assert os.path.isfile(ff.verified_path(str(path)))
    st = os.stat(path)
    np.save(path, rows[::-1].copy())
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # even with the old size and mtime restored
    assert os.stat(path).st_size == st.st_size and os.stat(path).st_mtime_ns == st.st_mtime_ns
    with pytest.raises(ff.FeatureFileError, match="does not match its sidecar"):
        _content(tmp_path).features(str(path))


def test_second_load_does_not_hash_again(tmp_path, count_hashing):
    path = tmp_path / "f.npy"
    _write(path)
    _age(path)
    count_hashing.clear()
    first = _content(tmp_path).features(str(path))
    assert len(count_hashing) == 1
    second = _content(tmp_path).features(str(path))  # a new ItemContent: no in-memory state helps
    assert len(count_hashing) == 1
    assert np.array_equal(first.numpy(), second.numpy())
    record = json.load(open(ff.verified_path(str(path))))
    assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_second_load_in_another_process_does_not_hash(tmp_path):
    path = tmp_path / "f.npy"
    _write(path)
    _age(path)
    _content(tmp_path).features(str(path))  # this process verifies
    code = (
        "import sys\n"
        "from recbole_mm.data import features as ff\n"
        "def no_hashing(*a, **k):\n"
        "    raise AssertionError('hashed again')\n"
        "ff.file_sha256 = no_hashing\n"
        f"arr, side = ff.open_features({str(path)!r}, verify_checksum='cached')\n"
        f"fp = ff.feature_fingerprint({str(path)!r})\n"
        "print(fp['sha256'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", "")))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_fresh_file_is_hashed_until_its_verdict_can_be_trusted(tmp_path, count_hashing):
    """A file modified less than RACY_SECONDS before its verification could change again within the same mtime
    tick unseen: its verdict is not cached (git's "racily clean" rule)."""
    path = tmp_path / "f.npy"
    _write(path)
    count_hashing.clear()
    _content(tmp_path).features(str(path))
    _content(tmp_path).features(str(path))
    assert len(count_hashing) == 2 and not os.path.exists(ff.verified_path(str(path)))


def test_fingerprints_of_loaded_files(tmp_path):
    path = tmp_path / "f.npy"
    _write(path)
    content = _content(tmp_path)
    content.features(str(path))
    fps = content.loaded_feature_fingerprints
    assert list(fps) == [os.path.abspath(str(path))]
    fp = fps[os.path.abspath(str(path))]
    side = ff.read_sidecar(str(path))
    assert fp["sha256"] == side["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert fp["shape"] == [len(TOKENS), 8] and fp["dtype"] == "float32"
    assert fp["encoder"] == "enc-x" and fp["modality"] == "text" and fp["kind"] == "pooled"
    assert fp["pooling"] == "mean" and fp["settings"] == {"max_length": 16}
    assert fp["tokens_sha256"] == hashlib.sha256("\n".join(TOKENS).encode()).hexdigest()
    assert json.loads(json.dumps(fp)) == fp  # goes into a checkpoint as is
    assert ff.feature_fingerprint(str(path)) == fp
    other = tmp_path / "g.npy"
    _write(other, seed=1)
    content.features(str(other))
    assert len(content.loaded_feature_fingerprints) == 2
    assert content.loaded_feature_fingerprints[os.path.abspath(str(other))]["sha256"] != fp["sha256"]


# ------------------------------------------------------------------------------------------------ text fields
def test_empty_text_fields_is_a_clear_error(tmp_path):
    content = _content(tmp_path)
    content.config = {"text_fields": []}
    with pytest.raises(ValueError) as err:
        content.text()
    msg = str(err.value)
    assert "text_fields" in msg and "set text_fields" in msg and "title" in msg and "genres" in msg
    with pytest.raises(ValueError, match="text_fields is empty"):
        content.tokenize(tokenizer=None, max_length=8, fields=[])
    with pytest.raises(ValueError, match="text_fields is empty.*set text_fields"):
        spec_from_config({"text_fields": []}, "text")
    with pytest.raises(ValueError, match="text_fields is empty"):
        ExtractSpec(modality="text", encoder="x", text_fields=[])
    ExtractSpec(modality="image", encoder="x", text_fields=[])  # images need no text


def test_unknown_text_field_names_the_columns(tmp_path):
    content = _content(tmp_path)
    with pytest.raises(ValueError) as err:
        content.text(["title", "plot"])
    msg = str(err.value)
    assert "text_fields" in msg and "'plot'" in msg and "['title', 'genres']" in msg
    assert content.text(["title", "genres"])[1] == f"title {TOKENS[-1]} g"
