"""ODMT: by name through the entry points, the IMT's v1 mask, the ID initialisation, the loss wiring, the epoch hook
and the per-branch results. (The distillation terms and the ramp-up against hand computations: test_odmt_losses.py.)"""

import pytest
import torch
from torch.nn import functional as F

import recbole_mm
from recbole_mm.testing import build_run

ODMT_TINY = {"embedding_size": 16, "n_layers": 1, "n_heads": 1, "imt_layers": 1, "imt_heads": 2,
             "MAX_ITEM_LIST_LENGTH": 10, "text_max_length": 16, "image_size": 32, "train_batch_size": 64, "epochs": 1,
             "kd_alpha": 2}


@pytest.fixture
def odmt_cfg(tiny_config, tiny_bert, tiny_vit):
    return dict(tiny_config, **ODMT_TINY, text_encoder=tiny_bert, image_encoder=tiny_vit)


def test_odmt_runs_by_name_with_per_branch_results(odmt_cfg):
    result = recbole_mm.run_recbole(model="ODMT", dataset="mm-tiny", config_dict=dict(odmt_cfg, epochs=2))
    assert 0.0 <= result["test_result"]["ndcg@10"] <= 1.0
    for key in ("branch_valid_result", "branch_test_result"):
        assert set(result[key]) == {"id", "text", "image"}
        assert all(0.0 <= r["hit@10"] <= 1.0 for r in result[key].values())
    assert len(result["branch_valid_history"]) == 2  # every evaluation
    assert result["branch_valid_result"] in result["branch_valid_history"]


def test_the_ensemble_is_the_mean_of_the_branches(odmt_cfg):
    _, _, _, _, test, model, trainer = build_run("ODMT", "mm-tiny", odmt_cfg)
    model.eval()
    batch = next(iter(test))[0]
    fused = model.full_sort_predict(batch)
    parts = []
    for name in model.branches:
        model.eval_branch = name
        parts.append(model.full_sort_predict(batch))
    model.eval_branch = None
    # each branch by hand: its user encoder's last state . its item view
    d = model.embedding_size
    seq, lengths = batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN]
    matrix = model.item_matrix()
    for k, (encoder, part) in enumerate(zip(model.seq_encoder.encoders, parts)):
        vecs = matrix[seq][..., k * d:(k + 1) * d] * (seq > 0).unsqueeze(-1)
        user = model.gather_indexes(encoder(vecs, lengths), lengths - 1)
        torch.testing.assert_close(part, user @ matrix[:, k * d:(k + 1) * d].t())
    torch.testing.assert_close(fused, sum(parts) / 3)


def test_v1_mask_the_id_token_cannot_change_the_modal_views(odmt_cfg):
    model = build_run("ODMT", "mm-tiny", odmt_cfg)[5]
    tower = model.item_tower.eval()
    ids = torch.arange(1, 20)
    d = model.embedding_size
    with torch.no_grad():
        before = tower(ids)
        tower.id_table.weight.add_(torch.randn_like(tower.id_table.weight))
        after = tower(ids)
    torch.testing.assert_close(after[:, d:], before[:, d:])  # text and image views: unchanged
    assert not torch.allclose(after[:, :d], before[:, :d])  # the ID view reads the ID token


@pytest.mark.parametrize("id_init", ["text", "image", "mean", "xavier"])
def test_id_initialisation_equals_the_chosen_feature_rows(odmt_cfg, id_init):
    from recbole_mm.layers.fusion import masked_mean

    model = build_run("ODMT", "mm-tiny", dict(odmt_cfg, id_init=id_init, image_view="cls"))[5]
    tower = model.item_tower
    table = tower.id_table.weight.detach()
    ids = torch.arange(model.n_items)
    text = tower.text_tower.lookup(ids)[:, 0]  # text_view cls: the first token (CLS)
    image = tower.image_tower.lookup(ids)[:, 0]  # image_view cls: the ViT's CLS
    expected = {"text": text, "image": image, "mean": (text + image) / 2}
    if id_init == "xavier":
        assert table.shape == (model.n_items, model.embedding_size)
    else:
        torch.testing.assert_close(table, expected[id_init])
    if id_init == "text":  # the mean view: the mean of the real tokens only
        model = build_run("ODMT", "mm-tiny", dict(odmt_cfg, text_view="mean"))[5]
        tower = model.item_tower
        mask = tower.text_tower.mask
        torch.testing.assert_close(tower.id_table.weight.detach(), masked_mean(tower.text_tower.lookup(ids), mask))


