"""``MMTrainer``: RecBole's Trainer (same loop, early stopping, checkpoints, evaluation) plus:

- parameter groups: the model's ``optimizer_groups(config)`` (encoder vs the rest, each with its own learning
  rate and weight decay) in the one optimizer RecBole builds;
- AMP only when it can help: ``enable_amp`` is honoured on CUDA (with a GradScaler) and ignored on the CPU;
- cold-item metrics: the configured ranking metrics again, over test (valid) targets whose item had at most
  ``cold_item_threshold`` interactions in the training split (``cold_valid_result`` for the best epoch,
  ``cold_test_result`` for the final test; ``None`` threshold disables them);
- metering: seconds per training epoch and per evaluation, the loss and valid-score history, and a
  training-curve plot (``plot_training_curve``).
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch
from recbole.data.interaction import Interaction  # noqa: F401  (re-exported for subclasses)
from recbole.evaluator import Collector
from recbole.evaluator.collector import DataStruct
from recbole.trainer import Trainer

from recbole_mm.utils import cfg_get


class ColdItemCollector(Collector):
    """RecBole's Collector that also keeps the top-k hits of cold target items (``cold_items[item]`` true)."""

    def __init__(self, config):
        super().__init__(config)
        self.cold_items = None
        self.cold_struct = DataStruct()

    def eval_batch_collect(self, scores_tensor, interaction, positive_u, positive_i):
        super().eval_batch_collect(scores_tensor, interaction, positive_u, positive_i)
        if self.cold_items is None or not self.register.need("rec.topk"):
            return
        cold = self.cold_items.to(positive_i.device)[positive_i]
        _, topk_idx = torch.topk(scores_tensor, max(self.topk), dim=-1)
        pos = torch.zeros_like(scores_tensor, dtype=torch.int)
        pos[positive_u[cold], positive_i[cold]] = 1
        pos_len = pos.sum(dim=1, keepdim=True)
        rows = pos_len.squeeze(1) > 0
        result = torch.cat((torch.gather(pos, 1, topk_idx), pos_len), dim=1)[rows]
        self.cold_struct.update_tensor("rec.topk", result)

    def take_cold_struct(self) -> DataStruct:
        struct = self.cold_struct
        self.cold_struct = DataStruct()
        for key in list(struct._data_dict):
            struct._data_dict[key] = struct._data_dict[key].cpu()
        return struct


class MMTrainer(Trainer):
    """RecBole's Trainer with parameter groups, CUDA-only AMP, cold-item metrics and metering (module doc)."""

    def __init__(self, config, model):
        super().__init__(config, model)
        self.enable_amp = bool(config["enable_amp"]) and torch.device(config["device"]).type == "cuda"
        # fp16 autocast needs loss scaling (gradients underflow otherwise): on with AMP
        self.enable_scaler = torch.cuda.is_available() and (bool(config["enable_scaler"]) or self.enable_amp)
        self.eval_collector = ColdItemCollector(config)
        self.cold_item_threshold = cfg_get(config, "cold_item_threshold")
        self.cold_valid_result = None
        self.cold_test_result = None
        self.epoch_seconds: list = []
        self.eval_seconds: list = []
        self.train_loss_history: list = []
        self.valid_score_history: list = []
        self.valid_epoch_history: list = []
        self._valid_pairs: list = []
        self._last_cold = None
        self._in_fit = False

    def _build_optimizer(self, **kwargs):
        groups_fn = getattr(self.model, "optimizer_groups", None)
        if groups_fn is None or "params" in kwargs:
            return super()._build_optimizer(**kwargs)
        # torch optimizers keep each group's own lr / weight_decay over the defaults RecBole passes
        return super()._build_optimizer(params=groups_fn(self.config), **kwargs)

    # ------------------------------------------------------------------ fit
    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        self._set_cold_items(train_data._dataset, is_train_split=True)
        self._in_fit = True
        try:
            result = super().fit(train_data, valid_data, verbose, saved, show_progress, callback_fn)
        finally:
            self._in_fit = False
        self.cold_valid_result = next((c for v, c in self._valid_pairs if v is self.best_valid_result), None)
        return result

    def _set_cold_items(self, dataset, is_train_split: bool = False) -> None:
        """Cold items from the training split's counts (``train_item_counts`` of recbole_mm's datasets, else
        counted from the training split itself)."""
        counts = getattr(dataset, "train_item_counts", None)
        if counts is None and is_train_split:
            counts = np.bincount(dataset.inter_feat[dataset.iid_field].numpy(), minlength=dataset.item_num)
        if self.cold_item_threshold is None or counts is None:
            self.eval_collector.cold_items = None
            return
        self.eval_collector.cold_items = torch.as_tensor(counts) <= int(self.cold_item_threshold)

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        start = time.perf_counter()
        loss = super()._train_epoch(train_data, epoch_idx, loss_func=loss_func, show_progress=show_progress)
        self.epoch_seconds.append(time.perf_counter() - start)
        self.train_loss_history.append(float(sum(loss) if isinstance(loss, tuple) else loss))
        return loss

    def _valid_epoch(self, valid_data, show_progress=False):
        score, result = super()._valid_epoch(valid_data, show_progress=show_progress)
        self.valid_score_history.append(float(score))
        self.valid_epoch_history.append(len(self.train_loss_history) - 1)
        self._valid_pairs.append((result, self._last_cold))
        return score, result

    # ------------------------------------------------------------- evaluate
    @torch.no_grad()
    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        if eval_data and self.eval_collector.cold_items is None and self.cold_item_threshold is not None:
            self._set_cold_items(eval_data._dataset)  # evaluation without fit (e.g. a loaded checkpoint)
        invalidate = getattr(self.model, "invalidate_item_matrix", None)
        if invalidate is not None:
            invalidate()  # one item matrix per evaluation pass
        start = time.perf_counter()
        result = super().evaluate(eval_data, load_best_model=load_best_model, model_file=model_file,
                                  show_progress=show_progress)
        self.eval_seconds.append(time.perf_counter() - start)
        self._last_cold = self._cold_result()
        if not self._in_fit:
            self.cold_test_result = self._last_cold
        return result

    def _cold_result(self):
        if self.eval_collector.cold_items is None:
            return None
        struct = self.eval_collector.take_cold_struct()
        if "rec.topk" not in struct:
            return None
        result = {"rows": int(struct.get("rec.topk").shape[0])}
        for name, metric in self.evaluator.metric_class.items():
            if set(getattr(metric, "metric_need", [])) <= {"rec.topk"}:
                result.update(metric.calculate_metric(struct))
        return result

    # ------------------------------------------------------------- plotting
    def plot_training_curve(self, path: str) -> str:
        """Training loss and valid score per epoch, as a PNG (see :func:`plot_training_curve`)."""
        return plot_training_curve(path, self.train_loss_history, self.valid_score_history, self.valid_epoch_history,
                                   f"{self.config['model']} on {self.config['dataset']}", f"valid {self.valid_metric}")


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
