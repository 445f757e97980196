"""Trainers: RecBole's loop with the papers' protocol (history masking, cold / new item metrics), parameter groups and metering."""

from recbole_mm.trainer.trainer import GroupCollector, MMTraditionalTrainer, MMTrainer

__all__ = ["GroupCollector", "MMTraditionalTrainer", "MMTrainer"]
