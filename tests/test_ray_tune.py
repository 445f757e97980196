"""``recbole-mm tune --tool ray`` (:mod:`recbole_mm.tuning`): trials in Ray worker processes.

The end-to-end test runs the command a user types (two trials of a plugin model side by side, in Ray's worker
processes, relative paths on the command line) and checks each trial against the same run done by the plain
in-process path (``recbole_mm.run_recbole``), and the table's best against what the trials themselves reported
in Ray's result files. The other tests cover the pieces without starting Ray: the search space against RecBole's
own HyperTuning parser, resource errors, paths, devices and the early stop.
"""

import glob
import json
import math
import os

import pytest

pytest.importorskip("ray")
pytest.importorskip("pyarrow")

from recbole_mm.cli import main as cli  # noqa: E402
from recbole_mm.tuning import (NoImprovementStopper, RayTrial, absolute_paths, best_trial,  # noqa: E402
                               device_overrides, params2str, parse_params_file, search_space)
from tests.conftest import TINY_SEQ  # noqa: E402


def _morec(tiny_bert):
    # NDCG@200: on 60 users with a random tiny encoder NDCG@10 is 0 for every setting, which decides nothing
    return dict(TINY_SEQ, text_encoder=tiny_bert, modality="text", mode="two_stage", dnn_layers=1,
                text_max_length=16, MAX_ITEM_LIST_LENGTH=10, learning_rate=0.01, topk=[200], valid_metric="NDCG@200")


def test_ray_grid_runs_each_trial_with_its_value_and_picks_the_best(tiny_root, tiny_bert, tmp_path, capsys):
    """Two MoRec (two-stage) trials, grid over embedding_size, through the CLI with relative paths; each trial's
    result equals an in-process run with its value; the table lists both and names the better valid score."""
    import recbole_mm

    out = tmp_path / "tune.md"
    rel_data = os.path.relpath(tiny_root, tmp_path)  # relative to the working directory: Ray moves trials elsewhere
    cfg = _morec(tiny_bert)
    args = ["tune", "--tool", "ray", "--cpus-per-trial", "1", "--model", "MoRec", "--dataset", "mm-tiny",
            "--data-path", rel_data, "--space", "embedding_size=choice([8, 16])", "--ray-dir", "rr", "-o", str(out)]
    args += [f"{k}={json.dumps(v)}" for k, v in cfg.items()] + ["checkpoint_dir=saved", "features_dir=features"]
    assert cli(args) == 0
    table = out.read_text()

    # what each trial reported to Ray, read from Ray's own files
    experiment = table.split("tool: ray (", 1)[1].split(")", 1)[0]
    assert experiment.startswith(str(tmp_path / "rr"))
    reported = {}
    for path in glob.glob(os.path.join(experiment, "*", "result.json")):
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        assert len(rows) == 1  # one report per trial, holding the metric the search optimises
        reported[rows[0]["config"]["embedding_size"]] = rows[0]
        assert os.path.isdir(os.path.join(os.path.dirname(path), "log"))  # the trial's RecBole log sits with it
    assert sorted(reported) == [8, 16]

    # each trial ran with its own value: the same numbers as the in-process path with that value
    for size, row in reported.items():
        result = json.loads(row["recbole_mm_result"])
        direct = recbole_mm.run_recbole(model="MoRec", dataset="mm-tiny", config_dict=dict(
            cfg, embedding_size=size, data_path=tiny_root, checkpoint_dir=str(tmp_path / "direct"),
            features_dir=str(tmp_path / "features")))
        assert result["efficiency"]["trainable_params"] == direct["efficiency"]["trainable_params"]
        assert row["best_valid_score"] == pytest.approx(float(direct["best_valid_score"]), abs=1e-9)
        for metric, value in direct["test_result"].items():
            assert result["test_result"][metric] == pytest.approx(float(value), abs=1e-9), metric
        # relative paths were made absolute against the command's working directory, one checkpoint folder each
        assert os.path.dirname(result["checkpoint_dir"]) == str(tmp_path / "saved")
    assert len({json.loads(r["recbole_mm_result"])["checkpoint_dir"] for r in reported.values()}) == 2
    assert glob.glob(str(tmp_path / "features" / "**" / "*.npy"), recursive=True)  # built once, where asked
    assert not glob.glob(os.path.join(experiment, "*", "features"))

    # the table lists both trials and the best is the higher valid score the trials reported
    assert reported[8]["best_valid_score"] != reported[16]["best_valid_score"]  # else "best" decides nothing
    assert table.count("## embedding_size:8\n") == 1 and table.count("## embedding_size:16\n") == 1
    assert table.count("| valid |") == 2 and table.count("| test |") == 2
    best_size = max(reported, key=lambda s: reported[s]["best_valid_score"])
    assert f"best: embedding_size:{best_size} (valid score {reported[best_size]['best_valid_score']:.4f})" in table
    assert "results written to" in capsys.readouterr().out


