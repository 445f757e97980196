"""The recbole-mm command line."""

import os
import subprocess
import sys

import pytest

from recbole_mm.cli import main as cli, parse_overrides, parse_space
from tests.conftest import TINY_SEQ

TINY_ARGS = [f"{k}={v}" for k, v in TINY_SEQ.items()]


def test_parse_overrides_and_space():
    from recbole_mm.cli import build_parser

    assert parse_overrides(["epochs=3", "text_fields=[title, genres]", "eval_args={mode: full}", "x=abc"]) == {
        "epochs": 3, "text_fields": ["title", "genres"], "eval_args": {"mode": "full"}, "x": "abc"}
    assert parse_overrides(["a=None", "b=~", "c=null", "d=", "e=none"]) == {
        "a": None, "b": None, "c": None, "d": None, "e": "none"}  # None as in RecBole's own command line
    assert parse_space(["learning_rate=choice([0.001, 0.01])", "dropout=uniform(0.1, 0.5)"]) == {
        "choice": {"learning_rate": [0.001, 0.01]}, "uniform": {"dropout": [0.1, 0.5]}}
    with pytest.raises(SystemExit):
        parse_space(["lr=normal(0,1)"])


def test_run_prints_results_and_where_files_went(tiny_root, tmp_path, capsys):
    out = tmp_path / "res.json"
    assert cli(["run", "--model", "SASRec", "--dataset", "mm-tiny", "-o", str(out), "--data-path", tiny_root] + TINY_ARGS) == 0
    text = capsys.readouterr().out
    assert "| split |" in text and "| valid |" in text and "| test |" in text and "ndcg@10" in text
    for label in ("log:", "checkpoint:", "tensorboard:"):
        line = next(l for l in text.splitlines() if l.startswith(label))
        assert os.path.exists(line.split(":", 1)[1].strip()), line
    assert out.exists()


def test_tune_two_trials_on_ml100k_mm(ml100k_mm, tmp_path, capsys):
    out = tmp_path / "tune.md"
    args = ["tune", "--model", "SASRec", "--space", "learning_rate=choice([0.01, 0.001])", "-o", str(out)] + TINY_ARGS + [
        "train_batch_size=2048", f"checkpoint_dir={tmp_path / 'saved'}"]
    assert cli(args) == 0
    table = out.read_text()
    assert table.count("## learning_rate:") == 2 and "best: learning_rate:" in table
    assert "| valid |" in table and "| test |" in table


def test_models_and_info(tiny_root, capsys):
    assert cli(["models", "--source", "recbole", "SAS*"]) == 0
    assert "SASRec" in capsys.readouterr().out
    assert cli(["info", "--dataset", "mm-tiny", "--data-path", tiny_root]) == 0
    text = capsys.readouterr().out
    assert "60 users" in text and "images" in text and "features" in text


