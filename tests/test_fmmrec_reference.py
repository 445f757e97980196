"""FMMRec (TOIS'25) against references written here from the paper / original code's behaviour, in float64 with
plain dense torch: stage 1 (BMMF) losses and one training step, the stage-2 user-user graphs, neighbour
enhancement, the shared filter with prompts, the stage-2 loss and the isolation of the attackers' gradients."""

from types import SimpleNamespace

import pytest
import torch
from recbole.data.interaction import Interaction

from recbole_mm.layers.fair import ModalDisentangler, train_disentangler
from recbole_mm.model.general_recommender.fmmrec import FMMRec
from recbole_mm.testing import build_run

torch.set_num_threads(1)

TOL = dict(rtol=1e-5, atol=1e-6)
FMM_TINY = {"embedding_size": 16, "image_size": 32, "text_max_length": 16, "fairness_eval": False,
            "reg_weight": 1e-2, "weight_i": 0.3, "disc_reg_weight": 0.2,
            "load_col": {"inter": ["user_id", "item_id", "rating", "timestamp"],
                         "user": ["user_id", "age", "gender", "occupation"]}}


@pytest.fixture
def fmm(tiny_config, tiny_bert, tiny_vit, tmp_path):
    """A built (untrained) FMMRec on mm-tiny, its training dataset, and the dense 0/1 training matrix."""
    cfg = dict(tiny_config, **FMM_TINY, text_encoder=tiny_bert, image_encoder=tiny_vit, fmmrec_cache_dir=str(tmp_path))
    _, _, train, _, _, model, _ = build_run("FMMRec", "mm-tiny", cfg)
    ds = train._dataset
    r = torch.zeros(model.n_users, model.n_items, dtype=torch.float64)
    r[ds.inter_feat[model.USER_ID].long(), ds.inter_feat[model.ITEM_ID].long()] = 1.0
    return model, ds, r


# ------------------------------------------------------------------ references (float64, independent)
def leafs(module):
    """float64 leaf copies of a module's parameters, by name."""
    return {n: p.detach().double().clone().requires_grad_(True) for n, p in module.named_parameters()}


def lin(p, prefix, x):
    return x @ p[prefix + "weight"].t() + p[prefix + "bias"]


def leaky(h):
    return torch.where(h > 0, h, 0.2 * h)


def attacker_ref(p, x):
    """Linear - LeakyReLU(0.2) - Linear (no dropout): [n, out]."""
    return lin(p, "net.3.", leaky(lin(p, "net.0.", x)))


def att_loss_ref(logits, labels):
    """BCE of sigmoid(logit) (1 output) or NLL of log_softmax, mean over the rows with a label >= 0."""
    terms = []
    for i in range(len(labels)):
        y = int(labels[i])
        if y < 0:
            continue
        z = logits[i]
        if z.numel() == 1:
            s = 1.0 / (1.0 + torch.exp(-z[0]))
            terms.append(-(y * torch.log(s) + (1 - y) * torch.log(1 - s)))
        else:
            terms.append(-(z[y] - torch.log(torch.exp(z).sum())))
    return torch.stack(terms).mean()


def cos_rows(x, y):
    return torch.stack([(x[i] * y[i]).sum() / (x[i].norm() * y[i].norm()) for i in range(x.shape[0])])


def bmmf_loss_ref(pb, pg, atts, u, labels, targets, wb, wf, sep=0.1):
    """Stage-1 transform loss; atts = {field: (biased attacker params, filtered attacker params)}."""
    b, g = lin(pb, "", u), lin(pg, "", u)
    loss = (1 - cos_rows(g, u)).mean() + sep * cos_rows(b, g).clamp(min=0).mean()
    for f, (ab, af) in atts.items():
        loss = loss + wb * att_loss_ref(attacker_ref(ab, b), labels[f]) \
            - wf * att_loss_ref(attacker_ref(af, g), targets[f])
    return loss, b, g


