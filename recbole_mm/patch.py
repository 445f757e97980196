"""Make RecBole's own entry points find plugin models, and apply :mod:`recbole_mm.compat`'s shims, lazily.

``import recbole_mm`` must stay cheap (no torch, recbole or ray: ``recbole-mm --help`` answers in well under a
second), yet RecBole's own ``recbole.quick_start.run_recbole`` / ``objective_function`` /
``load_data_and_model`` must find plugin models after it. So :func:`watch` (run by ``import recbole_mm``)
registers post-import hooks on the modules concerned, through a ``sys.meta_path`` finder that wraps their
loader; each hook runs right after its module finished executing, or at once when the module was already
imported:

========================================  ==================================================================
module                                    hook
========================================  ==================================================================
``numpy``                                 the numpy 1 aliases RecBole / ray read (``np.float_``, ``np.bool8``)
``torch``                                 remember its thread count (:mod:`recbole_mm.threads`)
``recbole.utils``                         ``get_model`` -> :func:`recbole_mm.registry.get_model`
``recbole.config.configurator``           the same for the name RecBole's Config bound
RecBole's checkpoint load sites           ``torch.load`` defaults to ``weights_only=False`` there (compat)
``...sequential_recommender.sine``        switch off the anomaly detection ``sine.py`` turns on
``...general_recommender.pop``            Pop counts an item once per batch however often it occurs: count all
``recbole.quick_start``                   :func:`install` (everything below)
========================================  ==================================================================

Distributed runs (:mod:`recbole_mm.distributed`; RecBole 1.2.1 runs them on CUDA only, with approximate metrics);
each patch changes nothing in a single-process run:

==============================================  ============================================================
``Config._init_device``                         gloo + CPU without GPUs, NCCL + ``cuda:local_rank`` with them
                                                (RecBole: NCCL and CUDA always); rank ``offset + local_rank``
``AbstractTrainer.__init__``                    DDP without ``device_ids`` on the CPU (RecBole passes
                                                ``[local_rank]``, a CUDA index); SyncBatchNorm on GPUs only;
                                                ``broadcast_buffers=False`` (most buffers are frozen content
                                                tables: no copy of them at every step; BatchNorm statistics are
                                                sent from rank 0 before each evaluation, and per-rank random
                                                draws such as FREEDOM's pruned graph stay per rank)
``AbstractDataLoader.__init__``                 evaluation loaders: each rank takes ``rows[rank::world]``,
                                                without the sampler's padding (repeated rows)
``Collector.get_data_struct``                   the evaluated rows of every rank are gathered before the metrics;
                                                ``.cpu()`` only on tensors (RecBole's fails on ``data.num_items``)
``Trainer._map_reduce``                         then nothing to average: the result is already global (RecBole
                                                averages per-rank metrics, exact only for equal shares)
``get_tensorboard`` (trainer)                   ranks other than 0 write no tensorboard files
``ensure_dir`` (utils, logger, trainer, data)   ``exist_ok``: processes starting together race on log/, saved/
==============================================  ============================================================

:func:`install` (also ``recbole_mm.install()``, idempotent) replaces every binding RecBole's quick start uses:
``get_model`` (four modules), ``get_trainer``, ``create_dataset``, ``Config`` (the plugin's: plugin yaml,
unknown-key warnings), ``get_flops`` (never fatal) and ``load_data_and_model`` (plugin models, trusted load, numpy
settings for the unpickled Config). Each replacement falls back to RecBole's behaviour for RecBole's models.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
import threading
from typing import Callable

from recbole_mm import compat, registry, threads

_HOOKS: dict[str, list[Callable]] = {}
_LOCK = threading.RLock()
_STATE = {"install": "no"}  # no | running | done


def _hook_loader(loader, name: str) -> None:
    """Run the module's hooks after ``loader.exec_module``. The loader object is the module's own (finders make
    one per spec), so the wrapper is set on the instance and the loader keeps its type."""
    exec_module = loader.exec_module

    def exec_then_hooks(module):
        exec_module(module)
        _run_hooks(name, module)

    loader.exec_module = exec_then_hooks


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for a hooked module, asks the other finders and hooks the loader they return."""

    _busy = threading.local()

    def find_spec(self, fullname, path, target=None):
        if fullname not in _HOOKS or getattr(self._busy, fullname, False):
            return None
        setattr(self._busy, fullname, True)
        try:
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                        _hook_loader(spec.loader, fullname)
                    return spec
            return None
        finally:
            setattr(self._busy, fullname, False)


_FINDER = _PostImportFinder()


def _run_hooks(name: str, module) -> None:
    for hook in _HOOKS.get(name, ()):
        hook(module)


def when_imported(name: str, hook: Callable) -> None:
    """Run ``hook(module)`` once module ``name`` has finished importing (now, when it already has)."""
    with _LOCK:
        _HOOKS.setdefault(name, []).append(hook)
        if _FINDER not in sys.meta_path:
            sys.meta_path.insert(0, _FINDER)
    module = sys.modules.get(name)
    if module is not None and getattr(getattr(module, "__spec__", None), "_initializing", False) is False:
        hook(module)


