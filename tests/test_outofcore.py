"""The out-of-core conversion (``--engine duckdb``, :mod:`dataset_converters.outofcore`) against the in-memory one.

The in-memory pipeline is the reference (tests/test_converters.py pins its behaviour on the fixtures): the
out-of-core engine must give the same output folder byte for byte (``.inter``, ``.item``, yaml and
``provenance.json`` with its drop counts and examples) on every fixture and on random inputs full of the cases
that decide an order or a drop (duplicates, ties in time, users under the threshold, unicode and quoted tokens,
malformed lines, timestamps that are not numbers or not integers), read in many small blocks. A plain-Python
loop checks the protocol itself once more. Process-level behaviour (a capped run in a subprocess, a run killed
mid-way and rerun) is checked with real processes.
"""

from __future__ import annotations

import csv
import glob
import os
import random
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from dataset_converters import ConversionError, interactions, outofcore
from dataset_converters.cli import main
from tests._procs import child_env, read_tree, run_killed_at

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures", "converters")


def _convert(argv: list[str], out: str, engine: str) -> str:
    assert main(argv + ["--output", out, "-q", "--engine", engine]) == 0
    (name,) = os.listdir(out)
    return os.path.join(out, name)


def _assert_same_tree(a: str, b: str) -> None:
    ta, tb = read_tree(a), read_tree(b)
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert ta[k] == tb[k], f"{k} differs:\n--- memory\n{ta[k][:2000]!r}\n--- duckdb\n{tb[k][:2000]!r}"


def _work_folders(temp_dir: str) -> list[str]:
    return glob.glob(os.path.join(temp_dir, outofcore.WORK_PREFIX + "*"))


# ------------------------------------------------------------------------------------------------ fixtures
FIXTURE_CASES = {
    "microlens50k": ["microlens", "--input", os.path.join(FIXTURES, "microlens50k")],
    "microlens50k-dedup-all": ["microlens", "--input", os.path.join(FIXTURES, "microlens50k"), "--dedup", "all"],
    "microlens50k-keep-min": ["microlens", "--input", os.path.join(FIXTURES, "microlens50k"), "--keep-last", "3",
                              "--min-user-inter", "3"],
    "microlens50k-unknown-drop": ["microlens", "--input", os.path.join(FIXTURES, "microlens50k"), "--unknown-items",
                                  "drop", "--keep-last", "2"],
    "microlens100k-fill": ["microlens", "--input", os.path.join(FIXTURES, "microlens100k"), "--images", "skip",
                           "--fill-titles-from", os.path.join(FIXTURES, "microlens100k", "extra_titles.csv")],
    "ninerec-bili-food": ["ninerec", "--input", os.path.join(FIXTURES, "ninerec"), "--domain", "Bili_Food",
                          "--images", "skip"],
    "ninerec-ku": ["ninerec", "--input", os.path.join(FIXTURES, "ninerec"), "--domain", "KU", "--keep-last", "1"],
    "pixelrec": ["pixelrec", "--input", os.path.join(FIXTURES, "pixelrec"), "--variant", "Pixel200K"],
    "pixelrec-protocol": ["pixelrec", "--input", os.path.join(FIXTURES, "pixelrec"), "--variant", "Pixel200K",
                          "--keep-last", "2", "--min-user-inter", "2", "--unknown-items", "drop"],
}


@pytest.mark.parametrize("case", list(FIXTURE_CASES))
def test_fixtures_convert_byte_identically_out_of_core(case, tmp_path, monkeypatch):
    monkeypatch.setattr(outofcore, "BLOCK_SIZE", 64)  # many blocks even for the tiny fixtures
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    argv = FIXTURE_CASES[case]
    mem = _convert(argv, str(tmp_path / "mem"), "memory")
    duck = _convert(argv, str(tmp_path / "duck"), "duckdb")
    _assert_same_tree(mem, duck)
    assert _work_folders(str(tmp_path)) == []  # the database and its spill folder are gone


# ------------------------------------------------------------------------------------------------ random inputs
USERS = ["7", "007", "12", "u1", "Ünïcødé", "用户甲", "😀", "a,b", "x y", "-3", "0x10", "15", "16", "17", "18", "19"]
ITEMS = ["1", "2", "3", "01", "视频", "é", "i,7", "8", "9", "10", "11", "ghost1", "ghost2"]


def _field(token: str) -> str:
    return '"' + token.replace('"', '""') + '"' if any(c in token for c in ',"\t\n') else token


