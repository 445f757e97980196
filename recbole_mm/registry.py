"""Model registry and the lookups RecBole's entry points use (model, trainer, dataset class).

Plugin models register with :func:`register_model`. Every lookup checks the registry first and falls back to
RecBole, so RecBole's stock models (SASRec, BPR, ...) run through the plugin's entry points unchanged.

Dispatch never depends on a module path (RecBole-GNN#41): a model class names what it needs as class
attributes:

- ``type`` (``recbole.utils.ModelType``) and ``input_type`` (``recbole.utils.InputType``), as in RecBole;
- ``dataset_class``: the Dataset class to build (default: RecBole's class for the model type, or the
  multimodal dataset classes of :mod:`recbole_mm.data` when ``needs_item_content`` is true);
- ``trainer_class``: the Trainer class (default: RecBole's choice for the model type).

:func:`install` makes RecBole's own ``recbole.quick_start.run_recbole`` / ``objective_function`` /
``load_data_and_model`` find plugin models too: RecBole binds ``get_model`` by name in four modules and
``get_trainer`` / ``create_dataset`` / ``Config`` in ``recbole.quick_start.quick_start``; each binding is
replaced by the plugin's (which falls back to RecBole's).
"""

from __future__ import annotations

import fnmatch
import importlib
import pkgutil
import re
from typing import Callable, Optional, Type

_MODELS: dict[str, type] = {}
_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_RECBOLE_SUBPACKAGES = (
    "general_recommender",
    "context_aware_recommender",
    "sequential_recommender",
    "knowledge_aware_recommender",
)


class UnknownModelError(ValueError):
    pass


def register_model(cls: Optional[type] = None, *, name: Optional[str] = None):
    """Class decorator: ``@register_model`` or ``@register_model(name="MyModel")``.

    Checks, at import time: the class is a RecBole ``AbstractRecommender`` with ``type`` and ``input_type``;
    the name is an identifier; no other class is registered under the name; the name does not shadow one of
    RecBole's stock models.
    """

    def wrap(model_cls: type) -> type:
        from recbole.model.abstract_recommender import AbstractRecommender

        model_name = name or model_cls.__name__
        if not _NAME_RE.match(model_name):
            raise ValueError(f"model name {model_name!r} must be an identifier (letters, digits, _)")
        if not (isinstance(model_cls, type) and issubclass(model_cls, AbstractRecommender)):
            raise TypeError(f"{model_cls!r} is not a subclass of recbole's AbstractRecommender")
        for attr in ("type", "input_type"):
            if getattr(model_cls, attr, None) is None:
                raise TypeError(f"model {model_name} must define the class attribute {attr!r} (see RecBole models)")
        existing = _MODELS.get(model_name)
        if existing is not None and existing is not model_cls:
            if (existing.__module__, existing.__qualname__) != (model_cls.__module__, model_cls.__qualname__):
                raise ValueError(
                    f"model name {model_name!r} is already registered by {existing.__module__}.{existing.__qualname__}"
                )
        if model_name.lower() in _recbole_model_files():
            raise ValueError(f"model name {model_name!r} is one of RecBole's stock models; choose another name")
        _MODELS[model_name] = model_cls
        return model_cls

    return wrap(cls) if cls is not None else wrap


def unregister_model(name: str) -> None:
    _MODELS.pop(name, None)


_recbole_files_cache: Optional[dict] = None


def _recbole_model_files() -> dict[str, str]:
    """lower-case module name -> RecBole subpackage, for RecBole's stock models (without importing them)."""
    global _recbole_files_cache
    if _recbole_files_cache is None:
        import recbole.model

        found = {}
        base = recbole.model.__path__[0]
        for sub in _RECBOLE_SUBPACKAGES:
            for info in pkgutil.iter_modules([f"{base}/{sub}"]):
                found[info.name] = sub
        _recbole_files_cache = found
    return _recbole_files_cache


def _recbole_get_model(model_name: str) -> type:
    sub = _recbole_model_files().get(model_name.lower())
    if sub is None:
        raise UnknownModelError(model_name)
    module = importlib.import_module(f"recbole.model.{sub}.{model_name.lower()}")
    model_cls = getattr(module, model_name, None)
    if not isinstance(model_cls, type):
        raise UnknownModelError(model_name)
    return model_cls


def list_models(pattern: Optional[str] = None, source: str = "all") -> list[str]:
    """Registered plugin models and RecBole's stock models, sorted; ``pattern`` is a glob (case-insensitive).

    ``source``: "all", "plugin" or "recbole".
    """
    _ensure_plugin_models_imported()
    names = []
    if source in ("all", "plugin"):
        names += list(_MODELS)
    if source in ("all", "recbole"):
        names += [_stock_class_name(n) for n in _recbole_model_files()]
    if pattern:
        names = [n for n in names if fnmatch.fnmatch(n.lower(), pattern.lower())]
    return sorted(set(names), key=str.lower)


_STOCK_NAMES: dict[str, str] = {}


