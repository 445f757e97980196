"""PMMRec as a user runs it: bad input, transfer by key prefix, the pre-training loss, zero-shot, several source
datasets, a converted NineRec dataset and tuning a fine-tuning run.

One PMMRec pre-training run (module scope) gives the checkpoint every fine-tuning test starts from.
"""

import csv
import json
import os
import shutil
import sys

import pytest
import recbole.quick_start
import torch
from recbole.utils import init_seed

import recbole_mm
from recbole_mm.data.content import read_atomic
from recbole_mm.data.merge import subset_items
from recbole_mm.model.sequential_recommender.pmmrec import PMMRec, TransferError
from recbole_mm.testing import build_run

PMM_TINY = {
    "embedding_size": 16, "fusion_heads": 2, "n_layers": 1, "n_heads": 1, "MAX_ITEM_LIST_LENGTH": 10,
    "text_max_length": 16, "image_encoder": "test_vit", "image_pretrained": False, "image_size": 32,
    "epochs": 1, "train_batch_size": 64, "eval_batch_size": 256,
    "show_progress": False, "count_flops": False, "state": "WARNING",
}
TRANSFERRED = {"full": ("item_tower.", "seq_encoder."), "item_encoder": ("item_tower.",),
               "user_encoder": ("seq_encoder.",)}
PRETRAIN_ONLY = ("nicl_head.", "nid_head.")


@pytest.fixture(scope="module")
def base_cfg(tiny_root, tiny_bert):
    return dict(PMM_TINY, data_path=tiny_root, text_encoder=tiny_bert)


@pytest.fixture(scope="module")
def pretrained(base_cfg, tmp_path_factory):
    """The checkpoint of one PMMRec ``train_stage: pretrain`` run on mm-tiny (text + image, every term on)."""
    work = tmp_path_factory.mktemp("pmmrec-pretrain")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)  # RecBole writes log/ under the working directory ...
        mp.setattr(sys, "argv", [sys.argv[0]])  # ... and reads --key=value from the command line
        result = recbole_mm.run_recbole(model="PMMRec", dataset="mm-tiny", config_dict=dict(
            base_cfg, train_stage="pretrain", checkpoint_dir=str(work / "saved")))
    assert os.path.isfile(result["checkpoint_file"])
    return result["checkpoint_file"]


@pytest.fixture(scope="module")
def pretrained_state(pretrained):
    return torch.load(pretrained, map_location="cpu", weights_only=False)["state_dict"]


@pytest.fixture
def cfg(base_cfg, tmp_path):
    return dict(base_cfg, checkpoint_dir=str(tmp_path / "saved"))


def finetune_cfg(cfg, pretrained, **over):
    return dict(cfg, train_stage="finetune", pretrained_path=pretrained, **over)


def with_prefix(keys, prefixes):
    return {k for k in keys if k.startswith(tuple(prefixes))}


