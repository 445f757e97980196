"""The one exception the converters raise for bad input that stops a run (missing file, unreadable header)."""


class ConversionError(Exception):
    """A required input is missing or unreadable; the message names the file and what was expected."""
