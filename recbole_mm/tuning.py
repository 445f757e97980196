"""Hyper-parameter search with Ray Tune: :func:`ray_tune` (``recbole-mm tune --tool ray``).

The same inputs as RecBole's ``HyperTuning`` (``recbole-mm tune``'s default tool): a params file (``name choice
[..]`` / ``name uniform lo,hi`` / ``name quniform lo,hi,q`` / ``name loguniform lo,hi`` lines) or a params dict
(``{"choice": {name: [...]}, "uniform": {name: [lo, hi]}, ...}``), and ``algo``:

- ``exhaustive``: every combination once (``tune.grid_search``; choice parameters only, as in RecBole);
- ``random``: ``max_evals`` samples (``tune.choice`` / ``tune.uniform`` / ...);
- ``bayes``: ``max_evals`` trials proposed by TPE (``ray.tune.search.hyperopt.HyperOptSearch``).

``loguniform(lo, hi)`` keeps hyperopt's meaning (RecBole's): the *logarithms* of the bounds, the value is
``exp(uniform(lo, hi))``; it becomes ``tune.loguniform(exp(lo), exp(hi))``, the same distribution.

Each trial runs :func:`recbole_mm.quick_start.objective_function` in a Ray worker (plugin models and RecBole's stock
models by name: the worker imports ``recbole_mm``, which installs the registry and RecBole's patches; a model
class of your own is passed to the trials as the class, so its module must be importable in the workers:
installed, or on their ``PYTHONPATH``) and reports one result: ``best_valid_score`` (what the search optimises,
in the direction ``valid_metric`` asks for), the valid and test metrics, and the whole result dict (cold / new
items, efficiency, fairness audit) as JSON. What RecBole's own Ray path (``run_hyper.py --tool Ray``) gets wrong
is handled here:

- resources: ``cpus_per_trial`` / ``gpus_per_trial`` (RecBole hard-codes one GPU per trial, which never
  schedules on a CPU machine); a request the cluster cannot meet is an error before any trial starts, instead of
  trials pending forever. A trial without GPUs runs on the CPU (``gpu_id`` empty), one with GPUs on the ones Ray
  gave it (``gpu_id`` = Ray's ids; RecBole would otherwise point every trial at GPU 0). Torch uses
  ``cpus_per_trial`` threads in a trial unless ``RECBOLE_MM_THREADS`` says otherwise;
- the numpy 2 aliases reach every worker (:func:`recbole_mm.compat.ray_init_kwargs`);
- Ray runs each trial in its own folder (its RecBole ``log/`` and ``log_tensorboard/`` go there): paths of the
  configuration that are relative to the working directory (``data_path``, ``checkpoint_dir``, ``features_dir``,
  config files, ...) are made absolute first; each trial saves its best model under
  ``<checkpoint_dir>/<trial id>/`` (RecBole names checkpoints by the second they were created: two trials
  starting together in one folder would overwrite each other's): ``RayTrial.checkpoint``,
  ``RayTuneResult.best_checkpoint``, and lines of the ``recbole-mm tune`` table;
- Ray's ``argv`` (``--node-ip-address=...``) is hidden from RecBole's Config, which would read it as config keys;
- no dashboard, no usage statistics (nothing leaves the machine); Ray's session files stay in Ray's default
  ``/tmp/ray`` (``RAY_TMPDIR`` moves them), the trial folders go to ``ray_dir`` (default ``./ray_results``);
- ``early_stop``: the search stops after that many finished trials without a better valid score (RecBole's
  ``HyperTuning`` rule); trials still running then are ended and left out of the results.

A local Ray instance is started with the machine's CPUs (and shut down afterwards); ``address`` joins a running
cluster instead (``ray start --head`` on one machine, ``ray start --address=<head>:6379`` on the others, then
``address="auto"`` on the head). Every machine needs ``recbole_mm`` installed and the same data paths.
"""

from __future__ import annotations

import ast
import contextlib
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

from recbole_mm.utils import jsonable

ALGOS = ("exhaustive", "random", "bayes")
KINDS = ("choice", "uniform", "quniform", "loguniform")
METRIC = "best_valid_score"
RESULT_JSON = "recbole_mm_result"

# Config keys that name a file or folder relative to the working directory: made absolute before trials start.
CWD_PATH_KEYS = ("checkpoint_dir", "dataset_save_path", "dataloaders_save_path", "features_dir", "image_store_dir",
                 "image_weights", "pretrained_path", "fmmrec_cache_dir", "dataset_cache_dir")