# ------------------------------------------------------------------------------------------------ bad input
BAD_INPUT = {
    "train_stage misspelt": (dict(train_stage="pretrian"), ValueError,
                             r"train_stage must be one of \('pretrain', 'finetune', 'scratch'\), got 'pretrian'"),
    "transfer misspelt": (dict(train_stage="finetune", pretrained_path="{ckpt}", transfer="item"), ValueError,
                          r"transfer must be one of \['full', 'item_encoder', 'user_encoder'\], got 'item'"),
    "finetune without pretrained_path": (dict(train_stage="finetune"), TransferError,
                                         r"train_stage finetune needs pretrained_path"),
    "pretrained_path missing": (dict(train_stage="finetune", pretrained_path="{tmp}/no-such.pth"), TransferError,
                                r"pretrained_path .*no-such\.pth does not exist"),
    "another width": (dict(train_stage="finetune", pretrained_path="{ckpt}", embedding_size=32), TransferError,
                      r"trained with embedding_size: 16, this run has 32"),
    "position table": (dict(train_stage="finetune", pretrained_path="{ckpt}", MAX_ITEM_LIST_LENGTH=12), TransferError,
                       r"does not fit this model for transfer 'full'.*seq_encoder\.position\.weight \(10, 16\) vs "
                       r"\(12, 16\)"),
    "other attention heads": (dict(train_stage="finetune", pretrained_path="{ckpt}", fusion_heads=4), TransferError,
                              r"trained with fusion_heads: 2, this run has 4"),
    "full then LoRA": (dict(train_stage="finetune", pretrained_path="{ckpt}", finetune="lora"), TransferError,
                       r"trained with finetune: 'top_k', this run has 'lora'"),
    "no images for an image model": (dict(train_stage="pretrain", image_dir="no-such-folder",
                                          features_dir="{tmp}/features"), ValueError,
                                     r"reads item images .* no item of dataset mm-tiny has an image in .*no-such-folder"),
    "NICL without images": (dict(train_stage="pretrain", modality="text", nicl_alpha=0.4), ValueError,
                            r"needs modality text\+image, got 'text'"),
    "finetune text from text+image": (dict(train_stage="finetune", pretrained_path="{ckpt}", modality="text"),
                                      TransferError, r"trained with modality: 'text\+image', this run has 'text'"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_clear_error(cfg, pretrained, tmp_path, case):
    over, error, message = BAD_INPUT[case]
    over = {k: v.format(ckpt=pretrained, tmp=tmp_path) if isinstance(v, str) else v for k, v in over.items()}
    with pytest.raises(error, match=message) as info:
        recbole_mm.run_recbole(model="PMMRec", dataset="mm-tiny", config_dict=dict(cfg, **over))
    assert type(info.value) is error


def test_position_table_only_matters_when_the_user_encoder_is_transferred(cfg, pretrained):
    *_, model, _ = build_run("PMMRec", "mm-tiny", finetune_cfg(cfg, pretrained, transfer="item_encoder",
                                                               MAX_ITEM_LIST_LENGTH=12))
    assert model.transferred_keys and all(k.startswith("item_tower.") for k in model.transferred_keys)


def test_checkpoint_of_another_model_names_it(cfg, pretrained, tmp_path):
    morec = dict(cfg, modality="text", mode="two_stage", dnn_layers=1, text_pooling="mean",
                 checkpoint_dir=str(tmp_path / "morec"))
    ckpt = recbole_mm.run_recbole(model="MoRec", dataset="mm-tiny", config_dict=morec)["checkpoint_file"]
    with pytest.raises(TransferError, match=r"is a checkpoint of MoRec, not of PMMRec"):
        recbole_mm.run_recbole(model="PMMRec", dataset="mm-tiny", config_dict=finetune_cfg(cfg, ckpt))


# ------------------------------------------------------------------------------------------------ transfer
def test_transfer_modes_load_exactly_their_part(cfg, pretrained, pretrained_state):
    assert with_prefix(pretrained_state, PRETRAIN_ONLY)  # the heads were trained ...
    *_, scratch, _ = build_run("PMMRec", "mm-tiny", dict(cfg, train_stage="scratch"))
    fresh = scratch.state_dict()
    assert not scratch.transferred_keys
    for transfer, prefixes in TRANSFERRED.items():
        *_, model, _ = build_run("PMMRec", "mm-tiny", finetune_cfg(cfg, pretrained, transfer=transfer))
        own = model.state_dict()
        assert not with_prefix(own, PRETRAIN_ONLY)  # ... and are never transferred
        assert not hasattr(model, "nicl_head") and not hasattr(model, "nid_head")
        assert set(own) == set(fresh)
        wanted = with_prefix(own, prefixes)
        assert wanted and set(model.transferred_keys) == wanted == with_prefix(pretrained_state, prefixes)
        assert {k.split(".")[0] + "." for k in model.transferred_keys} == set(prefixes)
        for key in wanted:
            assert torch.equal(own[key], pretrained_state[key]), (transfer, key)
        rest = set(own) - wanted
        assert rest == with_prefix(own, TRANSFERRED["full"]) - wanted  # nothing else in the model
        if transfer == "full":
            continue
        # the part left out starts as a scratch model built with the same seed, not as the checkpoint
        assert all(torch.equal(own[k], fresh[k]) for k in rest), transfer
        same = [k for k in rest if torch.equal(own[k], pretrained_state[k])]
        assert not same, f"{transfer}: these tensors were not meant to be transferred but equal the checkpoint's: {same}"


# ------------------------------------------------------------------------------------------------ pretrain loss
def _model(config, train, **over):
    saved = {k: config[k] for k in over}
    for k, v in over.items():
        config[k] = v
    try:
        init_seed(config["seed"], config["reproducibility"])
        return PMMRec(config, train._dataset)
    finally:
        for k, v in saved.items():
            config[k] = v


def _loss_and_grads(model, batch, seed):
    model.train()
    model.zero_grad()
    init_seed(seed, True)
    loss = model.calculate_loss(batch)
    if isinstance(loss, tuple):  # pre-training: (next-item, NICL, NID, RCL), each weighted; the trainer sums them
        assert len(loss) == 4
        loss = sum(loss)
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_pretrain_loss_composition(cfg):
    off = dict(nicl_alpha=0.0, nid_weight=0.0, rcl_weight=0.0)
    # dropout 0: the next-item term is the same computation with and without the other terms
    config, _, train, *_ = build_run("PMMRec", "mm-tiny", dict(cfg, train_stage="pretrain", dropout_prob=0.0, **off))
    batch = next(iter(train))
    seed = config["seed"]
    scratch = _model(config, train, train_stage="scratch")
    base_loss, base_grads = _loss_and_grads(scratch, batch, seed)
    pretrain_off = _model(config, train, train_stage="pretrain")
    loss, grads = _loss_and_grads(pretrain_off, batch, seed)
    assert torch.equal(loss, base_loss)
    assert set(grads) == set(base_grads) and all(torch.equal(grads[n], base_grads[n]) for n in grads)
    assert not with_prefix(grads, PRETRAIN_ONLY)  # the heads get nothing when their terms are off

    towers = {m: [n for n in base_grads if n.startswith(f"item_tower.towers.{m}.")] for m in ("text", "image")}
    assert towers["text"] and towers["image"]
    terms = {"nicl_alpha": (0.4, "nicl_head."), "nid_weight": (0.5, "nid_head."), "rcl_weight": (0.5, None)}
    for key, (value, head) in terms.items():
        model = _model(config, train, train_stage="pretrain", **dict(off, **{key: value}))
        assert all(torch.equal(p, scratch.state_dict()[n]) for n, p in model.state_dict().items()
                   if not n.startswith(PRETRAIN_ONLY))
        loss, grads = _loss_and_grads(model, batch, seed)
        assert torch.isfinite(loss) and not torch.allclose(loss, base_loss), key
        if head is not None:
            own = [n for n, p in model.named_parameters() if n.startswith(head)]
            assert own and all(n in grads and grads[n].abs().sum() > 0 for n in own), (key, own)
        else:
            assert not with_prefix(grads, PRETRAIN_ONLY)
        # the term's own gradient (total minus the scaled next-item gradient) reaches both modality towers
        scale = 1.0 - (value if key == "nicl_alpha" else 0.0)
        for modality, names in towers.items():
            term = torch.cat([(grads[n] - scale * base_grads[n]).flatten() for n in names])
            total = torch.cat([grads[n].flatten() for n in names])
            assert term.norm() > 1e-3 * total.norm(), (key, modality, float(term.norm()), float(total.norm()))
        if key == "nicl_alpha":  # NICL reads item vectors only: the user encoder sees (1 - a) of L_next's gradient
            user = [n for n in base_grads if n.startswith("seq_encoder.")]
            assert user and all(torch.allclose(grads[n], (1 - value) * base_grads[n], rtol=1e-4, atol=1e-7)
                                for n in user)
        # the weight enters as the formula says: nicl (1 - a) L_next + a L_NICL, the others L_next + w L_term
        half, _ = _loss_and_grads(_model(config, train, train_stage="pretrain", **dict(off, **{key: value / 2})),
                                  batch, seed)
        if key == "nicl_alpha":
            term_loss = (loss - (1 - value) * base_loss) / value
            expected = (1 - value / 2) * base_loss + value / 2 * term_loss
        else:
            expected = base_loss + (loss - base_loss) / 2
        assert torch.allclose(half, expected, rtol=1e-4, atol=1e-5), (key, float(half), float(expected))


# ------------------------------------------------------------------------------------------------ zero-shot
def test_zero_shot_evaluates_the_transferred_model(cfg, pretrained, pretrained_state):
    run_cfg = finetune_cfg(cfg, pretrained, transfer="full", epochs=0)
    result = recbole_mm.run_recbole(model="PMMRec", dataset="mm-tiny", config_dict=run_cfg)
    assert result["best_valid_result"] is not None and os.path.isfile(result["checkpoint_file"])
    assert not result.get("train_loss_history")  # no training epoch
    saved = torch.load(result["checkpoint_file"], map_location="cpu", weights_only=False)["state_dict"]
    transferred = with_prefix(saved, TRANSFERRED["full"])
    assert transferred and transferred == with_prefix(pretrained_state, TRANSFERRED["full"])
    for key in transferred:
        assert torch.equal(saved[key], pretrained_state[key]), key
    *_, test, model, trainer = build_run("PMMRec", "mm-tiny", run_cfg)
    assert dict(trainer.evaluate(test, load_best_model=False)) == dict(result["test_result"])
    assert 0.0 <= result["test_result"]["hit@10"] <= 1.0


# ------------------------------------------------------------------------------------------------ several sources
def test_pretrain_on_several_source_datasets_then_transfer(cfg, tiny_root, tmp_path, monkeypatch):
    monkeypatch.setenv("RECBOLE_MM_HOME", str(tmp_path / "home"))
    src = os.path.join(tiny_root, "mm-tiny")
    items = read_atomic(os.path.join(src, "mm-tiny.item"), ["item_id", "genres"], id_columns=["item_id"])
    genres = {t: set(g.split()) for t, g in zip(items["item_id"], items["genres"])}
    split = {"a": {t for t, g in genres.items() if "Drama" in g},
             "b": {t for t, g in genres.items() if "Comedy" in g and "Drama" not in g}}
    split["c"] = set(genres) - split["a"] - split["b"]  # the target: neither genre
    root = tmp_path / "data"
    kept = {}
    for name, keep in split.items():
        folder = subset_items(src, "mm-tiny", str(root), name, keep, min_user_inter=3)
        kept[name] = set(read_atomic(os.path.join(folder, f"{name}.inter"), ["item_id"], id_columns=["item_id"])
                         ["item_id"])
        assert kept[name] and kept[name] <= keep
    assert not (kept["a"] & kept["b"]) and not (kept["c"] & (kept["a"] | kept["b"]))

    pre_cfg = dict(cfg, data_path=str(root), source_datasets=["a", "b"], train_stage="pretrain")
    result = recbole_mm.run_recbole(model="PMMRec", dataset="a+b", config_dict=pre_cfg)
    assert 0.0 <= result["test_result"]["hit@10"] <= 1.0
    assert os.path.isfile(tmp_path / "home" / "merged" / "a+b" / "a+b.inter")
    config, dataset, *_ = build_run("PMMRec", "a+b", pre_cfg)
    tokens = set(dataset.field2id_token[dataset.iid_field][1:])  # without [PAD]
    assert tokens == {f"a__{t}" for t in kept["a"]} | {f"b__{t}" for t in kept["b"]}

    target = recbole_mm.run_recbole(model="PMMRec", dataset="c", config_dict=dict(
        cfg, data_path=str(root), train_stage="finetune", pretrained_path=result["checkpoint_file"],
        transfer="item_encoder", checkpoint_dir=str(tmp_path / "saved-c")))
    assert 0.0 <= target["test_result"]["hit@10"] <= 1.0
    *_, model, _ = build_run("PMMRec", "c", dict(cfg, data_path=str(root), train_stage="finetune",
                                                 pretrained_path=result["checkpoint_file"], transfer="item_encoder"))
    assert model.n_items == len(kept["c"]) + 1
    state = torch.load(result["checkpoint_file"], map_location="cpu", weights_only=False)["state_dict"]
    assert all(torch.equal(model.state_dict()[k], state[k]) for k in model.transferred_keys)


# ------------------------------------------------------------------------------------------------ NineRec
def _write_ninerec_domain(src: str, raw: str, domain: str, n_users: int) -> set:
    """A raw NineRec domain (``<D>_pair.csv`` item,user,timestamp; ``<D>_item.csv``; ``<D>_cover/``) from the rows,
    titles and posters of a dataset folder; returns the item ids written."""
    inter = read_atomic(os.path.join(src, f"{os.path.basename(src)}.inter"), ["user_id", "item_id", "timestamp"],
                        id_columns=["user_id", "item_id"])
    users = list(dict.fromkeys(inter["user_id"]))[:n_users]
    rows = inter[inter["user_id"].isin(users)]
    items = read_atomic(os.path.join(src, f"{os.path.basename(src)}.item"), ["item_id", "title", "genres"],
                        id_columns=["item_id"])
    items = items[items["item_id"].isin(set(rows["item_id"]))]
    folder = os.path.join(raw, domain)
    os.makedirs(os.path.join(folder, f"{domain}_cover"))
    with open(os.path.join(folder, f"{domain}_pair.csv"), "w", encoding="utf-8", newline="") as f:
        for u, i, t in zip(rows["user_id"], rows["item_id"], rows["timestamp"]):
            f.write(f"v{i},u{u},{int(float(t))}\n")
    with open(os.path.join(folder, f"{domain}_item.csv"), "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["item_id", "title", "title_en"])
        for i, title, g in zip(items["item_id"], items["title"], items["genres"]):
            w.writerow([f"v{i}", title, f"{title}, {g}"])
            shutil.copy(os.path.join(src, "images", f"{i}.jpg"), os.path.join(folder, f"{domain}_cover", f"v{i}.jpg"))
    return {f"v{i}" for i in rows["item_id"]}


def test_finetune_on_a_converted_ninerec_dataset(cfg, pretrained, tiny_root, tmp_path):
    from recbole_mm.cli import main as cli

    domain = "Bili_Movie"
    written = _write_ninerec_domain(os.path.join(tiny_root, "mm-tiny"), str(tmp_path / "raw"), domain, n_users=30)
    root = tmp_path / "data"
    assert cli(["convert", "ninerec", "--input", str(tmp_path / "raw"), "--domain", domain, "--output", str(root),
                "-q"]) == 0
    folder = root / domain
    converted = read_atomic(str(folder / f"{domain}.inter"), ["user_id", "item_id"], id_columns=["user_id", "item_id"])
    assert set(converted["item_id"]) == written and len(os.listdir(folder / "images")) == len(written)
    run_cfg = finetune_cfg(cfg, pretrained, transfer="item_encoder", data_path=str(root))
    for i, run in enumerate((recbole.quick_start.run_recbole, recbole_mm.run_recbole)):
        result = run(model="PMMRec", dataset=domain, config_dict=dict(run_cfg, checkpoint_dir=str(tmp_path / f"s{i}")))
        assert 0.0 <= result["test_result"]["hit@10"] <= 1.0, run


# ------------------------------------------------------------------------------------------------ tuning
def test_tune_a_finetuning_key(cfg, pretrained, tmp_path):
    from recbole_mm.cli import main as cli

    overrides = [f"{k}={v}" for k, v in finetune_cfg(cfg, pretrained, transfer="item_encoder").items()]
    out = tmp_path / "tune.md"
    assert cli(["tune", "--model", "PMMRec", "--dataset", "mm-tiny", "--space",
                "learning_rate=choice([0.01, 0.001])", "-o", str(out)] + overrides) == 0
    text = out.read_text()
    assert text.count("## learning_rate:") == 2 and "trials: 2" in text


def test_finetuned_checkpoint_reloads_in_a_new_process_without_the_pretraining_file(cfg, pretrained, tmp_path):
    """The transfer happens when a fine-tuning run builds its model; reloading the fine-tuned checkpoint later (in
    another process, after the pre-training file is gone) takes the weights from the checkpoint alone."""
    import shutil
    import subprocess

    copy = str(tmp_path / "pre.pth")
    shutil.copy(pretrained, copy)
    result = recbole_mm.run_recbole(model="PMMRec", dataset="mm-tiny", config_dict=finetune_cfg(cfg, copy))
    os.remove(copy)
    script = (
        "import sys, json, torch; torch.set_num_threads(1); import recbole_mm\n"
        "from recbole_mm.trainer.utils import get_trainer\n"
        "config, model, dataset, train, valid, test = recbole_mm.load_data_and_model(sys.argv[1])\n"
        "trainer = get_trainer(config['MODEL_TYPE'], config['model'])(config, model)\n"
        "print(json.dumps({k: float(v) for k, v in trainer.evaluate(test, load_best_model=False).items()}))\n")
    proc = subprocess.run([sys.executable, "-c", script, result["checkpoint_file"]], capture_output=True, text=True,
                          cwd=str(tmp_path), env=dict(os.environ, RECBOLE_MM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    reloaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert reloaded == pytest.approx({k: float(v) for k, v in result["test_result"].items()}, abs=5e-5)


def test_relative_pretrained_path_is_made_absolute(cfg, pretrained, tmp_path, monkeypatch):
    from recbole_mm.config import Config

    monkeypatch.chdir(os.path.dirname(pretrained))
    config = Config(model="PMMRec", dataset="mm-tiny",
                    config_dict=finetune_cfg(cfg, os.path.basename(pretrained)))
    assert config["pretrained_path"] == pretrained


def test_token_fusions_refuse_the_full_softmax_before_extracting(cfg, tmp_path):
    feats = tmp_path / "features"
    with pytest.raises(ValueError, match="loss 'ce' .* token-level fusion 'merge_attn'"):
        build_run("PMMRec", "mm-tiny", dict(cfg, loss="ce", features_dir=str(feats)))
    assert not feats.exists()  # refused before any feature extraction


def test_transfer_mismatch_is_found_before_extracting(cfg, pretrained, tmp_path):
    feats = tmp_path / "features"
    with pytest.raises(TransferError, match="embedding_size"):
        build_run("PMMRec", "mm-tiny", finetune_cfg(cfg, pretrained, embedding_size=32, features_dir=str(feats)))
    assert not feats.exists()


def test_pretrained_path_without_finetune_is_an_error(cfg, pretrained):
    with pytest.raises(ValueError, match="pretrained_path is only read with train_stage finetune.*'scratch'"):
        build_run("PMMRec", "mm-tiny", dict(cfg, pretrained_path=pretrained))


def test_pretraining_reports_each_term(cfg):
    """An epoch of pre-training returns one mean per term (next-item, NICL, NID, RCL): RecBole's trainer logs them
    as train_loss1..4 and writes each to tensorboard; a switched-off term stays 0."""
    _, _, train, _, _, model, trainer = build_run("PMMRec", "mm-tiny", dict(cfg, train_stage="pretrain", rcl_weight=0))
    losses = trainer._train_epoch(train, 0)
    assert isinstance(losses, tuple) and len(losses) == 4
    assert all(v > 0 for v in losses[:3]) and losses[3] == 0
    assert "train_loss1" in trainer._generate_train_loss_output(0, 0.0, 1.0, losses)
    assert trainer.train_loss_history == [pytest.approx(sum(losses))]


def test_features_extracted_on_first_use_do_not_change_the_initial_weights(cfg, tmp_path):
    """A run that extracts its features first and the same run afterwards start from the same weights (the
    extraction runs outside the model's random streams)."""
    over = dict(cfg, features_dir=str(tmp_path / "features"), image_encoder="test_vit", image_pretrained=False)
    first = build_run("PMMRec", "mm-tiny", over)[5].state_dict()
    second = build_run("PMMRec", "mm-tiny", over)[5].state_dict()
    assert set(first) == set(second) and all(torch.equal(first[k], second[k]) for k in first)

