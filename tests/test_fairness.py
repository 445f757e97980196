"""Tests of recbole_mm.fairness: metrics against hand computations (and sklearn when installed), label mapping,
input errors, and the post-hoc attacker audit on synthetic vectors with and without a linearly encoded attribute."""

import math

import numpy as np
import pytest
import torch

torch.set_num_threads(1)

from recbole_mm.fairness import (  # noqa: E402
    ML1M_AGE_CLASSES,
    ML1M_AGE_EDGES,
    Attacker,
    audit,
    auc_from_hard_predictions,
    auc_from_probabilities,
    macro_f1,
    micro_f1,
    sensitive_labels,
)


# ------------------------------------------------------------------------------------------------ helpers


def pairwise_auc(y, s):
    """Reference AUC: fraction of (positive, negative) pairs ranked correctly, ties = 1/2 (double loop)."""
    pos = [s[i] for i in range(len(y)) if y[i] == 1]
    neg = [s[i] for i in range(len(y)) if y[i] == 0]
    total = 0.0
    for a in pos:
        for b in neg:
            total += 1.0 if a > b else (0.5 if a == b else 0.0)
    return total / (len(pos) * len(neg))


# ------------------------------------------------------------------------------------------------ AUC


def test_auc_small_hand_case():
    y = [1, 0, 1, 0, 1, 0]
    s = [0.9, 0.9, 0.5, 0.2, 0.2, 0.1]
    # pos 0.9: vs 0.9 -> 1/2, vs 0.2 -> 1, vs 0.1 -> 1; pos 0.5: 0, 1, 1; pos 0.2: 0, 1/2, 1  => 6/9
    assert pairwise_auc(y, s) == pytest.approx(6 / 9)
    assert auc_from_probabilities(y, s) == pytest.approx(6 / 9, abs=1e-12)
    assert auc_from_probabilities(torch.tensor(y), torch.tensor(s)) == pytest.approx(6 / 9, abs=1e-12)
    # perfect / reversed rankings
    assert auc_from_probabilities([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert auc_from_probabilities([0, 0, 1, 1], [0.4, 0.3, 0.2, 0.1]) == 0.0
    assert auc_from_probabilities([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5


def test_auc_matches_pairwise_count_with_many_ties():
    rng = np.random.default_rng(3)
    for _ in range(20):
        n = int(rng.integers(4, 40))
        y = rng.integers(0, 2, size=n)
        y[0], y[1] = 0, 1
        s = rng.integers(0, 5, size=n) / 4.0  # few distinct values -> many ties
        got = auc_from_probabilities(y, s)
        assert isinstance(got, float) and not math.isnan(got)
        assert got == pytest.approx(pairwise_auc(list(y), list(s)), abs=1e-12)


def test_auc_matches_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(7)
    for _ in range(10):
        y = rng.integers(0, 2, size=50)
        y[:2] = [0, 1]
        s = np.round(rng.random(50), 1)
        assert auc_from_probabilities(y, s) == pytest.approx(metrics.roc_auc_score(y, s), abs=1e-12)
        p = (s > 0.5).astype(int)
        assert auc_from_hard_predictions(y, p) == pytest.approx(metrics.roc_auc_score(y, p), abs=1e-12)


def test_hard_auc_is_mean_of_tpr_and_tnr():
    y = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    p = [1, 1, 1, 0, 0, 0, 0, 0, 1, 1]
    tp = sum(1 for a, b in zip(y, p) if a == 1 and b == 1)
    tn = sum(1 for a, b in zip(y, p) if a == 0 and b == 0)
    tpr, tnr = tp / 4, tn / 6  # 3/4, 4/6
    expected = (tpr + tnr) / 2
    assert expected == pytest.approx((0.75 + 4 / 6) / 2)
    assert auc_from_hard_predictions(y, p) == pytest.approx(expected, abs=1e-12)
    assert auc_from_hard_predictions(torch.tensor(y), torch.tensor(p, dtype=torch.bool)) == pytest.approx(expected)
    # constant predictions are chance whatever the class balance
    assert auc_from_hard_predictions(y, [1] * 10) == 0.5
    assert auc_from_hard_predictions(y, [0] * 10) == 0.5


def test_auc_errors():
    with pytest.raises(ValueError, match="only one class"):
        auc_from_probabilities([1, 1, 1], [0.2, 0.3, 0.4])
    with pytest.raises(ValueError, match="only one class"):
        auc_from_hard_predictions([0, 0], [0, 1])
    with pytest.raises(ValueError, match="NaN"):
        auc_from_probabilities([0, 1], [0.2, float("nan")])
    with pytest.raises(ValueError, match="0/1"):
        auc_from_hard_predictions([0, 1], [0.2, 0.7])
    with pytest.raises(ValueError, match="binary"):
        auc_from_probabilities([0, 2], [0.2, 0.7])
    with pytest.raises(ValueError, match="entries"):
        auc_from_probabilities([0, 1, 1], [0.2, 0.7])


# ------------------------------------------------------------------------------------------------ F1


def test_f1_against_hand_confusion_matrix():
    y = [0, 0, 0, 1, 1, 2, 2, 2, 2]
    p = [0, 1, 0, 1, 2, 2, 2, 0, 1]
    # confusion (rows true, columns predicted):
    #   true 0: [2, 1, 0]   true 1: [0, 1, 1]   true 2: [1, 1, 2]
    # class 0: TP 2, FP 1, FN 1 -> F1 4/6; class 1: TP 1, FP 2, FN 1 -> 2/5; class 2: TP 2, FP 1, FN 2 -> 4/7
    assert micro_f1(y, p) == pytest.approx(5 / 9, abs=1e-12)  # = accuracy
    assert macro_f1(y, p) == pytest.approx((4 / 6 + 2 / 5 + 4 / 7) / 3, abs=1e-12)
    assert micro_f1(torch.tensor(y), torch.tensor(p)) == pytest.approx(5 / 9)
    # a class that is listed but never true nor predicted counts as 0 in the macro average
    assert macro_f1(y, p, labels=[0, 1, 2, 3]) == pytest.approx((4 / 6 + 2 / 5 + 4 / 7) / 4, abs=1e-12)
    assert micro_f1([3, 1], [3, 1]) == 1.0 and macro_f1([3, 1], [3, 1]) == 1.0
    with pytest.raises(ValueError):
        micro_f1([0, 1], [0])


def test_f1_matches_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(11)
    for _ in range(10):
        y = rng.integers(0, 5, size=60)
        p = rng.integers(0, 6, size=60)
        assert micro_f1(y, p) == pytest.approx(metrics.f1_score(y, p, average="micro"), abs=1e-12)
        assert macro_f1(y, p) == pytest.approx(metrics.f1_score(y, p, average="macro"), abs=1e-12)


# ------------------------------------------------------------------------------------------------ labels


USER_TABLE = {
    #        0      1     2      3    4     5        6             7     8
    "gender": ["M", "F", None, "M", "", "[PAD]", float("nan"), "F", "M"],
    "age": ["24", "7", "53", "10", "24", "", "73", "18", "56"],
    "occupation": ["x", "x", "x", "x", "x", "x", "x", "x", "x"],
    "zip_code": [None, "", "[PAD]", float("nan"), None, None, None, None, None],
}


def test_labels_with_missing_values_counted():
    out = sensitive_labels(USER_TABLE, ["gender"], [1, 2, 3, 4, 5, 6, 7, 8])
    labels, classes, mask = out["gender"]
    assert classes == ["F", "M"]  # F = 0, M = 1 as in FMMRec
    assert mask.tolist() == [True, False, True, False, False, False, True, True]
    assert labels.tolist() == [0, -1, 1, -1, -1, -1, 0, 1]
    assert labels.dtype == torch.long and mask.dtype == torch.bool
    assert int((~mask).sum()) == 4


def test_raw_age_classes_sorted_numerically_and_ml1m_binning():
    ids = torch.tensor([0, 1, 2, 3, 5, 6, 7, 8])
    labels, classes, mask = sensitive_labels(USER_TABLE, ["age"], ids)["age"]
    assert classes == ["7", "10", "18", "24", "53", "56", "73"]  # numeric, not lexicographic, order
    assert mask.tolist() == [True, True, True, True, False, True, True, True]
    assert labels.tolist() == [3, 0, 4, 1, -1, 6, 2, 5]

    labels, classes, mask = sensitive_labels(USER_TABLE, ["age"], ids, bins={"age": ML1M_AGE_EDGES})["age"]
    # 24 -> 18-24, 7 -> <18, 53 -> 50-55, 10 -> <18, 73 -> 56+, 18 -> 18-24, 56 -> 56+
    assert classes == ["<18", "18-24", "50-55", "56+"]
    assert labels.tolist() == [1, 0, 2, 0, -1, 3, 1, 3]

    ages = [7, 17, 18, 24, 25, 34, 35, 44, 45, 49, 50, 55, 56, 73]
    lab, cls, _ = sensitive_labels({"age": ages}, ["age"], list(range(len(ages))), bins={"age": ML1M_AGE_EDGES})["age"]
    assert cls == list(ML1M_AGE_CLASSES)
    assert lab.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6]
    codes = [1, 18, 25, 35, 45, 50, 56]  # MovieLens-1M's own age codes map to themselves
    lab, _, _ = sensitive_labels({"age": codes}, ["age"], list(range(7)), bins={"age": ML1M_AGE_EDGES})["age"]
    assert lab.tolist() == list(range(7))


class _FakeRecBoleDataset:
    """Duck-typed RecBole Dataset: user_feat rows ordered by internal id, token ids, field2id_token (0 = [PAD])."""

    def __init__(self):
        self.field2id_token = {"gender": np.array(["[PAD]", "M", "F"]), "user_id": np.array(["[PAD]", "a", "b", "c"])}
        self.user_feat = {"user_id": torch.tensor([0, 1, 2, 3]), "gender": torch.tensor([0, 2, 0, 1])}
        # before RecBole's build() user_feat is a DataFrame and a NaN-filled merge leaves float token ids
        self.field2id_token["occupation"] = np.array(["[PAD]", "writer", "artist"])
        self.user_feat["occupation"] = np.array([np.nan, 2.0, np.nan, 1.0])


def test_labels_from_recbole_like_dataset():
    labels, classes, mask = sensitive_labels(_FakeRecBoleDataset(), ["gender"], None)["gender"]
    assert classes == ["F", "M"]  # raw tokens, not RecBole's remapped ids
    assert labels.tolist() == [0, -1, 1]  # user_ids=None: internal ids 1..3 ([PAD] user 0 skipped)
    assert mask.tolist() == [True, False, True]
    labels, classes, mask = sensitive_labels(_FakeRecBoleDataset(), ["occupation"], [0, 1, 2, 3])["occupation"]
    assert classes == ["artist", "writer"] and labels.tolist() == [-1, 0, -1, 1]
    assert mask.tolist() == [False, True, False, True]
    with pytest.raises(ValueError, match="'age'.*load_col"):
        sensitive_labels(_FakeRecBoleDataset(), ["age"], None)


def test_label_errors_name_the_field_and_the_fix():
    with pytest.raises(ValueError, match=r"'religion'.*not in the user table.*\.user file"):
        sensitive_labels(USER_TABLE, ["gender", "religion"], [0, 1])
    with pytest.raises(ValueError, match=r"'occupation' has a single class.*cannot be audited.*drop"):
        sensitive_labels(USER_TABLE, ["occupation"], [0, 1, 2])
    with pytest.raises(ValueError, match=r"'gender' has a single class"):
        sensitive_labels(USER_TABLE, ["gender"], [0, 2, 3, 4])  # only M among the users with a value
    with pytest.raises(ValueError, match=r"'zip_code': none of the 4 users has a value.*fill"):
        sensitive_labels(USER_TABLE, ["zip_code"], [0, 1, 2, 3])
    with pytest.raises(ValueError, match="out of range"):
        sensitive_labels(USER_TABLE, ["gender"], [0, 99])


# ------------------------------------------------------------------------------------------------ attacker


def test_attacker_architecture_and_init():
    torch.manual_seed(0)
    a = Attacker(256, 2)
    linears = [m for m in a.net if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(256, 128), (128, 1)]
    assert any(isinstance(m, torch.nn.LeakyReLU) and m.negative_slope == 0.2 for m in a.net)
    assert any(isinstance(m, torch.nn.Dropout) and m.p == 0.2 for m in a.net)
    assert 0.008 < float(linears[0].weight.detach().std()) < 0.012
    assert 0.005 < float(linears[0].bias.detach().std()) < 0.015 and linears[0].bias.abs().max() < 0.06  # N(0, 0.01)
    x = torch.randn(5, 256)
    assert a(x).shape == (5,)
    a.eval()
    assert set(a.predict(x).tolist()) <= {0, 1}
    assert torch.allclose(a.loss(a(x), torch.ones(5)), torch.nn.functional.binary_cross_entropy(a.predict_proba(x),
                                                                                              torch.ones(5)))
    m = Attacker(10, 7, hidden=3).eval()
    assert m(torch.randn(4, 10)).shape == (4, 7)
    assert torch.allclose(m.predict_proba(torch.randn(4, 10)).sum(-1), torch.ones(4))
    y = torch.tensor([0, 6, 3, 1])
    x = torch.randn(4, 10)
    assert torch.allclose(m.loss(m(x), y), torch.nn.functional.cross_entropy(m(x), y))
    with pytest.raises(ValueError):
        Attacker(10, 1)


# ------------------------------------------------------------------------------------------------ audit


def _synthetic(n=600, d=16, informative=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    if informative:
        gender = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
        occupation = (x[:, 2:6] * 2.0).argmax(dim=1)  # 4 classes, linearly encoded
    else:
        gender = torch.randint(0, 2, (n,), generator=g)
        occupation = torch.randint(0, 4, (n,), generator=g)
    gender_mask = torch.ones(n, dtype=torch.bool)
    gender_mask[:40] = False  # 40 users without a gender
    gender = torch.where(gender_mask, gender, torch.full_like(gender, -1))
    labels = {
        "gender": (gender, ["F", "M"], gender_mask),
        "occupation": (occupation, ["a", "b", "c", "d"], torch.ones(n, dtype=torch.bool)),
    }
    return x, labels


AUDIT_KW = dict(epochs=25, lr=1e-2, batch_size=128, seed=0)


def test_audit_detects_linearly_encoded_attributes():
    x, labels = _synthetic(informative=True)
    rep = audit(x, labels, **AUDIT_KW)
    g, o = rep["gender"], rep["occupation"]
    assert g["kind"] == "binary" and o["kind"] == "multiclass"
    assert g["excluded"] == 40 and g["n_train"] + g["n_test"] == 560 and g["n_test"] == 112
    assert o["excluded"] == 0 and o["n_test"] == 120
    assert g["auc"] > 0.9 and g["auc_hard"] > 0.85 and g["chance"] == 0.5
    assert o["micro_f1"] > o["chance"] + 0.3 and o["macro_f1"] > 0.5
    assert 0.15 < o["chance"] < 0.45


def test_audit_on_noise_is_near_chance():
    x, labels = _synthetic(informative=False)
    rep = audit(x, labels, **AUDIT_KW)
    g, o = rep["gender"], rep["occupation"]
    assert abs(g["auc"] - 0.5) < 0.15 and abs(g["auc_hard"] - 0.5) < 0.15
    assert abs(o["micro_f1"] - o["chance"]) < 0.15
    assert o["micro_f1"] < 0.45
    # imbalanced classes: chance is the majority-class rate (about 0.7), not 1 / n_classes
    g = torch.Generator().manual_seed(5)
    age = torch.multinomial(torch.tensor([0.7, 0.2, 0.1]), x.shape[0], replacement=True, generator=g)
    a = audit(x, {"age": (age, ["<18", "18-24", "25-34"], torch.ones(x.shape[0], dtype=torch.bool))}, **AUDIT_KW)["age"]
    assert 0.55 < a["chance"] < 0.85
    assert abs(a["micro_f1"] - a["chance"]) < 0.15
    # the majority predictor's macro-F1: 2p / (1 + p) for its class, 0 for the two others, averaged over 3 classes
    p = a["chance"]
    assert a["chance_macro_f1"] == pytest.approx(2 * p / (1 + p) / 3, abs=1e-9)


def test_audit_is_deterministic_detached_and_leaves_inputs_alone():
    x0, labels = _synthetic(n=300)
    x = x0.clone().requires_grad_(True)
    before = x.detach().clone()
    rng_before = torch.get_rng_state()
    kw = dict(AUDIT_KW, epochs=5)
    r1 = audit(x, labels, **kw)
    assert x.grad is None and x.requires_grad and x.is_leaf
    assert torch.equal(x.detach(), before)
    assert torch.equal(torch.get_rng_state(), rng_before)  # global RNG untouched
    # a non-leaf input built from a parameter: no gradient may reach the parameter
    w = torch.nn.Parameter(torch.eye(16))
    r2 = audit(x0 @ w, labels, **kw)
    assert w.grad is None
    assert r1 == r2  # same vectors, same seed -> identical report
    r3 = audit(x0, labels, **dict(kw, seed=1))
    assert r3 != r1
    # auditing one attribute alone gives the same result as auditing it with others
    assert audit(x0, {"occupation": labels["occupation"]}, **kw)["occupation"] == r1["occupation"]


def test_audit_input_errors():
    x, labels = _synthetic(n=50)
    with pytest.raises(ValueError, match="train_fraction"):
        audit(x, labels, train_fraction=1.0, epochs=1)
    with pytest.raises(ValueError, match="aligned"):
        audit(x[:10], labels, epochs=1)
    with pytest.raises(ValueError, match="single class"):
        audit(x, {"g": torch.zeros(50, dtype=torch.long)}, epochs=1)
    y = torch.zeros(50, dtype=torch.long)
    y[0] = 1  # only one positive: a held-out part of 10 users has a single class
    with pytest.raises(ValueError, match="held-out users all have class"):
        audit(x, {"g": (y, ["F", "M"], torch.ones(50, dtype=torch.bool))}, epochs=1, seed=0)
