"""IISAN / IISAN-Versa side networks on cached per-layer taps (specs/models.md §5a, §5b).

Reference: Junchen Fu, Xuri Ge, Xin Xin, Alexandros Karatzoglou, Ioannis Arapakis, Jie Wang, Joemon M. Jose.
    "IISAN: Efficiently Adapting Multimodal Representation for Sequential Recommendation with Decoupled PEFT."
    SIGIR 2024; and IISAN-Versa (asymmetric encoders, draft code).
Reference: https://github.com/GAIR-Lab/IISAN (``Code_Cached/model/model.py`` ``IISANAdaptedMModel``,
    ``Code_Cached/model/modules.py`` ``AdapterBlock``, ``Code_Cached_Asym/model/model.py`` for Versa,
    ``Code_Cached_Asym/script/run_IISAN*.py`` for the tap lists).

A *tap* is one pooled vector per backbone hidden state (index 0 = embedding output, ``i`` = output of layer
``i - 1``). Caches are ``[n_items, n_taps, d]`` per modality; the side network works on vectors, not tokens,
and nothing flows back into the (frozen, never run) backbones.

Pieces:

- ``SANB``: ``x + W_up act(W_down x)``; weights N(0, 0.01), biases 0; ReLU (GELU option).
- ``SideGate``: ``g = sigmoid(gamma / T)``, ``gamma`` a learned scalar initialised to 0 (g = 0.5), T = 0.1;
  ``gate(a, b) = g a + (1 - g) b``.
- ``IntraSAN``: ``s_0 = 0``, ``s_k = SANB_k(g_k h_k + (1 - g_k) s_{k-1})`` over the selected taps of one modality.
- ``InterSAN``: ``m_0 = 0``, ``m_k = SANB_k(m_{k-1} + g_k h^img_k + (1 - g_k) h^txt_k)`` on the raw taps of both
  modalities (not the intra outputs). ``fusion="add"`` replaces every gate by a plain sum.
- ``DimensionAlign`` (Versa's DTL): one Linear per lock-step tap from the wider width to the narrower one,
  applied to the wider modality's taps before the inter SAN (which runs at the narrower width).
- ``StageAlign`` (ours, for CNN image encoders): a CNN's stage outputs differ in width; the cache holds them
  zero-padded to the widest, and one Linear per tap (initialised to that padding) maps them to one width.
- Tap selection: ``layerdrop_taps`` (IISAN's LayerDrop), ``group_layer_drop`` (Versa: the same number of taps on
  both sides), ``surplus_schedule`` (Versa: the deeper side's surplus taps first, intra only, then lock-step).
- ``IISANSideNetwork``: the whole thing, ``(text_taps [n, Tt, dt], image_taps [n, Ti, di]) -> [n, d_out]``.
  Heads: ``e_img``, ``e_txt``, ``e_mm`` (two Linears each, no activation), then
  ``com_dense = Linear(3 d_out -> d_out)([e_img; e_txt; e_mm])``.

NOTE: deviations from the original code:

- The SANB dropout is neither built nor applied (the original builds it and never applies it).
- ``s_0 = 0`` always: the original's ``remove_first=TRUE`` variant (``s_0`` = embedding output, no embedding
  tap) is not offered; ``include_embedding=False`` in the tap selectors drops the embedding tap only.
- Heads, DTL and ``com_dense`` keep PyTorch's default Linear init, as the original's plain ``nn.Linear``; the
  symmetric original re-initialises its image projection (the ViT ``classifier``) Xavier-normal, not done here.
- Intra heads: ``intra_head="auto"`` follows each original: ``FC(w -> w) -> Linear(w -> D)`` (Code_Cached) when
  both widths are equal, ``Linear(w -> D) -> Linear(D -> D)`` (Code_Cached_Asym) otherwise.
- The group layer-drop rule is inferred from the released tap lists (the draft code takes explicit lists): keep
  ``n`` layers spaced ``(L - 1) // (n - 1)`` apart, ending at the last layer. It reproduces "1,3,..,11" (ViT, 12),
  "4,19,34,49,64,79" (LLaMA-70B, 80), "2,11,20,29,38,47" (EVA-CLIP-18B, 48), "1,7,..,31" (32) and "2,7,..,27" (28).
- Taps are cast to the parameters' dtype on entry (the original casts the fp16 LLM cache to fp32 before DTL).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU}
FUSIONS = ("gated", "add")
MODALITIES = ("intra_inter", "intra", "inter")
SCHEDULES = ("surplus", "group")
INTRA_HEADS = ("auto", "wide", "narrow")


def _choice(name: str, value: str, allowed) -> str:
    value = str(value).lower()
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")
    return value


# ----------------------------------------------------------------------------------------------- tap selection
def _spread(n_layers: int, n_keep: int) -> list:
    """``n_keep`` of ``n_layers`` 0-based layers, spaced ``(L - 1) // (n - 1)`` apart, ending at the last layer."""
    if n_keep < 1 or n_keep > n_layers:
        raise ValueError(f"cannot keep {n_keep} of {n_layers} layers (1 <= keep <= {n_layers})")
    if n_keep == 1:
        return [n_layers - 1]
    step = (n_layers - 1) // (n_keep - 1)
    first = (n_layers - 1) - step * (n_keep - 1)
    return [first + step * j for j in range(n_keep)]


