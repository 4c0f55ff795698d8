"""``python -m t1t2_fast train ...``: a shortcut to the ``t1t2`` command (``t1t2_fast.apps.cli``). The
library never imports this module."""
import sys

from t1t2_fast.apps.cli import main

if __name__ == "__main__":
    sys.exit(main())
