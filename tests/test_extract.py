"""Feature extraction: sidecar provenance, resume gives identical bytes, shards merge, CLI, settings checks."""

import hashlib
import json
import os

import numpy as np
import pytest

from recbole_mm.cli import main as cli
from recbole_mm.data import features as ff
from recbole_mm.extract import ExtractSpec, catalogue_tokens, extract_features, get_or_extract


def _sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture
def spec(tiny_bert):
    return ExtractSpec(modality="text", encoder=tiny_bert, pooling="mean", text_fields=["title", "genres"], max_length=16)


def test_sidecar_and_rows(tiny_root, spec, tmp_path):
    folder = os.path.join(tiny_root, "mm-tiny")
    path = extract_features(folder, "mm-tiny", spec, out_path=str(tmp_path / "f.npy"), batch_size=32, progress=False)
    array, side = ff.open_features(path, verify_checksum=True)
    tokens = catalogue_tokens(folder, "mm-tiny")
    assert side["tokens"] == tokens and array.shape == (len(tokens), 32)
    assert side["modality"] == "text" and side["kind"] == "pooled" and side["pooling"] == "mean"
    assert side["encoder"] == spec.encoder and side["settings"]["max_length"] == 16
    assert side["settings"]["text_fields"] == ["title", "genres"]
    # a row equals encoding that item alone (rows are keyed by token, batches do not leak into each other)
    from recbole_mm.extract import _Inputs, build_encoder

    enc = build_encoder(spec).eval()
    inputs = _Inputs(spec, enc, folder, "mm-tiny", tokens, None)
    import torch

    with torch.no_grad():
        one = enc(*inputs.batch(5, 6)).numpy()
    assert np.allclose(array[5], one[0], atol=1e-5)


def test_interrupted_extraction_resumes_byte_identical(tiny_root, spec, tmp_path):
    folder = os.path.join(tiny_root, "mm-tiny")
    ref = extract_features(folder, "mm-tiny", spec, out_path=str(tmp_path / "ref.npy"), batch_size=16, progress=False)
    out = str(tmp_path / "resumed.npy")
    with pytest.raises(KeyboardInterrupt):
        extract_features(folder, "mm-tiny", spec, out_path=out, batch_size=16, progress=False, _stop_after_batches=3)
    assert not os.path.exists(out) and os.path.exists(str(tmp_path / "resumed.partial.npy"))
    progress = json.load(open(tmp_path / "resumed.progress.json"))
    assert progress["done"] == 48
    extract_features(folder, "mm-tiny", spec, out_path=out, batch_size=16, progress=False)
    assert _sha(out) == _sha(ref)
    assert not os.path.exists(str(tmp_path / "resumed.partial.npy"))


def test_shards_merge_into_one_file(tiny_root, spec, tmp_path):
    folder = os.path.join(tiny_root, "mm-tiny")
    ref = extract_features(folder, "mm-tiny", spec, out_path=str(tmp_path / "ref.npy"), batch_size=16, progress=False)
    out = str(tmp_path / "sharded.npy")
    first = extract_features(folder, "mm-tiny", spec, out_path=out, batch_size=16, shard=(1, 3), progress=False)
    assert first.endswith("sharded.shard-1-of-3.npy") and not os.path.exists(out)
    extract_features(folder, "mm-tiny", spec, out_path=out, batch_size=16, shard=(0, 3), progress=False)
    merged = extract_features(folder, "mm-tiny", spec, out_path=out, batch_size=16, shard=(2, 3), progress=False)
    assert merged == out
    a, side_a = ff.open_features(ref)
    b, side_b = ff.open_features(out, verify_checksum=True)
    assert side_a["tokens"] == side_b["tokens"]
    assert np.allclose(a, b, atol=1e-5)
    listed = sorted(f for f in os.listdir(tmp_path) if not f.endswith(".verified.json"))  # checksum verdicts
    assert listed == ["ref.json", "ref.npy", "sharded.json", "sharded.npy"]