@pytest.mark.parametrize("sub", ["run", "tune", "extract", "models", "info", "convert"])
def test_help_everywhere(sub):
    proc = subprocess.run([sys.executable, "-m", "recbole_mm.cli", sub, "--help"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-1000:]
    assert "usage:" in proc.stdout
    if sub in ("run", "tune", "extract", "info"):
        assert "--data-path" in proc.stdout and "--debug" in proc.stdout


HEAVY = ("torch", "recbole", "ray", "numpy", "transformers", "timm")


def test_import_and_cli_import_nothing_heavy():
    """``import recbole_mm`` (and the CLI module) must not import torch / recbole / ray: --help stays fast."""
    code = ("import sys, recbole_mm, recbole_mm.cli; recbole_mm.register_model; recbole_mm.list_models; "
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"]])
def test_help_is_fast(argv):
    """Median of 3 wall times of the console command. torch alone takes ~1.4 s to import on the project's 2-core
    machine (recbole and ray add more: the help took 3.7-20 s before); the help answers in 0.07 s on a quiet
    machine, 0.4 s on a busy one."""
    import time

    exe = os.path.join(os.path.dirname(sys.executable), "recbole-mm")
    cmd = [exe] if os.path.isfile(exe) else [sys.executable, "-m", "recbole_mm.cli"]
    times = []
    for _ in range(3):
        start = time.perf_counter()
        proc = subprocess.run(cmd + argv, capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr[-1000:]
    assert sorted(times)[1] < 1.5, times


def test_run_error_is_one_line_and_debug_shows_the_traceback(capsys):
    from recbole_mm.registry import UnknownModelError

    assert cli(["run", "--model", "MoRc"] + TINY_ARGS) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("recbole-mm run: error: unknown model 'MoRc' (did you mean 'MoRec'?)")
    assert err[0].endswith("(--debug shows the traceback)")
    with pytest.raises(UnknownModelError):
        cli(["run", "--debug", "--model", "MoRc"] + TINY_ARGS)
    with pytest.raises(UnknownModelError):
        cli(["--debug", "run", "--model", "MoRc"] + TINY_ARGS)


@pytest.mark.parametrize("argv, needle", [
    (["run", "-c", "no-such.yaml"], "config file 'no-such.yaml' (--config-files) does not exist"),
    (["run", "--data-path", "no-such-dir"], "--data-path 'no-such-dir' is not a folder"),
    (["info", "--data-path", "no-such-dir"], "--data-path 'no-such-dir' is not a folder"),
    (["run", "--dataset", "no-such-dataset", "epochs=1"], "no-such-dataset"),
])
def test_bad_paths_are_one_line_errors(argv, needle, capsys):
    assert cli(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"recbole-mm {argv[0]}: error: ") and needle in err[0], err


def test_broken_config_file_names_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: 1\nlearning_rate: [0.1\n")
    assert cli(["run", "-c", str(bad)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"config file '{bad}' is not valid YAML at line" in err[0], err
    listing = tmp_path / "list.yaml"
    listing.write_text("- epochs\n")
    assert cli(["run", "-c", str(listing)]) == 1
    assert "must hold 'key: value' lines" in capsys.readouterr().err


def test_cli_subprocess_error_exit_code_and_single_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "recbole_mm.cli", "run", "-c", str(tmp_path / "x.yaml")],
                          capture_output=True, text=True, cwd=str(tmp_path))
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"recbole-mm run: error: config file '{tmp_path / 'x.yaml'}' (--config-files) does not exist "
        f"(--debug shows the traceback)"]


def test_empty_text_fields_on_the_command_line_is_one_line(tiny_root, capsys):
    """``text_fields=[]``: the data layer refuses it (ValueError); the CLI prints that as one line, exit 1."""
    rc = cli(["run", "--model", "MoRec", "--dataset", "mm-tiny", "--data-path", tiny_root, "text_fields=[]",
              "modality=text"] + TINY_ARGS)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1, err
    lines = [line for line in err if line.startswith("recbole-mm run: error:")]
    assert len(lines) == 1 and "text_fields" in lines[0], err
    assert not any("Traceback" in line for line in err), err


def test_unknown_key_on_the_command_line_warns(monkeypatch, capsys):
    import recbole_mm.config as config_module
    import recbole_mm.quick_start as qs

    monkeypatch.setattr(config_module, "_WARNED", set())
    monkeypatch.setattr(config_module, "UNKNOWN_KEY_MESSAGES", [])
    seen = {}
    monkeypatch.setattr(qs, "run_recbole", lambda **kw: seen.update(kw) or {"model": "MoRec"})
    assert cli(["run", "--model", "MoRec", "modalty=image", "epochs=1"]) == 0
    err = capsys.readouterr().err
    assert ("recbole-mm: warning: unknown config key 'modalty' (did you mean 'modality'?) in the command line"
            in err), err
    # repeated after the result table, where a user looks (the first one scrolled away with the training log)
    assert err.rstrip().splitlines()[-1].startswith("recbole-mm: warning (repeated): unknown config key 'modalty'")
    assert seen["config_dict"] == {"modalty": "image", "epochs": 1}


def test_data_path_option_reaches_the_config(monkeypatch, tiny_root):
    import recbole_mm.quick_start as qs

    seen = {}
    monkeypatch.setattr(qs, "run_recbole", lambda **kw: seen.update(kw) or {"model": "SASRec"})
    assert cli(["run", "--model", "SASRec", "--dataset", "mm-tiny", "--data-path", tiny_root, "epochs=1"]) == 0
    assert seen["config_dict"] == {"epochs": 1, "data_path": tiny_root}


def test_overrides_and_options_mix(monkeypatch):
    import recbole_mm.cli as cli_module

    seen = {}
    monkeypatch.setattr(cli_module, "cmd_run", lambda args: seen.update(vars(args)) or 0)
    assert cli(["run", "epochs=1", "--model", "BPR", "learning_rate=0.1", "--embedding_size=8"]) == 0
    assert seen["model"] == "BPR"
    assert parse_overrides(seen["overrides"]) == {"epochs": 1, "learning_rate": 0.1, "embedding_size": 8}


def test_demo_prepares_content_with_progress_bars(tiny_root, tiny_bert, tiny_vit, tmp_path, capfd):
    """make demo: image store build and both extractions show a bar, although training runs without bars."""
    from recbole_mm.demo import DEMO_CONFIG, prepare

    cfg = dict(DEMO_CONFIG, data_path=tiny_root, text_encoder=tiny_bert, image_encoder=tiny_vit, image_size=32,
               features_dir=str(tmp_path / "features"), image_store_dir=str(tmp_path / "store"))
    assert cfg["show_progress"] is False
    paths = prepare(cfg, dataset="mm-tiny")
    assert len(paths) == 2 and all(os.path.isfile(p) for p in paths)
    err = capfd.readouterr().err
    for bar in ("image store 32px", "extract text", "extract image"):
        lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith(bar)]
        assert any("100%" in line for line in lines), (bar, err[-2000:])  # a tqdm bar that reached the end


def test_info_verify_shows_a_bar_per_feature_file(tiny_root, tmp_path, capfd):
    import shutil

    import numpy as np

    from recbole_mm.data import features as ff

    shutil.copytree(os.path.join(tiny_root, "mm-tiny"), tmp_path / "mm-tiny")
    for name in ("a", "b"):
        ff.write_features(str(tmp_path / "mm-tiny" / "features" / "enc" / f"{name}.npy"), np.zeros((2, 4), "float32"),
                          ["1", "2"], modality="text", kind="pooled", encoder="enc")
    capfd.readouterr()
    assert cli(["info", "--dataset", "mm-tiny", "--data-path", str(tmp_path), "--verify"]) == 0
    out, err = capfd.readouterr()
    assert "checksum ok" in out and "verify feature files" not in out
    assert "verify feature files: 100%" in err.replace("\r", "\n"), err[-1000:]


def test_evaluate_a_checkpoint_again(tiny_config, tmp_path, capsys):
    """`recbole-mm evaluate CHECKPOINT` gives the run's own test results (cold / new groups included), and the
    valid split on request; a missing file is one clear line."""
    import json

    import recbole_mm

    result = recbole_mm.run_recbole(model="SASRec", dataset="mm-tiny", config_dict=dict(tiny_config, new_item_ratio=0.1))
    out = tmp_path / "again.json"
    assert cli(["evaluate", result["checkpoint_file"], "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    again = json.loads(out.read_text())
    assert again["test_result"] == pytest.approx(dict(result["test_result"]))
    for key in ("cold_test_result", "new_test_result", "test_rows"):
        assert again[key] == (pytest.approx(result[key]) if isinstance(result[key], dict) else result[key]), key
    assert "| test, cold items" in printed and "| test, new items" in printed
    assert cli(["evaluate", result["checkpoint_file"], "--split", "valid", "-o", str(out)]) == 0
    valid = json.loads(out.read_text())
    assert valid["best_valid_result"] == pytest.approx(dict(result["best_valid_result"]))
    assert cli(["evaluate", str(tmp_path / "nope.pth")]) == 1
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("tool", ["hyperopt", "ray"])
def test_tune_refuses_a_searched_key_nobody_reads(tool, tiny_root, tmp_path, capsys):
    """A typo in the search space would make every trial the same run: an error naming the key before any trial."""
    out = tmp_path / "tune.md"
    rc = cli(["tune", "--tool", tool, "--model", "SASRec", "--dataset", "mm-tiny", "--data-path", tiny_root,
              "--space", "learning_rat=choice([0.01, 0.001])", "-o", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and "'learning_rat'" in err and "did you mean 'learning_rate'" in err and "no trial" in err
    assert not out.exists()


def test_convert_usage_names_the_command_the_user_typed(capsys):
    with pytest.raises(SystemExit):
        cli(["convert", "microlens", "--help"])
    assert capsys.readouterr().out.startswith("usage: recbole-mm convert microlens ")
    with pytest.raises(SystemExit):
        cli(["convert", "microlens"])  # --input missing
    assert "recbole-mm convert microlens: error: the following arguments are required: --input" in \
        capsys.readouterr().err
