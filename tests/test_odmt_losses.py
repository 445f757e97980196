"""ODMT's distillation losses (kd_loss, kd_rampup) and inbatch_logits against independent loop references.

The references below are written from the formulas (ODMT, ACM MM'23; specs/models.md), with plain Python loops
over rows / columns and explicit sums, not from the implementation in ``recbole_mm/model/losses.py``.
"""

import math

import pytest
import torch
from torch.nn import functional as F

from recbole_mm.model import losses

torch.set_num_threads(1)

TEMPS = (0.3, 0.5, 1.0)


# ----------------------------------------------------------------------------------------------------------------
# references
# ----------------------------------------------------------------------------------------------------------------


def _softmax_row(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    s = sum(e)
    return [v / s for v in e]


def _log_softmax_row(xs):
    m = max(xs)
    lse = m + math.log(sum(math.exp(x - m) for x in xs))
    return [x - lse for x in xs]


def kd_ref(student, teacher, tau):
    """tau^2 * mean_n ( - sum_c softmax(T_n / tau)_c * log_softmax(S_n / tau)_c ), Python floats."""
    s_rows = student.tolist() if torch.is_tensor(student) else student
    t_rows = teacher.tolist() if torch.is_tensor(teacher) else teacher
    assert len(s_rows) == len(t_rows)
    total = 0.0
    for s_row, t_row in zip(s_rows, t_rows):
        p = _softmax_row([x / tau for x in t_row])
        logq = _log_softmax_row([x / tau for x in s_row])
        ce = 0.0
        for c in range(len(p)):
            ce -= p[c] * logq[c]
        total += ce
    return tau * tau * total / len(s_rows)


def entropy_ref(teacher, tau):
    """tau^2 * mean_n ( - sum_c p_c log p_c ), p = softmax(T_n / tau)."""
    total = 0.0
    for t_row in teacher.tolist():
        p = _softmax_row([x / tau for x in t_row])
        total -= sum(pc * math.log(pc) for pc in p if pc > 0)
    return tau * tau * total / len(teacher)


def kd_ref_torch(student, teacher, tau):
    """The same formula with elementwise torch ops and explicit per-row sums (differentiable, for autograd)."""
    total = student.new_zeros(())
    n, c = student.shape
    for i in range(n):
        t = teacher[i] / tau
        e = torch.exp(t - t.max())
        p = e / e.sum()
        s = student[i] / tau
        ms = s.max()
        logq = s - ms - torch.log(torch.exp(s - ms).sum())
        row = student.new_zeros(())
        for j in range(c):
            row = row - p[j] * logq[j]
        total = total + row
    return total / n * tau * tau


def rampup_ref(epoch, alpha):
    if alpha < 1:
        return float(alpha)
    x = min(float(epoch), float(alpha)) / float(alpha)
    return math.exp(-5.0 * (1.0 - x) * (1.0 - x))


def _random_logits(seed, n=5, c=7, dtype=torch.float64, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g, dtype=dtype) * scale


def _random_mask(seed, n=5, c=7, p=0.35):
    """Boolean [n, c] mask, at least two unmasked columns in every row."""
    g = torch.Generator().manual_seed(1000 + seed)
    mask = torch.rand(n, c, generator=g) < p
    mask[:, :2] = False
    perm = torch.randperm(c, generator=g)
    return mask[:, perm]


# ----------------------------------------------------------------------------------------------------------------
# kd_loss
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tau", TEMPS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kd_loss_matches_reference(seed, tau):
    s = _random_logits(seed)
    t = _random_logits(seed + 50)
    got = losses.kd_loss(s, t, tau)
    assert got.dim() == 0
    assert got.item() == pytest.approx(kd_ref(s, t, tau), rel=1e-10, abs=1e-12)
    # detaching the teacher does not change the value
    assert losses.kd_loss(s, t, tau, detach_teacher=True).item() == pytest.approx(got.item(), rel=1e-12)


def test_kd_loss_is_not_symmetric():
    """Student first, teacher second: swapping them changes the value for generic logits."""
    s, t = _random_logits(3), _random_logits(4)
    a = losses.kd_loss(s, t, 0.5).item()
    assert a == pytest.approx(kd_ref(s, t, 0.5), rel=1e-10)
    assert abs(a - kd_ref(t, s, 0.5)) > 1e-3


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("tau", TEMPS)
@pytest.mark.parametrize("seed", [0, 1])
def test_kd_loss_with_masked_columns(seed, tau, dtype):
    """Columns at MASK_VALUE (same mask for student and teacher, as every branch shares the same in-batch mask)
    contribute ~0: the result is finite and equals the reference on the unmasked columns alone."""
    mask = _random_mask(seed)
    assert mask.any()
    s = _random_logits(seed, dtype=dtype).masked_fill(mask, losses.MASK_VALUE)
    t = _random_logits(seed + 50, dtype=dtype).masked_fill(mask, losses.MASK_VALUE)
    s.requires_grad_(True)
    t.requires_grad_(True)
    got = losses.kd_loss(s, t, tau)
    assert torch.isfinite(got)
    got.backward()
    assert torch.isfinite(s.grad).all() and torch.isfinite(t.grad).all()
    # masked columns receive (numerically) no gradient
    assert s.grad[mask].abs().max().item() < 1e-12
    assert t.grad[mask].abs().max().item() < 1e-12

    rel = 1e-10 if dtype == torch.float64 else 1e-5
    # the full-row reference (masked entries included) ...
    full = kd_ref(s.detach().double(), t.detach().double(), tau)
    assert got.item() == pytest.approx(full, rel=rel)
    # ... equals the reference restricted to the unmasked columns of each row
    total = 0.0
    for i in range(s.shape[0]):
        keep = ~mask[i]
        total += kd_ref([s.detach()[i][keep].double().tolist()], [t.detach()[i][keep].double().tolist()], tau)
    assert got.item() == pytest.approx(total / s.shape[0], rel=rel)


def test_kd_loss_teacher_only_masked_column_contributes_nothing():
    """A column masked in the teacher only has p_c ~ 0, so it adds ~0 to the sum whatever the student's logit
    there (the student's column still enters its own log-softmax normaliser)."""
    tau = 0.5
    s = _random_logits(7, n=3, c=5)
    t = _random_logits(8, n=3, c=5)
    t[:, 2] = losses.MASK_VALUE
    got = losses.kd_loss(s, t, tau).item()
    assert math.isfinite(got)
    assert got == pytest.approx(kd_ref(s, t, tau), rel=1e-10)
    keep = [0, 1, 3, 4]
    total = 0.0
    for s_row, t_row in zip(s.tolist(), t.tolist()):
        p = _softmax_row([t_row[c] / tau for c in keep])
        logq = _log_softmax_row([x / tau for x in s_row])
        total -= sum(p[k] * logq[c] for k, c in enumerate(keep))
    assert got == pytest.approx(tau * tau * total / 3, rel=1e-10)


@pytest.mark.parametrize("tau", TEMPS)
def test_kd_loss_gradients_flow_into_both(tau):
    s0, t0 = _random_logits(11), _random_logits(12)
    s = s0.clone().requires_grad_(True)
    t = t0.clone().requires_grad_(True)
    losses.kd_loss(s, t, tau).backward()
    assert s.grad is not None and t.grad is not None
    assert t.grad.abs().sum().item() > 0

    rs = s0.clone().requires_grad_(True)
    rt = t0.clone().requires_grad_(True)
    kd_ref_torch(rs, rt, tau).backward()
    assert torch.allclose(s.grad, rs.grad, rtol=1e-9, atol=1e-12)
    assert torch.allclose(t.grad, rt.grad, rtol=1e-9, atol=1e-12)

    # the teacher gradient by hand: d/dT_c of tau^2/N * -sum_k p_k logq_k, p = softmax(T/tau), is
    # tau/N * -p_c (logq_c - sum_k p_k logq_k)
    n = s0.shape[0]
    for i in range(n):
        p = _softmax_row([x / tau for x in t0[i].tolist()])
        logq = _log_softmax_row([x / tau for x in s0[i].tolist()])
        mean_lq = sum(pk * lk for pk, lk in zip(p, logq))
        for c in range(len(p)):
            expect = tau / n * -p[c] * (logq[c] - mean_lq)
            assert t.grad[i, c].item() == pytest.approx(expect, rel=1e-8, abs=1e-12)
            # student: tau/N * (q_c - p_c)
            expect_s = tau / n * (math.exp(logq[c]) - p[c])
            assert s.grad[i, c].item() == pytest.approx(expect_s, rel=1e-8, abs=1e-12)


@pytest.mark.parametrize("tau", TEMPS)
def test_kd_loss_detach_teacher(tau):
    s0, t0 = _random_logits(21), _random_logits(22)
    s = s0.clone().requires_grad_(True)
    t = t0.clone().requires_grad_(True)
    losses.kd_loss(s, t, tau, detach_teacher=True).backward()
    assert t.grad is None
    assert s.grad is not None

    rs = s0.clone().requires_grad_(True)
    kd_ref_torch(rs, t0, tau).backward()
    assert torch.allclose(s.grad, rs.grad, rtol=1e-9, atol=1e-12)


def test_kd_loss_gradcheck():
    s = _random_logits(31, n=3, c=4).requires_grad_(True)
    t = _random_logits(32, n=3, c=4).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: losses.kd_loss(a, b, 0.5), (s, t))