def graph_ref(a_hat, feats, k):
    """Â F, cosine similarities (zero rows: no neighbours, nobody's neighbour), top-k values per row (itself
    included), D^-1/2 A D^-1/2; also the smallest gap between the k-th and (k+1)-th similarity (tie check)."""
    uf = a_hat @ feats.double()
    n = uf.shape[0]
    sim = torch.full((n, n), float("-inf"), dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            ni, nj = uf[i].norm(), uf[j].norm()
            if ni > 0 and nj > 0:
                sim[i, j] = (uf[i] * uf[j]).sum() / (ni * nj)
    adj, gap = torch.zeros(n, n, dtype=torch.float64), float("inf")
    for i in range(n):
        if torch.isinf(sim[i]).all():
            continue
        order = sorted(range(n), key=lambda j: -float(sim[i, j]))
        for j in order[:k]:
            adj[i, j] = sim[i, j]
        gap = min(gap, float(sim[i, order[k - 1]] - sim[i, order[k]]))
    deg = adj.sum(1)
    s = torch.where(deg > 0, deg.clamp(min=1e-300) ** -0.5, torch.zeros_like(deg))
    return s[:, None] * adj * s[None, :], gap


def row_norm_ref(r):
    deg = r.sum(1, keepdim=True)
    return torch.where(deg > 0, r / deg.clamp(min=1e-300), torch.zeros_like(r))


def filter_ref(p, x, users):
    """Shared filter, prompt concat: mean_k f_k([P_row ; x]), row 1 users, row 0 items."""
    prompt = p["prompt.weight"][1 if users else 0].expand(x.shape[0], -1)
    h = torch.cat([prompt, x.double()], 1)
    fields = sorted({n.split(".")[1] for n in p if n.startswith("filters.")})
    return torch.stack([lin(p, f"filters.{f}.2.", leaky(lin(p, f"filters.{f}.0.", h))) for f in fields]).mean(0)


def adam_first_step(p0, g, lr):
    return p0 - lr * g / (g.abs() + 1e-8)


# ------------------------------------------------------------------ stage 1
def make_disentangler(n_classes, d=6, seed=0):
    torch.manual_seed(seed)
    mod = ModalDisentangler(d, n_classes, dropout=0.0)
    with torch.no_grad():  # informative attackers (the N(0, 0.01) init makes every loss ~ log C)
        for p in mod.attacker_parameters():
            p.normal_(0.0, 0.5)
    return mod


def split(mod):
    pb, pg = leafs(mod.biased), leafs(mod.filtered)
    atts = {f: (leafs(mod.biased_attackers[f]), leafs(mod.filtered_attackers[f])) for f in mod.n_classes}
    return pb, pg, atts


def test_stage1_transform_loss_and_gradients_binary():
    """Stage-1 loss (cosine terms + w_b biased attacker - w_f filtered attacker, -1 rows left out) equals the
    reference for binary attributes; B and G get the reference's gradients, the attackers none."""
    mod = make_disentangler({"gender": 2, "other": 2})
    u = torch.randn(9, 6)
    labels = {"gender": torch.tensor([0, 1, 1, -1, 0, 0, 1, -1, 1]), "other": torch.tensor([1, -1, 0, 0, 1, 1, 0, 0, -1])}
    loss, b, g = mod.transform_loss(u, labels, 0.3, 0.7)
    loss.backward()
    pb, pg, atts = split(mod)
    want, wb_, wg_ = bmmf_loss_ref(pb, pg, atts, u.double(), labels, labels, 0.3, 0.7)
    want.backward()
    torch.testing.assert_close(loss.double(), want.detach(), **TOL)
    torch.testing.assert_close(b.double(), wb_.detach(), **TOL)
    torch.testing.assert_close(g.double(), wg_.detach(), **TOL)
    for name, p in list(mod.biased.named_parameters()):
        torch.testing.assert_close(p.grad.double(), pb[name].grad, **TOL)
    for name, p in list(mod.filtered.named_parameters()):
        torch.testing.assert_close(p.grad.double(), pg[name].grad, **TOL)
    assert all(p.grad is None for p in mod.attacker_parameters())


def test_stage1_multiclass_filtered_target_is_a_random_draw():
    """For a multi-class attribute the filtered attacker's target is randint(0, C) of the given generator (rows
    without label stay out); the biased attacker keeps the true labels. Binary attributes are not redrawn."""
    mod = make_disentangler({"gender": 2, "occ": 4}, seed=1)
    u = torch.randn(10, 6)
    labels = {"gender": torch.tensor([0, 1, 1, 0, -1, 0, 1, 1, 0, 1]), "occ": torch.tensor([0, 3, 2, -1, 1, 1, 0, 2, 3, 0])}
    gen = torch.Generator().manual_seed(123)
    clone = torch.Generator()
    clone.set_state(gen.get_state())
    draw = torch.randint(0, 4, labels["occ"].shape, generator=clone)
    targets = {"gender": labels["gender"], "occ": torch.where(labels["occ"] >= 0, draw, labels["occ"])}
    loss = mod.transform_loss(u, labels, 0.3, 0.7, generator=gen)[0]
    pb, pg, atts = split(mod)
    want = bmmf_loss_ref(pb, pg, atts, u.double(), labels, targets, 0.3, 0.7)[0].detach()
    torch.testing.assert_close(loss.double().detach(), want, **TOL)
    # the test can tell: with the true labels as the filtered target the loss is clearly different
    true_t = bmmf_loss_ref(pb, pg, atts, u.double(), labels, labels, 0.3, 0.7)[0].detach()
    assert abs(float(true_t - want)) > 1e-3


def test_train_disentangler_one_batch_is_a_hand_made_adam_step():
    """One epoch, one batch, d_steps 1: transforms = Adam's first step on grad L at the initial parameters; attackers
    = Adam's first step on their own loss with the initial attackers on the initial transforms' outputs."""
    mod = make_disentangler({"gender": 2, "other": 2}, seed=2)
    n_users, lr = 7, 1e-2
    feats = torch.randn(n_users, 6)
    batch_users = torch.tensor([0, 1, 2, 3, 4, 5, 6, 0, 3, 3, 5])  # repeated users weigh more
    user_labels = {"gender": torch.tensor([0, 1, -1, 1, 0, 1, 0]), "other": torch.tensor([1, 1, 0, -1, 0, 0, 1])}
    pb, pg, atts = split(mod)
    u = feats[batch_users].double()
    y = {f: lab[batch_users] for f, lab in user_labels.items()}
    loss, b, g = bmmf_loss_ref(pb, pg, atts, u, y, y, 0.3, 0.7)
    loss.backward()
    att_loss = sum(att_loss_ref(attacker_ref(ab, b.detach()), y[f]) + att_loss_ref(attacker_ref(af, g.detach()), y[f])
                   for f, (ab, af) in atts.items())
    for p in [q for pair in atts.values() for d in pair for q in d.values()]:
        p.grad = None
    att_loss.backward()
    history = train_disentangler(mod, feats, batch_users, user_labels, epochs=1, batch_size=64, lr=lr, d_steps=1,
                                 w_biased=0.3, w_filtered=0.7, seed=5)
    torch.testing.assert_close(torch.tensor(history[0], dtype=torch.float64), loss.detach(), **TOL)
    got = [(mod.biased, pb), (mod.filtered, pg)]
    got += [(mod.biased_attackers[f], ab) for f, (ab, _) in atts.items()]
    got += [(mod.filtered_attackers[f], af) for f, (_, af) in atts.items()]
    for module, ref in got:
        for name, p in module.named_parameters():
            want = adam_first_step(ref[name].detach(), ref[name].grad, lr)
            torch.testing.assert_close(p.detach().double(), want, rtol=1e-5, atol=lr * 1e-4)
            assert not torch.allclose(p.detach().double(), ref[name].detach())  # it moved


# ------------------------------------------------------------------ stage 2: graphs and inputs
def test_user_graph_equals_dense_reference_small_case():
    """user_graph on 12 users x 20 items (one user without items), d 5, k 3: row-normalised Â F, cosine top-k
    values (self included), D^-1/2 A D^-1/2."""
    g = torch.Generator().manual_seed(3)
    r = (torch.rand(12, 20, generator=g) < 0.3).double()
    r[11] = 0.0
    r[0, 0] = 2.0  # a weight: the row is divided by its sum, not by its count
    a_hat = row_norm_ref(r)
    feats = torch.randn(20, 5, generator=g)
    want, gap = graph_ref(a_hat, feats, 3)
    assert gap > 1e-4  # no (near) ties
    got = FMMRec.user_graph(SimpleNamespace(inter_norm=a_hat.float().to_sparse(), knn_k=3), feats).to_dense()
    torch.testing.assert_close(got.double(), want, **TOL)


def test_model_inter_norm_and_user_graph(fmm):
    """The built model's Â is the row-normalised training matrix and its user_graph (k 4) equals the reference."""
    model, _, r = fmm
    a_hat = row_norm_ref(r)
    torch.testing.assert_close(model.inter_norm.to_dense().double(), a_hat, **TOL)
    model.knn_k = 4
    feats = torch.randn(model.n_items, 7, generator=torch.Generator().manual_seed(4))
    want, gap = graph_ref(a_hat, feats, 4)
    assert gap > 1e-5
    torch.testing.assert_close(model.user_graph(feats).to_dense().double(), want, **TOL)


def random_inputs(model, dims, seed=0):
    g = torch.Generator().manual_seed(seed)
    users, items = torch.randn(model.n_users, 16, generator=g), torch.randn(model.n_items, 16, generator=g)
    dis = {m: (torch.randn(model.n_items, d, generator=g), torch.randn(model.n_items, d, generator=g))
           for m, d in dims.items()}
    return users, items, dis


@pytest.mark.parametrize("from_text", [False, True])
def test_neighbour_enhancement_with_audio(fmm, from_text):
    """U' = U + 0.1 (A^f U - A^b U), A^v = sum_m w_m graph(view v of m); audio's graphs from the text features
    exactly when audio_graph_from_text is set. Items pass unchanged."""
    model, _, r = fmm
    model.modalities, model.knn_k = ["text", "image", "audio"], 4
    model.uugraph_weights, model.audio_graph_from_text = {"text": 0.2, "image": 0.5, "audio": 0.3}, from_text
    users, items, dis = random_inputs(model, {"text": 8, "image": 6, "audio": 7}, seed=5)
    model.set_stage_inputs(users, items, dis)
    a_hat, views = row_norm_ref(r), []
    for idx in (0, 1):
        adj = torch.zeros(model.n_users, model.n_users, dtype=torch.float64)
        for m, w in model.uugraph_weights.items():
            src = "text" if (m == "audio" and from_text) else m
            adj += w * graph_ref(a_hat, dis[src][idx], 4)[0]
        views.append(adj @ users.double())
    want = users.double() + 0.1 * (views[1] - views[0])
    torch.testing.assert_close(model.user_input.double(), want, **TOL)
    torch.testing.assert_close(model.item_input, items)
    other = {"text": "text", "image": "image", "audio": "audio" if from_text else "text"}
    wrong = users.double() + 0.1 * sum(w * (graph_ref(a_hat, dis[other[m]][1], 4)[0]
                                            - graph_ref(a_hat, dis[other[m]][0], 4)[0]) @ users.double()
                                       for m, w in model.uugraph_weights.items())
    assert (model.user_input.double() - wrong).abs().max() > 1e-4  # the switch matters


# ------------------------------------------------------------------ stage 2: filter, loss, isolation
def prepared(fmm):
    """The model with random stage inputs, informative attackers and a batch; the float64 references."""
    model, ds, r = fmm
    users, items, dis = random_inputs(model, {m: 5 for m in model.modalities}, seed=6)
    model.set_stage_inputs(users, items, dis)
    with torch.no_grad():
        for p in list(model.user_attackers.parameters()) + list(model.item_attackers.parameters()):
            p.normal_(0.0, 0.3)
    g = torch.Generator().manual_seed(7)
    uid = torch.tensor([1, 2, 3, 5, 8, 13, 21, 34, 55, 3, 59, 60])
    pos, neg = torch.randint(1, model.n_items, (12,), generator=g), torch.randint(1, model.n_items, (12,), generator=g)
    batch = Interaction({model.USER_ID: uid, model.ITEM_ID: pos, model.NEG_ITEM_ID: neg})
    pf = leafs(model.filter)
    fu, fi = filter_ref(pf, model.user_input, True), filter_ref(pf, model.item_input, False)
    agg = (row_norm_ref(r) @ fi)[uid]
    return SimpleNamespace(model=model, ds=ds, batch=batch, uid=uid, pos=pos, neg=neg, pf=pf, fu=fu, fi=fi, agg=agg)


def adversarial_ref(model, fair_u, agg, uid, item_weight=0.3):
    """sum_k [ l(D^u_k(U~_b), s_k) + w l(D^i_k((Â I~)_b), s_k) ] with float64 copies of the attackers (w: weight_i
    in the recommender's loss, 1 in the attackers' own: each attacker trains on its own loss, as the original)."""
    pu = {f: leafs(a) for f, a in model.user_attackers.items()}
    pi = {f: leafs(a) for f, a in model.item_attackers.items()}
    total = 0.0
    for k, f in enumerate(model.fields):
        s = model.labels[uid, k]
        total = total + att_loss_ref(attacker_ref(pu[f], fair_u), s) + item_weight * att_loss_ref(attacker_ref(pi[f], agg), s)
    return total, pu, pi


def test_shared_filter_with_prompts(fmm):
    """Users: mean_k f_k([P_1 ; U']); items: mean_k f_k([P_0 ; I])."""
    s = prepared(fmm)
    got_u, got_i = s.model.user_item_matrices(training=True)
    torch.testing.assert_close(got_u.double(), s.fu.detach(), **TOL)
    torch.testing.assert_close(got_i.double(), s.fi.detach(), **TOL)


def test_stage2_loss_and_gradient_equal_reference(fmm):
    """BPR + reg_weight/2 (|u|^2+|p|^2+|n|^2)/B - disc_reg_weight * adversarial terms (s_k from the .user file), and
    the filter/prompt gradients of that loss (through the fixed attackers) equal the reference's."""
    s = prepared(fmm)
    model = s.model
    model.eval()  # attackers without dropout
    gcol = model.fields.index("gender")
    tokens = [s.ds.id2token("gender", int(t)) for t in s.ds.user_feat["gender"][s.uid]]
    assert model.labels[s.uid, gcol].tolist() == [int(t == "M") for t in tokens]  # F = 0, M = 1
    loss = model.calculate_loss(s.batch)
    loss.backward()
    u, p, n = s.fu[s.uid], s.fi[s.pos], s.fi[s.neg]
    bpr = -torch.log(torch.sigmoid((u * p).sum(1) - (u * n).sum(1))).mean()
    reg = 1e-2 * 0.5 * (u.pow(2).sum() + p.pow(2).sum() + n.pow(2).sum()) / 12
    adv = adversarial_ref(model, u, s.agg, s.uid)[0]
    want = bpr + reg - 0.2 * adv
    want.backward()
    torch.testing.assert_close(loss.double().detach(), want.detach(), **TOL)
    for name, q in model.filter.named_parameters():
        torch.testing.assert_close(q.grad.double(), s.pf[name].grad, **TOL)


def test_attackers_isolated_from_recommender(fmm):
    """backward of the loss leaves the attackers without gradient; after_optimizer_step moves only the attackers
    (with SGD in place of their Adam, the step is -lr x the gradient of their own loss at the batch's vectors, so the
    loss's scale and weights are checked, not only the gradients' signs), leaving filter/prompt values and gradients
    untouched and no gradient on the attackers; optimizer_groups holds every recommender parameter and no attacker
    parameter."""
    s = prepared(fmm)
    model = s.model
    model.train()
    model.d_steps = 1
    for m in list(model.user_attackers.modules()) + list(model.item_attackers.modules()):
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    attackers = list(model.user_attackers.parameters()) + list(model.item_attackers.parameters())
    model.calculate_loss(s.batch).backward()
    assert all(q.grad is None for q in attackers)
    rec = list(model.filter.parameters())
    assert all(q.grad is not None and q.grad.abs().sum() > 0 for q in rec)
    before = [(q.detach().clone(), q.grad.clone()) for q in rec]
    adv, pu, pi = adversarial_ref(model, s.fu[s.uid].detach(), s.agg.detach(), s.uid, item_weight=1.0)
    adv.backward()
    lr = 0.05
    model._attacker_optimizer = torch.optim.SGD(attackers, lr=lr)
    model.after_optimizer_step()
    assert all(q.grad is None for q in attackers)
    for q, (v, gr) in zip(rec, before):
        assert torch.equal(q.detach(), v) and torch.equal(q.grad, gr)
    for mods, ref in ((model.user_attackers, pu), (model.item_attackers, pi)):
        for f, a in mods.items():
            for name, q in a.named_parameters():
                want = ref[f][name].detach() - lr * ref[f][name].grad
                torch.testing.assert_close(q.detach().double(), want, rtol=1e-5, atol=1e-7)
                assert not torch.allclose(q.detach().double(), ref[f][name].detach())
    grouped = {id(q) for grp in model.optimizer_groups(None) for q in grp["params"]}
    assert not grouped & {id(q) for q in attackers}
    assert grouped == {id(q) for q in model.parameters()} - {id(q) for q in attackers}
