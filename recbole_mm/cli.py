"""``recbole-mm``: run | tune | extract | convert | models | info | tpme.

Every command defaults to the embedded dataset ``ml-100k-mm`` (built on first use). ``key=value`` arguments
override config keys (values are parsed as YAML: ``epochs=5``, ``text_fields=[title,genres]``); an unknown key
warns with the closest known one. An error ends the command with one line on stderr naming what is wrong and
exit code 1; ``--debug`` shows the traceback instead. Known warnings of RecBole's dependencies that a user can do
nothing about are hidden by :mod:`recbole_mm.compat` (each by its message, category and module).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import tempfile
import warnings
from typing import Optional

import yaml

from recbole_mm.utils import jsonable

DEFAULT_DATASET = "ml-100k-mm"
DEFAULT_MODEL = "MoRec"


def parse_overrides(pairs: list[str]) -> dict:
    """``["epochs=1", "eval_args={mode: full}"]`` -> dict with YAML-parsed values (``None`` is null too, as in
    RecBole's own command line)."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise SystemExit(f"recbole-mm: expected key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        key = key.strip().lstrip("-")
        try:
            out[key] = yaml.safe_load(value) if value not in ("", "None") else None
        except yaml.YAMLError:
            out[key] = value
    return out


@contextlib.contextmanager
def _plain_argv():
    """RecBole's Config reads ``--key=value`` from sys.argv; the CLI passes its own overrides instead."""
    saved = sys.argv
    sys.argv = [saved[0]]
    try:
        yield
    finally:
        sys.argv = saved


def _fmt(v) -> str:
    if v is None:
        return "-"  # a group with no rows has no metric
    if isinstance(v, int):
        return str(v)
    return f"{float(v):.4f}" if isinstance(v, float) else str(v)


def result_rows(result: dict) -> dict:
    """The rows of a run's results table: valid and test overall, then on cold and on new items (with how many
    targets each averages in the ``rows`` column), then each scoring branch of a model that has several."""
    cold_t = result.get("cold_threshold_used")
    cold = f"cold items (1-{cold_t} train interactions)" if cold_t is not None else "cold items"
    out = {}
    for split, key in (("valid", "best_valid_result"), ("test", "test_result")):
        overall = result.get(key)
        if overall is not None:
            rows = result.get(f"{split}_rows")
            out[split] = dict(overall, rows=rows) if rows is not None else overall
    for split in ("valid", "test"):
        for key, label in (("cold", cold), ("new", "new items (no train interaction)")):
            group = result.get(f"{key}_{split}_result")
            if group is not None:
                out[f"{split}, {label}"] = {k: v for k, v in group.items() if k != "max_train_count"}
    for split in ("valid", "test"):  # models scoring by several branches (ODMT): each branch alone
        for name, metrics in (result.get(f"branch_{split}_result") or {}).items():
            out[f"{split}, {name} branch"] = metrics
    return out


def results_table(rows: dict) -> str:
    """Markdown table: one row per result set (valid, test, ...), one column per metric."""
    rows = {k: v for k, v in rows.items() if v}
    if not rows:
        return ""
    metrics = []
    for res in rows.values():
        for m in res:
            if m not in metrics:
                metrics.append(m)
    lines = ["| split | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    for name, res in rows.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(res.get(m, "")) for m in metrics) + " |")
    return "\n".join(lines)


def _params(v) -> str:
    return "-" if v is None else f"{int(v):,}"


def _num(v, fmt: str) -> str:
    return "-" if v is None else format(float(v), fmt)


def fairness_table(result: dict, key: str = "fairness_result") -> str:
    """Markdown table of a run's fairness audit (``result[key]``; empty without one)."""
    audit = result.get(key)
    if not audit:
        return ""
    if "error" in audit:
        return f"fairness_eval failed: {audit['error']}"
    lines = ["| attribute | classes | metric | value | chance | held-out users | excluded |", "|---|---|---|---|---|---|---|"]
    for field, r in audit.items():
        metrics = ("auc", "auc_hard") if r.get("kind") == "binary" else ("micro_f1", "macro_f1")
        for m in metrics:
            chance = r.get(f"chance_{m}", r.get("chance"))
            lines.append(f"| {field} | {r.get('n_classes')} | {m} | {_num(r.get(m), '.4f')} | {_num(chance, '.4f')} "
                         f"| {r.get('n_test')} | {r.get('excluded')} |")
    return "\n".join(lines)


def efficiency_table(result: dict) -> str:
    """Markdown table of a run's efficiency record (``result["efficiency"]``; empty without one)."""
    eff = result.get("efficiency")
    if not eff:
        return ""
    kind = eff.get("memory_kind") or "memory"
    return "\n".join([
        f"| s / epoch | s / evaluation | peak memory MiB ({kind}) | increase in fit MiB | trainable params | total params |",
        "|---|---|---|---|---|---|",
        f"| {_num(eff.get('seconds_per_epoch'), '.3f')} | {_num(eff.get('seconds_per_eval'), '.3f')} "
        f"| {_num(eff.get('peak_memory_mib'), '.1f')} | {_num(eff.get('peak_memory_increase_mib'), '+.1f')} "
        f"| {_params(eff.get('trainable_params'))} | {_params(eff.get('total_params'))} |",
    ])


# --------------------------------------------------------------------------- run
def _config_dict(args) -> dict:
    """The command's ``key=value`` overrides (unknown keys warn, naming the command line), plus ``--data-path``."""
    config_dict = parse_overrides(args.overrides)
    from recbole_mm.config import warn_unknown_keys
    from recbole_mm.registry import get_model

    warn_unknown_keys(list(config_dict), "the command line", get_model(getattr(args, "model", None) or "SASRec"))
    if getattr(args, "data_path", None):
        config_dict["data_path"] = args.data_path
    return config_dict


def cmd_run(args) -> int:
    import recbole_mm

    config_dict = _config_dict(args)
    _check_distributed_args(args)
    with _plain_argv():
        if _is_distributed(args):  # torch.distributed: one process per device (NCCL) or CPU share (gloo)
            from recbole_mm.quick_start import run

            result = run(model=args.model, dataset=args.dataset, config_file_list=args.config_files or None,
                         config_dict=config_dict, saved=not args.no_save, nproc=args.nproc,
                         world_size=args.nproc * args.nnodes, ip=args.master_addr, port=args.master_port,
                         group_offset=args.node_rank * args.nproc)
            if result is None:
                print(f"node {args.node_rank}: done (results, log and checkpoint are on node 0)")
                return 0
        else:
            result = recbole_mm.run_recbole(
                model=args.model,
                dataset=args.dataset,
                config_file_list=args.config_files or None,
                config_dict=config_dict,
                saved=not args.no_save,
            )
    table = results_table(result_rows(result))
    print(f"\n{result['model']} on {args.dataset}\n\n{table}\n")
    if result.get("efficiency"):
        print(f"{efficiency_table(result)}\n")
    _print_fairness(result)
    from recbole_mm.config import UNKNOWN_KEY_MESSAGES

    for message in UNKNOWN_KEY_MESSAGES:  # the warning at the start has scrolled away by now
        print(f"recbole-mm: warning (repeated): {message}", file=sys.stderr)
    for key, label in (("log_file", "log"), ("checkpoint_file", "checkpoint"), ("tensorboard_dir", "tensorboard")):
        if result.get(key):
            print(f"{label}: {result[key]}")
    if args.plot and result.get("train_loss_history"):
        from recbole_mm.trainer.trainer import plot_training_curve

        plot_training_curve(args.plot, result["train_loss_history"], result.get("valid_score_history", []),
                            result.get("valid_epoch_history", []), f"{result['model']} on {args.dataset}", "valid score")
        print(f"training curve: {args.plot}")
    _save_result(result, args.output)
    return 0


def _print_fairness(result: dict) -> None:
    if result.get("fairness_result"):
        print(f"Fairness: fresh attackers on held-out users (lower = less leakage)\n\n{fairness_table(result)}\n")
    if result.get("fairness_item_aggregated_result"):
        print("Fairness of the item-aggregated user vectors (the mean of the user's training items' vectors)\n\n"
              f"{fairness_table(result, 'fairness_item_aggregated_result')}\n")


def _save_result(result: dict, path: Optional[str]) -> None:
    """``-o FILE.json``: the whole result dict as JSON."""
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(jsonable(result), f, indent=1)
        print(f"results: {path}")


def cmd_evaluate(args) -> int:
    from recbole_mm.quick_start import evaluate_checkpoint

    _check_distributed_args(args)
    with _plain_argv():
        result = evaluate_checkpoint(args.checkpoint, split=args.split, nproc=args.nproc,
                                     world_size=args.nproc * args.nnodes, ip=args.master_addr, port=args.master_port,
                                     group_offset=args.node_rank * args.nproc)
    if result is None:
        print(f"node {args.node_rank}: done (the results are on node 0)")
        return 0
    print(f"\n{result['model']} on {result['dataset']} ({args.split}, {result['checkpoint_file']})\n\n"
          f"{results_table(result_rows(result))}\n")
    _print_fairness(result)
    _save_result(result, args.output)
    return 0


# -------------------------------------------------------------------------- tune
_SPACE_RE = re.compile(r"^\s*([A-Za-z_][\w]*)\s*=\s*(choice|uniform|quniform|loguniform)\s*\((.*)\)\s*$")


def parse_space(items: list[str]) -> dict:
    """``["learning_rate=choice([0.001, 0.01])", "dropout=uniform(0.1, 0.5)"]`` -> HyperTuning params_dict."""
    space: dict = {}
    for item in items:
        m = _SPACE_RE.match(item)
        if not m:
            raise SystemExit(
                f"recbole-mm tune: cannot parse --space {item!r}; use name=choice([a,b]) | uniform(lo,hi) | "
                f"quniform(lo,hi,q) | loguniform(lo,hi)"
            )
        name, kind, args = m.groups()
        value = yaml.safe_load(args) if kind == "choice" else yaml.safe_load(f"[{args}]")
        space.setdefault(kind, {})[name] = value
    return space


def _check_space_keys(args) -> None:
    """A searched key nobody reads (a typo) would make every trial the same run: an error before any trial."""
    from recbole_mm.config import known_config_keys, unknown_key_message
    from recbole_mm.registry import get_model
    from recbole_mm.tuning import parse_params_file

    space = parse_params_file(args.params_file) if args.params_file else parse_space(args.space)
    known = known_config_keys(get_model(args.model))
    for name in sorted({n for params in space.values() for n in params}):
        if name not in known:
            raise ValueError(unknown_key_message(name, "the search space", known).replace(
                "; it is not used", ": no trial would read it"))


def cmd_tune(args) -> int:
    if not args.params_file and not args.space:
        raise SystemExit("recbole-mm tune: give --params-file FILE or at least one --space name=choice([...])")
    ray_only = [flag for flag, value in (("--cpus-per-trial", args.cpus_per_trial), ("--gpus-per-trial",
                args.gpus_per_trial), ("--address", args.address), ("--ray-dir", args.ray_dir)) if value is not None]
    if args.tool != "ray" and ray_only:
        raise ValueError(f"{', '.join(ray_only)} {'applies' if len(ray_only) == 1 else 'apply'} to --tool ray only; "
                         f"add --tool ray (hyperopt runs one trial at a time in this process)")
    _check_space_keys(args)
    if args.tool == "ray":
        from recbole_mm.tuning import params2str, ray_tune

        with _plain_argv():
            found = ray_tune(args.model, args.dataset, params_file=args.params_file,
                             params_dict=parse_space(args.space) if args.space else None,
                             config_file_list=args.config_files or None, config_dict=_config_dict(args),
                             algo=args.algo, max_evals=args.max_evals, early_stop=args.early_stop,
                             cpus_per_trial=1 if args.cpus_per_trial is None else args.cpus_per_trial,
                             gpus_per_trial=0 if args.gpus_per_trial is None else args.gpus_per_trial,
                             address=args.address, ray_dir=args.ray_dir)
        trials = [(params2str(t.params), t.result, t.path) for t in found.trials if t.result is not None]
        best, best_score = params2str(found.best_params), found.best_score
        best_result = found.best.result if found.best is not None else None
        header = f"tool: ray ({found.experiment_path}); "
        if found.stopped_early:
            header += f"stopped early ({args.early_stop} finished trials without a better valid score); "
    else:
        import recbole_mm
        from recbole.trainer import HyperTuning

        fixed = {"model": args.model, "dataset": args.dataset}
        fixed.update(_config_dict(args))
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False, encoding="utf-8") as f:
            yaml.safe_dump(fixed, f)
            fixed_file = f.name
        from recbole_mm.tuning import TrialFolders

        try:
            with _plain_argv():
                tuner = HyperTuning(
                    TrialFolders(recbole_mm.objective_function, args.model, args.dataset, fixed, args.config_files),
                    params_file=args.params_file,
                    params_dict=parse_space(args.space) if args.space else None,
                    fixed_config_file_list=(args.config_files or []) + [fixed_file],
                    algo=args.algo,
                    max_evals=args.max_evals,
                    early_stop=args.early_stop,
                )
                tuner.run()
        finally:
            os.remove(fixed_file)
        trials = [(params, res, None) for params, res in tuner.params2result.items()]
        best, best_score = tuner.params2str(tuner.best_params), tuner.best_score
        best_result = tuner.params2result.get(best)
        header, found = "", None
    output = args.output or f"tune-{args.model}-{args.dataset}.md"
    lines = [f"# Tuning {args.model} on {args.dataset}", "", f"{header}algo: {args.algo}; trials: {len(trials)}", ""]
    for params, res, folder in trials:
        lines += [f"## {params}", "", results_table(result_rows(res)), ""]
        where = ([f"trial folder: {folder}"] if folder else []) + [f"checkpoint: {trial_checkpoint(res) or '-'}"]
        lines += ["; ".join(where), ""]
        if res.get("efficiency"):
            lines += [efficiency_table(res), ""]
        for key, what in (("fairness_result", "user vectors"), ("fairness_item_aggregated_result", "item-aggregated")):
            if res.get(key):
                lines += [f"Fairness ({what}; attackers on held-out users, lower = less leakage)", "",
                          fairness_table(res, key), ""]
    for t in (found.failed if found is not None else []):
        lines += [f"## {params2str(t.params)}: failed", "", t.error or "", ""]
    lines += [f"best: {best} (valid score {best_score:.4f})"]
    best_checkpoint = trial_checkpoint(best_result)
    if best_checkpoint:  # what to evaluate (or transfer from) next
        lines += [f"best trial checkpoint: {best_checkpoint}", f"(recbole-mm evaluate {best_checkpoint})"]
    lines += [""]
    with open(output, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    print(f"results written to {output}")
    return 0


def trial_checkpoint(result: Optional[dict]) -> Optional[str]:
    """The model a tuning trial saved (``objective_function``'s ``checkpoint_file``), if it exists."""
    path = (result or {}).get("checkpoint_file")
    return path if path and os.path.isfile(path) else None


# ----------------------------------------------------------------------- extract
def _dataset_config(args, extra: Optional[dict] = None):
    """Config of the dataset with ``args.model`` (if the command has one): folder, yaml keys, encoder keys."""
    from recbole_mm.config import Config

    cfg = {"data_path": args.data_path} if args.data_path else {}
    cfg.update(extra or {})
    with _plain_argv():
        return Config(model=getattr(args, "model", None) or "SASRec", dataset=args.dataset,
                      config_file_list=args.config_files or None, config_dict=cfg)


def _parse_taps(value: Optional[str]):
    if value is None:
        return None, "pooled"
    if value == "all":
        return None, "taps"
    return [int(t) for t in value.split(",") if t.strip()], "taps"


def cmd_extract(args) -> int:
    from recbole_mm.data.utils import ensure_dataset_folder
    from recbole_mm.extract import default_feature_path, extract_features, spec_from_config
    from recbole_mm.threads import configure_threads

    configure_threads()
    overrides = _config_dict(args)
    if args.encoder:
        overrides[f"{args.modality}_encoder"] = args.encoder
    if args.pooling:
        overrides[f"{args.modality}_pooling"] = args.pooling
    if args.max_length:
        overrides["text_max_length"] = args.max_length
    if args.text_fields:
        overrides["text_fields"] = args.text_fields.split(",")
    if args.image_size:
        overrides["image_size"] = args.image_size
    if args.tap_pooling:
        overrides["tap_pooling"] = args.tap_pooling
    config = _dataset_config(args, overrides)
    ensure_dataset_folder(config)
    taps, kind = _parse_taps(args.taps)
    if args.tokens:
        kind = "tokens"
    if args.kind:
        if args.kind != kind and (args.tokens or args.taps):
            raise SystemExit(f"recbole-mm extract: --kind {args.kind} contradicts --tokens / --taps")
        kind = args.kind
    spec = spec_from_config(config, args.modality, kind=kind, taps=taps)
    # token / tap features default to the dtype the models read (token_feature_dtype), so the file is the one they use
    spec.dtype = args.dtype or (config["token_feature_dtype"] or "float16" if kind in ("tokens", "taps")
                                else config["feature_dtype"] or "float32")
    shard = None
    if args.shard:
        m = re.match(r"^(\d+)/(\d+)$", args.shard)
        if not m:
            raise SystemExit(f"recbole-mm extract: --shard must be i/n, got {args.shard!r}")
        shard = (int(m.group(1)), int(m.group(2)))
    out = args.output or default_feature_path(config["data_path"], spec, config["features_dir"])
    path = extract_features(
        config["data_path"],
        config["dataset"],
        spec,
        out_path=out,
        batch_size=args.batch_size,
        shard=shard,
        progress=not args.no_progress,
        config=config,
    )
    print(path)
    return 0


# -------------------------------------------------------------------------- info
def cmd_info(args) -> int:
    from recbole_mm.data.utils import ensure_dataset_folder
    from recbole_mm.info import dataset_report

    config = _dataset_config(args)
    ensure_dataset_folder(config)
    print(dataset_report(config, verify=args.verify))
    return 0


def cmd_models(args) -> int:
    from recbole_mm.registry import get_model, list_models

    for source in ("plugin", "recbole") if args.source == "all" else (args.source,):
        names = list_models(args.pattern, source=source)
        print(f"{source} models ({len(names)}):")
        for name in names:
            line = f"  {name}"
            if source == "plugin":
                doc = (get_model(name).__doc__ or "").strip().splitlines()
                line += f"  - {doc[0]}" if doc else ""
            print(line)
    return 0


def cmd_convert(argv: list[str]) -> int:
    from dataset_converters.cli import main as convert_main

    return convert_main(argv, prog="recbole-mm convert")


# -------------------------------------------------------------------------- tpme
TPME_WEIGHTS = (0.45, 0.1, 0.45)  # time, trainable parameters, memory: the IISAN paper's alpha1, alpha2, alpha3
TPME_KEYS = ("seconds_per_epoch", "trainable_params", "peak_memory_mib")


def tpme(runs: list, weights=TPME_WEIGHTS) -> list:
    """TPME of each run (IISAN, Fu et al. SIGIR 2024): every figure of ``runs`` (``(time, params, memory)`` tuples)
    min-max normalised over the runs, then ``a1 * t + a2 * p + a3 * m``. Lower is better; a figure equal in every
    run normalises to 0."""

    def normalised(values):
        lo, hi = min(values), max(values)
        return [(v - lo) / (hi - lo) if hi > lo else 0.0 for v in values]

    columns = [normalised([float(run[i]) for run in runs]) for i in range(3)]
    return [sum(w * col[k] for w, col in zip(weights, columns)) for k in range(len(runs))]


def _read_run(path: str) -> dict:
    """A result file of ``recbole-mm run -o FILE.json`` with a complete efficiency record."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"run file {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            result = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path!r} is not a run result (not JSON: {e}); give files written by recbole-mm run -o FILE.json") from e
    if not isinstance(result, dict) or "model" not in result or "test_result" not in result:
        raise ValueError(f"{path!r} is not a run result (no 'model' / 'test_result'); give files written by "
                         "recbole-mm run -o FILE.json")
    eff = result.get("efficiency")
    missing = [k for k in TPME_KEYS if not isinstance(eff, dict) or eff.get(k) is None]
    if missing:
        raise ValueError(f"{path!r} lacks the efficiency keys {', '.join(missing)} (a run before efficiency records, "
                         "or epochs: 0); re-run it with recbole-mm run -o FILE.json")
    return result


def cmd_tpme(args) -> int:
    weights = (args.time_weight, args.params_weight, args.memory_weight)
    if any(w < 0 for w in weights) or abs(sum(weights) - 1.0) > 1e-6:
        raise ValueError(f"the TPME weights must be >= 0 and sum to 1, got --time-weight {weights[0]} "
                         f"--params-weight {weights[1]} --memory-weight {weights[2]}")
    if len(args.runs) < 2:
        raise ValueError("TPME compares runs with each other (min-max over the set): give at least two run files")
    memory_key = "peak_memory_mib" if args.memory == "peak" else "peak_memory_increase_mib"
    results = [_read_run(path) for path in args.runs]
    for path, res in zip(args.runs, results):
        if res["efficiency"].get(memory_key) is None:
            raise ValueError(f"{path!r} lacks the efficiency key {memory_key}; re-run it with recbole-mm run -o FILE.json")
    effs = [res["efficiency"] for res in results]
    scores = tpme([(e["seconds_per_epoch"], e["trainable_params"], e[memory_key]) for e in effs], weights)
    metric = args.metric.lower()
    split_key = "test_result" if args.split == "test" else "best_valid_result"
    kinds = {e.get("memory_kind") for e in effs}
    memory_label = "peak memory MiB" if args.memory == "peak" else "memory increase MiB"
    lines = [f"| run | model | s / epoch | {memory_label} ({', '.join(sorted(k for k in kinds if k))}) | "
             f"trainable params | {metric} ({args.split}) | TPME |", "|---|---|---|---|---|---|---|"]
    for path, res, eff, score in zip(args.runs, results, effs, scores):
        name = os.path.splitext(os.path.basename(path))[0]
        value = (res.get(split_key) or {}).get(metric)
        lines.append(f"| {name} | {res['model']} | {_num(eff['seconds_per_epoch'], '.3f')} | "
                     f"{_num(eff[memory_key], '.1f')} | {_params(eff['trainable_params'])} | "
                     f"{_num(value, '.4f')} | {score:.4f} |")
    print("\n".join(lines))
    print(f"\nTPME = {weights[0]:g} * time + {weights[1]:g} * params + {weights[2]:g} * memory, each min-max normalised "
          "over these runs; lower is better.")
    if len(kinds) > 1:
        print("recbole-mm tpme: warning: the runs measured memory differently (CPU RSS and CUDA allocated): "
              "their memory figures do not compare", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------- main
def distributed_args(sp) -> None:
    """``--nproc --nnodes --node-rank --master-addr --master-port``: the same options for ``run`` and ``evaluate``."""
    sp.add_argument("--nproc", type=int, default=1, metavar="N",
                    help="processes on this machine (torch.distributed: one per GPU with NCCL, else CPU with gloo)")
    sp.add_argument("--nnodes", type=int, default=1, metavar="M", help="machines of the run (the same command on each)")
    sp.add_argument("--node-rank", type=int, default=0, metavar="R", help="this machine's index, 0..M-1 (0 reports)")
    sp.add_argument("--master-addr", metavar="HOST", help="address of node 0 (default localhost; needed with --nnodes)")
    sp.add_argument("--master-port", type=int, metavar="PORT",
                    help="rendezvous port on node 0 (default: a free port; needed with --nnodes)")


def _check_distributed_args(args) -> None:
    if args.nproc < 1 or args.nnodes < 1 or not 0 <= args.node_rank < args.nnodes:
        raise ValueError(f"--nproc ({args.nproc}) and --nnodes ({args.nnodes}) must be >= 1 and --node-rank "
                         f"({args.node_rank}) in 0..{args.nnodes - 1}")


def _is_distributed(args) -> bool:
    return args.nproc > 1 or args.nnodes > 1


DATA_PATH_HELP = "folder holding <dataset>/ (same as data_path=DIR; default: config data_path, ./dataset)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="recbole-mm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help="on an error, show the traceback instead of one line")
    sub = p.add_subparsers(dest="command", required=True,
                           metavar="{run,evaluate,tune,extract,convert,models,info,tpme}")

    def common(sp, with_model=True, model_help="model name"):
        if with_model:
            sp.add_argument("--model", "-m", default=DEFAULT_MODEL, help=f"{model_help} (default {DEFAULT_MODEL})")
        sp.add_argument("--dataset", "-d", default=DEFAULT_DATASET, help=f"dataset name (default {DEFAULT_DATASET})")
        sp.add_argument("--data-path", metavar="DIR", help=DATA_PATH_HELP)
        sp.add_argument("--config-files", "-c", nargs="+", default=[], metavar="YAML", help="config files, in order")
        debug(sp)

    def debug(sp):
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="on an error, show the traceback instead of one line")

    r = sub.add_parser("run", help="train and evaluate a model", description="Train and evaluate a model (RecBole's run_recbole).")
    common(r)
    r.add_argument("--no-save", action="store_true", help="do not save the best checkpoint (test uses the last model)")
    r.add_argument("--output", "-o", help="also write the result dict as JSON here")
    r.add_argument("--plot", help="write a training-curve PNG (loss and valid score per epoch) here")
    distributed_args(r)
    r.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (YAML values)")
    r.set_defaults(func=cmd_run)

    v = sub.add_parser("evaluate", help="evaluate a saved checkpoint again",
                       description="Evaluate a checkpoint written by a run (its config, dataset and protocol: history "
                                   "masked, cold / new item groups, each branch of a multi-branch model).")
    v.add_argument("checkpoint", help="the .pth file (checkpoint_file of a run; 'best trial checkpoint' of a tune)")
    v.add_argument("--split", choices=["test", "valid"], default="test")
    v.add_argument("--output", "-o", help="also write the result dict as JSON here")
    distributed_args(v)
    debug(v)
    v.set_defaults(func=cmd_evaluate)

    t = sub.add_parser("tune", help="hyper-parameter search (RecBole HyperTuning, hyperopt; or Ray Tune)",
                       description="Hyper-parameter search with RecBole's HyperTuning (hyperopt, one trial at a time), "
                                   "or with Ray Tune (--tool ray: trials side by side, on one machine or a Ray "
                                   "cluster). Both take the same search space and write the same table.")
    common(t)
    t.add_argument("--params-file", help="RecBole params file (lines 'name choice [..]' / 'name uniform lo,hi')")
    t.add_argument("--space", action="append", default=[], metavar="NAME=KIND(ARGS)",
                   help="inline search space, e.g. 'learning_rate=choice([0.001,0.01])' (repeatable)")
    t.add_argument("--algo", default="exhaustive", choices=["exhaustive", "random", "bayes"])
    t.add_argument("--max-evals", type=int, default=100, help="trials for random / bayes")
    t.add_argument("--early-stop", type=int, default=10, help="stop after this many trials without improvement")
    t.add_argument("--output", "-o", help="result table file (default tune-<model>-<dataset>.md)")
    t.add_argument("--tool", default="hyperopt", choices=["hyperopt", "ray"],
                   help="hyperopt: RecBole's HyperTuning, trials one after another (default); ray: Ray Tune "
                        "(pip install 'recbole_mm[ray]'): exhaustive = grid search, random = sampling, bayes = "
                        "HyperOptSearch")
    t.add_argument("--cpus-per-trial", type=float, metavar="C", help="--tool ray: CPUs each trial reserves (default 1)")
    t.add_argument("--gpus-per-trial", type=float, metavar="G", help="--tool ray: GPUs each trial reserves (default 0)")
    t.add_argument("--address", help="--tool ray: a running Ray cluster ('auto', HEAD:6379); default: a local Ray "
                                     "on this machine's CPUs")
    t.add_argument("--ray-dir", metavar="DIR", help="--tool ray: where the experiment folder (one folder per trial, "
                                                    "with its RecBole log) goes (default ./ray_results)")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="fixed config overrides for every trial")
    t.set_defaults(func=cmd_tune)

    e = sub.add_parser("extract", help="extract frozen encoder features for every item",
                       description="Extract frozen features (resumable, shardable) into <dataset>/features/<encoder>/. "
                                   "Encoder settings not given here come from the model's config (--model), so the "
                                   "file is the one that model reads.")
    common(e, model_help="model whose encoder settings apply")
    e.add_argument("--modality", required=True, choices=["text", "image"])
    e.add_argument("--encoder", help="HF id / local folder (text, image) or timm name (image); default from config")
    e.add_argument("--pooling", help="text: cls|mean|last|pooler; image: default|cls|mean")
    e.add_argument("--taps", help="'all' or comma-separated hidden-state indices (per-layer outputs)")
    e.add_argument("--tap-pooling", choices=["cls", "mean", "masked_mean", "last"],
                   help="text taps: how each hidden state is pooled (default: mean for decoder LLMs, else cls)")
    e.add_argument("--kind", choices=["pooled", "taps", "tokens"],
                   help="pooled: one vector per item (default); taps: one per hidden state (--taps picks them); "
                        "tokens: token states [n, T, d] (MMSR / PMMRec token-level fusions)")
    e.add_argument("--tokens", action="store_true", help="the same as --kind tokens")
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--shard", help="i/n: compute shard i of n; the last shard to finish merges them")
    e.add_argument("--max-length", type=int, help="text tokens per item")
    e.add_argument("--text-fields", help="comma-separated .item text columns")
    e.add_argument("--image-size", type=int, help="square image side")
    e.add_argument("--dtype", choices=["float32", "float16"],
                   help="storage dtype (default: feature_dtype, float32; tokens and taps: token_feature_dtype, float16)")
    e.add_argument("--output", "-o", help="output .npy (default <dataset>/features/<encoder>/<modality>-<pooling>...npy)")
    e.add_argument("--no-progress", action="store_true")
    e.add_argument("overrides", nargs="*", metavar="key=value")
    e.set_defaults(func=cmd_extract)

    sub.add_parser("convert", help="convert MicroLens / NineRec / PixelRec / MMRec data (see: recbole-mm convert --help)",
                   add_help=False)

    m = sub.add_parser("models", help="list models", description="List plugin models and RecBole's stock models.")
    m.add_argument("pattern", nargs="?", help="glob, e.g. '*Rec'")
    m.add_argument("--source", default="all", choices=["all", "plugin", "recbole"])
    debug(m)
    m.set_defaults(func=cmd_models)

    i = sub.add_parser("info", help="dataset statistics and content / feature files",
                       description="Dataset statistics, which content and feature files exist, and whether they align.")
    common(i, with_model=False)
    i.add_argument("--verify", action="store_true", help="also verify feature checksums (reads every file)")
    i.set_defaults(func=cmd_info)

    w = sub.add_parser("tpme", help="TPME efficiency score of several runs (IISAN's time / params / memory metric)",
                       description="TPME (IISAN, SIGIR 2024) over run result files written by 'recbole-mm run -o "
                                   "FILE.json': seconds per epoch, trainable parameters and peak memory, each min-max "
                                   "normalised over the runs, weighted and summed. Lower is better.")
    w.add_argument("runs", nargs="+", metavar="RUN.json", help="result files of recbole-mm run -o (at least two)")
    w.add_argument("--time-weight", type=float, default=TPME_WEIGHTS[0], help="alpha1, time per epoch (default 0.45)")
    w.add_argument("--params-weight", type=float, default=TPME_WEIGHTS[1],
                   help="alpha2, trainable parameters (default 0.1)")
    w.add_argument("--memory-weight", type=float, default=TPME_WEIGHTS[2], help="alpha3, peak memory (default 0.45)")
    w.add_argument("--memory", default="peak", choices=["peak", "increase"],
                   help="peak: peak memory during fit (default); increase: its rise over the fit start")
    w.add_argument("--metric", default="ndcg@10", help="accuracy column shown next to TPME (default ndcg@10)")
    w.add_argument("--split", default="test", choices=["test", "valid"], help="split of that metric (default test)")
    debug(w)
    w.set_defaults(func=cmd_tpme)
    return p


# Exceptions whose message says everything (the type name would only add noise).
_SELF_EXPLAINING = (ValueError, LookupError, OSError)


def error_line(command: str, exc: BaseException) -> str:
    """One line for an error: what went wrong (the message names the key / file and the fix) and ``--debug``."""
    msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    msg = " ".join(str(msg).split())
    if not msg or not isinstance(exc, _SELF_EXPLAINING):
        msg = f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
    return f"recbole-mm {command}: error: {msg} (--debug shows the traceback)"


def _check_paths(args) -> None:
    """Files and folders named on the command line exist (checked before anything heavy is imported)."""
    for path in getattr(args, "config_files", None) or ():
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file {path!r} (--config-files) does not exist")
        try:  # RecBole parses the text, so its yaml errors would not name the file
            with open(path, encoding="utf-8") as f:
                content = yaml.safe_load(f)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise ValueError(f"config file {path!r} is not valid YAML{where}: {getattr(e, 'problem', None) or e}; "
                             f"fix the file (key: value per line)") from e
        if content is not None and not isinstance(content, dict):
            raise ValueError(f"config file {path!r} must hold 'key: value' lines, not a {type(content).__name__}")
    checkpoint = getattr(args, "checkpoint", None)
    if checkpoint and not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"checkpoint {checkpoint!r} does not exist; give the checkpoint_file a run printed "
                                "(saved/<Model>-<date>.pth)")
    data_path = getattr(args, "data_path", None)
    if data_path and not os.path.isdir(data_path):
        raise FileNotFoundError(f"--data-path {data_path!r} is not a folder; give the folder that holds <dataset>/")


def _show_warnings_briefly() -> None:
    """Unknown-key warnings as ``recbole-mm: warning: ...`` lines; other warnings as Python shows them."""
    shown = warnings.showwarning
    if getattr(shown, "recbole_mm", False):  # main() called again in the same process
        return

    def show(message, category, filename, lineno, file=None, line=None):
        if category.__name__ == "UnknownConfigKeyWarning":
            print(f"recbole-mm: warning: {message}", file=sys.stderr if file is None else file)
        else:
            shown(message, category, filename, lineno, file, line)

    show.recbole_mm = True
    warnings.showwarning = show


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "convert":
        return cmd_convert(argv[1:])
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    for extra in unknown:  # key=value (or --key=value) after options: more overrides
        if "=" in extra and hasattr(args, "overrides"):
            args.overrides.append(extra)
        else:
            parser.error(f"unrecognized argument {extra!r}")
    _show_warnings_briefly()
    try:
        _check_paths(args)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"recbole-mm {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if getattr(args, "debug", False):
            raise
        print(error_line(args.command, e), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