@pytest.mark.parametrize("tau", TEMPS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kd_loss_entropy_bound(seed, tau):
    """Cross-entropy = KL + entropy: loss >= tau^2 * H(teacher), equality when student == teacher."""
    s, t = _random_logits(seed), _random_logits(seed + 50)
    h = entropy_ref(t, tau)
    assert losses.kd_loss(s, t, tau).item() >= h - 1e-12
    assert losses.kd_loss(t.clone(), t, tau).item() == pytest.approx(h, rel=1e-10, abs=1e-12)
    # and the gap is the KL divergence, computed by hand
    kl = 0.0
    for s_row, t_row in zip(s.tolist(), t.tolist()):
        p = _softmax_row([x / tau for x in t_row])
        lp = _log_softmax_row([x / tau for x in t_row])
        lq = _log_softmax_row([x / tau for x in s_row])
        kl += sum(pc * (a - b) for pc, a, b in zip(p, lp, lq))
    kl = tau * tau * kl / s.shape[0]
    assert losses.kd_loss(s, t, tau).item() == pytest.approx(h + kl, rel=1e-10)


# ----------------------------------------------------------------------------------------------------------------
# kd_rampup
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [20, 40, 1])
def test_kd_rampup_values(alpha):
    for epoch in (0, 1, alpha / 2, alpha, 2 * alpha):
        x = min(float(epoch), float(alpha)) / alpha
        expect = math.exp(-5.0 * (1.0 - x) ** 2)
        assert losses.kd_rampup(epoch, alpha) == pytest.approx(expect, rel=1e-12, abs=0)
    assert losses.kd_rampup(0, alpha) == pytest.approx(math.exp(-5.0), rel=1e-12)
    assert losses.kd_rampup(alpha, alpha) == 1.0
    assert losses.kd_rampup(2 * alpha, alpha) == 1.0
    assert losses.kd_rampup(alpha + 1, alpha) == 1.0


