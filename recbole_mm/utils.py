"""Small helpers shared across the package."""

from __future__ import annotations


def cfg_get(config, key: str, default=None):
    """``config[key]`` for a RecBole Config or a dict; ``default`` when the key is missing or ``None``."""
    if config is None:
        return default
    try:
        value = config[key]
    except (KeyError, TypeError):
        value = None
    return default if value is None else value
