"""The suite reports its total and warns, naming the slowest tests, past its 30-minute budget."""

from suite_budget import SUITE_BUDGET_MINUTES, budget_lines


def test_within_the_budget_only_the_total_is_reported():
    lines = budget_lines(12.3, [("tests/a.py::t", "call", 3.0)])
    assert lines == ["moefy: the suite took 12.3 min (1 test phases timed)"]


def test_past_the_budget_one_warning_names_the_five_slowest():
    durations = [(f"tests/t.py::test_{i}", "call", float(i)) for i in range(10)] + [("tests/s.py::study", "setup", 600.0)]
    lines = budget_lines(SUITE_BUDGET_MINUTES + 1, durations)
    assert len(lines) == 2 and lines[1].startswith("WARNING: the suite took 31.0 min, over its 30-minute budget")
    assert "tests/s.py::study (setup, 600 s), tests/t.py::test_9 (call, 9 s)" in lines[1]
    assert "test_4 " not in lines[1] and lines[1].count("(call,") == 4
