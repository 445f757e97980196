"""Losses against hand-computed values."""

import math

import pytest
import torch
from torch.nn import functional as F

from recbole_mm.model import losses


def _example():
    user = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # [1, 2, 2]: positions 0 and 1
    cand_ids = torch.tensor([5, 7, 9, 11])
    cand_vecs = torch.tensor([[1.0, 1.0], [2.0, 0.0], [0.0, 3.0], [1.0, -1.0]])
    items = torch.tensor([[5, 7, 9]])  # the example's sequence 5 -> 7 -> 9
    targets = torch.tensor([[7, 9]])
    pop = torch.tensor([0.1, 0.2, 0.3, 0.4])
    return user, targets, cand_ids, cand_vecs, items, pop


def test_inbatch_softmax_by_hand():
    user, targets, cand_ids, cand_vecs, items, pop = _example()
    got = losses.inbatch_softmax_loss(user, targets, cand_ids, cand_vecs, items, None, pop.log())
    # position 0 -> 7: items 5 and 9 are the user's own (masked); candidates 7 and 11 remain
    l0 = -math.log((math.exp(2) / 0.2) / (math.exp(2) / 0.2 + math.exp(1) / 0.4))
    # position 1 -> 9: 5 and 7 masked; 9 and 11 remain
    l1 = -math.log((math.exp(3) / 0.3) / (math.exp(3) / 0.3 + math.exp(-1) / 0.4))
    assert got.item() == pytest.approx((l0 + l1) / 2, rel=1e-6)
    # without the popularity correction
    plain = losses.inbatch_softmax_loss(user, targets, cand_ids, cand_vecs, items)
    l0 = -math.log(math.exp(2) / (math.exp(2) + math.exp(1)))
    l1 = -math.log(math.exp(3) / (math.exp(3) + math.exp(-1)))
    assert plain.item() == pytest.approx((l0 + l1) / 2, rel=1e-6)


def test_inbatch_masks_items_of_the_same_users_other_windows():
    user = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # two examples, one position each
    cand_ids = torch.tensor([1, 2, 3, 4])
    cand_vecs = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 2.0]])
    items = torch.tensor([[1, 2], [3, 4]])
    targets = torch.tensor([[2], [4]])
    separate = losses.inbatch_softmax_loss(user, targets, cand_ids, cand_vecs, items, torch.tensor([10, 11]))
    same = losses.inbatch_softmax_loss(user, targets, cand_ids, cand_vecs, items, torch.tensor([10, 10]))
    # different users: row 0 competes with 3 and 4 (logits 0, 0); same user: only with nothing -> loss 0
    expect = (-math.log(math.exp(2) / (math.exp(2) + 2)) - math.log(math.exp(2) / (math.exp(2) + 2))) / 2
    assert separate.item() == pytest.approx(expect, rel=1e-6)
    assert same.item() == pytest.approx(0.0, abs=1e-6)


def test_inbatch_ignores_positions_without_target():
    user, targets, cand_ids, cand_vecs, items, _ = _example()
    only_first = losses.inbatch_softmax_loss(user, torch.tensor([[7, 0]]), cand_ids, cand_vecs, items)
    assert only_first.item() == pytest.approx(-math.log(math.exp(2) / (math.exp(2) + math.exp(1))), rel=1e-6)
    with pytest.raises(ValueError, match="candidates"):
        losses.inbatch_softmax_loss(user, torch.tensor([[3, 0]]), cand_ids, cand_vecs, items)


def test_bce_by_hand():
    u = torch.tensor([[1.0, 2.0], [1.0, 0.0]])
    p = torch.tensor([[1.0, 0.0], [0.0, 0.0]])  # scores 1, 0
    n = torch.tensor([[0.0, 1.0], [3.0, 0.0]])  # scores 2, 3
    want = (F.softplus(torch.tensor(-1.0)) + F.softplus(torch.tensor(0.0))) / 2 + (
        F.softplus(torch.tensor(2.0)) + F.softplus(torch.tensor(3.0))) / 2
    assert losses.bce_loss(u, p, n).item() == pytest.approx(want.item(), rel=1e-6)


