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


def jsonable(obj):
    """``obj`` with dict keys as strings and numpy / torch scalars as Python numbers (for ``json.dump``; NaN and
    infinities stay, as json writes them)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):
        return obj.item()
    return obj


@contextlib.contextmanager
def preserved_rng():
    """Run a block without moving the random streams of torch (CPU and CUDA), numpy and python, nor cuDNN's
    determinism flags (``init_seed`` sets them): work done on first use only
    (feature extraction inside a model's construction) must not change the model's initial weights, or a run that
    extracted and the same run afterwards would differ."""
    import random

    import numpy as np
    import torch

    py_state, np_state = random.getstate(), np.random.get_state()
    cudnn = torch.backends.cudnn
    flags = (cudnn.benchmark, cudnn.deterministic)
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        cudnn.benchmark, cudnn.deterministic = flags


class ThreadFlag:
    """A per-thread switch: true in a thread while it is inside ``with flag.on():`` (nesting restores the outer
    value), false in every other thread."""

    def __init__(self):
        import threading

        self._local = threading.local()

    @contextlib.contextmanager
    def on(self):
        previous = getattr(self._local, "on", False)
        self._local.on = True
        try:
            yield
        finally:
            self._local.on = previous

    def __bool__(self) -> bool:
        return bool(getattr(self._local, "on", False))

