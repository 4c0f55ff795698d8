"""``python -m t1t2_fast.apps train ...``: the same as the ``t1t2`` command."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
