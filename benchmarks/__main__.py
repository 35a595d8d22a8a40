"""``python -m benchmarks``: what there is to run here."""

from __future__ import annotations

import sys

USAGE = """\
statescale's demo and benchmarks (run from the repository root; none is collected by
pytest). Each takes --help.

  python -m benchmarks.demo      the demo comparison: each mode under gunicorn -w 4
  python -m benchmarks.compare   every mode and the peers side by side: tables and plots
  python -m benchmarks.core      the session routes beside the session-less ceiling
  python -m benchmarks.floor     each library beside the bare round trips a session needs
  python -m benchmarks.fleet     what one write costs Redis with 4 to 256 processes connected
  python -m benchmarks.registry  how fast a membership change reaches every follower
  python -m benchmarks.outage    time to 503 while Redis is frozen, under concurrent users
  python -m benchmarks.ring      the ring's balance, moves on add/remove, lookup cost
  python -m benchmarks.router    statescale router beside nginx on the same nodes
"""

sys.stdout.write(USAGE)
