"""Reload across processes: train in one process, ``load_data_and_model`` + ``trainer.evaluate`` in a new one.

RecBole sets its numpy aliases (``np.float`` ...) only when a Config is constructed; a Config unpickled from a
checkpoint in a new process used to leave them unset, and evaluation crashed with "numpy has no attribute
float". Both loaders are checked: the plugin's and RecBole's own (after ``import recbole_mm``).
"""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import TINY_SEQ

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TRAIN = """
import json, sys
import recbole_mm
cfg = json.loads(sys.argv[1])
result = recbole_mm.run_recbole(model="SASRec", dataset="mm-tiny", config_dict=cfg)
print(json.dumps({"checkpoint": result["checkpoint_file"],
                  "test": {k: float(v) for k, v in result["test_result"].items()}}))
"""

EVALUATE = """
import json, sys
import numpy
import recbole_mm
loader = sys.argv[2]
assert not hasattr(numpy, "float"), "a fresh process has no np.float (numpy 2)"
if loader == "plugin":
    load = recbole_mm.load_data_and_model
    from recbole_mm.trainer.utils import get_trainer
else:  # RecBole's own entry points, patched once recbole.quick_start is imported
    from recbole.quick_start import load_data_and_model as load
    from recbole.utils import get_trainer
    assert get_trainer.__module__ == "recbole_mm.trainer.utils", get_trainer.__module__
config, model, dataset, train_data, valid_data, test_data = load(sys.argv[1])
trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
result = trainer.evaluate(test_data, load_best_model=False, show_progress=False)
print(json.dumps({k: float(v) for k, v in result.items()}))
"""


def _run(code: str, *args: str, cwd: str) -> dict:
    env = dict(os.environ, RECBOLE_MM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def trained(tiny_root, tmp_path_factory):
    work = tmp_path_factory.mktemp("reload")
    cfg = dict(TINY_SEQ, MAX_ITEM_LIST_LENGTH=10, data_path=tiny_root, checkpoint_dir=str(work / "saved"))
    return _run(TRAIN, json.dumps(cfg), cwd=str(work)), str(work)


@pytest.mark.parametrize("loader", ["plugin", "recbole"])
def test_evaluate_a_reloaded_checkpoint_in_a_new_process(trained, loader):
    result, work = trained
    assert os.path.isfile(result["checkpoint"])
    again = _run(EVALUATE, result["checkpoint"], loader, cwd=work)
    assert again == result["test"]


TRAIN_MODEL = """
import json, sys
import recbole_mm
cfg = json.loads(sys.argv[1])
result = recbole_mm.run_recbole(model=sys.argv[2], dataset="mm-tiny", config_dict=cfg)
print(json.dumps({"checkpoint": result["checkpoint_file"],
                  "test": {k: float(v) for k, v in result["test_result"].items()},
                  "branches": result.get("branch_test_result")}))
"""

EVALUATE_MODEL = """
import json, sys
import recbole_mm
from recbole_mm.trainer.utils import get_trainer
config, model, dataset, train_data, valid_data, test_data = recbole_mm.load_data_and_model(sys.argv[1])
trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
result = trainer.evaluate(test_data, load_best_model=False, show_progress=False)
print(json.dumps({"test": {k: float(v) for k, v in result.items()}, "branches": trainer.branch_test_result}))
"""


@pytest.mark.parametrize("model, extra", [
    ("ODMT", {"imt_layers": 1, "imt_heads": 2, "kd_alpha": 2}),
    ("IISAN", {"san_bottleneck": 8, "image_taps": None}),
    ("IISAN", {"san_bottleneck": 8, "image_taps": None, "mode": "uncached"}),
])
def test_odmt_and_iisan_checkpoints_reload_in_a_new_process(tiny_root, tiny_bert, tiny_vit, tmp_path, model, extra):
    cfg = dict(TINY_SEQ, MAX_ITEM_LIST_LENGTH=10, data_path=tiny_root, checkpoint_dir=str(tmp_path / "saved"),
               embedding_size=16, n_layers=1, n_heads=1, text_max_length=16, image_size=32, text_encoder=tiny_bert,
               image_encoder=tiny_vit, train_batch_size=64, **extra)
    first = _run(TRAIN_MODEL, json.dumps(cfg), model, cwd=str(tmp_path))
    again = _run(EVALUATE_MODEL, first["checkpoint"], cwd=str(tmp_path))
    assert again["test"] == first["test"]
    assert again["branches"] == first["branches"] and (model != "ODMT" or set(again["branches"]) == {"id", "text", "image"})
