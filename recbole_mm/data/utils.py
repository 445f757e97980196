"""``create_dataset``: RecBole's, with dispatch by model class attribute, a clear missing-folder error, embedded
datasets built on first use, and a dataset cache key that includes the plugin's dataset keys."""

from __future__ import annotations

import logging
import os
import pickle

from recbole.utils import set_color
from recbole.utils.argument_list import dataset_arguments

from recbole_mm import registry
from recbole_mm.atomic import BuildLock, atomic_pickle, leftover_temps, lock_path_for, remove_leftovers
from recbole_mm.data.dataset import DatasetNotFoundError, missing_folder_message

# Plugin keys that change what the Dataset object holds (part of the saved-dataset cache key).
MM_DATASET_ARGUMENTS = ["keep_last_n", "new_item_ratio"]


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


def get_dataset_class(config) -> type:
    """Dataset class for ``config['model']``: the model's ``dataset_class`` attribute, else by model type."""
    import importlib

    from recbole.utils import ModelType

    from recbole_mm.data.dataset import MMDataset, MMSequentialDataset

    model_cls = registry.model_class_of(config)
    cls = getattr(model_cls, "dataset_class", None)
    if cls is not None:
        return cls
    data_module = importlib.import_module("recbole.data.dataset")
    legacy = getattr(data_module, f"{config['model']}Dataset", None)  # RecBole's own per-model datasets
    if legacy is not None:
        return legacy
    model_type = config["MODEL_TYPE"]
    if model_type == ModelType.SEQUENTIAL:
        return MMSequentialDataset
    if model_type == ModelType.KNOWLEDGE:
        return data_module.KnowledgeBasedDataset
    return MMDataset


def create_dataset(config):
    """Dataset for ``config``: the model's ``dataset_class`` (else by model type), cached like RecBole's.

    With ``save_dataset``, the cache file is built by one process at a time (:class:`recbole_mm.atomic.BuildLock`,
    file ``.<name>.pth.lock``): concurrent runs wait for it and load it. It is written atomically (temporary
    file, then rename), so a reader or a killed writer never leaves a partial pickle; an unreadable cache file
    is reported and rebuilt.
    """
    ensure_dataset_folder(config)
    dataset_class = get_dataset_class(config)
    default_file = os.path.join(config["checkpoint_dir"], f'{config["dataset"]}-{dataset_class.__name__}.pth')
    file = config["dataset_save_path"] or default_file
    dataset = _load_saved_dataset(file, config)
    if dataset is not None:
        return dataset
    if not config["save_dataset"]:
        return dataset_class(config)
    with BuildLock(lock_path_for(default_file), what=f"saved dataset {default_file}", log=logging.getLogger()):
        remove_leftovers(leftover_temps(default_file), "dataset save", logging.getLogger(), reason="temporary files")
        dataset = _load_saved_dataset(default_file, config, log_stale=False)  # saved meanwhile by another process?
        if dataset is None:
            dataset = dataset_class(config)
            if getattr(dataset, "source_files", None) is None:  # MM datasets record them before reading the files
                dataset.source_files = _source_files(config)  # a re-converted folder makes this file stale
            logging.getLogger().info(set_color("Saving filtered dataset into ", "pink") + f"[{default_file}]")
            atomic_pickle(default_file, dataset)  # RecBole's Dataset.save, atomically
    return dataset


def _source_files(config) -> dict:
    """``{file: [size, mtime_ns]}`` of the dataset's atomic files (``.inter``, ``.item``, ``.user``, ...)."""
    from recbole_mm.data.sequence_build import file_fingerprints

    return file_fingerprints(config["data_path"], config["dataset"])


