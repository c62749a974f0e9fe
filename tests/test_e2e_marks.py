"""`make test-fast` (`pytest -m "not e2e"`) leaves out every test that runs Snakemake or a server:
conftest marks e2e each test that needs such a fixture, before `-m` deselects, and the session
fixtures that start the shared studies early start them only for the selected tests."""

import subprocess
import sys

from studies import ROOT


def test_tests_reading_the_tiny_study_are_e2e_even_unmarked():
    """test_attention_workflow.py and one test of test_benchmarks.py read the tiny study, and carry no mark of their own."""
    files = ["tests/test_attention_workflow.py", "tests/test_benchmarks.py"]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-m", "not e2e", *files],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    selected = [line for line in done.stdout.splitlines() if "::" in line]
    assert "tests/test_benchmarks.py::test_split_speed_cases_run_and_report" in selected, done.stdout
    assert not [t for t in selected if "test_attention_workflow.py" in t], done.stdout
    assert "tests/test_benchmarks.py::test_study_layer_speed_times_a_finished_arm_three_ways" not in selected


def test_the_shared_studies_start_only_when_a_selected_test_needs_them(request, _tiny_study_started, _slurm_study_started):
    items = request.session.items  # the selected tests, after `-m` deselected
    assert (_tiny_study_started is None) == (not any("tiny_study" in item.fixturenames for item in items))
    assert (_slurm_study_started is None) == (not any("slurm_study" in item.fixturenames for item in items))
    for item in items:
        if {"tiny_study", "slurm_study"} & set(item.fixturenames):
            assert item.get_closest_marker("e2e"), item.nodeid
