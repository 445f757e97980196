"""Quality under the papers' protocol on ml-100k-mm: overall, cold and new items, content vs ID, in one run.

Every model runs in a fresh process with torch threads = 1, on the same data and protocol: keep_last_n = L + 3
(L = 20), leave-one-out by time, full ranking, history masked (``mask_history``), early stopping on valid
HR@10 (patience 5, at most ``--epochs`` epochs). Two settings:

- ``standard``: every item can be trained; ``cold`` = test targets whose item holds the long tail of training
  interactions (``cold_item_quantile: 0.1``), ``new`` = test targets never seen in training;
- ``new items``: ``new_item_ratio`` of the catalogue held out of training entirely (their valid / test targets
  stay): the setting in which the MoRec / PMMRec papers show content beating IDs.

Baselines bracket the content models: Pop (no personalisation), SASRec (IDs), ContentKNN (content, no training).

    python benchmarks/bench_protocol.py [--epochs 30] [--new-item-ratio 0.2] [--seeds 2020 2021] [--variants | --fusions]
                                        [--settings standard new] [--only LABEL ...] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _report import LEAVE_ONE_OUT, PROTOCOL  # noqa: E402

COMMON = {**PROTOCOL, "keep_last_n": 23, "MAX_ITEM_LIST_LENGTH": 20, "train_batch_size": 128, "learning_rate": 0.001,
          "weight_decay": 0.01, "eval_args": LEAVE_ONE_OUT, "stopping_step": 5}
SEQ = {"n_layers": 2, "n_heads": 2}
ID = {**SEQ, "hidden_size": 64, "inner_size": 256, "hidden_dropout_prob": 0.1, "attn_dropout_prob": 0.1,
      "loss_type": "CE", "learner": "adamw"}
TEXT = {"text_pooling": "mean", "text_max_length": 32, "text_lowercase": False}
MOREC = {**SEQ, **TEXT, "mode": "two_stage", "embedding_size": 64, "dnn_layers": 2, "dropout_prob": 0.1,
         "seq_mode": "all_position", "seq_encoder": "paper", "loss": "inbatch"}

TI = {**MOREC, "modality": "text+image", "fusion": "add"}
NO_MASK = {"mask_history": False}
# (label, model, config, settings it runs in)
RUNS = [
    ("Pop", "Pop", {}, ("standard", "new")),
    ("SASRec (ID)", "SASRec", ID, ("standard", "new")),
    ("SASRec (ID), history not masked", "SASRec", {**ID, **NO_MASK}, ("standard",)),
    ("ContentKNN text", "ContentKNN", {**TEXT, "knn_modality": "text"}, ("standard", "new")),
    ("ContentKNN text+image", "ContentKNN", {**TEXT, "knn_modality": "text+image"}, ("standard", "new")),
    ("MoRec text", "MoRec", {**MOREC, "modality": "text"}, ("standard", "new")),
    ("MoRec text+image", "MoRec", TI, ("standard", "new")),
    ("MoRec text+image, history not masked", "MoRec", {**TI, **NO_MASK}, ("standard",)),
    ("MoRec text+image, cosine t=0.1", "MoRec", {**TI, "similarity": "cosine", "temperature": 0.1}, ("standard", "new")),
    ("MoRec text+image + ID tower", "MoRec", {**TI, "id_tower": True}, ("standard", "new")),
]
# the investigation of MoRec text+image on new items (--variants): one seed, new-item setting
VARIANTS = [
    ("MoRec text+image, cosine t=0.05", "MoRec", {**TI, "similarity": "cosine", "temperature": 0.05}, ("new",)),
    ("MoRec text+image, dnn_layers 0", "MoRec", {**TI, "dnn_layers": 0}, ("new",)),
    ("MoRec text+image, dnn_layers 1", "MoRec", {**TI, "dnn_layers": 1}, ("new",)),
    ("MoRec text+image, fusion concat", "MoRec", {**TI, "fusion": "concat"}, ("new",)),
    ("MoRec text+image, loss bce", "MoRec", {**TI, "loss": "bce"}, ("new",)),
    ("MoRec text+image, no logQ correction", "MoRec", {**TI, "logq_correction": False}, ("new",)),
    ("MoRec text+image + ID tower, cosine t=0.1", "MoRec", {**TI, "id_tower": True, "similarity": "cosine",
                                                            "temperature": 0.1}, ("new",)),
    ("MoRec text+image + ID tower, dnn_layers 0", "MoRec", {**TI, "id_tower": True, "dnn_layers": 0}, ("new",)),
    ("MoRec image", "MoRec", {**MOREC, "modality": "image"}, ("new",)),
]
# MoRec text+image with the pooled fusions of the MMSR catalogue (--fusions): both settings, the given seeds
COS = {"similarity": "cosine", "temperature": 0.1}
FUSION_VARIANTS = [(f"MoRec text+image, fusion {f}{', cosine t=0.1' if cos else ''}", "MoRec",
                    {**TI, "fusion": f, **(COS if cos else {})}, ("standard", "new"))
                   for f in ("sum", "gated", "film") for cos in (False, True)]


def worker(model: str, cfg: dict, out: str) -> None:
    import torch

    torch.set_num_threads(1)
    import recbole_mm

    result = recbole_mm.run_recbole(model=model, dataset="ml-100k-mm", config_dict=cfg)
    plain = lambda r: None if r is None else {k: (None if v is None else float(v)) for k, v in r.items()}  # noqa: E731
    json.dump({
        "test": plain(result["test_result"]),
        "cold": plain(result.get("cold_test_result")),
        "new": plain(result.get("new_test_result")),
        "cold_threshold": result.get("cold_threshold_used"),
        "epochs": len(result.get("epoch_seconds") or []),
        "epoch_seconds": result.get("epoch_seconds"),
    }, open(out, "w"))


def _one(label: str, model: str, cfg: dict, tmp: str, tag: str) -> dict:
    from _report import run_worker

    return run_worker(__file__, [model, json.dumps(cfg)], os.path.join(tmp, f"{tag}.json"), label, tmp)


def _mean(results: list, part: str) -> dict:
    """Mean over seeds of each metric of ``part`` (test / cold / new); ``rows`` from the first seed."""
    parts = [r[part] or {} for r in results]
    out = {"rows": parts[0].get("rows")}
    for key in parts[0]:
        if key in ("rows", "max_train_count"):
            continue
        values = [p.get(key) for p in parts]
        out[key] = None if any(v is None for v in values) else sum(values) / len(values)
    out["per_seed"] = [p.get("hit@10") for p in parts]
    return out


def run_all(epochs: int, ratio: float, seeds: list, runs: list, settings=("standard", "new"), only=None) -> dict:
    tables = {}
    with tempfile.TemporaryDirectory(prefix="bench-protocol-") as tmp:
        for setting, extra in (("standard", {}), ("new", {"new_item_ratio": ratio})):
            if setting not in settings:
                continue
            rows = []
            for i, (label, model, cfg, where) in enumerate(runs):
                if setting not in where or (only and label not in only):
                    continue
                results = []
                for seed in seeds:
                    full = {**COMMON, **cfg, **extra, "seed": seed, "epochs": 1 if model == "ContentKNN" else epochs,
                            "checkpoint_dir": os.path.join(tmp, "saved")}
                    results.append(_one(label, model, full, tmp, f"{setting}-{i}-{seed}"))
                    r = results[-1]
                    print(f"{setting} | {label} | seed {seed}: {r['test']} cold {r['cold']} new {r['new']} "
                          f"({r['epochs']} epochs, {r['wall']:.0f} s)", flush=True)
                rows.append({
                    "label": label, "test": _mean(results, "test"), "cold": _mean(results, "cold"),
                    "new": _mean(results, "new"), "cold_threshold": results[0]["cold_threshold"],
                    "epochs": "/".join(str(r["epochs"]) for r in results),
                })
            tables[setting] = rows
    return tables


TITLE = "Protocol: overall, cold and new items (ml-100k-mm, history masked)"
VARIANT_TITLE = "MoRec text+image on new items: the variants tried (ml-100k-mm, one seed)"
FUSION_TITLE = "MoRec text+image with the MMSR catalogue's pooled fusions (ml-100k-mm, history masked)"


def _f(v) -> str:
    return "-" if v is None else f"{v:.4f}"


def render(tables: dict, epochs: int, ratio: float, seeds: list, flag: str = "") -> str:
    import torch

    from _report import machine

    torch.set_num_threads(1)
    flags = f"--epochs {epochs} --new-item-ratio {ratio} --seeds {' '.join(map(str, seeds))}"
    lines = [
        "Machine: " + machine() + ".",
        "",
        f"Command: `python benchmarks/bench_protocol.py {flags}{flag}`. Every model "
        "in a fresh process, same data and protocol: keep_last_n 23 (L 20 + 3), leave-one-out by time, full ranking "
        "over all items, **history masked** (unless the row says otherwise), early stopping on valid HR@10 "
        "(patience 5, at most "
        f"{epochs} epochs). Sequential models: D 64, 2 blocks, 2 heads, dropout 0.1, batch 128, AdamW lr 1e-3, "
        "weight decay 0.01; MoRec two-stage (2 DNN blocks; text+image: `fusion: add`, the plain sum, unless the row "
        "names another fusion), all-position windows, logQ in-batch softmax, the papers' "
        "block. Text: all-MiniLM-L6-v2 (mean pooling, 32 tokens); image: EfficientNet-Lite0 (rendered posters). "
        "`cold` = test targets whose item is in the long tail holding 10% of the training interactions "
        "(`cold_item_quantile: 0.1`; threshold in each heading), `new` = test targets with no training "
        f"interaction; `rows` = how many test targets a figure averages (943 in all). Metrics are means over "
        f"{len(seeds)} seed(s) ({', '.join(map(str, seeds))}); the last column lists HR@10 per seed (overall / "
        "cold / new).",
        "",
    ]
    names = {"standard": "standard (every item trainable)", "new": f"new items ({ratio:.0%} of the items held out of training)"}
    for setting, rows in tables.items():
        if not rows:
            continue
        thr = next((r["cold_threshold"] for r in rows if r.get("cold_threshold") is not None), None)
        lines += [f"**{names[setting]}**; cold = at most {thr} training interactions", "",
                  "| model | epochs | HR@10 | NDCG@10 | cold rows | cold HR@10 | cold NDCG@10 | new rows | new HR@10 | "
                  "new NDCG@10 | HR@10 per seed |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            t, c, n = r["test"], r["cold"] or {}, r["new"] or {}
            seeds_col = "; ".join(" / ".join(_f(p[i]) for p in (t["per_seed"], c.get("per_seed") or [None] * len(seeds),
                                                                n.get("per_seed") or [None] * len(seeds)))
                                  for i in range(len(seeds)))
            lines.append(
                f"| {r['label']} | {r['epochs']} | {_f(t['hit@10'])} | {_f(t['ndcg@10'])} | "
                f"{int(c.get('rows') or 0)} | {_f(c.get('hit@10'))} | {_f(c.get('ndcg@10'))} | "
                f"{int(n.get('rows') or 0)} | {_f(n.get('hit@10'))} | {_f(n.get('ndcg@10'))} | {seeds_col} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], json.loads(sys.argv[3]), sys.argv[4])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--new-item-ratio", type=float, default=0.2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[2020, 2021])
    parser.add_argument("--variants", action="store_true", help="the investigation rows instead of the main table")
    parser.add_argument("--fusions", action="store_true", help="MoRec text+image with the catalogue's pooled fusions")
    parser.add_argument("--settings", nargs="*", default=["standard", "new"], help="standard and / or new")
    parser.add_argument("--only", nargs="*", help="labels of the runs to do (default: all)")
    parser.add_argument("--no-write", action="store_true", help="print the table; do not update docs/benchmarks.md")
    parser.add_argument("--section", help="write the table to this section of docs/benchmarks.md; --only then picks "
                                          "rows from every list (main, --variants, --fusions)")
    args = parser.parse_args()
    runs = VARIANTS if args.variants else FUSION_VARIANTS if args.fusions else RUNS
    if args.section:
        runs = RUNS + VARIANTS + FUSION_VARIANTS
    tables = run_all(args.epochs, args.new_item_ratio, args.seeds, runs, args.settings, args.only)
    flag = " --variants" if args.variants else " --fusions" if args.fusions else ""
    if args.section:
        flag = f" --section {json.dumps(args.section)} --only " + " ".join(json.dumps(x) for x in args.only or [])
    text = render(tables, args.epochs, args.new_item_ratio, args.seeds, flag)
    print(text)
    if not args.no_write:
        from _report import write_section

        write_section(args.section or (VARIANT_TITLE if args.variants else FUSION_TITLE if args.fusions else TITLE), text)


if __name__ == "__main__":
    main()
