"""Config layers: RecBole defaults < overall_mm < model yaml(s) < dataset yaml < dataset folder yaml < user files
< config_dict < command line."""

import os
import sys

import pytest

from recbole_mm import registry
from recbole_mm.config import Config
from tests.user_models import UserSeqRec


@pytest.fixture
def user_model():
    registry.register_model(UserSeqRec)
    yield UserSeqRec
    registry.unregister_model("UserSeqRec")


def test_layers_in_order(tmp_path, tiny_root, user_model, monkeypatch):
    base = {"data_path": tiny_root, "state": "WARNING"}
    cfg = Config(model="UserSeqRec", dataset="mm-tiny", config_dict=base)
    assert cfg["image_size"] == 224  # overall_mm.yaml
    assert cfg["eval_args"]["split"] == {"LS": "valid_and_test"}  # RecBole's sequential quick-start yaml
    assert cfg["user_dim"] == 12  # the model class's config_file
    assert cfg["text_fields"] == ["title", "genres"]  # dataset folder yaml beats overall_mm ([title])
    assert cfg["dataset_config_file"] == os.path.join(tiny_root, "mm-tiny", "mm-tiny.yaml")
    assert cfg["data_path"] == os.path.join(tiny_root, "mm-tiny")

    user_file = tmp_path / "user.yaml"
    user_file.write_text("text_fields: [title]\nuser_dim: 5\n")
    cfg = Config(model="UserSeqRec", dataset="mm-tiny", config_file_list=[str(user_file)], config_dict=base)
    assert cfg["text_fields"] == ["title"] and cfg["user_dim"] == 5  # user file beats the yaml layers
    cfg = Config(model="UserSeqRec", dataset="mm-tiny", config_file_list=[str(user_file)], config_dict=dict(base, user_dim=7))
    assert cfg["user_dim"] == 7  # config_dict beats files
    monkeypatch.setattr(sys, "argv", ["prog", "--user_dim=9"])
    cfg = Config(model="UserSeqRec", dataset="mm-tiny", config_file_list=[str(user_file)], config_dict=dict(base, user_dim=7))
    assert cfg["user_dim"] == 9  # RecBole's command line beats everything


def test_plugin_model_yaml_of_base_classes(tiny_root, user_model, tmp_path, monkeypatch):
    import recbole_mm.config as config_module

    props = tmp_path / "props"
    (props / "model").mkdir(parents=True)
    (props / "overall_mm.yaml").write_text("user_dim: 1\nbase_key: overall\ntext_fields: [title]\n")
    (props / "model" / "SequentialRecommender.yaml").write_text("base_key: base\nuser_dim: 2\n")
    monkeypatch.setattr(config_module, "PROPERTIES_DIR", str(props))
    cfg = Config(model="UserSeqRec", dataset="mm-tiny", config_dict={"data_path": tiny_root})
    assert cfg["base_key"] == "base"  # base-class yaml beats overall_mm
    assert cfg["user_dim"] == 12  # the class's own yaml beats its base's


def test_embedded_dataset_resolves_to_the_cache(ml100k_mm):
    cfg = Config(model="SASRec", dataset="ml-100k-mm", config_dict={"state": "WARNING"})
    assert cfg["data_path"] == ml100k_mm  # ./dataset/ml-100k-mm does not exist here
    assert cfg["text_fields"] == ["title", "genres"]  # the plugin's dataset yaml


def test_unknown_model_in_config():
    from recbole_mm.registry import UnknownModelError

    with pytest.raises(UnknownModelError, match="known models"):
        Config(model="NoSuchModel", dataset="ml-100k")


# ---------------------------------------------------------------------------------------------- unknown keys
@pytest.fixture
def fresh_warnings(monkeypatch):
    """Unknown keys warn once per process: start each test with none warned yet."""
    import recbole_mm.config as config_module

    monkeypatch.setattr(config_module, "_WARNED", set())


def _unknown(record) -> list:
    from recbole_mm.config import UnknownConfigKeyWarning

    return [str(w.message) for w in record if issubclass(w.category, UnknownConfigKeyWarning)]


def test_unknown_key_in_config_dict_warns_with_closest(fresh_warnings, tiny_root, recwarn):
    Config(model="MoRec", dataset="mm-tiny", config_dict={"data_path": tiny_root, "modalty": "image", "state": "WARNING"})
    assert _unknown(recwarn) == ["unknown config key 'modalty' (did you mean 'modality'?) in config_dict; it is not used"]


