"""``Config``: RecBole's Config with the plugin's models and yaml layers.

Layers, lowest priority first (a later layer overrides an earlier one):

1. RecBole's internal yaml: ``overall.yaml``, its model yaml (stock models), ``sample.yaml``, its dataset
   yaml, and its quick-start yaml for the model type (``sequential.yaml``: LS split, TO order, full ranking).
2. ``properties/overall_mm.yaml``: the plugin's own keys (content, encoders, features, cold items). The
   ``properties/`` folder sits beside ``recbole_mm/`` in the source tree and is package data once installed
   (:func:`recbole_mm.paths.properties_dir`).
3. ``properties/model/<Class>.yaml`` for the model class and each plugin base class it inherits
   from (base first), then the file named by the class attribute ``config_file`` (models defined outside the
   package ship their yaml this way).
4. ``properties/dataset/<dataset>.yaml`` (embedded datasets such as ``ml-100k-mm``).
5. ``<data_path>/<dataset>/<dataset>.yaml``: the yaml a dataset converter writes next to the atomic files.
6. User config files (``config_file_list``), in order.
7. ``config_dict``.
8. Command-line ``--key=value`` (RecBole's behaviour).

Layers 2-5 come after RecBole's quick-start yaml, so they can override run-protocol keys (``eval_args``,
``train_neg_sample_args``): the plugin's yaml files set those deliberately or not at all.

One default differs from RecBole: a sequential model with ``loss_type: CE`` gets ``train_neg_sample_args:
None`` unless the user sets it (RecBole's default uniform sampling makes its own Config raise for SASRec).

Unknown keys: a key given in a user yaml file, the dataset folder's yaml, ``config_dict`` or on the command line
that no layer knows warns once per process (:class:`UnknownConfigKeyWarning`, "unknown config key 'modalty'
(did you mean 'modality'?)"); RecBole would silently ignore it. Known keys (:func:`known_config_keys`): every
top-level key of RecBole's own yaml files (overall, every model, the dataset and quick-start yaml), its argument
lists and the keys it sets or reads outside them (:data:`RECBOLE_RUNTIME_KEYS`), every key of the plugin's yaml
files, and what the model class declares: the keys of its ``config_file`` and its ``config_keys`` attribute.

A Config unpickled from a checkpoint re-applies RecBole's numpy compatibility settings (``__setstate__``), which
RecBole only runs when a Config is constructed.
"""

from __future__ import annotations

import difflib
import glob
import os
import re
import warnings
from typing import Iterable, Optional

from recbole.config.configurator import Config as RecBoleConfig
from recbole.utils import ModelType

from recbole_mm import compat, registry
from recbole_mm.paths import properties_dir

PROPERTIES_DIR = properties_dir()

# Keys RecBole sets or reads that are in none of its yaml files nor its argument lists.
RECBOLE_RUNTIME_KEYS = (
    "model", "dataset", "config_files",  # run_recbole.py / HyperTuning's fixed files
    "nproc", "world_size", "offset", "ip", "port", "local_rank", "single_spec", "device",  # distributed runs
    "MODEL_TYPE", "MODEL_INPUT_TYPE", "eval_type", "valid_neg_sample_args", "test_neg_sample_args",  # derived
    "neg_sampling", "training_neg_sample_num",  # deprecated: RecBole warns about them itself
)
# Keys the plugin sets itself.
PLUGIN_RUNTIME_KEYS = ("dataset_config_file",)


class UnknownConfigKeyWarning(UserWarning):
    """A config key that neither RecBole nor the plugin nor the model knows (probably a typo)."""


_TOP_KEY = re.compile(r"^([A-Za-z_][\w\-]*)\s*:", re.M)
_KEY_CACHE: dict = {}
_WARNED: set = set()
UNKNOWN_KEY_MESSAGES: list = []  # every unknown-key warning of this process, for a reminder at the end of a run


def yaml_keys(path: str) -> set:
    """Top-level keys of a yaml file (read as text: fast, and a broken file still yields its keys)."""
    try:
        with open(path, encoding="utf-8") as f:
            return set(_TOP_KEY.findall(f.read()))
    except OSError:
        return set()