def layerdrop_taps(n_states: int, keep=None, include_embedding: bool = True) -> list:
    """IISAN's LayerDrop: the hidden-state (tap) indices that feed the side network.

    Args:
        n_states (int): hidden states of the encoder, embedding output included (13 for BERT-base / ViT-base).
        keep: which transformer layers to keep. ``None``: every other layer counting back from the last
            (IISAN's default "1,3,5,7,9,11" for 12 layers); a sequence: explicit 0-based layer indices (the
            original's ``side_adapter_*_list``); an int ``n``: ``n`` layers spaced as in Versa's group drop.
        include_embedding (bool): prepend tap 0, the embedding output (the original unless ``remove_first``).

    Returns:
        list[int]: sorted tap indices; layer ``l`` is tap ``l + 1``.
    """
    n_layers = int(n_states) - 1
    if n_layers < 1:
        raise ValueError(f"an encoder needs at least 2 hidden states (embedding + 1 layer), got {n_states}")
    if keep is None:
        layers = list(range(n_layers - 1, -1, -2))[::-1]
    elif isinstance(keep, int):
        layers = _spread(n_layers, keep)
    else:
        layers = sorted({int(i) for i in keep})
        bad = [i for i in layers if i < 0 or i >= n_layers]
        if bad:
            raise ValueError(f"layers {bad} are beyond the encoder depth: {n_layers} layers (0..{n_layers - 1})")
    return ([0] if include_embedding else []) + [i + 1 for i in layers]


def group_layer_drop(n_text: int, n_image: int, n_out: Optional[int] = None, include_embedding: bool = True):
    """IISAN-Versa's group layer-dropping: one tap per group, so both sides give ``n_out`` taps.

    Args:
        n_text, n_image (int): hidden states of each encoder (embedding output included).
        n_out (int): taps per side, the embedding tap included if ``include_embedding``; default
            ``min(n_text, n_image)`` (the shallower side keeps all its states).

    Returns:
        tuple[list[int], list[int]]: text and image tap indices.
    """
    n_out = min(n_text, n_image) if n_out is None else int(n_out)
    n_layers = n_out - 1 if include_embedding else n_out
    return tuple(layerdrop_taps(n, n_layers, include_embedding) for n in (n_text, n_image))


