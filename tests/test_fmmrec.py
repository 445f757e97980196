"""FMMRec as a user runs it: one command runs stages 0, 1 and 2; the stage cache is reused across runs (same
results) and keyed by its inputs; backbones by name or checkpoint; the CLI, HyperTuning, a reload in a new process,
an MMRec-format folder with audio; bad input. The losses, graphs and gradient isolation are checked against
references in ``test_fmmrec_reference.py``."""

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import recbole_mm
from recbole_mm.testing import build_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USER_COLS = {"load_col": {"inter": ["user_id", "item_id", "rating", "timestamp"],
                          "user": ["user_id", "age", "gender", "occupation"]}}
FMMREC_TINY = {"embedding_size": 16, "image_size": 32, "text_max_length": 16, "epochs": 2, "train_batch_size": 512,
               "bmmf_epochs": 2, "knn_k_uugraph": 4, "d_steps": 2, "fairness_epochs": 5,
               "fmmrec_backbone": "LightGCN", "fmmrec_backbone_config": {"epochs": 2}, **USER_COLS}


@pytest.fixture
def fmmrec_cfg(tiny_config, tiny_bert, tiny_vit, tmp_path):
    return dict(tiny_config, **FMMREC_TINY, text_encoder=tiny_bert, image_encoder=tiny_vit,
                fmmrec_cache_dir=str(tmp_path / "fmmrec_cache"))


def _plain(result):
    return {k: float(v) for k, v in result.items()}


def test_one_command_runs_every_stage_and_reuses_the_cache(fmmrec_cfg, monkeypatch):
    first = recbole_mm.run_recbole(model="FMMRec", dataset="mm-tiny", config_dict=fmmrec_cfg)
    cache = fmmrec_cfg["fmmrec_cache_dir"]
    names = sorted(os.path.basename(p).split("-")[0] + "-" + os.path.basename(p).split("-")[1]
                   for p in glob.glob(os.path.join(cache, "*")))
    assert names == ["backbone-LightGCN", "bmmf-image", "bmmf-text"]
    assert not glob.glob(os.path.join(cache, "*.tmp"))
    for view in ("fairness_result", "fairness_item_aggregated_result"):
        audit = first[view]
        assert set(audit) == {"gender", "age", "occupation"}, audit
        assert 0.0 <= audit["gender"]["auc"] <= 1.0 and 0.0 <= audit["age"]["micro_f1"] <= 1.0
    assert first["fairness_item_aggregated_result"]["gender"]["representation"] == "item_aggregated"

    # the second run trains no backbone and no transforms (files untouched), and gives the same results
    def no_training(*args, **kwargs):
        raise AssertionError("a cached stage was trained again")

    from recbole_mm.model import fmmrec_stages

    with monkeypatch.context() as patched:  # only this patch is undone below (not the fixtures' cwd and argv)
        patched.setattr(fmmrec_stages, "train_disentangler", no_training)
        stamps = {p: os.stat(p).st_mtime_ns for p in glob.glob(os.path.join(cache, "*"))}
        second = recbole_mm.run_recbole(model="FMMRec", dataset="mm-tiny", config_dict=fmmrec_cfg)
    assert _plain(second["test_result"]) == _plain(first["test_result"])
    assert {p: os.stat(p).st_mtime_ns for p in glob.glob(os.path.join(cache, "*"))} == stamps

    # a stage setting changes the stage-1 key only; the backbone stays
    recbole_mm.run_recbole(model="FMMRec", dataset="mm-tiny", config_dict=dict(fmmrec_cfg, bmmf_biased_weight=0.2))
    files = [os.path.basename(p) for p in glob.glob(os.path.join(cache, "*"))]
    assert sum(f.startswith("backbone-") for f in files) == 1 and sum(f.startswith("bmmf-") for f in files) == 4


def test_stage_inputs_come_from_the_backbone_and_the_transforms(fmmrec_cfg):
    """U' and I are the backbone checkpoint's own vectors (I exactly; U' = U + 0.1 (A^f U - A^b U))."""
    from recbole_mm.model.fmmrec_stages import load_backbone_checkpoint
    from recbole_mm.model.general import user_item_representations

    freedom = recbole_mm.run_recbole(model="FREEDOM", dataset="mm-tiny", config_dict=dict(
        fmmrec_cfg, feat_embed_dim=16, knn_k=4, epochs=1))
    cfg = dict(fmmrec_cfg, fmmrec_backbone=freedom["checkpoint_file"], epochs=0)
    config, dataset, train, valid, _, model, trainer = build_run("FMMRec", "mm-tiny", cfg)[:7]
    model.before_fit(config, train, valid)
    backbone = load_backbone_checkpoint(freedom["checkpoint_file"], config, train._dataset)
    users, items, source = user_item_representations(backbone)
    assert source == "user_item_matrices"
    torch.testing.assert_close(model.item_input, items.float())
    assert not torch.equal(model.user_input, users) and torch.allclose(model.user_input, users, atol=0.5)


