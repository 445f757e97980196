"""IISAN / IISANVersa (cached): by name through the entry points, the backbones never run, tap selection, errors."""

import pytest
import torch

import recbole_mm
from recbole_mm.testing import build_run

IISAN_TINY = {"embedding_size": 16, "n_layers": 1, "n_heads": 1, "MAX_ITEM_LIST_LENGTH": 10, "text_max_length": 16,
              "image_size": 32, "san_bottleneck": 8, "train_batch_size": 64, "epochs": 1,
              "image_taps": None}


@pytest.fixture
def iisan_cfg(tiny_config, tiny_bert, tiny_vit):
    return dict(tiny_config, **IISAN_TINY, text_encoder=tiny_bert, image_encoder=tiny_vit)


def test_iisan_runs_by_name_and_never_runs_a_backbone(iisan_cfg, monkeypatch):
    from recbole_mm.encoders import ImageEncoder, TextEncoder

    build_run("IISAN", "mm-tiny", iisan_cfg)  # extracts the tap caches once

    def refuse(*args, **kwargs):
        raise AssertionError("a backbone ran during cached training / evaluation")

    monkeypatch.setattr(TextEncoder, "forward", refuse)
    monkeypatch.setattr(ImageEncoder, "forward", refuse)
    result = recbole_mm.run_recbole(model="IISAN", dataset="mm-tiny", config_dict=iisan_cfg)
    assert 0.0 <= result["test_result"]["hit@10"] <= 1.0


def test_iisan_layerdrop_and_gradients(iisan_cfg):
    _, _, train, _, _, model, _ = build_run("IISAN", "mm-tiny", iisan_cfg)
    side = model.item_tower.side
    # tiny BERT and tiny ViT: 2 layers -> 3 hidden states each; LayerDrop keeps 0 and 2
    assert side.text_index.tolist() == [0, 2] and side.image_index.tolist() == [0, 2]
    model.train()
    model.calculate_loss(next(iter(train))).backward()
    assert all(p.grad is not None for p in side.parameters() if p.requires_grad)


def test_versa_pairs_unequal_encoders(iisan_cfg, tmp_path):
    from recbole_mm.testing import make_tiny_text_encoder

    llama = make_tiny_text_encoder(str(tmp_path / "llama"), "llama", hidden=48, layers=6)
    cfg = dict(iisan_cfg, text_encoder=llama)
    with pytest.raises(ValueError, match="IISANVersa"):
        build_run("IISAN", "mm-tiny", cfg)
    _, _, train, _, _, model, _ = build_run("IISANVersa", "mm-tiny", cfg)
    side = model.item_tower.side
    assert len(side.text_index) == 7 and len(side.image_index) == 3  # every cached tap, surplus first
    assert side.text_align is not None and side.image_align is None  # the wider text side is mapped down
    model.train()
    loss = model.calculate_loss(next(iter(train)))
    loss.backward()
    assert torch.isfinite(loss)
    group = build_run("IISANVersa", "mm-tiny", dict(cfg, tap_schedule="group"))[5].item_tower.side
    assert len(group.text_index) == len(group.image_index) == 3


@pytest.mark.parametrize("tap_pooling", ["cls", "mean"])
def test_cached_and_uncached_give_the_same_item_vectors(iisan_cfg, tap_pooling):
    """Same weights: the item vectors from a float32 tap cache equal those of the frozen encoders run live (text
    taps pooled by CLS, or by the original's mean over every position, padding included)."""
    cfg = dict(iisan_cfg, token_feature_dtype="float32", tap_pooling=tap_pooling, text_max_length=64)  # padded
    cached = build_run("IISAN", "mm-tiny", cfg)[5]
    _, _, train, _, _, live, _ = build_run("IISAN", "mm-tiny", dict(cfg, mode="uncached"))
    assert live.expensive_item_tower and not cached.expensive_item_tower
    assert set(live.state_dict()) - set(cached.state_dict()) == {
        k for k in live.state_dict() if ".encoder." in k}  # the only extra weights are the frozen backbones
    missing, unexpected = live.load_state_dict(cached.state_dict(), strict=False)
    assert not unexpected and all(".encoder." in k for k in missing)
    cached.eval(), live.eval()
    a, b = cached.item_matrix(), live.item_matrix()
    assert a.abs().max() > 0
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    # training the uncached model never changes (nor gives gradients to) a backbone, which stays in eval mode
    encoders = {k: v.clone() for k, v in live.state_dict().items() if ".encoder." in k}
    live.train()
    assert not live.item_tower.text_lookup.encoder.training and not live.item_tower.image_lookup.encoder.training
    opt = torch.optim.SGD([p for p in live.parameters() if p.requires_grad], lr=0.1)
    live.calculate_loss(next(iter(train))).backward()
    opt.step()
    assert all(p.grad is None for n, p in live.named_parameters() if ".encoder." in n)
    assert all(torch.equal(live.state_dict()[k], v) for k, v in encoders.items())
    assert any(p.grad is not None for p in live.item_tower.side.parameters())


