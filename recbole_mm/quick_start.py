"""Entry points with RecBole's signatures and return values: ``run_recbole``, ``objective_function``,
``load_data_and_model``. They use the plugin's Config, registry and dataset classes, so plugin models, RecBole's
stock models and models passed as classes all run through them.

Differences from ``recbole.quick_start`` (all additive):

- ``model`` may be a name or a class (RecBole looks a class's name up again and fails outside recbole);
- ``objective_function`` reports to Ray Tune only inside a Ray session (RecBole logs a stack trace otherwise,
  RecBole#1741) and returns RecBole 1.2.1's dict with ``"model"`` and the trial's ``"checkpoint_file"``;
- a dataset folder copied from an embedded dataset (``ml-100k-mm``) under another name without its yaml is named as
  such, with the file to copy, instead of RecBole's "[timestamp] is not exist in interaction";
- the result dict of ``run_recbole`` also carries ``"cold_test_result"`` when the model computes cold-item
  metrics, the run's ``"efficiency"`` record (seconds per epoch, peak memory, trainable / total parameters), plus
  where the log, checkpoint and tensorboard files went (``"log_file"``, ``"checkpoint_file"``, ``"tensorboard_dir"``);
- checkpoints are loaded with an explicit ``weights_only=False``: they are the user's own (RecBole pickles the
  Config inside them); the unpickled Config gets RecBole's numpy settings (``np.float`` ...), which RecBole
  applies only when a Config is constructed, so evaluating a reloaded model works in a new process;
- ``run_recbole`` and ``objective_function`` set torch's thread count first (:mod:`recbole_mm.threads`:
  ``RECBOLE_MM_THREADS``, else your own setting, else the measured default);
- ``run(..., nproc=N)`` (RecBole's ``run`` / ``run_recboles``, same arguments) trains with ``torch.distributed`` on
  GPUs (NCCL) and on the CPU (gloo), and its metrics are exactly the one-process metrics (every rank's evaluated
  rows are gathered before the metrics; :mod:`recbole_mm.distributed`); only rank 0 writes the log, the tensorboard
  files and the checkpoint, which loads in one process; ``evaluate_checkpoint(..., nproc=N)`` evaluates a
  checkpoint with N processes.
"""

from __future__ import annotations

import logging
import os
import sys
from logging import getLogger

import torch
from recbole.data.transform import construct_transform
from recbole.utils import get_environment, init_logger, init_seed, set_color

from recbole_mm import compat, distributed, registry
from recbole_mm.compat import safe_get_flops
from recbole_mm.config import Config
from recbole_mm.data.utils import create_dataset, data_preparation
from recbole_mm.threads import configure_threads
from recbole_mm.trainer.utils import get_trainer
from recbole_mm.utils import cfg_get


def _build(config, logger=None, flops: bool = True):
    from recbole_mm.data.embedded import copy_without_config_message

    # a copy of an embedded dataset under another name, without its yaml: RecBole's errors would not say that
    copy_message = copy_without_config_message(config["data_path"], config["dataset"], config)
    if copy_message:
        getLogger().warning(copy_message)
    try:
        dataset = create_dataset(config)
        if logger:
            logger.info(dataset)
        train_data, valid_data, test_data = data_preparation(config, dataset)
        init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
        model_class = registry.model_class_of(config)
        model = model_class(config, train_data._dataset).to(config["device"])
    except (ValueError, KeyError) as e:  # RecBole's errors on missing fields; others (OOM, no folder) pass as they are
        if copy_message:
            raise ValueError(f"{copy_message} (RecBole's error: {' '.join(str(e).split())[:300]})") from e
        raise
    if logger:
        logger.info(model)
        if flops:
            transform = construct_transform(config)
            logger.info(set_color("FLOPs", "blue") + f": {safe_get_flops(model, dataset, config['device'], logger, transform)}")
    trainer = get_trainer(config["MODEL_TYPE"], model_class)(config, model)
    return dataset, train_data, valid_data, test_data, model, trainer


def _abs(path):
    return os.path.abspath(path) if path else None


def _log_file(logger) -> str | None:
    for h in logger.handlers:
        if isinstance(h, logging.FileHandler):
            return h.baseFilename
    return None


