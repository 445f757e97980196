"""MMSR: every fusion of the catalogue inside the model, token-level towers (two-stage token features and
end-to-end), the pooled shortcut against the token path, user encoders, errors."""

import os

import numpy as np
import pytest
import torch

from recbole_mm.layers.fusion import FUSIONS, TOKEN_FUSIONS, masked_mean
from recbole_mm.testing import build_run

MMSR_TINY = {
    "embedding_size": 16, "fusion_heads": 2, "n_layers": 1, "n_heads": 1, "MAX_ITEM_LIST_LENGTH": 10,
    "text_max_length": 16, "image_encoder": "test_vit", "image_pretrained": False, "image_size": 32,
    "train_batch_size": 64, "epochs": 1, "learning_rate": 0.005,
}


@pytest.fixture
def mmsr_cfg(tiny_config, tiny_bert):
    return dict(tiny_config, **MMSR_TINY, text_encoder=tiny_bert)


def one_batch(train):
    return next(iter(train))


def grads_of(module) -> float:
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


CATALOGUE = sorted(k for k in FUSIONS if k != "add")


@pytest.mark.parametrize("fusion", CATALOGUE)
def test_every_fusion_trains_and_ranks(mmsr_cfg, fusion):
    config, _, train, valid, _, model, _ = build_run("MMSR", "mm-tiny", dict(mmsr_cfg, fusion=fusion))
    towers = model.item_tower.towers
    assert all(getattr(t, "token_level", False) == (fusion in TOKEN_FUSIONS) for t in towers.values())
    model.train()
    loss = model.calculate_loss(one_batch(train))
    assert torch.isfinite(loss)
    loss.backward()
    assert grads_of(towers["text"]) > 0 and grads_of(towers["image"]) > 0  # both modalities learn
    assert grads_of(model.item_tower.fusion) > 0 or fusion == "add"
    model.eval()
    interaction = next(iter(valid))[0]
    with torch.no_grad():
        scores = model.full_sort_predict(interaction)
    assert scores.shape == (len(interaction), model.n_items) and torch.isfinite(scores).all()


def test_token_features_are_float16_memory_maps_with_the_tokenizer_mask(mmsr_cfg):
    _, dataset, train, _, _, model, _ = build_run("MMSR", "mm-tiny", dict(mmsr_cfg, fusion="merge_attn"))
    files = {os.path.basename(p): p for p in model._feature_fingerprints}
    text = next(p for n, p in files.items() if n.startswith("text-") and "tokens" in n)
    image = next(p for n, p in files.items() if n.startswith("image-") and "tokens" in n)
    arr = np.load(text, mmap_mode="r")
    assert arr.dtype == np.float16 and arr.shape[1:] == (16, 32)  # T = text_max_length, d = tiny BERT width
    img = np.load(image, mmap_mode="r")
    assert img.dtype == np.float16 and img.ndim == 3 and img.shape[1] > 1  # CLS + patches
    tower = model.item_tower.towers["text"]
    ids = torch.arange(1, 9)
    tokens, mask = tower(ids)
    # the mask is the tokenizer's: real tokens = the title's token count (+ [CLS] / [SEP])
    titles = dataset.item_content.text(["title", "genres"])
    from recbole_mm.encoders.text import load_tokenizer

    tok = load_tokenizer(mmsr_cfg["text_encoder"])
    want = [min(len(tok(titles[i].lower())["input_ids"]), 16) for i in ids.tolist()]
    assert mask.sum(1).tolist() == want
    assert tokens.shape == (8, max(want), 16)


def test_pooled_fusions_equal_the_token_path(mmsr_cfg, tiny_vit):
    """Two-stage pooled fusions read mean-pooled features through the Linear projection: the same vectors as
    projecting every token and taking the masked mean (the MMSR code), computed here from token features."""
    # saved encoders (a random timm model would get other weights in each extraction)
    cfg = dict(mmsr_cfg, fusion="gated", token_feature_dtype="float32", image_encoder=tiny_vit)
    _, dataset, _, _, _, pooled_model, _ = build_run("MMSR", "mm-tiny", cfg)
    assert not pooled_model.token_towers
    # the token features of the same encoders (float32 to compare exactly), through a token-level model
    _, _, _, _, _, token_model, _ = build_run("MMSR", "mm-tiny", dict(cfg, fusion="merge_attn"))
    ids = torch.arange(1, dataset.item_num)
    pooled_model.eval()
    for name in ("text", "image"):
        lookup_tower = token_model.item_tower.towers[name]
        raw = lookup_tower.lookup(ids)
        mask = lookup_tower.mask[ids]
        head = pooled_model.item_tower.towers[name].head  # Linear(d, D)
        expected = masked_mean(raw @ head.weight.T + head.bias, mask)
        got = pooled_model.item_tower.towers[name](ids)
        assert torch.allclose(got, expected, atol=1e-4), name


