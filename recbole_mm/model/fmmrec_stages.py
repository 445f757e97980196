"""FMMRec's stages 0 and 1, run before its own training (:meth:`FMMRec.before_fit`) and cached on disk.

- **Stage 0**: the backbone's user and item representations. ``fmmrec_backbone`` names a general model (trained
  here on the same training / validation data, early-stopped as its own run would be) or a checkpoint file of one
  (a ``recbole-mm run`` of that model on the same dataset). The trained backbone is kept as
  ``<cache>/backbone-<model>-<key>.pth``; its representations are what the model scores with
  (:func:`recbole_mm.model.general.user_item_representations`).
- **Stage 1** (BMMF): per modality, a :class:`~recbole_mm.layers.fair.ModalDisentangler` trained on user-level
  features; its transforms applied to the item features give the biased and filtered item features, kept as
  ``<cache>/bmmf-<modality>-<key>.pt``.

``<cache>`` is ``fmmrec_cache_dir`` (default ``<dataset folder>/fmmrec``); ``<key>`` is a digest of everything the
stage's output depends on: the training interactions, the labels, the input features, the stage's settings and
the seed (stage 0: the backbone's whole effective config but for where the run writes and what it prints, the
validation interactions and the backbone's feature files), so changing any of them writes a new file and a rerun
with the same settings reuses the old one. Files follow the package's rules for shared files
(:mod:`recbole_mm.atomic`, :func:`build_once`): one builder at a time (two runs sharing a cache, e.g. tuning
trials, build a stage once), temporary name + rename, a killed build's leftovers removed by the next. The stages
run with the random streams of the caller preserved (a run that builds a stage and one that reuses it then train
identically).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from logging import getLogger

import torch

from recbole_mm import distributed, registry
from recbole_mm.layers.fair import ModalDisentangler, train_disentangler
from recbole_mm.utils import cfg_get, preserved_rng

# FMMRec's own keys: they configure stages 1 and 2 and never reach the backbone (its settings go in
# fmmrec_backbone_config). Everything else the user set (dataset, split, encoders, seed, device, ...) is shared.
TRAINING_KEYS = ("epochs", "learning_rate", "stopping_step", "reg_weight", "learner", "weight_decay", "fairness_eval",
                 "fairness_epochs", "model", "modality", "eval_step", "clip_grad_norm")


def digest(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def tensor_digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def cache_dir(config, dataset) -> str:
    path = cfg_get(config, "fmmrec_cache_dir") or os.path.join(dataset.dataset_path, "fmmrec")
    os.makedirs(path, exist_ok=True)
    return path


def build_once(path: str, what: str, build) -> bool:
    """The stage file ``path``, built by ``build(tmp)`` (which writes the temporary file ``tmp``) unless it exists,
    under the package's rules for shared files (:mod:`recbole_mm.atomic`): one builder at a time (another process
    waits, then reuses the file), what a killed build left is removed, the file appears complete or not at all.
    True when this call built it."""
    from recbole_mm.atomic import BuildLock, leftover_temps, lock_path_for, remove_leftovers, temp_path_for

    if os.path.isfile(path):
        return False
    logger = getLogger()
    with BuildLock(lock_path_for(path), what=what, log=logger):
        if os.path.isfile(path):  # another process built it while this one waited
            return False
        remove_leftovers(leftover_temps(path), what, logger)
        tmp = temp_path_for(path)
        try:
            build(tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return True


def build_together(path: str, what: str, build) -> bool:
    """:func:`build_once` for a stage that every rank of a distributed run trains together (the backbone: its
    trainer is a DDP trainer, whose collectives need every rank). Rank 0 holds the build lock (other runs sharing the
    cache wait) and decides whether the file must be built; every rank then calls ``build(tmp)`` with rank 0's
    temporary file (only rank 0 writes it: ``MMTrainer._save_checkpoint``), rank 0 renames it, and the others wait
    until it has. True when this call built it."""
    from recbole_mm.atomic import BuildLock, leftover_temps, lock_path_for, remove_leftovers, temp_path_for

    logger, tmp = getLogger(), None
    with contextlib.ExitStack() as stack:
        if distributed.is_main_process() and not os.path.isfile(path):
            stack.enter_context(BuildLock(lock_path_for(path), what=what, log=logger))
            if not os.path.isfile(path):  # else another run built it while this one waited
                remove_leftovers(leftover_temps(path), what, logger)
                tmp = temp_path_for(path)
                stack.callback(lambda: os.path.exists(tmp) and os.remove(tmp))  # before the lock is released
        tmp = distributed.broadcast_object(tmp)
        if tmp is not None:
            build(tmp)
            if distributed.is_main_process():
                os.replace(tmp, path)
    distributed.barrier()  # the file is complete before any rank reads it
    return tmp is not None


def user_set_keys(config) -> dict:
    """The keys the user set for this run (config files, ``config_dict``, the command line)."""
    out = {}
    for name in ("file_config_dict", "variable_config_dict", "cmd_config_dict"):
        out.update(getattr(config, name, None) or {})
    return out


def backbone_config_dict(config, own_keys) -> dict:
    """The backbone's config_dict: the user's keys minus FMMRec's own, then ``fmmrec_backbone_config``."""
    drop = set(own_keys) | set(TRAINING_KEYS)
    shared = {k: v for k, v in user_set_keys(config).items() if k not in drop and not k.startswith("fmmrec_")}
    shared.update(dict(cfg_get(config, "fmmrec_backbone_config", {}) or {}))
    return shared


