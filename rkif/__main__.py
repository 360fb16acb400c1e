"""``python -m rkif``: the ``rkif`` command, where the package is on the path but not installed."""

import sys

from rkif.cli import main

sys.exit(main(sys.argv[1:]))
