"""Text handling shared by the converters: UTF-8 decoding, BOM stripping and the text-cleaning rule.

Cleaning rule (the only change ever made to a text): every run of tabs and line breaks inside a text becomes a
single space, so that one item is one line of a tab-separated file. "Line break" means any character Python's
``str.splitlines`` splits on (``\\n``, ``\\r``, ``\\v``, ``\\f``, ``\\x1c``-``\\x1e``, ``\\x85``, ``\\u2028``,
``\\u2029``). Everything else (non-ASCII, emoji, quotes, leading or trailing spaces) is kept byte-exact.
A UTF-8 byte-order mark is stripped from the start of a file, never from inside a text.
"""

from __future__ import annotations

import csv
import re
from typing import Iterator, Optional

from dataset_converters.errors import ConversionError

BOM = "\ufeff"
_BREAKS = re.compile(r"[\t\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]+")


def clean_text(value: Optional[str]) -> str:
    """``value`` with each run of tabs / line breaks replaced by one space (``None`` gives ``""``)."""
    if not value:
        return ""
    return _BREAKS.sub(" ", value)


def has_breaks(value: str) -> bool:
    """True when :func:`clean_text` would change ``value``."""
    return _BREAKS.search(value) is not None


class DecodedFile:
    """The lines of a UTF-8 text file, BOM stripped; lines that are not valid UTF-8 are kept aside.

    Attributes:
        lines: ``(line_number, text)`` for every decodable line (1-based numbers, line ending removed).
        bad_lines: ``(line_number, repr of the raw bytes)`` of the lines that are not valid UTF-8.
        had_bom: whether the file started with a UTF-8 byte-order mark.
    """

    def __init__(self, path: str):
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError as e:
            raise ConversionError(f"cannot read {path}: {e}") from e
        self.path = path
        self.had_bom = raw.startswith(b"\xef\xbb\xbf")
        if self.had_bom:
            raw = raw[3:]
        self.lines: list[tuple[int, str]] = []
        self.bad_lines: list[tuple[int, str]] = []
        for number, chunk in enumerate(raw.split(b"\n"), start=1):
            if chunk.endswith(b"\r"):
                chunk = chunk[:-1]
            try:
                self.lines.append((number, chunk.decode("utf-8")))
            except UnicodeDecodeError:
                self.bad_lines.append((number, repr(chunk[:60])))
        if self.lines and self.lines[-1][1] == "" and raw.endswith(b"\n"):
            self.lines.pop()  # the empty string after the final newline

    def first_line(self) -> str:
        """The first non-empty line (``""`` for an empty file)."""
        for _, text in self.lines:
            if text.strip():
                return text
        return ""

    def csv_records(self, delimiter: str = ",", skipinitialspace: bool = False) -> Iterator[tuple[int, list[str]]]:
        """CSV records ``(first_line_number, fields)`` with standard double-quote quoting.

        A quoted field may span several lines (its line breaks are kept here; :func:`clean_text` removes them).
        Empty lines are skipped.
        """
        numbers = [n for n, _ in self.lines]
        texts = [t + "\n" for _, t in self.lines]
        reader = csv.reader(texts, delimiter=delimiter, skipinitialspace=skipinitialspace, strict=False)
        while True:
            start = reader.line_num
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as e:  # e.g. a NUL byte; reported as a malformed record
                yield numbers[min(start, len(numbers) - 1)], ["\x00csv-error", str(e)]
                continue
            if not fields or fields == [""]:
                continue
            yield numbers[start] if start < len(numbers) else numbers[-1], fields