def _load_saved_dataset(file: str, config, log_stale: bool = True):
    """The dataset pickled in ``file`` if it exists, is readable and was made with this run's dataset keys and from
    the dataset folder's current files (``log_stale``: say so when it was not)."""
    if not os.path.exists(file):
        return None
    try:
        with open(file, "rb") as f:
            dataset = pickle.load(f)
    except Exception as e:  # truncated (killed writer of an older version), or made by other code
        logging.getLogger().warning(f"saved dataset {file} is unreadable ({type(e).__name__}: {e}); building it again")
        return None
    keys = dataset_arguments + ["seed", "repeatable"] + MM_DATASET_ARGUMENTS
    if not all(config[arg] == dataset.config[arg] for arg in keys):
        return None
    changed = changed_source_files(getattr(dataset, "source_files", None), config)
    if changed:
        if log_stale:
            logging.getLogger().warning(
                f"saved dataset {file} was built from other atomic files than {config['data_path']} holds now "
                f"({', '.join(changed)}: another folder of the same dataset name, or the folder was converted "
                "again): building it again")
        return None
    logging.getLogger().info(set_color("Load filtered dataset from", "pink") + f": [{file}]")
    dataset.config = config  # content keys (text fields, image store, ...) come from this run
    return dataset


def attach_image_decode(loader):
    """Wrap a RecBole dataloader's ``collate_fn`` in :class:`~recbole_mm.data.content.ImageBatchCollate`: the batches
    of models that encode pixels then carry their items' decoded images, decoded in the loader's DataLoader workers
    (RecBole's ``worker`` key; 0 = the main process, still outside ``forward``). Loaders of datasets without item
    content, and batches of models without image towers, are left as they are. Returns the loader."""
    from recbole_mm.data.content import ImageBatchCollate
    from recbole_mm.utils import cfg_get

    from recbole_mm.data.dataset import training_user_item_keys

    dataset = getattr(loader, "_dataset", None)
    content = getattr(dataset, "item_content", None) if dataset is not None else None
    if content is None or isinstance(loader.collate_fn, ImageBatchCollate):
        return loader
    keys = None
    if cfg_get(loader.config, "loss") == "bce" and content.batch_image_size is not None:
        keys = getattr(dataset, "train_user_item_keys", None)  # negatives outside the user's training items
        keys = keys if keys is not None else training_user_item_keys(dataset)
    loader.collate_fn = ImageBatchCollate(loader.collate_fn, content, loader.config, keys)
    return loader


# ------------------------------------------------------------------------------------------ saved dataloaders
def saved_dataloaders_file(config) -> str:
    """The file RecBole's ``load_split_dataloaders`` reads: ``dataloaders_save_path``, else
    ``<checkpoint_dir>/<dataset>-for-<model>-dataloader.pth`` (where ``save_dataloaders: True`` writes)."""
    return config["dataloaders_save_path"] or _default_dataloaders_file(config)


def _default_dataloaders_file(config) -> str:
    return os.path.join(config["checkpoint_dir"], f'{config["dataset"]}-for-{config["model"]}-dataloader.pth')


def changed_source_files(recorded, config) -> list:
    """The atomic files (``<dataset>.inter``, ``.item``, ...) that differ (size, mtime, added, removed) between
    ``recorded`` (a dataset's ``source_files``) and the dataset folder now; ``["(not recorded)"]`` when nothing was
    recorded (a file saved by RecBole itself or by an earlier release)."""
    if not isinstance(recorded, dict):
        return ["(not recorded)"]
    current = _source_files(config)
    return sorted(f for f in set(recorded) | set(current) if recorded.get(f) != current.get(f))


class _NoSavedDataloaders:
    """While RecBole's ``data_preparation`` runs, ``dataloaders_save_path`` names no file (so that it builds the
    dataloaders instead of loading a file already found unusable) and ``save_dataloaders`` is off (they are saved by
    :func:`save_split_dataloaders`); both restored afterwards."""

    def __init__(self, config):
        self.config = config

    def __enter__(self):
        self.saved = self.config["dataloaders_save_path"], self.config["save_dataloaders"]
        self.config["dataloaders_save_path"] = os.path.join(os.devnull, "no-saved-dataloaders")
        self.config["save_dataloaders"] = False
        return self

    def __exit__(self, *exc):
        self.config["dataloaders_save_path"], self.config["save_dataloaders"] = self.saved
        return False


