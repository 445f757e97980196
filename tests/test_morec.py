"""MoRec and the multimodal sequential base: modes, policies, losses, item-matrix cache, windows, groups, cold items."""

import numpy as np
import pytest
import recbole.quick_start
import torch
from recbole.data import data_preparation
from recbole.utils import init_seed

import recbole_mm
from recbole_mm.config import Config
from recbole_mm.data.utils import create_dataset
from recbole_mm.trainer.utils import get_trainer

MOREC_TINY = {
    "embedding_size": 16, "n_layers": 1, "n_heads": 1, "dnn_layers": 1, "MAX_ITEM_LIST_LENGTH": 10,
    "text_max_length": 16, "text_pooling": "mean", "image_encoder": "test_vit", "image_pretrained": False,
    "image_size": 32, "image_pooling": "mean",
    "train_batch_size": 64, "epochs": 1, "learning_rate": 0.005, "encoder_learning_rate": 0.005,
}


@pytest.fixture
def morec_cfg(tiny_config, tiny_bert):
    return dict(tiny_config, **MOREC_TINY, text_encoder=tiny_bert)


def build(cfg, **over):
    config = Config(model="MoRec", dataset="mm-tiny", config_dict=dict(cfg, **over))
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    train, valid, test = data_preparation(config, dataset)
    model = recbole_mm.get_model("MoRec")(config, train._dataset)
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    return config, dataset, train, valid, test, model, trainer


def encoder_module_params(model):
    """Names of every parameter inside the pretrained encoders (adapters included)."""
    from recbole_mm.encoders import ImageEncoder, TextEncoder

    return {f"{p}.{n}" for p, m in model.named_modules() if isinstance(m, (TextEncoder, ImageEncoder))
            for n, _ in m.named_parameters()}


def steps(model, trainer, batch, n):
    model.train()
    out = []
    for _ in range(n):
        trainer.optimizer.zero_grad()
        loss = model.calculate_loss(batch)
        loss.backward()
        trainer.optimizer.step()
        out.append(loss.item())
    return out


CASES = [
    dict(mode="two_stage", modality="text", loss="bce"),
    dict(mode="two_stage", modality="image", loss="inbatch"),
    dict(mode="two_stage", modality="text+image", fusion="concat", loss="ce"),
    dict(mode="end2end", modality="text", finetune="full", loss="inbatch"),
    dict(mode="end2end", modality="text", finetune="top_k", loss="bce"),
    dict(mode="end2end", modality="text", finetune="lora", loss="inbatch"),
    dict(mode="end2end", modality="text", finetune="bitfit", loss="inbatch"),
    dict(mode="end2end", modality="image", finetune="full", loss="inbatch", seq_encoder="recbole"),
    dict(mode="end2end", modality="text+image", finetune="frozen", fusion="sum", loss="inbatch", seq_mode="prefix"),
]


@pytest.mark.parametrize("i, case", list(enumerate(CASES)), ids=lambda c: "-".join(str(v) for v in c.values()) if isinstance(c, dict) else "")
def test_modes_train_and_evaluate(morec_cfg, i, case):
    config, dataset, train, valid, test, model, trainer = build(morec_cfg, **case)
    batch = next(iter(train))
    enc = {n: p.detach().clone() for n, p in model.named_parameters() if n in encoder_module_params(model)}
    losses = steps(model, trainer, batch, 25)
    assert losses[-1] < 0.97 * losses[0], losses
    after = dict(model.named_parameters())
    moved = {n for n, v in enc.items() if not torch.equal(v, after[n].detach())}
    trainable = {n for n in enc if after[n].requires_grad}
    assert moved == trainable  # the policy decides exactly which encoder weights change
    if case["mode"] == "two_stage" or case.get("finetune") == "frozen":
        assert not trainable
    else:
        assert trainable
    # the whole run through both entry points (the plugin's and RecBole's own), alternating
    run = recbole_mm.run_recbole if i % 2 == 0 else recbole.quick_start.run_recbole
    result = run(model="MoRec", dataset="mm-tiny", config_dict=dict(morec_cfg, **case))["test_result"]
    assert set(result) == {"hit@10", "ndcg@10"} and 0.0 <= result["ndcg@10"] <= result["hit@10"] <= 1.0


