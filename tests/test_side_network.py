"""IISAN / IISAN-Versa side-network layers: values by hand, tap selection, schedule, DTL, shapes, gradients."""

import math

import pytest
import torch

from recbole_mm.layers.side_network import (
    SANB,
    DimensionAlign,
    IISANSideNetwork,
    InterSAN,
    IntraSAN,
    SideGate,
    group_layer_drop,
    layerdrop_taps,
    surplus_schedule,
)

torch.set_num_threads(1)


def randomise(module, seed=0):
    """Non-trivial weights everywhere (biases and gates included) so hand computations test every term."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return module


def lin(layer, x):
    return x @ layer.weight.T + layer.bias


# ------------------------------------------------------------------------------------------------ SANB and gate
def test_sanb_init_and_value():
    block = SANB(256, 64)
    assert block.down.weight.shape == (64, 256) and block.up.weight.shape == (256, 64)
    assert torch.all(block.down.bias == 0) and torch.all(block.up.bias == 0)
    assert abs(block.down.weight.std().item() - 0.01) < 1e-3 and abs(block.up.weight.std().item() - 0.01) < 1e-3
    assert not any(isinstance(m, torch.nn.Dropout) for m in block.modules())
    block = randomise(SANB(6, 3))
    x = torch.randn(4, 6)
    expected = x + lin(block.up, torch.clamp(lin(block.down, x), min=0))
    assert torch.allclose(block(x), expected, atol=1e-6)
    gelu = randomise(SANB(6, 3, activation="gelu"))
    h = lin(gelu.down, x)
    expected = x + lin(gelu.up, 0.5 * h * (1 + torch.erf(h / math.sqrt(2))))
    assert torch.allclose(gelu(x), expected, atol=1e-6)
    with pytest.raises(ValueError, match="activation"):
        SANB(6, 3, activation="tanh")


def test_sanb_parameter_count_matches_paper():
    assert sum(p.numel() for p in SANB(768, 64).parameters()) == 99_136


def test_gate_init_temperature_and_value():
    gate = SideGate()
    assert gate.gamma.item() == 0.0 and gate.temperature == 0.1
    assert gate.weight().item() == pytest.approx(0.5)
    with torch.no_grad():
        gate.gamma.fill_(0.03)
    a, b = torch.randn(3, 5), torch.randn(3, 5)
    g = 1 / (1 + math.exp(-0.3))  # sigmoid(0.03 / 0.1)
    assert gate.weight().item() == pytest.approx(g, rel=1e-6)
    assert torch.allclose(gate(a, b), g * a + (1 - g) * b, atol=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        SideGate(temperature=0)


def test_intra_san_by_hand():
    san = randomise(IntraSAN(5, 3, bottleneck=2))
    taps = torch.randn(4, 3, 5)
    state = torch.zeros(4, 5)
    for k in range(3):
        g = torch.sigmoid(san.gates[k].gamma / 0.1)
        x = g * taps[:, k] + (1 - g) * state
        block = san.blocks[k]
        state = x + lin(block.up, torch.relu(lin(block.down, x)))
    assert torch.allclose(san(taps), state, atol=1e-5)
    add = randomise(IntraSAN(5, 2, bottleneck=2, fusion="add"))
    assert add.gates is None
    x = taps[:, 0]
    s1 = add.blocks[0](x)
    assert torch.allclose(add(taps[:, :2]), add.blocks[1](taps[:, 1] + s1), atol=1e-6)
    with pytest.raises(ValueError, match=r"\[n, 3, 5\]"):
        san(torch.randn(4, 2, 5))


def test_inter_san_by_hand():
    san = randomise(InterSAN(4, 2, bottleneck=3))
    text, image = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    m = torch.zeros(3, 4)
    for k in range(2):
        g = torch.sigmoid(san.gates[k].gamma / 0.1)  # the gate weights the image tap
        m = san.blocks[k](m + g * image[:, k] + (1 - g) * text[:, k])
    assert torch.allclose(san(text, image), m, atol=1e-6)


# ------------------------------------------------------------------------------------------------ tap selection
def test_layerdrop_default_is_iisan():
    assert layerdrop_taps(13) == [0, 2, 4, 6, 8, 10, 12]  # "1,3,5,7,9,11" + embedding
    assert layerdrop_taps(13, [1, 3, 5, 7, 9, 11]) == [0, 2, 4, 6, 8, 10, 12]
    assert layerdrop_taps(13, include_embedding=False) == [2, 4, 6, 8, 10, 12]
    assert layerdrop_taps(6) == [0, 1, 3, 5]  # 5 layers: 0, 2, 4
    assert layerdrop_taps(5, [3, 0]) == [0, 1, 4]


@pytest.mark.parametrize(
    "n_layers, picked",
    [
        (12, [1, 3, 5, 7, 9, 11]),  # ViT-base
        (80, [4, 19, 34, 49, 64, 79]),  # LLaMA-3-70B
        (48, [2, 11, 20, 29, 38, 47]),  # EVA-CLIP-18B
        (32, [1, 7, 13, 19, 25, 31]),  # LLaMA-7B / 8B
        (28, [2, 7, 12, 17, 22, 27]),  # Gemma-7B
    ],
)
def test_group_rule_reproduces_released_tap_lists(n_layers, picked):
    assert layerdrop_taps(n_layers + 1, 6) == [0] + [i + 1 for i in picked]


def test_layerdrop_errors():
    with pytest.raises(ValueError, match="beyond the encoder depth: 12 layers"):
        layerdrop_taps(13, [1, 12])
    with pytest.raises(ValueError, match="cannot keep 7 of 6"):
        layerdrop_taps(7, 7)
    with pytest.raises(ValueError, match="at least 2 hidden states"):
        layerdrop_taps(1)


def test_group_layer_drop_unequal_depths():
    # 7 states = 6 layers, 5 states = 4 layers; default 5 taps each (embedding + 4 layers):
    # text: step (6-1)//(4-1) = 1, first layer 5-3 = 2 -> layers 2,3,4,5 -> taps 3,4,5,6
    assert group_layer_drop(7, 5) == ([0, 3, 4, 5, 6], [0, 1, 2, 3, 4])
    # 3 taps: 2 layers each; text step 5, image step 3 -> layers (0, 5) and (0, 3)
    assert group_layer_drop(7, 5, 3) == ([0, 1, 6], [0, 1, 4])
    assert group_layer_drop(7, 5, 2, include_embedding=False) == ([1, 6], [1, 4])  # same steps, no tap 0
    text, image = group_layer_drop(81, 13, 7)  # LLaMA-70B beside ViT-base, as in run_IISAN.py
    assert text == [0, 5, 20, 35, 50, 65, 80] and image == [0, 2, 4, 6, 8, 10, 12]
    with pytest.raises(ValueError):
        group_layer_drop(7, 5, 6)  # the image side has only 4 layers


def test_surplus_schedule():
    n = None
    assert surplus_schedule(4, 2) == [(0, n, n), (1, n, n), (2, 0, 0), (3, 1, 1)]
    assert surplus_schedule(2, 3) == [(n, 0, n), (0, 1, 0), (1, 2, 1)]
    assert surplus_schedule(3, 3) == [(0, 0, 0), (1, 1, 1), (2, 2, 2)]


def test_network_runs_surplus_first():
    net = IISANSideNetwork(12, 4, 8, 2, 6, bottleneck=4)
    calls = []
    for name, module in net.named_modules():
        if isinstance(module, SANB):
            module.register_forward_hook(lambda m, i, o, name=name: calls.append(name))
    net(torch.randn(2, 4, 12), torch.randn(2, 2, 8))
    assert calls == [
        "text_san.blocks.0",
        "text_san.blocks.1",
        "text_san.blocks.2",
        "image_san.blocks.0",
        "inter_san.blocks.0",
        "text_san.blocks.3",
        "image_san.blocks.1",
        "inter_san.blocks.1",
    ]


# ------------------------------------------------------------------------------------------------ DTL
def test_dimension_align():
    dtl = DimensionAlign(48, 32, 5)
    assert len(dtl.proj) == 5 and dtl(torch.randn(3, 5, 48)).shape == (3, 5, 32)
    taps = torch.randn(3, 5, 48)
    assert torch.allclose(dtl(taps)[:, 2], lin(dtl.proj[2], taps[:, 2]), atol=1e-6)
    with pytest.raises(ValueError, match="wider width to the narrower"):
        DimensionAlign(32, 48, 5)
    with pytest.raises(ValueError, match=r"\[n, 5, 48\]"):
        dtl(torch.randn(3, 4, 48))


def test_dtl_maps_the_wider_side():
    net = IISANSideNetwork(48, 7, 32, 5, 8)
    assert net.image_align is None and net.text_align.proj[0].weight.shape == (32, 48)
    assert len(net.text_align.proj) == 5 and net.inter_san.d == 32
    net = IISANSideNetwork(32, 5, 48, 7, 8)
    assert net.text_align is None and net.image_align.proj[0].weight.shape == (32, 48)
    net = IISANSideNetwork(16, 5, 16, 5, 8)
    assert net.text_align is None and net.image_align is None


# ------------------------------------------------------------------------------------------------ full network
def reference(net, text, image):
    """The Code_Cached_Asym loop written out: surplus first, then lock-step with DTL and the inter SAN."""
    kt, ki = text.shape[1], image.shape[1]
    dt, di = max(kt - ki, 0), max(ki - kt, 0)
    st, si, m = torch.zeros(len(text), text.shape[2]), torch.zeros(len(text), image.shape[2]), 0
    mix = lambda gate, a, b: torch.sigmoid(gate.gamma / 0.1) * a + (1 - torch.sigmoid(gate.gamma / 0.1)) * b  # noqa
    for k in range(dt):
        st = net.text_san.blocks[k](mix(net.text_san.gates[k], text[:, k], st))
    for k in range(di):
        si = net.image_san.blocks[k](mix(net.image_san.gates[k], image[:, k], si))
    for k in range(min(kt, ki)):
        st = net.text_san.blocks[k + dt](mix(net.text_san.gates[k + dt], text[:, k + dt], st))
        si = net.image_san.blocks[k + di](mix(net.image_san.gates[k + di], image[:, k + di], si))
        ht, hi = text[:, k + dt], image[:, k + di]
        ht = lin(net.text_align.proj[k], ht) if net.text_align is not None else ht
        hi = lin(net.image_align.proj[k], hi) if net.image_align is not None else hi
        m = net.inter_san.blocks[k](m + mix(net.inter_san.gates[k], hi, ht))
    e_img = lin(net.image_head[1], lin(net.image_head[0], si))
    e_txt = lin(net.text_head[1], lin(net.text_head[0], st))
    e_mm = lin(net.inter_head[1], lin(net.inter_head[0], m))
    return lin(net.com_dense, torch.cat([e_img, e_txt, e_mm], dim=1))


@pytest.mark.parametrize("dims", [(16, 5, 16, 5), (48, 7, 32, 5), (32, 4, 48, 6)])
def test_network_matches_reference(dims):
    net = randomise(IISANSideNetwork(*dims, 8, bottleneck=4), seed=1)
    text, image = torch.randn(3, dims[1], dims[0]), torch.randn(3, dims[3], dims[2])
    assert torch.allclose(net(text, image), reference(net, text, image), atol=1e-4)


def test_heads_follow_each_original():
    sym = IISANSideNetwork(16, 3, 16, 3, 8)  # Code_Cached: FC(w -> w) -> Linear(w -> D)
    assert sym.text_head[0].weight.shape == (16, 16) and sym.text_head[1].weight.shape == (8, 16)
    asym = IISANSideNetwork(48, 3, 32, 3, 8)  # Code_Cached_Asym: Linear(w -> D) -> Linear(D -> D)
    assert asym.text_head[0].weight.shape == (8, 48) and asym.image_head[1].weight.shape == (8, 8)
    assert asym.inter_head[0].weight.shape == (32, 32) and asym.com_dense.weight.shape == (8, 24)


@pytest.mark.parametrize("dims", [(16, 5, 16, 5), (48, 7, 32, 5)])  # (6-layer, 48) text vs (4-layer, 32) image
def test_shape_and_gradients_reach_every_parameter(dims):
    net = IISANSideNetwork(*dims, 8, bottleneck=4)
    out = net(torch.randn(5, dims[1], dims[0]), torch.randn(5, dims[3], dims[2]))
    assert out.shape == (5, 8)
    out.pow(2).sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_rows_are_independent_and_order_equivariant():
    net = randomise(IISANSideNetwork(48, 7, 32, 5, 8, bottleneck=4), seed=2)
    text, image = torch.randn(6, 7, 48), torch.randn(6, 5, 32)
    out = net(text, image)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    assert torch.allclose(net(text[perm], image[perm]), out[perm], atol=1e-5)
    assert torch.allclose(net(text[2:4], image[2:4]), out[2:4], atol=1e-5)


def test_tap_index_and_group_schedule():
    text, image = torch.randn(2, 7, 12), torch.randn(2, 5, 12)
    net = IISANSideNetwork(12, 7, 12, 5, 4, schedule="group")
    assert net.text_index.tolist() == [0, 3, 4, 5, 6] and net.image_index.tolist() == [0, 1, 2, 3, 4]
    assert all(None not in step for step in net.steps) and net.text_san.n_blocks == 5
    picked = IISANSideNetwork(12, 7, 12, 5, 4, text_index=[0, 3, 4, 5, 6])  # the same selection, explicit
    plain = IISANSideNetwork(12, 5, 12, 5, 4)  # the selection done before the network
    picked.load_state_dict(net.state_dict())
    plain.load_state_dict(net.state_dict())
    out = net(text, image)
    assert torch.allclose(out, picked(text, image)) and torch.allclose(out, plain(text[:, [0, 3, 4, 5, 6]], image))
    with pytest.raises(ValueError, match="text cache has 7 taps"):
        IISANSideNetwork(12, 7, 12, 5, 4, text_index=[0, 7])
    with pytest.raises(ValueError, match=r"image taps must be \[n_items, 5, 12\]"):
        net(text, torch.randn(2, 5, 16))


def test_modality_fusion_and_dtype_options():
    text, image = torch.randn(3, 4, 8), torch.randn(3, 4, 8)
    for modality, width in [("intra_inter", 12), ("intra", 8), ("inter", 4)]:
        net = IISANSideNetwork(8, 4, 8, 4, 4, modality=modality)
        assert net.com_dense.in_features == width and net(text, image).shape == (3, 4)
    add = IISANSideNetwork(8, 4, 8, 4, 4, fusion="add")
    assert not any(isinstance(m, SideGate) for m in add.modules()) and add(text, image).shape == (3, 4)
    net = IISANSideNetwork(8, 4, 8, 4, 4)
    half = net(text.half(), image.half())  # fp16 caches are cast to the parameters' dtype
    assert half.dtype == torch.float32 and torch.allclose(half, net(text.half().float(), image.half().float()))
    for key, value in [("modality", "both"), ("schedule", "zip"), ("fusion", "mul"), ("intra_head", "x")]:
        with pytest.raises(ValueError, match=key):
            IISANSideNetwork(8, 4, 8, 4, 4, **{key: value})


def test_paper_default_parameter_count():
    idx = layerdrop_taps(13)
    net = IISANSideNetwork(768, 13, 768, 13, 64, text_index=idx, image_index=idx)
    n = sum(p.numel() for p in net.parameters())
    # 21 SANBs, three 768x768 FCs, three 768->64 projections, com_dense 192->64, 21 gates (spec 5a: ~4.0 M + SASRec)
    assert n == 21 * 99_136 + 3 * (768 * 768 + 768) + 3 * (768 * 64 + 64) + (192 * 64 + 64) + 21