EXTRA_RESULT_KEYS = ("cold_valid_result", "cold_test_result", "new_valid_result", "new_test_result",
                     "cold_threshold_used", "valid_rows", "test_rows", "train_loss_history", "valid_score_history", "valid_epoch_history",
                     "epoch_seconds", "eval_seconds", "efficiency", "branch_valid_result", "branch_test_result",
                     "branch_valid_history")


def fairness_labels(config, dataset, train_dataset, model):
    """``fairness_eval: True`` (general models only): the ``sensitive_fields`` of the ``.user`` file as class labels of
    the users with training interactions (:func:`recbole_mm.fairness.sensitive_labels`; a missing field, a single
    class or no values at all are errors, users without a value are counted out), and the model's user vectors
    located; all checked before training. ``(user ids, labels)``, or ``None`` when the key is off."""
    from recbole.utils import ModelType

    if not cfg_get(config, "fairness_eval", False):
        return None
    if config["MODEL_TYPE"] not in (ModelType.GENERAL, ModelType.TRADITIONAL):
        raise ValueError(f"fairness_eval audits the user vectors of general (user-item) models; {config['model']} is "
                         f"{config['MODEL_TYPE'].name.lower()}")
    from recbole_mm.fairness import as_fields, sensitive_labels
    from recbole_mm.model.general import MMGeneralRecommender, user_representations

    if not isinstance(model, MMGeneralRecommender):  # the plugin's have user vectors (FMMRec's only after its stages)
        user_representations(model)  # a model without usable user vectors fails here, not after training
    model.train()
    degree = torch.bincount(torch.as_tensor(train_dataset.inter_feat[train_dataset.uid_field]).long(),
                            minlength=dataset.user_num)
    uids = torch.nonzero(degree[1:] > 0)[:, 0] + 1  # users with training interactions (0 is padding)
    fields = as_fields(cfg_get(config, "sensitive_fields", ["gender", "age", "occupation"]))
    return uids, sensitive_labels(dataset, fields, uids, bins=cfg_get(config, "sensitive_bins"))


def fairness_result(config, model, prepared, view: str | None = None) -> dict:
    """Fresh attackers trained on 80% of the users' representations try to recover each attribute of the other 20%
    (:func:`recbole_mm.fairness.audit`): AUC for binary attributes (probability and hard-prediction), micro / macro
    F1 for the others, with the chance level and ``representation`` (where the vectors came from). ``view`` audits
    another of the model's ``fairness_views()`` (FMMRec's ``item_aggregated``: the mean fair item vector of the
    user's training items). A failure of the audit is returned as ``{"error": message}`` (the trained model and
    its results are kept)."""
    from recbole_mm.fairness import audit
    from recbole_mm.model.general import user_representations

    uids, labels = prepared
    try:
        if view is None:
            vectors, source = user_representations(model)
        else:
            model.eval()
            with torch.no_grad():
                vectors, source = model.fairness_views()[view], view
        out = audit(vectors[uids.to(vectors.device)].detach().cpu(), labels,
                    epochs=int(cfg_get(config, "fairness_epochs", 1000)), seed=int(config["seed"] or 0))
    except (ValueError, RuntimeError) as e:
        getLogger().warning(f"fairness_eval failed: {e}")
        return {"error": str(e)}
    if source == "user_embedding" and "forward" in type(model).__dict__:
        getLogger().warning(f"fairness_eval: {type(model).__name__} is audited on its user_embedding table, not on the "
                            "vectors its forward() propagates")
    for r in out.values():
        r["representation"] = source
    return out


def fairness_results(config, model, prepared) -> dict:
    """``{"fairness_result": ...}`` (the user vectors), plus ``fairness_item_aggregated_result`` for a model with that
    view (FMMRec)."""
    out = {"fairness_result": fairness_result(config, model, prepared)}
    if hasattr(model, "fairness_views"):
        out["fairness_item_aggregated_result"] = fairness_result(config, model, prepared, view="item_aggregated")
    return out


