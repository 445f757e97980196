"""Benchmark of the MicroLens converter on a synthetic ``pairs.csv`` (default 10M rows; 1M users, 91K items, ms).

Measures, each in a fresh subprocess (wall time; peak RSS two ways: ``ru_maxrss`` of the converter process, and
the largest sum of RSS over the whole process tree sampled every 0.1 s with psutil, which needs no cgroup):

(a) the bare columnar floor: pyarrow csv read + tab-separated write of the same file;
(b) ``python -m dataset_converters microlens --engine memory`` with dedup, per-user time sort, ``--keep-last 13``
    and ``--min-user-inter 5`` (images skipped; the 91K-title file is converted too);
(d) the same with ``--engine duckdb --memory-limit M`` (out of core, default M = 5GB), checked byte-identical to (b)
    when both ran;
(c) a plain pandas version of the same steps (read_csv, sort_values, drop_duplicates, groupby.tail, size filter,
    to_csv).

Writes a markdown table with the machine and date to ``--doc-file`` (default ``/tmp/bench_out/convert.md``) and
the figures as JSON beside it (``.json``); ``--update-docs`` also replaces the ``## Dataset conversion (...)``
section of docs/benchmarks.md. The synthetic data is deterministic (seed 0) and deleted at the end unless
``--workdir`` is given. Usage::

    python benchmarks/bench_convert.py                                   # 10M rows: a, b, d, c
    python benchmarks/bench_convert.py --rows 100000000 --runs a,d --memory-limit 5GB --target-rss-gb 8

"""

from __future__ import annotations

import argparse
import datetime
import filecmp
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(REPO, "docs", "benchmarks.md")
DEFAULT_OUT = os.path.join("/tmp", "bench_out", "convert.md")
TARGET_WALL, TARGET_RSS_GB = 15.0, 3.0  # the 10M-row target of the in-memory converter (b)
CHUNK = 20_000_000  # rows generated at once

# Runs a command and reports its wall time, the peak RSS of its process tree's largest member (RUSAGE_CHILDREN
# inside this fresh wrapper, so earlier measurements do not leak into later ones) and, when psutil is installed,
# the largest sum of RSS over the command's whole process tree, sampled every 0.1 s (cgroup-free).
WRAPPER = r"""
import json, resource, subprocess, sys, time
try:
    import psutil
except ImportError:
    psutil = None
t = time.perf_counter()
proc = subprocess.Popen(sys.argv[1:])
tree_peak = 0
while proc.poll() is None:
    if psutil is not None:
        try:
            p = psutil.Process(proc.pid)
            total = 0
            for q in [p] + p.children(recursive=True):
                try:
                    total += q.memory_info().rss
                except psutil.Error:
                    pass
            tree_peak = max(tree_peak, total)
        except psutil.Error:
            pass
    time.sleep(0.1)
wall = time.perf_counter() - t
print(json.dumps({"rc": proc.returncode, "wall": wall,
                  "rss_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
                  "tree_peak_bytes": tree_peak if psutil is not None else None}))
"""

ARROW_FLOOR = r"""
import sys, pyarrow.csv as pcsv
table = pcsv.read_csv(sys.argv[1])
pcsv.write_csv(table, sys.argv[2], pcsv.WriteOptions(delimiter="\t", quoting_style="none"))
"""

PANDAS_STEPS = r"""
import sys, pandas as pd
df = pd.read_csv(sys.argv[1], dtype={"user": str, "item": str, "timestamp": "int64"})
df = df.sort_values(["user", "timestamp"], kind="stable")
df = df.drop_duplicates(["user", "item"], keep="first")
df = df.groupby("user", sort=False).tail(13)
df = df[df.groupby("user")["item"].transform("size") >= 5]
df.to_csv(sys.argv[2], sep="\t", index=False, header=["user_id:token", "item_id:token", "timestamp:float"])
print(len(df), file=sys.stderr)
"""


