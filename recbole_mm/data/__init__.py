"""Multimodal data layer: dataset classes, item content, image store, feature files, embedded datasets."""

__all__ = ["DatasetNotFoundError", "MMDataset", "MMSequentialDataset"]


def __getattr__(name):
    """The dataset classes, imported on first use: the image store, feature files and converters need no recbole."""
    if name in __all__:
        from recbole_mm.data import dataset

        return getattr(dataset, name)
    raise AttributeError(f"module 'recbole_mm.data' has no attribute {name!r}")