def test_unknown_key_in_yaml_file_names_the_file(fresh_warnings, tiny_root, tmp_path, recwarn):
    user_file = tmp_path / "user.yaml"
    user_file.write_text("learning_rat: 0.01\nepochs: 1\n")
    Config(model="SASRec", dataset="mm-tiny", config_file_list=[str(user_file)], config_dict={"data_path": tiny_root})
    (msg,) = _unknown(recwarn)
    assert msg.startswith("unknown config key 'learning_rat' (did you mean 'learning_rate'?)") and str(user_file) in msg


def test_unknown_key_on_recbole_command_line(fresh_warnings, tiny_root, monkeypatch, recwarn):
    monkeypatch.setattr(sys, "argv", ["prog", "--MAX_ITEM_LIST_LENGHT=5"])
    Config(model="SASRec", dataset="mm-tiny", config_dict={"data_path": tiny_root})
    (msg,) = _unknown(recwarn)
    assert "'MAX_ITEM_LIST_LENGHT' (did you mean 'MAX_ITEM_LIST_LENGTH'?) in the command line" in msg


def test_unknown_key_in_dataset_folder_yaml(fresh_warnings, tiny_root, tmp_path, recwarn):
    import shutil

    shutil.copytree(os.path.join(tiny_root, "mm-tiny"), tmp_path / "mm-tiny")
    with open(tmp_path / "mm-tiny" / "mm-tiny.yaml", "a", encoding="utf-8") as f:
        f.write("text_field: [title]\n")
    Config(model="SASRec", dataset="mm-tiny", config_dict={"data_path": str(tmp_path)})
    (msg,) = _unknown(recwarn)
    assert "'text_field' (did you mean 'text_fields'?) in dataset yaml" in msg and "mm-tiny.yaml" in msg


def test_unknown_key_warns_once_per_key(fresh_warnings, tiny_root, recwarn):
    for _ in range(3):
        Config(model="SASRec", dataset="mm-tiny", config_dict={"data_path": tiny_root, "epoch": 2})
    assert len(_unknown(recwarn)) == 1
    Config(model="SASRec", dataset="mm-tiny", config_dict={"data_path": tiny_root, "xyzzy": 2})
    assert _unknown(recwarn)[-1] == "unknown config key 'xyzzy' in config_dict; it is not used"  # no close key


def test_known_keys_do_not_warn(fresh_warnings, tiny_root, user_model, recwarn):
    """RecBole's keys (overall, model, dataset, quick-start yaml, argument lists), the plugin's, and the model's."""
    from recbole_mm.config import known_config_keys

    known = known_config_keys()
    for key in ("reg_weight", "n_layers", "seq_len", "alias_of_item_id", "MAX_ITEM_LIST_LENGTH", "eval_args",
                "nproc", "text_fields", "modality", "cold_item_threshold", "unused_col", "worker"):
        assert key in known, key
    cfg = {"data_path": tiny_root, "state": "WARNING", "reg_weight": 1e-4, "text_fields": ["title"], "user_dim": 4,
           "nproc": 1}
    Config(model="UserSeqRec", dataset="mm-tiny", config_dict=cfg)  # user_dim: the class's config_file
    assert _unknown(recwarn) == []


def test_model_class_declares_extra_keys(fresh_warnings, tiny_root, recwarn):
    class DeclaringRec(UserSeqRec):
        config_keys = ("my_own_key",)

    Config(model=DeclaringRec, dataset="mm-tiny", config_dict={"data_path": tiny_root, "my_own_key": 1, "user_dim": 3})
    assert _unknown(recwarn) == []
    Config(model="SASRec", dataset="mm-tiny", config_dict={"data_path": tiny_root, "my_own_key": 1})
    assert _unknown(recwarn) == ["unknown config key 'my_own_key' in config_dict; it is not used"]


def test_converter_yaml_keys_are_known():
    """Every key a dataset converter writes into NAME.yaml is a known key (no warning on converted datasets)."""
    from dataset_converters.dataset_yaml import YamlSpec, render_yaml

    from recbole_mm.config import known_config_keys, yaml_keys

    known = known_config_keys()
    for protocol in ("sequential", "benchmark"):
        text = render_yaml(YamlSpec(converter="test", time_unit="seconds", protocol=protocol), "x")
        path = os.path.join(os.getcwd(), f"{protocol}.yaml")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        assert yaml_keys(path) - known == set()


def test_unpickled_config_restores_recbole_numpy_settings(tiny_root, monkeypatch):
    """RecBole sets np.float & co. only when a Config is constructed; an unpickled one (checkpoint) re-applies."""
    import pickle

    import numpy as np

    cfg = Config(model="SASRec", dataset="mm-tiny", config_dict={"data_path": tiny_root, "state": "WARNING"})
    data = pickle.dumps(cfg)
    monkeypatch.delattr(np, "float")
    with pytest.raises(AttributeError):
        np.float
    again = pickle.loads(data)
    assert np.float is np.float64 and again["model"] == "SASRec"
