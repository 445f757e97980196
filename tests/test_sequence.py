"""User encoders: causality, padding, recency-aligned positions, the paper block's structure."""

import pytest
import torch

from recbole_mm.layers.sequence import PaperSASRec, RecBoleSASRec


@pytest.mark.parametrize("kind", ["paper", "recbole"])
def test_causal_and_padding_invariant(kind):
    torch.manual_seed(0)
    enc = PaperSASRec(8, 2, 2, 0.1, max_len=6) if kind == "paper" else RecBoleSASRec(8, 2, 2, 16, 0.1, 0.1, max_len=6)
    enc.eval()
    x = torch.randn(1, 6, 8)
    lengths = torch.tensor([4])
    out = enc(x, lengths)
    y = x.clone()
    y[0, 3] += torch.randn(8)  # change position 3: positions 0..2 must not move
    y[0, 4:] = torch.randn(2, 8)  # padding content must not matter anywhere
    out2 = enc(y, lengths)
    assert torch.allclose(out[0, :3], out2[0, :3], atol=1e-6)
    assert not torch.allclose(out[0, 3], out2[0, 3], atol=1e-4)
    z = x.clone()
    z[0, 4:] = 0.0
    assert torch.allclose(enc(z, lengths)[0, :4], out[0, :4], atol=1e-6)


def test_paper_positions_align_to_the_most_recent_item():
    enc = PaperSASRec(8, 1, 2, 0.0, max_len=5).eval()
    seen = []
    enc.position.register_forward_hook(lambda m, args, out: seen.append(args[0].clone()))
    enc(torch.randn(2, 5, 8), torch.tensor([3, 5]))
    pos = seen[0]
    assert pos[0, :3].tolist() == [2, 3, 4]  # last real item at position L - 1
    assert pos[1].tolist() == [0, 1, 2, 3, 4]


def test_paper_block_structure():
    enc = PaperSASRec(8, n_layers=2, n_heads=2, dropout=0.1, max_len=5)
    attn = enc.blocks[0].attn
    assert all(getattr(attn, n).bias is None for n in ("q", "k", "v", "o"))
    assert enc.blocks[0].ffn_in.out_features == 32  # 4 D
    assert enc.ln.eps == 1e-6 and enc.blocks[0].ln1.eps == 1e-6
    assert all(torch.all(b.ffn_in.bias == 0) for b in enc.blocks)