def test_cli_extract_image_taps_and_tokens(tiny_root, capsys):
    args = ["extract", "--dataset", "mm-tiny", "--data-path", tiny_root, "--modality", "image", "--encoder", "test_vit",
            "--image-size", "32", "--pooling", "cls", "--taps", "0,2", "--batch-size", "64", "--no-progress",
            "image_pretrained=false"]
    assert cli(args) == 0
    path = capsys.readouterr().out.strip().splitlines()[-1]
    array, side = ff.open_features(path)
    assert path.endswith(os.path.join("features", "test_vit", "image-cls-taps0_2-32px-random-float16.npy"))
    assert array.shape[1:] == (2, 64) and side["kind"] == "taps" and side["taps"] == [0, 2]
    assert cli(args[:-2] + ["--tokens", "--no-progress", "image_pretrained=false"]) == 0
    path = capsys.readouterr().out.strip().splitlines()[-1]
    array, side = ff.open_features(path)
    assert side["kind"] == "tokens" and array.shape[1:] == (5, 64)  # CLS + 2x2 patches of 16px


def test_get_or_extract_reuses_and_checks_settings(tiny_root, spec, tmp_path):
    folder = os.path.join(tiny_root, "mm-tiny")
    config = {"features_dir": str(tmp_path / "feats")}
    path = get_or_extract(config, folder, "mm-tiny", spec, progress=False)
    assert path.endswith("text-mean-len16-title_genres.npy")
    assert get_or_extract(config, folder, "mm-tiny", spec, progress=False) == path  # reused
    other = ExtractSpec(**{**spec.__dict__, "max_length": 8, "lowercase": True})
    other_path = get_or_extract(config, folder, "mm-tiny", other, progress=False)
    assert other_path.endswith("text-mean-len8-title_genres-lower.npy") and os.path.exists(path)  # both kept
    side = json.load(open(ff.sidecar_path(path)))
    side["settings"]["max_length"] = 64  # a file whose sidecar disagrees with its name
    ff.write_sidecar(path, side)
    with pytest.raises(ff.FeatureFileError, match="other settings.*max_length"):
        get_or_extract(config, folder, "mm-tiny", spec, progress=False)


def test_text_token_states_and_empty_shards(tiny_root, spec, tmp_path):
    folder = os.path.join(tiny_root, "mm-tiny")
    tokens_spec = ExtractSpec(**{**spec.__dict__, "kind": "tokens"})
    path = extract_features(folder, "mm-tiny", tokens_spec, out_path=str(tmp_path / "t.npy"), batch_size=40, progress=False)
    array, side = ff.open_features(path)
    assert array.shape[1:] == (16, 32) and side["kind"] == "tokens"
    small = tmp_path / "small"  # a 3-item dataset: more shards than items, cheaply
    small.mkdir()
    (small / "small.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\n"
                                       + "".join(f"u1\ti{k}\t{k}\n" for k in range(3)), encoding="utf-8")
    (small / "small.item").write_text("item_id:token\ttitle:token_seq\tgenres:token_seq\n"
                                      + "".join(f"i{k}\ttitle {k}\tDrama\n" for k in range(3)), encoding="utf-8")
    n = 3
    out = str(tmp_path / "many.npy")
    for i in range(n + 2):  # more shards than items: some are empty
        merged = extract_features(str(small), "small", spec, out_path=out, batch_size=8, shard=(i, n + 2), progress=False)
    assert merged == out
    a, side = ff.open_features(out)
    assert side["tokens"] == ["i0", "i1", "i2"]
    ref, _ = ff.open_features(extract_features(str(small), "small", spec, out_path=str(tmp_path / "r.npy"), progress=False))
    assert a.shape == ref.shape and np.allclose(a, ref, atol=1e-5)


