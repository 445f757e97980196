"""Model registry: the bottom of the package's import graph (it imports no other recbole_mm module).

Plugin models register with :func:`register_model`. :func:`get_model` checks the registry first and falls back to
RecBole's stock models (SASRec, BPR, ...), so those run through the plugin's entry points unchanged. The lookups
here are pure: :func:`register_model`, :func:`unregister_model`, :func:`get_model`, :func:`is_model`,
:func:`list_models`, :func:`model_class_of`. The plugin's own models are discovered on the first lookup by the
hooks the package adds (:func:`add_discovery_hook`; ``recbole_mm/__init__.py`` adds the import of
``recbole_mm.model``), so nothing here refers to a layer above.

Dispatch never depends on a module path (RecBole-GNN#41): a model class names what it needs as class
attributes, read by the layers above:

- ``type`` (``recbole.utils.ModelType``) and ``input_type`` (``recbole.utils.InputType``), as in RecBole;
- ``dataset_class``: the Dataset class to build (:func:`recbole_mm.data.utils.get_dataset_class`; default:
  RecBole's class for the model type, or the multimodal dataset classes of :mod:`recbole_mm.data`);
- ``trainer_class``: the Trainer class (:func:`recbole_mm.trainer.utils.get_trainer`; default: RecBole's choice);
- ``config_file``: a yaml of defaults (:class:`recbole_mm.config.Config`); ``config_keys``: extra config keys the
  model reads that no yaml lists (they are then known to the unknown-key check).

Making RecBole's own entry points find plugin models is :func:`recbole_mm.patch.install`.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import pkgutil
import re
from typing import Optional

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


_DISCOVERY_HOOKS: list = []


def add_discovery_hook(hook) -> None:
    """``hook()`` imports modules that register models; every lookup runs the hooks first (once each). The package
    adds the one that imports :mod:`recbole_mm.model`, so the registry itself depends on nothing above it."""
    if hook not in _DISCOVERY_HOOKS:
        _DISCOVERY_HOOKS.append(hook)


_DISCOVERED: set = set()


def _ensure_plugin_models_imported() -> None:
    for hook in list(_DISCOVERY_HOOKS):
        if hook not in _DISCOVERED:
            _DISCOVERED.add(hook)
            try:
                hook()
            except BaseException:
                _DISCOVERED.discard(hook)  # a failed import is retried (and raises again) at the next lookup
                raise


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
    known = list_models()
    close = [n for n in known if n.lower() == str(model_name).lower()]
    close = close or difflib.get_close_matches(str(model_name), known, n=1, cutoff=0.75)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise UnknownModelError(
        f"unknown model {model_name!r}{hint}; known models: {', '.join(known)}"
    )


def model_class_of(config) -> type:
    """The model class of a Config (the class itself when one was passed, registered or not)."""
    cls = config.__dict__.get("model_class") if hasattr(config, "__dict__") else None
    return cls if isinstance(cls, type) else get_model(config["model"])