# Keys that are either a local path or a name (hub id, timm architecture): absolute only when the path exists.
PATH_OR_NAME_KEYS = ("text_encoder", "image_encoder", "audio_feature_file")
QUIET_PKG_RESOURCES = "ignore:pkg_resources is deprecated as an API:UserWarning"
# Environment variables the package (and the offline encoders) read: passed on to Ray's workers.
FORWARDED_ENV = ("RECBOLE_MM_HOME", "RECBOLE_MM_THREADS", "XDG_CACHE_HOME", "HF_HOME", "HF_HUB_OFFLINE",
                 "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM")


# ------------------------------------------------------------------------------------------------ search space
def parse_params_file(path: str) -> dict:
    """A RecBole params file (``HyperTuning``'s format: ``name kind value`` per line) as a params dict."""
    space: dict = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.strip().split(" ")
            if len(parts) < 3 or line.lstrip().startswith("#"):
                continue  # RecBole skips such lines too
            name, kind, value = parts[0], parts[1], "".join(parts[2:])
            if kind not in KINDS:
                raise ValueError(f"params file {path!r} line {lineno}: unknown kind {kind!r}; use one of "
                                 f"{', '.join(KINDS)} (e.g. 'learning_rate choice [0.01,0.001]')")
            try:
                parsed = ast.literal_eval(value) if kind == "choice" else [float(x) for x in value.split(",")]
            except (ValueError, SyntaxError) as e:
                raise ValueError(f"params file {path!r} line {lineno}: cannot read {value!r} for {kind} "
                                 f"({e}); choice takes a list ([a,b]), the others lo,hi (quniform lo,hi,q)") from e
            space.setdefault(kind, {})[name] = parsed
    if not space:
        raise ValueError(f"params file {path!r} defines no parameter (lines 'name choice [a,b]' / "
                         "'name uniform lo,hi')")
    return space


def _check_params_dict(params_dict: dict) -> dict:
    if not isinstance(params_dict, dict) or not params_dict:
        raise ValueError("the search space is empty: give a params file or a params dict such as "
                         "{'choice': {'learning_rate': [0.01, 0.001]}}")
    arity = {"uniform": 2, "loguniform": 2, "quniform": 3}
    for kind, params in params_dict.items():
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r} in the search space; use one of {', '.join(KINDS)}")
        for name, value in params.items():
            if kind == "choice":
                if not isinstance(value, (list, tuple)) or not value:
                    raise ValueError(f"choice for {name!r} must be a non-empty list, got {value!r}")
            elif not isinstance(value, (list, tuple)) or len(value) != arity[kind]:
                raise ValueError(f"{kind} for {name!r} takes {arity[kind]} numbers, got {value!r}")
    return params_dict


def search_space(params_dict: dict, algo: str) -> dict:
    """Ray Tune's ``param_space`` for a RecBole params dict under ``algo`` (module doc)."""
    from ray import tune

    if algo not in ALGOS:
        raise ValueError(f"algo must be one of {', '.join(ALGOS)}, got {algo!r}")
    _check_params_dict(params_dict)
    if algo == "exhaustive":
        others = sorted(name for kind, params in params_dict.items() if kind != "choice" for name in params)
        if others:
            raise ValueError(f"algo exhaustive enumerates choice parameters only; {', '.join(others)} "
                             f"{'is' if len(others) == 1 else 'are'} continuous: use --algo random or bayes, or "
                             "give choice([...]) lists")
        return {name: tune.grid_search(list(values)) for name, values in params_dict["choice"].items()}
    space = {}
    for kind, params in params_dict.items():
        for name, v in params.items():
            if kind == "choice":
                space[name] = tune.choice(list(v))
            elif kind == "uniform":
                space[name] = tune.uniform(float(v[0]), float(v[1]))
            elif kind == "quniform":
                space[name] = tune.quniform(float(v[0]), float(v[1]), float(v[2]))
            else:  # hyperopt's loguniform takes the bounds' logarithms
                space[name] = tune.loguniform(math.exp(float(v[0])), math.exp(float(v[1])))
    return space


def space_size(params_dict: dict) -> int:
    """Number of combinations of an all-choice space (the trials ``exhaustive`` runs)."""
    return math.prod(len(v) for v in params_dict.get("choice", {}).values())


