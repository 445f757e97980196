"""Small helpers shared across the package."""

from __future__ import annotations

import contextlib


def cfg_get(config, key: str, default=None):
    """``config[key]`` for a RecBole Config or a dict; ``default`` when the key is missing or ``None``."""
    if config is None:
        return default
    try:
        value = config[key]
    except (KeyError, TypeError):
        value = None
    return default if value is None else value


@contextlib.contextmanager
def preserved_rng():
    """Run a block without moving the random streams of torch (CPU), numpy and python: work done on first use only
    (feature extraction inside a model's construction) must not change the model's initial weights, or a run that
    extracted and the same run afterwards would differ."""
    import random

    import numpy as np
    import torch

    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)

