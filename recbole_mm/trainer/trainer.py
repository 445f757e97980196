"""``MMTrainer``: RecBole's Trainer (same loop, early stopping, checkpoints, evaluation) plus:

- the seed papers' protocol (:mod:`recbole_mm.data.protocol`): for sequential models, the items a user already
  had are masked in full-sort evaluation (``mask_history``, default true; valid masks the training items, test
  the training items and the valid target; RecBole 1.2.1 masks nothing for sequential models);
- metrics per item group, next to the overall ones: ``cold`` targets (``1..t`` training interactions, ``t`` from
  ``cold_item_threshold`` or ``cold_item_quantile``) and ``new`` targets (no training interaction, e.g. held out
  by ``new_item_ratio``); each result holds ``rows`` (how many targets it averages) and ``None`` metrics when
  there are none (``cold_valid_result`` / ``new_valid_result`` for the best epoch, ``cold_test_result`` /
  ``new_test_result`` for the final test);
- parameter groups: the model's ``optimizer_groups(config)`` (encoder vs the rest, each with its own learning
  rate and weight decay) in the one optimizer RecBole builds;
- model hooks: ``before_fit(config, train_data, valid_data, show_progress)`` runs first in ``fit`` (earlier
  stages, e.g. FMMRec's backbone), ``after_optimizer_step()`` after every optimizer step (a second player, e.g.
  FMMRec's attackers), ``set_epoch(epoch)`` before every training epoch;
- AMP only when it can help: ``enable_amp`` is honoured on CUDA (with a GradScaler) and ignored on the CPU;
- metering: seconds per training epoch and per evaluation, the loss and valid-score history, and a
  training-curve plot (``plot_training_curve``);
- an efficiency record of every fit (``efficiency``, logged in one line when fit ends): time per epoch and per
  evaluation, peak memory during fit (RSS on the CPU, ``torch.cuda.max_memory_allocated`` on CUDA) and the
  trainable / total parameter counts (keys in :attr:`MMTrainer.efficiency`);
- distributed runs (:mod:`recbole_mm.distributed`, ``recbole-mm run --nproc N``): every rank evaluates its rows and
  the metrics (overall and per item group) are computed from the rows of all ranks (exactly the one-process
  figures); an expensive item matrix is encoded in shares and gathered; every rank writes the best checkpoint's
  name of rank 0 and waits for rank 0 to have written it before reading it.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time

import numpy as np
import torch
from recbole.data.interaction import Interaction  # noqa: F401  (re-exported for subclasses)
from recbole.evaluator import Collector
from recbole.evaluator.collector import DataStruct
from recbole.trainer import Trainer
from recbole.utils import ModelType, set_color

from recbole_mm import distributed
from recbole_mm.data.protocol import item_groups
from recbole_mm.data.utils import attach_image_decode
from recbole_mm.utils import cfg_get

try:
    import resource
except ImportError:  # not on Windows
    resource = None

GROUPS = ("cold", "new")
MIB = 2 ** 20


def _rss_reader():
    """A function giving the process's resident set size in bytes now: ``/proc/self/statm`` (Linux), else psutil
    when it is installed, else ``None``."""
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        with open("/proc/self/statm", "rb") as f:
            int(f.read().split()[1])

        def statm():
            with open("/proc/self/statm", "rb") as f:
                return int(f.read().split()[1]) * page

        return statm
    except (OSError, ValueError, IndexError, AttributeError):
        pass
    try:
        import psutil

        process = psutil.Process()
        return lambda: process.memory_info().rss
    except Exception:
        return lambda: None


def max_rss_bytes():
    """``getrusage`` ``ru_maxrss``: the process's RSS high-water mark since it started, in bytes (``None`` without
    the ``resource`` module)."""
    if resource is None:
        return None
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value if sys.platform == "darwin" else value * 1024  # KiB on Linux, bytes on macOS


class MemoryMeter:
    """Peak memory between ``start()`` and ``stop()``.

    CPU: RSS sampled every ``interval`` seconds by a daemon thread (one read of ``/proc/self/statm``), plus
    ``ru_maxrss``: when the process's high-water mark rose during the stretch, that mark is its exact peak (a
    short-lived allocation between two samples included); when it did not (the process peaked higher before), the
    samples give the peak. CUDA (``device`` of type cuda): ``torch.cuda.max_memory_allocated`` after
    ``reset_peak_memory_stats`` at start.
    """

    interval = 0.01

    def __init__(self, device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda" and torch.cuda.is_available()
        self._rss = _rss_reader()
        self._stop = threading.Event()
        self._thread = None

    def start(self) -> None:
        self.rss_start = self._rss()
        self.max_rss_start = max_rss_bytes()
        self.peak_rss = self.rss_start
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            self.cuda_start = torch.cuda.memory_allocated(self.device)
        if self.rss_start is not None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="recbole_mm-memory-meter", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        rss = self._rss()
        if rss is not None and (self.peak_rss is None or rss > self.peak_rss):
            self.peak_rss = rss

    def stop(self) -> dict:
        """``peak_memory_mib``, ``peak_memory_increase_mib``, ``memory_kind``, ``max_rss_mib`` (module doc)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        self.sample()
        max_rss = max_rss_bytes()
        peak_rss = self.peak_rss
        if max_rss is not None and self.max_rss_start is not None and max_rss > self.max_rss_start:
            peak_rss = max(peak_rss or 0, max_rss)  # a new high-water mark: set during this stretch
        out = {"max_rss_mib": max_rss / MIB if max_rss is not None else None}
        if self.cuda:
            peak = torch.cuda.max_memory_allocated(self.device)
            out.update(memory_kind="cuda_allocated", peak_memory_mib=peak / MIB,
                       peak_memory_increase_mib=(peak - self.cuda_start) / MIB)
        else:
            known = peak_rss is not None and self.rss_start is not None
            out.update(memory_kind="cpu_rss", peak_memory_mib=peak_rss / MIB if peak_rss is not None else None,
                       peak_memory_increase_mib=(peak_rss - self.rss_start) / MIB if known else None)
        return out


