"""Where the package finds its yaml defaults and keeps its cache. Imports nothing but the standard library.

- :func:`properties_dir`: the ``properties/`` folder (``overall_mm.yaml``, ``model/<Model>.yaml``,
  ``dataset/<name>.yaml``). In the source tree (a clone, or an editable install) it is the top-level
  ``properties/`` beside ``recbole_mm/``; a non-editable install ships it as package data at
  ``recbole_mm/properties/`` (setup.py maps the package ``recbole_mm.properties`` to ``properties/``).
- :func:`cache_root`: ``$RECBOLE_MM_HOME``, else ``$XDG_CACHE_HOME/recbole_mm``, else ``~/.cache/recbole_mm``.
  It holds the embedded datasets built on first use (``datasets/<name>``, with their image store and
  extracted features).
"""

from __future__ import annotations

import importlib.util
import os

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_MARKER = "overall_mm.yaml"


def properties_dir() -> str:
    """The folder holding ``overall_mm.yaml``: the source tree's ``properties/``, else the installed package data."""
    candidates = [os.path.join(os.path.dirname(_PACKAGE_DIR), "properties")]  # clone / editable install
    spec = importlib.util.find_spec("recbole_mm.properties")  # package data of a non-editable install
    if spec is not None and spec.submodule_search_locations:
        candidates += list(spec.submodule_search_locations)
    candidates.append(os.path.join(_PACKAGE_DIR, "properties"))
    for folder in candidates:
        if os.path.isfile(os.path.join(folder, _MARKER)):
            return folder
    raise FileNotFoundError(
        f"recbole_mm's yaml defaults ({_MARKER}) are missing: looked in {', '.join(candidates)}. Reinstall the "
        f"package (pip install .) or run from a complete clone."
    )


def cache_root() -> str:
    """``$RECBOLE_MM_HOME``, else ``$XDG_CACHE_HOME/recbole_mm``, else ``~/.cache/recbole_mm``."""
    home = os.environ.get("RECBOLE_MM_HOME")
    if home:
        return os.path.expanduser(home)
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(os.path.expanduser(xdg)):  # the XDG spec: a relative value is invalid, ignore it
        return os.path.join(os.path.expanduser(xdg), "recbole_mm")
    return os.path.join(os.path.expanduser("~"), ".cache", "recbole_mm")
