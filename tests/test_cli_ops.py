"""What new users of the command line ran into: ``evaluate --nproc``, where a tuning trial's checkpoint is, third-party
warning noise, and a copied embedded dataset without its yaml."""

import glob
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

import recbole_mm
from recbole_mm.cli import main as cli
from recbole_mm.paths import properties_dir
from tests._procs import two_nodes_on_this_machine
from tests.conftest import TINY_SEQ

REPO = os.path.dirname(os.path.dirname(os.path.abspath(recbole_mm.__file__)))
TINY_ARGS = [f"{k}={v}" for k, v in TINY_SEQ.items()]
PACKAGE_YAML = os.path.join(properties_dir(), "dataset", "ml-100k-mm.yaml")  # ml-100k-mm's keys
TOL = 1e-6  # tests/test_distributed.py's tolerance for 1- against 2-process evaluation (12 decimals kept)


def _ok(code: int) -> None:
    assert code == 0


def _close(a: dict, b: dict, tol: float = TOL) -> None:
    assert set(a) == set(b)
    for key in a:
        assert abs(float(a[key]) - float(b[key])) <= tol, (key, a[key], b[key])


# ----------------------------------------------------------------------------------- 1. evaluate --nproc
def test_evaluate_nproc2_gives_the_one_process_metrics(tiny_root, tmp_path):
    """A checkpoint of a 1-process run, evaluated by ``recbole-mm evaluate`` in one and in two (gloo, CPU)
    processes: the same metrics (every row once over the ranks; cold / new item groups and a non-additive metric
    included). The valid split and other models: tests/test_distributed.py (through the Python API)."""
    cfg = dict(TINY_SEQ, data_path=tiny_root, checkpoint_dir=str(tmp_path / "saved"), learning_rate=0.01,
               metric_decimal_place=12, topk=[5, 10], metrics=["Recall", "MRR", "NDCG", "Hit", "ShannonEntropy", "ItemCoverage", "AveragePopularity"],
               valid_metric="ndcg@10")
    run = recbole_mm.run_recbole(model="SASRec", dataset="mm-tiny", config_dict=cfg)
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    assert cli(["evaluate", run["checkpoint_file"], "-o", str(one)]) == 0
    assert cli(["evaluate", run["checkpoint_file"], "--nproc", "2", "-o", str(two)]) == 0
    one, two = json.loads(one.read_text()), json.loads(two.read_text())
    assert one["test_rows"] == two["test_rows"] == 60  # every user's row once, not once per rank
    _close(one["test_result"], two["test_result"])
    _close(one["test_result"], run["test_result"])
    assert one["test_result"]["hit@10"] > 0 and one["test_result"]["shannonentropy@10"] > 0  # not all-zero
    assert one["test_result"]["itemcoverage@10"] > 0  # the union of every rank's top-k lists, not one rank's
    for group in ("cold", "new"):
        assert one[f"{group}_test_result"] is not None
        _close(one[f"{group}_test_result"], two[f"{group}_test_result"])

    # the multi-node recipe, two "nodes" of one process on this machine: node 0 reports, node 1 says it is done
    nodes = tmp_path / "nodes.json"
    out = two_nodes_on_this_machine(["evaluate", run["checkpoint_file"]],
                                    lambda args: _ok(cli([*args, "-o", str(nodes)])), str(tmp_path))
    assert "node 1: done (the results are on node 0)" in out
    nodes = json.loads(nodes.read_text())
    assert nodes["test_rows"] == 60
    _close(one["test_result"], nodes["test_result"])