def test_kd_rampup_hand_values():
    assert losses.kd_rampup(1, 20) == pytest.approx(math.exp(-5.0 * (19 / 20) ** 2), rel=1e-12)
    assert losses.kd_rampup(10, 20) == pytest.approx(math.exp(-5.0 * 0.25), rel=1e-12)
    assert losses.kd_rampup(20, 40) == pytest.approx(math.exp(-1.25), rel=1e-12)
    assert losses.kd_rampup(1, 40) == pytest.approx(math.exp(-5.0 * (39 / 40) ** 2), rel=1e-12)
    assert losses.kd_rampup(0.5, 1) == pytest.approx(math.exp(-1.25), rel=1e-12)
    assert losses.kd_rampup(1, 1) == 1.0


@pytest.mark.parametrize("alpha", [20, 40, 1, 3.5])
def test_kd_rampup_monotone(alpha):
    ws = [losses.kd_rampup(e, alpha) for e in range(0, int(3 * alpha) + 2)]
    for a, b in zip(ws, ws[1:]):
        assert b >= a
    for e in range(0, int(3 * alpha) + 2):
        assert losses.kd_rampup(e, alpha) == pytest.approx(rampup_ref(e, alpha), rel=1e-12)
        assert 0.0 < losses.kd_rampup(e, alpha) <= 1.0
        if e >= alpha:
            assert losses.kd_rampup(e, alpha) == 1.0