def test_item_matrix_once_per_evaluation_and_dropped_when_training(morec_cfg):
    config, dataset, train, valid, test, model, trainer = build(morec_cfg, mode="end2end", modality="text", finetune="top_k",
                                                                eval_batch_size=16)
    assert len(valid) > 1  # several evaluation batches share one matrix
    before = model.items_encoded_eval
    trainer.evaluate(valid, load_best_model=False)
    assert model.items_encoded_eval - before == model.n_items
    cached = model._item_matrix
    assert cached is not None and torch.all(cached[0] == 0)
    trainer.evaluate(test, load_best_model=False)
    assert model.items_encoded_eval - before == 2 * model.n_items
    model.train()
    assert model._item_matrix is None
    # the cached matrix equals encoding every item directly
    model.eval()
    with torch.no_grad():
        direct = model.item_tower(torch.arange(1, model.n_items))
        assert torch.allclose(model.item_matrix()[1:], direct, atol=1e-5)
        batch = next(iter(test))[0]
        scores = model.full_sort_predict(batch)
        assert scores.shape == (len(batch), model.n_items)


def test_all_position_windows_cover_each_training_target_once(morec_cfg):
    config, dataset, train, valid, test, model, trainer = build(morec_cfg, MAX_ITEM_LIST_LENGTH=4)
    # every training interaction but each user's first is a target of RecBole's prefix examples
    prefix_cfg = dict(morec_cfg, MAX_ITEM_LIST_LENGTH=4, seq_mode="prefix")
    _, _, prefix_train, *_ = build(prefix_cfg)
    uid = dataset.uid_field
    expected = sorted(zip(prefix_train._dataset.inter_feat[uid].tolist(), prefix_train._dataset.inter_feat[dataset.iid_field].tolist()))
    got = []
    for batch in train:
        seq, lengths, targets, full = model.sequence_targets(batch)
        for u, row in zip(batch[uid].tolist(), targets.tolist()):
            got += [(u, t) for t in row if t > 0]
    assert sorted(got) == expected
    assert len(train._dataset) < len(prefix_train._dataset) / 2


def test_parameter_groups(morec_cfg):
    config, dataset, train, valid, test, model, trainer = build(
        morec_cfg, mode="end2end", modality="text", finetune="top_k", learning_rate=0.01, encoder_learning_rate=0.0005,
        weight_decay=0.1, encoder_weight_decay=0.0,
    )
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    assert set(groups) == {"model", "encoder"}
    assert groups["model"]["lr"] == 0.01 and groups["encoder"]["lr"] == 0.0005
    assert groups["model"]["weight_decay"] == 0.1 and groups["encoder"]["weight_decay"] == 0.0
    enc_params = {id(p) for n, p in model.named_parameters() if n in encoder_module_params(model) and p.requires_grad}
    assert {id(p) for p in groups["encoder"]["params"]} == enc_params
    assert isinstance(trainer.optimizer, torch.optim.AdamW)
    # LoRA adapters are new weights: they learn with the model's rate
    *_, model, trainer = build(morec_cfg, mode="end2end", modality="text", finetune="lora", learning_rate=0.01,
                               encoder_learning_rate=0.0005)
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    lora = {id(p) for n, p in model.named_parameters() if "lora_" in n}
    assert lora and lora <= {id(p) for p in groups["model"]["params"]} and "encoder" not in groups


def test_cold_item_metrics(morec_cfg):
    result = recbole_mm.run_recbole(model="MoRec", dataset="mm-tiny", config_dict=dict(morec_cfg, cold_item_threshold=3))
    config, dataset, train, valid, test, model, trainer = build(morec_cfg)
    counts = train._dataset.train_item_counts
    targets = test._dataset.inter_feat[dataset.iid_field].numpy()
    assert result["cold_test_result"]["rows"] == int(((counts[targets] >= 1) & (counts[targets] <= 3)).sum()) > 0
    assert result["new_test_result"]["rows"] == int((counts[targets] == 0).sum())
    assert set(result["cold_test_result"]) == {"rows", "max_train_count", "hit@10", "ndcg@10"}
    assert 0.0 <= result["cold_test_result"]["hit@10"] <= 1.0
    assert result["cold_valid_result"]["rows"] > 0
    assert len(result["train_loss_history"]) == 1


def test_cold_metrics_over_every_trained_item_equal_the_overall_metrics(morec_cfg):
    config, dataset, train, valid, test, model, trainer = build(morec_cfg, cold_item_threshold=10**9,
                                                                metrics=["Hit", "NDCG", "MRR", "Recall"])
    trainer.fit(train, valid, saved=False)
    counts = train._dataset.train_item_counts
    trained = counts[test._dataset.inter_feat[dataset.iid_field].numpy()] > 0
    keep = torch.as_tensor(trained)
    test._dataset.inter_feat = test._dataset.inter_feat[keep]  # only targets with a training interaction
    test = type(test)(config, test._dataset, test._sampler, shuffle=False)
    overall = trainer.evaluate(test, load_best_model=False)
    cold = dict(trainer.cold_test_result)
    cold.pop("max_train_count")
    assert cold.pop("rows") == int(trained.sum()) == len(test._dataset)
    assert cold == dict(overall)
    assert trainer.new_test_result["rows"] == 0


