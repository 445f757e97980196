"""torch threads vs epoch time on this machine: SASRec and MoRec two-stage on ml-100k-mm, 1 / 2 / default threads.

Each (model, threads) runs in a fresh process: one warm-up epoch, then ``--epochs`` timed epochs and as many
evaluation passes (the medians are reported). The settings are rotated between repeats (``--repeats``), so that
load from other processes on a shared machine hits every setting alike; the 1-minute load average after each run
is printed with it. The numbers go to stdout as a markdown table (docs/configuration.md, "Threads", quotes them).

    RECBOLE_MM_THREADS=... is ignored here: every worker sets its own thread count.
    python benchmarks/bench_threads.py [--epochs 3] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

COMMON = {
    "keep_last_n": 23,  # the papers' protocol (last L + 3 interactions per user): a small epoch
    "MAX_ITEM_LIST_LENGTH": 20,
    "n_layers": 2,
    "n_heads": 2,
    "train_batch_size": 128,
    "eval_batch_size": 4096,
    "learning_rate": 0.001,
    "metrics": ["Hit", "NDCG"],
    "topk": [10],
    "valid_metric": "Hit@10",
    "show_progress": False,
    "count_flops": False,
    "state": "WARNING",
    "eval_step": 1,
}
RUNS = {
    "SASRec": ("SASRec", {"hidden_size": 64, "inner_size": 256, "loss_type": "CE"}),
    "MoRec two-stage (text)": ("MoRec", {"mode": "two_stage", "modality": "text", "text_pooling": "mean",
                                         "text_max_length": 32, "text_lowercase": False, "embedding_size": 64,
                                         "dnn_layers": 2, "loss": "inbatch"}),
}
SETTINGS = ["1", "2", "default"]


def worker(model: str, cfg: dict, threads: str, epochs: int, out: str) -> None:
    import torch

    if threads != "default":
        torch.set_num_threads(int(threads))
    used = torch.get_num_threads()
    from recbole_mm.testing import build_run

    config, dataset, train, valid, test, net, trainer = build_run(model, "ml-100k-mm", cfg, log=True)
    train_s, eval_s = [], []
    for epoch in range(epochs + 1):
        start = time.perf_counter()
        trainer._train_epoch(train, epoch, show_progress=False)
        mid = time.perf_counter()
        trainer._valid_epoch(valid, show_progress=False)
        end = time.perf_counter()
        if epoch:  # epoch 0 warms up (allocator, caches, lazy item matrices)
            train_s.append(mid - start)
            eval_s.append(end - mid)
    json.dump({"threads": used, "train": train_s, "eval": eval_s}, open(out, "w"))


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--worker", nargs=5, metavar=("MODEL", "CFG", "THREADS", "EPOCHS", "OUT"))
    args = p.parse_args()
    if args.worker:
        model, cfg, threads, epochs, out = args.worker
        worker(model, json.loads(cfg), threads, int(epochs), out)
        return
    env = {k: v for k, v in os.environ.items() if k not in ("RECBOLE_MM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-threads-") as tmp:
        for rep in range(args.repeats):
            for label, (model, extra) in RUNS.items():
                order = SETTINGS[rep % len(SETTINGS):] + SETTINGS[:rep % len(SETTINGS)]
                for threads in order:
                    cfg = {**COMMON, **extra, "checkpoint_dir": os.path.join(tmp, "saved")}
                    out = os.path.join(tmp, "out.json")
                    proc = subprocess.run([sys.executable, __file__, "--worker", model, json.dumps(cfg), threads,
                                           str(args.epochs), out], cwd=tmp, env=env, capture_output=True, text=True)
                    if proc.returncode != 0:
                        raise RuntimeError(f"{label} / {threads} failed:\n{proc.stderr[-3000:]}")
                    res = json.load(open(out))
                    res["load"] = os.getloadavg()[0]
                    slot = results.setdefault((label, threads), {"threads": res["threads"], "train": [], "eval": [],
                                                                 "load": []})
                    slot["train"] += res["train"]
                    slot["eval"] += res["eval"]
                    slot["load"].append(res["load"])
                    print(f"{label}, threads {threads} ({res['threads']}): train {median(res['train']):.2f} s/epoch, "
                          f"eval {median(res['eval']):.3f} s/pass (1-min load average after the run: "
                          f"{res['load']:.1f})", flush=True)
    print(f"\nmachine: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
          f"python {platform.python_version()}; {time.strftime('%Y-%m-%d')}\n")
    print("| model | torch threads | train s/epoch (median) | eval s/pass (median) | load average after each run |")
    print("|---|---|---|---|---|")
    for (label, threads), r in results.items():
        name = f"default ({r['threads']})" if threads == "default" else threads
        loads = ", ".join(f"{x:.1f}" for x in r["load"])
        print(f"| {label} | {name} | {median(r['train']):.2f} | {median(r['eval']):.3f} | {loads} |")


if __name__ == "__main__":
    main()
