"""Benchmark of the sequential dataset build: recbole_mm's vectorised, memory-mapped build vs RecBole's stock one.

A synthetic ``.inter`` (user_id, item_id, timestamp; PixelRec-like proportions: ~20 interactions per user, one
item per 400 interactions, long-tailed item popularity, rows in random order) of each size; then, each in a fresh
subprocess (wall time and peak RSS = ``ru_maxrss`` of that process alone):

- ``ours cold``: ``MMSequentialDataset(config)`` + ``build()`` with an empty cache folder (builds the cache);
- ``ours warm``: the same again (reads the cache);
- ``stock``: RecBole 1.2.1's ``SequentialDataset(config)`` + ``build()`` (its per-row loop; only up to
  ``--stock-max`` interactions: it needs ~500 B per interaction and ~30 us per interaction).

Times are split into ``init`` (RecBole's loading: read ``.inter`` with pandas, filtering, id remapping) and
``build`` (sequence fields and leave-one-out splits). ``anon`` is the process's private memory after the build
(``RssAnon``: what every DDP rank / tuning trial pays; the memory-mapped cache pages are shared file pages).
``MAX_ITEM_LIST_LENGTH`` 20, leave-one-out by user (the package's default protocol).

Writes ``dataset_build.md`` and ``dataset_build.json`` into ``--out-dir`` (default /tmp/bench_out; rows of other
sizes / builds already in that JSON are kept, so they can be run one at a time). Usage::

    python benchmarks/bench_dataset_build.py [--sizes 1000000 10000000] [--stock-max 10000000]
        [--workdir DIR] [--out-dir /tmp/bench_out]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
MAX_LEN = 20


def generate(folder: str, name: str, rows: int, seed: int = 0) -> str:
    """Write ``<folder>/<name>/<name>.inter``: ``rows`` interactions of ``rows // 20`` users and ``rows // 400``
    items (ids are strings, as converted datasets have), timestamps in seconds, rows shuffled."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    out = os.path.join(folder, name)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"{name}.inter")
    if os.path.isfile(path):
        return path
    rng = np.random.default_rng(seed)
    n_users, n_items = max(1, rows // 20), max(10, rows // 400)
    users = rng.integers(0, n_users, rows)
    items = np.minimum((rng.pareto(1.2, rows) * 30).astype(np.int64), n_items - 1)
    items = rng.permutation(n_items)[items]
    times = 1_600_000_000 + rng.integers(0, 60_000_000, rows)
    table = pa.table({"u": pa.array(users * 7 + 3), "i": pa.array(items * 3 + 1), "t": pa.array(times)})
    tmp = path + ".part"
    with open(tmp, "wb") as f:
        f.write(b"user_id:token\titem_id:token\ttimestamp:float\n")
        pcsv.write_csv(table, f, pcsv.WriteOptions(delimiter="\t", quoting_style="none", include_header=False))
    os.replace(tmp, path)
    return path


def _rss_status() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon", "RssFile", "VmRSS")):
                k, v = line.split(":")
                out[k] = int(v.split()[0]) * 1024
    return out


def worker(mode: str, data_path: str, name: str, cache: str, out: str) -> None:
    """One build in this process; writes its timings and memory to ``out`` (JSON)."""
    import torch

    torch.set_num_threads(1)
    from recbole.data.dataset import SequentialDataset

    from recbole_mm.config import Config
    from recbole_mm.data.dataset import MMSequentialDataset

    config = Config(model="SASRec", dataset=name, config_dict={
        "data_path": data_path, "MAX_ITEM_LIST_LENGTH": MAX_LEN, "state": "WARNING", "dataset_cache_dir": cache,
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]}, "checkpoint_dir": os.path.join(cache, "saved"),
        "show_progress": False})
    cls = SequentialDataset if mode == "stock" else MMSequentialDataset
    t0 = time.perf_counter()
    dataset = cls(config)
    t1 = time.perf_counter()
    splits = dataset.build()
    t2 = time.perf_counter()
    status = _rss_status()
    res = {"mode": mode, "init": t1 - t0, "build": t2 - t1, "rows": [len(s) for s in splits],
           "built": getattr(dataset, "dataset_cache_built", None),
           "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
           "anon": status.get("RssAnon"), "file": status.get("RssFile"), "loadavg": os.getloadavg()[0]}
    with open(out, "w", encoding="utf-8") as f:
        json.dump(res, f)