def test_resume_keeps_the_interrupted_batch_size(tiny_root, spec, tmp_path):
    folder = os.path.join(tiny_root, "mm-tiny")
    ref = extract_features(folder, "mm-tiny", spec, out_path=str(tmp_path / "ref.npy"), batch_size=16, progress=False)
    out = str(tmp_path / "x.npy")
    with pytest.raises(KeyboardInterrupt):
        extract_features(folder, "mm-tiny", spec, out_path=out, batch_size=16, progress=False, _stop_after_batches=2)
    extract_features(folder, "mm-tiny", spec, out_path=out, batch_size=64, progress=False)
    assert _sha(out) == _sha(ref)


def test_float16_overflow_is_an_error_not_inf(tiny_root, spec, tmp_path, monkeypatch):
    """Large activations (LLM hidden states) stored as float16 would become inf: the extraction stops and asks for
    float32 instead."""
    import recbole_mm.extract as ex

    real = ex.build_encoder

    def loud_encoder(s):
        enc = real(s)
        forward = enc.forward
        enc.forward = lambda *a, **k: forward(*a, **k) * 1e6
        return enc

    monkeypatch.setattr(ex, "build_encoder", loud_encoder)
    folder = os.path.join(tiny_root, "mm-tiny")
    half = ExtractSpec(**{**spec.__dict__, "kind": "tokens", "dtype": "float16"})
    with pytest.raises(ff.FeatureFileError, match="beyond float16's range.*float32"):
        extract_features(folder, "mm-tiny", half, out_path=str(tmp_path / "t16.npy"), progress=False)
    full = ExtractSpec(**{**spec.__dict__, "kind": "tokens", "dtype": "float32"})
    path = extract_features(folder, "mm-tiny", full, out_path=str(tmp_path / "t32.npy"), progress=False)
    assert np.isfinite(np.load(path)).all()


@pytest.mark.parametrize("arch, default", [("bert", "cls"), ("llama", "mean")])
def test_text_tap_pooling_default_and_values(tiny_root, tmp_path, arch, default, capsys):
    """Text taps pool each hidden state as the original IISAN does by default (CLS for BERT-like encoders, a mean
    over every position up to the fixed length, padding included, for decoder LLMs); each tap_pooling value is
    checked against the hidden states computed here."""
    import torch

    from recbole_mm.data.content import ItemContent
    from recbole_mm.encoders.text import TextEncoder, default_tap_pooling
    from recbole_mm.testing import make_tiny_text_encoder

    enc_dir = make_tiny_text_encoder(str(tmp_path / arch), arch)
    assert default_tap_pooling(enc_dir) == default
    folder = os.path.join(tiny_root, "mm-tiny")
    base = ["extract", "--dataset", "mm-tiny", "--data-path", tiny_root, "--modality", "text", "--encoder", enc_dir,
            "--taps", "0,2", "--max-length", "40", "--text-fields", "title", "--no-progress", "--dtype", "float32"]
    tokens = catalogue_tokens(folder, "mm-tiny")[:5]
    content = ItemContent(["[PAD]"] + tokens, folder, "mm-tiny", {"text_fields": ["title"]})
    model = TextEncoder(enc_dir, output="taps").eval()
    ids, mask = content.tokenize(model.tokenizer, 40, ["title"])  # longer than any title: padding in every row
    with torch.no_grad():
        states = model.model(input_ids=ids[1:], attention_mask=mask[1:], output_hidden_states=True).hidden_states
    m = mask[1:].unsqueeze(-1).float()
    expected = {
        "cls": [states[t][:, 0] for t in (0, 2)],
        "mean": [states[t].mean(1) for t in (0, 2)],  # padding positions included
        "masked_mean": [(states[t] * m).sum(1) / m.sum(1) for t in (0, 2)],
    }
    for pooling, want in [(None, expected[default])] + [(p, expected[p]) for p in expected]:
        assert cli(base + ([] if pooling is None else ["--tap-pooling", pooling])) == 0
        path = capsys.readouterr().out.strip().splitlines()[-1]
        assert f"tp{pooling or default}" in os.path.basename(path)
        array, side = ff.open_features(path)
        rows = [side["tokens"].index(t) for t in tokens]
        got = torch.from_numpy(np.asarray(array[rows]))
        assert torch.allclose(got, torch.stack(want, 1), atol=1e-5), pooling