def test_id_init_mean_needs_one_width(odmt_cfg, tmp_path):
    from recbole_mm.testing import make_tiny_text_encoder

    wide = make_tiny_text_encoder(str(tmp_path / "wide"), "bert", hidden=48)
    with pytest.raises(ValueError, match="widths differ.*id_init text, image or xavier"):
        build_run("ODMT", "mm-tiny", dict(odmt_cfg, text_encoder=wide, id_init="mean"))


def test_loss_terms_and_the_epoch_hook(odmt_cfg, monkeypatch):
    from recbole_mm.model import losses

    _, _, train, _, _, model, trainer = build_run("ODMT", "mm-tiny", odmt_cfg)
    batch = next(iter(train))
    torch.manual_seed(0)
    model.train()
    for epoch in (0, 1, 2, 5):
        model.set_epoch(epoch)
        torch.manual_seed(0)
        ce, kd = model.calculate_loss(batch)
        torch.manual_seed(0)
        logits, labels, log_counts = model.branch_logits(model.loss_inputs(batch))
        torch.testing.assert_close(ce, sum(F.cross_entropy(z, labels) for z in logits))
        assert log_counts.max() > 0  # items repeated in the batch: the distillation must see their multiplicity
        z_id, z_t, z_v = logits
        want = sum(losses.kd_loss(s, t, model.kd_temperature, log_counts=log_counts) for s, t in
                   ((z_t, z_id), (z_v, z_id), (z_id, (z_id + z_t + z_v) / 3)))
        torch.testing.assert_close(kd, losses.kd_rampup(epoch, 2) * want)
    model.kd_alpha = 0.0  # the ablation: no distillation at any epoch
    assert model.calculate_loss(batch)[1].item() == 0.0

    seen = []
    original = type(model).calculate_loss
    monkeypatch.setattr(type(model), "calculate_loss", lambda self, i: (seen.append(self.epoch), original(self, i))[1])
    recbole_mm.run_recbole(model="ODMT", dataset="mm-tiny", config_dict=dict(odmt_cfg, epochs=3))
    assert sorted(set(seen)) == [0, 1, 2]  # the trainer told the model its epoch before each epoch


def test_bad_keys_are_clear_errors(odmt_cfg):
    for key, value, match in [("loss", "bce", "loss must be inbatch"), ("similarity", "cosine", "must be dot"),
                              ("id_init", "random", "id_init must be one of"), ("image_view", "first", "image_view")]:
        with pytest.raises(ValueError, match=match):
            build_run("ODMT", "mm-tiny", dict(odmt_cfg, **{key: value}))


def test_gradient_clipping_is_the_trainer_key(odmt_cfg):
    trainer = build_run("ODMT", "mm-tiny", odmt_cfg)[6]
    assert trainer.clip_grad_norm == {"max_norm": 5.0}  # ODMT.yaml: the original's max-norm 5


