"""``python -m astkit``: the astkit command line."""

import sys

from astkit.cli import main

if __name__ == "__main__":
    sys.exit(main())