def run(mode, data_path, name, cache, workdir) -> dict:
    """One build in a fresh process (:func:`worker`, one OpenMP thread): its result plus ``wall`` seconds."""
    from benchmarks._report import run_worker

    return run_worker(os.path.abspath(__file__), [mode, data_path, name, cache],
                      os.path.join(workdir, f"{name}-{mode}.json"), f"{name} {mode}", workdir,
                      env=dict(os.environ, OMP_NUM_THREADS="1"))


def gb(x):
    return "-" if x is None else f"{x / 2**30:.2f}"


def render(results: list, stopped: str) -> str:
    from benchmarks._report import machine

    loads = [r["loadavg"] for r in results if r.get("loadavg") is not None]
    load = f" Load average during the runs: {min(loads):.1f}-{max(loads):.1f} (shared machine)." if loads else ""
    lines = [f"Machine: {machine()}.{load}", "",
             f"Synthetic `.inter` (~20 interactions per user, 1 item per 400 interactions), MAX_ITEM_LIST_LENGTH "
             f"{MAX_LEN}, leave-one-out; each row a fresh process. Seconds; GiB. `anon` = private memory after "
             f"the build (per process; the cache's memory maps are shared file pages).", "",
             "| interactions | build | init s | build s | total wall s | peak RSS | anon after | stock / ours |",
             "|---:|---|---:|---:|---:|---:|---:|---|"]
    for r in results:
        stock = next((x for x in results if x["n"] == r["n"] and x["mode"] == "stock"), None)
        ratio = ""
        if stock is not None and r["mode"] != "stock":
            ratio = (f"{(stock['init'] + stock['build']) / (r['init'] + r['build']):.1f}x time, "
                     f"{stock['peak_rss'] / r['peak_rss']:.1f}x peak RSS")
        lines.append(f"| {r['n']:,} | {r['mode']} | {r['init']:.1f} | {r['build']:.1f} | {r['wall']:.1f} | "
                     f"{gb(r['peak_rss'])} | {gb(r['anon'])} | {ratio} |")
    if stopped:
        lines += ["", stopped]
    return "\n".join(lines) + "\n"


def report(results: list, stock_max: int, out_dir: str) -> None:
    """Print the table of ``results`` and write it to ``<out_dir>/dataset_build.md``."""
    stopped = (f"Stock RecBole build run up to {stock_max:,} interactions (larger: ~500 B and ~30 us per "
               f"interaction, i.e. > 20 GB and > 25 min at 50M on this shared machine)."
               if any(r["n"] > stock_max for r in results) else "")
    body = render(results, stopped)
    print(body)
    with open(os.path.join(out_dir, "dataset_build.md"), "w", encoding="utf-8") as f:
        f.write("## Sequential dataset build\n\n" + body)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(*sys.argv[2:7])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--stock-max", type=int, default=10_000_000,
                        help="run RecBole's stock build only up to this many interactions")
    parser.add_argument("--workdir", default=None, help="where the synthetic datasets and caches go (kept)")
    parser.add_argument("--out-dir", default="/tmp/bench_out")
    parser.add_argument("--render", default=None, help="only re-render the table of this results JSON")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)  # as in every worker (the machine line reports it)
    if args.render:
        with open(args.render, encoding="utf-8") as f:
            results = sorted(json.load(f), key=lambda r: (r["n"], r["mode"]))
        report(results, args.stock_max, args.out_dir)
        return
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_dataset_build-")
    os.makedirs(args.out_dir, exist_ok=True)
    previous = os.path.join(args.out_dir, "dataset_build.json")  # other sizes of earlier runs are kept
    results = []
    if os.path.isfile(previous):
        with open(previous, encoding="utf-8") as f:
            planned = {(n, m) for n in args.sizes
                       for m in ["ours-cold", "ours-warm"] + (["stock"] if n <= args.stock_max else [])}
            results = [r for r in json.load(f) if (r["n"], r["mode"]) not in planned]
    for n in args.sizes:
        name = f"synth-{n}"
        t = time.perf_counter()
        generate(workdir, name, n)
        print(f"{name}: generated in {time.perf_counter() - t:.0f}s", flush=True)
        cache = os.path.join(workdir, f"cache-{n}")
        shutil.rmtree(cache, ignore_errors=True)
        modes = ["ours-cold", "ours-warm"] + (["stock"] if n <= args.stock_max else [])
        for mode in modes:
            r = run(mode, workdir, name, cache, workdir)
            r["n"] = n
            results.append(r)
            print(json.dumps(r), flush=True)
            with open(os.path.join(args.out_dir, "dataset_build.json"), "w", encoding="utf-8") as f:
                json.dump(results, f, indent=1)
    results.sort(key=lambda r: (r["n"], r["mode"]))
    report(results, args.stock_max, args.out_dir)


if __name__ == "__main__":
    main()
