"""``python -m graft ...``: the ``graft`` command."""
from __future__ import annotations

import sys

from graft.cluster.cli import main

if __name__ == "__main__":
    sys.exit(main())
