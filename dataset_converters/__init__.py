"""Dataset converters: raw MicroLens, NineRec, PixelRec and MMRec-format folders to RecBole atomic files.

Each converter writes ``OUT_ROOT/NAME/`` holding ``NAME.inter``, ``NAME.item`` (item texts and fields),
``NAME.user`` where the data has user attributes, ``images/<item_token>.<ext>``, the dataset yaml ``NAME.yaml``
and ``provenance.json``. Entry points: ``python -m dataset_converters`` and ``recbole-mm convert`` (both call
:func:`dataset_converters.cli.main`). The formats, quirks and output contract are documented in
``docs/datasets.md``.
"""

__version__ = "0.1.0"

from dataset_converters.errors import ConversionError  # noqa: E402

__all__ = ["ConversionError", "__version__"]