def _patch_get_model(module) -> None:
    module.get_model = registry.get_model
    if module.__name__ == "recbole.utils":
        sys.modules["recbole.utils.utils"].get_model = registry.get_model


_WATCHED = False


def watch() -> None:
    """Register the post-import hooks (idempotent; cheap: imports nothing)."""
    global _WATCHED
    with _LOCK:
        if _WATCHED:
            return
        _WATCHED = True
    when_imported("numpy", lambda m: compat.apply_numpy_aliases())
    when_imported("torch", threads.record_torch_default)
    when_imported("recbole.utils", _patch_get_model)
    when_imported("recbole.config.configurator", _patch_get_model)
    for name in compat.RECBOLE_LOAD_SITES:
        when_imported(name, compat.trust_checkpoint_loads_in)
    when_imported("recbole.model.sequential_recommender.sine", compat.undo_recbole_anomaly_mode)
    when_imported("recbole.model.general_recommender.pop", compat.fix_pop_counts)
    when_imported("scipy.sparse", compat.restore_dok_update)
    when_imported("recbole.quick_start", lambda m: install())
    when_imported("recbole.config.configurator", _patch_init_device)
    when_imported("recbole.trainer.trainer", _patch_trainer)
    when_imported("recbole.evaluator.collector", _patch_collector)
    when_imported("recbole.data.dataloader.abstract_dataloader", _patch_dataloader)
    for name in _ENSURE_DIR_SITES:
        when_imported(name, _patch_ensure_dir)


# ------------------------------------------------------------------------------------------- distributed runs
_ENSURE_DIR_SITES = ("recbole.utils.utils", "recbole.utils", "recbole.utils.logger", "recbole.trainer.trainer",
                     "recbole.data.dataset.dataset", "recbole.data.utils")


def _ensure_dir(dir_path):
    """RecBole's ``ensure_dir`` (``if not exists: makedirs``) raises FileExistsError when another process of a
    distributed run creates the folder in between (log/, saved/, log_tensorboard/)."""
    import os

    os.makedirs(dir_path, exist_ok=True)


def _patch_ensure_dir(module) -> None:
    if getattr(module, "ensure_dir", None) is not None:
        module.ensure_dir = _ensure_dir


def _patch_init_device(module) -> None:
    """``Config._init_device``: the distributed branch by :func:`recbole_mm.distributed.init_device` (backend by
    device; RecBole's asserts ``len(gpu_id) >= nproc`` and calls NCCL / CUDA unconditionally)."""
    cls = module.Config
    original = cls._init_device
    if getattr(original, "recbole_mm", False):
        return

    def _init_device(self):
        if "local_rank" not in self.final_config_dict:
            return original(self)
        from recbole_mm import distributed

        distributed.init_device(self)

    _init_device.recbole_mm = True
    cls._init_device = _init_device


def _patch_trainer(module) -> None:
    """DDP that also runs on the CPU, metrics computed from every rank's rows, tensorboard on rank 0 only."""
    abstract = module.AbstractTrainer
    if getattr(abstract.__init__, "recbole_mm", False):
        return

    def __init__(self, config, model):
        import torch
        from torch.nn.parallel import DistributedDataParallel

        self.config = config
        self.model = model
        if not config["single_spec"]:
            device = torch.device(config["device"])
            if device.type == "cuda":  # SyncBatchNorm runs on accelerators only (it raises on CPU tensors)
                self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            # Gradients are averaged by DDP's hooks, armed by RecBole's set_reduce_hook at every step. Buffers are not
            # re-broadcast before every step: most are frozen content tables (MMTrainer sends rank 0's BatchNorm
            # statistics before each evaluation instead)
            # (torch >= 2.14 names the switch forward_sync_buffers and deprecates broadcast_buffers)
            import inspect

            ddp_args = inspect.signature(DistributedDataParallel).parameters
            sync = "forward_sync_buffers" if "forward_sync_buffers" in ddp_args else "broadcast_buffers"
            # DDP broadcasts rank 0's buffers once at construction (torch >= 2.14 even with forward_sync_buffers
            # False); gloo and NCCL cannot broadcast sparse tensors ("No support for sparse tensors"), so sparse
            # buffers (FMMRec's user x item matrix; every rank builds them from the same training data) are left out
            sparse = {name for name, b in self.model.named_buffers() if b.is_sparse}
            if sparse:
                ignored = set(getattr(self.model, "_ddp_params_and_buffers_to_ignore", ()))
                self.model._ddp_params_and_buffers_to_ignore = sorted(ignored | sparse)
            self.distributed_model = DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None, **{sync: False})

    __init__.recbole_mm = True
    abstract.__init__ = __init__

    def _map_reduce(self, result, num_sample):
        return result  # the collector gathered every rank's rows (_patch_collector): the metrics are global

    module.Trainer._map_reduce = _map_reduce
    get_tensorboard = module.get_tensorboard

    def rank0_tensorboard(logger):
        from recbole_mm import distributed

        if distributed.is_main_process():
            return get_tensorboard(logger)
        return _NullWriter()

    module.get_tensorboard = rank0_tensorboard