def params2str(params: dict) -> str:
    """``learning_rate:0.01, dropout_prob:0.2`` (RecBole's ``HyperTuning.params2str``: the tables agree)."""
    return ", ".join(f"{name}:{value}" for name, value in params.items())


# ------------------------------------------------------------------------------------------------ trials
def _abs(path: str, cwd: str) -> str:
    return os.path.normpath(os.path.join(cwd, os.path.expanduser(path)))


def absolute_paths(config, external: dict, cwd: Optional[str] = None) -> dict:
    """Overrides that make the run's working-directory-relative paths absolute (module doc).

    ``config`` is the run's Config built in the driver (every layer merged); ``external`` the user's own keys
    (config dict and files), read for ``data_path`` before RecBole joins the dataset name to it.
    """
    cwd = cwd or os.getcwd()
    out = {}
    base = external.get("data_path", config.internal_config_dict.get("data_path", "dataset/"))
    if base:
        out["data_path"] = _abs(str(base), cwd)
    for key in CWD_PATH_KEYS:
        value = config.final_config_dict.get(key)
        if isinstance(value, str) and value:
            out[key] = _abs(value, cwd)
    for key in PATH_OR_NAME_KEYS:
        value = config.final_config_dict.get(key)
        if isinstance(value, str) and value and not os.path.isabs(value) and os.path.exists(_abs(value, cwd)):
            out[key] = _abs(value, cwd)
    return out


def device_overrides(gpu_ids) -> dict:
    """``gpu_id`` for a trial: Ray's GPU ids (RecBole sets ``CUDA_VISIBLE_DEVICES`` to it), or none: the CPU."""
    return {"gpu_id": ",".join(str(i) for i in gpu_ids)}


@contextlib.contextmanager
def _plain_argv():
    """A Ray worker's argv holds ``--node-ip-address=...``: RecBole's Config would read those as config keys."""
    saved = sys.argv
    sys.argv = saved[:1]
    try:
        yield
    finally:
        sys.argv = saved




def recbole_mm_trial(params: dict, fixed: dict = None, config_file_list: list = None, checkpoint_root: str = None,
                     cpus_per_trial: float = 1) -> dict:
    """One trial, inside a Ray worker: ``objective_function`` on ``fixed`` + ``params``, reported once."""
    import ray
    from ray.air import session

    # importing it imports the package first: the registry and RecBole's patches, in a worker that had neither
    from recbole_mm.quick_start import objective_function

    config_dict = dict(fixed or {})
    config_dict.update(params)
    config_dict.update(device_overrides(ray.get_gpu_ids()))
    config_dict["checkpoint_dir"] = os.path.join(checkpoint_root, session.get_trial_id())
    if not os.environ.get("RECBOLE_MM_THREADS"):  # the cores Ray reserved for this trial
        os.environ["RECBOLE_MM_THREADS"] = str(max(1, int(cpus_per_trial)))
    with _plain_argv():
        result = objective_function(config_dict, config_file_list, saved=True, report_to_ray=False)
    result["checkpoint_dir"] = config_dict["checkpoint_dir"]
    session.report({
        METRIC: float(result["best_valid_score"]),
        "valid": {k: float(v) for k, v in (result.get("best_valid_result") or {}).items()},
        "test": {k: float(v) for k, v in (result.get("test_result") or {}).items()},
        RESULT_JSON: json.dumps(jsonable(result)),
    })
    return {}


class NoImprovementStopper:
    """Stop the search after ``patience`` finished trials in a row without a better valid score (RecBole's
    ``HyperTuning`` early stop, hyperopt's ``no_progress_loss``). Each trial reports once; Ray passes that result
    again when the trial function returns, so a trial counts once. Stopping terminates the trials still running
    (they are left out of the results, as never run)."""

    def __init__(self, patience: int, bigger: bool):
        self.patience, self.bigger = patience, bigger
        self.best, self.since, self.seen = None, 0, set()

    def __call__(self, trial_id, result) -> bool:
        score = result.get(METRIC)
        if score is not None and trial_id not in self.seen:
            self.seen.add(trial_id)
            better = self.best is None or (score > self.best if self.bigger else score < self.best)
            if better:
                self.best, self.since = score, 0
            else:
                self.since += 1
        return False  # the trial ends by itself after its one report

    def stop_all(self) -> bool:
        return self.patience is not None and self.patience > 0 and self.since >= self.patience


