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
