"""``python -m saestore.extract``: see ``--help``."""

import sys

from saestore.extract.launch import main

if __name__ == "__main__":
    sys.exit(main())
