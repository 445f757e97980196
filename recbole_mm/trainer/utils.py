"""``get_trainer``: the trainer class of a model (RecBole's ``get_trainer``, with dispatch by class attribute)."""

from __future__ import annotations

from recbole.trainer import TraditionalTrainer, Trainer
from recbole.utils.utils import get_trainer as _recbole_get_trainer  # bound before recbole_mm.patch replaces it

from recbole_mm import registry
from recbole_mm.trainer.trainer import MMTrainer, MMTraditionalTrainer


def get_trainer(model_type, model_name) -> type:
    """Trainer class: the model's ``trainer_class`` attribute, else RecBole's choice for the model; where
    RecBole would use its generic ``Trainer``, :class:`~recbole_mm.trainer.MMTrainer` (the same loop plus the
    papers' protocol: history masking, cold / new item metrics, metering)."""
    try:
        model_cls = registry.get_model(model_name)
    except registry.UnknownModelError:
        model_cls = None
    trainer_cls = getattr(model_cls, "trainer_class", None)
    if trainer_cls is not None:
        return trainer_cls
    name = model_name if isinstance(model_name, str) else model_name.__name__
    chosen = _recbole_get_trainer(model_type, name)
    if chosen is Trainer:  # RecBole's generic loop: use the superset with cold-item metrics and metering
        return MMTrainer
    if chosen is TraditionalTrainer:  # one-epoch models (Pop, ItemKNN, ...): the same superset
        return MMTraditionalTrainer
    from recbole.utils import ModelType

    if model_type == ModelType.SEQUENTIAL:  # e.g. S3Rec: a trainer of its own, which masks nothing
        import logging

        logging.getLogger().warning(
            f"{name} uses RecBole's {chosen.__name__}: the recbole_mm protocol (history masking, cold / new item "
            "metrics) does not apply to it; its figures are not comparable with the other models'")
    return chosen