def test_uncached_runs_by_name(iisan_cfg):
    result = recbole_mm.run_recbole(model="IISAN", dataset="mm-tiny", config_dict=dict(iisan_cfg, mode="uncached"))
    assert 0.0 <= result["test_result"]["ndcg@10"] <= 1.0
    eff = result["efficiency"]
    assert eff["trainable_params"] < eff["total_params"]  # the frozen backbones count, but do not train


def test_cnn_stage_taps(iisan_cfg):
    """EfficientNet taps: the stem output and each stage's output, mean-pooled, zero-padded to the widest stage in
    the cache; the model maps each to that width by a Linear that starts as the padding itself."""
    import timm

    from recbole_mm.encoders import ImageEncoder

    enc = ImageEncoder("test_efficientnet", image_size=32, pretrained=False, output="taps")
    net = enc.model
    x = torch.rand(3, 3, 32, 32)
    h = net.bn1(net.conv_stem(x))
    expected = [h.mean((2, 3))]
    for stage in net.blocks:
        h = stage(h)
        expected.append(h.mean((2, 3)))
    assert enc.tap_widths == [e.shape[1] for e in expected] and len(set(enc.tap_widths)) > 1
    with torch.no_grad():
        got = enc(x)
    assert got.shape == (3, len(expected), max(enc.tap_widths))
    for k, e in enumerate(expected):
        torch.testing.assert_close(got[:, k, : e.shape[1]], e)
        assert not got[:, k, e.shape[1]:].any()
    assert timm.is_model("test_efficientnet")

    cfg = dict(iisan_cfg, image_encoder="test_efficientnet", image_pretrained=False)
    _, _, train, _, _, model, _ = build_run("IISANVersa", "mm-tiny", cfg)
    side = model.item_tower.side
    widths = model.item_tower.image_lookup.sidecar["settings"]["tap_widths"]
    assert widths == enc.tap_widths  # recorded in the cache's sidecar
    assert side.image_stages is not None and side.image_stages.widths == widths
    taps = model.item_tower.image_lookup(torch.arange(1, 6))
    torch.testing.assert_close(side.image_stages(taps), taps)  # untrained: the zero padding itself
    model.train()
    model.calculate_loss(next(iter(train))).backward()
    assert all(lin.weight.grad is not None for lin in side.image_stages.proj)


@pytest.mark.parametrize("key", ["text_taps", "image_taps"])
def test_taps_beyond_the_encoder_depth(iisan_cfg, key):
    with pytest.raises(ValueError, match=f"out of range.*{key} take indices 0..2"):
        build_run("IISANVersa", "mm-tiny", dict(iisan_cfg, **{key: [0, 7]}))
    with pytest.raises(ValueError, match=f"{key} must be a list of hidden-state indices"):
        build_run("IISANVersa", "mm-tiny", dict(iisan_cfg, **{key: "all"}))


