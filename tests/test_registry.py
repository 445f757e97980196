"""Registry, entry points (the plugin's and RecBole's own), dispatch by class attributes."""

import pytest
import recbole.quick_start
import torch
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.trainer import HyperTuning

import recbole_mm
from recbole_mm import registry
from recbole_mm.registry import UnknownModelError, register_model
from tests.user_models import CountingDataset, CountingTrainer, UserSeqRec


@pytest.fixture
def user_model():
    register_model(UserSeqRec)
    yield UserSeqRec
    registry.unregister_model("UserSeqRec")


def test_register_model_validates():
    class NotAModel:
        pass

    with pytest.raises(TypeError, match="AbstractRecommender"):
        register_model(NotAModel)

    class NoInputType(SequentialRecommender):
        pass

    with pytest.raises(TypeError, match="input_type"):
        register_model(NoInputType)
    with pytest.raises(ValueError, match="stock models"):
        register_model(UserSeqRec, name="SASRec")
    with pytest.raises(ValueError, match="identifier"):
        register_model(UserSeqRec, name="my-model")

    register_model(UserSeqRec)
    try:
        register_model(UserSeqRec)  # the same class again is fine (re-import)

        class UserSeqRec2(UserSeqRec):
            pass

        with pytest.raises(ValueError, match="already registered"):
            register_model(UserSeqRec2, name="UserSeqRec")
        assert "UserSeqRec" in recbole_mm.list_models(source="plugin")
        assert "UserSeqRec" in recbole_mm.list_models("user*")
    finally:
        registry.unregister_model("UserSeqRec")


def test_unknown_model_errors_name_known_models():
    with pytest.raises(UnknownModelError, match=r"unknown model 'NoSuchModel'; known models: .*SASRec"):
        recbole_mm.get_model("NoSuchModel")
    with pytest.raises(UnknownModelError, match="did you mean 'SASRec'"):
        recbole_mm.get_model("sasrec")
    # RecBole's own entry point, after import recbole_mm (RecBole says "ModuleNotFoundError: lightgbm" here)
    with pytest.raises(UnknownModelError, match="unknown model 'NoSuchModel'"):
        recbole.quick_start.run_recbole(model="NoSuchModel", dataset="ml-100k")


def test_model_class_yaml_dataset_and_trainer_attributes(tiny_config, user_model):
    built, epochs = CountingDataset.built, CountingTrainer.epochs_run
    result = recbole_mm.run_recbole(model=UserSeqRec, dataset="mm-tiny", config_dict=tiny_config)
    assert CountingDataset.built == built + 1
    assert CountingTrainer.epochs_run == epochs + 1
    assert result["model"] == "UserSeqRec"
    assert 0.0 <= result["test_result"]["ndcg@10"] <= 1.0
    ckpt = torch.load(result["checkpoint_file"], weights_only=False)
    assert ckpt["state_dict"]["item_embedding.weight"].shape[1] == 12  # user_dim from the class's config_file


def test_recbole_own_run_recbole_finds_plugin_model(tiny_config, user_model):
    result = recbole.quick_start.run_recbole(model="UserSeqRec", dataset="mm-tiny", config_dict=tiny_config)
    assert set(result) >= {"best_valid_score", "best_valid_result", "test_result"}
    assert 0.0 <= result["test_result"]["hit@10"] <= 1.0


@pytest.mark.parametrize("objective", ["plugin", "recbole"])
def test_hypertuning_two_trials(tmp_path, tiny_config, user_model, objective):
    import yaml

    fixed = dict(tiny_config, model="UserSeqRec", dataset="mm-tiny")
    fixed_file = tmp_path / "fixed.yaml"
    fixed_file.write_text(yaml.safe_dump(fixed))
    fn = recbole_mm.objective_function if objective == "plugin" else recbole.quick_start.objective_function
    tuner = HyperTuning(fn, params_dict={"choice": {"learning_rate": [0.01, 0.001]}}, fixed_config_file_list=[str(fixed_file)])
    tuner.run()
    assert len(tuner.params2result) == 2
    assert tuner.model == "UserSeqRec"
    assert tuner.best_params["learning_rate"] in (0.01, 0.001)


