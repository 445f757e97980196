"""PMMRec pre-training losses against values computed by hand from their definitions."""

import math

import pytest
import torch

from recbole_mm.model import pretrain_losses as pl

torch.set_num_threads(1)


# ----------------------------------------------------------------------------------------------- NICL
def _unit(x):
    return x / x.norm()


def _nicl_reference(anchor, other, items, tau, users=None):
    """One direction of NICL written from its definition, one anchor at a time."""
    b_size, s_size = items.shape
    slots = [(b, l) for b in range(b_size) for l in range(s_size) if items[b, l] > 0]
    group = (lambda b: b) if users is None else (lambda b: int(users[b]))
    total = 0.0
    for b, l in slots:
        a = _unit(anchor[b, l])
        pos = [(b, l)]
        if l + 1 < s_size and items[b, l + 1] > 0:
            pos.append((b, l + 1))
        pos_ids = {int(items[p]) for p in pos}
        neg = [(c, m) for c, m in slots if int(items[c, m]) not in pos_ids and group(c) != group(b)]

        def cos(p):
            return float(a @ _unit(other[p]))

        inner = sum(cos(p) / tau for p in pos) - math.log(sum(math.exp(cos(x) / tau) for x in pos + neg))
        total += -inner / len(pos)
    return total / len(slots)


def _nicl_reference_loss(text, image, items, tau, symmetric=False, users=None):
    forward = _nicl_reference(text, image, items, tau, users)
    if not symmetric:
        return forward
    return (forward + _nicl_reference(image, text, items, tau, users)) / 2


def _tiny():
    """B=2, S=3, D=2. Row 0: items 1 -> 2 then padding; row 1: item 3 then padding."""
    items = torch.tensor([[1, 2, 0], [3, 0, 0]])
    text = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [9.0, -4.0]], [[1.0, 1.0], [-3.0, 7.0], [5.0, 5.0]]])
    image = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [-2.0, 8.0]], [[-1.0, 0.0], [6.0, 1.0], [0.5, -3.0]]])
    return text, image, items


def test_nicl_tiny_by_hand_with_math():
    text, image, items = _tiny()
    tau = 0.5
    r = math.sqrt(2) / 2
    # anchor (0,0), text at 0 deg: Pos = image (0,0) at 0 deg and image (0,1) at 90 deg (cos 1, 0);
    # Neg = image (1,0) at 180 deg (id 3, other row; cos -1)
    l00 = -((1 + 0) / tau - math.log(math.exp(1 / tau) + math.exp(0) + math.exp(-1 / tau))) / 2
    # anchor (0,1), text at 90 deg, last real slot: Pos = own image (cos 1); Neg = image (1,0) (cos 0);
    # slot (0,0) is in the anchor's own sequence: excluded (the original's last-position quirk is not kept)
    l01 = -(1 / tau - math.log(math.exp(1 / tau) + math.exp(0)))
    # anchor (1,0), text at 45 deg, next slot is padding: Pos = own image at 180 deg (cos -r);
    # Neg = images (0,0) and (0,1) (cos r each)
    l10 = -(-r / tau - math.log(math.exp(-r / tau) + 2 * math.exp(r / tau)))
    got = pl.nicl_loss(text, image, items, tau=tau)
    assert got.item() == pytest.approx((l00 + l01 + l10) / 3, rel=1e-5)
    # windows of the same user: no negatives left at all
    same = pl.nicl_loss(text, image, items, tau=tau, users=torch.tensor([7, 7]))
    l00 = -((1 + 0) / tau - math.log(math.exp(1 / tau) + math.exp(0))) / 2
    assert same.item() == pytest.approx((l00 + 0.0 + 0.0) / 3, abs=1e-6)
    assert got.item() == pytest.approx(_nicl_reference_loss(text, image, items, tau), rel=1e-5)


def test_nicl_ignores_padding_slots():
    text, image, items = _tiny()
    base = pl.nicl_loss(text, image, items, tau=0.3, symmetric=True)
    pad = items == 0
    text2, image2 = text.clone(), image.clone()
    text2[pad] = torch.randn(int(pad.sum()), 2) * 100
    image2[pad] = torch.randn(int(pad.sum()), 2) * 100
    assert pl.nicl_loss(text2, image2, items, tau=0.3, symmetric=True).item() == pytest.approx(base.item(), rel=1e-6)


def test_nicl_symmetric_tiny():
    text, image, items = _tiny()
    got = pl.nicl_loss(text, image, items, tau=0.5, symmetric=True)
    assert got.item() == pytest.approx(_nicl_reference_loss(text, image, items, 0.5, symmetric=True), rel=1e-5)
    one_way = pl.nicl_loss(text, image, items, tau=0.5)
    assert got.item() != pytest.approx(one_way.item(), rel=1e-3)