def _recbole_keys() -> set:
    if "recbole" not in _KEY_CACHE:
        import recbole
        from recbole.utils import argument_list

        keys = set(RECBOLE_RUNTIME_KEYS)
        for path in glob.glob(os.path.join(os.path.dirname(recbole.__file__), "properties", "**", "*.yaml"),
                              recursive=True):
            keys |= yaml_keys(path)
        for name in ("general_arguments", "training_arguments", "evaluation_arguments", "dataset_arguments"):
            keys |= set(getattr(argument_list, name, ()))
        _KEY_CACHE["recbole"] = keys
    return _KEY_CACHE["recbole"]


def _plugin_keys() -> set:
    folder = PROPERTIES_DIR
    if _KEY_CACHE.get("plugin_dir") != folder:
        keys = set(PLUGIN_RUNTIME_KEYS)
        for path in glob.glob(os.path.join(folder, "**", "*.yaml"), recursive=True):
            keys |= yaml_keys(path)
        _KEY_CACHE["plugin"], _KEY_CACHE["plugin_dir"] = keys, folder
    return _KEY_CACHE["plugin"]


def model_declared_keys(model_class) -> set:
    """Keys a model class declares: its (and its bases') ``config_keys`` and the keys of their ``config_file``."""
    keys: set = set()
    for klass in getattr(model_class, "__mro__", ()):
        keys |= set(vars(klass).get("config_keys", ()) or ())
        own = vars(klass).get("config_file")
        if own:
            keys |= yaml_keys(own)
    return keys


def known_config_keys(model_class=None) -> set:
    """Every key RecBole, the plugin and ``model_class`` know (module doc)."""
    return _recbole_keys() | _plugin_keys() | model_declared_keys(model_class)


def closest_key(key: str, known: Iterable[str]) -> Optional[str]:
    """The known key a typo most likely meant (case-insensitive first, then by similarity), or None."""
    known = sorted(known)
    lower = {k.lower(): k for k in known}
    if key.lower() in lower:
        return lower[key.lower()]
    by_lower = difflib.get_close_matches(key.lower(), list(lower), n=1, cutoff=0.75)
    return lower[by_lower[0]] if by_lower else None


def unknown_key_message(key: str, source: str, known: Iterable[str]) -> str:
    close = closest_key(key, known)
    hint = f" (did you mean {close!r}?)" if close else ""
    return f"unknown config key {key!r}{hint} in {source}; it is not used"


def warn_unknown_keys(keys: Iterable[str], source: str, model_class=None) -> list[str]:
    """Warn (:class:`UnknownConfigKeyWarning`, once per key and process) about the keys nobody knows; returns them."""
    known = known_config_keys(model_class)
    unknown = [k for k in keys if isinstance(k, str) and k not in known]
    for key in unknown:
        if key not in _WARNED:
            _WARNED.add(key)
            UNKNOWN_KEY_MESSAGES.append(unknown_key_message(key, source, known))
            warnings.warn(UNKNOWN_KEY_MESSAGES[-1], UnknownConfigKeyWarning, stacklevel=3)
    return unknown


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


def merged_dataset_dir(dataset: str) -> str:
    """Where the merge of ``source_datasets`` named ``dataset`` is built: ``<cache root>/merged/<dataset>``."""
    from recbole_mm.paths import cache_root

    return os.path.join(cache_root(), "merged", dataset)


def build_source_merge(data_path: str, dataset: str, sources) -> str:
    """Merge the dataset folders ``sources`` of ``data_path`` into one named ``dataset`` (built once, reused while
    the sources are unchanged); returns its folder."""
    from recbole_mm.data.merge import merge_datasets

    if isinstance(sources, str):
        if "," in sources:
            raise ValueError(f"source_datasets is one string {sources!r}: give a list, e.g. "
                             f"\"source_datasets=[{', '.join(x.strip() for x in sources.split(','))}]\"")
        sources = [sources]
    if not isinstance(sources, (list, tuple)) or not sources or not all(isinstance(x, str) for x in sources):
        raise ValueError(f"source_datasets must be a list of dataset names (folders of data_path), got {sources!r}")
    if dataset in sources:
        raise ValueError(f"dataset {dataset!r} names the merge of source_datasets {list(sources)}: give it a name of "
                         f"its own (e.g. dataset: {'+'.join(sources)})")
    pairs = [(os.path.dirname(dataset_dir(data_path, name)), name) for name in sources]
    return merge_datasets(pairs, os.path.dirname(merged_dataset_dir(dataset)), dataset)


