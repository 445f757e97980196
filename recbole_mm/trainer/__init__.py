"""Trainers: RecBole's loop with parameter groups, cold-item metrics and metering."""

from recbole_mm.trainer.trainer import ColdItemCollector, MMTrainer

__all__ = ["ColdItemCollector", "MMTrainer"]
