"""The papers' evaluation protocol (recbole_mm/data/protocol.py, MMTrainer): history masking, cold and new items.

Metrics are checked against our own ranking, computed here from the raw .inter file and the model's scores.
"""

import math
import os

import numpy as np
import pandas as pd
import pytest
import torch
from recbole.data import data_preparation

import recbole_mm
from recbole_mm.config import Config
from recbole_mm.data.protocol import HistoryIndex, cold_threshold, item_groups
from recbole_mm.data.utils import create_dataset
from recbole_mm.testing import build_run

SMALL = {"embedding_size": 16, "hidden_size": 16, "inner_size": 32, "n_layers": 1, "n_heads": 1, "dnn_layers": 1,
         "MAX_ITEM_LIST_LENGTH": 10, "text_max_length": 16, "text_pooling": "mean", "train_batch_size": 128,
         "learning_rate": 0.005, "metrics": ["Hit", "NDCG"], "topk": [10], "valid_metric": "Hit@10"}


def _build(model, cfg):
    return build_run(model, "mm-tiny", cfg)


def _raw_items_by_user(root):
    df = pd.read_csv(os.path.join(root, "mm-tiny", "mm-tiny.inter"), sep="\t", dtype=str)
    df.columns = [c.split(":")[0] for c in df.columns]
    return df.groupby("user_id")["item_id"].apply(list).to_dict()


def _own_metrics(net, test, dataset, raw, mask: bool, exclude_valid_target=None):
    """HR@10 / NDCG@10 from the model's scores, with our own masking and ranking."""
    uid, iid = dataset.uid_field, dataset.iid_field
    tok_u, tok_i = dataset.field2id_token[uid], dataset.field2id_token[iid]
    id_of = dataset.field2token_id[iid]
    hits, ndcgs, masked_in_top = [], [], 0
    net.eval()
    with torch.no_grad():
        for interaction, _, _, positive_i in test:
            scores = net.full_sort_predict(interaction).view(len(positive_i), -1).clone()
            for row, (u, target) in enumerate(zip(interaction[uid].tolist(), positive_i.tolist())):
                s = scores[row].clone()
                s[0] = -math.inf
                history = list(raw[tok_u[u]])
                history.remove(tok_i[target])  # everything the user had but this target (ml-100k: no repeats)
                hist_ids = [id_of[t] for t in history if t in id_of]
                if mask:
                    s[hist_ids] = -math.inf
                else:
                    masked_in_top += len(set(torch.topk(s, 10).indices.tolist()) & set(hist_ids))
                rank = 1 + int((s > s[target]).sum())
                hits.append(1.0 if rank <= 10 else 0.0)
                ndcgs.append(1.0 / math.log2(rank + 1) if rank <= 10 else 0.0)
    return float(np.mean(hits)), float(np.mean(ndcgs)), masked_in_top


@pytest.mark.parametrize("model", ["SASRec", "MoRec"])
def test_history_is_masked_as_the_papers_do(model, tiny_config, tiny_bert, tiny_root):
    cfg = dict(tiny_config, **SMALL, text_encoder=tiny_bert)
    raw = _raw_items_by_user(tiny_root)
    results = {}
    for mask in (True, False):
        config, dataset, train, valid, test, net, trainer = _build(model, dict(cfg, mask_history=mask))
        trainer.fit(train, valid, saved=False)
        result = trainer.evaluate(test, load_best_model=False)
        hr, ndcg, in_top = _own_metrics(net, test, dataset, raw, mask)
        assert result["hit@10"] == pytest.approx(hr, abs=5e-5), (model, mask)
        assert result["ndcg@10"] == pytest.approx(ndcg, abs=5e-5), (model, mask)
        results[mask] = (result["hit@10"], in_top)
    # without masking (RecBole 1.2.1's behaviour) known items do crowd the top 10
    assert results[False][1] > 0