class _NullWriter:
    """A SummaryWriter that writes nothing (ranks other than 0)."""

    log_dir = None

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def _patch_collector(module) -> None:
    cls = module.Collector
    original = cls.get_data_struct
    if getattr(original, "recbole_mm", False):
        return

    def get_data_struct(self):
        import copy

        import torch

        from recbole_mm import distributed

        if distributed.is_distributed():  # every rank's evaluated rows, then RecBole's metrics on all of them
            distributed.gather_struct(self.data_struct)
        # RecBole 1.2.1 calls .cpu() on every value: the int data.num_items and the Counter data.count_items
        # (ItemCoverage, GiniIndex, AveragePopularity, TailPercentage) made it fail with AttributeError
        data = self.data_struct._data_dict
        plain = {k: v for k, v in data.items() if not torch.is_tensor(v)}
        for k in plain:
            del data[k]
        try:
            returned = original(self)
        finally:
            data.update(plain)
        returned._data_dict.update(copy.deepcopy(plain))
        return returned

    get_data_struct.recbole_mm = True
    cls.get_data_struct = get_data_struct


def _patch_dataloader(module) -> None:
    cls = module.AbstractDataLoader
    original = cls.__init__
    if getattr(original, "recbole_mm", False):
        return

    def __init__(self, config, dataset, sampler, shuffle=False):
        original(self, config, dataset, sampler, shuffle=shuffle)
        if not config["single_spec"]:
            from recbole.data.dataloader.general_dataloader import FullSortEvalDataLoader, NegSampleEvalDataLoader

            if isinstance(self, (FullSortEvalDataLoader, NegSampleEvalDataLoader)):
                from recbole_mm import distributed

                if self.sample_size < distributed.get_world_size():  # a rank without rows would skip the gather
                    raise ValueError(f"an evaluation split has {self.sample_size} rows, fewer than the "
                                     f"{distributed.get_world_size()} processes: run with fewer processes")
                distributed.unpad_sampler(self.sampler, self.sample_size)

    __init__.recbole_mm = True
    cls.__init__ = __init__


def install() -> None:
    """Make RecBole's own entry points find plugin models, yaml, dataset and trainer classes. Idempotent."""
    with _LOCK:
        if _STATE["install"] != "no":  # done, or running (importing recbole.quick_start below re-enters)
            return
        _STATE["install"] = "running"
    try:
        _install()
    except BaseException:
        _STATE["install"] = "no"
        raise
    _STATE["install"] = "done"


def _install() -> None:
    watch()
    compat.apply_numpy_aliases()
    # By name from sys.modules: this may run inside the import of recbole.quick_start (its post-import hook),
    # before the import system sets the submodule as an attribute of its parent package.
    modules = {name: importlib.import_module(name) for name in (
        "recbole.config", "recbole.config.configurator", "recbole.data", "recbole.data.utils", "recbole.quick_start",
        "recbole.quick_start.quick_start", "recbole.utils", "recbole.utils.utils")}
    configurator, data_utils = modules["recbole.config.configurator"], modules["recbole.data.utils"]
    qs, utils_utils = modules["recbole.quick_start.quick_start"], modules["recbole.utils.utils"]

    from recbole_mm import quick_start as mm_qs
    from recbole_mm.config import Config
    from recbole_mm.data.utils import create_dataset, data_preparation
    from recbole_mm.trainer.utils import get_trainer

    for module in (modules["recbole.utils"], utils_utils, configurator, qs):
        module.get_model = registry.get_model
    for module in (modules["recbole.utils"], utils_utils, qs):
        module.get_trainer = get_trainer
    for module in (modules["recbole.data"], data_utils, qs):
        module.create_dataset = create_dataset
    # saved dataloaders checked against the dataset files (ours calls recbole.data.utils' own, left in place)
    for module in (modules["recbole.data"], qs):
        module.data_preparation = data_preparation
    # RecBole's quick start builds its Config by name: give it the plugin's (same class contract).
    qs.Config = Config
    modules["recbole.config"].Config = Config
    qs.get_flops = compat.safe_get_flops  # thop fails on peft adapters; RecBole calls it unconditionally
    # RecBole's load_data_and_model loads with bare torch.load, RecBole's get_model, and no numpy settings.
    qs.load_data_and_model = mm_qs.load_data_and_model
    modules["recbole.quick_start"].load_data_and_model = mm_qs.load_data_and_model
    compat.undo_recbole_anomaly_mode()  # the load sites and sine.py are handled by watch()'s hooks