@pytest.mark.parametrize("flags, needle", [
    (["--tool", "ray", "--gpus-per-trial", "1"], "asks for GPUs but this machine has 0"),
    (["--tool", "ray", "--cpus-per-trial", "4096"], "more than the"),
    (["--tool", "ray", "--cpus-per-trial", "0"], "must be > 0"),
    (["--cpus-per-trial", "1"], "--cpus-per-trial applies to --tool ray only"),
    (["--tool", "ray", "--algo", "exhaustive", "--space", "dropout_prob=uniform(0.1, 0.5)"], "--algo random or bayes"),
])
def test_impossible_requests_are_one_line_errors(flags, needle, capsys):
    import torch

    if "--gpus-per-trial" in flags and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    space = [] if "--space" in flags else ["--space", "learning_rate=choice([0.01])"]
    assert cli(["tune", "--model", "SASRec"] + space + flags) == 1  # before Ray starts: nothing hangs
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


def test_search_space_matches_recbole_parser_and_algorithms(tmp_path):
    import numpy as np
    from hyperopt.pyll.stochastic import sample
    from ray import tune
    from recbole.trainer import HyperTuning

    params = tmp_path / "params.hyper"
    params.write_text("learning_rate loguniform -8,0\nembedding_size choice [16,32,64]\n"
                      "dropout_prob uniform 0.1,0.5\nn_layers quniform 1,3,1\nmlp choice [[64,32],[16]]\n")
    parsed = parse_params_file(str(params))
    # RecBole reads the file into the same hyperopt space as our dict
    from_file, from_dict = HyperTuning._build_space_from_file(str(params)), HyperTuning._build_space_from_dict(parsed)
    assert sorted(from_file) == sorted(from_dict) == ["dropout_prob", "embedding_size", "learning_rate", "mlp", "n_layers"]
    for name in from_file:  # the same distribution: the same draws from the same seeds
        for seed in range(5):
            assert sample(from_file[name], rng=np.random.RandomState(seed)) == sample(
                from_dict[name], rng=np.random.RandomState(seed)), name

    grid = search_space({"choice": {"embedding_size": [16, 32], "lr": [0.1, 0.01, 0.001]}}, "exhaustive")
    assert grid == {"embedding_size": tune.grid_search([16, 32]), "lr": tune.grid_search([0.1, 0.01, 0.001])}
    space = search_space(parsed, "random")
    from ray.tune.search.sample import Categorical

    assert isinstance(space["embedding_size"], Categorical)
    assert space["embedding_size"].categories == [16, 32, 64]
    # hyperopt's loguniform(lo, hi) is exp(uniform(lo, hi)): the same bounds in Ray's terms
    assert space["learning_rate"].lower == pytest.approx(math.exp(-8)) and space["learning_rate"].upper == 1.0
    samples = [space["learning_rate"].sample() for _ in range(200)]
    assert all(math.exp(-8) <= s <= 1.0 for s in samples)
    assert (space["n_layers"].lower, space["n_layers"].upper) == (1.0, 3.0)
    with pytest.raises(ValueError, match="exhaustive enumerates choice parameters only; dropout_prob"):
        search_space(parsed, "exhaustive")
    with pytest.raises(ValueError, match="algo must be one of"):
        search_space(parsed, "grid")
    bad = tmp_path / "bad.hyper"
    bad.write_text("learning_rate normal 0,1\n")
    with pytest.raises(ValueError, match="line 1: unknown kind 'normal'"):
        parse_params_file(str(bad))
    assert params2str({"learning_rate": 0.01, "n_layers": 2}) == HyperTuning.params2str({"learning_rate": 0.01,
                                                                                          "n_layers": 2})


def test_paths_become_absolute_and_devices_follow_ray(tmp_path, tiny_bert, monkeypatch):
    from recbole_mm.config import Config

    monkeypatch.chdir(tmp_path)
    os.makedirs("enc")
    cfg = {"data_path": "data", "checkpoint_dir": "ck", "features_dir": "feat", "text_encoder": "enc",
           "image_encoder": "tf_efficientnet_lite0", "dataset_cache_dir": "cache"}
    config = Config(model="MoRec", dataset="mm-tiny", config_dict=cfg)
    paths = absolute_paths(config, cfg, cwd=str(tmp_path))
    assert paths["data_path"] == str(tmp_path / "data") and paths["checkpoint_dir"] == str(tmp_path / "ck")
    assert paths["features_dir"] == str(tmp_path / "feat") and paths["text_encoder"] == str(tmp_path / "enc")
    assert paths["dataset_cache_dir"] == str(tmp_path / "cache")  # trials share one dataset cache
    assert "image_encoder" not in paths  # a timm name, not a path here
    # RecBole picks the device from gpu_id: none from Ray -> CPU; Ray's ids -> those GPUs
    assert device_overrides([]) == {"gpu_id": ""}
    assert device_overrides([2, 5]) == {"gpu_id": "2,5"}
    cpu = Config(model="SASRec", dataset="mm-tiny", config_dict=dict(cfg, **device_overrides([])))
    assert str(cpu["device"]) == "cpu"


