"""``python -m vitcompress``: the same command line as ``vitcompress``."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
