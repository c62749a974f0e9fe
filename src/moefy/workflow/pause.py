"""Named points where a job can be told to wait, so that tests kill it at an exact place.

With MOEFY_PAUSE_AT="evaluate budget 0.25" the evaluate step, having finished that budget, prints
"moefy: paused at evaluate budget 0.25" and sleeps until it is killed. The reliability tests use
it to crash a study mid-job deterministically instead of racing a log line; it does nothing unless
the variable names the point.
"""

from __future__ import annotations

import os
import sys
import time

PAUSE_ENV = "MOEFY_PAUSE_AT"


def point(name: str) -> None:
    if os.environ.get(PAUSE_ENV) != name:
        return
    print(f"moefy: paused at {name}", file=sys.stderr, flush=True)
    while True:
        time.sleep(3600)
