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
    (props / "overall_mm.yaml").write_text("user_dim: 1\nbase_key: overall\n")
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