# keys that change where a run writes or what it prints, not what the backbone learns (left out of the stage-0 key)
RUN_ONLY_KEYS = ("checkpoint_dir", "state", "show_progress", "gpu_id", "use_gpu", "device", "log_wandb", "wandb_project",
                 "shuffle", "worker", "nproc", "local_rank", "world_size", "offset", "ip", "port", "single_spec",
                 "eval_batch_size", "count_flops", "fmmrec_cache_dir", "data_path", "features_dir")
# the backbone trains on FMMRec's own training loader: these come from FMMRec's config
LOADER_KEYS = ("train_batch_size", "train_neg_sample_args")


def backbone_class(name: str):
    """The registered class of a backbone: a general pairwise (BPR-trained) model other than FMMRec."""
    from recbole.utils import InputType, ModelType

    cls = registry.get_model(name)
    if getattr(cls, "type", None) != ModelType.GENERAL or getattr(cls, "input_type", None) != InputType.PAIRWISE \
            or cls.__name__ == "FMMRec":
        raise ValueError(f"fmmrec_backbone {name!r}: the backbone must be a general pairwise (BPR-trained) model other "
                         "than FMMRec, e.g. LATTICE, FREEDOM, LightGCN, BPR")
    return cls


def _build_backbone(model_config, dataset):
    return backbone_class(model_config["model"])(model_config, dataset).to(model_config["device"])


def _representations(backbone, n_users: int, n_items: int, d: int, where: str):
    from recbole_mm.model.general import user_item_representations

    users, items, _ = user_item_representations(backbone)
    users, items = users.detach().float().cpu(), items.detach().float().cpu()
    if users.shape != (n_users, d) or items.shape != (n_items, d):
        raise ValueError(f"{where}: backbone vectors are users {tuple(users.shape)}, items {tuple(items.shape)}; FMMRec "
                         f"needs ({n_users}, {d}) and ({n_items}, {d}): same dataset, and embedding_size {d}")
    return users, items


def load_backbone_checkpoint(path: str, config, dataset):
    """A general model's checkpoint (a run on this dataset) -> the backbone built on ``dataset`` with its weights."""
    from recbole_mm import compat
    from recbole_mm.model.abstract import restoring_checkpoint

    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    cfg0 = ckpt.get("config") if isinstance(ckpt, dict) else None
    if cfg0 is None or "state_dict" not in ckpt:
        raise ValueError(f"fmmrec_backbone {path!r} is not a RecBole checkpoint (no config / state_dict)")
    compat.recbole_numpy_settings(cfg0)
    cfg0["device"] = torch.device("cpu")  # RecBole's models put their graphs on config["device"]
    if cfg0["dataset"] != config["dataset"]:
        raise ValueError(f"fmmrec_backbone {path!r} was trained on dataset {cfg0['dataset']!r}, this run is on "
                         f"{config['dataset']!r}")
    for key in ("seed", "eval_args", "benchmark_filename"):
        if cfg0[key] != config[key]:
            getLogger().warning(f"fmmrec_backbone {path!r} was trained with {key} {cfg0[key]!r}, this run has "
                                f"{config[key]!r}: its vectors may have seen another split's interactions")
    with restoring_checkpoint():
        backbone = _build_backbone(cfg0, dataset)
    try:
        backbone.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise ValueError(f"fmmrec_backbone {path!r} does not fit this dataset's users / items: {e}") from None
    backbone.load_other_parameter(ckpt.get("other_parameter"))
    return backbone


