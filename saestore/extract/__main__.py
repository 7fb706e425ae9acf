"""``python -m saestore.extract``: see ``--help``."""

import sys

from saestore.extras import MissingExtraError, require

if __name__ == "__main__":
    try:
        require("extract", what="python -m saestore.extract")
    except MissingExtraError as e:
        print(f"saestore extract: error: {e}", file=sys.stderr)
        sys.exit(2)
    from saestore.extract.launch import main

    sys.exit(main())
