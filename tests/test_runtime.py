"""Run-time defaults: torch threads (RECBOLE_MM_THREADS, the user's own setting, the measured default) and the
cache folder (RECBOLE_MM_HOME, XDG_CACHE_HOME, ~/.cache)."""

import os
import subprocess
import sys

import pytest

from recbole_mm import paths, threads

PROBE = """
import os, sys
import recbole_mm, torch
{before}
from recbole_mm.threads import configure_threads
print(torch.get_num_threads(), configure_threads(), torch.get_num_threads())
"""


def _threads(before: str = "", **env) -> list:
    full = {k: v for k, v in os.environ.items() if k not in ("RECBOLE_MM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    full.update(env)
    proc = subprocess.run([sys.executable, "-c", PROBE.format(before=before)], env=full, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [int(x) for x in proc.stdout.split()]


def test_default_threads_when_nobody_chose():
    initial, returned, now = _threads()
    assert now == returned == threads.default_threads(initial)
    assert threads.default_threads(2) == threads.default_threads(1) == 1  # the measured 2-core default
    assert threads.default_threads(16) == 16  # larger machines: torch's own choice


def test_default_applies_to_torch_imported_before_recbole_mm():
    code = ("import torch; n = torch.get_num_threads(); import recbole_mm; from recbole_mm.threads import "
            "configure_threads, default_threads; print(configure_threads() == default_threads(n))")
    env = {k: v for k, v in os.environ.items() if k not in ("RECBOLE_MM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.stdout.strip() == "True", proc.stderr[-2000:]


def test_env_var_wins():
    assert _threads(RECBOLE_MM_THREADS="3")[1:] == [3, 3]
    assert _threads("torch.set_num_threads(2)", RECBOLE_MM_THREADS="3")[1:] == [3, 3]


def test_user_setting_is_kept():
    # torch.set_num_threads after import: kept (a count above torch's own default, so it is no default of ours)
    initial = _threads()[0]
    choice = initial + 1
    assert _threads(f"torch.set_num_threads({choice})")[1:] == [choice, choice]
    # OMP_NUM_THREADS: torch's own count follows it (torch caps it at the cores), and recbole_mm leaves it alone
    # where it would otherwise pick its own default
    n = _threads(OMP_NUM_THREADS=str(initial))
    assert n == [initial, initial, initial] and (initial > threads.SMALL_MACHINE or threads.default_threads(initial) != initial)


def test_bad_env_value_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("RECBOLE_MM_THREADS", "many")
    with pytest.raises(ValueError, match="RECBOLE_MM_THREADS='many'"):
        threads.threads_from_env()
    monkeypatch.setenv("RECBOLE_MM_THREADS", "0")
    with pytest.raises(ValueError, match=">= 1"):
        threads.threads_from_env()


def test_run_recbole_applies_the_thread_rule(monkeypatch, tiny_config):
    """run_recbole calls configure_threads before anything else."""
    import recbole_mm.quick_start as qs

    calls = []
    monkeypatch.setattr(qs, "configure_threads", lambda: calls.append("threads") or 1)
    monkeypatch.setattr(qs, "Config", lambda **kw: (_ for _ in ()).throw(RuntimeError("stop after threads")))
    with pytest.raises(RuntimeError, match="stop after threads"):
        qs.run_recbole(model="SASRec", dataset="mm-tiny", config_dict=tiny_config)
    with pytest.raises(RuntimeError, match="stop after threads"):
        qs.objective_function(config_dict=dict(tiny_config, model="SASRec", dataset="mm-tiny"))
    assert calls == ["threads", "threads"]


@pytest.mark.parametrize("env, expected", [
    ({"RECBOLE_MM_HOME": "/data/rmm", "XDG_CACHE_HOME": "/xdg"}, "/data/rmm"),
    ({"XDG_CACHE_HOME": "/xdg"}, "/xdg/recbole_mm"),
    ({"XDG_CACHE_HOME": "relative/dir"}, "~/.cache/recbole_mm"),  # the XDG spec: relative values are ignored
    ({}, "~/.cache/recbole_mm"),
])
def test_cache_root(monkeypatch, env, expected):
    for key in ("RECBOLE_MM_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert paths.cache_root() == os.path.expanduser(expected)


def test_embedded_datasets_live_in_the_cache(monkeypatch, tmp_path):
    from recbole_mm.data.embedded import embedded_dataset_dir

    monkeypatch.delenv("RECBOLE_MM_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert embedded_dataset_dir("ml-100k-mm") == os.path.join(str(tmp_path), "recbole_mm", "datasets", "ml-100k-mm")
