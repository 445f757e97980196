"""FREEDOM (the first general multimodal backbone): by name, its item-item graph and propagation against dense
computations written here, the pruned graph of each epoch, evaluation on the whole graph."""

import pytest
import torch
from torch.nn import functional as F

import recbole_mm
from recbole_mm.testing import build_run

FREEDOM_TINY = {"embedding_size": 16, "feat_embed_dim": 16, "image_size": 32, "text_max_length": 16, "epochs": 2,
                "train_batch_size": 512, "knn_k": 4}


@pytest.fixture
def freedom_cfg(tiny_config, tiny_bert, tiny_vit):
    return dict(tiny_config, **FREEDOM_TINY, text_encoder=tiny_bert, image_encoder=tiny_vit)


def _dense_knn(feats: torch.Tensor, k: int):
    """Binary top-k cosine graph (itself included; rows of zeros without neighbours), ``D^-1/2 A D^-1/2``, in float64
    over the dense similarity matrix; and the rows whose k-th and (k+1)-th similarities are at least 1e-4 apart
    (the others have near-ties that float32 may order either way)."""
    norms = feats.norm(dim=1, keepdim=True)
    unit = torch.where(norms > 0, feats / norms.clamp(min=1e-30), torch.zeros_like(feats))
    sims = unit @ unit.t()
    real = norms[:, 0] > 0
    sims[:, ~real] = -float("inf")
    top = sims.topk(k + 1, dim=1)
    adj = torch.zeros_like(sims)
    adj.scatter_(1, top.indices[:, :k], 1.0)
    adj[~real] = 0.0
    deg = adj.sum(1)
    scale = torch.where(deg > 0, deg.clamp(min=1e-12) ** -0.5, torch.zeros_like(deg))
    clear = (top.values[:, k - 1] - top.values[:, k] >= 1e-4) | ~real
    return scale[:, None] * adj * scale[None, :], clear


def test_freedom_runs_by_name(freedom_cfg):
    result = recbole_mm.run_recbole(model="FREEDOM", dataset="mm-tiny", config_dict=freedom_cfg)
    assert 0.0 <= result["test_result"]["recall@20"] <= 1.0
    assert result["efficiency"]["trainable_params"] > 0


def test_item_graph_and_propagation_equal_dense_computations(freedom_cfg):
    model = build_run("FREEDOM", "mm-tiny", freedom_cfg)[5]
    feats = {m: t.weight.detach().double() for m, t in model.feature_tables.items()}
    (image, clear_i), (text, clear_t) = _dense_knn(feats["image"], 4), _dense_knn(feats["text"], 4)
    want = 0.1 * image + 0.9 * text
    clear = clear_i & clear_t
    assert clear.sum() >= 100  # (tiny random encoders: many near-ties elsewhere)
    got = model.mm_adj.to_dense().double()
    torch.testing.assert_close(got[clear], want[clear], rtol=1e-5, atol=1e-6)
    assert torch.allclose(got.sum(1), want.sum(1))  # every row: k neighbours of weight 1 / k per modality
    # LightGCN over the whole graph, by dense matrices
    users, items = model.edges
    n_u, n_i = model.n_users, model.n_items
    a = torch.zeros(n_u + n_i, n_u + n_i, dtype=torch.float64)
    a[users, n_u + items] = 1.0
    a[n_u + items, users] = 1.0
    deg = a.sum(1)
    s = torch.where(deg > 0, deg.clamp(min=1e-12) ** -0.5, torch.zeros_like(deg))
    norm = s[:, None] * a * s[None, :]
    ego = torch.cat([model.user_embedding.weight, model.item_id_embedding.weight]).detach().double()
    layers = [ego, norm @ ego, norm @ norm @ ego]
    mean = torch.stack(layers).mean(0)
    h = got @ model.item_id_embedding.weight.detach().double()  # (the graph itself is checked above)
    model.eval()
    got_u, got_i = model.user_item_matrices(training=False)
    torch.testing.assert_close(got_u.double(), mean[:n_u], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_i.double(), mean[n_u:] + h, rtol=1e-4, atol=1e-5)
    batch = {model.USER_ID: torch.tensor([1, 2, 3])}
    torch.testing.assert_close(model.full_sort_predict(batch).double(), (mean[:n_u] @ (mean[n_u:] + h).t())[[1, 2, 3]],
                               rtol=1e-4, atol=1e-5)