def dataset_dir(data_path: str, dataset: str, sources=None) -> str:
    """Folder of a dataset: ``<data_path>/<dataset>``, the build cache for embedded datasets not found there, or the
    merge of ``sources`` (``source_datasets``)."""
    from recbole_mm.data.embedded import EMBEDDED_DATASETS, embedded_dataset_dir

    if sources:
        return merged_dataset_dir(dataset)
    candidate = os.path.join(data_path, dataset)
    if not os.path.isdir(candidate) and os.path.isdir(merged_dataset_dir(dataset)):
        return merged_dataset_dir(dataset)  # a merge built earlier, named without its source_datasets
    if dataset in EMBEDDED_DATASETS and not os.path.isdir(candidate):
        return embedded_dataset_dir(dataset)
    return candidate


class Config(RecBoleConfig):
    """RecBole's Config; finds plugin models (by name or class), layers the plugin's yaml and warns about unknown
    keys (module doc)."""

    def _load_config_files(self, file_list):
        self._file_keys = [(file, yaml_keys(file)) for file in file_list or ()]
        return super()._load_config_files(file_list)

    def _check_external_keys(self, model_class) -> None:
        for file, keys in getattr(self, "_file_keys", ()):
            warn_unknown_keys(sorted(keys), f"config file {file}", model_class)
        warn_unknown_keys(list(self.variable_config_dict), "config_dict", model_class)
        warn_unknown_keys(list(self.cmd_config_dict), "the command line (--key=value)", model_class)

    def __setstate__(self, state):
        self.__dict__.update(state)
        compat.recbole_numpy_settings(self)  # np.float ...: RecBole sets them only when a Config is constructed

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
        self._check_external_keys(model_class)
        for file in plugin_yaml_files(model_class, dataset):
            self._update_internal_config_dict(file)
        data_path = self.external_config_dict.get("data_path", self.internal_config_dict.get("data_path", "dataset/"))
        sources = self.external_config_dict.get("source_datasets")
        if sources:  # several dataset folders as one: built here, so that its yaml is layered below
            build_source_merge(data_path, dataset, sources)
        folder_yaml = os.path.join(dataset_dir(data_path, dataset, sources), f"{dataset}.yaml")
        if os.path.isfile(folder_yaml):
            warn_unknown_keys(sorted(yaml_keys(folder_yaml)), f"dataset yaml {folder_yaml}", model_class)
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
        if cfg.get("MODEL_TYPE") == ModelType.TRADITIONAL and "train_neg_sample_args" not in self.external_config_dict:
            # nothing is learned by gradient; RecBole's Pop even counts every row of its batches, so sampled
            # negatives would become popularity (and "new" items would get counts)
            cfg["train_neg_sample_args"] = None
        super()._set_default_parameters()
        _check_protocol_keys(cfg)
        if cfg.get("pretrained_path"):  # trials and workers may run in another working directory
            cfg["pretrained_path"] = os.path.abspath(os.path.expanduser(cfg["pretrained_path"]))
        if self.dataset != "ml-100k":
            base = self.external_config_dict.get("data_path", self.internal_config_dict.get("data_path", "dataset/"))
            cfg["data_path"] = dataset_dir(base, self.dataset, cfg.get("source_datasets"))


def _check_protocol_keys(cfg) -> None:
    """Clear errors for the evaluation-protocol keys (recbole_mm/data/protocol.py)."""
    threshold, quantile = cfg.get("cold_item_threshold"), cfg.get("cold_item_quantile")
    if threshold is not None and (not isinstance(threshold, int) or isinstance(threshold, bool) or threshold < 1):
        raise ValueError(f"cold_item_threshold must be an integer >= 1 (cold items have 1..t training interactions), "
                         f"or ~ to use cold_item_quantile; got {threshold!r}")
    if quantile is not None and not (isinstance(quantile, (int, float)) and 0 < quantile < 1):
        raise ValueError(f"cold_item_quantile must be in (0, 1) (the share of training interactions in the long "
                         f"tail), or ~ to disable cold metrics; got {quantile!r}")
