"""Post-hoc sensitive-attribute audit of user representations (the FMMRec fairness evaluation).

FMMRec ("FMMRec: Fairness-aware Multimodal Recommendation", arXiv 2310.17373; journal version "Causality-Inspired
Fair Representation Learning for Multimodal Recommendation", ACM TOIS 43(6), 2025) measures how much a
recommender's user representations leak sensitive attributes (gender, age, occupation): after training, **fresh**
attackers are trained on the representations of one part of the users and tested on the held-out users. Lower is
fairer; 0.5 AUC is chance. See ``specs/models.md`` sections 7a (attacker), 7c (hyperparameters), 7d (evaluation)
and 7f (quirks). This module is an independent implementation of that protocol (torch and numpy only); no code of
``WeixinChen98/FMMRec`` is reused.

Pieces:

- :func:`sensitive_labels`: raw ``.user`` attribute values of internal user ids -> contiguous class indices plus
  a mask of the users that have a value;
- :func:`auc_from_probabilities` (rank-based ROC AUC, Mann-Whitney U, ties averaged) and
  :func:`auc_from_hard_predictions` (the original's AUC of hard 0/1 predictions, equal to ``(TPR + TNR) / 2``);
- :func:`micro_f1` (the original's multi-class metric; equal to accuracy) and :func:`macro_f1`;
- :class:`Attacker`: the spec's attacker MLP;
- :func:`audit`: one fresh attacker per attribute, seeded split, held-out scores.

Typical use after ``fit`` (the representation is whatever the model exposes per internal user id)::

    from recbole_mm.fairness import audit, sensitive_labels
    uids = torch.arange(1, dataset.user_num)                     # internal ids; 0 is RecBole's [PAD] user
    labels = sensitive_labels(dataset, ["gender", "age", "occupation"], uids)
    report = audit(model.user_embedding.weight[uids], labels, epochs=100)
    report["gender"]["auc_hard"], report["age"]["micro_f1"]

Decisions where the spec is silent (documented here and on each function):

- **Age is not binned by default.** The spec's 7 age classes are MovieLens-1M's own coded age groups
  (``users.dat``: 1, 18, 25, 35, 45, 50, 56); FMMRec does not bin anything itself and has no MovieLens-100K setup.
  ml-100k stores raw ages (7..73, about 60 distinct values), which are kept as raw classes unless the caller passes
  ``bins={"age": ML1M_AGE_EDGES}``, which maps raw ages to the ML-1M groups (and maps ML-1M codes to themselves).
- **Class order**: sorted values (numerically when every value is a number), so gender gives F = 0, M = 1 as in
  FMMRec's preprocessing.
- **Split**: per attribute, a seeded random permutation of the users that have the attribute (not stratified,
  like the original's random 20% user test ratio); the same seed and mask give the same split for every attribute.
- **Attacker details** (layer order Linear - LeakyReLU - Dropout - Linear, weights and biases drawn from N(0, 0.01),
  as the original's ``discriminators.py``), decision threshold 0.5 (logit > 0), Adam without weight
  decay for the post-hoc attackers (``l2_attack`` 1e-4 is documented only for the training-time attackers;
  pass ``weight_decay`` to change it), the last epoch's attacker is the one evaluated (no model selection).
- **chance** for multi-class attributes: micro-F1 of the majority-class baseline, i.e. the fraction of held-out
  users that belong to the most frequent class of the training part.
"""

from __future__ import annotations

import math
import numbers
import zlib
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

__all__ = [
    "ML1M_AGE_EDGES",
    "ML1M_AGE_CLASSES",
    "MISSING_TOKENS",
    "as_fields",
    "sensitive_labels",
    "auc_from_probabilities",
    "auc_from_hard_predictions",
    "micro_f1",
    "macro_f1",
    "Attacker",
    "audit",
]

