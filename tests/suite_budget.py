"""The suite's time budget, a pytest plugin (conftest loads it): every run ends with its total, and
past the budget with one warning naming the slowest tests."""

from __future__ import annotations

import time

import pytest

# CI stops a submission after 90 minutes; the suite keeps to a third of that, or says so loudly.
SUITE_BUDGET_MINUTES = 30


def pytest_sessionstart(session):
    session.config.stash[_STARTED] = time.time()


def budget_lines(minutes: float, durations: list[tuple[str, str, float]]) -> list[str]:
    """What the suite says at its end: its total, and past the budget one warning naming the slowest
    tests (nodeid, phase, seconds)."""
    lines = [f"moefy: the suite took {minutes:.1f} min ({len(durations)} test phases timed)"]
    if minutes > SUITE_BUDGET_MINUTES:
        slowest = sorted(durations, key=lambda d: d[2], reverse=True)[:5]
        named = ", ".join(f"{nodeid} ({when}, {seconds:.0f} s)" for nodeid, when, seconds in slowest)
        lines.append(
            f"WARNING: the suite took {minutes:.1f} min, over its {SUITE_BUDGET_MINUTES}-minute budget "
            f"(a third of CI's limit); slowest: {named}"
        )
    return lines


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    minutes = (time.time() - config.stash[_STARTED]) / 60
    reports = [r for kind in ("passed", "failed", "error", "skipped") for r in terminalreporter.stats.get(kind, [])]
    durations = [(r.nodeid, r.when, r.duration) for r in reports if hasattr(r, "duration")]
    for line in budget_lines(minutes, durations):
        terminalreporter.write_line(line, yellow=line.startswith("WARNING"), bold=line.startswith("WARNING"))


_STARTED = pytest.StashKey[float]()
