"""Tiny random encoders and datasets for smoke tests (no downloads; seconds to build).

``make_tiny_text_encoder(folder, arch)`` writes a transformers folder (random weights built from a config,
with the offline all-MiniLM-L6-v2 tokenizer) that any ``text_encoder`` / ``image_encoder`` key accepts;
``make_tiny_image_encoder`` does the same for vision towers. ``make_subset_dataset`` writes a small copy of a
dataset folder (the first N users) for fast end-to-end runs.
"""

from __future__ import annotations

import os
import shutil

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def _copy_tokenizer(folder: str) -> int:
    from recbole_mm.encoders.hub import resolve_hf_path

    src = resolve_hf_path("all-MiniLM-L6-v2")
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), os.path.join(folder, name))
    with open(os.path.join(src, "vocab.txt"), encoding="utf-8") as f:
        return sum(1 for _ in f)


def make_tiny_text_encoder(folder: str, arch: str = "bert", hidden: int = 32, layers: int = 2, seed: int = 0) -> str:
    """A random text model folder: ``arch`` in bert | clip | llama."""
    import torch

    os.makedirs(folder, exist_ok=True)
    vocab = _copy_tokenizer(folder)
    torch.manual_seed(seed)
    if arch == "bert":
        from transformers import BertConfig, BertModel

        model = BertModel(BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                                     num_attention_heads=2, intermediate_size=2 * hidden, max_position_embeddings=128))
    elif arch == "clip":
        from transformers import CLIPConfig, CLIPModel

        text = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                    intermediate_size=2 * hidden, max_position_embeddings=128, bos_token_id=101, eos_token_id=102,
                    pad_token_id=0)
        vision = dict(image_size=32, patch_size=8, hidden_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=2, intermediate_size=2 * hidden)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    elif arch == "llama":
        from transformers import LlamaConfig, LlamaModel

        model = LlamaModel(LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                                       num_attention_heads=2, num_key_value_heads=1, intermediate_size=2 * hidden,
                                       max_position_embeddings=128, pad_token_id=0))
    else:
        raise ValueError(f"arch must be bert, clip or llama, got {arch!r}")
    model.save_pretrained(folder)
    return folder


def make_tiny_image_encoder(folder: str, arch: str = "vit", image_size: int = 32, hidden: int = 32, layers: int = 2,
                            seed: int = 0) -> str:
    """A random vision model folder: ``arch`` in vit | clip."""
    import torch

    os.makedirs(folder, exist_ok=True)
    torch.manual_seed(seed)
    if arch == "vit":
        from transformers import ViTConfig, ViTModel

        model = ViTModel(ViTConfig(image_size=image_size, patch_size=8, hidden_size=hidden, num_hidden_layers=layers,
                                   num_attention_heads=2, intermediate_size=2 * hidden))
    elif arch == "clip":
        return make_tiny_text_encoder(folder, "clip", hidden=hidden, layers=layers, seed=seed)
    else:
        raise ValueError(f"arch must be vit or clip, got {arch!r}")
    model.save_pretrained(folder)
    return folder


def make_subset_dataset(src_dir: str, src_name: str, out_root: str, name: str, n_users: int = 60) -> str:
    """Copy a dataset folder keeping the interactions of its first ``n_users`` users (file order)."""
    out = os.path.join(out_root, name)
    os.makedirs(out, exist_ok=True)
    users: list = []
    kept_items: set = set()
    with open(os.path.join(src_dir, f"{src_name}.inter"), encoding="utf-8") as f, open(
        os.path.join(out, f"{name}.inter"), "w", encoding="utf-8", newline="\n"
    ) as g:
        header = f.readline()
        g.write(header)
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if parts[0] not in users:
                if len(users) >= n_users:
                    continue
                users.append(parts[0])
            kept_items.add(parts[1])
            g.write(line)
    for suffix in ("item", "user"):
        src = os.path.join(src_dir, f"{src_name}.{suffix}")
        if not os.path.isfile(src):
            continue
        keep = kept_items if suffix == "item" else set(users)
        with open(src, encoding="utf-8") as f, open(os.path.join(out, f"{name}.{suffix}"), "w", encoding="utf-8", newline="\n") as g:
            g.write(f.readline())
            for line in f:
                if line.split("\t", 1)[0] in keep:
                    g.write(line)
    src_images = os.path.join(src_dir, "images")
    if os.path.isdir(src_images):
        os.makedirs(os.path.join(out, "images"), exist_ok=True)
        for entry in os.listdir(src_images):
            if os.path.splitext(entry)[0] in kept_items:
                shutil.copy(os.path.join(src_images, entry), os.path.join(out, "images", entry))
    return out


def build_run(model, dataset: str, config_dict: dict, log: bool = False):
    """What ``run_recbole`` builds, without training: ``(config, dataset, train, valid, test, model, trainer)``
    (``log``: also RecBole's logger, as ``run_recbole`` sets it up)."""
    from recbole.utils import init_logger, init_seed

    from recbole_mm.config import Config
    from recbole_mm.data.utils import create_dataset, data_preparation
    from recbole_mm.registry import model_class_of
    from recbole_mm.trainer.utils import get_trainer

    config = Config(model=model, dataset=dataset, config_dict=config_dict)
    init_seed(config["seed"], config["reproducibility"])
    if log:
        init_logger(config)
    data = create_dataset(config)
    train, valid, test = data_preparation(config, data)
    init_seed(config["seed"], config["reproducibility"])
    net = model_class_of(config)(config, train._dataset)
    trainer = get_trainer(config["MODEL_TYPE"], model_class_of(config))(config, net)
    return config, data, train, valid, test, net, trainer
