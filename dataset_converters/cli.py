"""Command line: ``python -m dataset_converters {microlens,ninerec,pixelrec,mmrec} --input RAW --output OUT``.

``recbole-mm convert ...`` calls :func:`main` with the same arguments. Exit code 0 on success, 1 when the input
cannot be converted (the message names the file and what was expected), 2 for a usage error.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional

from dataset_converters import __version__, microlens, mmrec, ninerec, pixelrec
from dataset_converters.errors import ConversionError
from dataset_converters.images import MODES

CONVERTERS = {
    "microlens": (microlens, "MicroLens 50K / 100K / 1M (pairs.csv or pairs.tsv, titles, likes/views, covers)"),
    "ninerec": (ninerec, "NineRec source or target domain (--domain; pair.csv or behaviour.tsv, item.csv, covers)"),
    "pixelrec": (pixelrec, "PixelRec variants (--variant; item-first interactions, item info, covers)"),
    "mmrec": (mmrec, "MMRec-format folder (.inter with x_label, id mappings, *_feat.npy)"),
}


def build_parser(prog: str = "dataset_converters") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Convert a raw multimodal recommendation dataset to RecBole atomic files plus item content "
                    "(texts in NAME.item, images/, features/), a dataset yaml and provenance.json.",
    )
    parser.add_argument("--version", action="version", version=f"dataset_converters {__version__}")
    sub = parser.add_subparsers(dest="dataset", required=True, metavar="{" + ",".join(CONVERTERS) + "}")
    for key, (module, help_text) in CONVERTERS.items():
        p = sub.add_parser(key, help=help_text, description=(module.__doc__ or help_text).strip(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--input", required=True, metavar="RAW_DIR", help="folder holding the downloaded files")
        p.add_argument("--output", required=True, metavar="OUT_ROOT", help="the dataset is written to OUT_ROOT/NAME/")
        p.add_argument("--name", default=None, help="dataset name (folder and file prefix); default from the input")
        p.add_argument("--images", choices=MODES, default="copy",
                       help="copy item images into NAME/images (default), symlink them, or skip them")
        p.add_argument("--overwrite", action="store_true", help="replace an existing OUT_ROOT/NAME")
        p.add_argument("-q", "--quiet", action="store_true", help="only print errors")
        module.add_arguments(p)
    return parser


def main(argv: Optional[list[str]] = None, prog: str = "dataset_converters") -> int:
    """``prog``: the command name in usage and errors (``recbole-mm convert`` when called from there)."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    logger = logging.getLogger("dataset_converters")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.ERROR if args.quiet else logging.INFO)
    module = CONVERTERS[args.dataset][0]
    try:
        out = module.convert(args)
    except ConversionError as e:
        logger.error("%s", e)
        return 1
    logger.info("wrote %s", out)
    return 0