def test_one_epoch_on_ml_100k_mm_lowers_the_loss(ml100k_mm, tiny_bert, tiny_vit, tmp_path):
    from tests.conftest import TINY_SEQ

    cfg = dict(TINY_SEQ, **ODMT_TINY)
    cfg.update(text_encoder=tiny_bert, image_encoder=tiny_vit, train_batch_size=256,
               checkpoint_dir=str(tmp_path / "saved"), learning_rate=0.005)
    _, _, train, _, _, model, trainer = build_run("ODMT", "ml-100k-mm", cfg)
    opt = trainer.optimizer
    model.train()
    model.set_epoch(0)
    history = []
    for batch in train:
        loss = sum(model.calculate_loss(batch))
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    k = max(len(history) // 5, 1)
    assert len(history) > 20 and sum(history[-k:]) / k < 0.98 * sum(history[:k]) / k  # ln(C) floor: ~25 -> 24


def test_cli_run_prints_the_branches_and_tune_odmt(odmt_cfg, tmp_path, capsys):
    from recbole_mm.cli import main as cli

    overrides = [f"{k}={v}" for k, v in odmt_cfg.items()]
    assert cli(["run", "--model", "ODMT", "--dataset", "mm-tiny"] + overrides) == 0
    out = capsys.readouterr().out
    assert all(f"| test, {b} branch |" in out for b in ("id", "text", "image"))
    tuned = tmp_path / "tune.md"
    assert cli(["tune", "--model", "ODMT", "--dataset", "mm-tiny", "--space", "kd_alpha=choice([0, 2])",
                "-o", str(tuned)] + overrides) == 0
    assert tuned.read_text().count("## kd_alpha:") == 2


def test_corrupt_and_missing_images_get_the_placeholder_tokens(ml100k_mm, odmt_cfg, tmp_path, caplog):
    """The image token store of a dataset with a corrupt and a missing poster builds; both items read the
    placeholder's tokens, and the build says how many items use it."""
    import logging
    import os

    from recbole_mm.testing import make_subset_dataset

    root = tmp_path / "data"
    folder = make_subset_dataset(ml100k_mm, "ml-100k-mm", str(root), "mm-bad", n_users=30)
    images = sorted(os.listdir(os.path.join(folder, "images")))
    corrupt, missing = images[0], images[1]
    with open(os.path.join(folder, "images", corrupt), "wb") as f:
        f.write(b"not an image")
    os.remove(os.path.join(folder, "images", missing))
    with open(os.path.join(folder, "mm-bad.yaml"), "w") as f:
        f.write("load_col:\n  inter: [user_id, item_id, rating, timestamp]\n")
    cfg = dict(odmt_cfg, data_path=str(root))
    with caplog.at_level(logging.WARNING):
        model = build_run("ODMT", "mm-bad", cfg)[5]
    assert "2 of" in caplog.text and "placeholder" in caplog.text
    lookup = model.item_tower.image_tower.lookup
    tokens = list(model.content.tokens)
    ids = [tokens.index(os.path.splitext(n)[0]) for n in (corrupt, missing)]
    bad = lookup(torch.as_tensor(ids))
    assert bad.abs().sum() > 0 and torch.equal(bad[0], bad[1])  # the placeholder's tokens, the same for both
    good = lookup(torch.arange(1, model.n_items))
    assert (good - bad[0]).abs().flatten(1).sum(1).gt(0).sum() == model.n_items - 3  # every other item differs


def test_kd_detach_teacher_reaches_the_loss(odmt_cfg, monkeypatch):
    from recbole_mm.model import losses

    seen = []
    real = losses.kd_loss
    monkeypatch.setattr(losses, "kd_loss", lambda *a, **k: (seen.append(a[3]), real(*a, **k))[1])
    for detach in (False, True):
        _, _, train, _, _, model, _ = build_run("ODMT", "mm-tiny", dict(odmt_cfg, kd_detach_teacher=detach))
        model.train()
        model.set_epoch(5)
        model.calculate_loss(next(iter(train)))
        assert seen[-3:] == [detach] * 3


def test_imt_views_ignore_the_text_padding(odmt_cfg):
    """Whatever the frozen features hold at padded text positions, the item views do not change (key padding)."""
    model = build_run("ODMT", "mm-tiny", odmt_cfg)[5]
    tower = model.item_tower.eval()
    ids = torch.arange(1, 30)
    text = tower.text_tower
    assert (~text.mask[ids]).any(dim=1).sum() > 5  # rows with padding inside the batch's width
    real_lookup = text.lookup
    with torch.no_grad():
        before = tower(ids)
        text.lookup = lambda i: real_lookup(i) + 100.0 * (~text.mask[i]).unsqueeze(-1) * torch.randn(
            real_lookup(i).shape)
        after = tower(ids)
    text.lookup = real_lookup
    torch.testing.assert_close(after, before)


def test_branch_passes_leave_the_models_own_results_unchanged(odmt_cfg):
    """The per-branch passes do not change the ensemble's results, cold / new groups or rows, reuse the item matrix
    (the catalogue encoded once per evaluation) and leave the model scoring the ensemble."""
    results = {}
    for on in (True, False):
        _, _, train, valid, test, model, trainer = build_run("ODMT", "mm-tiny", dict(odmt_cfg, eval_branches=on,
                                                                                     new_item_ratio=0.1))
        trainer.fit(train, valid, saved=False)
        before = model.items_encoded_eval
        result = trainer.evaluate(test, load_best_model=False)
        assert model.items_encoded_eval - before == model.n_items  # one item matrix for all the passes
        assert model.eval_branch is None
        results[on] = (dict(result), trainer.cold_test_result, trainer.new_test_result, trainer.test_rows,
                       trainer.branch_test_result)
    assert results[True][:4] == results[False][:4]
    assert results[False][4] is None and set(results[True][4]) == {"id", "text", "image"}
