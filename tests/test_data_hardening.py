"""Review findings on the data layer, each checked against an independent computation:

1. the ``.inter`` C-parser read (``MMDatasetMixin._load_feat``) changes nothing for reads in other threads;
2. its float columns equal RecBole's own read (pandas' Python parser) value for value, overflow and rounding
   included;
3. ``catalogue_tokens`` reads a new ``.inter`` once when several processes ask at once;
4. saved dataloaders made from other dataset files are not loaded.
"""

import json
import os
import threading

import numpy as np
import pandas
import pytest

from tests._procs import run_together


def _config(model, dataset, root, **extra):
    from recbole_mm.config import Config

    cfg = dict(data_path=str(root), state="WARNING", show_progress=False, checkpoint_dir=str(root / "saved"))
    cfg.update(extra)
    return Config(model=model, dataset=dataset, config_dict=cfg)


def _write(folder, name, suffix, header, rows):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.{suffix}"
    path.write_text("\t".join(header) + "\n" + "".join("\t".join(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _python_engine(path):
    """RecBole's read of an atomic file, written out: pandas' Python parser with RecBole's dtype map."""
    with open(path, encoding="utf-8") as f:
        head = f.readline().rstrip("\n").split("\t")
    dtype = {h: np.float64 if h.endswith(":float") else str for h in head}
    df = pandas.read_csv(path, delimiter="\t", dtype=dtype, engine="python")
    df.columns = [h.split(":")[0] for h in head]
    return df


def _same_floats(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return a.shape == b.shape and bool(np.all((a.view(np.int64) == b.view(np.int64)) | (np.isnan(a) & np.isnan(b))))


def _assert_same_frame(got, ref):
    assert list(got.columns) == list(ref.columns)
    for c in ref.columns:
        if ref[c].dtype == np.float64:
            assert got[c].dtype == np.float64, c
            assert _same_floats(got[c], ref[c]), (c, got[c].tolist(), ref[c].tolist())  # bit for bit (-0.0, NaN)
        else:
            assert got[c].tolist() == ref[c].tolist(), c


# ------------------------------------------------------------------------------- 1. C parser, one thread only
# A value the C parser (round-trip) and the Python parser read differently: shows which parser read a file.
TELLTALE = "0.30000000000000004"  # Python parser: 0.3 (pandas' precise_xstrtod); C round_trip: 0.30000000000000004


@pytest.fixture
def thread_dataset(tmp_path):
    folder = tmp_path / "th"
    inter = _write(folder, "th", "inter", ["user_id:token", "item_id:token", "timestamp:float"],
                   [("u1", "a", "1"), ("u1", "b", "2"), ("u2", "a", TELLTALE), ("u2", "c", "4")])
    item = _write(folder, "th", "item", ["item_id:token", "score:float"], [("a", TELLTALE), ("b", "1.5"), ("c", "2")])
    from recbole_mm.data.dataset import MMDataset

    ds = MMDataset(_config("BPR", "th", tmp_path, load_col={"inter": ["user_id", "item_id", "timestamp"],
                                                           "item": ["item_id", "score"]}))
    return ds, inter, item


class _ReadSpy:
    """``pandas.read_csv`` that records (thread, file, engine) and can hold a thread inside a given read."""

    def __init__(self, monkeypatch):
        self.calls, self.hold = [], {}
        real = pandas.read_csv

        def read_csv(path, *args, **kwargs):
            name = threading.current_thread().name
            self.calls.append((name, os.path.basename(str(path)), kwargs.get("engine")))
            entered, release = self.hold.get(name, (None, None))
            if entered is not None:
                entered.set()
                release.wait(10)  # a design that serialises the threads ends the wait by the timeout
            return real(path, *args, **kwargs)

        monkeypatch.setattr(pandas, "read_csv", read_csv)

    def holding(self, thread_name):
        entered, release = threading.Event(), threading.Event()
        self.hold[thread_name] = (entered, release)
        return entered, release


def _run_threads(*threads):
    errors = []

    def wrap(fn):
        def run():
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)
        return run

    ts = [threading.Thread(target=wrap(fn), name=name) for name, fn in threads]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert not errors, errors


def test_item_read_in_another_thread_keeps_recboles_parser(thread_dataset, monkeypatch):
    """Thread A is inside its ``.inter`` read (C parser) while thread B reads a ``.item`` file: B gets RecBole's
    Python parser (its values equal pandas' Python parser's, not the C parser's)."""
    from recbole.utils import FeatureSource

    ds, inter, item = thread_dataset
    spy = _ReadSpy(monkeypatch)
    a_inside, a_release = spy.holding("A")
    got = {}

    def read_inter():
        got["inter"] = ds._load_feat(inter, FeatureSource.INTERACTION)

    def read_item():
        assert a_inside.wait(10)
        try:
            got["item"] = ds._load_feat(item, FeatureSource.ITEM)
        finally:
            a_release.set()

    _run_threads(("A", read_inter), ("B", read_item))
    assert ("B", "th.item", "python") in spy.calls
    _assert_same_frame(got["item"], _python_engine(item))
    assert got["item"]["score"][0] == 0.3  # the Python parser's value, not 0.30000000000000004
    _assert_same_frame(got["inter"], _python_engine(inter))


def test_two_inter_reads_at_once_leave_recboles_parser_in_place(thread_dataset, monkeypatch):
    """Two threads read ``.inter`` files with overlapping reads (A starts, B starts, A ends, B ends); afterwards a
    ``.item`` read in this thread gets the Python parser (with a module-global swap, B would restore A's wrapper)."""
    from recbole.utils import FeatureSource

    ds, inter, item = thread_dataset
    spy = _ReadSpy(monkeypatch)
    a_inside, a_release = spy.holding("A")
    b_inside, b_release = spy.holding("B")
    a_done = threading.Event()
    got = {}

    def read_a():
        try:
            got["A"] = ds._load_feat(inter, FeatureSource.INTERACTION)
        finally:
            a_done.set()

    def read_b():
        assert a_inside.wait(10)
        got["B"] = ds._load_feat(inter, FeatureSource.INTERACTION)

    def conduct():  # A waits until B is inside its read; B leaves its read after A has finished
        b_inside.wait(10)
        a_release.set()
        a_done.wait(30)
        b_release.set()

    _run_threads(("A", read_a), ("B", read_b), ("C", conduct))
    spy.calls.clear()
    after = ds._load_feat(item, FeatureSource.ITEM)
    assert [c[2] for c in spy.calls] == ["python"]
    _assert_same_frame(after, _python_engine(item))
    for name in ("A", "B"):
        _assert_same_frame(got[name], _python_engine(inter))


# ------------------------------------------------------------------------------------------ 2. float values
# One column per conversion path of pandas' Python parser (RecBole's read):
FLOAT_COLUMNS = {
    "ints": ["-0", "7", "-00", "12", "9007199254740993"],  # every value an integer: int64, then float (-0 is 0.0)
    "xstrtod": ["-0", TELLTALE, "0.1234567890123456789", "", "2.5"],  # pandas' precise_xstrtod (not round-trip)
    "overflow": ["1e400", TELLTALE, "-0", "NAN", "1.7976931348623159e308"],  # a value defeats it: float() for all
    "specials": ["-1e400", "1e-400", "inf", "+nan", "1_000"],
    "nan": ["nan", "NA", "null", "-inf", " 1.5"],
    "boolean": ["True", "False", "True", "False", "True"],  # pandas' boolean inference: 1.0 / 0.0
}


@pytest.fixture
def float_folder(tmp_path):
    header = ["user_id:token", "item_id:token"] + [f"{c}:float" for c in FLOAT_COLUMNS]
    rows = [(f"u{r % 2}", f"i{r}") + tuple(v[r] for v in FLOAT_COLUMNS.values()) for r in range(5)]
    inter = _write(tmp_path / "fl", "fl", "inter", header, rows)
    return tmp_path, inter


@pytest.mark.parametrize("chunk_rows", [1_000_000, 2])
def test_float_fields_read_as_recbole_reads_them(float_folder, monkeypatch, chunk_rows):
    """The ``.inter`` DataFrame of the fast read equals pandas' Python parser's, bit for bit (NaN-aware), for
    overflow, underflow, infinities, NaN spellings, integers, 17+ digit values and booleans; in one chunk or in
    chunks of two rows (a column's conversion depends on all its values)."""
    from recbole.utils import FeatureSource

    from recbole_mm.data import csv_read
    from recbole_mm.data.dataset import MMDataset

    monkeypatch.setattr(csv_read, "_CHUNK_ROWS", chunk_rows)
    root, inter = float_folder
    ds = MMDataset(_config("BPR", "fl", root, load_col={"inter": ["user_id", "item_id"]}))
    ds.config["load_col"] = None  # every column of the file
    got = ds._load_feat(inter, FeatureSource.INTERACTION)
    ref = _python_engine(inter)
    _assert_same_frame(got, ref)
    assert ref["ints"][0] == 0 and not np.signbit(ref["ints"][0])  # what the reference holds, for the record
    assert ref["xstrtod"][1] == 0.3 and ref["overflow"][1] == 0.30000000000000004 and ref["overflow"][0] == np.inf


VOCABULARY = sorted({v for column in FLOAT_COLUMNS.values() for v in column} | {
    "18446744073709551615", "9223372036854775808", "-9223372036854775809", "-9223372036854775808", "123456789012345678901234567890", "0x10",
    "1.5.1", "N/A", "None", "<NA>", "-nan", "Inf", "4.9e-324", "2.4e-324", "1e20", "0"})
COMMON = ["7", "12", "-3", "2.5", TELLTALE, "-0", "9007199254740993"]


def test_random_float_columns_read_as_recbole_reads_them(tmp_path, monkeypatch):
    """Random columns mixing the values above with ordinary ones, in random chunk sizes: the fast read's values
    (or its error) are those of pandas' Python parser with RecBole's dtype map."""
    import random

    from recbole_mm.data import csv_read

    rng = random.Random(0)
    path = str(tmp_path / "r.inter")
    head = ["u:token", "x:float", "y:float"]
    for trial in range(300):
        monkeypatch.setattr(csv_read, "_CHUNK_ROWS", rng.choice([1, 2, 3, 1000]))
        n, p = rng.randint(0, 7), rng.random()
        rows = [(f"a{r}", rng.choice(VOCABULARY) if rng.random() < p / 2 else rng.choice(COMMON),
                 rng.choice(["1", "2.5", "-0", "3", "NA"])) for r in range(n)]
        _write(tmp_path, "r", "inter", head, rows)
        dtype = {"u:token": str, "x:float": np.float64, "y:float": np.float64}
        kwargs = dict(delimiter="\t", usecols=head, dtype=dtype, encoding="utf-8", engine="python")  # RecBole's call
        try:
            ref = pandas.read_csv(path, **kwargs)
        except ValueError:
            with pytest.raises(ValueError):
                csv_read.read_csv_c(pandas, (path,), kwargs)
            continue
        got = csv_read.read_csv_c(pandas, (path,), kwargs)
        assert list(got.dtypes) == list(ref.dtypes) and (got.index == ref.index).all(), rows
        _assert_same_frame(got, ref)


def test_float_columns_keep_their_place_whatever_the_dtype_order(tmp_path):
    """Float columns go back to their file position even when the dtype map lists them in another order."""
    from recbole_mm.data import csv_read

    head = ["u:token", "x:float", "y:float", "i:token"]
    _write(tmp_path, "o", "inter", head, [("a", "1.5", "-0", "i1"), ("b", "1e400", "2", "i2")])
    kwargs = dict(delimiter="\t", usecols=head, encoding="utf-8", engine="python",
                  dtype={"y:float": np.float64, "i:token": str, "x:float": np.float64, "u:token": str})
    path = str(tmp_path / "o.inter")
    _assert_same_frame(csv_read.read_csv_c(pandas, (path,), kwargs), pandas.read_csv(path, **kwargs))


@pytest.mark.parametrize("rows", [1, 1000])
def test_int64_extremes_among_floats_read_as_recbole_reads_them(tmp_path, monkeypatch, rows):
    """An integer chunk holding int64's minimum (whose abs() overflows) followed by a float chunk."""
    from recbole_mm.data import csv_read

    monkeypatch.setattr(csv_read, "_CHUNK_ROWS", rows)
    head = ["u:token", "x:float"]
    values = ["-9223372036854775808", "9223372036854775807", "9007199254740993", "0.5"]
    _write(tmp_path, "m", "inter", head, [(f"u{k}", v) for k, v in enumerate(values)])
    path = str(tmp_path / "m.inter")
    kwargs = dict(delimiter="\t", usecols=head, dtype={"u:token": str, "x:float": np.float64}, encoding="utf-8",
                  engine="python")
    _assert_same_frame(csv_read.read_csv_c(pandas, (path,), kwargs), pandas.read_csv(path, **kwargs))


@pytest.mark.parametrize("broken", ["signature", "moved", "values"])
def test_changed_pandas_internals_fall_back_to_recboles_reader(tmp_path, monkeypatch, broken):
    """If the pandas internals the conversion calls change (another signature, moved, or no longer what the Python
    parser does), the read is RecBole's own call (same values), not a silently different conversion."""
    from recbole_mm.data import csv_read

    def changed(values):
        if broken == "signature":
            raise TypeError("maybe_convert_numeric() missing 1 required keyword-only argument")
        if broken == "moved":
            raise ImportError("cannot import name 'STR_NA_VALUES' from 'pandas._libs.parsers'")
        return np.array([float(v) if isinstance(v, str) else np.nan for v in values])  # not the parser's rounding

    monkeypatch.setattr(csv_read, "_convert_numeric", changed)
    monkeypatch.setattr(csv_read, "_PROBE", None)
    head = ["u:token", "x:float"]
    _write(tmp_path, "p", "inter", head, [("a", TELLTALE), ("b", "2.5")])
    path = str(tmp_path / "p.inter")
    kwargs = dict(delimiter="\t", usecols=head, dtype={"u:token": str, "x:float": np.float64}, encoding="utf-8",
                  engine="python")
    calls = []
    real_read = pandas.read_csv
    monkeypatch.setattr(pandas, "read_csv", lambda *a, **k: (calls.append(k.get("engine")), real_read(*a, **k))[1])
    got = csv_read.read_csv_c(pandas, (path,), kwargs)
    assert csv_read._PROBE is False and calls[-1] == "python"
    _assert_same_frame(got, real_read(path, **kwargs))
    assert got["x:float"][0] == 0.3  # the Python parser's value, not float()'s


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf - inf in the NaN fill
def test_float_fields_equal_stock_recbole_dataset(float_folder):
    """The whole dataset (id remapping, NaN filling, ...) equals stock RecBole ``Dataset``'s on the same file."""
    from recbole.data.dataset import Dataset

    from recbole_mm.data.dataset import MMDataset

    root, _ = float_folder
    config = _config("BPR", "fl", root, load_col={"inter": ["user_id", "item_id"] + list(FLOAT_COLUMNS)})
    ours, stock = MMDataset(config).inter_feat, Dataset(config).inter_feat
    _assert_same_frame(ours, stock)


# ------------------------------------------------------------------------------------- 3. catalogue, 4 processes
def _catalogue_code(folder):
    return f"""
        import json, os, time
        from recbole_mm.data import content
        real = content.read_atomic

        def counted(path, *args, **kwargs):
            if path.endswith(".inter"):
                with open(os.path.join({folder!r}, "..", "inter-reads.txt"), "a") as f:
                    f.write(str(os.getpid()) + "\\n")
                time.sleep(0.5)  # a long read: without a lock, every process would be reading now
            return real(path, *args, **kwargs)

        content.read_atomic = counted
        barrier()
        print(json.dumps(content.catalogue_tokens({folder!r}, "cat")))
    """


def test_four_processes_read_the_new_inter_once(tmp_path):
    folder = tmp_path / "data" / "cat"
    inter_rows = [(f"u{k % 7}", f"i{(k * 13) % 41:02d}") for k in range(300)]
    _write(folder, "cat", "inter", ["user_id:token", "item_id:token"], inter_rows)
    _write(folder, "cat", "item", ["item_id:token", "title:token_seq"], [("i00", "a"), ("zz", "only in item")])
    expected = sorted({r[1] for r in inter_rows} | {"i00", "zz"})  # the files' item ids, counted here
    logdir = tmp_path / "logs"
    logdir.mkdir()
    workers = run_together(_catalogue_code(str(folder)), str(logdir), 4)
    for w in workers:
        assert w.proc.returncode == 0, w.stderr[-3000:]
        assert json.loads(w.stdout.strip().splitlines()[-1]) == expected
    reads = (tmp_path / "data" / "inter-reads.txt").read_text().split()
    assert len(reads) == 1, reads  # one process read the .inter; the three others read its list
    cache = folder / "dataset_cache"
    assert os.listdir(cache) == ["cat.inter.items.json"]  # no temporary file, no lock
    assert json.loads((cache / "cat.inter.items.json").read_text())["tokens"] == sorted({r[1] for r in inter_rows})


def test_catalogue_without_a_writable_cache_folder(tmp_path):
    """No lock and no sidecar possible (``dataset_cache`` is a file here): the tokens all the same."""
    from recbole_mm.data.content import catalogue_tokens

    folder = tmp_path / "ro"
    _write(folder, "ro", "inter", ["user_id:token", "item_id:token"], [("u", "b"), ("u", "a")])
    (folder / "dataset_cache").write_text("not a folder")
    assert catalogue_tokens(str(folder), "ro") == ["a", "b"]
    assert catalogue_tokens(str(folder), "ro") == ["a", "b"]
    assert sorted(os.listdir(folder)) == ["dataset_cache", "ro.inter"]


# ------------------------------------------------------------------------------------ 4. saved dataloaders
def _dl_rows(n_users, n_items, seed):
    rng = np.random.default_rng(seed)
    pairs = sorted({(int(u), int(i)) for u, i in zip(rng.integers(0, n_users, 400), rng.integers(0, n_items, 400))})
    return [(f"u{u}", f"i{i}", str(t)) for t, (u, i) in enumerate(pairs)]


def _prepare(root, monkeypatch, entry="recbole_mm"):
    """``create_dataset`` + ``data_preparation`` as ``entry`` calls it (ours, or RecBole's own ``run_recbole``, which
    finds it in its quick_start module); returns the loaders and how many times ``build`` ran."""
    import importlib

    from recbole.utils import init_seed

    from recbole_mm.data import dataset as mm_dataset
    from recbole_mm.data.utils import create_dataset

    data_preparation = importlib.import_module(
        "recbole_mm.data.utils" if entry == "recbole_mm" else "recbole.quick_start.quick_start").data_preparation

    builds = []
    real = mm_dataset.MMDataset.build

    def build(self):
        builds.append(1)
        return real(self)

    monkeypatch.setattr(mm_dataset.MMDataset, "build", build)
    config = _config("BPR", "dl", root, save_dataloaders=True, load_col={"inter": ["user_id", "item_id", "timestamp"]})
    init_seed(config["seed"], True)  # as a run does: the split's random order is the same in every call
    loaders = data_preparation(config, create_dataset(config))
    return loaders, len(builds)


def _rows_in_loaders(loaders):
    return sum(len(d._dataset.inter_feat) for d in loaders)


@pytest.mark.parametrize("change", ["rewritten", "touched"])
@pytest.mark.parametrize("entry", ["recbole_mm", "recbole"])
def test_saved_dataloaders_of_changed_files_are_rebuilt(tmp_path, monkeypatch, caplog, change, entry):
    folder = tmp_path / "dl"
    rows = _dl_rows(30, 40, 0)
    inter = _write(folder, "dl", "inter", ["user_id:token", "item_id:token", "timestamp:float"], rows)
    loaders, builds = _prepare(tmp_path, monkeypatch, entry)
    saved = tmp_path / "saved" / "dl-for-BPR-dataloader.pth"
    assert builds == 1 and saved.exists() and _rows_in_loaders(loaders) == len(rows)

    loaders, builds = _prepare(tmp_path, monkeypatch, entry)  # same files: the saved dataloaders are loaded
    assert builds == 0 and _rows_in_loaders(loaders) == len(rows)

    if change == "rewritten":
        rows = _dl_rows(30, 40, 1)
        _write(folder, "dl", "inter", ["user_id:token", "item_id:token", "timestamp:float"], rows)
    st = os.stat(inter)
    os.utime(inter, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a re-conversion (same content when touched)
    with caplog.at_level("WARNING"):
        loaders, builds = _prepare(tmp_path, monkeypatch, entry)
    assert builds == 1  # built again, from the files as they are now
    assert _rows_in_loaders(loaders) == len(rows)
    assert "dl.inter" in caplog.text and "Delete " in caplog.text

    loaders, builds = _prepare(tmp_path, monkeypatch, entry)  # the rebuild was saved: loaded again
    assert builds == 0 and _rows_in_loaders(loaders) == len(rows)


@pytest.mark.parametrize("saved_by", ["recbole", "killed writer"])
def test_saved_dataloaders_without_a_record_or_unreadable_are_rebuilt(tmp_path, monkeypatch, caplog, saved_by):
    """Saved by RecBole's own pipeline (no record of the files: as the saved-dataset path, not trusted), or
    truncated (RecBole writes the file in place): built again with a warning."""
    from recbole.data.utils import data_preparation as recbole_data_preparation  # RecBole's own (never patched)
    from recbole.data.dataset import Dataset

    rows = _dl_rows(30, 40, 2)
    _write(tmp_path / "dl", "dl", "inter", ["user_id:token", "item_id:token", "timestamp:float"], rows)
    config = _config("BPR", "dl", tmp_path, save_dataloaders=True,
                     load_col={"inter": ["user_id", "item_id", "timestamp"]})
    recbole_data_preparation(config, Dataset(config))
    saved = tmp_path / "saved" / "dl-for-BPR-dataloader.pth"
    assert saved.exists()
    if saved_by == "killed writer":
        saved.write_bytes(saved.read_bytes()[:1000])
    with caplog.at_level("WARNING"):
        loaders, builds = _prepare(tmp_path, monkeypatch)
    assert builds == 1 and _rows_in_loaders(loaders) == len(rows)
    assert ("without the record" if saved_by == "recbole" else "unreadable") in caplog.text
    loaders, builds = _prepare(tmp_path, monkeypatch)
    assert builds == 0 and _rows_in_loaders(loaders) == len(rows)


def _first_epoch_order(loader) -> list:
    import torch

    torch.manual_seed(12345)  # the global RNG differs from the loaders' generators (seeded by the config's seed)
    return [int(x) for batch in loader for x in batch[loader._dataset.uid_field]]


def test_the_saving_run_shuffles_as_the_loading_runs(tmp_path, monkeypatch):
    """The run that saves the dataloaders keeps their generators: its first epoch's batch order is that of a run
    loading the saved file and of a run that saves nothing (RecBole 1.2.1's save set them to None: the saving run
    shuffled with the global RNG)."""
    rows = _dl_rows(30, 40, 3)
    _write(tmp_path / "dl", "dl", "inter", ["user_id:token", "item_id:token", "timestamp:float"], rows)
    saving, builds = _prepare(tmp_path, monkeypatch)
    assert builds == 1 and saving[0].generator is not None and saving[0].sampler.generator is saving[0].generator
    loading, builds = _prepare(tmp_path, monkeypatch)
    assert builds == 0
    os.remove(tmp_path / "saved" / "dl-for-BPR-dataloader.pth")
    from recbole.utils import init_seed

    from recbole_mm.data.utils import create_dataset, data_preparation

    config = _config("BPR", "dl", tmp_path, load_col={"inter": ["user_id", "item_id", "timestamp"]})
    init_seed(config["seed"], True)
    plain = data_preparation(config, create_dataset(config))
    order = _first_epoch_order(plain[0])
    assert len(order) == len(plain[0]._dataset.inter_feat) > 0
    assert _first_epoch_order(saving[0]) == order
    assert _first_epoch_order(loading[0]) == order