def surplus_schedule(n_text: int, n_image: int) -> list:
    """Versa's block order for ``n_text`` text and ``n_image`` image SANBs (taps).

    The deeper side's first ``|n_text - n_image|`` blocks run first, alone (intra only); then both sides run in
    lock-step together with the inter SAN. Each step is ``(text_block, image_block, inter_block)``, ``None``
    where that SAN does not run.
    """
    diff_t, diff_i = max(n_text - n_image, 0), max(n_image - n_text, 0)
    steps = [(k, None, None) for k in range(diff_t)] + [(None, k, None) for k in range(diff_i)]
    return steps + [(k + diff_t, k + diff_i, k) for k in range(min(n_text, n_image))]


# ----------------------------------------------------------------------------------------------- blocks
class SANB(nn.Module):
    """Side adapted network block: ``x + W_up act(W_down x)`` (``AdapterBlock``, ``Code_Cached/model/modules.py``).

    ``W_down: d -> bottleneck``, ``W_up: bottleneck -> d``, weights N(0, 0.01), biases 0.
    NOTE: no dropout (the original constructs one but never applies it).
    """

    def __init__(self, d: int, bottleneck: int = 64, activation: str = "relu"):
        super().__init__()
        self.down = nn.Linear(d, bottleneck)
        self.act = ACTIVATIONS[_choice("activation", activation, ACTIVATIONS)]()
        self.up = nn.Linear(bottleneck, d)
        for layer in (self.down, self.up):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(self.act(self.down(x)))  # [n d]


class SideGate(nn.Module):
    """Learned scalar gate ``g = sigmoid(gamma / temperature)``; ``forward(a, b) = g a + (1 - g) b``.

    ``gamma`` starts at 0 (g = 0.5), temperature 0.1 (``side_gate_params_*``, ``Code_Cached/model/model.py``).
    """

    def __init__(self, init: float = 0.0, temperature: float = 0.1):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"gate temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.gamma = nn.Parameter(torch.full((1,), float(init)))

    def weight(self) -> torch.Tensor:
        return torch.sigmoid(self.gamma / self.temperature)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        g = self.weight()
        return g * a + (1 - g) * b


class _SAN(nn.Module):
    def __init__(self, d, n_blocks, bottleneck=64, activation="relu", fusion="gated", temperature=0.1, gate_init=0.0):
        super().__init__()
        if n_blocks < 1:
            raise ValueError(f"a side network needs at least one tap, got {n_blocks}")
        self.d, self.n_blocks = d, n_blocks
        self.fusion = _choice("fusion", fusion, FUSIONS)
        self.blocks = nn.ModuleList(SANB(d, bottleneck, activation) for _ in range(n_blocks))
        gated = self.fusion == "gated"
        self.gates = nn.ModuleList(SideGate(gate_init, temperature) for _ in range(n_blocks)) if gated else None

    def _check(self, taps: torch.Tensor, name: str) -> None:
        if taps.dim() != 3 or taps.shape[1:] != (self.n_blocks, self.d):
            raise ValueError(f"{name} taps must be [n, {self.n_blocks}, {self.d}], got {list(taps.shape)}")