# ------------------------------------------------------------------------------------------------ results
@dataclass
class RayTrial:
    """One trial: its parameters, ``objective_function``'s result dict (``None`` if it failed), where Ray kept it."""

    params: dict
    result: Optional[dict]
    trial_id: str
    path: Optional[str] = None
    error: Optional[str] = None

    @property
    def score(self) -> Optional[float]:
        return None if self.result is None else self.result.get("best_valid_score")

    @property
    def checkpoint(self) -> Optional[str]:
        """The model the trial saved (``<checkpoint_dir>/<trial id>/<Model>-<time>.pth``), for ``evaluate``."""
        return None if self.result is None else self.result.get("checkpoint_file")


@dataclass
class RayTuneResult:
    """What :func:`ray_tune` returns: every trial (in Ray's order), the best one by valid score, and where the
    experiment's folder is."""

    trials: list
    best: Optional[RayTrial]
    bigger: bool
    experiment_path: str
    valid_metric: str = ""
    stopped_early: bool = False
    failed: list = field(default_factory=list)

    @property
    def best_params(self) -> Optional[dict]:
        return None if self.best is None else self.best.params

    @property
    def best_score(self) -> Optional[float]:
        return None if self.best is None else self.best.score

    @property
    def best_checkpoint(self) -> Optional[str]:
        """The best trial's saved model (``recbole-mm evaluate`` it, or ``pretrained_path``)."""
        return None if self.best is None else self.best.checkpoint

    @property
    def params2result(self) -> dict:
        """``{params string: result dict}`` of the trials that finished (HyperTuning's attribute of that name)."""
        return {params2str(t.params): t.result for t in self.trials if t.result is not None}


def best_trial(trials, bigger: bool) -> Optional[RayTrial]:
    """The finished trial with the best valid score (the first of equals, as HyperTuning keeps the first)."""
    best = None
    for t in trials:
        if t.result is None or t.score is None:
            continue
        if best is None or (t.score > best.score if bigger else t.score < best.score):
            best = t
    return best


def _error_of(trial) -> str:
    path = getattr(trial, "error_file", None)
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f if line.strip()]
        return f"{lines[-1]} (traceback: {path})" if lines else f"failed (see {path})"
    except (OSError, TypeError):
        return "failed (Ray kept no error file)"


# ------------------------------------------------------------------------------------------------ entry point
def _check_ray_installed() -> None:
    import importlib.util

    missing = [name for name in ("ray", "pyarrow") if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"tuning with Ray needs {' and '.join(missing)}: pip install 'recbole_mm[ray]' "
                          "(ray[tune]<=2.6.3 and pyarrow)")


def _check_resources(cpus_per_trial: float, gpus_per_trial: float, available: dict, where: str) -> None:
    if cpus_per_trial <= 0:
        raise ValueError(f"cpus per trial must be > 0, got {cpus_per_trial}")
    if gpus_per_trial < 0:
        raise ValueError(f"gpus per trial must be >= 0, got {gpus_per_trial}")
    gpus, cpus = available.get("GPU", 0), available.get("CPU", 0)
    if gpus_per_trial > gpus:
        raise ValueError(f"--gpus-per-trial {gpus_per_trial:g} asks for GPUs but {where} has "
                         f"{gpus:g}: no trial could ever start; use --gpus-per-trial 0 (CPU trials) or run on "
                         f"machines with GPUs (--address of a Ray cluster that has them)")
    if cpus_per_trial > cpus:
        raise ValueError(f"--cpus-per-trial {cpus_per_trial:g} is more than the {cpus:g} CPUs {where} has: no "
                         f"trial could ever start; use --cpus-per-trial {max(1, int(cpus))} or less")


