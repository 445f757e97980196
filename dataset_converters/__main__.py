"""``python -m dataset_converters {microlens,ninerec,pixelrec,mmrec} --input RAW --output OUT``."""

import sys

from dataset_converters.cli import main

if __name__ == "__main__":
    sys.exit(main())
