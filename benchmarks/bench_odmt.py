"""ODMT (issue 10) beside SASRec, MoRec two-stage and IISAN, under the IISAN benchmark's protocol, and its ablation
without distillation (``kd_alpha: 0``).

Same data and settings as ``bench_iisan.py`` (ml-100k-mm, each user's last 13 interactions, L 10, leave-one-out by
time, full ranking, history masked; all-MiniLM-L6-v2 titles + EfficientNet-Lite0 at 64 px; D 64; the papers' SASRec
block; in-batch softmax with logQ), every epoch run for every row (no early stop: ODMT's distillation ramps up over
20 epochs) with the best validation epoch tested, several seeds, each row in a fresh process with torch threads = 1. ODMT reads
frozen token features (MiniLM's 30 title tokens, EfficientNet-Lite0's 2 x 2 grid at 64 px), extracted once; its
per-branch results (ID, text, image; the ensemble is the model's own) are reported too.

    python benchmarks/bench_odmt.py [--epochs 30] [--seeds 2020 2021 2022] [--out-dir /tmp/bench_odmt] [--no-write]
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_iisan import COMMON, CONTENT, ID, IMAGE_SIZE, _plain  # noqa: E402

ODMT = {**CONTENT, "modality": "text+image", "mode": "two_stage", "learner": "adamw", "learning_rate": 1e-3,
        "weight_decay": 0.1, "train_batch_size": 64, "clip_grad_norm": {"max_norm": 5.0}, "kd_temperature": 0.4,
        "kd_alpha": 20, "id_init": "text", "text_view": "cls", "image_view": "mean", "imt_layers": 2, "imt_heads": 2}
ROWS = [
    ("Pop", "Pop", {}),
    ("SASRec (ID)", "SASRec", ID),
    ("MoRec two-stage", "MoRec", {**CONTENT, "modality": "text+image", "fusion": "add", "mode": "two_stage",
                                  "dnn_layers": 2, "learning_rate": 1e-3}),
    ("IISAN cached", "IISAN", {**CONTENT, "mode": "cached", "learning_rate": 1e-3}),
    ("ODMT", "ODMT", ODMT),
    ("ODMT without distillation (kd_alpha 0)", "ODMT", {**ODMT, "kd_alpha": 0}),
    ("ODMT, teacher detached", "ODMT", {**ODMT, "kd_detach_teacher": True}),
]


def worker(model: str, cfg: dict, out: str) -> None:
    import torch

    torch.set_num_threads(1)
    import recbole_mm

    result = recbole_mm.run_recbole(model=model, dataset="ml-100k-mm", config_dict=cfg)
    json.dump({"test": _plain(result["test_result"]), "cold": _plain(result.get("cold_test_result")),
               "branches": {k: _plain(v) for k, v in (result.get("branch_test_result") or {}).items()},
               "efficiency": result.get("efficiency"), "epoch_seconds": result.get("epoch_seconds")}, open(out, "w"))


def run_all(epochs: int, seeds: list, out_dir: str) -> dict:
    from _report import run_worker

    os.makedirs(out_dir, exist_ok=True)
    results = {}
    for seed in seeds:
        for label, model, cfg in ROWS:
            cfg = {**COMMON, **cfg, "epochs": epochs, "stopping_step": epochs, "seed": seed,
                   "checkpoint_dir": os.path.join(out_dir, "saved"), "features_dir": os.path.join(out_dir, "features")}
            path = os.path.join(out_dir, f"{label.split(' (')[0].replace(' ', '_').replace(',', '')}_"
                                         f"{'a0_' if 'kd_alpha 0' in label else ''}{seed}.json")
            if not os.path.isfile(path):
                print(f"[{time.strftime('%H:%M:%S')}] {label}, seed {seed} ...", flush=True)
                res = run_worker(__file__, [model, json.dumps(cfg)], path + ".tmp", label, out_dir)
                json.dump(res, open(path, "w"))
                os.remove(path + ".tmp")
            results.setdefault(label, []).append(json.load(open(path)))
    return results


def render(results: dict, epochs: int, seeds: list) -> str:
    from _report import fmt, machine, mean

    lines = [
        f"Machine: {machine()}. `python benchmarks/bench_odmt.py --epochs {epochs} --seeds {' '.join(map(str, seeds))}`: "
        f"the protocol and encoders of the IISAN benchmark above (ml-100k-mm, last 13 interactions per user, L 10, "
        f"leave-one-out, full ranking, history masked; MiniLM titles + EfficientNet-Lite0 at {IMAGE_SIZE} px; D 64), at "
        f"{epochs} epochs for every row (no early stop; the best validation HR@10 epoch tested), mean over "
        f"{len(seeds)} seeds (per-seed HR@10 in brackets). ODMT: AdamW lr 1e-3, weight decay 0.1, clip 5, tau 0.4, "
        "ramp-up 20 epochs, ID table initialised from the text CLS; IISAN and MoRec at lr 1e-3 too.",
        "",
        "| model | HR@10 | NDCG@10 | cold HR@10 | s / epoch | peak RSS MiB | trainable params |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, runs in results.items():
        effs = [r.get("efficiency") or {} for r in runs]
        hits = [r["test"]["hit@10"] for r in runs]
        lines.append(
            f"| {label} | {fmt(mean(hits))} ({', '.join(f'{h:.3f}' for h in hits)}) | "
            f"{fmt(mean([r['test']['ndcg@10'] for r in runs]))} | {fmt(mean([(r.get('cold') or {}).get('hit@10') for r in runs]))} | "
            f"{fmt(mean([e.get('seconds_per_epoch') for e in effs]), '.2f')} | {fmt(mean([e.get('peak_memory_mib') for e in effs]), '.0f')} | "
            f"{(effs[0].get('trainable_params') or 0):,} |")
    branch_rows = [(label, runs) for label, runs in results.items() if runs[0].get("branches")]
    if branch_rows:
        lines += ["", "ODMT's branches scored alone (test, mean over the seeds; the ensemble row is the model's own):", "",
                  "| model | branch | HR@10 | NDCG@10 |", "|---|---|---|---|"]
        for label, runs in branch_rows:
            for branch in ("id", "text", "image"):
                lines.append(f"| {label} | {branch} | {fmt(mean([r['branches'][branch]['hit@10'] for r in runs]))} | "
                             f"{fmt(mean([r['branches'][branch]['ndcg@10'] for r in runs]))} |")
            lines.append(f"| {label} | ensemble | {fmt(mean([r['test']['hit@10'] for r in runs]))} | "
                         f"{fmt(mean([r['test']['ndcg@10'] for r in runs]))} |")
    return "\n".join(lines)


def main() -> None:
    from _report import main_with_rows

    main_with_rows(__doc__, "ODMT: online distillation between ID, text and image branches", run_all, render, worker, 30, [2020, 2021, 2022], "/tmp/bench_odmt")


if __name__ == "__main__":
    main()