def parameter_counts(model) -> tuple:
    """``(trainable, total)`` numbers of parameter elements (shared parameters counted once)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


class GroupCollector(Collector):
    """RecBole's Collector that also keeps the top-k hits of the targets of each item group
    (``groups[name][item]`` true)."""

    def __init__(self, config):
        super().__init__(config)
        self.groups: dict = {}
        self.group_structs: dict = {}
        self.rows = 0  # rows (users or sequences) ranked since the last take_group_structs

    def eval_batch_collect(self, scores_tensor, interaction, positive_u, positive_i):
        super().eval_batch_collect(scores_tensor, interaction, positive_u, positive_i)
        self.rows += int(scores_tensor.shape[0])
        if not self.groups or not self.register.need("rec.topk"):
            return
        _, topk_idx = torch.topk(scores_tensor, max(self.topk), dim=-1)
        n_rows = scores_tensor.shape[0]
        for name, members in self.groups.items():
            # RecBole's "rec.topk" rows ([hit at each of the top k, number of positives]) for the rows with a
            # positive in the group, from the positives alone (no [rows, n_items] matrix per group)
            chosen = members.to(positive_i.device)[positive_i]
            users, items = positive_u[chosen], positive_i[chosen]
            hits = torch.zeros_like(topk_idx, dtype=torch.int)
            hits.index_add_(0, users, (topk_idx[users] == items.unsqueeze(1)).int())
            pos_len = torch.bincount(users, minlength=n_rows).to(torch.int).unsqueeze(1)
            result = torch.cat((hits, pos_len), dim=1)[pos_len.squeeze(1) > 0]
            self.group_structs.setdefault(name, DataStruct()).update_tensor("rec.topk", result)

    def take_group_structs(self) -> dict:
        structs, self.group_structs = self.group_structs, {}
        self.last_rows, self.rows = self.rows, 0
        if distributed.is_distributed():  # every rank's rows (a rank may have none of a group: agreed in gather)
            for name in self.groups:
                distributed.gather_struct(structs.setdefault(name, DataStruct()), ("rec.topk",))
            self.last_rows = int(distributed.all_reduce_sum(self.last_rows))
        for struct in structs.values():
            for key in list(struct._data_dict):
                struct._data_dict[key] = struct._data_dict[key].cpu()
        return structs


def _sync_batchnorm_statistics(model) -> None:
    """Rank 0's BatchNorm running statistics on every rank. DDP runs here without re-broadcasting buffers at every
    step (most buffers are frozen content tables), and on the CPU without SyncBatchNorm, so each rank's statistics
    drift apart while training; an evaluation encodes the catalogue in shares across ranks, so every rank must encode
    with the same model."""
    import torch.distributed as dist

    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            for buffer in module.buffers():
                dist.broadcast(buffer, src=0)


class MMTrainer(Trainer):
    """RecBole's Trainer with the papers' protocol (history masking, cold / new item metrics), parameter groups,
    CUDA-only AMP and metering (module doc)."""

    def __init__(self, config, model):
        super().__init__(config, model)
        self.enable_amp = bool(config["enable_amp"]) and torch.device(config["device"]).type == "cuda"
        # fp16 autocast needs loss scaling (gradients underflow otherwise): on with AMP
        self.enable_scaler = torch.cuda.is_available() and (bool(config["enable_scaler"]) or self.enable_amp)
        self.eval_collector = GroupCollector(config)
        self.cold_item_threshold = cfg_get(config, "cold_item_threshold")
        self.cold_item_quantile = cfg_get(config, "cold_item_quantile")
        self.cold_threshold_used = None
        self.mask_history = config["MODEL_TYPE"] == ModelType.SEQUENTIAL and bool(cfg_get(config, "mask_history", True))
        self._history = None
        self._warned_no_history = False
        self._warned_sampled = False
        for split in ("valid", "test"):
            for group in GROUPS:
                setattr(self, f"{group}_{split}_result", None)
        self.valid_rows = None  # rows ranked by the best epoch's validation / by the last test
        self.test_rows = None
        self.epoch_seconds: list = []
        self.eval_seconds: list = []
        self.train_loss_history: list = []
        self.valid_score_history: list = []
        self.valid_epoch_history: list = []
        self._valid_pairs: list = []
        self._last_groups: dict = {}
        self._last_rows = None
        self._in_fit = False
        self._fit_memory = None
        self._fit_seconds = None
        # models scoring by several branches (``model.branches``, ``model.eval_branch``): each branch's metrics too
        self.branch_valid_result = self.branch_test_result = None
        self.branch_valid_history: list = []
        self._last_branches = None
        self.eval_branches = bool(cfg_get(config, "eval_branches", True))
        if self.clip_grad_norm and self.enable_scaler:
            logging.getLogger().warning(
                "clip_grad_norm with AMP loss scaling: RecBole 1.2.1 clips the scaled gradients (it does not unscale "
                "them first), so the clipping norm is in effect multiplied by the scale; turn enable_amp off to clip "
                "as configured")
        if distributed.is_distributed():  # one file name for all ranks (each took its own clock's time)
            self.saved_model_file = distributed.broadcast_object(self.saved_model_file)

    def _save_checkpoint(self, epoch, verbose=True, **kwargs):
        # global rank 0 writes (RecBole tests local_rank: the first process of every node would write the same file)
        if distributed.is_main_process():
            super()._save_checkpoint(epoch, verbose=verbose, **kwargs)
        distributed.barrier()  # the others read it (evaluate(load_best_model=True)) only once it is complete

    def _build_optimizer(self, **kwargs):
        groups_fn = getattr(self.model, "optimizer_groups", None)
        if groups_fn is not None and "params" not in kwargs:
            # torch optimizers keep each group's own lr / weight_decay over the defaults RecBole passes
            kwargs["params"] = groups_fn(self.config)
        optimizer = super()._build_optimizer(**kwargs)
        after_step = getattr(self.model, "after_optimizer_step", None)
        if callable(after_step):  # models with a second player (FMMRec's attackers) move after each step
            optimizer.register_step_post_hook(lambda *args: after_step())
        return optimizer

    # ------------------------------------------------------------------ fit
    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        self._set_item_groups(train_data._dataset, is_train_split=True)
        before_fit = getattr(self.model, "before_fit", None)
        if callable(before_fit):  # models with earlier stages (FMMRec: its backbone and its modal transforms)
            before_fit(self.config, train_data, valid_data, show_progress=show_progress)
        meter = MemoryMeter(self.device)
        meter.start()
        start = time.perf_counter()
        self._in_fit = True
        try:
            if self.epochs <= self.start_epoch:  # epochs: 0 -> the model as built (e.g. transferred: zero-shot)
                result = self._fit_without_training(valid_data, verbose, saved, show_progress)
            else:
                result = super().fit(train_data, valid_data, verbose, saved, show_progress, callback_fn)
        finally:
            self._in_fit = False
            self._fit_seconds = time.perf_counter() - start
            self._fit_memory = meter.stop()
        self.logger.info(set_color("efficiency", "blue") + ": " + efficiency_line(self.efficiency))
        best = next((g for v, g in self._valid_pairs if v is self.best_valid_result), {})
        for group in GROUPS:
            setattr(self, f"{group}_valid_result", best.get(group))
        self.valid_rows = best.get("rows")
        self.branch_valid_result = best.get("branches")
        return result

    @property
    def efficiency(self):
        """The efficiency record of the last ``fit`` (``None`` before one), a dict:

        - ``seconds_per_epoch``: mean wall seconds of a training epoch (validation excluded; ``None`` with
          ``epochs: 0``), over ``train_epochs`` epochs; ``fit_seconds``: the whole fit, validation included;
        - ``seconds_per_eval``: mean wall seconds of an evaluation pass (the validations, and the test once run;
          the extra per-branch passes of a model with ``branches`` are not counted);
        - ``peak_memory_mib``: peak memory during fit; ``memory_kind`` says which: ``cpu_rss`` (the process's RSS)
          or ``cuda_allocated`` (``torch.cuda.max_memory_allocated``); ``peak_memory_increase_mib``: the same minus
          the figure at fit start (what the training itself added: activations, gradients, optimizer state);
        - ``max_rss_mib``: ``ru_maxrss`` at fit end, the process's RSS high-water mark since it started (it also
          covers what ran before the fit: dataset build, feature extraction);
        - ``trainable_params`` / ``total_params``: parameter elements with ``requires_grad`` / all of them
          (buffers, e.g. frozen feature tables held as buffers, are not parameters).
        """
        if self._fit_memory is None:
            return None
        trainable, total = parameter_counts(self.model)
        return {
            "seconds_per_epoch": float(np.mean(self.epoch_seconds)) if self.epoch_seconds else None,
            "train_epochs": len(self.epoch_seconds),
            "seconds_per_eval": float(np.mean(self.eval_seconds)) if self.eval_seconds else None,
            "fit_seconds": self._fit_seconds,
            **self._fit_memory,
            "trainable_params": trainable,
            "total_params": total,
            "device": str(self.device),
        }

    def _fit_without_training(self, valid_data, verbose: bool, saved: bool, show_progress: bool):
        """``epochs: 0``: validate the model as it is and save it, so that the run reports a valid result and
        ``evaluate(load_best_model=True)`` reads this model (RecBole's fit saves it but returns no valid result)."""
        if valid_data is not None:
            self.best_valid_score, self.best_valid_result = self._valid_epoch(valid_data, show_progress)
            if verbose:
                self.logger.info(f"epochs: 0: no training; valid result of the model as built: {self.best_valid_result}")
        if saved:
            self._save_checkpoint(0, verbose=verbose)
        return self.best_valid_score, self.best_valid_result

    def _set_item_groups(self, dataset, is_train_split: bool = False) -> None:
        """Item groups from the training split's counts (``train_item_counts`` of recbole_mm's datasets, else
        counted from the training split itself)."""
        counts = getattr(dataset, "train_item_counts", None)
        if counts is None and is_train_split:
            counts = np.bincount(dataset.inter_feat[dataset.iid_field].numpy(), minlength=dataset.item_num)
        if counts is None:
            self.eval_collector.groups = {}
            return
        groups = item_groups(counts, self.cold_item_threshold, self.cold_item_quantile)
        self.cold_threshold_used = groups.pop("cold_threshold", None)
        self.eval_collector.groups = groups

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        set_epoch = getattr(self.model, "set_epoch", None)
        if callable(set_epoch):  # models whose loss depends on the epoch (ODMT's distillation ramp-up)
            set_epoch(epoch_idx)
        # end-to-end image models: the batches carry their decoded images (decoded in the loader's workers, not in
        # forward); a no-op for other models and for a loader already wrapped
        attach_image_decode(train_data)
        start = time.perf_counter()
        loss = super()._train_epoch(train_data, epoch_idx, loss_func=loss_func, show_progress=show_progress)
        if distributed.is_distributed() and loss is not None:
            # RecBole reports the rank's own sum of batch losses: report the mean over the ranks (with equal shares
            # of every batch, the sum of the full batches' mean losses, as one process would)
            world = distributed.get_world_size()
            loss = (tuple(distributed.all_reduce_sum(x) / world for x in loss) if isinstance(loss, tuple)
                    else distributed.all_reduce_sum(loss) / world)
        self.epoch_seconds.append(time.perf_counter() - start)
        self.train_loss_history.append(float(sum(loss) if isinstance(loss, tuple) else loss))
        return loss

    def _valid_epoch(self, valid_data, show_progress=False):
        score, result = super()._valid_epoch(valid_data, show_progress=show_progress)
        self.valid_score_history.append(float(score))
        self.valid_epoch_history.append(len(self.train_loss_history) - 1)
        self._valid_pairs.append((result, dict(self._last_groups, rows=self._last_rows, branches=self._last_branches)))
        if self._last_branches is not None:
            self.branch_valid_history.append(self._last_branches)
            self.logger.info(set_color("valid result per branch", "blue") + ": " + branch_line(self._last_branches))
        return score, result

    # ------------------------------------------------------------- evaluate
    def _full_sort_batch_eval(self, batched_data):
        interaction, scores, positive_u, positive_i = super()._full_sort_batch_eval(batched_data)
        if self._history is not None:
            rows, items = self._history.mask_index(interaction[self.model.USER_ID], positive_i)
            scores[rows.to(scores.device), items.to(scores.device)] = -np.inf
        return interaction, scores, positive_u, positive_i

    def _history_of(self, eval_data):
        from recbole.data.dataloader import FullSortEvalDataLoader

        if not self.mask_history:
            return None
        if not isinstance(eval_data, FullSortEvalDataLoader):
            if not self._warned_sampled:
                self._warned_sampled = True
                logging.getLogger().warning(
                    "mask_history applies to full ranking only: this sampled evaluation (eval_args.mode uni / pop) "
                    "can draw items of the user's history as negatives, as RecBole does")
            return None
        history = getattr(eval_data._dataset, "history_index", None)
        if history is None and not self._warned_no_history:
            self._warned_no_history = True
            logging.getLogger().warning(
                f"mask_history: the {type(eval_data._dataset).__name__} of {self.config['model']} has no history index "
                "(not a recbole_mm dataset): history items are NOT masked in this evaluation")
        return history

    @torch.no_grad()
    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        if eval_data and not self.eval_collector.groups:
            self._set_item_groups(eval_data._dataset)  # evaluation without fit (e.g. a loaded checkpoint)
        invalidate = getattr(self.model, "invalidate_item_matrix", None)
        if invalidate is not None:
            invalidate()  # one item matrix per evaluation pass
        self._history = self._history_of(eval_data) if eval_data else None
        start = time.perf_counter()
        if eval_data and distributed.is_distributed():
            load_best_model = self._prepare_distributed_eval(load_best_model, model_file)
        try:
            result = super().evaluate(eval_data, load_best_model=load_best_model, model_file=model_file,
                                      show_progress=show_progress)
            self.eval_seconds.append(time.perf_counter() - start)  # the model's own pass (branches apart)
            self._last_groups = self._group_results()
            self._last_rows = self.eval_collector.last_rows
            self._last_branches = self._evaluate_branches(eval_data, show_progress) if eval_data else None
        finally:
            self._history = None
        if not self._in_fit:
            for group in GROUPS:
                setattr(self, f"{group}_test_result", self._last_groups.get(group))
            self.test_rows = self._last_rows
            self.branch_test_result = self._last_branches
            if self._last_branches is not None:
                self.logger.info(set_color("test result per branch", "blue") + ": " + branch_line(self._last_branches))
        return result

    def _prepare_distributed_eval(self, load_best_model: bool, model_file) -> bool:
        """Before the batches of a distributed evaluation: load the best model (as RecBole's evaluate would), then
        build the model's item matrix on every rank together (an expensive one is encoded in shares and gathered, a
        collective: inside the batches a rank with fewer batches would not join it). Returns ``load_best_model``
        for RecBole's evaluate (now ``False``)."""
        if load_best_model:
            checkpoint_file = model_file or self.saved_model_file
            # rank 0 wrote the file (on its own disk: other nodes need not share it): it reads and sends it
            checkpoint = None
            if distributed.get_rank() == 0:
                checkpoint = torch.load(checkpoint_file, map_location="cpu", weights_only=False)
            checkpoint = distributed.broadcast_object(checkpoint)
            self.model.load_state_dict(checkpoint["state_dict"])
            self.model.load_other_parameter(checkpoint.get("other_parameter"))
            self.logger.info(f"Loading model structure and parameters from {checkpoint_file}")
        else:
            _sync_batchnorm_statistics(self.model)
        self.model.eval()
        build = getattr(self.model, "item_matrix", None)
        if callable(build):
            build()
        return False

    def _evaluate_branches(self, eval_data, show_progress: bool):
        """``{branch: metrics}`` for a model with ``branches``: the same pass again with ``model.eval_branch`` set
        (the item matrix computed by the ensemble's pass is reused; history masked the same way)."""
        branches = tuple(getattr(self.model, "branches", None) or ())
        if not branches or not self.eval_branches:
            return None
        out = {}
        wandb, wandb_on = getattr(self, "wandblogger", None), getattr(getattr(self, "wandblogger", None), "enabled", False)
        try:
            if wandb is not None:
                wandb.enabled = False  # the branch passes are not the model's evaluation
            for name in branches:
                self.model.eval_branch = name
                out[name] = dict(super().evaluate(eval_data, load_best_model=False, show_progress=show_progress))
        finally:
            self.model.eval_branch = None
            if wandb is not None:
                wandb.enabled = wandb_on
            self.eval_collector.take_group_structs()  # cold / new structs of the branch passes: not reported
        return out

    def _group_results(self) -> dict:
        structs = self.eval_collector.take_group_structs()
        out = {}
        for name in self.eval_collector.groups:
            struct = structs.get(name)
            rows = int(struct.get("rec.topk").shape[0]) if struct is not None and "rec.topk" in struct else 0
            result = {"rows": rows}
            if name == "cold" and self.cold_threshold_used is not None:
                result["max_train_count"] = self.cold_threshold_used
            for metric_name, metric in self.evaluator.metric_class.items():
                if set(getattr(metric, "metric_need", [])) <= {"rec.topk"}:
                    if rows:
                        result.update(metric.calculate_metric(struct))
                    else:
                        result.update({f"{metric_name}@{k}": None for k in self.eval_collector.topk})
            out[name] = result
        return out

    # ------------------------------------------------------------- plotting
    def plot_training_curve(self, path: str) -> str:
        """Training loss and valid score per epoch, as a PNG (see :func:`plot_training_curve`)."""
        return plot_training_curve(path, self.train_loss_history, self.valid_score_history, self.valid_epoch_history,
                                   f"{self.config['model']} on {self.config['dataset']}", f"valid {self.valid_metric}")


class MMTraditionalTrainer(MMTrainer):
    """RecBole's ``TraditionalTrainer`` (one epoch: Pop, ItemKNN, EASE, ...) with MMTrainer's protocol and metrics."""

    def __init__(self, config, model):
        super().__init__(config, model)
        self.epochs = 1


def branch_line(branches: dict) -> str:
    """``id hit@10 0.1234 ndcg@10 0.0567 | text ...`` for the log."""
    return " | ".join(f"{name} " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()) for name, metrics in branches.items())