def test_valid_masks_training_items_only(tiny_config, tiny_root):
    config, dataset, train, valid, test, net, trainer = _build("SASRec", dict(tiny_config, **SMALL))
    raw = _raw_items_by_user(tiny_root)
    tok_u, tok_i = dataset.field2id_token[dataset.uid_field], dataset.field2id_token[dataset.iid_field]
    vds, tds = valid._dataset, test._dataset
    test_target = dict(zip(tds.inter_feat[dataset.uid_field].tolist(), tds.inter_feat[dataset.iid_field].tolist()))
    for u, t in zip(vds.inter_feat[dataset.uid_field].tolist(), vds.inter_feat[dataset.iid_field].tolist()):
        expected = {x for x in raw[tok_u[u]]} - {tok_i[t], tok_i[test_target[u]]}
        assert {tok_i[i] for i in vds.history_index.items_of(u)} == expected
        assert {tok_i[i] for i in tds.history_index.items_of(u)} == expected | {tok_i[t]}


def test_history_index_against_a_loop():
    rng = np.random.default_rng(0)
    n_items, n_users = 30, 12
    pairs = {(int(u), int(i)) for u, i in zip(rng.integers(0, n_users, 200), rng.integers(1, n_items, 200))}
    index = HistoryIndex(np.array([u * n_items + i for u, i in pairs]), n_items, n_users)
    users = torch.tensor([3, 0, 3, 11, 7])
    targets = torch.tensor([5, 1, 2, 9, 4])
    rows, items = index.mask_index(users, targets)
    got = sorted(zip(rows.tolist(), items.tolist()))
    want = sorted((r, i) for r, u in enumerate(users.tolist()) for (uu, i) in pairs if uu == u and i != targets[r])
    assert got == want


def test_cold_threshold_by_hand():
    counts = np.array([0, 1, 1, 2, 5, 10, 0, 3])  # interactions: 22; tail shares 1/22, 2/22, 4/22, 7/22, ...
    assert cold_threshold(counts, 0.05) == 1
    assert cold_threshold(counts, 0.15) == 2
    assert cold_threshold(counts, 0.3) == 3
    groups = item_groups(counts, quantile=0.15)
    assert groups["cold_threshold"] == 2
    assert groups["cold"].tolist() == [False, True, True, True, False, False, False, False]
    assert groups["new"].tolist() == [False, False, False, False, False, False, True, False]  # row 0 = padding
    assert item_groups(counts, threshold=5, quantile=0.15)["cold_threshold"] == 5


def test_cold_and_new_groups_partition_the_overall_metrics(tiny_config, tiny_root):
    cfg = dict(tiny_config, **dict(SMALL, cold_item_threshold=10**9, metrics=["Hit", "NDCG", "MRR"], valid_metric="MRR@10"))
    config, dataset, train, valid, test, net, trainer = _build("SASRec", cfg)
    trainer.fit(train, valid, saved=False)
    overall = trainer.evaluate(test, load_best_model=False)
    cold, new = dict(trainer.cold_test_result), dict(trainer.new_test_result)
    counts = train._dataset.train_item_counts
    targets = test._dataset.inter_feat[dataset.iid_field].numpy()
    assert cold["rows"] == int((counts[targets] > 0).sum()) and new["rows"] == int((counts[targets] == 0).sum())
    assert cold["rows"] + new["rows"] == len(targets) == trainer.test_rows
    for key in overall:
        parts = [(g["rows"], g[key]) for g in (cold, new) if g["rows"]]
        assert overall[key] == pytest.approx(sum(r * v for r, v in parts) / len(targets), abs=1e-4)


