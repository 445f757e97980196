"""Each shim of recbole_mm.compat has a test that fails without it."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from recbole.config.configurator import Config as RecBoleConfig

import recbole_mm
from recbole_mm import compat
from recbole_mm.config import Config


def test_numpy_aliases_needed_by_recbole_config(monkeypatch):
    monkeypatch.delattr(np, "float_")
    with pytest.raises(AttributeError):
        RecBoleConfig(model="BPR", dataset="ml-100k", config_dict={"state": "WARNING"})
    compat.apply_numpy_aliases()
    cfg = RecBoleConfig(model="BPR", dataset="ml-100k", config_dict={"state": "WARNING"})
    assert cfg["model"] == "BPR" and np.float_ is np.float64


RAY_TENSORBOARD = "import numpy; from ray.tune.logger import tensorboardx"


@pytest.mark.parametrize("with_hook", [False, True])
def test_ray_worker_setup_hook_makes_ray_importable(with_hook):
    """A Ray worker starts a fresh interpreter: without the hook, ray's logger import fails on numpy 2."""
    hook = compat.ray_init_kwargs()["runtime_env"]["worker_process_setup_hook"]
    code = RAY_TENSORBOARD
    if with_hook:
        code = f"from {hook.__module__} import {hook.__name__}; {hook.__name__}(); " + code
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ})
    if with_hook:
        assert proc.returncode == 0, proc.stderr[-2000:]
    else:
        assert proc.returncode != 0 and "bool8" in proc.stderr


def test_ray_init_kwargs_keeps_user_runtime_env():
    kw = compat.ray_init_kwargs(num_cpus=2, runtime_env={"env_vars": {"A": "1"}})
    assert kw["num_cpus"] == 2
    assert kw["runtime_env"]["env_vars"]["A"] == "1"
    assert kw["runtime_env"]["worker_process_setup_hook"] is compat.apply_numpy_aliases


def test_recbole_checkpoint_needs_trusted_load(tmp_path):
    """RecBole pickles its Config into checkpoints (protocol 4): torch>=2.6's default load refuses them."""
    import recbole.trainer.trainer as trainer_module

    cfg = Config(model="BPR", dataset="ml-100k", config_dict={"state": "WARNING"})
    path = tmp_path / "ckpt.pth"
    torch.save({"config": cfg, "state_dict": {"w": torch.ones(2)}}, path, pickle_protocol=4)
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported operand"):
        torch.load(path)
    loaded = trainer_module.torch.load(path)  # what RecBole's trainer calls after recbole_mm is imported
    assert loaded["config"]["model"] == "BPR"
    assert torch.equal(loaded["state_dict"]["w"], torch.ones(2))
    assert trainer_module.torch.nn is torch.nn  # everything else is plain torch


def test_ce_sequential_models_get_no_negative_sampling():
    with pytest.raises(ValueError, match="train_neg_sample_args"):
        RecBoleConfig(model="SASRec", dataset="ml-100k", config_dict={"state": "WARNING"})
    cfg = Config(model="SASRec", dataset="ml-100k", config_dict={"state": "WARNING"})
    assert cfg["train_neg_sample_args"]["distribution"] == "none"
    # A user's explicit choice is kept (and RecBole's own check still applies).
    with pytest.raises(ValueError, match="train_neg_sample_args"):
        Config(model="SASRec", dataset="ml-100k", config_dict={"train_neg_sample_args": {"distribution": "uniform", "sample_num": 1}})


def test_ray_init_kwargs_keeps_user_warning_options():
    kwargs = compat.ray_init_kwargs(runtime_env={"env_vars": {"PYTHONWARNINGS": "error::DeprecationWarning"}})
    assert kwargs["runtime_env"]["env_vars"]["PYTHONWARNINGS"].split(",")[0] == "error::DeprecationWarning"


def test_real_ray_workers_get_the_aliases():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, **compat.ray_init_kwargs())
    try:
        @ray.remote
        def worker():
            import warnings

            from ray.tune.logger import tensorboardx  # noqa: F401  (needs np.bool8)
            import numpy

            import sys

            with warnings.catch_warnings(record=True) as seen:  # the worker's filters
                warnings.warn_explicit("pkg_resources is deprecated as an API. See ...", UserWarning, "f.py", 1,
                                       module="ray._private.parameter")
                warnings.warn_explicit("another notice", UserWarning, "f.py", 2, module="ray._private.parameter")
            # the filter was in place when the worker's interpreter started (before ray's own imports warn)
            started = any(o.startswith("ignore:pkg_resources is deprecated") for o in sys.warnoptions)
            return numpy.float_ is numpy.float64, [str(w.message) for w in seen], started

        assert ray.get(worker.remote()) == (True, ["another notice"], True)
    finally:
        ray.shutdown()


def test_recbole_anomaly_mode_is_switched_off():
    """RecBole's get_model('SASRec') imports SINE, which turns on torch's anomaly detection for the process."""
    code = ("import numpy as np; np.float_=np.float64; np.complex_=np.complex128; np.unicode_=np.str_; "
            "import torch; from recbole.utils import get_model; get_model('SASRec'); print(torch.is_anomaly_enabled())")
    plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert plain.stdout.strip() == "True", plain.stderr[-500:]
    recbole_mm.get_model("SASRec")
    assert torch.is_anomaly_enabled() is False