def data_preparation(config, dataset):
    """RecBole's ``data_preparation``, except that saved dataloaders (``save_dataloaders`` /
    ``dataloaders_save_path``) made from other atomic files than the dataset folder's current ones are not used:
    a warning names the changed files and the dataloaders are built again (as a saved dataset made from other files
    is, :func:`recbole_mm.data.utils.create_dataset`). RecBole 1.2.1 loads them whatever the files hold now."""
    from recbole.data import utils as recbole_data_utils

    if getattr(dataset, "source_files", None) is None:  # a RecBole dataset class: record the files for the save
        dataset.source_files = _source_files(config)
    path = saved_dataloaders_file(config)
    loaded = None
    if os.path.exists(path):
        try:
            loaded = recbole_data_utils.load_split_dataloaders(config)
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, ValueError, RuntimeError) as e:
            # truncated (RecBole writes it in place), or pickled by other code / versions
            logging.getLogger().warning(f"saved dataloaders {path} are unreadable ({type(e).__name__}: {e}); "
                                        "building the dataloaders again")
    if loaded is not None:
        changed = changed_source_files(getattr(loaded[0]._dataset, "source_files", None), config)
        if not changed:
            dataset._change_feat_format()  # what RecBole's data_preparation does with loaded dataloaders
            _log_loader_settings(config)
            return loaded
        why = ("were saved without the record of their dataset files (by RecBole itself or an earlier release)"
               if changed == ["(not recorded)"] else
               f"were made from other dataset files than {config['data_path']} holds now (changed since: "
               f"{', '.join(changed)})")
        if config["dataloaders_save_path"]:  # RecBole saves new ones to the default file, never to this path
            remedy = (f"Delete {path} or set dataloaders_save_path to nothing (save_dataloaders: True writes new ones "
                      f"to {_default_dataloaders_file(config)}, not to dataloaders_save_path)")
        else:
            remedy = f"Delete {path} to stop this message (save_dataloaders: True saves new ones there)"
        logging.getLogger().warning(f"saved dataloaders {path} {why}: not used, building the dataloaders again. "
                                    f"{remedy}.")
    save = config["save_dataloaders"]
    with _NoSavedDataloaders(config):  # RecBole builds them; they are saved here, by ours
        loaders = recbole_data_utils.data_preparation(config, dataset)
    if save:
        save_split_dataloaders(config, loaders)
    return loaders


def save_split_dataloaders(config, dataloaders) -> None:
    """RecBole's ``save_split_dataloaders`` (same file, same pickle: ``(loader, generator state)`` pairs), except that
    the loaders keep their generators and the file is written atomically. RecBole 1.2.1 sets ``generator = None``
    on the live loaders to pickle them, so the run that saved them shuffled with the global RNG instead (measured
    by a new user: valid hit@10 0.0750 in every saving run, 0.0950 in every loading or non-saving run of the same
    seed); and it wrote the file in place, where a killed run left a truncated file."""
    path = _default_dataloaders_file(config)
    logging.getLogger().info(set_color("Saving split dataloaders into", "pink") + f": [{path}]")
    kept = [(d, d.generator, d.sampler.__dict__.get("generator", _ABSENT)) for d in dataloaders]
    try:
        pairs = []
        for loader in dataloaders:
            state = loader.generator.get_state()
            loader.generator = loader.sampler.generator = None
            pairs.append((loader, state))
        os.makedirs(config["checkpoint_dir"], exist_ok=True)
        atomic_pickle(path, pairs)
    finally:
        for loader, generator, sampler_generator in kept:
            loader.generator = generator
            if sampler_generator is _ABSENT:  # e.g. a SequentialSampler: RecBole only added the attribute
                loader.sampler.__dict__.pop("generator", None)
            else:
                loader.sampler.generator = sampler_generator


_ABSENT = object()


def _log_loader_settings(config) -> None:
    """The two log lines of RecBole's ``data_preparation``."""

    def pair(key, value):
        sep = " = " if key.endswith("batch_size") else ": "
        return set_color(key, "cyan") + sep + set_color(f"[{value}]", "yellow")

    logger = logging.getLogger()
    logger.info(set_color("[Training]: ", "pink") + pair("train_batch_size", config["train_batch_size"])
                + pair(" train_neg_sample_args", config["train_neg_sample_args"]))
    logger.info(set_color("[Evaluation]: ", "pink") + pair("eval_batch_size", config["eval_batch_size"])
                + pair(" eval_args", config["eval_args"]))