def trainer_extras(trainer) -> dict:
    """What MMTrainer adds to RecBole's result dict: cold / new item results, histories, timings, the efficiency
    record (``MMTrainer.efficiency``: seconds per epoch / evaluation, peak memory, trainable / total parameters) and,
    for models with several scoring branches (ODMT), each branch's results."""
    return {key: getattr(trainer, key) for key in EXTRA_RESULT_KEYS if getattr(trainer, key, None) is not None}


def _init_logger(config) -> None:
    """RecBole's logger (console and log file) on rank 0; errors only, on stderr, on the other ranks of a
    distributed run (one log file per run, not per process)."""
    if config["single_spec"] or distributed.is_main_process():
        init_logger(config)
        return
    logger = getLogger()
    for handler in logger.handlers[:]:
        logger.removeHandler(handler)
    handler = logging.StreamHandler()
    handler.setLevel(logging.ERROR)
    logger.addHandler(handler)
    logger.setLevel(logging.ERROR)


def run(model=None, dataset=None, config_file_list=None, config_dict=None, saved=True, nproc=1, world_size=-1,
        ip=None, port=None, group_offset=0):
    r"""RecBole's ``run``: :func:`run_recbole` in this process, or with ``nproc > 1`` (or ``world_size > 0``) in
    ``nproc`` new processes of one ``torch.distributed`` run (NCCL on GPUs, gloo on the CPU).

    Args:
        nproc (int): processes on this machine (one per GPU on GPUs).
        world_size (int): processes over all machines (``-1``: ``nproc``, a single machine).
        ip (str): address of the machine of rank 0 (default ``localhost``; required over several machines).
        port (int): its rendezvous port (default: a free port on a single machine; required over several).
        group_offset (int): global rank of this machine's first process: ``node_rank * nproc``.

    Returns:
        dict: :func:`run_recbole`'s result, from rank 0 (``None`` on the other machines).
    """
    if int(nproc) == 1 and int(world_size) <= 0:
        return run_recbole(model=model, dataset=dataset, config_file_list=config_file_list, config_dict=config_dict,
                           saved=saved)
    keys = distributed.rendezvous(nproc, world_size, ip, port, group_offset)
    config_dict = dict(config_dict or {})
    config_dict.update(keys)
    return distributed.launch(run_recboles, (model, dataset, config_file_list,
                                             {"config_dict": config_dict, "saved": saved}), nproc=keys["nproc"])


def run_recboles(rank, *args):
    r"""One process of :func:`run` (RecBole's ``run_recboles``): ``args`` = ``(model, dataset, config_file_list,
    kwargs)``; local rank ``rank``. Returns the result on global rank 0, ``None`` elsewhere."""
    kwargs = dict(args[-1])
    kwargs["config_dict"] = dict(kwargs.get("config_dict") or {}, local_rank=rank)
    result = run_recbole(*args[:3], **kwargs)
    return result if rank + int(kwargs["config_dict"].get("offset") or 0) == 0 else None


def run_recbole(model=None, dataset=None, config_file_list=None, config_dict=None, saved=True, queue=None):
    r"""Train and test a model on a dataset (RecBole's ``run_recbole``; ``model`` may be a name or a class).

    Returns:
        dict: ``best_valid_score``, ``valid_score_bigger``, ``best_valid_result``, ``test_result`` (RecBole's
        keys), plus ``model``, ``cold_test_result`` (when the model reports cold-item metrics), ``efficiency``
        (``MMTrainer.efficiency``), ``log_file``, ``checkpoint_file`` and ``tensorboard_dir``.
    """
    configure_threads()
    config = Config(model=model, dataset=dataset, config_file_list=config_file_list, config_dict=config_dict)
    init_seed(config["seed"], config["reproducibility"])
    _init_logger(config)
    logger = getLogger()
    logger.info(sys.argv)
    logger.info(config)

    dataset, train_data, valid_data, test_data, model, trainer = _build(config, logger)
    labels = fairness_labels(config, dataset, train_data._dataset, model)  # bad input fails before training
    best_valid_score, best_valid_result = trainer.fit(
        train_data, valid_data, saved=saved, show_progress=config["show_progress"]
    )
    test_result = trainer.evaluate(test_data, load_best_model=saved, show_progress=config["show_progress"])

    logger.info("The running environment of this training is as follows:\n" + get_environment(config).draw())
    logger.info(set_color("best valid ", "yellow") + f": {best_valid_result}")
    logger.info(set_color("test result", "yellow") + f": {test_result}")

    result = {
        "model": config["model"],
        "best_valid_score": best_valid_score,
        "valid_score_bigger": config["valid_metric_bigger"],
        "best_valid_result": best_valid_result,
        "test_result": test_result,
        "log_file": _log_file(logger),
        "checkpoint_file": _abs(trainer.saved_model_file) if saved else None,
        "tensorboard_dir": _abs(getattr(getattr(trainer, "tensorboard", None), "log_dir", None)),
    }
    result.update(trainer_extras(trainer))
    if labels is not None and distributed.is_main_process():
        result.update(fairness_results(config, model, labels))
        logger.info(set_color("fairness (attackers on held-out users)", "yellow") + f": {result['fairness_result']}")
    if not config["single_spec"]:
        distributed.shutdown()
    if config["local_rank"] == 0 and queue is not None:
        queue.put(result)
    return result


