"""Shared by the benchmark scripts: machine description and section replacement in docs/benchmarks.md."""

from __future__ import annotations

import datetime
import os
import platform
import re
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "benchmarks.md")


# The papers' evaluation protocol and quiet runs, shared by every quality benchmark (each adds its data and model
# settings): HR@10 / NDCG@10, model selection on valid HR@10 at every epoch, history masked, cold = the long tail
# holding 10% of the training interactions.
PROTOCOL = {
    "eval_batch_size": 4096,
    "metrics": ["Hit", "NDCG"],
    "topk": [10],
    "valid_metric": "Hit@10",
    "mask_history": True,
    "cold_item_quantile": 0.1,
    "show_progress": False,
    "count_flops": False,
    "state": "WARNING",
    "eval_step": 1,
}
LEAVE_ONE_OUT = {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "full"}


def mean(values):
    """Mean of the values that are not None (None when there are none)."""
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def median(values):
    """Median (None for no values): robust to a slow epoch, e.g. another process on the machine."""
    values = sorted(values)
    if not values:
        return None
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def fmt(v, spec: str = ".4f") -> str:
    return "-" if v is None else format(v, spec)


def main_with_rows(doc: str, title: str, run_all, render, worker, epochs: int, seeds: list, out_dir: str) -> None:
    """The command line of a seeded benchmark script: ``--worker MODEL CFG OUT`` (one row in this process) or
    ``[--epochs] [--seeds] [--out-dir] [--no-write]`` (every row, the table printed and written as section
    ``title`` of docs/benchmarks.md)."""
    import argparse
    import json
    import sys

    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        model, cfg, out = sys.argv[2:5]
        worker(model, json.loads(cfg), out)
        return
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--seeds", type=int, nargs="+", default=seeds)
    parser.add_argument("--out-dir", default=out_dir)
    parser.add_argument("--no-write", action="store_true", help="print, do not write docs/benchmarks.md")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)  # as in every worker (the machine line reports it)
    body = render(run_all(args.epochs, args.seeds, args.out_dir), args.epochs, args.seeds)
    print(body)
    if not args.no_write:
        write_section(title, body)


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = ""
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            kb = int(f.readline().split()[1])
            mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    import torch

    return (
        f"{os.cpu_count()} CPU cores ({cpu}){mem}, no GPU; Python {platform.python_version()}, torch {torch.__version__}, "
        f"torch threads {torch.get_num_threads()}; {datetime.date.today().isoformat()}"
    )


def write_section(title: str, body: str) -> None:
    """Replace (or append) the section ``## title`` of docs/benchmarks.md."""
    os.makedirs(os.path.dirname(DOC), exist_ok=True)
    text = open(DOC, encoding="utf-8").read() if os.path.isfile(DOC) else "# Benchmarks\n"
    section = f"## {title}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(section + "\n", text)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    with open(DOC, "w", encoding="utf-8") as f:
        f.write(text.rstrip("\n") + "\n")


def run_worker(script: str, args: list, out: str, label: str, cwd: str, env: Optional[dict] = None) -> dict:
    """Run ``python script --worker *args out`` in a fresh process (environment ``env``, default this one's); its
    JSON result plus ``wall`` seconds."""
    import json
    import subprocess
    import sys
    import time

    start = time.time()
    proc = subprocess.run([sys.executable, script, "--worker", *args, out], cwd=cwd, capture_output=True, text=True,
                          env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{label} failed:\n{proc.stderr[-3000:]}")
    with open(out, encoding="utf-8") as f:
        res = json.load(f)
    res["wall"] = time.time() - start
    return res

