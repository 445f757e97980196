"""recbole_mm: multimodal recommendation (item text and images) for RecBole 1.2.1.

Public API::

    import recbole_mm
    recbole_mm.run_recbole(model="MoRec", dataset="ml-100k-mm", config_dict={...})
    recbole_mm.objective_function        # for recbole.trainer.HyperTuning
    recbole_mm.load_data_and_model(path)
    recbole_mm.register_model            # decorator for your own models
    recbole_mm.list_models()

Importing the package also makes RecBole's own entry points (``recbole.quick_start.run_recbole``,
``objective_function``, ``load_data_and_model``) find plugin models and their yaml (:func:`registry.install`).
"""

__version__ = "0.1.0"

from recbole_mm import compat  # noqa: E402,F401  (first: numpy aliases before recbole / ray import)
from recbole_mm.registry import get_model, list_models, register_model  # noqa: E402
from recbole_mm.quick_start import load_data_and_model, objective_function, run_recbole  # noqa: E402
from recbole_mm.config import Config  # noqa: E402
from recbole_mm import registry as _registry  # noqa: E402

_registry.install()

__all__ = [
    "Config",
    "get_model",
    "list_models",
    "load_data_and_model",
    "objective_function",
    "register_model",
    "run_recbole",
]
