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
    assert parse_space(["learning_rate=choice([0.001, 0.01])", "dropout=uniform(0.1, 0.5)"]) == {
        "choice": {"learning_rate": [0.001, 0.01]}, "uniform": {"dropout": [0.1, 0.5]}}
    with pytest.raises(SystemExit):
        parse_space(["lr=normal(0,1)"])


def test_run_prints_results_and_where_files_went(tiny_root, tmp_path, capsys):
    out = tmp_path / "res.json"
    assert cli(["run", "--model", "SASRec", "--dataset", "mm-tiny", "-o", str(out), f"data_path={tiny_root}"] + TINY_ARGS) == 0
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


def test_overrides_and_options_mix(monkeypatch):
    import recbole_mm.cli as cli_module

    seen = {}
    monkeypatch.setattr(cli_module, "cmd_run", lambda args: seen.update(vars(args)) or 0)
    assert cli(["run", "epochs=1", "--model", "BPR", "learning_rate=0.1", "--embedding_size=8"]) == 0
    assert seen["model"] == "BPR"
    assert parse_overrides(seen["overrides"]) == {"epochs": 1, "learning_rate": 0.1, "embedding_size": 8}