def test_evaluate_bad_distributed_values_are_one_line(tmp_path, capsys):
    ckpt = tmp_path / "x.pth"
    ckpt.write_bytes(b"")
    assert cli(["evaluate", str(ckpt), "--nproc", "0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--nproc (0) and --nnodes (1) must be >= 1" in err[0], err
    assert cli(["evaluate", str(ckpt), "--nnodes", "2"]) == 1  # several nodes need node 0's address
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--master-addr" in err[0], err


# ----------------------------------------------------------------------------------- 2. tuning checkpoints
def _trial_lines(table: str) -> list:
    return [line for line in table.splitlines() if line.startswith(("trial folder:", "checkpoint:"))]


def _best_checkpoint(table: str) -> str:
    found = re.findall(r"^best trial checkpoint: (.+)$", table, re.M)
    assert len(found) == 1, table
    return found[0]


def test_ray_tune_names_each_trial_checkpoint_and_the_best_evaluates(tiny_root, tmp_path, capsys):
    """Two Ray trials on the CPU: the table names each trial's folder and checkpoint, and the best trial's
    checkpoint; ``recbole-mm evaluate`` on it gives that trial's own test figures (Ray's result.json)."""
    pytest.importorskip("ray")
    pytest.importorskip("pyarrow")
    out = tmp_path / "tune.md"
    args = ["tune", "--tool", "ray", "--cpus-per-trial", "1", "--model", "SASRec", "--dataset", "mm-tiny",
            "--data-path", tiny_root, "--space", "learning_rate=choice([0.01, 0.0001])", "--ray-dir", "rr",
            "-o", str(out)] + TINY_ARGS + ["checkpoint_dir=saved", "learning_rate=0.01", "metric_decimal_place=12"]
    assert cli(args) == 0
    table = out.read_text()
    printed = capsys.readouterr().out

    lines = _trial_lines(table)
    assert len(lines) == 2, table
    checkpoints = []
    for line in lines:
        m = re.fullmatch(r"trial folder: (.+); checkpoint: (.+)", line)
        assert m, line
        folder, checkpoint = m.groups()
        assert os.path.isfile(os.path.join(folder, "result.json")), folder  # Ray's trial folder
        assert os.path.isfile(checkpoint) and checkpoint.startswith(str(tmp_path / "saved")), checkpoint
        checkpoints.append(checkpoint)
    assert len(set(checkpoints)) == 2  # one model per trial

    best = _best_checkpoint(table)
    assert f"best trial checkpoint: {best}" in printed and best in checkpoints
    reported = {}
    for path in glob.glob(str(tmp_path / "rr" / "*" / "*" / "result.json")):
        with open(path, encoding="utf-8") as f:
            result = json.loads(json.loads(f.readline())["recbole_mm_result"])
        reported[result["checkpoint_file"]] = result
    assert sorted(reported) == sorted(checkpoints)
    scores = {c: r["best_valid_score"] for c, r in reported.items()}
    assert best == max(scores, key=scores.get) and len(set(scores.values())) == 2  # the better valid score

    again = tmp_path / "again.json"
    assert cli(["evaluate", best, "-o", str(again)]) == 0
    _close(json.loads(again.read_text())["test_result"], reported[best]["test_result"], tol=1e-9)


def test_hyperopt_tune_names_each_trial_checkpoint_and_the_best_evaluates(tiny_root, tmp_path, capsys):
    out = tmp_path / "tune.md"
    args = ["tune", "--model", "SASRec", "--dataset", "mm-tiny", "--data-path", tiny_root,
            "--space", "learning_rate=choice([0.01, 0.0001])", "-o", str(out)] + TINY_ARGS + [
            f"checkpoint_dir={tmp_path / 'saved'}"]
    assert cli(args) == 0
    table = out.read_text()
    lines = _trial_lines(table)
    assert len(lines) == 2 and all(line.startswith("checkpoint: ") for line in lines), table
    checkpoints = [line.split(": ", 1)[1] for line in lines]
    # a folder per trial: RecBole names checkpoints by the second, and these trials take less than one
    folders = {os.path.dirname(c) for c in checkpoints}
    assert len(folders) == 2 and {os.path.basename(f) for f in folders} == {"trial-1", "trial-2"}, checkpoints
    assert all(c.startswith(str(tmp_path / "saved" / "tune-SASRec-mm-tiny-")) for c in checkpoints), checkpoints
    best = _best_checkpoint(table)
    assert best in checkpoints and os.path.isfile(best)
    capsys.readouterr()
    assert cli(["evaluate", best]) == 0
    assert "| test |" in capsys.readouterr().out


# ----------------------------------------------------------------------------------- 3. warnings
def test_known_third_party_warnings_are_hidden_and_ours_are_not(tiny_root, tmp_path):
    """A plain run in a new process (as a user starts it): no pandas FutureWarning from RecBole's dataset, no
    pkg_resources deprecation; the package's own warning (an unknown key) still shows."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "recbole_mm.cli", "run", "--model", "SASRec", "--dataset", "mm-tiny",
                           "--data-path", tiny_root, "modalty=image", *TINY_ARGS, f"checkpoint_dir={tmp_path / 's'}"],
                          cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for noise in ("FutureWarning", "chained assignment", "pkg_resources"):
        assert noise not in proc.stderr, proc.stderr[-3000:]
    assert "recbole-mm: warning: unknown config key 'modalty' (did you mean 'modality'?)" in proc.stderr


CHILD_WARNINGS = """
import warnings
import recbole_mm  # its compat filters, as any process importing the package (--nproc's, Ray's workers) has them
text = "A value is trying to be set on a copy of a DataFrame or Series through chained assignment using an inplace"
for line, (module, message, category) in enumerate((
    ("recbole.data.dataset.dataset", text, FutureWarning),  # hidden
    ("ray._private.parameter", "pkg_resources is deprecated as an API. See ...", UserWarning),  # hidden
    ("recbole_mm.data.dataset", text, FutureWarning),  # the same text from our own module: shown
    ("recbole.data.dataset.dataset", "something else", FutureWarning),  # another of RecBole's: shown
    ("recbole.data.dataset.dataset", text, UserWarning),  # another category: shown
)):
    warnings.warn_explicit(message, category, "f.py", line + 1, module=module)
"""


def test_the_filters_match_module_message_and_category_only():
    """In a new interpreter that imports the package (Python's default filters, as a user's process or a worker
    has): the pandas warning from RecBole's dataset module and the pkg_resources notice are hidden; the same text
    from another module or category, and other warnings of RecBole, show."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env.update(PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-W", "default", "-c", CHILD_WARNINGS], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shown = [line for line in proc.stderr.splitlines() if line.startswith("f.py:")]
    assert [line.split(":")[1] for line in shown] == ["3", "4", "5"], proc.stderr[-3000:]
    assert "pkg_resources" not in proc.stderr


# ----------------------------------------------------------------------------------- 4. a copied dataset
def _copy_without_yaml(src: str, root, name: str) -> str:
    folder = os.path.join(root, name)
    shutil.copytree(src, folder, ignore=shutil.ignore_patterns("image_store*", "features", "*.yaml"))
    for suffix in ("inter", "item", "user"):
        os.rename(os.path.join(folder, f"ml-100k-mm.{suffix}"), os.path.join(folder, f"{name}.{suffix}"))
    return folder


def test_copied_embedded_dataset_without_its_yaml_says_what_to_copy(ml100k_mm, tmp_path, capsys):
    """The whole ml-100k-mm folder copied and renamed (RecBole alone: "[timestamp] is not exist in
    interaction"): the error names the copy, the missing yaml and the command that fixes it."""
    folder = _copy_without_yaml(ml100k_mm, tmp_path / "data", "my-movies")
    assert cli(["run", "--model", "SASRec", "--dataset", "my-movies", "--data-path", str(tmp_path / "data")]
               + TINY_ARGS) == 1
    # only the error line: RecBole's console handler, set up by an earlier test of this process, may log around it
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("recbole-mm run: error:")]
    assert len(err) == 1, err
    assert err[0].startswith(f"recbole-mm run: error: dataset folder {folder} is a copy of the embedded dataset "
                             "'ml-100k-mm' named 'my-movies', and it has no my-movies.yaml"), err
    assert "load_col" in err[0] and "text_fields" in err[0]
    assert f"cp {PACKAGE_YAML} {os.path.join(folder, 'my-movies.yaml')}" in err[0]


def test_copied_embedded_files_run_once_the_yaml_is_copied(ml100k_mm, tmp_path, capsys):
    """The atomic files alone (no provenance.json: the builder's header lines tell them), a subset of users: the same
    message; doing what it says makes the run work."""
    from recbole_mm.testing import make_subset_dataset

    root = tmp_path / "data"
    folder = make_subset_dataset(ml100k_mm, "ml-100k-mm", str(root), "movies60", n_users=60)
    assert not os.path.exists(os.path.join(folder, "provenance.json"))
    args = ["run", "--model", "SASRec", "--dataset", "movies60", "--data-path", str(root)] + TINY_ARGS + [
        f"checkpoint_dir={tmp_path / 'saved'}"]
    assert cli(args) == 1
    err = capsys.readouterr().err
    assert "is a copy of the embedded dataset 'ml-100k-mm' named 'movies60', and it has no movies60.yaml" in err
    shutil.copy(PACKAGE_YAML, os.path.join(folder, "movies60.yaml"))
    assert cli(args) == 0
    captured = capsys.readouterr()
    assert "| test |" in captured.out and "copy of the embedded dataset" not in captured.err