def backbone_representations(model, config, train_data, valid_data, show_progress: bool = False):
    """Stage 0: ``(users [n_users, d], items [n_items, d], info)``."""
    dataset = train_data._dataset
    spec = str(cfg_get(config, "fmmrec_backbone", "LATTICE"))
    d, logger = model.embedding_size, getLogger()
    if os.path.isfile(spec) or spec.endswith((".pth", ".pt")):
        if not os.path.isfile(spec):
            raise FileNotFoundError(f"fmmrec_backbone checkpoint {spec!r} does not exist")
        logger.info(f"FMMRec stage 0: the vectors of the backbone checkpoint {spec}")
        backbone = load_backbone_checkpoint(spec, config, dataset)
        return (*_representations(backbone, model.n_users, model.n_items, d, spec), {"backbone": spec, "trained": False})
    if not registry.is_model(spec):
        raise ValueError(f"fmmrec_backbone {spec!r} is neither a model name nor a checkpoint file")
    from recbole.utils import init_seed

    from recbole_mm.config import Config
    from recbole_mm.trainer.utils import get_trainer

    backbone_class(spec)
    passed = backbone_config_dict(config, model.own_config_keys())
    clash = sorted(set(dict(cfg_get(config, "fmmrec_backbone_config", {}) or {})) & set(LOADER_KEYS))
    if clash:
        raise ValueError(f"fmmrec_backbone_config sets {clash}: the backbone trains on FMMRec's own loader, so set "
                         "them for the run (they apply to both)")
    passed.update({"embedding_size": d, "model": spec, **{k: config[k] for k in LOADER_KEYS}})
    cfg0 = Config(model=spec, dataset=config["dataset"], config_dict=passed)
    generator_state = train_data.generator.get_state() if hasattr(train_data, "generator") else None
    with preserved_rng():
        init_seed(cfg0["seed"], cfg0["reproducibility"])
        backbone = _build_backbone(cfg0, dataset)
        valid = valid_data._dataset.inter_feat  # early stopping reads it
        key = digest({"backbone": spec, "edges": model.edges_digest,
                      "valid": [tensor_digest(valid[dataset.uid_field]), tensor_digest(valid[dataset.iid_field])],
            "config": {k: v for k, v in cfg0.final_config_dict.items() if k not in RUN_ONLY_KEYS},
            "features": getattr(backbone, "feature_fingerprints", dict)()})
        path = os.path.join(cache_dir(config, dataset), f"backbone-{spec}-{key}.pth")
        # a distributed run: rank 0's file (rank 0's key is the one-process key; other ranks' configs differ in
        # what they print, e.g. verbose), trained by every rank together (its trainer is a DDP trainer)
        distributed_run = distributed.is_distributed()
        path = distributed.broadcast_object(path)

        def train(tmp):
            logger.info(f"FMMRec stage 0: training the {spec} backbone (cached as {path})")
            trainer = get_trainer(cfg0["MODEL_TYPE"], type(backbone))(cfg0, backbone)
            trainer.saved_model_file = tmp  # RecBole saves the best epoch there
            trainer.fit(train_data, valid_data, saved=True, show_progress=show_progress, verbose=show_progress)

        trained = (build_together if distributed_run else build_once)(path, f"FMMRec backbone {path}", train)
        if not trained:
            logger.info(f"FMMRec stage 0: reusing the trained {spec} backbone {path}")
    if generator_state is not None:  # the backbone's epochs must not change FMMRec's own batch order
        train_data.generator.set_state(generator_state)
    backbone = load_backbone_checkpoint(path, config, dataset)
    return (*_representations(backbone, model.n_users, model.n_items, d, path),
            {"backbone": spec, "checkpoint": path, "trained": trained})


def disentangled_features(model, config, dataset, features: dict, user_feats: dict, batch_users: torch.Tensor,
                          labels: dict, show_progress: bool = False) -> dict:
    """Stage 1: ``{modality: (biased [n_items, d_m], filtered [n_items, d_m])}`` from a
    :class:`ModalDisentangler` per modality trained on the user-level features ``user_feats[m]``."""
    settings = {k: cfg_get(config, k, default) for k, default in model.BMMF_DEFAULTS.items()}
    batch_size = int(cfg_get(config, "train_batch_size", 2048))
    seed = int(config["seed"] or 0)
    out, logger = {}, getLogger()
    for m, feats in features.items():
        key = digest({"modality": m, "features": tensor_digest(feats), "edges": model.edges_digest,
                      "labels": {f: tensor_digest(y) for f, y in labels.items()}, "settings": settings,
                      "batch_size": batch_size, "seed": seed})
        path = os.path.join(cache_dir(config, dataset), f"bmmf-{m}-{key}.pt")

        def train(tmp, m=m, feats=feats):
            logger.info(f"FMMRec stage 1 ({m}): training the biased / filtered transforms (cached as {path})")
            with preserved_rng():
                torch.manual_seed(seed)
                module = ModalDisentangler(feats.shape[1], model.n_classes, separation=settings["bmmf_separation_weight"])
                progress = (lambda e, loss: logger.info(f"  BMMF {m} epoch {e}: loss {loss:.4f}")) if show_progress \
                    else None
                history = train_disentangler(
                    module, user_feats[m], batch_users, labels, epochs=int(settings["bmmf_epochs"]),
                    batch_size=batch_size, lr=float(settings["bmmf_learning_rate"]),
                    d_steps=int(settings["bmmf_d_steps"]), w_biased=float(settings["bmmf_biased_weight"]),
                    w_filtered=float(settings["bmmf_filtered_weight"]), seed=seed, progress=progress)
                module.eval()
                with torch.no_grad():
                    torch.save({"biased": module.biased(feats), "filtered": module.filtered(feats), "history": history},
                               tmp)

        if not build_once(path, f"FMMRec stage 1 ({m}) {path}", train):
            logger.info(f"FMMRec stage 1 ({m}): reusing {path}")
        saved = torch.load(path, map_location="cpu", weights_only=True)
        out[m] = (saved["biased"], saved["filtered"])
    return out
