"""LATTICE: by name, its frozen and learned item graphs and its propagation against dense computations written here,
the epoch's graph reuse (detached after the first batch), the loss."""

import pytest
import torch
from torch.nn import functional as F

import recbole_mm
from recbole_mm.testing import build_run

LATTICE_TINY = {"embedding_size": 16, "feat_embed_dim": 16, "image_size": 32, "text_max_length": 16, "epochs": 2,
                "train_batch_size": 512, "knn_k": 4}


@pytest.fixture
def lattice_cfg(tiny_config, tiny_bert, tiny_vit):
    return dict(tiny_config, **LATTICE_TINY, text_encoder=tiny_bert, image_encoder=tiny_vit)


def _dense(rows, cols, values, n):
    out = torch.zeros(n, n, dtype=torch.float64)
    out.index_put_((rows, cols), values.double(), accumulate=True)
    return out


def _cos(feats):
    unit = F.normalize(feats.double(), dim=-1)
    return unit @ unit.t()


def _sym(a):
    deg = a.sum(1)
    s = torch.where(deg > 0, deg.clamp(min=1e-12) ** -0.5, torch.zeros_like(deg))
    return s[:, None] * a * s[None, :]


def test_lattice_runs_by_name(lattice_cfg):
    result = recbole_mm.run_recbole(model="LATTICE", dataset="mm-tiny", config_dict=lattice_cfg)
    assert 0.0 <= result["test_result"]["ndcg@20"] <= 1.0


def test_graphs_and_propagation_equal_dense_computations(lattice_cfg):
    _, _, train, _, _, model, _ = build_run("LATTICE", "mm-tiny", lattice_cfg)
    n = model.n_items
    for m, table in model.feature_tables.items():
        feats = table.weight.detach()
        r, c, v = model.original(m)
        sims = _cos(feats)
        real = feats.abs().sum(1) > 0
        # neighbour sets: the dense top-k (itself included) on rows without near-ties
        top = sims.masked_fill(~real[None, :], -2.0).topk(5, dim=1)
        clear = real & (top.values[:, 3] - top.values[:, 4] > 1e-4)
        got = _dense(r, c, torch.ones_like(v), n) > 0
        assert clear.sum() > 50
        for i in torch.nonzero(clear)[:, 0].tolist():
            assert set(torch.nonzero(got[i])[:, 0].tolist()) == set(top.indices[i, :4].tolist())
        # weights: the similarities of the kept pairs, D^-1/2 A D^-1/2
        want = _sym(torch.where(got, sims, torch.zeros_like(sims)))
        torch.testing.assert_close(_dense(r, c, v, n), want, rtol=1e-5, atol=1e-6)
    # the item graph: (1 - lambda) normalised learned + lambda original, mixed by the softmax modal weights
    model.eval()
    rows, cols, values = model.item_graph()
    w = torch.softmax(model.modal_weight.detach().double(), 0)
    learned, original = 0, 0
    for k, (m, table) in enumerate(model.feature_tables.items()):
        proj = model.feature_proj[m](table.weight).detach()
        proj = proj * (table.weight.abs().sum(1, keepdim=True) > 0)
        from recbole_mm.layers.graph import knn_graph

        kept = knn_graph(proj, 4, self_loops=True).to_dense() != 0  # (the kNN builder is tested in test_graph.py)
        learned = learned + w[k] * torch.where(kept, _cos(proj), torch.zeros(n, n, dtype=torch.float64))
        original = original + w[k] * _dense(*model.original(m), n)
    item_graph = 0.1 * _sym(learned) + 0.9 * original
    torch.testing.assert_close(_dense(rows, cols, values.detach(), n), item_graph, rtol=1e-5, atol=1e-6)
    # LightGCN over D^-1 (A + I), plus normalize(item graph @ item ids)
    users, items = model.training_edges(train._dataset)
    n_u = model.n_users
    a = torch.eye(n_u + n, dtype=torch.float64)
    a[users, n_u + items] = 1.0
    a[n_u + items, users] = 1.0
    norm = a / a.sum(1, keepdim=True)
    ego = torch.cat([model.user_embedding.weight, model.item_id_embedding.weight]).detach().double()
    mean = torch.stack([ego, norm @ ego, norm @ norm @ ego]).mean(0)
    h = F.normalize(item_graph @ model.item_id_embedding.weight.detach().double(), dim=-1)
    got_u, got_i = model.user_item_matrices(training=False)
    torch.testing.assert_close(got_u.double(), mean[:n_u], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_i.double(), mean[n_u:] + h, rtol=1e-4, atol=1e-5)


def test_the_epochs_first_batch_learns_the_graph_then_it_is_reused_detached(lattice_cfg):
    _, _, train, _, _, model, _ = build_run("LATTICE", "mm-tiny", dict(lattice_cfg, train_batch_size=64))
    batches = iter(train)
    model.train()
    model.set_epoch(0)
    for first in (True, False):
        model.zero_grad()
        batch = next(batches)
        loss = model.calculate_loss(batch)
        loss.backward()
        grads = [model.modal_weight.grad] + [p.grad for p in model.feature_proj.parameters()] + [
            t.weight.grad for t in model.feature_tables.values()]
        assert all(g is not None and g.abs().sum() > 0 for g in grads) if first else all(
            g is None or g.abs().sum() == 0 for g in grads)
    # the loss: BPR + reg_weight x (|u|^2 + |i+|^2 + |i-|^2) / 2 / batch
    u_all, i_all = model.user_item_matrices(training=True)
    u, p, q = (t[batch[k]] for t, k in ((u_all, model.USER_ID), (i_all, model.ITEM_ID), (i_all, model.NEG_ITEM_ID)))
    want = -F.logsigmoid((u * p).sum(-1) - (u * q).sum(-1)).mean() + model.reg_weight * 0.5 * (
        (u ** 2).sum() + (p ** 2).sum() + (q ** 2).sum()) / 64  # train_batch_size, as the original
    torch.testing.assert_close(model.calculate_loss(batch), want)