@pytest.mark.parametrize("field", ["encoder", "taps", "modality", "kind"])
def test_a_tap_cache_from_another_encoder_or_tap_list_is_refused(iisan_cfg, field):
    import json
    import os
    import re

    from recbole_mm.data.features import FeatureFileError, sidecar_path

    model = build_run("IISAN", "mm-tiny", iisan_cfg)[5]
    path = next(p for p in model._feature_fingerprints if os.path.basename(p).startswith("text-") and "-taps" in p)
    original = open(sidecar_path(path)).read()
    side = json.loads(original)
    if field == "encoder":
        side["encoder"] = "some/other-encoder"
    elif field == "taps":
        side["taps"] = [0, 2]  # all taps were requested
    else:
        side[field] = {"modality": "image", "kind": "tokens"}[field]
    try:  # the dataset folder is shared by the session's tests: restore the sidecar afterwards
        with open(sidecar_path(path), "w") as f:
            json.dump(side, f)
        with pytest.raises(FeatureFileError, match=rf"{re.escape(path)} was extracted with other settings.*delete it"):
            build_run("IISAN", "mm-tiny", iisan_cfg)
    finally:
        with open(sidecar_path(path), "w") as f:
            f.write(original)


def test_cli_run_versa_and_tune_iisan(iisan_cfg, tmp_path, tiny_root):
    from recbole_mm.cli import main as cli

    overrides = [f"{k}={v}" for k, v in iisan_cfg.items() if k not in ("data_path",)]
    assert cli(["run", "--model", "IISANVersa", "--dataset", "mm-tiny", f"data_path={tiny_root}"] + overrides) == 0
    out = tmp_path / "tune.md"
    assert cli(["tune", "--model", "IISAN", "--dataset", "mm-tiny", "--space", "san_bottleneck=choice([4, 8])",
                "-o", str(out), f"data_path={tiny_root}"] + overrides) == 0
    assert out.read_text().count("## san_bottleneck:") == 2


def test_cli_extract_taps_is_the_file_iisan_reads(tiny_root, iisan_cfg, capsys, tmp_path):
    """`recbole-mm extract --model IISAN --kind taps` (image taps of a CNN here) writes the float16 cache, with its
    stage widths, that IISANVersa then reads without extracting again."""
    import os

    import numpy as np

    from recbole_mm.cli import main as cli

    cfg = dict(iisan_cfg, image_encoder="test_efficientnet", image_pretrained=False, features_dir=str(tmp_path / "f"))
    keys = [f"{k}={cfg[k]}" for k in ("image_encoder", "image_pretrained", "image_size", "features_dir")]
    assert cli(["extract", "--model", "IISANVersa", "--dataset", "mm-tiny", "--data-path", tiny_root, "--modality",
                "image", "--kind", "taps", "--no-progress"] + keys) == 0
    path = capsys.readouterr().out.strip().splitlines()[-1]
    assert np.load(path, mmap_mode="r").dtype == np.float16
    before = os.path.getmtime(path)
    model = build_run("IISANVersa", "mm-tiny", cfg)[5]
    assert os.path.abspath(path) in model._feature_fingerprints and os.path.getmtime(path) == before
    assert model.item_tower.side.image_stages is not None


def test_recbole_own_run_recbole_and_plugin_objective_run_versa(iisan_cfg):
    import recbole.quick_start

    result = recbole.quick_start.run_recbole(model="IISANVersa", dataset="mm-tiny", config_dict=iisan_cfg)
    assert 0.0 <= result["test_result"]["hit@10"] <= 1.0
    res = recbole_mm.objective_function(config_dict=dict(iisan_cfg, model="IISANVersa", dataset="mm-tiny"))
    assert res["model"] == "IISANVersa" and res["efficiency"]["trainable_params"] > 0


def test_uncached_cnn_taps_equal_the_cached_ones(iisan_cfg, tmp_path):
    """The uncached path through a CNN (stage taps zero-padded, StageAlign) gives the cached path's item vectors."""
    import timm

    weights = str(tmp_path / "effnet.pth")
    torch.save(timm.create_model("test_efficientnet", pretrained=False).state_dict(), weights)
    cfg = dict(iisan_cfg, image_encoder="test_efficientnet", image_weights=weights, token_feature_dtype="float32",
               features_dir=str(tmp_path / "f"))
    cached = build_run("IISANVersa", "mm-tiny", cfg)[5]
    live = build_run("IISANVersa", "mm-tiny", dict(cfg, mode="uncached"))[5]
    assert live.item_tower.side.image_stages is not None
    live.load_state_dict(cached.state_dict(), strict=False)
    cached.eval(), live.eval()
    torch.testing.assert_close(live.item_matrix(), cached.item_matrix(), rtol=1e-4, atol=1e-5)