def test_backbone_errors(fmmrec_cfg, tmp_path):
    for backbone, match in [("NoSuchModel", "neither a model name nor a checkpoint"),
                            (str(tmp_path / "missing.pth"), "does not exist"),
                            ("SASRec", "general pairwise"), ("FMMRec", "general pairwise")]:
        with pytest.raises((ValueError, FileNotFoundError), match=match):
            recbole_mm.run_recbole(model="FMMRec", dataset="mm-tiny", config_dict=dict(fmmrec_cfg, fmmrec_backbone=backbone))
    with pytest.raises(ValueError, match="FMMRec's own loader"):
        recbole_mm.run_recbole(model="FMMRec", dataset="mm-tiny", config_dict=dict(
            fmmrec_cfg, fmmrec_backbone_config={"epochs": 1, "train_batch_size": 64}))
    with pytest.raises(RuntimeError, match="no backbone vectors yet"):
        build_run("FMMRec", "mm-tiny", fmmrec_cfg)[5].full_sort_predict(None)
    with pytest.raises(ValueError, match="filter_mode"):
        build_run("FMMRec", "mm-tiny", dict(fmmrec_cfg, filter_mode="independent"))
    with pytest.raises(ValueError, match="needs the text modality"):
        build_run("FMMRec", "mm-tiny", dict(fmmrec_cfg, modality="image+audio", audio_graph_from_text=True,
                                           audio_feature_file="x.npy"))


def test_bad_sensitive_attributes(fmmrec_cfg, tiny_root, tmp_path):
    # attributes RecBole did not load (mm-tiny's load_col has no user columns) are read from the .user file
    no_users = {k: v for k, v in fmmrec_cfg.items() if k != "load_col"}
    unloaded = build_run("FMMRec", "mm-tiny", no_users)
    assert unloaded[1].user_feat is None
    assert torch.equal(unloaded[5].labels, build_run("FMMRec", "mm-tiny", fmmrec_cfg)[5].labels)
    with pytest.raises(ValueError, match="'income' is not a column of mm-tiny.user"):
        build_run("FMMRec", "mm-tiny", dict(fmmrec_cfg, sensitive_fields=["gender", "income"]))
    # a single class among the users, and users without a value (counted out of the attackers' losses)
    import shutil

    root = tmp_path / "data"
    shutil.copytree(os.path.join(tiny_root, "mm-tiny"), root / "mm-tiny")
    path = root / "mm-tiny" / "mm-tiny.user"
    lines = path.read_text().splitlines()
    header = lines[0].split("\t")
    g, a = header.index("gender:token"), header.index("age:token")
    rows = [line.split("\t") for line in lines[1:]]
    for i, row in enumerate(rows):
        row[g] = "M"
        if i % 3 == 0:
            row[a] = ""
    path.write_text("\n".join(["\t".join(header)] + ["\t".join(r) for r in rows]) + "\n")
    with pytest.raises(ValueError, match="single class"):
        build_run("FMMRec", "mm-tiny", dict(fmmrec_cfg, data_path=str(root)))
    model = build_run("FMMRec", "mm-tiny", dict(fmmrec_cfg, data_path=str(root), sensitive_fields=["age"]))[5]
    assert int((model.labels[1:, 0] < 0).sum()) == sum(1 for i in range(len(rows)) if i % 3 == 0)


def test_cli_run_and_tune(fmmrec_cfg, tmp_path, capsys):
    from recbole_mm.cli import main as cli

    def overrides(cfg):
        out = [f"{k}={v}" for k, v in cfg.items() if k not in ("load_col", "fmmrec_backbone_config")]
        return out + ["load_col={inter: [user_id, item_id, rating, timestamp], user: [user_id, age, gender, occupation]}",
                      "fmmrec_backbone_config={epochs: 1}"]

    cfg = dict(fmmrec_cfg, epochs=1)
    assert cli(["run", "--model", "FMMRec", "--dataset", "mm-tiny"] + overrides(cfg)) == 0
    out = capsys.readouterr().out
    assert "| gender | 2 | auc |" in out and "item-aggregated" in out
    table = tmp_path / "tune.md"
    assert cli(["tune", "--model", "FMMRec", "--dataset", "mm-tiny", "--space", "disc_reg_weight=choice([0.0, 0.1])",
                "-o", str(table)] + overrides(cfg)) == 0
    text = table.read_text()
    assert text.count("## disc_reg_weight:") == 2
    assert text.count("| gender | 2 | auc |") == 4  # each trial audited: user and item-aggregated vectors