def make_raw(root: str, seed: int, ts_kind: str, n_rows: int = 400) -> None:
    """A MicroLens-like folder: random pairs (duplicates, ties, junk) and a titles file missing some items."""
    rng = random.Random(seed)
    users = USERS[: rng.randint(6, len(USERS))]
    lines = ["user,item,timestamp"]
    rows = []
    for _ in range(n_rows):
        u = rng.choice(users) if rng.random() < 0.9 else rng.choice(users[:3])  # a few heavy users
        i = rng.choice(ITEMS)
        t = rng.randint(0, 12)  # few distinct times: many ties
        rows.append((u, i, t))
    rows += [rows[k] for k in rng.sample(range(len(rows)), 40)]  # exact duplicates
    rng.shuffle(rows)
    for u, i, t in rows:
        ts = str(1_600_000_000_000 + t)
        if ts_kind == "float" and rng.random() < 0.2:
            ts = f"{t}.5"
        elif ts_kind == "junk":
            ts = rng.choice([ts, ts, ts, ts, "notatime", " 12 ", "1e3", "nan", ""])
        line = f"{_field(u)},{_field(i)},{ts}"
        r = rng.random()
        if r < 0.02:
            line = f"{_field(u)},{_field(i)}"  # malformed: 2 fields
        elif r < 0.03:
            line += ",extra"  # malformed: 4 fields
        elif r < 0.04:
            line = f",{_field(i)},{ts}"  # empty user
        elif r < 0.05:
            line = f'"bad\tuser",{_field(i)},{ts}'  # a tab inside a quoted id
        lines.append(line)
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "Rand_pairs.csv"), "w", encoding="utf-8", newline="\n") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(root, "Rand_titles.csv"), "w", encoding="utf-8", newline="\n") as f:
        f.write("item,title\n")
        for i in ITEMS:
            if not i.startswith("ghost"):
                f.write(f"{_field(i)},title of {i} 标题\n")


PROTOCOLS = [
    [],
    ["--dedup", "all"],
    ["--keep-last", "3", "--min-user-inter", "2"],
    ["--keep-last", "5", "--min-user-inter", "4", "--unknown-items", "drop"],
    ["--dedup", "all", "--keep-last", "1", "--unknown-items", "drop"],
]