def test_nicl_duplicates_next_item_and_same_user_exclusion():
    # row 0: 5, 5, 6 (item repeated: both slots are positives of the first anchor, |Pos| = 2);
    # row 1: 6, 9, 9, 5 (6 and 5 belong to row 0's sequence but still are negatives there, except the positive ids;
    #        9 appears twice: counted twice); row 2: 4, pad (next positive only where the next slot is real);
    # row 3: same user as row 0 in the second call
    items = torch.tensor([[5, 5, 6, 0], [6, 9, 9, 5], [4, 0, 0, 0], [8, 6, 2, 0]])
    g = torch.Generator().manual_seed(3)
    text = torch.randn(4, 4, 3, generator=g, dtype=torch.float64)
    image = torch.randn(4, 4, 3, generator=g, dtype=torch.float64)
    for users in (None, torch.tensor([1, 2, 3, 1])):
        for symmetric in (False, True):
            got = pl.nicl_loss(text, image, items, tau=0.2, symmetric=symmetric, users=users)
            want = _nicl_reference_loss(text, image, items, 0.2, symmetric, users)
            assert got.item() == pytest.approx(want, rel=1e-9)
    # the same user makes a difference (row 3's slots leave row 0's negatives and vice versa)
    assert pl.nicl_loss(text, image, items, tau=0.2).item() != pytest.approx(
        pl.nicl_loss(text, image, items, tau=0.2, users=torch.tensor([1, 2, 3, 1])).item(), rel=1e-6
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nicl_random_batches_against_loop(seed):
    g = torch.Generator().manual_seed(seed)
    b, s = 5, 6
    lengths = torch.randint(1, s + 1, (b,), generator=g)
    items = torch.randint(1, 6, (b, s), generator=g) * (torch.arange(s)[None, :] < lengths[:, None])
    users = torch.randint(0, 3, (b,), generator=g)
    text = torch.randn(b, s, 4, generator=g, dtype=torch.float64)
    image = torch.randn(b, s, 4, generator=g, dtype=torch.float64)
    for tau in (0.1, 0.7):
        for u in (None, users):
            for symmetric in (False, True):
                got = pl.nicl_loss(text, image, items, tau=tau, symmetric=symmetric, users=u)
                want = _nicl_reference_loss(text, image, items, tau, symmetric, u)
                assert got.item() == pytest.approx(want, rel=1e-9)


def test_nicl_gradients_and_empty_batch():
    text, image, items = _tiny()
    text.requires_grad_(True)
    image.requires_grad_(True)
    pl.nicl_loss(text, image, items, symmetric=True).backward()
    assert text.grad[items > 0].abs().sum() > 0 and image.grad[items > 0].abs().sum() > 0
    assert torch.all(text.grad[items == 0] == 0)
    empty = pl.nicl_loss(text, image, torch.zeros_like(items))
    assert empty.item() == 0.0 and empty.requires_grad


# ------------------------------------------------------------------------------------- corruption
def _batch(b=6, length=8, n_items=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (b,), generator=g)
    real = torch.arange(length)[None, :] < lengths[:, None]
    seq = torch.randint(1, n_items, (b, length), generator=g) * real
    return seq, lengths, real


def test_corrupt_padding_labels_and_ranges():
    seq, lengths, real = _batch(b=50)
    noised, labels = pl.corrupt_sequences(seq, lengths, 20, rate=0.5, generator=torch.Generator().manual_seed(1))
    assert noised.shape == seq.shape and labels.dtype == torch.float32
    assert torch.all(noised[~real] == 0) and torch.all(labels[~real] == 0)
    assert torch.equal(labels.bool(), noised != seq)
    assert torch.all((noised[real] >= 1) & (noised[real] < 20))
    assert labels.sum() > 0


def test_corrupt_rate_zero_and_full_replacement():
    seq, lengths, real = _batch()
    noised, labels = pl.corrupt_sequences(seq, lengths, 20, rate=0.0)
    assert torch.equal(noised, seq) and labels.sum() == 0
    noised, labels = pl.corrupt_sequences(seq, lengths, 20, rate=1.0, replace_share=1.0)
    assert torch.equal(labels.bool(), real)  # every real position changed
    assert torch.all(noised[real] != seq[real]) and torch.all((noised[real] >= 1) & (noised[real] < 20))
    # with three ids only (n_items = 3: ids 1, 2), a replacement is the other id
    two = torch.tensor([[1, 2, 1, 0]])
    noised, _ = pl.corrupt_sequences(two, torch.tensor([3]), 3, rate=1.0, replace_share=1.0)
    assert noised.tolist() == [[2, 1, 2, 0]]
    with pytest.raises(ValueError, match="n_items"):
        pl.corrupt_sequences(two, torch.tensor([3]), 2)


def test_corrupt_shuffle_permutes_within_row():
    seq, lengths, real = _batch(b=30, seed=4)
    noised, labels = pl.corrupt_sequences(seq, lengths, 20, rate=1.0, replace_share=0.0,
                                          generator=torch.Generator().manual_seed(2))
    for b in range(seq.shape[0]):
        n = int(lengths[b])
        assert sorted(noised[b, :n].tolist()) == sorted(seq[b, :n].tolist())
    assert labels.sum() > 0
    # one shuffle-chosen position: nothing moves
    single = torch.tensor([[4, 0, 0], [7, 0, 0]])
    noised, labels = pl.corrupt_sequences(single, torch.tensor([1, 1]), 20, rate=1.0, replace_share=0.0)
    assert torch.equal(noised, single) and labels.sum() == 0


def test_corrupt_empirical_rate():
    seq, lengths, real = _batch(b=4000, length=20, n_items=1000, seed=5)
    g = torch.Generator().manual_seed(0)
    _, labels = pl.corrupt_sequences(seq, lengths, 1000, rate=0.15, replace_share=1.0, generator=g)
    assert float(labels[real].mean()) == pytest.approx(0.15, abs=0.005)
    _, labels = pl.corrupt_sequences(seq, lengths, 1000, rate=0.15, replace_share=0.5, generator=g)
    # replacements always change the id, shuffles may leave one in place
    assert 0.075 < float(labels[real].mean()) < 0.15


def test_corrupt_deterministic_under_generator():
    seq, lengths, _ = _batch(b=20)
    a = pl.corrupt_sequences(seq, lengths, 20, rate=0.4, generator=torch.Generator().manual_seed(11))
    b = pl.corrupt_sequences(seq, lengths, 20, rate=0.4, generator=torch.Generator().manual_seed(11))
    c = pl.corrupt_sequences(seq, lengths, 20, rate=0.4, generator=torch.Generator().manual_seed(12))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


# -------------------------------------------------------------------------------------------- NID
def test_nid_loss_by_hand():
    logits = torch.tensor([[0.5, -1.0, 2.0], [3.0, 0.0, -0.2]], requires_grad=True)
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    valid = torch.tensor([[True, True, False], [True, False, True]])
    total, count = 0.0, 0
    for b in range(2):
        for t in range(3):
            if valid[b, t]:
                p = 1 / (1 + math.exp(-float(logits.detach()[b, t])))
                y = float(labels[b, t])
                total += -(y * math.log(p) + (1 - y) * math.log(1 - p))
                count += 1
    got = pl.nid_loss(logits, labels, valid)
    assert got.item() == pytest.approx(total / count, rel=1e-6)
    got.backward()
    assert torch.all(logits.grad[valid] != 0) and torch.all(logits.grad[~valid] == 0)
    assert pl.nid_loss(logits, labels, torch.zeros_like(valid)).item() == 0.0


# -------------------------------------------------------------------------------------------- RCL
def _rcl_reference(clean, noised, tau, users=None):
    n = clean.shape[0]

    def direction(x, y):
        total = 0.0
        for i in range(n):
            cos = [float(_unit(x[i]) @ _unit(y[j])) / tau for j in range(n)]
            keep = [j for j in range(n) if j == i or users is None or int(users[j]) != int(users[i])]
            total += -cos[i] + math.log(sum(math.exp(cos[j]) for j in keep))
        return total / n

    return (direction(clean, noised) + direction(noised, clean)) / 2


def test_rcl_loss_against_loop_and_gradients():
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    noised = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    users = torch.tensor([0, 1, 0, 2, 1])
    for tau in (0.1, 1.0):
        for u in (None, users):
            got = pl.rcl_loss(clean, noised, tau=tau, users=u)
            assert got.item() == pytest.approx(_rcl_reference(clean.detach(), noised.detach(), tau, u), rel=1e-9)
    pl.rcl_loss(clean, noised, users=users).backward()
    assert torch.all(clean.grad.abs().sum(-1) > 0) and torch.all(noised.grad.abs().sum(-1) > 0)
    # two rows by hand: cos(c0, n0) = 1, cos(c0, n1) = 0, cos(c1, n1) = 1, cos(c1, n0) = 0
    e = torch.eye(2)
    one = -1 / 0.5 + math.log(math.exp(1 / 0.5) + 1)
    assert pl.rcl_loss(e, e, tau=0.5).item() == pytest.approx(one, rel=1e-6)
    assert pl.rcl_loss(e, e, tau=0.5, users=torch.tensor([3, 3])).item() == pytest.approx(0.0, abs=1e-6)