EVALUATE = """
import json, sys
import recbole_mm
r = recbole_mm.evaluate_checkpoint(sys.argv[1])
print(json.dumps({k: float(v) for k, v in r["test_result"].items()}))
"""


def test_reload_in_a_new_process_without_the_stage_cache(fmmrec_cfg, tmp_path):
    import shutil

    result = recbole_mm.run_recbole(model="FMMRec", dataset="mm-tiny", config_dict=dict(fmmrec_cfg, fairness_eval=False))
    shutil.rmtree(fmmrec_cfg["fmmrec_cache_dir"])  # the checkpoint carries U' and I: no stage runs again
    env = dict(os.environ, RECBOLE_MM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", EVALUATE, result["checkpoint_file"]], cwd=str(tmp_path), env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == _plain(result["test_result"])
    assert not os.path.exists(fmmrec_cfg["fmmrec_cache_dir"])


def test_mmrec_folder_with_audio(tmp_path, tmp_path_factory):
    """A converted MMRec-format folder (FMMRec's own layout, with an audio feature file added), by one command."""
    from dataset_converters.cli import main as convert

    raw = tmp_path / "raw"
    import shutil

    shutil.copytree(os.path.join(ROOT, "tests", "fixtures", "converters", "mmrec"), raw)
    np.save(raw / "audio_feat.npy", np.random.default_rng(0).normal(size=(10, 6)).astype(np.float32))
    out = tmp_path / "data"
    assert convert(["mmrec", "--input", str(raw), "--output", str(out), "-q"]) == 0
    assert os.path.isfile(out / "toy" / "features" / "mmrec" / "audio.npy")
    cfg = {"data_path": str(out), "checkpoint_dir": str(tmp_path / "saved"), "modality": "text+image+audio",
           "text_feature_file": "features/mmrec/text.npy", "image_feature_file": "features/mmrec/image.npy",
           "audio_feature_file": "features/mmrec/audio.npy", "sensitive_fields": ["u_gender", "u_age"],
           "load_col": {"inter": ["user_id", "item_id", "rating", "timestamp"], "user": ["user_id", "u_gender", "u_age"]},
           "embedding_size": 8, "epochs": 2, "bmmf_epochs": 2, "knn_k_uugraph": 2, "fmmrec_backbone": "BPR",
           "fmmrec_backbone_config": {"epochs": 2}, "fairness_epochs": 3, "fmmrec_cache_dir": str(tmp_path / "cache"),
           "show_progress": False, "state": "WARNING", "train_batch_size": 8, "topk": [2, 5], "valid_metric": "Recall@5"}
    result = recbole_mm.run_recbole(model="FMMRec", dataset="toy", config_dict=cfg)  # the x_label split of the folder
    assert 0.0 <= result["test_result"]["recall@5"] <= 1.0
    assert sorted(os.path.basename(p).split("-")[1] for p in glob.glob(str(tmp_path / "cache" / "bmmf-*"))) == \
        ["audio", "image", "text"]
    # the audio graph bug reproduced on request: audio graphs then come from the text features
    fixed = build_run("FMMRec", "toy", dict(cfg, epochs=0))
    buggy = build_run("FMMRec", "toy", dict(cfg, epochs=0, audio_graph_from_text=True))
    for (config, _, train, valid, _, model, _) in (fixed[:7], buggy[:7]):
        model.before_fit(config, train, valid)
    assert not torch.equal(fixed[5].user_input, buggy[5].user_input)


KILLED = """
import json, sys
import recbole_mm
recbole_mm.run_recbole(model="FMMRec", dataset="mm-tiny", config_dict=json.loads(sys.argv[1]))
"""


def test_a_run_killed_during_stage_1_then_rerun(fmmrec_cfg, tmp_path):
    """SIGKILL while stage 1 trains (the backbone already cached): the rerun reuses the backbone, builds stage 1 and
    gives the results of a run never interrupted."""
    import signal
    import time

    cfg = dict(fmmrec_cfg, bmmf_epochs=30, fairness_eval=False)
    env = dict(os.environ, RECBOLE_MM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-c", KILLED, json.dumps(cfg)], cwd=str(tmp_path), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cache = cfg["fmmrec_cache_dir"]
    deadline = time.time() + 300
    while time.time() < deadline and not glob.glob(os.path.join(cache, "backbone-*.pth")):
        assert proc.poll() is None, "the run ended before stage 1"
        time.sleep(0.05)
    time.sleep(0.5)
    assert proc.poll() is None and not glob.glob(os.path.join(cache, "bmmf-*.pt")), "stage 1 already done: kill later"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stamp = os.stat(glob.glob(os.path.join(cache, "backbone-*.pth"))[0]).st_mtime_ns
    rerun = recbole_mm.run_recbole(model="FMMRec", dataset="mm-tiny", config_dict=cfg)
    assert os.stat(glob.glob(os.path.join(cache, "backbone-*.pth"))[0]).st_mtime_ns == stamp
    fresh = recbole_mm.run_recbole(model="FMMRec", dataset="mm-tiny",
                                   config_dict=dict(cfg, fmmrec_cache_dir=str(tmp_path / "fresh")))
    assert _plain(rerun["test_result"]) == _plain(fresh["test_result"])
    assert not glob.glob(os.path.join(cache, ".*"))  # the killed build's temporary file and lock were removed


def test_two_processes_building_the_same_stages_at_once(fmmrec_cfg, tmp_path):
    """Two runs sharing a cache start together: each stage is built once (the other waits and reuses it), both
    finish with the same results, nothing is left beside the stage files."""
    # each process its own cwd, so its own log/ and saved/ folders: RecBole's ensure_dir races when two processes
    # create the same folder at once (it checks, then makedirs without exist_ok)
    cfg = dict(fmmrec_cfg, bmmf_epochs=10, fairness_eval=False, checkpoint_dir="saved", state="INFO")
    env = dict(os.environ, RECBOLE_MM_THREADS="1", PYTHONPATH=ROOT)
    code = KILLED.replace("recbole_mm.run_recbole(", "r = recbole_mm.run_recbole(") + \
        "print(json.dumps({k: float(v) for k, v in r['test_result'].items()}))\n"
    cwds = [tmp_path / f"run{i}" for i in range(2)]
    for cwd in cwds:
        cwd.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", code, json.dumps(cfg)], cwd=str(cwd), env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for cwd in cwds]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2500:] for p, (_, err) in zip(procs, outs) if p.returncode]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert results[0] == results[1]
    cache = cfg["fmmrec_cache_dir"]
    assert len(glob.glob(os.path.join(cache, "backbone-*"))) == 1 and len(glob.glob(os.path.join(cache, "bmmf-*"))) == 2
    assert not glob.glob(os.path.join(cache, ".*"))
    logs = "".join(open(p).read() for cwd in cwds for p in glob.glob(str(cwd / "log" / "**" / "*.log"), recursive=True))
    assert logs.count("training the LightGCN backbone") == 1 and logs.count("reusing the trained LightGCN") == 1
    assert logs.count("stage 1 (text): training") == 1 and logs.count("stage 1 (text): reusing") == 1


def test_attackers_step_after_every_optimizer_step_in_fit(fmmrec_cfg):
    """MMTrainer calls after_optimizer_step once per training batch; the attackers move, the recommender's
    optimizer holds none of their parameters."""
    config, _, train, valid, _, model, trainer = build_run("FMMRec", "mm-tiny", dict(fmmrec_cfg, epochs=1,
                                                                                     fairness_eval=False))[:7]
    calls = []
    step = model.after_optimizer_step
    model.after_optimizer_step = lambda: (calls.append(1), step())
    trainer = type(trainer)(config, model)  # the optimizer hook binds the model's method when it is built
    before = [p.detach().clone() for p in model.user_attackers.parameters()]
    trainer.fit(train, valid, saved=False)
    assert len(calls) == len(train) > 0
    assert all(not torch.equal(b, p) for b, p in zip(before, model.user_attackers.parameters()))
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not in_optimizer & {id(p) for p in model.user_attackers.parameters()}


def test_recbole_own_entry_point_runs_the_stages(fmmrec_cfg):
    """RecBole's run_recbole (patched by the plugin) builds FMMRec and MMTrainer, so the stages run there too."""
    import recbole.quick_start

    result = recbole.quick_start.run_recbole(model="FMMRec", dataset="mm-tiny",
                                             config_dict=dict(fmmrec_cfg, fairness_eval=False))
    assert 0.0 <= result["test_result"]["recall@20"] <= 1.0
    assert glob.glob(os.path.join(fmmrec_cfg["fmmrec_cache_dir"], "bmmf-*.pt"))


def test_user_errors_found_by_a_new_user(fmmrec_cfg):
    """A bare field name is one field; a field the .user file lacks is named as such (not 'no user features')."""
    no_users = {k: v for k, v in fmmrec_cfg.items() if k != "load_col"}
    model = build_run("FMMRec", "mm-tiny", dict(no_users, sensitive_fields="gender"))[5]
    assert model.fields == ["gender"] and model.n_classes == {"gender": 2}
    with pytest.raises(ValueError, match=r"'income' is not a column of mm-tiny.user"):
        build_run("FMMRec", "mm-tiny", dict(no_users, sensitive_fields=["income"]))