def test_each_epoch_draws_a_pruned_graph_and_evaluation_uses_the_whole_one(freedom_cfg):
    _, _, train, _, _, model, _ = build_run("FREEDOM", "mm-tiny", dict(freedom_cfg, edge_dropout=0.8))
    n_edges = len(torch.unique(model.edges[0] * model.n_items + model.edges[1]))
    model.set_epoch(0)
    first = model.masked_adj.coalesce().indices()
    assert first.shape[1] == 2 * round(0.2 * n_edges)  # both directions of the kept edges
    # the kept edges are training edges, re-normalised on the kept graph: 1 / sqrt(deg_u deg_i) there
    adj = model.masked_adj.coalesce()
    r, c, v = adj.indices()[0], adj.indices()[1], adj.values()
    user_side = r < model.n_users
    u, i = r[user_side], c[user_side] - model.n_users
    train_keys = set((model.edges[0] * model.n_items + model.edges[1]).tolist())
    assert set((u * model.n_items + i).tolist()) <= train_keys
    deg_u = torch.bincount(u, minlength=model.n_users).double()
    deg_i = torch.bincount(i, minlength=model.n_items).double()
    torch.testing.assert_close(v[user_side].double(), (deg_u[u] * deg_i[i]) ** -0.5, rtol=1e-5, atol=1e-7)
    model.set_epoch(1)
    assert not torch.equal(first, model.masked_adj.coalesce().indices())
    model.train()
    train_u, _ = model.user_item_matrices(training=True)
    model.eval()
    eval_u, _ = model.user_item_matrices(training=False)
    assert not torch.allclose(train_u, eval_u)
    # the loss: BPR on the propagated vectors + reg_weight x BPR of the projected features
    batch = next(iter(train))
    model.train()
    u_all, i_all = model.user_item_matrices(training=True)
    u = u_all[batch[model.USER_ID]]
    want = -F.logsigmoid((u * i_all[batch[model.ITEM_ID]]).sum(-1) - (u * i_all[batch[model.NEG_ITEM_ID]]).sum(-1)).mean()
    for m, table in model.feature_tables.items():
        f = model.feature_proj[m](table.weight)
        want = want + model.reg_weight * -F.logsigmoid(
            (u * f[batch[model.ITEM_ID]]).sum(-1) - (u * f[batch[model.NEG_ITEM_ID]]).sum(-1)).mean()
    torch.testing.assert_close(model.calculate_loss(batch), want)


def test_freedom_bad_keys(freedom_cfg):
    for key, value, match in [("feat_embed_dim", 8, "must equal embedding_size"), ("edge_dropout", 1.0, "edge_dropout"),
                              ("modality", "audio", "modality must be")]:
        with pytest.raises(ValueError, match=match):
            build_run("FREEDOM", "mm-tiny", dict(freedom_cfg, **{key: value}))


def test_cli_tune_freedom(freedom_cfg, tmp_path):
    from recbole_mm.cli import main as cli

    overrides = [f"{k}={v}" for k, v in dict(freedom_cfg, epochs=1).items()]
    out = tmp_path / "tune.md"
    assert cli(["tune", "--model", "FREEDOM", "--dataset", "mm-tiny", "--space", "reg_weight=choice([0.0, 0.001])",
                "-o", str(out)] + overrides) == 0
    assert out.read_text().count("## reg_weight:") == 2


USER_COLS = {"load_col": {"inter": ["user_id", "item_id", "rating", "timestamp"],
                          "user": ["user_id", "age", "gender", "occupation"]}}