def _python(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


def test_anomaly_mode_off_after_recbole_own_lookup():
    """The post-import hook on sine.py: RecBole's own get_model('SASRec') after import recbole_mm."""
    code = ("import recbole_mm, torch; from recbole.utils import get_model; get_model('SASRec'); "
            "print(torch.is_anomaly_enabled())")
    assert _python(code) == "False"


def test_recbole_entry_points_patched_when_recbole_quick_start_is_imported():
    """import recbole_mm patches nothing heavy; importing recbole.quick_start afterwards installs the plugin."""
    code = ("import sys, recbole_mm; assert 'recbole' not in sys.modules; "
            "import recbole.quick_start as q, recbole.quick_start.quick_start as qq, recbole.config as rc; "
            "print(qq.get_model.__module__, qq.get_trainer.__module__, qq.create_dataset.__module__, "
            "q.load_data_and_model.__module__, rc.Config.__module__, qq.get_model('MoRec').__name__)")
    assert _python(code).split() == ["recbole_mm.registry", "recbole_mm.trainer.utils", "recbole_mm.data.utils",
                                     "recbole_mm.quick_start", "recbole_mm.config", "MoRec"]


def test_recbole_imported_before_recbole_mm_is_patched_at_once():
    code = ("import numpy as np; np.float_ = np.float64; np.complex_ = np.complex128; np.unicode_ = np.str_; "
            "import recbole.utils, recbole.trainer.trainer as t, torch; import recbole_mm; "
            "from recbole.utils import get_model; "
            "print(get_model('MoRec').__name__, t.torch.load is not torch.load, t.torch.nn is torch.nn)")
    assert _python(code).split() == ["MoRec", "True", "True"]


def test_explicit_install_is_idempotent():
    code = ("import recbole_mm; recbole_mm.install(); recbole_mm.install(); "
            "import recbole.quick_start.quick_start as qq; from recbole_mm.config import Config; "
            "print(qq.Config is Config)")
    assert _python(code) == "True"


def test_numpy_aliases_follow_numpy_import():
    """numpy imported after recbole_mm gets the aliases from the post-import hook (ray / RecBole need them)."""
    assert _python("import recbole_mm, numpy; print(numpy.float_ is numpy.float64, numpy.bool8 is numpy.bool_)") == "True True"


def test_recbole_graph_models_build_their_adjacency_on_todays_scipy():
    """RecBole's LightGCN calls dok_matrix._update, gone from scipy >= 1.12: the shim restores it, and the matrix it
    fills equals the one built entry by entry."""
    import numpy as np
    import scipy.sparse as sp

    import recbole_mm.patch  # noqa: F401 (the hook is active once recbole_mm is imported)

    entries = {(0, 2): 1.0, (2, 0): 1.0, (1, 3): 2.0}
    a = sp.dok_matrix((4, 4), dtype=np.float32)
    a._update(entries)
    b = sp.dok_matrix((4, 4), dtype=np.float32)
    for (i, j), v in entries.items():
        b[i, j] = v
    assert (a.toarray() == b.toarray()).all() and a.nnz == 3
    assert (a.tocoo().toarray() == b.toarray()).all() and ((a > 0).sum(axis=1).A1 == [1, 1, 1, 0]).all()


def test_item_metrics_need_the_non_tensor_values_of_the_collector():
    """RecBole 1.2.1's Collector.get_data_struct calls .cpu() on every value, and ItemCoverage, GiniIndex,
    AveragePopularity and TailPercentage need the int ``data.num_items`` / Counter ``data.count_items``: they failed
    with AttributeError. On a handmade struct, ItemCoverage equals a count made here."""
    from collections import Counter

    from recbole.evaluator.collector import Collector, DataStruct
    from recbole.evaluator.metrics import AveragePopularity, ItemCoverage

    import recbole_mm.patch  # noqa: F401  (the collector patch is installed when recbole's module is imported)

    struct = DataStruct()
    items = torch.tensor([[1, 2, 3], [2, 3, 4], [1, 4, 5]])
    struct.set("rec.items", items)
    struct.set("data.num_items", 10)
    struct.set("data.count_items", Counter({1: 5, 2: 1, 3: 2, 4: 7, 5: 1}))
    holder = type("C", (), {"data_struct": struct})()
    got = Collector.get_data_struct(holder)
    assert got.get("data.num_items") == 10 and got.get("data.count_items")[4] == 7
    assert struct.get("data.num_items") == 10  # still there for the next evaluation
    cov = ItemCoverage({"topk": [2, 3], "metric_decimal_place": 6}).calculate_metric(got)
    assert cov == {"itemcoverage@2": round(len({1, 2, 3, 4}) / 10, 6), "itemcoverage@3": round(5 / 10, 6)}
    pop = AveragePopularity({"topk": [1], "metric_decimal_place": 6}).calculate_metric(got)
    assert pop == {"averagepopularity@1": round((5 + 1 + 5) / 3, 6)}


def test_a_run_reports_the_item_metrics(tiny_root, tmp_path):
    from tests.conftest import TINY_SEQ

    cfg = dict(TINY_SEQ, data_path=tiny_root, checkpoint_dir=str(tmp_path / "s"), topk=[10],
               metrics=["Hit", "ItemCoverage", "GiniIndex", "AveragePopularity", "TailPercentage"], valid_metric="hit@10")
    result = recbole_mm.run_recbole(model="SASRec", dataset="mm-tiny", config_dict=cfg)
    test = result["test_result"]
    assert 0 < test["itemcoverage@10"] <= 1 and 0 <= test["giniindex@10"] <= 1 and test["averagepopularity@10"] > 0
    assert 0 <= test["tailpercentage@10"] <= 1