def generate(raw_dir: str, rows: int, users: int = 1_000_000, items: int = 91_000, seed: int = 0) -> str:
    """Write ``MicroLens-1M_pairs.csv`` (user,item,timestamp; epoch ms; rows in random order) and a titles file."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    os.makedirs(raw_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    user_ids = rng.permutation(np.arange(users, dtype=np.int64) * 7 + 3)  # not contiguous, like the real ids
    item_ids = rng.permutation(np.arange(items, dtype=np.int64) * 3 + 1)
    path = os.path.join(raw_dir, "MicroLens-1M_pairs.csv")
    # up to CHUNK rows: one draw (the same data as the earlier 10M figures); beyond, chunks of CHUNK rows, each
    # with its own seed, so that generating 100M rows needs ~1 GB rather than ~8 GB
    chunks = [(rows, rng)] if rows <= CHUNK else \
        [(min(CHUNK, rows - k), np.random.default_rng([seed, k // CHUNK])) for k in range(0, rows, CHUNK)]
    with open(path, "wb") as f:
        f.write(b"user,item,timestamp\n")
        for n, r in chunks:
            u = user_ids[r.integers(0, users, n)]
            popularity = np.minimum((r.pareto(1.2, n) * 50).astype(np.int64), items - 1)  # long-tailed items
            i = item_ids[popularity]
            ts = 1_583_369_012_000 + r.integers(0, 80_000_000_000, n)  # 2020-03 .. 2022-09 in ms
            pcsv.write_csv(pa.table({"user": u, "item": i, "timestamp": ts}), f,
                           pcsv.WriteOptions(include_header=False, quoting_style="none"))
    with open(os.path.join(raw_dir, "MicroLens-1M_title.csv"), "w", encoding="utf-8") as f:
        f.write("item,title\n")
        f.writelines(f"{v},Synthetic title {k}\n" for k, v in enumerate(item_ids.tolist()))
    return path


def measure(cmd: list[str], env: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", WRAPPER] + cmd, stdout=subprocess.PIPE, text=True, env=env,
                         check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if result["rc"] != 0:
        raise RuntimeError(f"{cmd[:4]} failed with exit code {result['rc']}")
    tree = result.get("tree_peak_bytes")
    return {"wall": result["wall"], "rss_gb": result["rss_kb"] / 1e6,
            "tree_rss_gb": tree / 1e9 if tree is not None else None}


def same_files(a: str, b: str) -> bool:
    """Whether two converted folders hold the same files with the same bytes."""
    names = sorted(os.listdir(a))
    if names != sorted(os.listdir(b)):
        return False
    return all(filecmp.cmp(os.path.join(a, n), os.path.join(b, n), shallow=False)
               for n in names if os.path.isfile(os.path.join(a, n)))


def count_lines(path: str) -> int:
    with open(path, "rb") as f:
        return sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 24), b"")) - 1


def machine() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        ram = float("nan")
    return f"{os.cpu_count()} cores, {cpu}, {ram:.0f} GiB RAM, Python {platform.python_version()}"


def update_doc(section: str, title: str) -> None:
    text = open(DOC, encoding="utf-8").read() if os.path.isfile(DOC) else "# Benchmarks\n"
    pattern = re.compile(r"^## Dataset conversion \(.*?\)\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text) and title.startswith("## Dataset conversion (10M"):
        text = pattern.sub(lambda _: section, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    os.makedirs(os.path.dirname(DOC), exist_ok=True)
    with open(DOC, "w", encoding="utf-8") as f:
        f.write(text)


RUN_NAMES = {
    "a": "(a) pyarrow csv read + write, no processing (floor)",
    "b": "(b) `dataset_converters microlens --engine memory` (dedup, sort, keep-last 13, min 5)",
    "d": "(d) `dataset_converters microlens --engine duckdb --memory-limit {limit}` (same steps, out of core)",
    "c": "(c) plain pandas, same steps",
}


def _rows_label(rows: int) -> str:
    return f"{rows // 1_000_000}M" if rows % 1_000_000 == 0 else f"{rows:,}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--workdir", default=None, help="where to put the synthetic data (default: a temp dir, "
                                                        "deleted at the end)")
    parser.add_argument("--runs", default=None,
                        help="comma-separated runs among a,b,d,c (default: all up to 20M rows, else a,d: the "
                             "in-memory converter and pandas need ~160 bytes per row)")
    parser.add_argument("--memory-limit", default="5GB", help="--memory-limit of run (d) (default 5GB)")
    parser.add_argument("--temp-dir", default=None, help="--temp-dir of run (d) (default: inside the work dir)")
    parser.add_argument("--target-rss-gb", type=float, default=None,
                        help="peak RSS target of run (d) (default: none; 8 for the 100M-row check)")
    parser.add_argument("--doc-file", default=DEFAULT_OUT,
                        help=f"markdown output (default {DEFAULT_OUT}); the JSON goes beside it")
    parser.add_argument("--update-docs", action="store_true", help="also write the section into docs/benchmarks.md")
    args = parser.parse_args()
    runs = (args.runs.split(",") if args.runs else
            (["a", "b", "d", "c"] if args.rows <= 20_000_000 else ["a", "d"]))
    unknown = [r for r in runs if r not in RUN_NAMES]
    if unknown:
        parser.error(f"unknown runs {unknown}; choose among a,b,d,c")
    work = args.workdir or tempfile.mkdtemp(prefix="bench_convert_")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    convert = [sys.executable, "-m", "dataset_converters", "microlens", "--keep-last", "13", "--min-user-inter", "5",
               "--dedup", "first", "--images", "skip", "--overwrite", "-q"]
    results, written = {}, {}
    identical = None
    try:
        raw = os.path.join(work, "raw")
        pairs = os.path.join(raw, "MicroLens-1M_pairs.csv")
        if not (args.workdir and os.path.isfile(pairs) and count_lines(pairs) == args.rows):
            pairs = generate(raw, args.rows)
        size_mb = os.path.getsize(pairs) / 1e6
        for run in runs:
            print(f"run {run} ...", file=sys.stderr, flush=True)
            if run == "a":
                results[run] = measure([sys.executable, "-c", ARROW_FLOOR, pairs, os.path.join(work, "floor.tsv")], env)
                os.remove(os.path.join(work, "floor.tsv"))
            elif run in ("b", "d"):
                out_root = os.path.join(work, f"out_{run}")
                extra = ["--engine", "memory"] if run == "b" else \
                    ["--engine", "duckdb", "--memory-limit", args.memory_limit,
                     "--temp-dir", args.temp_dir or work]
                results[run] = measure(convert + ["--input", raw, "--output", out_root] + extra, env)
                written[run] = count_lines(os.path.join(out_root, "MicroLens-1M", "MicroLens-1M.inter"))
            else:
                results[run] = measure([sys.executable, "-c", PANDAS_STEPS, pairs, os.path.join(work, "pandas.tsv")],
                                       env)
                written[run] = count_lines(os.path.join(work, "pandas.tsv"))
            print(f"  {results[run]}", file=sys.stderr, flush=True)
        if "b" in results and "d" in results:
            identical = same_files(os.path.join(work, "out_b", "MicroLens-1M"),
                                   os.path.join(work, "out_d", "MicroLens-1M"))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    label = _rows_label(args.rows)
    title = f"## Dataset conversion ({label} rows)"
    checks = []
    if "b" in results:
        met = results["b"]["wall"] <= TARGET_WALL and results["b"]["rss_gb"] <= TARGET_RSS_GB
        checks.append(f"- target for (b) at 10M rows: <= {TARGET_WALL:.0f} s and <= {TARGET_RSS_GB:.0f} GB: "
                      f"{'met' if met else 'MISSED'}")
    met_d = True
    if "d" in results and args.target_rss_gb is not None:
        peak = max(results["d"]["rss_gb"], results["d"]["tree_rss_gb"] or 0)
        met_d = peak <= args.target_rss_gb
        checks.append(f"- target for (d): peak RSS <= {args.target_rss_gb:g} GB (both measures): "
                      f"{'met' if met_d else 'MISSED'}")
    if written:
        counts = ", ".join(f"({k}) {v:,}" for k, v in written.items())
        same = "" if len(written) < 2 else (" (same)" if len(set(written.values())) == 1 else " (DIFFERENT)")
        checks.append(f"- rows written: {counts}{same}")
    if identical is not None:
        checks.append(f"- (d) output folder byte-identical to (b): {'yes' if identical else 'NO'}")
    table = "| run | wall (s) | peak RSS, process (GB) | peak RSS, process tree sampled (GB) |\n|---|---:|---:|---:|\n"
    for run in runs:
        r = results[run]
        tree = f"{r['tree_rss_gb']:.2f}" if r.get("tree_rss_gb") is not None else "-"
        table += f"| {RUN_NAMES[run].format(limit=args.memory_limit)} | {r['wall']:.1f} | {r['rss_gb']:.2f} | {tree} |\n"
    command = "python benchmarks/bench_convert.py " + " ".join(sys.argv[1:])
    section = (
        f"{title}\n\n"
        f"Synthetic MicroLens `pairs.csv`: {args.rows:,} rows ({size_mb:.0f} MB), 1M users, 91K items, epoch-ms "
        f"timestamps, rows in random order (seed 0). Each run is a fresh process; peak RSS is that process's "
        f"`ru_maxrss`, and the largest sum of RSS over its process tree sampled every 0.1 s (psutil).\n\n"
        f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}\n"
        f"- machine: {machine()}\n"
        f"- command: `{command.strip()}`\n"
        + "\n".join(checks) + "\n\n"
        f"{table}\n"
        "(b) and (d) also hash the input (sha256, for provenance), convert the 91K-title file and write `.item`, the "
        "yaml and `provenance.json`. (b) keeps everything in numpy arrays (~160 bytes per input row); (d) streams "
        "the csv into DuckDB (in-memory database capped by `--memory-limit`, spilling to `--temp-dir`) and runs the "
        "protocol as SQL: first appearance per user / item by `GROUP BY`, dedup / keep-last / user filter by window "
        "functions partitioned by user, the output sort by `ORDER BY`, streamed back to pyarrow's csv writer.\n\n"
    )
    print(section)
    os.makedirs(os.path.dirname(os.path.abspath(args.doc_file)), exist_ok=True)
    with open(args.doc_file, "w", encoding="utf-8") as f:
        f.write(section)
    with open(os.path.splitext(args.doc_file)[0] + ".json", "w", encoding="utf-8") as f:
        json.dump({"rows": args.rows, "csv_mb": size_mb, "machine": machine(), "command": command.strip(),
                   "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
                   "memory_limit": args.memory_limit, "results": results, "rows_written": written,
                   "identical_b_d": identical}, f, indent=1)
    if args.update_docs:
        update_doc(section, title)
    return 0 if met_d else 1


if __name__ == "__main__":
    sys.exit(main())