#: Lower edges of MovieLens-1M's age groups after "Under 18": a raw age ``a`` goes to group
#: ``#{edges <= a}``, i.e. <18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+ (README of ml-1m, ``users.dat``).
ML1M_AGE_EDGES: Tuple[float, ...] = (18, 25, 35, 45, 50, 56)
#: Class names of the groups defined by :data:`ML1M_AGE_EDGES`.
ML1M_AGE_CLASSES: Tuple[str, ...] = ("<18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+")
#: String values treated as "no value" (compared after stripping whitespace, case-sensitive for ``[PAD]``).
MISSING_TOKENS = frozenset({"", "[PAD]", "nan", "NaN", "None", "null", "NULL"})


# ----------------------------------------------------------------------------------------------------------------
# labels
# ----------------------------------------------------------------------------------------------------------------


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str):
        return value.strip() in MISSING_TOKENS
    if isinstance(value, numbers.Real):
        return math.isnan(float(value))
    return False


def _as_number(value: Any) -> Optional[float]:
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def _canonical(value: Any) -> Any:
    """Hashable, comparable form of one present value: numbers as int/float, everything else as stripped str."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        f = float(value)
        return int(f) if f.is_integer() else f
    return str(value)


def _user_ids_array(user_ids: Any, n_rows: Optional[int], start: int) -> np.ndarray:
    if user_ids is None:
        if n_rows is None:
            raise ValueError("user_ids=None needs a table with a known number of rows; pass the internal user ids.")
        return np.arange(start, n_rows, dtype=np.int64)
    if isinstance(user_ids, torch.Tensor):
        ids = user_ids.detach().cpu().numpy()
    else:
        ids = np.asarray(user_ids)
    ids = ids.reshape(-1)
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"user_ids must be integer internal user ids, got dtype {ids.dtype}.")
    ids = ids.astype(np.int64)
    if ids.size and ids.min() < 0:
        raise ValueError("user_ids must be non-negative internal user ids.")
    if n_rows is not None and ids.size and ids.max() >= n_rows:
        raise ValueError(f"user id {int(ids.max())} is out of range: the user table has {n_rows} rows.")
    return ids


def _values_from_user_file(dataset: Any, field: str, user_ids: Any) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """``field`` read from the dataset's ``<name>.user`` atomic file, by internal user id, when RecBole did not load
    it (``load_col`` without it): the audit needs no ``load_col`` change, and no model's batches carry the
    attributes. ``None`` when there is no such file or column."""
    import csv
    import os

    path = os.path.join(str(getattr(dataset, "dataset_path", "")), f"{getattr(dataset, 'dataset_name', '')}.user")
    token_ids = getattr(dataset, "field2token_id", {}).get(getattr(dataset, "uid_field", None))
    if not os.path.isfile(path) or token_ids is None:
        return None
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter=str(dataset.config["field_separator"] or "\t"), quoting=csv.QUOTE_NONE)
        header = [h.split(":")[0] for h in next(reader, [])]
        if dataset.uid_field not in header:
            return None
        if field not in header:
            raise ValueError(f"field '{field}' is not a column of {os.path.basename(path)} (columns: "
                             f"{[h for h in header if h != dataset.uid_field]}); add `{field}:token` to it or remove "
                             f"'{field}' from the audited fields.")
        col, uid = header.index(field), header.index(dataset.uid_field)
        values = np.full(len(token_ids), None, dtype=object)
        for row in reader:
            if len(row) > max(col, uid) and row[uid] in token_ids:
                values[token_ids[row[uid]]] = row[col]
    ids = _user_ids_array(user_ids, len(values), start=1)
    return values[ids], ids


def _raw_values(user_table: Any, field: str, user_ids: Any) -> Tuple[np.ndarray, np.ndarray]:
    """Raw values of ``field`` for ``user_ids`` (object array) and the ids used."""
    user_feat = getattr(user_table, "user_feat", None)
    if hasattr(user_table, "field2id_token") and hasattr(user_table, "user_feat"):
        # A RecBole Dataset: user_feat rows are ordered by internal user id (row 0 is the [PAD] user) and token
        # fields hold remapped ids whose raw tokens are in field2id_token (id 0 = '[PAD]' = no value).
        columns = [] if user_feat is None else list(
            getattr(user_feat, "columns", user_feat.keys() if hasattr(user_feat, "keys") else []))
        if field not in columns:
            from_file = _values_from_user_file(user_table, field, user_ids)  # not loaded: read the .user file
            if from_file is not None:
                return from_file
        if user_feat is None:
            raise ValueError(
                f"field '{field}': the dataset has no user features; provide a .user file and load its columns "
                f"(e.g. `load_col: {{user: [user_id, {field}]}}`)."
            )
        if field not in columns:
            raise ValueError(
                f"field '{field}' is not a loaded user feature (loaded: {columns}) nor a column of the .user file; "
                f"add `{field}:token` to the .user file and list it in `load_col: {{user: [...]}}`."
            )
        column = user_feat[field]
        column = column.detach().cpu().numpy() if isinstance(column, torch.Tensor) else np.asarray(column)
        if column.ndim != 1:
            raise ValueError(f"field '{field}' is a sequence field; an audited attribute must be single-valued.")
        ids = _user_ids_array(user_ids, len(column), start=1)
        tokens = user_table.field2id_token.get(field)
        if tokens is not None:
            # before ``build()`` user_feat is a DataFrame whose token ids may be floats (NaN-filled left merge)
            codes = np.asarray(column[ids], dtype=np.float64)
            codes = np.where(np.isnan(codes), 0, codes).astype(np.int64)
            return np.asarray(tokens, dtype=object)[codes], ids
        return column[ids].astype(object), ids  # float field (RecBole imputes missing floats with the mean)
    if not hasattr(user_table, "__getitem__"):
        raise TypeError(
            "user_table must be a RecBole Dataset, or a mapping / DataFrame of columns indexed by internal user id."
        )
    try:
        present = field in user_table
    except TypeError:
        present = False
    if not present:
        keys = list(user_table.keys()) if hasattr(user_table, "keys") else []
        raise ValueError(
            f"field '{field}' is not in the user table (columns: {keys}); add `{field}:token` to the .user file "
            f"(and to `load_col`) or remove '{field}' from the audited fields."
        )
    column = user_table[field]
    if isinstance(column, torch.Tensor):
        column = column.detach().cpu().numpy()
    column = np.asarray(column, dtype=object)
    if column.ndim != 1:
        raise ValueError(f"field '{field}' must be one value per user, got shape {column.shape}.")
    ids = _user_ids_array(user_ids, len(column), start=0)
    return column[ids], ids


def as_fields(value) -> list:
    """``sensitive_fields`` as a list: a bare name (``gender`` on the command line) is one field."""
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def sensitive_labels(
    user_table: Any,
    fields: Sequence[str],
    user_ids: Any,
    bins: Optional[Mapping[str, Sequence[float]]] = None,
) -> Dict[str, Tuple[torch.Tensor, List[Any], torch.Tensor]]:
    """Map raw sensitive-attribute values of internal user ids to contiguous class indices.

    Args:
        user_table: either a RecBole ``Dataset`` (its ``user_feat`` is ordered by internal user id; token ids are
            mapped back to raw tokens through ``field2id_token``), or a mapping / ``pandas.DataFrame`` whose column
            ``field`` is indexed by **position = internal user id** (row ``u`` holds user ``u``).
        fields: attribute names, e.g. ``["gender", "age", "occupation"]`` (ml-100k-mm's ``.user`` columns).
        user_ids: internal user ids (int tensor / array / list), the rows of the representation to audit.
            ``None`` means every user (for a RecBole Dataset, ids ``1..user_num-1``: id 0 is the ``[PAD]`` user).
        bins: optional ``{field: increasing edges}``; a numeric value ``v`` goes to class ``#{edges <= v}``
            (so ``k`` edges give ``k + 1`` classes, classes absent among the users are dropped and the rest
            renumbered). ``{"age": ML1M_AGE_EDGES}`` maps ml-100k's raw ages to MovieLens-1M's 7 age groups, the
            classes FMMRec audits on ml1m. **Default: no binning** -- the spec documents no binning in FMMRec
            (ml1m's ages come pre-grouped in ``users.dat``), so raw values are kept as classes.

    Returns:
        ``{field: (labels, classes, mask)}``: ``labels`` a LongTensor ``[n]`` of class indices (``-1`` where the
        user has no value), ``classes`` the sorted raw values (numeric sort when all values are numbers, so
        F = 0, M = 1 for gender; group names for binned fields), ``mask`` a BoolTensor ``[n]``, False for users
        without a value (``None``, NaN, empty string or ``[PAD]``); ``int((~mask).sum())`` counts them.

    Raises:
        ValueError: a field missing from the table, a field where every user lacks a value, a field with a single
            class among the users (it cannot be audited), or a non-numeric value in a binned field.
    """
    if isinstance(fields, str):
        fields = [fields]
    bins = dict(bins or {})
    unknown = set(bins) - set(fields)
    if unknown:
        raise ValueError(f"bins given for fields that are not audited: {sorted(unknown)}.")
    out: Dict[str, Tuple[torch.Tensor, List[Any], torch.Tensor]] = {}
    for field in fields:
        values, ids = _raw_values(user_table, field, user_ids)
        n = len(values)
        mask_np = np.array([not _is_missing(v) for v in values], dtype=bool)
        if n == 0:
            raise ValueError(f"field '{field}': no users given (user_ids is empty).")
        if not mask_np.any():
            raise ValueError(
                f"field '{field}': none of the {n} users has a value (all missing / NaN / empty / [PAD]); fill the "
                f"'{field}' column of the .user file or check that it is loaded (`load_col`)."
            )
        present = [values[i] for i in np.flatnonzero(mask_np)]
        if field in bins:
            edges = np.asarray(bins[field], dtype=np.float64)
            if edges.ndim != 1 or edges.size == 0 or np.any(np.diff(edges) <= 0):
                raise ValueError(f"bins['{field}'] must be a non-empty strictly increasing sequence of edges.")
            numeric = [_as_number(v) for v in present]
            bad = [present[i] for i, x in enumerate(numeric) if x is None]
            if bad:
                raise ValueError(f"field '{field}' is binned but has non-numeric values, e.g. {bad[0]!r}.")
            groups = np.searchsorted(edges, np.asarray(numeric, dtype=np.float64), side="right")
            if tuple(edges.tolist()) == tuple(float(e) for e in ML1M_AGE_EDGES):
                names = list(ML1M_AGE_CLASSES)
            else:
                e = edges.tolist()
                names = [f"<{e[0]:g}"] + [f"[{a:g},{b:g})" for a, b in zip(e[:-1], e[1:])] + [f">={e[-1]:g}"]
            used = sorted(set(groups.tolist()))
            classes = [names[g] for g in used]
            index = {g: k for k, g in enumerate(used)}
            codes = [index[g] for g in groups.tolist()]
        else:
            canon = [_canonical(v) for v in present]
            numeric = [_as_number(c) for c in canon]
            if all(x is not None for x in numeric):
                key = {c: x for c, x in zip(canon, numeric)}
                classes = sorted(set(canon), key=lambda c: (key[c], str(c)))
            else:
                canon = [str(c) for c in canon]
                classes = sorted(set(canon))
            index = {c: k for k, c in enumerate(classes)}
            codes = [index[c] for c in canon]
        if len(classes) < 2:
            raise ValueError(
                f"field '{field}' has a single class ({classes[0]!r}) among the {int(mask_np.sum())} users with a "
                f"value: it cannot be audited; drop '{field}' from the fields or audit users with both values."
            )
        labels = np.full(n, -1, dtype=np.int64)
        labels[mask_np] = np.asarray(codes, dtype=np.int64)
        out[field] = (torch.from_numpy(labels), classes, torch.from_numpy(mask_np))
    return out


# ----------------------------------------------------------------------------------------------------------------
# metrics
# ----------------------------------------------------------------------------------------------------------------


def _to_numpy_1d(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.ndim != 1:
        a = a.reshape(-1)
    return a


def _binary_targets(y_true: Any) -> np.ndarray:
    y = _to_numpy_1d(y_true, "y_true")
    if y.size == 0:
        raise ValueError("y_true is empty.")
    if y.dtype == bool:
        y = y.astype(np.int64)
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"y_true must hold binary labels 0/1, got values {np.unique(y)[:10].tolist()}.")
    y = y.astype(np.int64)
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        raise ValueError(
            f"AUC is undefined: only one class ({int(y[0])}) is present in y_true; the held-out users need both "
            f"classes (use more users or another seed)."
        )
    return y


def _average_ranks(scores: np.ndarray) -> np.ndarray:
    """1-based ranks of ``scores`` with tied values given the mean of their ranks."""
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    # start index of each run of equal values
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], scores.size]  # exclusive
    mean_rank = (starts + 1 + ends) / 2.0  # mean of 1-based ranks starts+1 .. ends
    run_of = np.repeat(np.arange(starts.size), ends - starts)
    ranks = np.empty(scores.size, dtype=np.float64)
    ranks[order] = mean_rank[run_of]
    return ranks


def auc_from_probabilities(y_true: Any, prob: Any) -> float:
    """ROC AUC from scores by ranks (Mann-Whitney U), ties counted as one half.

    ``AUC = (R_pos - n_pos (n_pos + 1) / 2) / (n_pos n_neg)`` where ``R_pos`` is the sum of the (tie-averaged)
    ranks of the positives: the probability that a random positive scores above a random negative, ties 1/2.
    This equals ``sklearn.metrics.roc_auc_score`` (Hanley & McNeil 1982; Mann & Whitney 1947).

    Args:
        y_true: binary labels 0/1 (or bool), shape ``[n]``.
        prob: scores of class 1 (probabilities, logits or any monotone score), shape ``[n]``, finite.

    Returns:
        A float in [0, 1].

    Raises:
        ValueError: only one class in ``y_true``, non-binary labels, mismatched lengths or non-finite scores.
    """
    y = _binary_targets(y_true)
    s = _to_numpy_1d(prob, "prob").astype(np.float64)
    if s.size != y.size:
        raise ValueError(f"y_true has {y.size} entries but prob has {s.size}.")
    if not np.isfinite(s).all():
        raise ValueError("prob contains NaN or infinite values.")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    ranks = _average_ranks(s)
    u = ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def auc_from_hard_predictions(y_true: Any, y_pred: Any) -> float:
    """AUC of hard 0/1 predictions -- how the original FMMRec reports attribute leakage (spec 7d, 7f).

    FMMRec passes thresholded predictions (0.5) to ``roc_auc_score``. With a single threshold the ROC curve has
    one interior point ``(FPR, TPR)``, so the AUC is the trapezoid area ``(TPR + TNR) / 2`` = balanced accuracy.
    Computed here as the rank AUC of the 0/1 predictions (ties 1/2), which is that same number.

    Args:
        y_true: binary labels 0/1, shape ``[n]``.
        y_pred: hard predictions 0/1, shape ``[n]``.

    Raises:
        ValueError: only one class in ``y_true``, or labels / predictions that are not 0/1.
    """
    y = _binary_targets(y_true)
    p = _to_numpy_1d(y_pred, "y_pred")
    if p.size != y.size:
        raise ValueError(f"y_true has {y.size} entries but y_pred has {p.size}.")
    if p.dtype == bool:
        p = p.astype(np.int64)
    if not np.isin(p, (0, 1)).all():
        raise ValueError("y_pred must hold hard predictions 0/1; use auc_from_probabilities for scores.")
    return auc_from_probabilities(y, p.astype(np.float64))


def _confusion(y_true: Any, y_pred: Any, labels: Optional[Sequence[int]]) -> Tuple[np.ndarray, np.ndarray]:
    y = _to_numpy_1d(y_true, "y_true")
    p = _to_numpy_1d(y_pred, "y_pred")
    if y.size != p.size:
        raise ValueError(f"y_true has {y.size} entries but y_pred has {p.size}.")
    if y.size == 0:
        raise ValueError("y_true is empty.")
    if labels is None:
        labels = np.union1d(y, p)  # sklearn's default label set
    labels = np.asarray(list(labels))
    index = {v: k for k, v in enumerate(labels.tolist())}
    c = np.zeros((len(labels), len(labels)), dtype=np.int64)  # rows: true, columns: predicted
    for t, q in zip(y.tolist(), p.tolist()):
        if t in index and q in index:
            c[index[t], index[q]] += 1
    return c, labels


def micro_f1(y_true: Any, y_pred: Any) -> float:
    """Micro-averaged F1 for single-label multi-class predictions (FMMRec's metric for age and occupation).

    Micro averaging pools the counts over classes: ``TP = trace(C)``, and every wrong prediction is one false
    positive (for the predicted class) and one false negative (for the true class), so ``FP = FN = n - TP`` and
    ``F1 = 2 TP / (2 TP + FP + FN) = TP / n`` -- **micro-F1 equals accuracy** for single-label data.

    Raises:
        ValueError: empty input or mismatched lengths.
    """
    c, _ = _confusion(y_true, y_pred, None)
    tp = float(np.trace(c))
    n = float(c.sum())
    fp = fn = n - tp
    return float(2 * tp / (2 * tp + fp + fn))


def macro_f1(y_true: Any, y_pred: Any, labels: Optional[Sequence[int]] = None) -> float:
    """Macro-averaged F1: the unweighted mean over classes of ``2 TP_c / (2 TP_c + FP_c + FN_c)``.

    ``labels`` defaults to the classes present in ``y_true`` or ``y_pred`` (as ``sklearn.metrics.f1_score`` with
    ``average="macro"``); a listed class that is never true nor predicted counts as F1 = 0. Not reported by the
    original; given as a companion to :func:`micro_f1` that is not dominated by the majority class.
    """
    c, _ = _confusion(y_true, y_pred, labels)
    tp = np.diag(c).astype(np.float64)
    fp = c.sum(axis=0) - tp
    fn = c.sum(axis=1) - tp
    denom = 2 * tp + fp + fn
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return float(f1.mean())


# ----------------------------------------------------------------------------------------------------------------
# attacker
# ----------------------------------------------------------------------------------------------------------------


class Attacker(nn.Module):
    """FMMRec's attacker MLP (spec 7a, 7c): ``d -> d/2 -> out``, LeakyReLU(0.2), dropout 0.2, weights N(0, 0.01).

    Binary attributes (``n_classes == 2``): one logit, trained with binary cross-entropy (on logits, the
    numerically stable form of sigmoid + BCE). Multi-class attributes: ``n_classes`` logits, trained with the
    negative log-likelihood of their log-softmax.

    Layers Linear - LeakyReLU - Dropout - Linear; weights and biases drawn with standard deviation 0.01, as the
    original's discriminators (``src/common/discriminators.py``); ``hidden`` defaults to ``max(1, d_in // 2)``.
    """

    def __init__(self, d_in: int, n_classes: int, hidden: Optional[int] = None, dropout: float = 0.2):
        super().__init__()
        if d_in < 1:
            raise ValueError(f"d_in must be >= 1, got {d_in}.")
        if n_classes < 2:
            raise ValueError(f"n_classes must be >= 2, got {n_classes}: a single class cannot be attacked.")
        self.n_classes = int(n_classes)
        self.binary = self.n_classes == 2
        hidden = max(1, d_in // 2) if hidden is None else int(hidden)
        self.net = nn.Sequential(
            nn.Linear(d_in, hidden),
            nn.LeakyReLU(0.2),
            nn.Dropout(dropout),
            nn.Linear(hidden, 1 if self.binary else self.n_classes),
        )
        for m in self.net:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, mean=0.0, std=0.01)
                nn.init.normal_(m.bias, mean=0.0, std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits: ``[n]`` for a binary attribute, ``[n, n_classes]`` otherwise."""
        out = self.net(x)
        return out.squeeze(-1) if self.binary else out

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """BCE (binary) or NLL of the log-softmax (multi-class), averaged over the batch."""
        if self.binary:
            return F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype))
        return F.nll_loss(F.log_softmax(logits, dim=-1), target.long())

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """P(class 1) ``[n]`` for a binary attribute, class probabilities ``[n, C]`` otherwise."""
        logits = self(x)
        return torch.sigmoid(logits) if self.binary else torch.softmax(logits, dim=-1)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Hard predictions: threshold 0.5 (logit > 0) for binary, argmax otherwise."""
        logits = self(x)
        return (logits > 0).long() if self.binary else logits.argmax(dim=-1)


# ----------------------------------------------------------------------------------------------------------------
# audit
# ----------------------------------------------------------------------------------------------------------------


def _unpack_labels(field: str, entry: Any, n: int) -> Tuple[torch.Tensor, torch.Tensor, int]:
    classes = None
    if isinstance(entry, (tuple, list)) and len(entry) == 3:
        labels, classes, mask = entry
    elif isinstance(entry, (tuple, list)) and len(entry) == 2:
        labels, mask = entry
    else:
        labels, mask = entry, None
    labels = torch.as_tensor(labels).detach().cpu().reshape(-1).long()
    if labels.numel() != n:
        raise ValueError(f"field '{field}': {labels.numel()} labels for {n} user vectors (rows must be aligned).")
    mask = (labels >= 0) if mask is None else torch.as_tensor(mask).detach().cpu().reshape(-1).bool()
    if mask.numel() != n:
        raise ValueError(f"field '{field}': mask has {mask.numel()} entries for {n} user vectors.")
    if bool((labels[mask] < 0).any()):
        raise ValueError(f"field '{field}': negative labels inside the mask.")
    n_classes = len(classes) if classes is not None else (int(labels[mask].max()) + 1 if mask.any() else 0)
    return labels, mask, n_classes


def audit(
    user_vectors: Any,
    labels_by_field: Mapping[str, Any],
    train_fraction: float = 0.8,
    epochs: int = 1000,
    lr: float = 1e-3,
    seed: int = 0,
    batch_size: int = 128,
    weight_decay: float = 0.0,
    hidden: Optional[int] = None,
    dropout: float = 0.2,
) -> Dict[str, Dict[str, Any]]:
    """Train a fresh attacker per sensitive attribute on some users' vectors and score it on held-out users.

    This is FMMRec's post-hoc fairness evaluation (spec 7d): for each attribute, the users that have it are split
    at random (seeded) into an attacker-train part (``train_fraction``, 80% by default as in the original's
    20% user test ratio) and a held-out part; a new :class:`Attacker` is trained with Adam (``lr`` 1e-3) for
    ``epochs`` epochs of shuffled mini-batches (defaults 1000 epochs and batch 128: ``disc_epoch`` and
    ``disc_batch_size``), then evaluated once on the held-out users (dropout off). Lower scores are fairer.

    Args:
        user_vectors: ``[n, d]`` tensor or array; row ``i`` belongs to the user of ``labels[i]``. It is detached
            and never modified; no gradient flows back to it.
        labels_by_field: ``{field: (labels, classes, mask)}`` as returned by :func:`sensitive_labels`;
            ``(labels, mask)`` or a bare labels tensor (negative = no value) are accepted too.
        train_fraction: share of the users with the attribute used to train the attacker, in (0, 1).
        epochs, lr, batch_size, weight_decay, hidden, dropout: attacker training settings.
        seed: controls the split, the attacker's initialisation, dropout and batch order; the global RNG state
            is left untouched. Each attribute uses the same seed, so the result for one attribute does not depend
            on which other attributes are audited.

    Returns:
        ``{field: report}`` where every report has ``kind`` ("binary" / "multiclass"), ``n_classes``,
        ``n_train``, ``n_test``, ``excluded`` (users without the attribute) and ``chance``; binary attributes add
        ``auc`` (probability AUC, :func:`auc_from_probabilities`) and ``auc_hard`` (**the original's metric**,
        :func:`auc_from_hard_predictions`), with ``chance`` 0.5; multi-class attributes add ``micro_f1`` (the
        original's metric) and ``macro_f1``, with ``chance`` (``chance_macro_f1``) the micro-F1 (macro-F1) of
        predicting the training part's majority class for every held-out user.

    Raises:
        ValueError: bad shapes, a ``train_fraction`` outside (0, 1), an attribute with fewer than 2 users with a
            value or fewer than 2 classes, or (binary) a held-out part with a single class.
    """
    if not 0.0 < float(train_fraction) < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}.")
    if epochs < 1 or batch_size < 1:
        raise ValueError("epochs and batch_size must be >= 1.")
    x_all = torch.as_tensor(user_vectors).detach()
    if x_all.dim() != 2:
        raise ValueError(f"user_vectors must be [n_users, d], got shape {tuple(x_all.shape)}.")
    if not x_all.is_floating_point():
        x_all = x_all.float()
    if not bool(torch.isfinite(x_all).all()):
        raise ValueError("user_vectors contain NaN or infinite values.")
    device = x_all.device
    n = x_all.shape[0]
    reports: Dict[str, Dict[str, Any]] = {}
    for field, entry in labels_by_field.items():
        labels, mask, n_classes = _unpack_labels(field, entry, n)
        idx = torch.nonzero(mask, as_tuple=False).reshape(-1)
        m = idx.numel()
        if m < 2:
            raise ValueError(f"field '{field}': {m} user(s) with a value; at least 2 are needed for a split.")
        if n_classes < 2 or int(labels[idx].unique().numel()) < 2:
            raise ValueError(f"field '{field}' has a single class among its users: it cannot be audited.")
        gen = torch.Generator().manual_seed(int(seed))
        perm = idx[torch.randperm(m, generator=gen)]
        n_test = min(max(1, int(round(m * (1.0 - float(train_fraction))))), m - 1)
        train_idx, test_idx = perm[: m - n_test], perm[m - n_test:]
        y_train, y_test = labels[train_idx], labels[test_idx]
        if n_classes == 2 and int(y_test.unique().numel()) < 2:
            raise ValueError(
                f"field '{field}': the held-out users all have class {int(y_test[0])}; AUC is undefined "
                f"(use more users, another seed or a larger test part)."
            )
        x_train = x_all[train_idx.to(device)].float()
        x_test = x_all[test_idx.to(device)].float()
        y_train_d = y_train.to(device)

        fork_devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=fork_devices):
            torch.manual_seed(int(seed) + zlib.crc32(b"attacker"))
            attacker = Attacker(x_all.shape[1], n_classes, hidden=hidden, dropout=dropout).to(device)
            optim = torch.optim.Adam(attacker.parameters(), lr=lr, weight_decay=weight_decay)
            order_gen = torch.Generator().manual_seed(int(seed) + 1)
            n_train = x_train.shape[0]
            attacker.train()
            with torch.enable_grad():
                for _ in range(int(epochs)):
                    order = torch.randperm(n_train, generator=order_gen).to(device)
                    for start in range(0, n_train, batch_size):
                        b = order[start:start + batch_size]
                        optim.zero_grad(set_to_none=True)
                        loss = attacker.loss(attacker(x_train[b]), y_train_d[b])
                        loss.backward()
                        optim.step()
            attacker.eval()
            with torch.no_grad():
                proba = attacker.predict_proba(x_test).cpu()
                pred = attacker.predict(x_test).cpu()

        report: Dict[str, Any] = {
            "kind": "binary" if n_classes == 2 else "multiclass",
            "n_classes": n_classes,
            "n_train": int(train_idx.numel()),
            "n_test": int(test_idx.numel()),
            "excluded": int((~mask).sum()),
        }
        if n_classes == 2:
            report["auc"] = auc_from_probabilities(y_test, proba.double())
            report["auc_hard"] = auc_from_hard_predictions(y_test, pred)
            report["chance"] = 0.5
        else:
            report["micro_f1"] = micro_f1(y_test, pred)
            report["macro_f1"] = macro_f1(y_test, pred)
            majority = int(torch.bincount(y_train, minlength=n_classes).argmax())
            report["chance"] = float((y_test == majority).double().mean())
            report["chance_macro_f1"] = macro_f1(y_test, torch.full_like(y_test, majority))
        reports[field] = report
    return reports