class IntraSAN(_SAN):
    """One modality's side network: ``s_k = SANB_k(g_k h_k + (1 - g_k) s_{k-1})``, ``s_0 = 0``.

    Source: the text / image adapter loops of ``IISANAdaptedMModel.forward`` (``Code_Cached/model/model.py``).
    ``fusion="add"``: ``s_k = SANB_k(h_k + s_{k-1})``.
    """

    def step(self, k: int, tap: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        fused = self.gates[k](tap, state) if self.gates is not None else tap + state
        return self.blocks[k](fused)

    def forward(self, taps: torch.Tensor) -> torch.Tensor:
        """``[n, K, d] -> [n, d]``."""
        self._check(taps, "intra SAN")
        state = taps.new_zeros(taps.shape[0], self.d)
        for k in range(self.n_blocks):
            state = self.step(k, taps[:, k], state)
        return state


class InterSAN(_SAN):
    """Inter-modal side network: ``m_k = SANB_k(m_{k-1} + g_k h^img_k + (1 - g_k) h^txt_k)``, ``m_0 = 0``.

    Source: the ``mm_adapter_list`` loop of ``IISANAdaptedMModel.forward`` (``Code_Cached/model/model.py``); it
    reads the raw taps of both modalities at the same step, not the intra outputs.
    ``fusion="add"``: ``m_k = SANB_k(m_{k-1} + h^img_k + h^txt_k)``.
    """

    def step(self, k, image_tap, text_tap, state):
        mixed = self.gates[k](image_tap, text_tap) if self.gates is not None else image_tap + text_tap
        return self.blocks[k](state + mixed)

    def forward(self, text_taps: torch.Tensor, image_taps: torch.Tensor) -> torch.Tensor:
        """``[n, K, d]`` twice (already at one width) ``-> [n, d]``."""
        self._check(text_taps, "inter SAN text")
        self._check(image_taps, "inter SAN image")
        state = text_taps.new_zeros(text_taps.shape[0], self.d)
        for k in range(self.n_blocks):
            state = self.step(k, image_taps[:, k], text_taps[:, k], state)
        return state


class DimensionAlign(nn.Module):
    """IISAN-Versa's DTL: a per-tap ``Linear(d_in -> d_out)`` from the wider width to the narrower one.

    Source: ``down_project_list`` in ``Code_Cached_Asym/model/model.py`` (default Linear init).
    """

    def __init__(self, d_in: int, d_out: int, n_taps: int):
        super().__init__()
        if d_in <= d_out:
            raise ValueError(f"DTL maps the wider width to the narrower one, got {d_in} -> {d_out}")
        self.d_in, self.d_out = d_in, d_out
        self.proj = nn.ModuleList(nn.Linear(d_in, d_out) for _ in range(n_taps))

    def step(self, k: int, tap: torch.Tensor) -> torch.Tensor:
        return self.proj[k](tap)  # [n d_in] -> [n d_out]

    def forward(self, taps: torch.Tensor) -> torch.Tensor:
        """``[n, K, d_in] -> [n, K, d_out]``."""
        if taps.dim() != 3 or taps.shape[1:] != (len(self.proj), self.d_in):
            raise ValueError(f"DTL taps must be [n, {len(self.proj)}, {self.d_in}], got {list(taps.shape)}")
        return torch.stack([self.step(k, taps[:, k]) for k in range(len(self.proj))], dim=1)


class StageAlign(nn.Module):
    """CNN stage taps (not in the original, whose encoders are transformers): tap ``k`` holds a stage output of
    width ``widths[k]`` zero-padded to the cache width ``d``; one ``Linear(widths[k] -> d)`` per tap maps it to the
    common width of the intra SAN. Initialised to the zero padding itself (weight ``[I; 0]``, bias 0): untrained,
    it passes the cached tap through unchanged."""

    def __init__(self, widths: Sequence[int], d: int):
        super().__init__()
        self.widths = [int(w) for w in widths]
        if any(w > d or w < 1 for w in self.widths):
            raise ValueError(f"stage widths {self.widths} must lie in 1..{d} (the cache width)")
        self.proj = nn.ModuleList(nn.Linear(w, d) for w in self.widths)
        for lin, w in zip(self.proj, self.widths):
            nn.init.zeros_(lin.bias)
            with torch.no_grad():
                lin.weight.zero_()
                lin.weight[:w].copy_(torch.eye(w))

    def forward(self, taps: torch.Tensor) -> torch.Tensor:
        """``[n, K, d]`` (zero-padded) -> ``[n, K, d]``."""
        return torch.stack([lin(taps[:, k, :w]) for k, (lin, w) in enumerate(zip(self.proj, self.widths))], dim=1)


def _head(d_in: int, d_mid: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_mid), nn.Linear(d_mid, d_out))