def test_new_item_protocol(tiny_config, tiny_root):
    cfg = dict(tiny_config, **SMALL, new_item_ratio=0.3)
    config, dataset, train, valid, test, net, trainer = _build("SASRec", cfg)
    iid = dataset.iid_field
    tok_i = dataset.field2id_token[iid]
    new_tokens = set(dataset.new_item_tokens)
    raw_items = {t for items in _raw_items_by_user(tiny_root).values() for t in items}
    assert len(new_tokens) == round(0.3 * len(raw_items))
    tr = train._dataset.inter_feat
    seen = set(tr[iid].tolist()) | {x for row in tr[train._dataset.item_id_list_field].tolist() for x in row}
    assert not ({tok_i[i] for i in seen if i} & new_tokens)  # never in training, as target or as history
    counts = train._dataset.train_item_counts
    test_targets = test._dataset.inter_feat[iid].numpy()
    is_new_target = np.array([tok_i[t] in new_tokens for t in test_targets])
    assert is_new_target.any() and (counts[test_targets[is_new_target]] == 0).all()
    assert len(test._dataset) == len(_raw_items_by_user(tiny_root))  # every user keeps a test target
    trainer.fit(train, valid, saved=False)
    trainer.evaluate(test, load_best_model=False)
    assert trainer.new_test_result["rows"] == int((counts[test_targets] == 0).sum()) >= int(is_new_target.sum())
    # the same seed draws the same items; another seed others
    again = create_dataset(Config(model="SASRec", dataset="mm-tiny", config_dict=dict(cfg, save_dataset=False)))
    assert set(again.new_item_tokens) == new_tokens
    other = create_dataset(Config(model="SASRec", dataset="mm-tiny", config_dict=dict(cfg, seed=7)))
    assert set(other.new_item_tokens) != new_tokens


def test_empty_group_reports_rows_zero_and_no_metric(tiny_config):
    cfg = dict(tiny_config, **SMALL)
    config, dataset, train, valid, test, net, trainer = _build("SASRec", cfg)
    trainer._set_item_groups(train._dataset, is_train_split=True)
    trainer.eval_collector.groups["cold"][:] = False  # a group no target falls in
    trainer.evaluate(test, load_best_model=False)
    assert trainer.cold_test_result["rows"] == 0
    assert trainer.cold_test_result["hit@10"] is None and trainer.cold_test_result["ndcg@10"] is None


def test_one_epoch_stock_models_get_the_protocol_metrics(tiny_config):
    """Pop (RecBole's TraditionalTrainer) gets the same cold / new metrics as every other model."""
    cfg = dict(tiny_config, **dict(SMALL, cold_item_threshold=5))
    result = recbole_mm.run_recbole(model="Pop", dataset="mm-tiny", config_dict=cfg)
    assert result["cold_test_result"]["rows"] + result["new_test_result"]["rows"] > 0
    assert len(result["epoch_seconds"]) == 1
    assert result["test_rows"] == 60  # one row per user of mm-tiny


def test_pop_counts_training_interactions_only(tiny_config):
    """RecBole's Pop counts every row of its batches: with sampled negatives those would become popularity."""
    from recbole_mm.testing import build_run

    config, dataset, train, valid, test, net, trainer = build_run("Pop", "mm-tiny", dict(tiny_config, **SMALL))
    assert config["train_neg_sample_args"]["distribution"] == "none"
    trainer.fit(train, valid, saved=False)
    counts = np.bincount(train._dataset.inter_feat[dataset.iid_field].numpy(), minlength=dataset.item_num)
    assert net.item_cnt.squeeze(-1).long().tolist() == counts.tolist()


@pytest.mark.parametrize("key,value", [("cold_item_threshold", 0), ("cold_item_threshold", -1),
                                       ("cold_item_quantile", 2), ("cold_item_quantile", 0)])
def test_bad_group_keys_are_clear_errors(tiny_config, key, value):
    with pytest.raises(ValueError, match=key):
        Config(model="SASRec", dataset="mm-tiny", config_dict=dict(tiny_config, **{key: value}))


