"""recbole_mm: multimodal recommendation (item text and images) for RecBole 1.2.1.

Public API::

    import recbole_mm
    recbole_mm.run_recbole(model="MoRec", dataset="ml-100k-mm", config_dict={...})
    recbole_mm.run(model="MoRec", dataset="ml-100k-mm", nproc=2)   # torch.distributed (gloo on CPU, NCCL on GPUs)
    recbole_mm.ray_tune(model="MoRec", dataset=..., params_dict=...)  # Ray Tune trials side by side
    recbole_mm.objective_function        # for recbole.trainer.HyperTuning
    recbole_mm.load_data_and_model(path)
    recbole_mm.evaluate_checkpoint(path)  # evaluate a saved run again, with its protocol (cold / new / branches)
    recbole_mm.register_model            # decorator for your own models
    recbole_mm.list_models()
    recbole_mm.install()                 # patch RecBole's own entry points now (otherwise: on their import)

Importing the package is cheap: it imports neither torch nor recbole nor ray (``recbole-mm --help`` stays fast).
The entry points load on first use (module ``__getattr__``). It also registers post-import hooks
(:func:`recbole_mm.patch.watch`), so that RecBole's own entry points (``recbole.quick_start.run_recbole``,
``objective_function``, ``load_data_and_model``) find plugin models and their yaml as soon as
``recbole.quick_start`` is imported (or at once, if it already is).
"""

from recbole_mm._version import __version__
from recbole_mm import patch as _patch
from recbole_mm.patch import install
from recbole_mm.registry import get_model, is_model, list_models, register_model

_patch.watch()


def _discover_plugin_models() -> None:
    """Import the plugin's model package (its classes register themselves); run by the registry on first lookup."""
    import recbole_mm.model  # noqa: F401


from recbole_mm import registry as _registry  # noqa: E402

_registry.add_discovery_hook(_discover_plugin_models)

__all__ = [
    "Config",
    "__version__",
    "evaluate_checkpoint",
    "get_model",
    "install",
    "is_model",
    "list_models",
    "load_data_and_model",
    "objective_function",
    "ray_tune",
    "register_model",
    "run",
    "run_recbole",
]

_LAZY = ("Config", "evaluate_checkpoint", "load_data_and_model", "objective_function", "ray_tune", "run", "run_recbole")


def __getattr__(name):
    """The entry points that need torch / recbole, imported on first access."""
    if name == "Config":
        from recbole_mm.config import Config

        return Config
    if name in ("evaluate_checkpoint", "load_data_and_model", "objective_function", "run", "run_recbole"):
        from recbole_mm import quick_start

        return getattr(quick_start, name)
    if name == "ray_tune":
        from recbole_mm.tuning import ray_tune

        return ray_tune
    raise AttributeError(f"module 'recbole_mm' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