@pytest.mark.parametrize("alpha", [0, 0.0, 0.5])
def test_kd_rampup_constant_below_one(alpha):
    for epoch in (0, 1, 5, 20, 100):
        assert losses.kd_rampup(epoch, alpha) == float(alpha)


# ----------------------------------------------------------------------------------------------------------------
# ODMT's total distillation term
# ----------------------------------------------------------------------------------------------------------------


def odmt_kd_ref(z_id, z_t, z_v, tau, w):
    """w * [KD(z_t <- z_id) + KD(z_v <- z_id) + KD(z_id <- z_ens)], z_ens = (z_id + z_t + z_v) / 3, loops only."""
    a, b, c = z_id.tolist(), z_t.tolist(), z_v.tolist()
    ens = [[(x + y + z) / 3.0 for x, y, z in zip(ra, rb, rc)] for ra, rb, rc in zip(a, b, c)]
    return w * (kd_ref(b, a, tau) + kd_ref(c, a, tau) + kd_ref(a, ens, tau))


@pytest.mark.parametrize("tau", TEMPS)
@pytest.mark.parametrize("epoch,alpha", [(0, 20), (5, 20), (20, 20), (3, 0.5), (7, 40)])
def test_odmt_total_distillation(tau, epoch, alpha):
    z_id = _random_logits(41, n=6, c=8)
    z_t = _random_logits(42, n=6, c=8)
    z_v = _random_logits(43, n=6, c=8)
    mask = _random_mask(44, n=6, c=8)
    z_id, z_t, z_v = (z.masked_fill(mask, losses.MASK_VALUE) for z in (z_id, z_t, z_v))
    w = losses.kd_rampup(epoch, alpha)
    assert w == pytest.approx(rampup_ref(epoch, alpha), rel=1e-12)
    z_ens = (z_id + z_t + z_v) / 3
    got = w * (
        losses.kd_loss(z_t, z_id, tau) + losses.kd_loss(z_v, z_id, tau) + losses.kd_loss(z_id, z_ens, tau)
    )
    assert torch.isfinite(got)
    ref = odmt_kd_ref(z_id, z_t, z_v, tau, w)
    assert got.item() == pytest.approx(ref, rel=1e-10, abs=1e-12)
    # teacher-first composition gives a different number: the argument order is student-first
    wrong = w * (kd_ref(z_id, z_t, tau) + kd_ref(z_id, z_v, tau) + kd_ref(z_ens, z_id, tau))
    assert abs(got.item() - wrong) > 1e-6 * max(1.0, abs(ref))


# ----------------------------------------------------------------------------------------------------------------
# inbatch_logits
# ----------------------------------------------------------------------------------------------------------------