def test_training_counts_and_user_sequences(morec_cfg):
    config = Config(model="MoRec", dataset="mm-tiny", config_dict=morec_cfg)
    dataset = create_dataset(config)
    uid, iid, n = dataset.uid_field, dataset.iid_field, dataset.item_num
    users, items = dataset.inter_feat[uid].to_numpy(), dataset.inter_feat[iid].to_numpy()
    train, valid, test = data_preparation(config, dataset)
    held_out = [(d._dataset.inter_feat[uid].numpy(), d._dataset.inter_feat[iid].numpy()) for d in (valid, test)]
    # training split = every interaction but each user's valid and test targets (ml-100k has no repeats)
    want = np.bincount(items, minlength=n) - sum(np.bincount(i, minlength=n) for _, i in held_out)
    assert np.array_equal(train._dataset.train_item_counts, want)
    keys = set((users * n + items).tolist()) - {int(u) * n + int(i) for us, its in held_out for u, i in zip(us, its)}
    assert set(train._dataset.train_user_item_keys.tolist()) == keys
    model = recbole_mm.get_model("MoRec")(config, train._dataset)
    p = np.maximum(want, 1) / np.maximum(want, 1).sum()
    assert np.allclose(model.log_pop.numpy(), np.log(p), atol=1e-5)


def test_seq_mode_of_data_and_model_agree(morec_cfg):
    config, dataset, train, *_ = build(morec_cfg, seq_mode="prefix")
    assert train._dataset.seq_mode == "prefix"
    config["seq_mode"] = "all_position"
    with pytest.raises(ValueError, match="built for seq_mode 'prefix'"):
        recbole_mm.get_model("MoRec")(config, train._dataset)


def test_loading_weights_drops_the_cached_matrix(morec_cfg):
    config, dataset, train, valid, test, model, trainer = build(morec_cfg)
    model.eval()
    model.item_matrix()
    assert model._item_matrix is not None
    model.load_state_dict(model.state_dict())
    assert model._item_matrix is None


def test_ce_needs_cached_features(morec_cfg):
    # refused when the model is built, before any encoder is loaded
    with pytest.raises(ValueError, match="loss 'ce' .* mode end2end.*two_stage \\(cached features\\)"):
        build(morec_cfg, mode="end2end", modality="text", loss="ce", finetune="bitfit")


def test_recbole_own_run_recbole_and_checkpoint_reload(morec_cfg):
    result = recbole.quick_start.run_recbole(model="MoRec", dataset="mm-tiny", config_dict=morec_cfg)
    assert 0.0 <= result["test_result"]["hit@10"] <= 1.0
    config, model, dataset, train, valid, test = recbole.quick_start.load_data_and_model(
        recbole_mm.run_recbole(model="MoRec", dataset="mm-tiny", config_dict=morec_cfg)["checkpoint_file"])
    assert type(model).__name__ == "MoRec"
    ckpt_keys = set(torch.load(config["checkpoint_dir"] + "/" + __import__("os").listdir(config["checkpoint_dir"])[0],
                               weights_only=False)["state_dict"])
    assert not any(k.endswith(".features") for k in ckpt_keys)  # content buffers are not saved


def test_cli_tune_morec(morec_cfg, tmp_path):
    from recbole_mm.cli import main as cli

    overrides = [f"{k}={v}" for k, v in morec_cfg.items()]
    out = tmp_path / "t.md"
    assert cli(["tune", "--model", "MoRec", "--dataset", "mm-tiny", "--space", "dnn_layers=choice([0, 1])", "-o", str(out)]
               + overrides) == 0
    assert out.read_text().count("## dnn_layers:") == 2


@pytest.mark.parametrize("over", [dict(modality="text"), dict(modality="text+image", fusion="concat", id_tower=True)])
def test_the_catalogue_read_in_place_equals_the_gathered_one(morec_cfg, over):
    """The CE loss reads the two-stage catalogue in place (a slice of the cached features, no gather): the same
    vectors and gradients as the tower over arange(1, n_items), dropout draws included."""
    model = build(morec_cfg, mode="two_stage", loss="ce", **over)[5]
    model.train()
    torch.manual_seed(0)
    fast = model.catalogue_vectors()
    fast.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    torch.manual_seed(0)
    slow = model.item_tower(torch.arange(1, model.n_items))
    slow.square().sum().backward()
    assert fast.shape == (model.n_items - 1, model.embedding_size)
    torch.testing.assert_close(fast, slow)
    assert grads and all(torch.allclose(grads[n], p.grad) for n, p in model.named_parameters() if n in grads)
