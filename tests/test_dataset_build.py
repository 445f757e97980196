"""The vectorised, memory-mapped sequential dataset build (recbole_mm/data/sequence_build.py) against RecBole.

Reference: RecBole 1.2.1's own ``SequentialDataset(config).build()`` (its per-row loop and splits), plus a plain
loop for the all-position windows. Every split, every field, values and dtypes. Then the cache: reuse,
invalidation, four processes at once, a SIGKILL at a random moment.
"""

import glob
import hashlib
import json
import os
import random

import numpy as np
import pytest
import torch

from recbole_mm.data import sequence_build as sb
from tests._procs import SEED, run_killed_after, run_together


# ------------------------------------------------------------------------------------------------ helpers
def _config(model, dataset, cfg):
    from recbole_mm.config import Config

    return Config(model=model, dataset=dataset, config_dict=dict(cfg, state="WARNING"))


def _stock(config):
    """RecBole's own build (its loop, its splits)."""
    from recbole.data.dataset import SequentialDataset

    return SequentialDataset(config).build()


def _ours(config):
    from recbole_mm.data.dataset import MMSequentialDataset

    ds = MMSequentialDataset(config)
    return ds, ds.build()


def _assert_same_interaction(a, b, where):
    assert list(a.interaction) == list(b.interaction), where
    for k in a.interaction:
        x, y = a[k], b[k]
        assert x.dtype == y.dtype, (where, k, x.dtype, y.dtype)
        assert x.shape == y.shape, (where, k, x.shape, y.shape)
        assert torch.equal(x, y), (where, k)


def _loop_window_ends(inter, uid, time, max_len):
    """Plain loop: per user, rows by (time, row); keep those whose rank from the user's last is a multiple of L."""
    users = inter[uid].tolist()
    times = inter[time].tolist() if time in inter else [0] * len(users)  # no timestamp: row order
    by_user = {}
    for r, u in enumerate(users):
        by_user.setdefault(u, []).append(r)
    keep = [False] * len(users)
    for rows in by_user.values():
        rows.sort(key=lambda r: (times[r], r))
        for k, r in enumerate(reversed(rows)):
            keep[r] = k % max_len == 0
    return torch.tensor(keep, dtype=torch.bool)


def _check_against_stock(model, dataset, cfg, all_position=False):
    config = _config(model, dataset, cfg)
    ref = _stock(config)
    parent, got = _ours(config)
    assert getattr(parent, "dataset_cache_folder", None), "the cache path was not taken"
    from recbole_mm.data.dataset import _count_training_items, training_user_item_keys

    counts, keys = _count_training_items(ref[0]), training_user_item_keys(ref[0])
    if all_position:
        r = ref[0]
        keep = _loop_window_ends(r.inter_feat, r.uid_field, r.time_field, r.max_item_list_len)
        ref = [r.copy(r.inter_feat[keep])] + list(ref[1:])
    for name, a, b in zip(("train", "valid", "test"), ref, got):
        _assert_same_interaction(a.inter_feat, b.inter_feat, f"{name} {cfg}")
        assert np.array_equal(b.train_item_counts, counts)
        assert np.array_equal(np.asarray(b.train_user_item_keys), keys)
        assert a.field2type == b.field2type and a.field2seqlen == b.field2seqlen
    return parent, got