def _inbatch_case():
    # example 0: sequence 5 -> 7 -> 9 -> 11 (inputs 5, 7, 9; targets 7, 9, 11)
    # example 1: sequence 13 -> 7 -> 15     (inputs 13, 7, 15; targets 7, 15, 0 = no loss at the last position)
    example_items = torch.tensor([[5, 7, 9, 11], [13, 7, 15, 0]])
    target_ids = torch.tensor([[7, 9, 11], [7, 15, 0]])
    cand_ids = torch.tensor([5, 7, 9, 11, 13, 15])  # unique ids of the batch
    cand_counts = torch.tensor([1, 2, 1, 1, 1, 1])  # batch slots holding each candidate
    g = torch.Generator().manual_seed(123)
    user_vecs = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    cand_vecs = torch.randn(6, 4, generator=g, dtype=torch.float64)
    pop = torch.tensor([0.05, 0.3, 0.1, 0.2, 0.15, 0.2], dtype=torch.float64)
    return user_vecs, target_ids, cand_ids, cand_vecs, example_items, pop.log(), cand_counts


def inbatch_ref(user_vecs, target_ids, cand_ids, cand_vecs, example_items, example_users, log_pop, cand_counts):
    uv, tg, ci, cv, ei = (x.tolist() for x in (user_vecs, target_ids, cand_ids, cand_vecs, example_items))
    lp = log_pop.tolist() if log_pop is not None else None
    cc = cand_counts.tolist() if cand_counts is not None else None
    eu = example_users.tolist() if example_users is not None else None
    rows, labels = [], []
    for b in range(len(tg)):
        # items of the user's sequence(s): every example of the same user (or just b's own)
        user_items = set()
        for b2 in range(len(ei)):
            if b2 == b or (eu is not None and eu[b2] == eu[b]):
                user_items.update(i for i in ei[b2] if i != 0)
        for t in range(len(tg[b])):
            target = tg[b][t]
            if target <= 0:
                continue
            row = []
            for c in range(len(ci)):
                logit = sum(uv[b][t][d] * cv[c][d] for d in range(len(cv[c])))
                if lp is not None:
                    logit -= lp[c]
                if cc is not None and ci[c] not in user_items:
                    logit += math.log(cc[c])
                if ci[c] in user_items and ci[c] != target:
                    logit = losses.MASK_VALUE
                row.append(logit)
            rows.append(row)
            labels.append(ci.index(target))
    return rows, labels


@pytest.mark.parametrize("users", [None, (3, 4), (3, 3)])
@pytest.mark.parametrize("use_pop", [True, False])
@pytest.mark.parametrize("use_counts", [True, False])
def test_inbatch_logits_by_loop(users, use_pop, use_counts):
    user_vecs, target_ids, cand_ids, cand_vecs, example_items, log_pop, cand_counts = _inbatch_case()
    example_users = torch.tensor(users) if users is not None else None
    log_pop = log_pop if use_pop else None
    cand_counts = cand_counts if use_counts else None
    args = (user_vecs, target_ids, cand_ids, cand_vecs, example_items, example_users, log_pop, cand_counts)

    logits, labels = losses.inbatch_logits(*args)
    ref_rows, ref_labels = inbatch_ref(*args)
    assert logits.shape == (5, 6)
    assert labels.tolist() == ref_labels == [1, 2, 3, 1, 5]
    assert torch.allclose(logits, torch.tensor(ref_rows, dtype=logits.dtype), rtol=1e-12, atol=1e-12)

    # masking as expected in the shared-user case: example 1's rows also mask 5, 9, 11 and example 0's mask 13, 15
    masked = logits == losses.MASK_VALUE
    if users == (3, 3):
        assert masked.sum(-1).tolist() == [5, 5, 5, 5, 5]
    else:
        assert masked.sum(-1).tolist() == [3, 3, 3, 2, 2]

    # the loss is the cross-entropy of these logits, and that cross-entropy matches a hand-written one
    ce = F.cross_entropy(*losses.inbatch_logits(*args))
    loss = losses.inbatch_softmax_loss(*args)
    assert loss.item() == pytest.approx(ce.item(), rel=1e-12)
    hand = 0.0
    for row, lab in zip(ref_rows, ref_labels):
        m = max(row)
        hand += -(row[lab] - m - math.log(sum(math.exp(x - m) for x in row)))
    assert loss.item() == pytest.approx(hand / len(ref_rows), rel=1e-10)