def test_results_table_shows_groups_with_rows_and_dash_for_none():
    from recbole_mm.cli import result_rows, results_table

    result = {"best_valid_result": {"hit@10": 0.2}, "test_result": {"hit@10": 0.1}, "cold_threshold_used": 7,
              "cold_test_result": {"rows": 12, "max_train_count": 7, "hit@10": 0.25},
              "new_test_result": {"rows": 0, "hit@10": None}}
    table = results_table(result_rows(result))
    lines = table.splitlines()
    assert lines[0] == "| split | hit@10 | rows |"
    assert "| test, cold items (1-7 train interactions) | 0.2500 | 12 |" in lines
    assert "| test, new items (no train interaction) | - | 0 |" in lines
    assert "nan" not in table


def _short_users_dataset(root):
    """40 users with 3-7 interactions over 30 items (timestamps increasing per user)."""
    rng = np.random.default_rng(1)
    folder = os.path.join(root, "short")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "short.inter"), "w") as f:
        f.write("user_id:token\titem_id:token\ttimestamp:float\n")
        for u in range(40):
            for k, i in enumerate(rng.choice(30, size=int(rng.integers(3, 8)), replace=False)):
                f.write(f"u{u}\ti{i}\t{1000 * u + 10 * k}\n")
    return root


@pytest.mark.parametrize("model", ["SASRec", "Pop"])
def test_new_item_hold_out_with_short_users_never_trains_a_new_item(model, tmp_path):
    root = _short_users_dataset(str(tmp_path))
    cfg = {"data_path": root, "new_item_ratio": 0.4, "hidden_size": 8, "inner_size": 16, "n_layers": 1,
           "n_heads": 1, "MAX_ITEM_LIST_LENGTH": 5, "state": "WARNING", "checkpoint_dir": str(tmp_path / "saved"),
           "load_col": {"inter": ["user_id", "item_id", "timestamp"]}, "user_inter_num_interval": "[0,inf)",
           "item_inter_num_interval": "[0,inf)",
           "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "full"}}
    config = Config(model=model, dataset="short", config_dict=cfg)
    dataset = create_dataset(config)
    train, valid, test = data_preparation(config, dataset)
    tok = dataset.field2id_token[dataset.iid_field]
    new = set(dataset.new_item_tokens)
    tr = train._dataset.inter_feat
    trained = set(tr[dataset.iid_field].tolist())
    if model == "SASRec":
        trained |= {x for row in tr[train._dataset.item_id_list_field].tolist() for x in row if x}
    assert not ({tok[i] for i in trained} & new)
    assert {tok[i] for i in test._dataset.inter_feat[dataset.iid_field].tolist()} & new  # some are scored


def test_new_item_ratio_needs_leave_one_out(tiny_config):
    with pytest.raises(ValueError, match="leave-one-out"):
        create_dataset(Config(model="Pop", dataset="mm-tiny", config_dict=dict(tiny_config, new_item_ratio=0.2)))


def test_group_metrics_equal_recbole_when_the_group_holds_every_item(tiny_config):
    """Several positives per row (a general model, RecBole's random split): a group of every item reproduces
    RecBole's own metrics, so the group rows are built as RecBole builds its own."""
    from recbole_mm.testing import build_run

    metrics = ["Hit", "NDCG", "MRR", "Recall", "Precision"]
    cfg = dict(tiny_config, metrics=metrics, topk=[5, 10], valid_metric="Recall@10", cold_item_threshold=1)
    config, dataset, train, valid, test, net, trainer = build_run("Pop", "mm-tiny", cfg)
    trainer.fit(train, valid, saved=False)
    assert max(len(v) for v in test.uid2positive_item if v is not None) > 1  # several positives per user
    trainer.eval_collector.groups = {"cold": torch.ones(dataset.item_num, dtype=torch.bool)}
    overall = trainer.evaluate(test, load_best_model=False)
    group = dict(trainer.cold_test_result)
    assert group.pop("rows") == trainer.test_rows
    group.pop("max_train_count")
    assert group == pytest.approx(dict(overall), abs=1e-4)
