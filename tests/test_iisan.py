"""IISAN / IISANVersa (cached): by name through the entry points, the backbones never run, tap selection, errors."""

import pytest
import torch

import recbole_mm
from recbole_mm.testing import build_run

IISAN_TINY = {"embedding_size": 16, "n_layers": 1, "n_heads": 1, "MAX_ITEM_LIST_LENGTH": 10, "text_max_length": 16,
              "image_size": 32, "san_bottleneck": 8, "train_batch_size": 64, "epochs": 1}


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


def test_cnn_taps_are_a_clear_error(iisan_cfg):
    with pytest.raises(ValueError, match="different widths.*transformer"):
        build_run("IISAN", "mm-tiny", dict(iisan_cfg, image_encoder="test_efficientnet", image_pretrained=False))