def write_synthetic(root, name, seed=0, n_users=120, n_items=50, extra=True):
    """A random ``.inter``: users with 1..30 interactions (some with one), many equal timestamps (ties keep the
    file order), rows shuffled; optional float and token fields (more ``_list`` fields)."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, name)
    os.makedirs(folder, exist_ok=True)
    counts = rng.integers(1, 31, n_users)
    counts[:5] = 1
    rows = []
    for u in range(n_users):
        for _ in range(counts[u]):
            rows.append((f"u{u}", f"i{rng.integers(n_items)}", int(rng.integers(0, 12)), float(rng.random() * 5),
                         f"c{rng.integers(4)}"))
    rng.shuffle(rows)
    head = "user_id:token\titem_id:token\ttimestamp:float"
    if extra:
        head += "\trating:float\tcat:token"
    with open(os.path.join(folder, f"{name}.inter"), "w", encoding="utf-8") as f:
        f.write(head + "\n")
        for r in rows:
            f.write("\t".join(map(str, r if extra else r[:3])) + "\n")
    return folder


@pytest.fixture
def synth_root(tmp_path):
    root = str(tmp_path / "synth")
    write_synthetic(root, "syn", seed=SEED % 1000)
    write_synthetic(root, "syn-plain", seed=SEED % 1000 + 1, extra=False)
    return root


# ------------------------------------------------------------------------------------------------ equality
@pytest.mark.parametrize("max_len", [3, 20])
def test_fixture_dataset_equals_recbole(tiny_config, tmp_path, max_len):
    """mm-tiny (rating, timestamp: three list fields), leave-one-out, with truncation (L = 3) and without."""
    cfg = dict(tiny_config, MAX_ITEM_LIST_LENGTH=max_len, dataset_cache_dir=str(tmp_path / "cache"))
    _check_against_stock("SASRec", "mm-tiny", cfg)


def test_fixture_all_position_equals_recbole_then_windows(tiny_config, tmp_path):
    cfg = dict(tiny_config, MAX_ITEM_LIST_LENGTH=4, seq_mode="all_position", dataset_cache_dir=str(tmp_path / "c"))
    _check_against_stock("MoRec", "mm-tiny", cfg, all_position=True)


SPLITS = [
    {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "full"},
    {"split": {"LS": "valid_only"}, "order": "TO", "group_by": "user", "mode": "full"},
    {"split": {"LS": "test_only"}, "order": "TO", "group_by": "user", "mode": "full"},
    {"split": {"RS": [0.8, 0.1, 0.1]}, "order": "TO", "group_by": "user", "mode": "full"},
    {"split": {"RS": [0.6, 0.2, 0.2]}, "order": "TO", "group_by": None, "mode": "full"},
]


@pytest.mark.parametrize("eval_args", SPLITS, ids=lambda e: f"{list(e['split'].items())[0]}-{e['group_by']}")
@pytest.mark.parametrize("max_len", [1, 4])
def test_synthetic_dataset_equals_recbole(synth_root, tmp_path, eval_args, max_len):
    """Random users (some with 1 interaction), tied timestamps, extra float / token fields, every split."""
    cfg = dict(data_path=synth_root, MAX_ITEM_LIST_LENGTH=max_len, eval_args=eval_args,
               load_col={"inter": ["user_id", "item_id", "timestamp", "rating", "cat"]},
               dataset_cache_dir=str(tmp_path / "cache"), checkpoint_dir=str(tmp_path / "saved"))
    _check_against_stock("SASRec", "syn", cfg)


@pytest.mark.parametrize("seq_mode", ["prefix", "all_position"])
def test_synthetic_without_extra_fields_and_unused_timestamp(synth_root, tmp_path, seq_mode):
    """Only user / item / time loaded, the timestamp dropped from the splits (unused_col): its list stays."""
    cfg = dict(data_path=synth_root, MAX_ITEM_LIST_LENGTH=3, seq_mode=seq_mode,
               load_col={"inter": ["user_id", "item_id", "timestamp"]}, unused_col={"inter": ["timestamp"]},
               dataset_cache_dir=str(tmp_path / "cache"), checkpoint_dir=str(tmp_path / "saved"))
    parent, got = _check_against_stock("MoRec", "syn-plain", cfg, all_position=seq_mode == "all_position")
    assert "timestamp" not in got[0].inter_feat and "timestamp_list" in got[0].inter_feat


def test_data_augmentation_equals_recbole_loop(synth_root, tmp_path):
    """The vectorised ``data_augmentation`` (RecBole's build path, e.g. dataset_cache: False) equals the loop."""
    from recbole.data.dataset import SequentialDataset

    from recbole_mm.data.dataset import MMSequentialDataset

    cfg = dict(data_path=synth_root, MAX_ITEM_LIST_LENGTH=4, dataset_cache=False,
               load_col={"inter": ["user_id", "item_id", "timestamp", "rating", "cat"]},
               numerical_features=["rating"], checkpoint_dir=str(tmp_path / "saved"))
    config = _config("SASRec", "syn", cfg)
    ref, ours = SequentialDataset(config), MMSequentialDataset(config)
    ref._change_feat_format()
    ours._change_feat_format()
    assert ours.inter_feat["rating_list"].shape[-1] == 2  # numerical feature: [n, L, 2]
    _assert_same_interaction(ref.inter_feat, ours.inter_feat, "data_augmentation")
    for a, b in zip(SequentialDataset(config).build(), MMSequentialDataset(config).build()):
        _assert_same_interaction(a.inter_feat, b.inter_feat, "build without cache")


def test_split_rows_against_recbole_loops():
    """split_rows on random users against RecBole's own grouping loops (_grouped_index / leave-one-out / ratios)."""
    from recbole.data.dataset import Dataset

    rng = np.random.default_rng(SEED)
    users = rng.integers(0, 30, 500)
    fake = Dataset.__new__(Dataset)
    grouped = list(Dataset._grouped_index(fake, users.tolist()))
    for leave, mode in ((2, "valid_and_test"), (1, "valid_only")):
        ref = Dataset._split_index_by_leave_one_out(fake, grouped, leave)
        got = sb.split_rows(users, {"LS": mode}, "user")
        for r, g in zip(ref, got):
            assert list(r) == g.tolist()
    ratios = [0.7, 0.2, 0.1]
    ref = [[] for _ in ratios]
    for index in grouped:
        ids = Dataset._calcu_split_ids(fake, len(index), ratios)
        for part, a, b in zip(ref, [0] + ids, ids + [len(index)]):
            part.extend(index[a:b])
    for r, g in zip(ref, sb.split_rows(users, {"RS": ratios}, "user")):
        assert r == g.tolist()


# ------------------------------------------------------------------------------------------------ the cache
def _mapped_from(tensor, path):
    """Whether the tensor's memory lies in a mapping of ``path`` (/proc/self/maps)."""
    address = tensor.data_ptr()
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and os.path.realpath(parts[5]) == os.path.realpath(path):
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                if lo <= address < hi:
                    return True
    return False


def _count_builds(monkeypatch):
    calls = []
    real = sb.build_arrays

    def counting(*args, **kwargs):
        calls.append(kwargs.get("max_len"))
        return real(*args, **kwargs)

    monkeypatch.setattr(sb, "build_arrays", counting)
    return calls


def test_cache_is_reused_then_invalidated(synth_root, tmp_path, monkeypatch):
    calls = _count_builds(monkeypatch)
    cache = str(tmp_path / "cache")
    cfg = dict(data_path=synth_root, MAX_ITEM_LIST_LENGTH=4, dataset_cache_dir=cache,
               load_col={"inter": ["user_id", "item_id", "timestamp", "rating", "cat"]},
               checkpoint_dir=str(tmp_path / "saved"))
    first, a = _ours(_config("SASRec", "syn", cfg))
    assert calls == [4] and first.dataset_cache_built
    second, b = _ours(_config("SASRec", "syn", cfg))
    assert calls == [4] and not second.dataset_cache_built  # read from the cache
    assert second.dataset_cache_folder == first.dataset_cache_folder
    for x, y in zip(a, b):
        _assert_same_interaction(x.inter_feat, y.inter_feat, "reuse")
    # the split's big field is a memory map of the cache file (not a copy in this process)
    assert _mapped_from(b[0].inter_feat["item_id_list"], os.path.join(second.dataset_cache_folder,
                                                                        "item_id_list.npy"))

    _, c = _ours(_config("SASRec", "syn", dict(cfg, MAX_ITEM_LIST_LENGTH=2)))  # another key
    assert calls == [4, 2] and c[0].inter_feat["item_id_list"].shape[1] == 2

    inter = os.path.join(synth_root, "syn", "syn.inter")
    st = os.stat(inter)
    os.utime(inter, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched (a re-conversion)
    _ours(_config("SASRec", "syn", cfg))
    assert calls == [4, 2, 4]

    write_synthetic(synth_root, "syn", seed=SEED % 1000 + 7)  # rewritten with other rows
    ds, d = _ours(_config("SASRec", "syn", cfg))
    assert calls == [4, 2, 4, 4]
    ref = _stock(_config("SASRec", "syn", cfg))
    for x, y in zip(ref, d):
        _assert_same_interaction(x.inter_feat, y.inter_feat, "after rewrite")
    assert len(glob.glob(os.path.join(cache, "seq-*"))) == 4  # one folder per key, nothing else
    assert not [f for f in os.listdir(cache) if f.startswith(".")]


def _tree_digest(folder):
    out = {}
    for f in sorted(os.listdir(folder)):
        with open(os.path.join(folder, f), "rb") as fh:
            out[f] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _build_code(cfg):
    return f"""
        import json, torch
        torch.set_num_threads(1)
        from recbole_mm.config import Config
        from recbole_mm.data.dataset import MMSequentialDataset
        config = Config(model="SASRec", dataset="syn", config_dict={cfg!r})
        dataset = MMSequentialDataset(config)
        barrier()
        splits = dataset.build()
        print(json.dumps({{"built": dataset.dataset_cache_built, "folder": dataset.dataset_cache_folder,
                          "rows": [len(s) for s in splits]}}))
    """


@pytest.fixture
def synth_cfg(synth_root, tmp_path):
    return dict(data_path=synth_root, MAX_ITEM_LIST_LENGTH=4, state="WARNING",
                load_col={"inter": ["user_id", "item_id", "timestamp", "rating", "cat"]},
                dataset_cache_dir=str(tmp_path / "cache"), checkpoint_dir=str(tmp_path / "saved"))


@pytest.fixture
def reference_cache(synth_cfg, tmp_path):
    """An uninterrupted build in this process (another cache folder): its files' digests."""
    parent, _ = _ours(_config("SASRec", "syn", dict(synth_cfg, dataset_cache_dir=str(tmp_path / "ref"))))
    return os.path.basename(parent.dataset_cache_folder), _tree_digest(parent.dataset_cache_folder)


def test_four_processes_build_one_cache(synth_cfg, reference_cache, tmp_path):
    logdir = tmp_path / "logs"
    logdir.mkdir()
    workers = run_together(_build_code(synth_cfg), str(logdir), 4)
    outs = []
    for w in workers:
        assert w.proc.returncode == 0, w.stderr[-3000:]
        outs.append(json.loads(w.stdout.strip().splitlines()[-1]))
    assert sum(o["built"] for o in outs) == 1  # one builder, three readers
    assert len({json.dumps(o["rows"]) for o in outs}) == 1
    cache = synth_cfg["dataset_cache_dir"]
    assert os.listdir(cache) == [reference_cache[0]]  # no lock, no temporary folder
    assert _tree_digest(os.path.join(cache, reference_cache[0])) == reference_cache[1]


@pytest.mark.parametrize("k", range(2))
def test_cache_build_killed_at_a_random_moment(synth_cfg, reference_cache, tmp_path, k, caplog):
    logdir = tmp_path / "logs"
    logdir.mkdir()
    rnd = random.Random(SEED * 10 + k)
    # the build itself takes ~0.1-0.3 s here: kill anywhere in it (or after it)
    delay = rnd.uniform(0, 0.4)
    run_killed_after(_build_code(synth_cfg), str(logdir), "killed", delay)
    with caplog.at_level("INFO"):
        parent, _ = _ours(_config("SASRec", "syn", synth_cfg))
    cache = synth_cfg["dataset_cache_dir"]
    assert os.listdir(cache) == [reference_cache[0]], f"seed {SEED}, delay {delay:.3f}"
    assert _tree_digest(os.path.join(cache, reference_cache[0])) == reference_cache[1], f"seed {SEED} {delay:.3f}"


def test_killed_at_publication_leaves_nothing_and_rebuilds(synth_cfg, reference_cache, tmp_path, caplog):
    """SIGKILL right before the rename that publishes the folder: the rerun removes the temporary folder."""
    from tests._procs import run_killed_at

    logdir = tmp_path / "logs"
    logdir.mkdir()
    code = _build_code(synth_cfg).replace("barrier()", "kill_at_replace(1)\n        barrier()")
    run_killed_at(code, str(logdir), "killed")
    cache = synth_cfg["dataset_cache_dir"]
    from recbole_mm.atomic import TMP_MARK

    assert [f for f in os.listdir(cache) if TMP_MARK in f]  # the killed build's temporary folder
    with caplog.at_level("INFO"):
        parent, _ = _ours(_config("SASRec", "syn", synth_cfg))
    assert parent.dataset_cache_built
    assert "removed what an interrupted" in caplog.text
    assert os.listdir(cache) == [reference_cache[0]]
    assert _tree_digest(os.path.join(cache, reference_cache[0])) == reference_cache[1]


# ------------------------------------------------------------------------------------------------ catalogue
def test_catalogue_reads_the_inter_file_once_per_version(tmp_path, monkeypatch):
    """``.inter`` items (also those without a ``.item`` row) come from a sidecar after the first read; a changed
    ``.inter`` is read again."""
    from recbole_mm.data import content

    folder = tmp_path / "cat"
    folder.mkdir()
    (folder / "cat.inter").write_text("user_id:token\titem_id:token\nu\ta\nu\tc\n", encoding="utf-8")
    (folder / "cat.item").write_text("item_id:token\ttitle:token_seq\na\tA\nb\tB\n", encoding="utf-8")
    read = []
    real = content.read_atomic

    def spy(path, *args, **kwargs):
        read.append(os.path.basename(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(content, "read_atomic", spy)
    assert content.catalogue_tokens(str(folder), "cat") == ["a", "b", "c"]
    assert sorted(read) == ["cat.inter", "cat.item"]
    read.clear()
    assert content.catalogue_tokens(str(folder), "cat") == ["a", "b", "c"]
    assert read == ["cat.item"]  # the .inter items came from the sidecar
    (folder / "cat.inter").write_text("user_id:token\titem_id:token\nu\ta\nu\tz\n", encoding="utf-8")
    os.utime(folder / "cat.inter", ns=(1, 10**9))  # a re-conversion (new mtime)
    read.clear()
    assert content.catalogue_tokens(str(folder), "cat") == ["a", "b", "z"]
    assert sorted(read) == ["cat.inter", "cat.item"]


def test_split_the_cache_does_not_reproduce_runs_recbole_code(synth_root, tmp_path):
    """A time-based split (TS) is not cached: RecBole's build() runs (with the vectorised augmentation)."""
    eval_args = {"split": {"TS": [0.8, 0.1, 0.1]}, "order": "TO", "group_by": "user", "mode": "full"}
    cfg = dict(data_path=synth_root, MAX_ITEM_LIST_LENGTH=3, eval_args=eval_args,
               load_col={"inter": ["user_id", "item_id", "timestamp", "rating"]},
               dataset_cache_dir=str(tmp_path / "cache"), checkpoint_dir=str(tmp_path / "saved"))
    config = _config("SASRec", "syn", cfg)
    parent, got = _ours(config)
    assert getattr(parent, "dataset_cache_folder", None) is None and not os.path.exists(tmp_path / "cache")
    for a, b in zip(_stock(config), got):
        _assert_same_interaction(a.inter_feat, b.inter_feat, "TS")
