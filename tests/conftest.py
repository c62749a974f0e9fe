"""The suite's fixtures and collection hook; what they build and run lives in helper modules:
builders.py (tiny models, the toy sentiment CSV), studies.py (the tiny and SLURM study configs and
the Snakemake runners), mlflow_server.py and slurm_cluster.py (the processes the SLURM study needs)
and suite_budget.py (the plugin that reports the suite's time against its budget).

The tiny study runs once per test session through the real Snakefile; tests that only read its
outputs (contracts, MLflow runs, seeds, parallel writers) share it, and the few that need a run
of their own (kills, locks, Ctrl-C) reuse its config and copy what they compare against.
"""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

import pytest

from builders import build_tiny_bert, write_toy_sentiment
from studies import ROOT, TINY, environment, finish_snakemake, make_workdir, slurm_config, snakemake_command, start_snakemake

pytest_plugins = ["suite_budget"]

# Fixtures that run the real Snakefile or start servers (a test using one, directly or through
# another fixture, is end to end): the shared studies, the T5 / LLaMA studies of
# test_architectures_workflow.py and the `mlflow server` of test_mlflow_server.py.
E2E_FIXTURES = {"tiny_study", "slurm_study", "studies", "server"}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Mark e2e every test that needs an E2E_FIXTURES fixture, before `-m` deselects: so `-m "not e2e"`
    leaves it out, and the session fixtures below, which look at the selected tests, start nothing for it."""
    for item in items:
        if E2E_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_relu_bert(tmp_path_factory) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-relu-bert"), hidden_act="relu")


@pytest.fixture(scope="session")
def toy_csv(tmp_path_factory) -> Path:
    return write_toy_sentiment(tmp_path_factory.mktemp("data") / "reviews.csv")


@pytest.fixture()
def mlflow_store(tmp_path, monkeypatch) -> str:
    """A private SQLite MLflow store for the test, reached the way jobs reach it (environment)."""
    uri = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "test")
    monkeypatch.delenv("MOEFY_MLFLOW_PARENT_RUN_ID", raising=False)
    return uri


# --- the shared tiny study ------------------------------------------------------------------------


@pytest.fixture(scope="session", autouse=True)
def _tiny_study_started(request, tmp_path_factory):
    """Start the shared tiny study as the session begins, when a selected test needs it: it runs
    beside the first tests (the T5 and LLaMA studies), whose job chains leave cores idle."""
    if not any("tiny_study" in item.fixturenames for item in request.session.items):
        return None
    workdir = make_workdir(tmp_path_factory.mktemp("tiny-study"))
    return workdir, start_snakemake(workdir, cores=4), time.time()


@pytest.fixture(scope="session")
def tiny_study(_tiny_study_started) -> Path:
    """The shared tiny study, run once with 4 jobs at a time: its router and evaluate jobs become
    ready together and write to one fresh SQLite MLflow store."""
    workdir, proc, started = _tiny_study_started
    finish_snakemake(proc, workdir)
    (workdir / "wall_seconds").write_text(f"{time.time() - started:.1f}")
    return workdir


# --- the tiny study on a real SLURM cluster ---------------------------------------------------------


@pytest.fixture(scope="session", autouse=True)
def _slurm_study_started(request, tmp_path_factory):
    """Start a single-node SLURM cluster, an MLflow tracking server and the SLURM study as the session
    begins, when a selected test needs it: its jobs wait on the scheduler's status checks, which
    other tests fill. Returns the running study, or why it cannot run here (a string), or the error
    that stopped it."""
    if not any("slurm_study" in item.fixturenames for item in request.session.items):
        return None
    from mlflow_server import Server
    from slurm_cluster import CancelledThenRerun, SlurmCluster, cannot_start

    reason = cannot_start()
    if reason is None and importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        reason = 'snakemake-executor-plugin-slurm is not installed (pip install -e ".[slurm]")'
    if reason:
        return f"no SLURM cluster on this machine: {reason}"
    try:
        cluster = SlurmCluster(tmp_path_factory.mktemp("slurm-cluster")).start()
    except RuntimeError as err:
        return err
    request.addfinalizer(cluster.stop)
    server = Server(tmp_path_factory.mktemp("slurm-mlflow-server"))
    try:
        server.start()
    except RuntimeError as err:
        return err
    request.addfinalizer(server.stop)
    workdir = make_workdir(tmp_path_factory.mktemp("slurm-study"), slurm_config(server.uri))
    profile = ["--workflow-profile", str(ROOT / "profiles" / "slurm"), "--slurm-init-seconds-before-status-checks", "1"]
    command = snakemake_command(workdir, *profile, cores=None)
    study = CancelledThenRerun(
        cluster,
        command,
        workdir,
        environment(workdir),
        rule="finetune",
        outage=(server, "evaluate", workdir / "results" / TINY / "logs"),
    )
    return study.start()


@pytest.fixture(scope="session")
def slurm_study(_slurm_study_started):
    """The SLURM study, finished: its fine-tune cancelled with scancel in a first invocation, then
    everything run by a second, during which the tracking server was killed and restarted. Skips
    where the cluster cannot start, except where MOEFY_REQUIRE_SLURM is set (CI), where that fails
    the test."""
    started = _slurm_study_started
    if isinstance(started, str):
        if os.environ.get("MOEFY_REQUIRE_SLURM"):
            pytest.fail(f"{started} (MOEFY_REQUIRE_SLURM is set)")
        pytest.skip(started)
    if isinstance(started, BaseException):
        raise started
    return started.join()
