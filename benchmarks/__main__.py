"""``python -m benchmarks``: the same as ``statescale bench``."""

from __future__ import annotations

import sys

from statescale.cli import main

sys.exit(main(["bench", *sys.argv[1:]]))