# ----------------------------------------------------------------------------------------------- full network
class IISANSideNetwork(nn.Module):
    r"""IISAN (equal encoders) and IISAN-Versa (any depths / widths) side network on cached taps.

    Source: ``IISANAdaptedMModel`` (``Code_Cached/model/model.py``, ``Code_Cached_Asym/model/model.py``) and
    ``com_dense`` (``ModelMM``, same files).

    Args:
        d_text, d_image (int): tap widths; n_text_taps, n_image_taps (int): taps per item in the caches.
        d_out (int): item vector size D (64 in the paper).
        bottleneck (int): SANB bottleneck of the text SAN (64); image_bottleneck: of the image SAN (default the
            same). The inter SAN uses the narrower side's (the text side's when the widths are equal).
        activation ("relu" | "gelu"), fusion ("gated" | "add"), gate_temperature (0.1), gate_init (0.0).
        modality ("intra_inter" | "intra" | "inter"): which SANs run; sets ``com_dense``'s input width.
        schedule ("surplus" | "group"): for unequal tap counts, run the deeper side's surplus taps first
            ("surplus"), or equalise the counts with ``group_layer_drop`` ("group"; only when no explicit index).
        text_index, image_index: tap indices used from each cache (LayerDrop); default all taps.
        intra_head ("auto" | "wide" | "narrow"): ``FC(w -> w) -> Linear(w -> D)`` or ``Linear(w -> D) ->
            Linear(D -> D)``; "auto" = "wide" when the widths are equal (Code_Cached), else "narrow" (Asym).
        text_tap_widths, image_tap_widths: the true width of each cached tap (a CNN's stages, zero-padded to
            ``d_text`` / ``d_image`` in the cache); when they differ, a :class:`StageAlign` maps the selected taps
            to the cache width before the SANs. ``None``: every tap is full width (transformers).

    NOTE: see the module docstring for the deviations from the original code.
    """

    def __init__(self, d_text, n_text_taps, d_image, n_image_taps, d_out, bottleneck=64, image_bottleneck=None,
                 activation="relu", fusion="gated", gate_temperature=0.1, gate_init=0.0, modality="intra_inter",
                 schedule="surplus", text_index: Optional[Sequence[int]] = None,
                 image_index: Optional[Sequence[int]] = None, intra_head="auto",
                 text_tap_widths: Optional[Sequence[int]] = None, image_tap_widths: Optional[Sequence[int]] = None):
        super().__init__()
        self.modality = _choice("modality", modality, MODALITIES)
        self.schedule = _choice("schedule", schedule, SCHEDULES)
        intra_head = _choice("intra_head", intra_head, INTRA_HEADS)
        self.d_text, self.d_image, self.d_out = d_text, d_image, d_out
        self.n_text_taps, self.n_image_taps = n_text_taps, n_image_taps
        if self.schedule == "group" and text_index is None and image_index is None and n_text_taps != n_image_taps:
            text_index, image_index = group_layer_drop(n_text_taps, n_image_taps)
        self.register_buffer("text_index", self._index(text_index, n_text_taps, "text"), persistent=False)
        self.register_buffer("image_index", self._index(image_index, n_image_taps, "image"), persistent=False)
        kt, ki = len(self.text_index), len(self.image_index)
        self.text_stages = self._stage_align(text_tap_widths, self.text_index, n_text_taps, d_text, "text")
        self.image_stages = self._stage_align(image_tap_widths, self.image_index, n_image_taps, d_image, "image")
        self.steps = surplus_schedule(kt, ki)
        image_bottleneck = bottleneck if image_bottleneck is None else image_bottleneck
        san = dict(activation=activation, fusion=fusion, temperature=gate_temperature, gate_init=gate_init)
        self.use_intra = self.modality != "inter"
        self.use_inter = self.modality != "intra"
        if self.use_intra:
            self.text_san = IntraSAN(d_text, kt, bottleneck, **san)
            self.image_san = IntraSAN(d_image, ki, image_bottleneck, **san)
            if intra_head == "auto":
                intra_head = "wide" if d_text == d_image else "narrow"
            self.text_head = _head(d_text, d_text if intra_head == "wide" else d_out, d_out)
            self.image_head = _head(d_image, d_image if intra_head == "wide" else d_out, d_out)
        self.text_align = self.image_align = None
        if self.use_inter:
            d_mm = min(d_text, d_image)
            if d_text > d_image:
                self.text_align = DimensionAlign(d_text, d_image, min(kt, ki))
            elif d_image > d_text:
                self.image_align = DimensionAlign(d_image, d_text, min(kt, ki))
            mm_bottleneck = image_bottleneck if d_text > d_image else bottleneck
            self.inter_san = InterSAN(d_mm, min(kt, ki), mm_bottleneck, **san)
            self.inter_head = _head(d_mm, d_mm, d_out)
        n_parts = {"intra_inter": 3, "intra": 2, "inter": 1}[self.modality]
        self.com_dense = nn.Linear(n_parts * d_out, d_out)

    @staticmethod
    def _index(index, n_taps: int, name: str) -> torch.Tensor:
        index = list(range(n_taps)) if index is None else [int(i) for i in index]
        bad = [i for i in index if i < 0 or i >= n_taps]
        if not index or bad:
            raise ValueError(f"{name} tap indices {bad or index} are out of range: the {name} cache has {n_taps} "
                             f"taps (0..{n_taps - 1}); pick taps the cache holds or re-extract it")
        return torch.tensor(index, dtype=torch.long)

    @staticmethod
    def _stage_align(widths, index: torch.Tensor, n_taps: int, d: int, name: str) -> Optional[StageAlign]:
        if widths is None:
            return None
        widths = [int(w) for w in widths]
        if len(widths) != n_taps:
            raise ValueError(f"{len(widths)} {name} tap widths for a cache of {n_taps} taps")
        selected = [widths[i] for i in index.tolist()]
        return StageAlign(selected, d) if any(w != d for w in selected) else None

    def _taps(self, taps: torch.Tensor, d: int, n: int, index: torch.Tensor, name: str) -> torch.Tensor:
        if taps.dim() != 3 or taps.shape[1:] != (n, d):
            raise ValueError(f"{name} taps must be [n_items, {n}, {d}], got {list(taps.shape)}")
        taps = taps.index_select(1, index.to(taps.device)).to(self.com_dense.weight.dtype)
        stages = self.text_stages if name == "text" else self.image_stages
        return taps if stages is None else stages(taps)

    def forward(self, text_taps: torch.Tensor, image_taps: torch.Tensor) -> torch.Tensor:
        """``text_taps [n, Tt, dt]``, ``image_taps [n, Ti, di]`` -> item vectors ``[n, d_out]``."""
        text = self._taps(text_taps, self.d_text, self.n_text_taps, self.text_index, "text")  # [n Kt dt]
        image = self._taps(image_taps, self.d_image, self.n_image_taps, self.image_index, "image")  # [n Ki di]
        n = text.shape[0]
        s_text, s_image = text.new_zeros(n, self.d_text), text.new_zeros(n, self.d_image)
        m = text.new_zeros(n, min(self.d_text, self.d_image)) if self.use_inter else None
        for t, i, x in self.steps:
            if self.use_intra and t is not None:
                s_text = self.text_san.step(t, text[:, t], s_text)
            if self.use_intra and i is not None:
                s_image = self.image_san.step(i, image[:, i], s_image)
            if self.use_inter and x is not None:
                h_text, h_image = text[:, t], image[:, i]
                if self.text_align is not None:
                    h_text = self.text_align.step(x, h_text)
                if self.image_align is not None:
                    h_image = self.image_align.step(x, h_image)
                m = self.inter_san.step(x, h_image, h_text, m)
        parts = []
        if self.use_intra:
            parts += [self.image_head(s_image), self.text_head(s_text)]  # [e_img; e_txt]
        if self.use_inter:
            parts.append(self.inter_head(m))  # e_mm
        return self.com_dense(torch.cat(parts, dim=-1))  # [n D]