def test_stock_models_through_plugin_entry_points(tiny_config):
    seq = recbole_mm.run_recbole(model="SASRec", dataset="mm-tiny", config_dict=tiny_config)
    assert seq["model"] == "SASRec" and 0.0 <= seq["test_result"]["ndcg@10"] <= 1.0
    gen = recbole_mm.run_recbole(model="BPR", dataset="mm-tiny", config_dict=dict(tiny_config, embedding_size=8))
    assert 0.0 <= gen["test_result"]["recall@10"] <= 1.0
    res = recbole_mm.objective_function(config_dict=dict(tiny_config, model="BPR", dataset="mm-tiny", embedding_size=8))
    assert res["model"] == "BPR" and "test_result" in res


@pytest.mark.parametrize("loader", ["plugin", "recbole"])
def test_load_data_and_model_round_trip(tiny_config, user_model, loader):
    result = recbole_mm.run_recbole(model="UserSeqRec", dataset="mm-tiny", config_dict=tiny_config)
    fn = recbole_mm.load_data_and_model if loader == "plugin" else recbole.quick_start.load_data_and_model
    config, model, dataset, train_data, valid_data, test_data = fn(result["checkpoint_file"])
    saved = torch.load(result["checkpoint_file"], weights_only=False)["state_dict"]
    assert isinstance(model, UserSeqRec)
    assert torch.equal(model.item_embedding.weight, saved["item_embedding.weight"])
    batch = next(iter(test_data))[0]
    scores = model.full_sort_predict(batch.to(model.device))
    assert scores.shape == (len(batch), dataset.item_num)


def test_missing_dataset_folder_is_a_clear_error(tiny_config):
    from recbole_mm.data.dataset import DatasetNotFoundError

    with pytest.raises(DatasetNotFoundError, match="does not exist.*recbole-mm convert"):
        recbole_mm.run_recbole(model="SASRec", dataset="no-such-dataset", config_dict=tiny_config)


def test_unregistered_model_class_runs(tiny_config):
    """A class passed to run_recbole works without @register_model (dataset / trainer / yaml by attribute)."""
    assert "UserSeqRec" not in recbole_mm.list_models(source="plugin")
    built, epochs = CountingDataset.built, CountingTrainer.epochs_run
    result = recbole_mm.run_recbole(model=UserSeqRec, dataset="mm-tiny", config_dict=tiny_config)
    assert result["model"] == "UserSeqRec"
    assert CountingDataset.built == built + 1 and CountingTrainer.epochs_run == epochs + 1
    config, model, *_ = recbole_mm.load_data_and_model(result["checkpoint_file"])
    assert isinstance(model, UserSeqRec) and model.dim == 12


def test_recbole_own_run_recbole_runs_morec_in_a_fresh_process(tiny_config, tiny_bert, tmp_path):
    """The lazy patching end to end: ``import recbole_mm`` (which imports no recbole), then RecBole's own
    ``run_recbole(model="MoRec")`` in a fresh interpreter."""
    import json
    import os
    import subprocess
    import sys

    cfg = dict(tiny_config, text_encoder=tiny_bert, modality="text", mode="two_stage", embedding_size=16,
               dnn_layers=1, text_max_length=16, MAX_ITEM_LIST_LENGTH=10, features_dir=str(tmp_path / "features"))
    code = ("import json, sys; import recbole_mm; assert 'recbole' not in sys.modules; "
            "from recbole.quick_start import run_recbole; "
            "r = run_recbole(model='MoRec', dataset='mm-tiny', config_dict=json.loads(sys.argv[1])); "
            "print(json.dumps({k: float(v) for k, v in r['test_result'].items()}))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(cfg)], capture_output=True, text=True,
                          cwd=str(tmp_path), env=dict(os.environ, RECBOLE_MM_THREADS="1", PYTHONPATH=root))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert 0.0 <= result["hit@10"] <= 1.0