@pytest.mark.parametrize("model", ["FREEDOM", "LightGCN", "BPR"])
def test_fairness_eval_audits_any_general_model(freedom_cfg, model, capsys):
    from recbole_mm.cli import main as cli

    cfg = dict(freedom_cfg, **USER_COLS, fairness_eval=True, fairness_epochs=20, sensitive_bins={"age": [18, 25, 35, 45, 50, 56]})
    result = recbole_mm.run_recbole(model=model, dataset="mm-tiny", config_dict=cfg)
    audit = result["fairness_result"]
    assert set(audit) == {"gender", "age", "occupation"}
    assert audit["gender"]["kind"] == "binary" and 0.0 <= audit["gender"]["auc"] <= 1.0 and "auc_hard" in audit["gender"]
    assert audit["age"]["kind"] == "multiclass" and audit["age"]["n_classes"] <= 7 and 0.0 <= audit["age"]["micro_f1"] <= 1.0
    assert audit["gender"]["n_train"] + audit["gender"]["n_test"] + audit["gender"]["excluded"] == 60
    assert audit["gender"]["representation"] == {"FREEDOM": "user_item_matrices", "LightGCN": "forward",
                                                 "BPR": "user_embedding"}[model]
    overrides = [f"{k}={v}" for k, v in cfg.items() if k not in ("load_col", "sensitive_bins")]
    overrides += ["load_col={inter: [user_id, item_id, rating, timestamp], user: [user_id, age, gender, occupation]}",
                  "sensitive_bins={age: [18, 25, 35, 45, 50, 56]}"]
    assert cli(["run", "--model", model, "--dataset", "mm-tiny"] + overrides) == 0
    assert "| gender | 2 | auc |" in capsys.readouterr().out


def test_fairness_eval_bad_input_fails_before_training(freedom_cfg, monkeypatch):
    from recbole_mm.trainer import MMTrainer

    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(MMTrainer, "fit", no_training)
    cfg = dict(freedom_cfg, fairness_eval=True)
    with pytest.raises(ValueError, match="income"):  # neither loaded nor in the .user file
        recbole_mm.run_recbole(model="FREEDOM", dataset="mm-tiny", config_dict=dict(cfg, sensitive_fields=["income"]))
    with pytest.raises(ValueError, match="general"):
        recbole_mm.run_recbole(model="SASRec", dataset="mm-tiny", config_dict=dict(cfg, **USER_COLS))
    with pytest.raises(ValueError, match="cannot find user / item representations"):  # ItemKNN has no user vectors
        recbole_mm.run_recbole(model="ItemKNN", dataset="mm-tiny", config_dict=dict(cfg, **USER_COLS))


def test_the_audit_reads_the_right_users_vectors(freedom_cfg, monkeypatch):
    """Vectors that encode each user's gender exactly give a perfect attacker: the rows audited are the labelled
    users' own; LightGCN is audited on its propagated vectors, not on its embedding table."""
    from recbole_mm.model import general
    from recbole_mm.quick_start import fairness_labels, fairness_result

    config, data, train, _, _, model, _ = build_run("LightGCN", "mm-tiny", dict(freedom_cfg, **USER_COLS,
                                                                                fairness_eval=True))
    vectors, source = general.user_representations(model)
    assert source == "forward" and torch.equal(vectors, model.forward()[0])
    assert not torch.allclose(vectors, model.user_embedding.weight)
    uids, labels = fairness_labels(config, data, train._dataset, model)
    gender, _, mask = labels["gender"]
    coded = torch.zeros(data.user_num, 4)
    coded[uids, 0] = 10 * (gender.float() * 2 - 1)  # by gender: linearly separable
    monkeypatch.setattr(general, "user_representations", lambda m: (coded, "forward"))
    out = fairness_result(dict(config.final_config_dict, fairness_epochs=1000), model, (uids, {"gender": labels["gender"]}))
    assert out["gender"]["auc_hard"] == 1.0 and out["gender"]["auc"] == 1.0