@pytest.mark.parametrize("ts_kind", ["int", "float", "junk"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_inputs_out_of_core_equal_in_memory(seed, ts_kind, tmp_path, monkeypatch):
    monkeypatch.setattr(outofcore, "BLOCK_SIZE", 256)  # ~10 rows per block: per-block timestamp casts differ
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    raw = str(tmp_path / "raw")
    make_raw(raw, seed, ts_kind)
    for k, protocol in enumerate(PROTOCOLS):
        argv = ["microlens", "--input", raw, "--images", "skip", *protocol]
        mem = _convert(argv, str(tmp_path / f"mem{k}"), "memory")
        duck = _convert(argv, str(tmp_path / f"duck{k}"), "duckdb")
        _assert_same_tree(mem, duck)
    assert _work_folders(str(tmp_path)) == []


def make_ninerec(root: str, seed: int, padded: bool, n_rows: int = 400) -> None:
    """A NineRec domain ``R``: item-first pairs (``, `` separators when ``padded``), ids without their prefix."""
    rng = random.Random(seed)
    sep = ", " if padded else ","
    lines = []
    for _ in range(n_rows):
        u = f"u{rng.randint(1, 25)}" if rng.random() > 0.03 else f"x{rng.randint(1, 3)}"
        v = f"v{rng.randint(1, 30)}" if rng.random() > 0.03 else str(rng.randint(1, 3))
        line = sep.join([v, u, str(1_600_000_000 + rng.randint(0, 15))])
        lines.append(line if rng.random() > 0.02 else sep.join([v, u]))
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "R_pair.csv"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(root, "R_item.csv"), "w", encoding="utf-8") as f:
        f.writelines(f'v{k},中文 {k},"English, {k}"\n' for k in range(1, 28))


@pytest.mark.parametrize("padded", [False, True])
def test_random_ninerec_pairs_out_of_core_equal_in_memory(padded, tmp_path, monkeypatch):
    monkeypatch.setattr(outofcore, "BLOCK_SIZE", 200)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    raw = str(tmp_path / "raw")
    make_ninerec(raw, 7 + padded, padded)
    for k, protocol in enumerate(PROTOCOLS):
        argv = ["ninerec", "--input", raw, "--domain", "R", "--images", "skip", *protocol]
        mem = _convert(argv, str(tmp_path / f"mem{k}"), "memory")
        duck = _convert(argv, str(tmp_path / f"duck{k}"), "duckdb")
        _assert_same_tree(mem, duck)


def _plain_protocol(path: str, keep_last: int, min_inter: int) -> list[str]:
    """The .inter rows by a plain loop: user order of first appearance, stable time sort, first of each (user,
    item), last ``keep_last``, users with at least ``min_inter`` rows (valid rows only: integer timestamps)."""
    with open(path, encoding="utf-8", newline="") as f:
        records = list(csv.reader(f))[1:]
    first: dict[str, int] = {}
    per_user: dict[str, list] = {}
    for n, rec in enumerate(records):
        if len(rec) != 3:
            continue
        u, i, t = rec
        first.setdefault(u, n)
        if not u or not i or any(c in u + i for c in '\t\n\r"'):
            continue
        per_user.setdefault(u, []).append((int(t), n, i))
    out = []
    for u in sorted(per_user, key=first.get):
        rows, seen = [], set()
        for t, n, i in sorted(per_user[u]):
            if i not in seen:
                seen.add(i)
                rows.append((i, t))
        rows = rows[-keep_last:]
        if len(rows) >= min_inter:
            out += [f"{u}\t{i}\t{t}" for i, t in rows]
    return out


@pytest.mark.parametrize("seed", [3, 4])
def test_out_of_core_protocol_matches_a_plain_loop(seed, tmp_path, monkeypatch):
    monkeypatch.setattr(outofcore, "BLOCK_SIZE", 512)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    raw = str(tmp_path / "raw")
    make_raw(raw, seed, "int")
    duck = _convert(["microlens", "--input", raw, "--images", "skip", "--keep-last", "4", "--min-user-inter", "3"],
                    str(tmp_path / "duck"), "duckdb")
    with open(os.path.join(duck, "Rand.inter"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert lines[0] == "user_id:token\titem_id:token\ttimestamp:float"
    expected = _plain_protocol(os.path.join(raw, "Rand_pairs.csv"), 4, 3)
    assert len(expected) > 20 and lines[1:] == expected


# ------------------------------------------------------------------------------------------------ 2 GiB strings
def test_in_memory_reader_switches_to_large_string_past_the_limit(tmp_path, monkeypatch):
    table = pa.Table.from_batches([pa.record_batch({"a": pa.array(["x", "yy"])}),
                                   pa.record_batch({"a": pa.array(["zzz"])})])
    assert interactions.combine_chunks(table).column("a").type == pa.string()
    monkeypatch.setattr(interactions, "STRING_LIMIT", 5)  # 6 characters in the column: over the (forced) limit
    combined = interactions.combine_chunks(table)
    assert combined.column("a").type == pa.large_string() and combined.column("a").to_pylist() == ["x", "yy", "zzz"]
    # a whole conversion with every string column large_string writes the same bytes
    ref = _convert(FIXTURE_CASES["microlens50k-keep-min"], str(tmp_path / "ref"), "memory")
    monkeypatch.setattr(interactions, "STRING_LIMIT", 0)
    large = _convert(FIXTURE_CASES["microlens50k-keep-min"], str(tmp_path / "large"), "memory")
    _assert_same_tree(ref, large)


def test_out_of_core_reader_never_concatenates_blocks(tmp_path, monkeypatch):
    """Every block handed to DuckDB stays below the block size: no string array grows with the file."""
    monkeypatch.setattr(outofcore, "BLOCK_SIZE", 300)
    raw = str(tmp_path / "raw")
    make_raw(raw, 5, "int", n_rows=2000)
    flags, state = outofcore._Flags(), {"malformed": [], "examples": []}
    blocks = list(outofcore._raw_batches(os.path.join(raw, "Rand_pairs.csv"), ["user", "item", "timestamp"], ",", 1,
                                         ("user", "item", "timestamp"), False, flags, state, outofcore.BLOCK_SIZE,
                                         None))
    assert len(blocks) > 50
    assert max(b.column("u").buffers()[2].size for b in blocks) <= 300
    assert sum(b.num_rows for b in blocks) == state["rows"]


# ------------------------------------------------------------------------------------------------ options
def test_engine_choice_and_sizes(tmp_path):
    assert outofcore.parse_size("8GB") == 8 << 30 and outofcore.parse_size("512mb") == 512 << 20
    assert outofcore.parse_size("2.5G") == int(2.5 * 2**30)
    for bad in ("lots", "8XB", "1MB"):
        with pytest.raises(ConversionError, match="--memory-limit"):
            outofcore.parse_size(bad)
    assert outofcore.choose_engine("auto", "1GB", None, 100 << 20).name == "memory"
    assert outofcore.choose_engine("auto", "1GB", None, 200 << 20).name == "duckdb"  # 8 x 200MB > 1GB
    assert outofcore.choose_engine("memory", "1GB", None, 10 << 30).name == "memory"
    assert 0 < outofcore.default_memory_limit() <= outofcore.physical_memory()
    with pytest.raises(ConversionError, match="--temp-dir"):
        outofcore.choose_engine("duckdb", None, str(tmp_path / "absent"), 1)


def test_bad_memory_limit_is_a_clear_cli_error(tmp_path, caplog):
    argv = FIXTURE_CASES["microlens50k"] + ["--output", str(tmp_path), "--memory-limit", "eight gigs"]
    assert main(argv) == 1
    assert "--memory-limit 'eight gigs' is not a size" in caplog.text


# ------------------------------------------------------------------------------------------------ processes
@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("ooc-ref")
    raw = str(root / "raw")
    make_raw(raw, 11, "junk", n_rows=3000)
    argv = ["microlens", "--input", raw, "--images", "skip", "--keep-last", "5", "--min-user-inter", "2"]
    return argv, read_tree(_convert(argv, str(root / "mem"), "memory"))


def test_capped_subprocess_run_matches_and_cleans_up(reference, tmp_path):
    argv, ref = reference
    temp = tmp_path / "spill"
    temp.mkdir()
    out = str(tmp_path / "out")
    proc = subprocess.run([sys.executable, "-m", "dataset_converters", *argv, "--output", out, "--engine", "duckdb",
                           "--memory-limit", "100MB", "--temp-dir", str(temp)],
                          capture_output=True, text=True, cwd=str(tmp_path), timeout=300,
                          env=child_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "first appearance of each user" in proc.stderr  # progress of the long steps is reported
    assert read_tree(os.path.join(out, "Rand")) == ref
    assert os.listdir(temp) == []


def test_killed_out_of_core_run_is_cleaned_and_rerun_identically(reference, tmp_path, caplog):
    argv, ref = reference
    temp = tmp_path / "spill"
    temp.mkdir()
    out = str(tmp_path / "out")
    full = argv + ["--output", out, "--engine", "duckdb", "--temp-dir", str(temp), "-q"]
    code = f"""
import os, signal, sys
from dataset_converters import outofcore
from dataset_converters.cli import main
def die(self, *args, **kwargs):  # SIGKILL once the rows are staged in DuckDB, mid-protocol
    os.kill(os.getpid(), signal.SIGKILL)
outofcore.DuckInteractions.keep_last = die
sys.exit(main({full!r}))
"""
    run_killed_at(code, str(tmp_path), "killed")
    left = _work_folders(str(temp))
    assert len(left) == 1 and os.path.isfile(os.path.join(left[0], "owner.lock"))
    with caplog.at_level("WARNING"):
        assert main([a for a in full if a != "-q"]) == 0
    assert "removed what an interrupted out-of-core conversion left" in caplog.text
    assert os.listdir(temp) == []
    assert read_tree(os.path.join(out, "Rand")) == ref


def test_a_live_runs_work_folder_is_not_removed(tmp_path):
    """A second run in the same temp folder leaves the first (still running) run's folder alone."""
    first = outofcore.WorkDir(str(tmp_path))
    try:
        second = outofcore.WorkDir(str(tmp_path))
        assert os.path.isdir(first.path) and os.path.isdir(second.path)
        second.close()
        assert not os.path.exists(second.path)
    finally:
        first.close()
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------------ sequence .tsv
TSV_CASES = {
    "microlens50k-tsv": ["microlens", "--input", os.path.join(FIXTURES, "microlens50k"), "--interactions", "tsv"],
    "microlens50k-tsv-protocol": ["microlens", "--input", os.path.join(FIXTURES, "microlens50k"), "--interactions",
                                  "tsv", "--dedup", "all", "--keep-last", "3", "--min-user-inter", "2",
                                  "--unknown-items", "drop"],
    "ninerec-qb-tsv": ["ninerec", "--input", os.path.join(FIXTURES, "ninerec"), "--domain", "QB", "--images", "skip"],
    "ninerec-qb-tsv-keep": ["ninerec", "--input", os.path.join(FIXTURES, "ninerec"), "--domain", "QB", "--images",
                            "skip", "--keep-last", "2", "--dedup", "all"],
}


@pytest.mark.parametrize("block", [16, 64, 1 << 24])
@pytest.mark.parametrize("case", list(TSV_CASES))
def test_tsv_fixtures_convert_byte_identically_out_of_core(case, block, tmp_path, monkeypatch, caplog):
    """Blocks of 16 bytes are shorter than most lines: the reader grows them (and reads again) as needed."""
    monkeypatch.setattr(outofcore, "BLOCK_SIZE", block)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    argv = TSV_CASES[case]
    mem = _convert(argv, str(tmp_path / "mem"), "memory")
    with caplog.at_level("INFO", logger="dataset_converters"):  # not quiet: warnings are logged
        assert main(argv + ["--output", str(tmp_path / "duck"), "--engine", "duckdb"]) == 0
    (name,) = os.listdir(tmp_path / "duck")
    duck = str(tmp_path / "duck" / name)
    assert "staged the interactions" in caplog.text  # the out-of-core path ran
    # the old "the sequence file is converted in memory" warning is gone
    assert not [r for r in caplog.records if "in memory" in r.getMessage()]
    _assert_same_tree(mem, duck)
    assert _work_folders(str(tmp_path)) == []


SEQ_USERS = ["7", "007", "12", "u1", "Ünïcødé", "用户甲", "😀", "a,b", '"q"', "-3", "0x10", " 15 ", "16", ""]
SEQ_ITEMS = ["1", "2", "3", "01", "视频", "é", "i,7", "8", "9", "10", 'x"y', "ghost1", "ghost2"]
SEQ_SPACES = [" ", " ", " ", "  ", "\u3000", "\u00a0", " \x0b"]  # unicode whitespace splits items too


def make_seq(root: str, seed: int, n_lines: int = 120, eol: str = "\n") -> None:
    """A MicroLens-like folder with a sequence file: repeated users, repeated items in a sequence, empty and
    whitespace-only lines, lines without items, malformed lines (no tab, two tabs), ids with a double quote."""
    rng = random.Random(seed)
    users = SEQ_USERS[: rng.randint(5, len(SEQ_USERS))]
    lines = []
    for k in range(n_lines):
        u = rng.choice(users) if rng.random() < 0.8 else f"n{k}"  # most users on several lines
        items = [rng.choice(SEQ_ITEMS) for _ in range(rng.choice([0, 1, 2, 3, 5, 8, 30 if rng.random() < 0.1 else 4]))]
        seq = "".join((rng.choice(SEQ_SPACES) if j else rng.choice(["", "", " "])) + it for j, it in enumerate(items))
        line = f"{u}\t{seq}{rng.choice(['', '', ' '])}"
        r = rng.random()
        if r < 0.04:
            line = f"{u} {seq}"  # malformed: no tab
        elif r < 0.07:
            line = f"{u}\t{seq}\textra"  # malformed: 3 fields
        elif r < 0.10:
            line = ""  # empty line (skipped by the reader, not malformed)
        elif r < 0.12:
            line = "   "  # whitespace only: one field, malformed
        lines.append(line)
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "Rand_pairs.tsv"), "w", encoding="utf-8", newline="") as f:
        f.write(eol.join(lines) + eol)
    with open(os.path.join(root, "Rand_titles.csv"), "w", encoding="utf-8", newline="\n") as f:
        f.write("item,title\n")
        for i in SEQ_ITEMS:
            if not i.startswith("ghost"):
                f.write(f"{_field(i)},title of {i} 标题\n")


@pytest.mark.parametrize("eol", ["\n", "\r\n"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_random_tsv_out_of_core_equal_in_memory(seed, eol, tmp_path, monkeypatch):
    monkeypatch.setattr(outofcore, "BLOCK_SIZE", 32)  # a few lines per block; the longest lines need larger blocks
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    raw = str(tmp_path / "raw")
    make_seq(raw, seed, eol=eol)
    for k, protocol in enumerate(PROTOCOLS):
        argv = ["microlens", "--input", raw, "--images", "skip", "--interactions", "tsv", *protocol]
        mem = _convert(argv, str(tmp_path / f"mem{k}"), "memory")
        duck = _convert(argv, str(tmp_path / f"duck{k}"), "duckdb")
        _assert_same_tree(mem, duck)
        if k == 0:  # the random file exercises every sequence rule (else this test would prove little)
            import json

            with open(os.path.join(mem, "provenance.json"), encoding="utf-8") as f:
                prov = json.load(f)
            drops = prov["dropped"]["interactions"]
            for reason in ("malformed line (expected 2 fields)", "sequence line without items",
                           "repeated (user, item) pair: the earliest is kept (--dedup first)",
                           "item id holds a tab, line break or double quote"):
                assert drops[reason]["count"] > 0, reason
            assert any("repeat a user seen on an earlier line" in d for d in prov["detected"])
    assert _work_folders(str(tmp_path)) == []


def test_out_of_core_sequence_reader_streams_in_blocks(tmp_path, monkeypatch):
    """The sequence reader stages one block at a time (never the whole file), rows numbered across blocks, and
    grows the block only to fit the longest line."""
    raw = str(tmp_path / "raw")
    make_seq(raw, 7, n_lines=600)
    path = os.path.join(raw, "Rand_pairs.tsv")
    longest = max(len(line.encode()) + 1 for line in open(path, encoding="utf-8", newline=""))
    cols = outofcore.SequenceColumns(path)
    flags, state = outofcore._Flags(), {"malformed": [], "examples": []}
    with pytest.raises(outofcore._LineTooLong):
        list(outofcore._raw_batches(path, ["user", "items"], "\t", 0, cols, False, flags, state, longest // 2, None))
    block = 1 << (longest - 1).bit_length()
    blocks = list(outofcore._raw_batches(path, ["user", "items"], "\t", 0, cols, False, flags, state, block, None))
    assert len(blocks) > 20
    rn = [x for b in blocks for x in b.column("rn").to_pylist()]
    assert rn == list(range(state["rows"]))
    users, items, positions = interactions.read_sequences(path, _prov(raw))
    assert [x for b in blocks for x in b.column("i").to_pylist()] == items.to_pylist()
    assert [x for b in blocks for x in b.column("u").to_pylist()] == users.to_pylist()
    assert pa.types.is_integer(blocks[0].column("ti").type)


def _strings_followed_by(values: list[bytes], tail: bytes) -> pa.Array:
    """A string array whose data buffer holds ``tail`` right after its last string (as memory past a buffer may)."""
    offsets = np.cumsum([0] + [len(v) for v in values]).astype(np.int32)
    return pa.Array.from_buffers(pa.string(), len(values),
                                 [None, pa.py_buffer(offsets.tobytes()), pa.py_buffer(b"".join(values) + tail)])


@pytest.mark.parametrize("tail", [b"", b"a", b" ", b"\xff", b"\x80", b"\xe8"])
def test_sequence_split_ignores_the_bytes_after_the_last_line(tail):
    """Items end where the line ends, whatever byte lies after it in memory (pyarrow's split reads one past a
    string that ends in whitespace: this made the .tsv readers differ from run to run)."""
    lines = ["视频 ", "a b  ", "x\u3000", "c \x0bd\u00a0", "   ", "e"]
    users = pa.array([f"u{k} " for k in range(len(lines))])
    for last in range(1, len(lines) + 1):  # each line once as the last string of its buffer
        items = _strings_followed_by([x.encode() for x in lines[:last]], tail)
        got_users, flat, parents, lengths = interactions.split_sequence_lines(users[:last], items)
        expected = [x.split() for x in lines[:last]]  # Python's split: the same whitespace for these characters
        assert got_users.to_pylist() == [f"u{k}" for k in range(last)]
        assert lengths.tolist() == [len(e) for e in expected]
        assert flat.to_pylist() == [t for e in expected for t in e]
        assert parents.tolist() == [k for k, e in enumerate(expected) for _ in e]


def _prov(root: str):
    from dataset_converters.provenance import Provenance

    return Provenance("test", "test", root, {})


def test_auto_engine_picks_duckdb_for_large_tsv(tmp_path, monkeypatch):
    """``--engine auto`` applies the csv size rule to sequence files too."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    staged = []
    orig = outofcore.SequenceColumns.staged
    monkeypatch.setattr(outofcore.SequenceColumns, "staged", lambda self, *a: (staged.append(1), orig(self, *a)))
    argv = TSV_CASES["ninerec-qb-tsv"]
    mem = _convert(argv, str(tmp_path / "mem"), "auto")  # tiny file: in memory
    assert staged == []
    monkeypatch.setattr(outofcore, "MEMORY_PER_INPUT_BYTE", 1 << 40)  # every file "too large" for memory
    duck = _convert(argv, str(tmp_path / "duck"), "auto")
    assert staged == [1]
    _assert_same_tree(mem, duck)
