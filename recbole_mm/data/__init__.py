"""Multimodal data layer: dataset classes, item content, image store, feature files, embedded datasets."""

from recbole_mm.data.dataset import DatasetNotFoundError, MMDataset, MMSequentialDataset

__all__ = ["DatasetNotFoundError", "MMDataset", "MMSequentialDataset"]
