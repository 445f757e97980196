"""torch's intra-op threads for a run: ``RECBOLE_MM_THREADS``, else the user's own setting, else the default.

:func:`configure_threads` runs at the start of ``run_recbole`` / ``objective_function`` and of ``recbole-mm
extract``:

1. ``RECBOLE_MM_THREADS=N`` (N >= 1) -> ``torch.set_num_threads(N)``;
2. else, when the user configured torch (``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` set, or
   ``torch.set_num_threads`` called since torch was imported) -> unchanged;
3. else :func:`default_threads`: 1 thread where torch's own default is at most 2; torch's own default on larger
   machines (not measured there, left alone). Measured on the project's 2-core machine (docs/configuration.md,
   "Threads"): with another process busy, 1 thread trained SASRec / MoRec epochs 3x-17x faster than 2; on a quiet
   machine 2 threads were 1.45x faster. 1 thread has the milder worst case.

"Called since torch was imported" is detected by comparing with the count torch had right after its import
(recorded by a post-import hook, :mod:`recbole_mm.patch`). When torch was imported before ``recbole_mm``, the
count at ``import recbole_mm`` is taken as torch's default: set your count after importing recbole_mm, or use
the environment variable.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

ENV = "RECBOLE_MM_THREADS"
SMALL_MACHINE = 2  # torch's default thread count up to which DEFAULT_THREADS applies
DEFAULT_THREADS = 1
_TORCH_DEFAULT: dict = {}


def default_threads(torch_default: int) -> int:
    """The thread count recbole_mm picks when nobody chose one (rule 3 of the module doc)."""
    return DEFAULT_THREADS if torch_default <= SMALL_MACHINE else torch_default


def record_torch_default(torch_module=None) -> None:
    """Remember torch's thread count before anyone changed it (post-import hook on ``torch``)."""
    torch_module = torch_module or sys.modules.get("torch")
    if torch_module is not None and "threads" not in _TORCH_DEFAULT:
        _TORCH_DEFAULT["threads"] = torch_module.get_num_threads()


def threads_from_env() -> Optional[int]:
    value = os.environ.get(ENV, "").strip()
    if not value:
        return None
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"{ENV}={value!r}: give a whole number of threads >= 1 (or unset it for the default)")
    return n


def configure_threads() -> int:
    """Apply the thread rule above; returns the thread count in force."""
    import torch

    record_torch_default(torch)
    n = threads_from_env()
    if n is not None:
        torch.set_num_threads(n)
    elif not (os.environ.get("OMP_NUM_THREADS") or os.environ.get("MKL_NUM_THREADS")):
        initial = _TORCH_DEFAULT["threads"]
        if torch.get_num_threads() == initial:  # nobody chose: the measured default
            torch.set_num_threads(default_threads(initial))
    return torch.get_num_threads()