def _in_ray_session() -> bool:
    """True inside a Ray Tune trial (RecBole reports unconditionally and logs a stack trace outside one)."""
    if "ray" not in sys.modules:
        return False
    try:
        from ray.air._internal.session import _get_session

        return _get_session(warn=False) is not None
    except Exception:
        return False


def objective_function(config_dict=None, config_file_list=None, saved=True, report_to_ray=True):
    r"""Objective for ``recbole.trainer.HyperTuning`` (RecBole 1.2.1's contract: the dict holds ``"model"``).

    Inside a Ray Tune trial it reports the test result to Ray, as RecBole's does (for a ``tune.run`` of your own);
    ``report_to_ray=False`` leaves reporting to the caller (:func:`recbole_mm.tuning.ray_tune` reports one result
    with the valid score it optimises).
    """
    configure_threads()
    config = Config(config_dict=config_dict, config_file_list=config_file_list)
    init_seed(config["seed"], config["reproducibility"])
    logger = getLogger()
    for hdlr in logger.handlers[:]:
        logger.removeHandler(hdlr)
    init_logger(config)
    logging.basicConfig(level=logging.ERROR)
    dataset, train_data, valid_data, test_data, model, trainer = _build(config, None)
    labels = fairness_labels(config, dataset, train_data._dataset, model)  # fairness_eval: audited per trial too
    best_valid_score, best_valid_result = trainer.fit(train_data, valid_data, verbose=False, saved=saved)
    test_result = trainer.evaluate(test_data, load_best_model=saved)
    if report_to_ray and _in_ray_session():
        from ray import tune

        tune.report(**test_result)
    out = {
        "model": config["model"],
        "best_valid_score": best_valid_score,
        "valid_score_bigger": config["valid_metric_bigger"],
        "best_valid_result": best_valid_result,
        "test_result": test_result,
        "checkpoint_file": _abs(trainer.saved_model_file) if saved else None,  # the trial's model, for evaluate
        **trainer_extras(trainer),
    }
    if labels is not None:
        out.update(fairness_results(config, model, labels))
    return out


def load_data_and_model(model_file, distributed_keys: dict = None):
    r"""Load a checkpoint written by a run: ``(config, model, dataset, train_data, valid_data, test_data)``.

    The checkpoint is the user's own file (RecBole pickles its Config), so it is loaded with an explicit
    ``weights_only=False``; do not load checkpoints from untrusted sources. A checkpoint of a distributed run loads
    in one process; ``distributed_keys`` (``local_rank``, ``nproc``, ``world_size``, ``ip``, ``port``, ``offset``)
    make this process one rank of a distributed evaluation instead (:func:`evaluate_checkpoint`).
    """
    checkpoint = torch.load(model_file, map_location="cpu", weights_only=False)
    config = checkpoint["config"]
    compat.recbole_numpy_settings(config)  # a Config pickled by RecBole's own class gets no __setstate__ of ours
    if distributed_keys:
        config.final_config_dict.update(distributed_keys)
        config._init_device()  # joins the process group (recbole_mm.distributed.init_device)
    else:
        distributed.make_single_process(config)  # saved by a distributed run: no sharding, no DDP here
    init_seed(config["seed"], config["reproducibility"])
    _init_logger(config)
    logger = getLogger()
    logger.info(config)
    dataset = create_dataset(config)
    logger.info(dataset)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    init_seed(config["seed"], config["reproducibility"])
    from recbole_mm.model.abstract import restoring_checkpoint

    with restoring_checkpoint():  # the checkpoint's weights replace any transfer done at construction
        model = registry.model_class_of(config)(config, train_data._dataset).to(config["device"])
    model.load_state_dict(checkpoint["state_dict"])
    model.load_other_parameter(checkpoint.get("other_parameter"))
    return config, model, dataset, train_data, valid_data, test_data