def _stock_class_name(file_name: str) -> str:
    """Class name of a stock RecBole model from its file name (read from the file, not imported)."""
    if file_name not in _STOCK_NAMES:
        import recbole.model

        sub = _recbole_model_files()[file_name]
        path = f"{recbole.model.__path__[0]}/{sub}/{file_name}.py"
        cls_name = file_name
        try:
            with open(path, encoding="utf-8") as f:
                for m in re.finditer(r"^class (\w+)\(", f.read(), re.M):
                    if m.group(1).lower() == file_name:
                        cls_name = m.group(1)
                        break
        except OSError:
            pass
        _STOCK_NAMES[file_name] = cls_name
    return _STOCK_NAMES[file_name]


def is_model(name: str) -> bool:
    try:
        get_model(name)
        return True
    except UnknownModelError:
        return False


def _ensure_plugin_models_imported() -> None:
    importlib.import_module("recbole_mm.model")


def get_model(model_name) -> type:
    """Model class by name (plugin registry first, then RecBole) or the class itself.

    Raises :class:`UnknownModelError` ("unknown model 'X'; known models: ...") for an unknown name, instead of
    RecBole's ``ModuleNotFoundError: lightgbm`` from probing its exlib package.
    """
    if isinstance(model_name, type):
        return model_name
    _ensure_plugin_models_imported()
    if model_name in _MODELS:
        return _MODELS[model_name]
    try:
        return _recbole_get_model(str(model_name))
    except UnknownModelError:
        pass
    close = [n for n in list_models() if n.lower() == str(model_name).lower()]
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise UnknownModelError(
        f"unknown model {model_name!r}{hint}; known models: {', '.join(list_models())}"
    )


def get_trainer(model_type, model_name) -> type:
    """Trainer class: the model's ``trainer_class`` attribute, else RecBole's choice for the model; where
    RecBole would use its generic ``Trainer``, :class:`~recbole_mm.trainer.MMTrainer` (the same loop plus
    cold-item metrics and metering)."""
    from recbole.utils.utils import get_trainer as recbole_get_trainer

    try:
        model_cls = get_model(model_name)
    except UnknownModelError:
        model_cls = None
    trainer_cls = getattr(model_cls, "trainer_class", None)
    if trainer_cls is not None:
        return trainer_cls
    name = model_name if isinstance(model_name, str) else model_name.__name__
    chosen = _ORIGINALS.get("get_trainer", recbole_get_trainer)(model_type, name)
    from recbole.trainer import Trainer

    if chosen is Trainer:  # RecBole's generic loop: use the superset with cold-item metrics and metering
        from recbole_mm.trainer import MMTrainer

        return MMTrainer
    return chosen


def model_class_of(config) -> type:
    """The model class of a Config (the class itself when one was passed, registered or not)."""
    cls = config.__dict__.get("model_class") if hasattr(config, "__dict__") else None
    return cls if isinstance(cls, type) else get_model(config["model"])


def get_dataset_class(config) -> type:
    """Dataset class for ``config['model']``: the model's ``dataset_class`` attribute, else by model type."""
    from recbole.utils import ModelType

    from recbole_mm.data.dataset import MMDataset, MMSequentialDataset

    model_cls = model_class_of(config)
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


_ORIGINALS: dict[str, Callable] = {}
_INSTALLED = False


def install() -> None:
    """Make RecBole's own entry points find plugin models, yaml, dataset and trainer classes. Idempotent."""
    global _INSTALLED
    if _INSTALLED:
        return
    import recbole.config
    import recbole.config.configurator as configurator
    import recbole.data
    import recbole.data.utils as data_utils
    import recbole.quick_start
    import recbole.quick_start.quick_start as qs
    import recbole.utils
    import recbole.utils.utils as utils_utils

    from recbole_mm import compat
    from recbole_mm.config import Config
    from recbole_mm.data.utils import create_dataset
    from recbole_mm import quick_start as mm_qs

    _ORIGINALS["get_model"] = utils_utils.get_model
    _ORIGINALS["get_trainer"] = utils_utils.get_trainer
    _ORIGINALS["create_dataset"] = data_utils.create_dataset

    for module in (recbole.utils, utils_utils, configurator, qs):
        module.get_model = get_model
    for module in (recbole.utils, utils_utils, qs):
        module.get_trainer = get_trainer
    for module in (recbole.data, data_utils, qs):
        module.create_dataset = create_dataset
    # RecBole's quick start builds its Config by name: give it the plugin's (same class contract).
    qs.Config = Config
    recbole.config.Config = Config
    qs.get_flops = compat.safe_get_flops  # thop fails on peft adapters; RecBole calls it unconditionally
    # RecBole's load_data_and_model loads with bare torch.load and RecBole's get_model.
    qs.load_data_and_model = mm_qs.load_data_and_model
    recbole.quick_start.load_data_and_model = mm_qs.load_data_and_model
    compat.trust_recbole_checkpoint_loads()
    compat.undo_recbole_anomaly_mode()
    _INSTALLED = True