def test_negatives_avoid_the_own_sequence():
    g = torch.Generator().manual_seed(0)
    items = torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0]])
    neg = losses.sample_negatives(items, n_items=8, n_per_example=500, generator=g)
    assert neg.shape == (2, 500) and neg.min() >= 1 and neg.max() <= 7
    assert not (neg[0, :, None] == torch.tensor([1, 2, 3])).any()
    assert not (neg[1, :, None] == torch.tensor([4, 5])).any()
    assert set(neg[0].tolist()) == {4, 5, 6, 7}


def test_full_softmax_excludes_padding():
    user = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    matrix = torch.tensor([[100.0, 100.0], [1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    got = losses.full_softmax_loss(user, torch.tensor([[1, 0]]), matrix)
    want = -math.log(math.exp(1) / (math.exp(1) + math.exp(0) + math.exp(0.5)))
    assert got.item() == pytest.approx(want, rel=1e-6)


def _per_slot_reference(user, targets, slots, slot_vecs, items, users, log_p_of):
    """The originals' formulation, written slot by slot: one column per batch slot, the user's own items masked
    except the target's own slot; copies of the target in other users' slots excluded (our one deviation)."""
    total, n = 0.0, 0
    for b in range(user.shape[0]):
        own = set(items[b].tolist())
        for t in range(user.shape[1]):
            tgt = int(targets[b, t])
            if tgt == 0:
                continue
            num, den = None, 0.0
            for (sb, si), sid in zip(slots, [int(items[x, y]) for x, y in slots]):
                logit = float(user[b, t] @ slot_vecs[sid]) - log_p_of[sid]
                if sb == b and sid == tgt and num is None:
                    num = math.exp(logit)
                    den += num
                elif sid in own or sid == tgt:
                    continue
                else:
                    den += math.exp(logit)
            total += -math.log(num / den)
            n += 1
    return total / n


def test_inbatch_weights_candidates_by_their_slots():
    torch.manual_seed(0)
    items = torch.tensor([[1, 2, 3], [1, 4, 5], [1, 2, 6]])  # item 1 in every window, 2 in two
    targets = torch.tensor([[2, 3], [4, 5], [2, 6]])
    user = torch.randn(3, 2, 4)
    vec = {i: torch.randn(4) for i in range(1, 7)}
    counts_by_item = {1: 3, 2: 2, 3: 1, 4: 1, 5: 1, 6: 1}
    log_p = {i: math.log(0.1 * i) for i in range(1, 7)}
    cand = torch.tensor(sorted(vec))
    got = losses.inbatch_softmax_loss(
        user, targets, cand, torch.stack([vec[i] for i in cand.tolist()]), items, torch.tensor([0, 1, 2]),
        torch.tensor([log_p[i] for i in cand.tolist()]), torch.tensor([counts_by_item[i] for i in cand.tolist()]),
    )
    slots = [(b, s) for b in range(3) for s in range(3)]
    want = _per_slot_reference(user, targets, slots, vec, items, None, log_p)
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_negatives_avoid_the_users_whole_training_sequence():
    g = torch.Generator().manual_seed(1)
    items = torch.tensor([[1, 2], [3, 0]])  # the windows
    users = torch.tensor([0, 1])
    n_items = 10
    training = {0: [1, 2, 5, 6, 7], 1: [3, 8, 9]}  # older windows hold 5, 6, 7 / 8, 9
    keys = torch.tensor(sorted(u * n_items + i for u, its in training.items() for i in its))
    neg = losses.sample_negatives(items, n_items, 300, generator=g, users=users, forbidden_keys=keys)
    assert set(neg[0].tolist()) == {3, 4, 8, 9}
    assert set(neg[1].tolist()) == {1, 2, 4, 5, 6, 7}