# --------------------------------------------------------------------------------------------------------------
# Distillation over the batch's slots (the original's layout: one softmax column per slot of the batch), against the
# merged columns of inbatch_logits (one column per unique item, its multiplicity added as log(count)).


def _per_slot(user_vecs, full, users, item_vecs, log_pop):
    """Per position with a target: logits over every real slot of the batch (loop), masked like the original (every
    slot holding an item of the user's sequences except this position's own target slot), and the label slot."""
    b, s = full.shape
    slots = [(i, j) for i in range(b) for j in range(s) if full[i, j] > 0]
    rows, labels = [], []
    for i in range(b):
        own_items = {int(full[k, j]) for k in range(b) if users[k] == users[i] for j in range(s) if full[k, j] > 0}
        for t in range(s - 1):
            target = int(full[i, t + 1])
            if target == 0:
                continue
            row = []
            for (k, j) in slots:
                item = int(full[k, j])
                value = float(user_vecs[i, t] @ item_vecs[item]) - float(log_pop[item])
                if item in own_items and not (k == i and j == t + 1):
                    value = losses.MASK_VALUE
                row.append(value)
            rows.append(row)
            labels.append(slots.index((i, t + 1)))
    return torch.tensor(rows, dtype=torch.float64), torch.tensor(labels)


def test_merged_columns_equal_the_per_slot_softmax_for_ce_and_distillation():
    g = torch.Generator().manual_seed(3)
    full = torch.tensor([[0, 3, 5, 7], [2, 3, 9, 3], [5, 8, 1, 3], [4, 6, 5, 2]])  # items repeated across slots
    users = torch.tensor([0, 1, 2, 1])  # examples 1 and 3: one user
    b, s = full.shape
    n_items, d = 10, 4
    item_vecs = torch.randn(n_items, d, generator=g, dtype=torch.float64)
    log_pop = torch.randn(n_items, generator=g, dtype=torch.float64) * 0.3
    student_u = torch.randn(b, s - 1, d, generator=g, dtype=torch.float64)
    teacher_u = torch.randn(b, s - 1, d, generator=g, dtype=torch.float64)
    targets = full[:, 1:]
    flat = full.reshape(-1)
    cand = torch.unique(flat[flat > 0])
    counts = torch.stack([(flat == c).sum() for c in cand])
    merged = {}
    for name, u in (("s", student_u), ("t", teacher_u)):
        merged[name] = losses.inbatch_logits(u, targets, cand, item_vecs[cand], full, users, log_pop[cand], counts,
                                             return_log_counts=True)
    slot_s, labels = _per_slot(student_u, full, users, item_vecs, log_pop)
    slot_t, _ = _per_slot(teacher_u, full, users, item_vecs, log_pop)
    # cross-entropy: merged (log counts added) == per slot
    torch.testing.assert_close(F.cross_entropy(merged["s"][0], merged["s"][1]), F.cross_entropy(slot_s, labels))
    for tau in (0.3, 0.5, 1.0):
        per_slot = losses.kd_loss(slot_s, slot_t, tau)
        got = losses.kd_loss(merged["s"][0], merged["t"][0], tau, log_counts=merged["s"][2])
        torch.testing.assert_close(got, per_slot, rtol=1e-9, atol=1e-9)
        if tau != 1.0:  # ignoring the multiplicity distils over merged columns: not the original's loss
            wrong = losses.kd_loss(merged["s"][0], merged["t"][0], tau)
            assert abs(float(wrong) - float(per_slot)) > 1e-4