def efficiency_line(eff: dict) -> str:
    """One line for the log: ``1.23 s / epoch, 0.45 s / evaluation, peak memory 812.3 MiB (cpu_rss; +120.5 MiB in
    fit), params 12,345 trainable / 67,890 total``."""

    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    return (f"{num(eff['seconds_per_epoch'], '.3f')} s / epoch, {num(eff['seconds_per_eval'], '.3f')} s / evaluation, "
            f"peak memory {num(eff['peak_memory_mib'], '.1f')} MiB ({eff['memory_kind']}; "
            f"{num(eff['peak_memory_increase_mib'], '+.1f')} MiB in fit), "
            f"params {eff['trainable_params']:,} trainable / {eff['total_params']:,} total")


def plot_training_curve(path: str, train_loss: list, valid_scores: list, valid_epochs: list, title: str = "",
                        valid_label: str = "valid score") -> str:
    """Write a PNG with the training loss per epoch and the valid score at each evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    ax.plot(np.arange(len(train_loss)), train_loss, color="tab:blue", marker="o", markersize=3)
    ax.set_xlabel("epoch")
    ax.set_ylabel("train loss", color="tab:blue")
    if valid_scores:
        ax2 = ax.twinx()
        ax2.plot(valid_epochs, valid_scores, color="tab:red", marker="s", markersize=3)
        ax2.set_ylabel(valid_label, color="tab:red")
    ax.set_title(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
