"""``provenance.json``: what a conversion read, wrote, dropped and noticed, reproducibly.

It records the input files (path relative to ``--input``, size, sha256), the converter and its version, the
options, row counts read / written / dropped (each drop with its reason and first examples), warnings and the
quirks detected in the input. No wall-clock time and no absolute path is written, so two runs on the same input
give byte-identical files. Each problem kind is also summarised as one warning line (count + first examples)
logged on stderr.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterable

from dataset_converters import __version__

logger = logging.getLogger("dataset_converters")

MAX_EXAMPLES = 3


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


class Provenance:
    """Collects everything ``provenance.json`` holds during one conversion.

    Args:
        converter: converter name (``microlens`` ...).
        name: dataset name.
        input_root: the ``--input`` folder; input paths are recorded relative to it.
        options: the options that change the output (no paths outside the input).
    """

    def __init__(self, converter: str, name: str, input_root: str, options: dict):
        self.converter = converter
        self.name = name
        self.input_root = os.path.abspath(input_root)
        self.options = dict(options)
        self.inputs: list[dict] = []
        self._hashes: dict[int, Future] = {}
        self._pool = ThreadPoolExecutor(max_workers=1)
        self.counts: dict[str, dict[str, Any]] = {}
        self.drops: dict[str, dict[str, dict]] = {}
        self.issues: dict[str, dict] = {}
        self.detected: list[str] = []
        self.notes: list[str] = []

    # ------------------------------------------------------------------ inputs
    def rel(self, path: str) -> str:
        rel = os.path.relpath(os.path.abspath(path), self.input_root)
        return rel.replace(os.sep, "/")

    def add_input(self, path: str, role: str) -> None:
        """Record an input file; its sha256 is computed in a background thread."""
        self._hashes[len(self.inputs)] = self._pool.submit(sha256_file, path)
        self.inputs.append({"path": self.rel(path), "role": role, "size": os.path.getsize(path)})

    def add_input_dir(self, path: str, role: str, n_files: int) -> None:
        """Record a folder (covers); only its file count is recorded, image problems are counted per item."""
        self.inputs.append({"path": self.rel(path) + "/", "role": role, "files": n_files})

    # ------------------------------------------------------------------ counts
    def count(self, section: str, key: str, value: Any) -> None:
        self.counts.setdefault(section, {})[key] = value

    def drop(self, section: str, reason: str, n: int, examples: Iterable[str] = ()) -> None:
        """Record ``n`` rows of ``section`` dropped for ``reason`` (and warn once with the first examples)."""
        if n <= 0:
            return
        entry = self.drops.setdefault(section, {}).setdefault(reason, {"count": 0, "examples": []})
        entry["count"] += int(n)
        for ex in examples:
            if len(entry["examples"]) >= MAX_EXAMPLES:
                break
            entry["examples"].append(str(ex))

    def issue(self, kind: str, n: int, examples: Iterable[str] = (), action: str = "") -> None:
        """Record a problem that did not drop a row (e.g. missing image, item without title)."""
        if n <= 0:
            return
        entry = self.issues.setdefault(kind, {"count": 0, "examples": [], "action": action})
        entry["count"] += int(n)
        for ex in examples:
            if len(entry["examples"]) >= MAX_EXAMPLES:
                break
            entry["examples"].append(str(ex))

    def detect(self, quirk: str) -> None:
        """Record a quirk detected in the input (and how it was handled)."""
        if quirk not in self.detected:
            self.detected.append(quirk)
            logger.info("detected: %s", quirk)

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    # ---------------------------------------------------------------- warnings
    def warnings(self) -> list[str]:
        """One line per problem kind: count, reason, first examples."""
        lines = []
        for section, reasons in self.drops.items():
            for reason, entry in reasons.items():
                lines.append(
                    f"{entry['count']} {section} dropped: {reason}" + _examples(entry["examples"])
                )
        for kind, entry in self.issues.items():
            action = f" ({entry['action']})" if entry["action"] else ""
            lines.append(f"{entry['count']} {kind}{action}" + _examples(entry["examples"]))
        return lines

    def log_warnings(self) -> None:
        for line in self.warnings():
            logger.warning(line)

    # ------------------------------------------------------------------ output
    def to_dict(self) -> dict:
        inputs = []
        for i, entry in enumerate(self.inputs):
            entry = dict(entry)
            if i in self._hashes:
                entry["sha256"] = self._hashes[i].result()
            inputs.append(entry)
        return {
            "format": "dataset_converters.provenance/1",
            "converter": self.converter,
            "converter_version": __version__,
            "dataset": self.name,
            "inputs": inputs,
            "options": self.options,
            "counts": self.counts,
            "dropped": self.drops,
            "issues": self.issues,
            "warnings": self.warnings(),
            "detected": self.detected,
            "notes": self.notes,
        }

    def write(self, path: str) -> None:
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            json.dump(self.to_dict(), f, ensure_ascii=False, indent=1)
            f.write("\n")

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _examples(examples: list[str]) -> str:
    return f"; first examples: {' | '.join(examples)}" if examples else ""