def machine_cpus() -> int:
    """CPUs this process may use (its affinity mask), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _local_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:
        return 0


def ray_tune(model, dataset, params_file: Optional[str] = None, params_dict: Optional[dict] = None,
             config_file_list: Optional[list] = None, config_dict: Optional[dict] = None, algo: str = "exhaustive",
             max_evals: int = 100, early_stop: Optional[int] = 10, cpus_per_trial: float = 1,
             gpus_per_trial: float = 0, address: Optional[str] = None, num_cpus: Optional[int] = None,
             ray_dir: Optional[str] = None, name: Optional[str] = None, verbose: int = 1) -> RayTuneResult:
    r"""Search hyper-parameters of ``model`` on ``dataset`` with Ray Tune (module doc).

    Args:
        model (str): model name (plugin, RecBole stock, or registered with ``register_model``).
        dataset (str): dataset name.
        params_file (str): RecBole params file; or ``params_dict`` (``{"choice": {name: [..]}, ...}``).
        config_file_list (list): config files every trial reads; ``config_dict``: fixed keys of every trial.
        algo (str): ``exhaustive`` | ``random`` | ``bayes``; ``max_evals`` trials for the last two.
        early_stop (int): stop after that many finished trials without improvement (``None`` or 0: never).
        cpus_per_trial, gpus_per_trial (float): what each trial reserves; trials run side by side as resources
            allow.
        address (str): a running Ray cluster (``"auto"``, ``"<head>:6379"``); default: start a local Ray with
            ``num_cpus`` CPUs (default: the CPUs this process may use).
        ray_dir (str): folder of the experiment folders (default ``./ray_results``).
        name (str): experiment folder name (default ``<model>-<dataset>-<date>``).
        verbose (int): Ray Tune's console verbosity (0-3).

    Returns:
        RayTuneResult: ``trials`` (each with ``params``, ``result`` = ``objective_function``'s dict, ``path``,
        ``error``), ``best`` / ``best_params`` / ``best_score``, ``experiment_path``.
    """
    _check_ray_installed()
    if params_file:
        params_dict = parse_params_file(params_file)
    if params_dict is None:
        raise ValueError("give params_file or params_dict (the search space)")
    cwd = os.getcwd()
    config_files = [_abs(f, cwd) for f in (config_file_list or [])]
    for f in config_files:
        if not os.path.isfile(f):
            raise FileNotFoundError(f"config file {f!r} does not exist")
    model_name = model if isinstance(model, str) else model.__name__
    if address is None:  # before starting Ray: fail fast on a request this machine cannot meet
        _check_resources(cpus_per_trial, gpus_per_trial, {"CPU": num_cpus or machine_cpus(), "GPU": _local_gpus()},
                         "this machine")

    from ray import tune  # after the package (numpy aliases) is imported: ray's logger reads np.bool8

    space = search_space(params_dict, algo)
    # a class goes to the trials as itself (cloudpickle: by reference, or by value when defined in a script), so
    # the workers need not have registered it; a name must be known there (plugin, RecBole, or registered on import)
    fixed = {**(config_dict or {}), "model": model, "dataset": dataset}
    config = _driver_config(model, dataset, config_files, fixed)
    bigger = bool(config["valid_metric_bigger"])
    fixed.update(absolute_paths(config, {**_file_keys(config_files), **fixed}, cwd))
    checkpoint_root = fixed.pop("checkpoint_dir", None) or _abs("saved", cwd)
    storage = _abs(ray_dir or "ray_results", cwd)
    name = name or f"{model_name}-{dataset}-{time.strftime('%Y-%m-%d_%H-%M-%S')}"

    import ray

    started = False
    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # Ray would otherwise send usage statistics
        env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
        # ray's workers import pkg_resources (setuptools<81) before any filter of ours can run
        env["PYTHONWARNINGS"] = ",".join(filter(None, [os.environ.get("PYTHONWARNINGS"), QUIET_PKG_RESOURCES]))
        init = dict(include_dashboard=False, configure_logging=True, logging_level=logging.WARNING,
                    runtime_env={"env_vars": env})
        if address:
            init["address"] = address
        else:  # "local": a new instance; without it ray.init joins any cluster it finds (/tmp/ray's address file)
            init.update(address="local", num_cpus=num_cpus or machine_cpus())
        ray.init(**_ray_init_kwargs(init))
        started = True
    try:
        resources = ray.cluster_resources()
        _check_resources(cpus_per_trial, gpus_per_trial, resources,
                         "this machine" if address is None else f"the Ray cluster at {address}")
        trainable = tune.with_parameters(recbole_mm_trial, fixed=fixed, config_file_list=config_files,
                                         checkpoint_root=checkpoint_root, cpus_per_trial=cpus_per_trial)
        stopper = NoImprovementStopper(early_stop, bigger)
        search_alg = None
        if algo == "bayes":
            from ray.tune.search.hyperopt import HyperOptSearch

            search_alg = HyperOptSearch(random_state_seed=config["seed"])  # metric and mode: from tune.run
        analysis = tune.run(
            trainable, name=name, config=space, metric=METRIC, mode="max" if bigger else "min",
            num_samples=1 if algo == "exhaustive" else max_evals, search_alg=search_alg,
            resources_per_trial={"cpu": cpus_per_trial, "gpu": gpus_per_trial}, storage_path=storage,
            stop=_ray_stopper(stopper), raise_on_failed_trial=False, verbose=verbose, chdir_to_trial_dir=True,
        )
        trials = []  # read while Ray runs: a trial without results fetches a default one from Ray
        for t in analysis.trials:
            params = {k: t.config[k] for k in space if k in t.config}
            raw = (t.last_result or {}).get(RESULT_JSON)
            result = json.loads(raw) if raw else None
            if result is None and t.status != "ERROR":
                continue  # never ran: the search stopped early
            trials.append(RayTrial(params=params, result=result, trial_id=t.trial_id, path=t.local_path,
                                   error=None if result is not None else _error_of(t)))
    finally:
        if started:
            ray.shutdown()
    failed = [t for t in trials if t.result is None]
    planned = space_size(params_dict) if algo == "exhaustive" else max_evals
    if trials and len(failed) == len(trials):
        raise RuntimeError(f"every trial failed; the first: {failed[0].error}")
    return RayTuneResult(trials=trials, best=best_trial(trials, bigger), bigger=bigger,
                         experiment_path=os.path.join(storage, name), valid_metric=str(config["valid_metric"]),
                         stopped_early=stopper.stop_all() and len(trials) < planned, failed=failed)


def _ray_init_kwargs(init: dict) -> dict:
    from recbole_mm.compat import ray_init_kwargs

    runtime_env = init.pop("runtime_env", None)
    return ray_init_kwargs(runtime_env=runtime_env, **init)


def _ray_stopper(stopper: NoImprovementStopper):
    from ray.tune import Stopper

    class _Stopper(Stopper):
        def __call__(self, trial_id, result):
            return stopper(trial_id, result)

        def stop_all(self):
            return stopper.stop_all()

    return _Stopper()


class TrialFolders:
    """``objective_function`` for RecBole's ``HyperTuning`` (``--tool hyperopt``), each trial saving its model in a
    folder of its own, ``<checkpoint_dir>/tune-<model>-<dataset>-<time>-<random>/trial-<n>/``, as Ray trials do
    (``<checkpoint_dir>/<trial id>/``): RecBole names checkpoints by the second, so two trials of under a second in
    one folder overwrote each other's file. ``checkpoint_dir`` is the run's (command line, else config files, else
    RecBole's ``saved``); the search folder is made by ``mkdtemp``, so two searches never share one. A
    ``save_dataset`` pickle is then written per trial (the ``dataset_cache`` build is shared whatever the folder)."""

    def __init__(self, objective, model: str, dataset: str, fixed: dict, config_files: Optional[list] = None):
        import tempfile

        self.objective = objective
        root = fixed.get("checkpoint_dir") or _file_keys(config_files or []).get("checkpoint_dir") or "saved"
        root = os.path.abspath(os.path.expanduser(str(root)))
        os.makedirs(root, exist_ok=True)
        self.folder = tempfile.mkdtemp(prefix=f"tune-{model}-{dataset}-{time.strftime('%Y-%m-%d_%H-%M-%S')}-",
                                       dir=root)
        self.trials = 0

    def __call__(self, config_dict: dict, config_file_list: list):
        self.trials += 1
        folder = os.path.join(self.folder, f"trial-{self.trials}")
        return self.objective(dict(config_dict or {}, checkpoint_dir=folder), config_file_list)


def _file_keys(config_files: list) -> dict:
    """The keys of the user's config files (later files win), for ``data_path`` as the user wrote it."""
    import yaml

    out: dict = {}
    for path in config_files:
        with open(path, encoding="utf-8") as f:
            out.update(yaml.safe_load(f) or {})
    return out


def _driver_config(model, dataset: str, config_files: list, fixed: dict):
    """The run's Config, built once in the driver: bad keys fail before Ray starts, and it tells the direction of
    the valid metric and the paths. RecBole's Config sets ``CUDA_VISIBLE_DEVICES`` from ``gpu_id``, which would
    hide GPUs from the Ray instance started next: the variable is restored."""
    from recbole_mm.config import Config

    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    try:
        with _plain_argv():
            return Config(model=model, dataset=dataset, config_file_list=config_files or None, config_dict=fixed)
    finally:
        if saved is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved
