"""``python -m batchnorm``: the same command as ``batchnorm`` (see :mod:`batchnorm.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
