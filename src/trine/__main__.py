"""``python -m trine <command>``: the same as ``trine <command>``."""

import sys

from trine.cli import main

if __name__ == "__main__":
    sys.exit(main())