@pytest.mark.parametrize("seq_encoder", ["gru4rec", "nextitnet", "recbole"])
def test_user_encoders(mmsr_cfg, seq_encoder):
    _, _, train, _, _, model, _ = build_run("MMSR", "mm-tiny", dict(mmsr_cfg, fusion="sum", seq_encoder=seq_encoder))
    model.train()
    loss = model.calculate_loss(one_batch(train))
    loss.backward()
    assert torch.isfinite(loss) and grads_of(model.seq_encoder) > 0


def test_end_to_end_token_towers_with_lora(mmsr_cfg):
    cfg = dict(mmsr_cfg, fusion="co_att", mode="end2end", finetune="lora", lora_r=2, loss="inbatch")
    _, _, train, _, _, model, _ = build_run("MMSR", "mm-tiny", cfg)
    model.train()
    model.calculate_loss(one_batch(train)).backward()
    named = dict(model.named_parameters())
    lora = [n for n in named if "lora_" in n and n.startswith("item_tower.towers.text.")]
    base = [n for n in named if n.startswith("item_tower.towers.text.encoder.") and "lora_" not in n]
    assert lora and all(named[n].grad is not None for n in lora)  # adapters learn through the token tower
    assert all(not named[n].requires_grad for n in base)  # the encoder's own weights stay frozen


def test_end_to_end_token_towers_train_the_top_block(mmsr_cfg):
    cfg = dict(mmsr_cfg, fusion="merge_attn", mode="end2end", finetune="top_k", finetune_top_k=1,
               image_encoder="test_vit", modality="text+image", loss="inbatch")
    _, _, train, _, _, model, _ = build_run("MMSR", "mm-tiny", cfg)
    text = model.item_tower.towers["text"]
    assert text.token_level and text.encoder.output == "tokens"
    model.train()
    model.calculate_loss(one_batch(train)).backward()
    layers = text.encoder.model.encoder.layer
    assert grads_of(layers[-1]) > 0
    assert all(p.grad is None for p in layers[0].parameters())  # frozen below the top block
    assert grads_of(model.item_tower.towers["image"].head) > 0


def test_items_encoded_once_per_evaluation(mmsr_cfg):
    _, _, _, valid, _, model, trainer = build_run("MMSR", "mm-tiny", dict(mmsr_cfg, fusion="co_att"))
    trainer.evaluate(valid, load_best_model=False)
    assert model.items_encoded_eval == model.n_items
    trainer.evaluate(valid, load_best_model=False)
    assert model.items_encoded_eval == 2 * model.n_items


def test_errors_name_the_keys(mmsr_cfg, tiny_config, tiny_bert):
    with pytest.raises(ValueError, match="unknown fusion 'merge'.*merge_attn"):
        build_run("MMSR", "mm-tiny", dict(mmsr_cfg, fusion="merge"))
    with pytest.raises(ValueError, match="modality"):
        build_run("MMSR", "mm-tiny", dict(mmsr_cfg, modality="audio"))
    with pytest.raises(ValueError, match="seq_encoder"):
        build_run("MMSR", "mm-tiny", dict(mmsr_cfg, seq_encoder="lstm"))
    # a token-level fusion asked of MoRec's pooled towers
    morec = dict(tiny_config, embedding_size=16, text_encoder=tiny_bert, modality="text+image",
                 image_encoder="test_vit", image_pretrained=False, image_size=32, fusion="co_att")
    with pytest.raises(ValueError, match="fusion 'co_att' is token-level.*MoRec"):
        build_run("MoRec", "mm-tiny", morec)


def test_single_modality_is_the_mean_of_projected_tokens(mmsr_cfg):
    _, dataset, _, _, _, model, _ = build_run("MMSR", "mm-tiny", dict(mmsr_cfg, modality="text", mode="end2end",
                                                                      finetune="frozen"))
    ids = torch.arange(1, 6)
    model.eval()
    tokens, mask = model.item_tower.towers["text"](ids)
    assert torch.allclose(model.item_tower(ids), masked_mean(tokens, mask), atol=1e-6)


def test_cli_extract_kind_tokens_is_the_file_the_model_reads(tiny_root, tiny_bert, mmsr_cfg, capsys):
    """`recbole-mm extract --model MMSR --kind tokens` writes the float16 token file MMSR then reads (no second
    extraction), whatever the model's own keys are."""
    from recbole_mm.cli import main as cli

    args = ["extract", "--model", "MMSR", "--dataset", "mm-tiny", "--data-path", tiny_root, "--modality", "text",
            "--kind", "tokens", "--no-progress", f"text_encoder={tiny_bert}", "text_max_length=16"]
    assert cli(args) == 0
    path = capsys.readouterr().out.strip().splitlines()[-1]
    assert np.load(path, mmap_mode="r").dtype == np.float16
    before = os.path.getmtime(path)
    _, _, _, _, _, model, _ = build_run("MMSR", "mm-tiny", dict(mmsr_cfg, fusion="merge_attn"))
    assert os.path.abspath(path) in model._feature_fingerprints and os.path.getmtime(path) == before
    with pytest.raises(SystemExit, match="contradicts"):
        cli(args[:-2] + ["--taps", "all"])