def evaluate_checkpoint(model_file, split: str = "test", nproc: int = 1, port=None, world_size: int = -1, ip=None,
                        group_offset: int = 0) -> dict:
    """Evaluate a saved checkpoint again (in any process), under the run's own protocol: a result dict in the shape
    ``run_recbole`` returns for that split (``test_result`` or ``best_valid_result``, cold / new item groups with
    their rows, each branch's results for a model with several), plus ``model``, ``dataset``, ``checkpoint_file``
    and, for models that count them, ``items_encoded`` (item rows their item tower encoded in this evaluation, over
    all processes). ``nproc > 1``: in that many new processes on this machine (gloo on the CPU, NCCL on GPUs), with
    the one-process figures. Over several machines (``recbole-mm evaluate --nnodes``), as :func:`run`:
    ``world_size`` processes in all, ``ip`` / ``port`` of node 0, ``group_offset`` = ``node_rank * nproc``; the
    result comes back on node 0 (``None`` on the others).
    """
    if split not in ("test", "valid"):
        raise ValueError(f"split must be test or valid, got {split!r}")
    if int(nproc) > 1 or int(world_size) > int(nproc):
        keys = distributed.rendezvous(nproc, world_size, ip, port, group_offset)
        return distributed.launch(_evaluate_rank, (os.path.abspath(model_file), split, keys), nproc=keys["nproc"])
    return _evaluate(model_file, split)


def _evaluate_rank(rank: int, model_file: str, split: str, keys: dict):
    """One process of a distributed :func:`evaluate_checkpoint`: the result on global rank 0, ``None`` elsewhere."""
    configure_threads()
    try:
        out = _evaluate(model_file, split, dict(keys, local_rank=rank))
    except BaseException:
        distributed.shutdown(barrier=False)  # the other ranks may wait in a collective: no barrier
        raise
    distributed.shutdown()
    return out if rank + int(keys.get("offset") or 0) == 0 else None


def _evaluate(model_file, split: str, distributed_keys: dict = None) -> dict:
    config, model, dataset, train_data, valid_data, test_data = load_data_and_model(model_file, distributed_keys)
    trainer = get_trainer(config["MODEL_TYPE"], registry.model_class_of(config))(config, model)
    if hasattr(trainer, "_set_item_groups"):  # cold / new groups from the training split, as in the run
        trainer._set_item_groups(train_data._dataset, is_train_split=True)
    trainer.eval_collector.data_collect(train_data)  # as fit does: item counts for ItemCoverage, GiniIndex, ...
    data = test_data if split == "test" else valid_data
    encoded = getattr(model, "items_encoded_eval", None)
    result = trainer.evaluate(data, load_best_model=False, show_progress=bool(config["show_progress"]))
    out = {"model": config["model"], "dataset": config["dataset"], "checkpoint_file": os.path.abspath(model_file),
           "split": split, ("test_result" if split == "test" else "best_valid_result"): result}
    if encoded is not None:
        out["items_encoded"] = int(distributed.all_reduce_sum(model.items_encoded_eval - encoded))
    # the trainer files an evaluation outside fit under *_test_*: name it after the split evaluated
    for key in ("cold_test_result", "new_test_result", "test_rows", "branch_test_result"):
        value = getattr(trainer, key, None)
        if value is not None:
            out[key.replace("test", split)] = value
    if getattr(trainer, "cold_threshold_used", None) is not None:
        out["cold_threshold_used"] = trainer.cold_threshold_used
    labels = fairness_labels(config, dataset, train_data._dataset, model)
    if labels is not None and distributed.is_main_process():
        out.update(fairness_results(config, model, labels))
    return out
