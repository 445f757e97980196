"""``Config``: RecBole's Config with the plugin's models and yaml layers.

Layers, lowest priority first (a later layer overrides an earlier one):

1. RecBole's internal yaml: ``overall.yaml``, its model yaml (stock models), ``sample.yaml``, its dataset
   yaml, and its quick-start yaml for the model type (``sequential.yaml``: LS split, TO order, full ranking).
2. ``recbole_mm/properties/overall_mm.yaml``: the plugin's own keys (content, encoders, features, cold items).
3. ``recbole_mm/properties/model/<Class>.yaml`` for the model class and each plugin base class it inherits
   from (base first), then the file named by the class attribute ``config_file`` (models defined outside the
   package ship their yaml this way).
4. ``recbole_mm/properties/dataset/<dataset>.yaml`` (embedded datasets such as ``ml-100k-mm``).
5. ``<data_path>/<dataset>/<dataset>.yaml``: the yaml a dataset converter writes next to the atomic files.
6. User config files (``config_file_list``), in order.
7. ``config_dict``.
8. Command-line ``--key=value`` (RecBole's behaviour).

Layers 2-5 come after RecBole's quick-start yaml, so they can override run-protocol keys (``eval_args``,
``train_neg_sample_args``): the plugin's yaml files set those deliberately or not at all.

One default differs from RecBole: a sequential model with ``loss_type: CE`` gets ``train_neg_sample_args:
None`` unless the user sets it (RecBole's default uniform sampling makes its own Config raise for SASRec).
"""

from __future__ import annotations

import os
from typing import Optional

from recbole.config.configurator import Config as RecBoleConfig
from recbole.utils import ModelType

from recbole_mm import registry

PROPERTIES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "properties")


def plugin_yaml_files(model_class: type, dataset: str) -> list[str]:
    """The plugin yaml files of layers 2-4 (that exist), in loading order."""
    files = [os.path.join(PROPERTIES_DIR, "overall_mm.yaml")]
    for klass in reversed(getattr(model_class, "__mro__", ())):
        files.append(os.path.join(PROPERTIES_DIR, "model", f"{klass.__name__}.yaml"))
    own = getattr(model_class, "config_file", None)
    if own:
        files.append(own)
    files.append(os.path.join(PROPERTIES_DIR, "dataset", f"{dataset}.yaml"))
    seen, out = set(), []
    for f in files:
        if f not in seen and os.path.isfile(f):
            seen.add(f)
            out.append(f)
    return out


def dataset_dir(data_path: str, dataset: str) -> str:
    """Folder of a dataset: ``<data_path>/<dataset>``, or the build cache for embedded datasets not found there."""
    from recbole_mm.data.embedded import EMBEDDED_DATASETS, embedded_dataset_dir

    candidate = os.path.join(data_path, dataset)
    if dataset in EMBEDDED_DATASETS and not os.path.isdir(candidate):
        return embedded_dataset_dir(dataset)
    return candidate


class Config(RecBoleConfig):
    """RecBole's Config; finds plugin models (by name or class) and layers the plugin's yaml (module doc)."""

    def _get_model_and_dataset(self, model, dataset):
        if model is None:
            model = self.external_config_dict.get("model")
            if model is None:
                raise KeyError(
                    "model must be given in one of these ways: model argument, config file, config dict, command line"
                )
        model_class = registry.get_model(model)
        model_name = model if isinstance(model, str) else model_class.__name__
        if dataset is None:
            dataset = self.external_config_dict.get("dataset")
            if dataset is None:
                raise KeyError(
                    "dataset must be given in one of these ways: dataset argument, config file, config dict, command line"
                )
        return model_name, model_class, dataset

    def _load_internal_config_dict(self, model, model_class, dataset):
        super()._load_internal_config_dict(model, model_class, dataset)
        for file in plugin_yaml_files(model_class, dataset):
            self._update_internal_config_dict(file)
        data_path = self.external_config_dict.get("data_path", self.internal_config_dict.get("data_path", "dataset/"))
        folder_yaml = os.path.join(dataset_dir(data_path, dataset), f"{dataset}.yaml")
        if os.path.isfile(folder_yaml):
            self._update_internal_config_dict(folder_yaml)
            self.internal_config_dict["dataset_config_file"] = folder_yaml

    def _set_default_parameters(self):
        cfg = self.final_config_dict
        if (
            cfg.get("MODEL_TYPE") == ModelType.SEQUENTIAL
            and str(cfg.get("loss_type", "")).upper() == "CE"
            and "train_neg_sample_args" not in self.external_config_dict
        ):
            cfg["train_neg_sample_args"] = None
        super()._set_default_parameters()
        if self.dataset != "ml-100k":
            base = self.external_config_dict.get("data_path", self.internal_config_dict.get("data_path", "dataset/"))
            cfg["data_path"] = dataset_dir(base, self.dataset)