def test_best_and_early_stop_follow_the_metric_direction():
    trials = [RayTrial({"a": i}, {"best_valid_score": s}, str(i)) for i, s in enumerate([0.2, 0.5, 0.5, 0.1])]
    trials.append(RayTrial({"a": 9}, None, "9", error="boom"))
    assert best_trial(trials, bigger=True).params == {"a": 1}  # the first of equals, as HyperTuning
    assert best_trial(trials, bigger=False).params == {"a": 3}
    stop = NoImprovementStopper(2, bigger=True)
    for i, s in enumerate([0.2, 0.5, 0.4]):
        stop(str(i), {"best_valid_score": s})
        assert not stop.stop_all()
    stop("2", {"best_valid_score": 0.4, "done": True})  # Ray's copy of a finished trial's last result
    assert not stop.stop_all()
    stop("3", {"best_valid_score": 0.5})  # equal is no improvement
    assert stop.stop_all()
    assert not NoImprovementStopper(0, bigger=True).stop_all()


@pytest.mark.parametrize("algo", ["random", "bayes"])
def test_ray_random_and_bayes_run_trials_drawn_from_the_space(algo, tiny_root, tiny_bert, tmp_path, capsys):
    """``--algo random`` (Ray's sampling) and ``--algo bayes`` (HyperOptSearch) with ``--max-evals 2`` through the CLI:
    two trials ran, each with values drawn from the declared space (a continuous learning rate and a choice), the
    table lists both, and its best is the trial with the better valid score the trials reported to Ray."""
    out = tmp_path / "tune.md"
    cfg = _morec(tiny_bert)
    cfg.pop("learning_rate")  # searched
    lo, hi = 0.001, 0.05
    args = ["tune", "--tool", "ray", "--algo", algo, "--max-evals", "2", "--cpus-per-trial", "1", "--model", "MoRec",
            "--dataset", "mm-tiny", "--data-path", tiny_root, "--space", f"learning_rate=uniform({lo}, {hi})",
            "--space", "embedding_size=choice([8, 16])", "--ray-dir", str(tmp_path / "rr"), "-o", str(out)]
    args += [f"{k}={json.dumps(v)}" for k, v in cfg.items()]
    args += [f"checkpoint_dir={tmp_path / 'saved'}", f"features_dir={tmp_path / 'features'}"]
    assert cli(args) == 0
    table = out.read_text()
    assert f"algo: {algo}; trials: 2" in table

    experiment = table.split("tool: ray (", 1)[1].split(")", 1)[0]
    # the search algorithm Ray ran: HyperOptSearch keeps a searcher state, random sampling the basic variant one's
    searcher = glob.glob(os.path.join(experiment, "searcher-state-*.pkl"))
    assert bool(searcher) == (algo == "bayes"), os.listdir(experiment)
    reported, widths = [], {}
    for path in glob.glob(os.path.join(experiment, "*", "result.json")):
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        assert len(rows) == 1
        reported.append(rows[0])
    assert len(reported) == 2  # two trials ran (and reported)
    for row in reported:
        lr, size = row["config"]["learning_rate"], row["config"]["embedding_size"]
        assert lo <= lr <= hi and size in (8, 16), row["config"]  # drawn from the declared space
        result = json.loads(row["recbole_mm_result"])
        assert row["best_valid_score"] == pytest.approx(float(result["best_valid_score"]))
        widths.setdefault(size, set()).add(result["efficiency"]["trainable_params"])
        # the table lists the trial under its values (HyperTuning's params string)
        assert table.count(f"## {params2str({'learning_rate': lr, 'embedding_size': size})}\n") == 1, (lr, size)
    assert reported[0]["config"]["learning_rate"] != reported[1]["config"]["learning_rate"]  # two draws, not one
    # each trial ran with its own embedding_size: one parameter count per width, another for the other width
    assert all(len(counts) == 1 for counts in widths.values()) and len(set.union(*widths.values())) == len(widths)
    assert table.count("| valid |") == 2 and table.count("| test |") == 2
    best = max(reported, key=lambda r: r["best_valid_score"])  # NDCG: bigger is better
    other = min(reported, key=lambda r: r["best_valid_score"])
    assert best["best_valid_score"] != other["best_valid_score"]  # else "best" decides nothing
    params = params2str({"learning_rate": best["config"]["learning_rate"],
                         "embedding_size": best["config"]["embedding_size"]})
    assert f"best: {params} (valid score {best['best_valid_score']:.4f})" in table
    assert "results written to" in capsys.readouterr().out
