"""Transfer to a new catalogue (PMMRec's claim) and the MMSR fusion catalogue, on a genre split of ml-100k-mm.

Source and target share users but not items: the target holds the items with a Horror / Sci-Fi / Fantasy /
Mystery / Film-Noir / Western / Documentary genre, the source all others (``benchmarks/build_genre_split.py``).
Every row is measured on the target under one protocol, in one run: keep_last_n 23 (L 20 + 3), leave-one-out by
time, full ranking, history masked, valid HR@10 picks the epoch (at most the row's epochs). Rows:

- baselines: Pop, SASRec (IDs), ContentKNN text+image (content, no training);
- MMSR with each fusion of the catalogue, trained on the target alone;
- PMMRec trained on the target alone (``scratch``), and pre-trained on the source (next-item + NICL + NID + RCL)
  then transferred (``full`` / ``item_encoder`` / ``user_encoder``) and fine-tuned, and evaluated with no
  target training at all (``epochs: 0``: zero-shot); a pre-training with the next-item loss alone separates what
  the pre-training objectives add.

Every model runs in a fresh process with torch threads = 1. Same D (64), blocks (2), heads (2), batch (64),
AdamW lr 1e-3, weight decay 0.01, logQ in-batch softmax for every content model.

    python benchmarks/bench_transfer.py [--epochs 1 5] [--pretrain-epochs 30] [--seeds 2020 2021] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SOURCE, TARGET = "ml-100k-src", "ml-100k-tgt"
from _report import LEAVE_ONE_OUT, PROTOCOL  # noqa: E402

COMMON = {**PROTOCOL, "keep_last_n": 23, "MAX_ITEM_LIST_LENGTH": 20, "train_batch_size": 64, "learning_rate": 0.001,
          "weight_decay": 0.01, "eval_args": LEAVE_ONE_OUT, "stopping_step": 5}
SEQ = {"n_layers": 2, "n_heads": 2, "dropout_prob": 0.1}
ID = {**SEQ, "hidden_size": 64, "inner_size": 256, "hidden_dropout_prob": 0.1, "attn_dropout_prob": 0.1,
      "loss_type": "CE", "learner": "adamw"}
TEXT = {"text_pooling": "mean", "text_max_length": 32, "text_lowercase": False, "text_fields": ["title", "genres"]}
CONTENT = {**SEQ, **TEXT, "mode": "two_stage", "embedding_size": 64, "fusion_heads": 2, "loss": "inbatch",
           "seq_encoder": "paper", "modality": "text+image"}
FUSIONS = ["sum", "concat", "film", "gated", "sum_dnn", "concat_dnn", "film_dnn", "gated_dnn", "co_att", "merge_attn"]
PRETRAIN = {**CONTENT, "train_stage": "pretrain"}
NEXT_ONLY = {"nicl_alpha": 0.0, "nid_weight": 0.0, "rcl_weight": 0.0}


def worker(model: str, dataset: str, cfg: dict, out: str) -> None:
    import torch

    torch.set_num_threads(1)
    import recbole_mm

    result = recbole_mm.run_recbole(model=model, dataset=dataset, config_dict=cfg)
    plain = lambda r: None if r is None else {k: (None if v is None else float(v)) for k, v in r.items()}  # noqa: E731
    json.dump({
        "test": plain(result["test_result"]), "cold": plain(result.get("cold_test_result")),
        "cold_threshold": result.get("cold_threshold_used"), "epochs": len(result.get("epoch_seconds") or []),
        "epoch_seconds": result.get("epoch_seconds"), "checkpoint": result.get("checkpoint_file"),
    }, open(out, "w"))


def _one(label: str, model: str, dataset: str, cfg: dict, tmp: str, tag: str) -> dict:
    from _report import run_worker

    return run_worker(__file__, [model, dataset, json.dumps(cfg)], os.path.join(tmp, f"{tag}.json"), label, tmp)


def plan(epochs: list) -> list:
    """``(label, model, config, needs)``: ``needs`` = the pre-training a row starts from (None, "all", "next")."""
    top = max(epochs)
    rows = [("Pop", "Pop", {"epochs": 1}, None),
            (f"SASRec (ID), {top} epochs", "SASRec", {**ID, "epochs": top}, None),
            ("ContentKNN text+image (no training)", "ContentKNN", {**TEXT, "knn_modality": "text+image", "epochs": 1},
             None)]
    rows += [(f"MMSR {f}, {top} epochs", "MMSR", {**CONTENT, "fusion": f, "epochs": top}, None) for f in FUSIONS]
    for e in epochs:
        rows.append((f"PMMRec scratch, {e} epoch(s)", "PMMRec", {**CONTENT, "train_stage": "scratch", "epochs": e}, None))
    rows.append(("PMMRec zero-shot (transfer full, no target training)", "PMMRec",
                 {**CONTENT, "train_stage": "finetune", "transfer": "full", "epochs": 0}, "all"))
    for transfer in ("full", "item_encoder", "user_encoder"):
        for e in epochs:
            rows.append((f"PMMRec transferred ({transfer}), {e} epoch(s)", "PMMRec",
                         {**CONTENT, "train_stage": "finetune", "transfer": transfer, "epochs": e}, "all"))
    rows.append(("PMMRec zero-shot, pre-trained on next-item only", "PMMRec",
                 {**CONTENT, "train_stage": "finetune", "transfer": "full", "epochs": 0}, "next"))
    rows.append((f"PMMRec transferred (full), {top} epochs, pre-trained on next-item only", "PMMRec",
                 {**CONTENT, "train_stage": "finetune", "transfer": "full", "epochs": top}, "next"))
    return rows


def run_all(data_root: str, epochs: list, pretrain_epochs: int, seeds: list, only=None, content_set=None) -> dict:
    from build_genre_split import build_split

    split = build_split(data_root, SOURCE, TARGET)
    out = {"split": split, "pretrain": {}, "rows": []}
    with tempfile.TemporaryDirectory(prefix="bench-transfer-") as tmp:
        base = {**COMMON, "data_path": data_root, "checkpoint_dir": os.path.join(tmp, "saved")}
        checkpoints = {}
        rows = [r for r in plan(epochs) if not only or r[0] in only]
        needed = {r[3] for r in rows if r[3]}
        for kind, extra in (("all", {}), ("next", NEXT_ONLY)):
            if kind not in needed:
                continue
            cfg = {**base, **PRETRAIN, **(content_set or {}), **extra, "epochs": pretrain_epochs, "seed": seeds[0]}
            res = _one(f"pretrain {kind}", "PMMRec", SOURCE, cfg, tmp, f"pretrain-{kind}")
            checkpoints[kind] = res["checkpoint"]
            out["pretrain"][kind] = res
            print(f"pretrain ({kind}) on {SOURCE}: source test {res['test']} ({res['epochs']} epochs, "
                  f"{res['wall']:.0f} s)", flush=True)
        for i, (label, model, cfg, needs) in enumerate(rows):
            results = []
            for seed in seeds:
                full = {**base, **cfg, "seed": seed}
                if model in ("MMSR", "PMMRec"):
                    full.update(content_set or {})
                if needs:
                    full["pretrained_path"] = checkpoints[needs]
                results.append(_one(label, model, TARGET, full, tmp, f"row-{i}-{seed}"))
                r = results[-1]
                print(f"{label} | seed {seed}: {r['test']} cold {r['cold']} ({r['epochs']} epochs, {r['wall']:.0f} s)",
                      flush=True)
            out["rows"].append({"label": label, "results": results})
    return out


def _mean(results: list, part: str, key: str):
    values = [(r[part] or {}).get(key) for r in results]
    return None if any(v is None for v in values) else sum(values) / len(values)


def _f(v) -> str:
    return "-" if v is None else f"{v:.4f}"


TITLE = "Transfer to a new catalogue: PMMRec and the MMSR fusions (ml-100k-mm genre split, history masked)"


def _extra_flags(args) -> str:
    if args is None:
        return ""
    out = ""
    if args.set:
        out += " --set " + " ".join(args.set)
    if args.only:
        out += " --only " + " ".join(json.dumps(x) for x in args.only)
    if args.section:
        out += f" --section {json.dumps(args.section)}"
    return out


def render(res: dict, epochs: list, pretrain_epochs: int, seeds: list, args=None) -> str:
    import torch

    from _report import machine

    torch.set_num_threads(1)
    src, tgt = (", ".join(f"{c[k]} {k}" for k in ("users", "items", "interactions"))
                for c in (res["split"]["source"]["counts"], res["split"]["target"]["counts"]))
    none = {"test": None, "epochs": "-"}
    pre = {k: res["pretrain"].get(k, none) for k in ("all", "next")}
    lines = [
        "Machine: " + machine() + ".",
        "",
        f"Command: `python benchmarks/bench_transfer.py --epochs {' '.join(map(str, epochs))} --pretrain-epochs "
        f"{pretrain_epochs} --seeds {' '.join(map(str, seeds))}{_extra_flags(args)}`. Source `{SOURCE}` / target `{TARGET}`: ml-100k-mm "
        f"split by genre into disjoint catalogues (`benchmarks/build_genre_split.py`; source: {src}; target: {tgt}). "
        "Every figure is on the target's test split: keep_last_n 23 (L 20 + 3), leave-one-out by time, full ranking, "
        "history masked, the epoch picked by valid HR@10 (at most the row's epochs). Every model in a fresh process: "
        "D 64, 2 blocks, 2 heads, dropout 0.1, batch 64, AdamW lr 1e-3, weight decay 0.01; content models two-stage "
        "(all-MiniLM-L6-v2 tokens / mean, 32 tokens of title + genres; EfficientNet-Lite0 7x7 grid / mean, rendered "
        "posters), logQ in-batch softmax, the papers' SASRec block; PMMRec = MMSR with merge_attn. Pre-training: "
        f"PMMRec on the source for at most {pretrain_epochs} epochs (seed {seeds[0]}), next-item + NICL (alpha 0.4, "
        "tau 0.1) + NID (0.1) + RCL (0.1), or next-item alone; its source test HR@10: "
        f"{_f((pre['all']['test'] or {}).get('hit@10'))} / {_f((pre['next']['test'] or {}).get('hit@10'))} "
        f"({pre['all']['epochs']} / {pre['next']['epochs']} epochs). `cold` = target test rows whose item holds the "
        "long tail of 10% of the target's training interactions (`cold_item_quantile: 0.1`). Means over "
        f"{len(seeds)} seed(s) ({', '.join(map(str, seeds))}); the last column lists HR@10 per seed.",
        "",
    ]
    thr = next((r["cold_threshold"] for row in res["rows"] for r in row["results"] if r.get("cold_threshold")), None)
    rows0 = next(((r["cold"] or {}).get("rows") for row in res["rows"] for r in row["results"] if r.get("cold")), None)
    lines += [f"cold = at most {thr} training interactions ({int(rows0 or 0)} test rows)", "",
              "| model | epochs run | HR@10 | NDCG@10 | cold HR@10 | cold NDCG@10 | HR@10 per seed | s per epoch |",
              "|---|---|---|---|---|---|---|---|"]
    for row in res["rows"]:
        rs = row["results"]
        per_epoch = [s for r in rs for s in (r.get("epoch_seconds") or [])]
        lines.append(
            f"| {row['label']} | {'/'.join(str(r['epochs']) for r in rs)} | {_f(_mean(rs, 'test', 'hit@10'))} | "
            f"{_f(_mean(rs, 'test', 'ndcg@10'))} | {_f(_mean(rs, 'cold', 'hit@10'))} | "
            f"{_f(_mean(rs, 'cold', 'ndcg@10'))} | {' / '.join(_f((r['test'] or {}).get('hit@10')) for r in rs)} | "
            f"{(sum(per_epoch) / len(per_epoch)) if per_epoch else 0:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), sys.argv[5])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--pretrain-epochs", type=int, default=30)
    parser.add_argument("--seeds", type=int, nargs="+", default=[2020, 2021])
    parser.add_argument("--data-root", default=None, help="where the genre split is built (default: the cache)")
    parser.add_argument("--only", nargs="*", help="labels of the target rows to run (default: all)")
    parser.add_argument("--no-write", action="store_true", help="print the table; do not update docs/benchmarks.md")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides for the content models (MMSR, PMMRec, the pre-training too)")
    parser.add_argument("--section", help="the docs/benchmarks.md section to write (default: the main one)")
    args = parser.parse_args()
    import yaml

    content_set = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    from recbole_mm.paths import cache_root

    data_root = args.data_root or os.path.join(cache_root(), "benchmarks", "genre-split")
    res = run_all(data_root, sorted(args.epochs), args.pretrain_epochs, args.seeds, args.only, content_set)
    text = render(res, sorted(args.epochs), args.pretrain_epochs, args.seeds, args)
    print(text)
    if not args.no_write:
        from _report import write_section

        write_section(args.section or TITLE, text)


if __name__ == "__main__":
    main()
