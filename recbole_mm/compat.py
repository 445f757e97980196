"""The few shims RecBole 1.2.1 needs on today's numpy / pandas / torch / setuptools.

Importing this module is cheap (no numpy, torch or recbole). :mod:`recbole_mm.patch` applies each shim when the
module it is about finishes importing (or at once when it already has): the numpy aliases after ``numpy``, the
trusted checkpoint loads after each of RecBole's load sites, the anomaly switch after RecBole's ``sine.py``.

Each shim says why it exists; ``tests/test_compat.py`` has a test per shim that fails without it.

- numpy 2 removed ``np.float_``, ``np.complex_``, ``np.unicode_`` and ``np.bool8``. RecBole's
  ``Config.compatibility_settings`` reads ``np.float_`` on every Config, and ray's tensorboard logger reads
  ``np.bool8`` at import (``recbole.quick_start`` imports ray). Ray worker processes need the same aliases:
  :func:`ray_init_kwargs` passes :func:`apply_numpy_aliases` as their ``worker_process_setup_hook``.
- RecBole's ``Config.compatibility_settings`` also sets ``np.float``, ``np.bool``, ``np.int`` ... which its
  metrics and data code use, but only when a Config is *constructed*. A Config unpickled from a checkpoint in a
  new process (``load_data_and_model`` then ``trainer.evaluate``) never runs it: ``numpy has no attribute
  float``. :func:`recbole_numpy_settings` runs it for an existing Config (``recbole_mm.config.Config``'s
  ``__setstate__`` and both ``load_data_and_model``s call it).
- torch >= 2.6 loads with ``weights_only=True``; RecBole's checkpoints pickle the whole Config (protocol 4,
  which the weights-only unpickler rejects outright). RecBole only ever loads checkpoints its own trainer
  wrote, so :func:`trust_recbole_checkpoint_loads` gives exactly RecBole's load sites (trainer resume / best
  model, the pretrain loaders of a few stock models) a ``torch`` whose ``load`` defaults to
  ``weights_only=False``. Nothing else in the process changes; our own loaders pass ``weights_only=False``
  explicitly.
- ``recbole/model/sequential_recommender/sine.py`` calls ``torch.autograd.set_detect_anomaly(True)`` at import,
  and looking up any sequential model (``get_model('SASRec')``) imports the whole package: every backward pass
  in the process then records stack traces (measured: small ops ~4x slower). :func:`undo_recbole_anomaly_mode`
  switches anomaly detection back off right after ``sine.py`` ran.
- RecBole's ``get_flops`` (thop) raises on models holding peft adapters ("attribute 'total_ops' already
  exists") and RecBole's ``run_recbole`` calls it unconditionally: :func:`safe_get_flops` honours
  ``count_flops: False`` and turns a failure into a logged warning.
- CE-loss sequential models (SASRec ...) fail in Config with RecBole's default uniform negative sampling;
  that fix lives in :class:`recbole_mm.config.Config` (``train_neg_sample_args`` defaults to ``None`` there).
- pandas 3 and setuptools >= 81 break RecBole too; they are pinned in setup.py (``pandas<3``,
  ``setuptools<81``) rather than shimmed.
- scipy >= 1.12 no longer makes ``dok_matrix`` a dict subclass, and its private ``_update`` is gone; RecBole's
  graph models (LightGCN, NGCF, SGL, ...) build their adjacency with ``dok_matrix._update(dict)``:
  :func:`restore_dok_update` gives ``dok_matrix`` an ``_update`` that fills its key store the same way.
- RecBole's ``Pop`` counts an item once per training batch however often it occurs there (indexed assignment
  does not accumulate), so its popularity depends on the batch size: :func:`fix_pop_counts` counts every
  occurrence. Traditional models (Pop, ItemKNN, EASE, ...) also get ``train_neg_sample_args: None`` by default
  (:class:`recbole_mm.config.Config`): Pop would count sampled negatives as interactions.
"""

from __future__ import annotations

import importlib
import sys
import types
import warnings

_NUMPY_ALIASES = {
    "float_": "float64",
    "complex_": "complex128",
    "unicode_": "str_",
    "bool8": "bool_",
}


def apply_numpy_aliases() -> None:
    """Restore the numpy 1 aliases RecBole 1.2.1 and ray 2.6 use (only where missing)."""
    import numpy as np

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for old, new in _NUMPY_ALIASES.items():
            try:
                getattr(np, old)
            except AttributeError:
                setattr(np, old, getattr(np, new))


def ray_init_kwargs(**kwargs) -> dict:
    """Keyword arguments for ``ray.init`` that apply the numpy aliases inside every Ray worker too, and hide
    setuptools' ``pkg_resources`` notice there (``PYTHONWARNINGS``, added to the user's own ``env_vars``)."""
    runtime_env = dict(kwargs.pop("runtime_env", None) or {})
    runtime_env.setdefault("worker_process_setup_hook", apply_numpy_aliases)
    # a worker imports ray (and its pkg_resources notice) before any package code runs: the filter goes in at start
    env_vars = dict(runtime_env.get("env_vars") or {})
    env_vars["PYTHONWARNINGS"] = ",".join(filter(None, [env_vars.get("PYTHONWARNINGS"), _PKG_RESOURCES_OPTION]))
    runtime_env["env_vars"] = env_vars
    return {"runtime_env": runtime_env, **kwargs}


