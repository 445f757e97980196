"""``create_dataset``: RecBole's, with dispatch by model class attribute, a clear missing-folder error, embedded
datasets built on first use, and a dataset cache key that includes the plugin's dataset keys."""

from __future__ import annotations

import logging
import os
import pickle

from recbole.utils import set_color
from recbole.utils.argument_list import dataset_arguments

from recbole_mm import registry
from recbole_mm.data.dataset import DatasetNotFoundError, missing_folder_message

# Plugin keys that change what the Dataset object holds (part of the saved-dataset cache key).
MM_DATASET_ARGUMENTS = ["keep_last_n"]


def ensure_dataset_folder(config) -> None:
    """Build an embedded dataset on first use; a missing folder is a clear error (never a download)."""
    from recbole_mm.data.embedded import EMBEDDED_DATASETS, build_embedded

    name = config["dataset"]
    if name == "ml-100k":  # RecBole's packaged copy
        return
    path = config["data_path"]
    inter = os.path.join(path, f"{name}.inter")
    if name in EMBEDDED_DATASETS and not os.path.isfile(inter):
        build_embedded(name, path)
    if not os.path.isdir(path):
        raise DatasetNotFoundError(missing_folder_message(path, name))
    if config["benchmark_filename"] is None and not os.path.isfile(inter):
        raise DatasetNotFoundError(f"dataset folder {path} has no {name}.inter file")


def create_dataset(config):
    """Dataset for ``config``: the model's ``dataset_class`` (else by model type), cached like RecBole's."""
    ensure_dataset_folder(config)
    dataset_class = registry.get_dataset_class(config)
    default_file = os.path.join(config["checkpoint_dir"], f'{config["dataset"]}-{dataset_class.__name__}.pth')
    file = config["dataset_save_path"] or default_file
    if os.path.exists(file):
        with open(file, "rb") as f:
            dataset = pickle.load(f)
        keys = dataset_arguments + ["seed", "repeatable"] + MM_DATASET_ARGUMENTS
        if all(config[arg] == dataset.config[arg] for arg in keys):
            logging.getLogger().info(set_color("Load filtered dataset from", "pink") + f": [{file}]")
            dataset.config = config  # content keys (text fields, image store, ...) come from this run
            return dataset
    dataset = dataset_class(config)
    if config["save_dataset"]:
        dataset.save()
    return dataset
