"""General (user-item graph) models on ml-100k-mm under the MMRec protocol, with the fairness audit (issue 11).

MMRec's protocol: a random 8:1:1 split per user, full ranking with training items masked, Recall / NDCG @10 / @20,
model selection on valid Recall@20 with early stopping after 20 evaluations (at most ``--epochs``), BPR with one
uniform negative, batch 2048, Adam lr 1e-3, D 64. Frozen features: all-MiniLM-L6-v2 titles (mean pooling) and
EfficientNet-Lite0 (224 px). After the test, ``fairness_eval``: fresh attackers (1000 epochs) trained on 80% of the
users' vectors try to recover gender (AUC: probability and hard-prediction), age in MovieLens-1M's 7 groups and
occupation (micro-F1) of the other 20%. Rows: BPR and LightGCN (RecBole's), LATTICE and FREEDOM (the plugin's);
FMMRec is not built yet. Each row in a fresh process, torch threads 1, several seeds.

    python benchmarks/bench_general.py [--epochs 300] [--seeds 2020 2021 2022] [--out-dir /tmp/bench_general]
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

COMMON = {
    "eval_args": {"split": {"RS": [0.8, 0.1, 0.1]}, "order": "RO", "group_by": "user", "mode": "full"},
    "metrics": ["Recall", "NDCG"], "topk": [10, 20], "valid_metric": "Recall@20", "stopping_step": 20,
    "train_batch_size": 2048, "eval_batch_size": 4096, "learner": "adam", "learning_rate": 1e-3, "weight_decay": 0.0,
    "embedding_size": 64, "train_neg_sample_args": {"distribution": "uniform", "sample_num": 1},
    "load_col": {"inter": ["user_id", "item_id", "rating", "timestamp"], "user": ["user_id", "age", "gender", "occupation"]},
    "fairness_eval": True, "sensitive_bins": {"age": [18, 25, 35, 45, 50, 56]},
    "show_progress": False, "count_flops": False, "state": "WARNING", "cold_item_quantile": 0.1,
    "text_encoder": "all-MiniLM-L6-v2", "text_fields": ["title"], "text_pooling": "mean",
    "image_encoder": "tf_efficientnet_lite0", "image_size": 224,
}
ROWS = [
    ("BPR", "BPR", {}),
    ("LightGCN", "LightGCN", {"n_layers": 2, "reg_weight": 1e-4}),
    ("LATTICE", "LATTICE", {"learning_rate": 5e-4, "reg_weight": 1e-4}),
    ("FREEDOM", "FREEDOM", {"edge_dropout": 0.8, "reg_weight": 1e-4}),
]
FMMREC_ROWS = [(f"FMMRec ({backbone})", backbone, {}) for backbone in ("LightGCN", "LATTICE", "FREEDOM")]
# ablation: the same stages without the adversarial terms (disc_reg_weight 0: the filter and the neighbour
# enhancement only), to tell what the attackers add
FMMREC_ROWS.append(("FMMRec (LATTICE), no attackers", "LATTICE", {"disc_reg_weight": 0.0}))
BMMF_EPOCHS = int(os.environ.get("BENCH_BMMF_EPOCHS", "20"))  # stage 1 (the original's default is 100)


def worker(model: str, cfg: dict, out: str) -> None:
    import torch

    torch.set_num_threads(1)
    import recbole_mm

    result = recbole_mm.run_recbole(model=model, dataset="ml-100k-mm", config_dict=cfg)
    plain = lambda r: None if r is None else {k: (None if v is None else float(v)) for k, v in r.items()}  # noqa: E731
    json.dump({"test": plain(result["test_result"]), "cold": plain(result.get("cold_test_result")),
               "fairness": result.get("fairness_result"),
               "fairness_item_aggregated": result.get("fairness_item_aggregated_result"),
               "efficiency": result.get("efficiency"), "epoch_seconds": result.get("epoch_seconds"),
               "checkpoint": result.get("checkpoint_file")}, open(out, "w"))


def run_all(epochs: int, seeds: list, out_dir: str) -> dict:
    from _report import run_worker

    os.makedirs(out_dir, exist_ok=True)
    results = {}
    for seed in seeds:
        rows = list(ROWS)
        for label, backbone, extra in FMMREC_ROWS:  # after their backbone's row: stage 0 is its checkpoint
            rows.append((label, "FMMRec", lambda backbone=backbone, seed=seed, extra=extra: {
                "fmmrec_backbone": json.load(open(os.path.join(out_dir, f"{backbone}_{seed}.json")))["checkpoint"],
                "bmmf_epochs": BMMF_EPOCHS, "fmmrec_cache_dir": os.path.join(out_dir, "fmmrec_cache"), **extra}))
        for label, model, cfg in rows:
            cfg = cfg() if callable(cfg) else cfg
            cfg = {**COMMON, **cfg, "epochs": epochs, "seed": seed, "checkpoint_dir": os.path.join(out_dir, "saved")}
            path = os.path.join(out_dir, f"{label}_{seed}.json")
            if not os.path.isfile(path):
                print(f"[{time.strftime('%H:%M:%S')}] {label}, seed {seed} ...", flush=True)
                res = run_worker(__file__, [model, json.dumps(cfg)], path + ".tmp", label, out_dir)
                json.dump(res, open(path, "w"))
                os.remove(path + ".tmp")
            results.setdefault(label, []).append(json.load(open(path)))
    return results


def render(results: dict, epochs: int, seeds: list) -> str:
    from _report import fmt, machine, mean, median

    lines = [
        f"Machine: {machine()}. `python benchmarks/bench_general.py --epochs {epochs} --seeds "
        f"{' '.join(map(str, seeds))}`: ml-100k-mm, MMRec protocol (random 8:1:1 per user, full ranking, training "
        f"items masked, valid Recall@20 selects, early stop after 20 evaluations, at most {epochs} epochs), BPR with one "
        "uniform negative, batch 2048, Adam, D 64; features: MiniLM titles + EfficientNet-Lite0. Fairness: fresh "
        "attackers (1000 epochs) on 80% of the users' vectors, scored on the other 20%; gender AUC from probabilities "
        "(and from hard predictions, the original's), age (7 MovieLens-1M groups) and occupation (21) micro-F1, with "
        f"the majority-class chance level. Mean over {len(seeds)} seeds.",
        "",
        "| model | Recall@20 | NDCG@20 | Recall@10 | epochs run | s / epoch | peak RSS MiB | gender AUC (hard) "
        "| age F1 (chance) | occupation F1 (chance) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, runs in results.items():
        fair = [r.get("fairness") or {} for r in runs]

        def fm(field, key):
            return mean([f.get(field, {}).get(key) for f in fair])

        lines.append(
            f"| {label} | {fmt(mean([r['test']['recall@20'] for r in runs]))} | "
            f"{fmt(mean([r['test']['ndcg@20'] for r in runs]))} | {fmt(mean([r['test']['recall@10'] for r in runs]))} | "
            f"{fmt(mean([len(r.get('epoch_seconds') or []) for r in runs]), '.0f')} | "
            f"{fmt(mean([median(r.get('epoch_seconds') or []) for r in runs]), '.2f')} | "
            f"{fmt(mean([(r.get('efficiency') or {}).get('peak_memory_mib') for r in runs]), '.0f')} | "
            f"{fmt(fm('gender', 'auc'), '.3f')} ({fmt(fm('gender', 'auc_hard'), '.3f')}) | "
            f"{fmt(fm('age', 'micro_f1'), '.3f')} ({fmt(fm('age', 'chance'), '.3f')}) | "
            f"{fmt(fm('occupation', 'micro_f1'), '.3f')} ({fmt(fm('occupation', 'chance'), '.3f')}) |")
    agg = {label: runs for label, runs in results.items() if any(r.get("fairness_item_aggregated") for r in runs)}
    if agg:
        lines += ["", "FMMRec's second audit: the item-aggregated user vectors (the mean fair vector of the user's "
                  "training items), the view the original reports beside the user vectors.", "",
                  "| model | gender AUC (hard) | age F1 (chance) | occupation F1 (chance) | stage-2 s / epoch | wall s |",
                  "|---|---|---|---|---|---|"]
        for label, runs in agg.items():
            fair = [r.get("fairness_item_aggregated") or {} for r in runs]
            def fa(field, key):
                return mean([f.get(field, {}).get(key) for f in fair])
            lines.append(f"| {label} | {fmt(fa('gender', 'auc'), '.3f')} ({fmt(fa('gender', 'auc_hard'), '.3f')}) | "
                         f"{fmt(fa('age', 'micro_f1'), '.3f')} ({fmt(fa('age', 'chance'), '.3f')}) | "
                         f"{fmt(fa('occupation', 'micro_f1'), '.3f')} ({fmt(fa('occupation', 'chance'), '.3f')}) | "
                         f"{fmt(mean([median(r.get('epoch_seconds') or []) for r in runs]), '.2f')} | "
                         f"{fmt(mean([r.get('wall') for r in runs]), '.0f')} |")
    return "\n".join(lines)


def main() -> None:
    from _report import main_with_rows

    main_with_rows(__doc__, "General models: accuracy and what the user vectors leak (MMRec protocol)", run_all, render, worker, 300, [2020, 2021, 2022], "/tmp/bench_general")


if __name__ == "__main__":
    main()
