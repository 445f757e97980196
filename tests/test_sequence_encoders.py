"""User encoders (paper, recbole, gru4rec, nextitnet): shape, causality, padding, gradients, the builder."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from recbole_mm.layers.sequence import (
    SEQ_ENCODERS,
    PaperGRU4Rec,
    PaperNextItNet,
    PaperSASRec,
    RecBoleSASRec,
    build_sequence_encoder,
)

B, L, D = 3, 6, 8
LENGTHS = torch.tensor([6, 4, 2])


class Cfg(dict):
    """RecBole's Config: a dict whose missing keys read as None."""

    def __getitem__(self, key):
        return self.get(key)


def make(kind):
    torch.manual_seed(0)
    if kind == "paper":
        return PaperSASRec(D, 2, 2, 0.1, max_len=L)
    if kind == "recbole":
        return RecBoleSASRec(D, 2, 2, 16, 0.1, 0.1, max_len=L)
    if kind == "gru4rec":
        return PaperGRU4Rec(D, 2, 0.1)
    return PaperNextItNet(D, 2)


def padded_inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, D, generator=g)
    real = torch.arange(L)[None, :] < LENGTHS[:, None]
    return x * real.unsqueeze(-1), real  # the caller zeroes padded positions


@pytest.mark.parametrize("kind", SEQ_ENCODERS)
def test_shape(kind):
    x, _ = padded_inputs()
    assert make(kind)(x, LENGTHS).shape == (B, L, D)


@pytest.mark.parametrize("kind", SEQ_ENCODERS)
@pytest.mark.parametrize("s", [1, 3])
def test_causal(kind, s):
    enc = make(kind).eval()
    lengths = torch.full((B,), L)
    x, _ = padded_inputs()
    x = torch.randn_like(x)
    y = x.clone()
    y[:, s] += torch.randn(B, D)
    with torch.no_grad():
        out, out2 = enc(x, lengths), enc(y, lengths)
    assert torch.allclose(out[:, :s], out2[:, :s], atol=1e-6)
    assert not torch.allclose(out[:, s], out2[:, s], atol=1e-4)


@pytest.mark.parametrize("kind", SEQ_ENCODERS)
def test_padding_values_do_not_matter(kind):
    enc = make(kind).eval()
    x, real = padded_inputs()
    y = torch.where(real.unsqueeze(-1), x, 10 * torch.randn_like(x))
    with torch.no_grad():
        out, out2 = enc(x, LENGTHS), enc(y, LENGTHS)
    assert torch.allclose(out[real], out2[real], atol=1e-5)


@pytest.mark.parametrize("kind", SEQ_ENCODERS)
def test_gradient_reaches_inputs(kind):
    enc = make(kind).train()
    x, real = padded_inputs()
    x.requires_grad_(True)
    enc(x, LENGTHS)[real].pow(2).sum().backward()
    assert x.grad is not None and x.grad[real].abs().sum() > 0
    assert all(p.grad is not None for p in enc.parameters() if p.requires_grad and p.dim() > 1)


def test_gru4rec_structure():
    enc = PaperGRU4Rec(D, n_layers=3, dropout=0.2)
    assert enc.gru.num_layers == 3 and enc.gru.hidden_size == D and enc.gru.bias is False
    assert enc.gru.dropout == 0 and enc.dropout.p == 0.2
    assert not any(isinstance(m, nn.Linear) for m in enc.modules())  # no projection in PMMRec


def test_gru4rec_right_padding_equals_left_padding():
    """A bias-free GRU keeps h = 0 over zero vectors: the originals' left-padded run gives the same states."""
    enc = PaperGRU4Rec(D, 2, 0.0).eval()
    x = torch.randn(1, 4, D)
    left = torch.cat([torch.zeros(1, 2, D), x], 1)
    with torch.no_grad():
        assert torch.allclose(enc(left, torch.tensor([6]))[:, 2:], enc(x, torch.tensor([4])), atol=1e-6)


def test_nextitnet_structure():
    enc = PaperNextItNet(D, n_blocks=2)
    assert enc.dilations == [1, 4, 1, 4]
    for block, d in zip(enc.blocks, enc.dilations):
        assert block.conv1.dilation == (d,) and block.conv2.dilation == (2 * d,)
        assert block.conv1.kernel_size == (3,) and block.conv1.bias is not None
        assert block.ln1.eps == 1e-8 and block.ln2.eps == 1e-8
    assert PaperNextItNet(D, 3, dilations=[1, 2], kernel_size=2).dilations == [1, 2] * 3
    with pytest.raises(ValueError):
        PaperNextItNet(D, 2, dilations=[0])


def test_nextitnet_block_matches_conv2d_formulation():
    """The originals run Conv2d (1, k) over ZeroPad2d((k - 1) d, 0, 0, 0); Conv1d with F.pad is the same map."""
    enc = PaperNextItNet(D, 1, dilations=[2]).eval()
    block = enc.blocks[0]

    def conv2d(conv, x, dilation):
        w = conv.weight.unsqueeze(2)  # [D, D, 1, k]
        x = nn.ZeroPad2d(((3 - 1) * dilation, 0, 0, 0))(x.permute(0, 2, 1).unsqueeze(2))
        return F.conv2d(x, w, conv.bias, dilation=(1, dilation)).squeeze(2).permute(0, 2, 1)

    x = torch.randn(2, L, D)
    out = F.relu(block.ln1(conv2d(block.conv1, x, 2)))
    out = F.relu(block.ln2(conv2d(block.conv2, out, 4))) + x
    with torch.no_grad():
        assert torch.allclose(enc(x, torch.tensor([L, L])), out, atol=1e-6)


BASE = {"MAX_ITEM_LIST_LENGTH": L, "n_layers": 2, "n_heads": 2, "dropout_prob": 0.1}


@pytest.mark.parametrize("kind,cls", [(None, PaperSASRec), ("paper", PaperSASRec), ("recbole", RecBoleSASRec),
                                      ("gru4rec", PaperGRU4Rec), ("nextitnet", PaperNextItNet)])
def test_builder(kind, cls):
    enc = build_sequence_encoder(Cfg(BASE, seq_encoder=kind), D)
    assert type(enc) is cls
    x, _ = padded_inputs()
    assert enc(x, LENGTHS).shape == (B, L, D)


def test_builder_reads_the_keys():
    gru = build_sequence_encoder(Cfg(BASE, seq_encoder="gru4rec", n_layers=3, dropout_prob=0.3), D)
    assert gru.gru.num_layers == 3 and gru.dropout.p == 0.3
    net = build_sequence_encoder(Cfg(BASE, seq_encoder="nextitnet"), D)
    assert net.dilations == [1, 4, 1, 4] and net.blocks[0].conv1.kernel_size == (3,)
    net = build_sequence_encoder(Cfg(BASE, seq_encoder="nextitnet", n_layers=1, dilations=[1, 2, 4], kernel_size=5), D)
    assert net.dilations == [1, 2, 4] and net.blocks[0].conv1.kernel_size == (5,)


def test_builder_rejects_unknown_kind():
    with pytest.raises(ValueError) as err:
        build_sequence_encoder(Cfg(BASE, seq_encoder="lstm"), D)
    assert all(k in str(err.value) for k in ("paper", "recbole", "gru4rec", "nextitnet", "lstm"))