_PKG_RESOURCES_OPTION = "ignore:pkg_resources is deprecated as an API:UserWarning"


class _TorchTrustedLoad(types.ModuleType):
    """``torch`` as seen by RecBole's modules: identical, except ``load`` defaults to ``weights_only=False``."""

    def __init__(self, torch_module):
        super().__init__("torch")
        self.__dict__["_torch"] = torch_module

    def __getattr__(self, name):
        return getattr(self.__dict__["_torch"], name)

    def load(self, *args, **kwargs):
        kwargs.setdefault("weights_only", False)
        return self.__dict__["_torch"].load(*args, **kwargs)


# RecBole modules that call torch.load on files RecBole itself wrote (checkpoints, pretrained stages).
RECBOLE_LOAD_SITES = (
    "recbole.trainer.trainer",
    "recbole.model.general_recommender.convncf",
    "recbole.model.general_recommender.nais",
    "recbole.model.general_recommender.ract",
    "recbole.model.general_recommender.neumf",
    "recbole.model.context_aware_recommender.kd_dagfm",
    "recbole.model.sequential_recommender.s3rec",
)


def trust_checkpoint_loads_in(module) -> None:
    """Give one of RecBole's load sites a ``torch`` whose ``load`` defaults to ``weights_only=False``."""
    import torch

    if getattr(module, "torch", None) is torch:
        module.torch = _TorchTrustedLoad(torch)


def trust_recbole_checkpoint_loads() -> None:
    """:func:`trust_checkpoint_loads_in` for every load site (imports them)."""
    for name in RECBOLE_LOAD_SITES:
        trust_checkpoint_loads_in(importlib.import_module(name))


def undo_recbole_anomaly_mode(module=None) -> None:
    """Switch off the anomaly detection RecBole's ``sine.py`` switched on at import (once it has run)."""
    if module is not None or "recbole.model.sequential_recommender.sine" in sys.modules:
        import torch

        torch.autograd.set_detect_anomaly(False)


def recbole_numpy_settings(config) -> None:
    """RecBole's ``Config.compatibility_settings`` (``np.float`` ...) for a Config that was not constructed here."""
    apply_numpy_aliases()
    settings = getattr(config, "compatibility_settings", None)
    if callable(settings):
        settings()


def safe_get_flops(model, dataset, device, logger, transform, verbose=False):
    """RecBole's ``get_flops``, skipped when ``count_flops`` is False and never fatal."""
    from recbole.utils.utils import get_flops

    config = getattr(dataset, "config", None)
    if config is not None and config["count_flops"] is False:
        return "not counted (count_flops: False)"
    try:
        return get_flops(model, dataset, device, logger, transform, verbose)
    except Exception as e:  # thop cannot trace every module (e.g. peft's LoRA layers)
        logger.warning(f"FLOPs not counted: {type(e).__name__}: {e}")
        return "not counted"


def _quiet_known_warnings() -> None:
    # Known, harmless noise of this stack; each message is matched exactly so that nothing else is hidden.
    for message in (
        r"pkg_resources is deprecated as an API.*",
        r"`torch.cuda.amp.GradScaler\(args...\)` is deprecated.*",
        r"is_gradient_checkpointing is deprecated.*",
    ):
        warnings.filterwarnings("ignore", message=message)
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"thop\..*")
    # pandas 2.x on RecBole's Dataset._fill_nan (``feat[field].fillna(..., inplace=True)``), once per float field
    warnings.filterwarnings("ignore", message=r"A value is trying to be set on a copy of a DataFrame or Series through "
                            r"chained assignment", category=FutureWarning, module=r"recbole\.data\.dataset\.dataset$")


def apply() -> None:
    _quiet_known_warnings()
    if "numpy" in sys.modules:
        apply_numpy_aliases()


apply()


def fix_pop_counts(module) -> None:
    """RecBole's Pop counts ``item_cnt[item] = item_cnt[item] + 1`` over a batch: an item that occurs k times in
    one batch is counted once (indexed assignment does not accumulate), so popularity depends on the batch size.
    Count every occurrence (``index_add_``); the rest of Pop is unchanged."""
    import torch

    pop = module.Pop
    if getattr(pop.calculate_loss, "_recbole_mm_fixed", False):
        return

    def calculate_loss(self, interaction):
        item = interaction[self.ITEM_ID]
        self.item_cnt.index_add_(0, item, torch.ones(len(item), 1, dtype=self.item_cnt.dtype, device=item.device))
        self.max_cnt = torch.max(self.item_cnt, dim=0)[0]
        return torch.nn.Parameter(torch.zeros(1)).to(self.device)

    calculate_loss._recbole_mm_fixed = True
    pop.calculate_loss = calculate_loss


def restore_dok_update(module) -> None:
    """``scipy.sparse.dok_matrix._update(dict)`` for RecBole's graph models (module docstring): the ``{(row, col):
    value}`` entries go into the matrix's key store in one ``dict.update``, as the old dict-based ``dok_matrix``
    did. Nothing happens where ``_update`` still exists."""
    for name in ("dok_matrix", "dok_array"):
        cls = getattr(module, name, None)
        if cls is None or hasattr(cls, "_update"):
            continue

        def _update(self, data):
            self._dict.update(data)

        cls._update = _update
