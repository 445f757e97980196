"""Two-stage MoRec against RecBole's SASRec, per epoch and per evaluation, measured interleaved (issue 13).

Both models as in ``bench_morec.py``'s same-protocol rows (ml-100k-mm, keep_last_n 13, L 10, D 64, 2 blocks, 2 heads,
dropout 0.1, batch 128, AdamW, prefix examples, full-softmax CE, RecBole's Transformer block; MoRec reads cached
all-MiniLM-L6-v2 features through ``Linear + GELU`` and 2 ``Dropout -> Linear -> GELU`` blocks). Every run is a fresh
process with torch threads 1; the runs alternate SASRec, MoRec, SASRec, MoRec, ... (``--reps`` pairs), each trains
``--epochs`` epochs with a validation pass after each; the first epoch and the first validation of a run are warm-up
and excluded. Per pair: the ratio of the medians (MoRec / SASRec); reported: the median ratio over the pairs and
its range.

``--profile``: one more pair of processes times the phases of a training step (median over 60 steps after 10 warm-up
steps, interleaved): the item vectors (SASRec: none, the embedding table is read in the encoder; MoRec: the DNN head
over the whole catalogue, ``catalogue_vectors``), the user encoder and the loss (forward), the backward pass, the
optimizer step.

    python benchmarks/bench_speed.py [--reps 3] [--epochs 4] [--profile] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_morec import COMMON, ID_SAME, SAME_PROTOCOL, TS_TEXT  # noqa: E402

MODELS = {"SASRec": ("SASRec", ID_SAME), "MoRec": ("MoRec", {**TS_TEXT, **SAME_PROTOCOL})}


def _build(name: str, epochs: int, tmp: str):
    from recbole_mm.testing import build_run

    model, extra = MODELS[name]
    cfg = {**COMMON, **extra, "epochs": epochs, "stopping_step": epochs + 1, "checkpoint_dir": os.path.join(tmp, "saved")}
    return build_run(model, "ml-100k-mm", cfg)


def worker(name: str, epochs: int, out: str) -> None:
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        config, dataset, train, valid, test, net, trainer = _build(name, epochs, tmp)
        trainer.fit(train, valid, saved=False, show_progress=False)
    json.dump({"epoch_seconds": trainer.epoch_seconds, "eval_seconds": trainer.eval_seconds}, open(out, "w"))


def profile_worker(name: str, out: str) -> None:
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        config, dataset, train, valid, test, net, trainer = _build(name, 1, tmp)
    net.train()
    batches = [b for _, b in zip(range(70), train)]
    phases = {"item vectors": [], "encoder + loss": [], "backward": [], "optimizer": []}
    for i, batch in enumerate(batches):
        trainer.optimizer.zero_grad()
        t0 = time.perf_counter()
        if name == "MoRec":  # what calculate_loss does, in its two parts
            from recbole_mm.model import losses

            seq, lengths, targets, _ = net.sequence_targets(batch)
            real = net.catalogue_vectors()
            t1 = time.perf_counter()
            states = net.user_states(seq, lengths, real[(seq - 1).clamp(min=0)])
            loss = losses.full_softmax_loss(net.score_users(states), targets, net.score_items(real), first_id=1)
        else:
            t1 = t0
            loss = net.calculate_loss(batch)
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        trainer.optimizer.step()
        t4 = time.perf_counter()
        if i >= 10:
            for key, v in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                phases[key].append(v * 1000)
    json.dump({k: statistics.median(v) for k, v in phases.items()}, open(out, "w"))


def _run(args: list, tmp: str) -> dict:
    out = os.path.join(tmp, "out.json")
    proc = subprocess.run([sys.executable, __file__, *args, out], cwd=tmp, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{args} failed:\n{proc.stderr[-3000:]}")
    return json.load(open(out))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--profile-worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], int(args.worker[1]), args.worker[2])
        return 0
    if args.profile_worker:
        profile_worker(*args.profile_worker)
        return 0
    import torch

    torch.set_num_threads(1)  # as in every worker (the machine line reports it)
    from _report import machine, write_section

    med = statistics.median
    pairs = []
    with tempfile.TemporaryDirectory(prefix="bench-speed-") as tmp:
        for rep in range(args.reps):
            pair = {}
            for name in MODELS:
                res = _run(["--worker", name, str(args.epochs)], tmp)
                pair[name] = {"epoch": med(res["epoch_seconds"][1:]), "eval": med(res["eval_seconds"][1:])}
                print(f"rep {rep + 1} {name}: {pair[name]['epoch']:.2f} s/epoch, {pair[name]['eval']:.3f} s/eval",
                      flush=True)
            pairs.append(pair)
        prof = {}
        if args.profile:
            for name in MODELS:
                prof[name] = _run(["--profile-worker", name], tmp)
    ratios = {k: [p["MoRec"][k] / p["SASRec"][k] for p in pairs] for k in ("epoch", "eval")}
    lines = [
        f"Machine: {machine()}. `python benchmarks/bench_speed.py --reps {args.reps} --epochs {args.epochs}"
        f"{' --profile' if args.profile else ''}`: SASRec and two-stage MoRec in the same protocol (module doc), fresh "
        f"processes alternating SASRec, MoRec, ... ({args.reps} pairs), {args.epochs} epochs each, the first epoch and "
        "the first validation excluded; medians per run.",
        "",
        "| pair | SASRec s / epoch | MoRec s / epoch | ratio | SASRec s / eval | MoRec s / eval | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, p in enumerate(pairs):
        lines.append(f"| {i + 1} | {p['SASRec']['epoch']:.2f} | {p['MoRec']['epoch']:.2f} | {ratios['epoch'][i]:.2f} | "
                     f"{p['SASRec']['eval']:.3f} | {p['MoRec']['eval']:.3f} | {ratios['eval'][i]:.2f} |")
    verdict = lambda r: "met" if med(r) <= 1.25 else "MISSED"  # noqa: E731
    lines += ["", f"- epoch ratio: median **{med(ratios['epoch']):.2f}** (range {min(ratios['epoch']):.2f}-"
              f"{max(ratios['epoch']):.2f}; target <= 1.25: {verdict(ratios['epoch'])})",
              f"- evaluation ratio: median **{med(ratios['eval']):.2f}** (range {min(ratios['eval']):.2f}-"
              f"{max(ratios['eval']):.2f}; target <= 1.25: {verdict(ratios['eval'])})"]
    if prof:
        lines += ["", "Phases of one training step (ms, median of 60 steps):", "",
                  "| phase | SASRec | MoRec |", "|---|---|---|"]
        for phase in prof["SASRec"]:
            lines.append(f"| {phase} | {prof['SASRec'][phase]:.1f} | {prof['MoRec'][phase]:.1f} |")
        lines.append(f"| step | {sum(prof['SASRec'].values()):.1f} | {sum(prof['MoRec'].values()):.1f} |")
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section("Two-stage MoRec against SASRec, interleaved", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
