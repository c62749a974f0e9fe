"""Tracking against a real `mlflow server` process started here (the command of `make mlflow-server`):
job runs, their params, metrics and served artifacts arrive; a server that is briefly down is waited
out; one that stays down is one clear error naming it; and a study whose server went away between
invocations stops before any job, then completes on a rerun with every job logged exactly once."""

import subprocess
import threading
import time

import pytest
import yaml
from mlflow.tracking import MlflowClient

from mlflow_server import Server
from moefy.errors import MoefyError
from moefy.workflow import tracking
from studies import E, environment, make_workdir, snakemake, snakemake_command, tiny_config

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def one_server(tmp_path_factory):
    """One server for the module (a start takes seconds): tests that kill it leave it down, and the
    next test's `server` starts it again on the same store."""
    running = Server(tmp_path_factory.mktemp("mlflow-server"))
    yield running
    running.stop()


@pytest.fixture()
def server(one_server):
    if one_server.process is None:
        one_server.start()
    return one_server


@pytest.fixture()
def experiment(request) -> str:
    """The test's own experiment on the shared server."""
    return f"server-{request.node.name}"


@pytest.fixture()
def against(server, experiment, monkeypatch):
    """Jobs in this process log to the server (the test's experiment), MLflow's retries short."""
    monkeypatch.setenv(tracking.URI_ENV, server.uri)
    monkeypatch.setenv(tracking.EXPERIMENT_ENV, experiment)
    monkeypatch.delenv(tracking.PARENT_RUN_ENV, raising=False)
    return server


def test_job_runs_arrive_nested_with_params_metrics_and_served_artifacts(against, experiment, tmp_path, monkeypatch):
    parent = tracking.start_workflow_run(against.uri, experiment, "snakemake server", {"study": "s"})
    monkeypatch.setenv(tracking.PARENT_RUN_ENV, parent)
    summary = tmp_path / "summary.csv"
    summary.write_text("a,b\n1,2\n")
    with tracking.job_run("evaluate", {"budgets": [0.1, 0.5]}, {"split": "kmeans", "num_experts": E}) as run:
        run.log_metrics({"test_accuracy/budget_0.1": 0.7})
        run.log_artifact(summary)
    tracking.end_workflow_run(against.uri, parent, succeeded=True)

    client = MlflowClient(against.uri)
    child = client.get_run(run.run_id)
    assert child.info.status == "FINISHED" and child.data.tags["mlflow.parentRunId"] == parent
    assert child.data.params["budgets"] == "[0.1, 0.5]" and child.data.metrics["test_accuracy/budget_0.1"] == pytest.approx(0.7)
    assert [a.path for a in client.list_artifacts(run.run_id)] == ["summary.csv"]
    stored = list((against.root / "artifacts").rglob("summary.csv"))
    assert len(stored) == 1 and stored[0].read_text() == "a,b\n1,2\n", "the server stores what it serves"


def test_a_briefly_unreachable_server_is_waited_out_and_the_run_logged_once(against, experiment, monkeypatch, capfd):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "7")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")  # 1, 2, 4, 8, ... s: the restart fits
    against.stop()
    restart = threading.Timer(2.0, against.start)
    restart.start()
    try:
        with tracking.job_run("finetune", {"epochs": 1}, {"penalty": "none", "seed": 0}) as run:
            run.log_metrics({"test_accuracy": 0.8})
    finally:
        restart.join()
    runs = MlflowClient(against.uri).search_runs([MlflowClient(against.uri).get_experiment_by_name(experiment).experiment_id])
    assert [(r.info.run_id, r.info.status) for r in runs] == [(run.run_id, "FINISHED")]
    assert runs[0].data.metrics == {"test_accuracy": 0.8}
    retries = [line for line in capfd.readouterr().err.splitlines() if "retrying" in line]
    assert retries and all(
        line.startswith(f"moefy: the MLflow tracking server {against.uri} did not answer; retrying (") for line in retries
    )


def test_a_server_that_stays_down_is_one_clear_error_naming_it(against, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    against.stop()
    started = time.time()
    with pytest.raises(MoefyError, match=f"tracking server {against.uri} did not answer after 2 retries.*make mlflow-server"):
        with tracking.job_run("finetune", {}):
            pass
    assert time.time() - started < 60, "bounded by MLflow's retries"


def test_a_study_stops_before_any_job_while_its_server_is_down_and_a_rerun_logs_each_job_once(server, tmp_path):
    config = tiny_config(
        study="server",
        grid={"one": {"penalty": ["none"], "split": ["random"], "num_experts": [E], "router": ["groundtruth"]}},
        upcycling={"models": {}},
        merging={"models": []},
        mlflow={"tracking_uri": server.uri},
    )
    config["finetune"]["epochs"] = 1
    workdir = make_workdir(tmp_path / "study", config)
    target = "results/server/finetune/none-seed0/metrics.json"
    snakemake(workdir, "results/server/data/labels.json")

    server.stop()
    env = environment(workdir) | {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
    down = subprocess.run(snakemake_command(workdir, target), cwd=workdir, env=env, capture_output=True, text=True)
    assert down.returncode != 0 and f"moefy: the MLflow tracking server {server.uri} did not answer" in down.stderr
    assert "Traceback" not in down.stderr and not (workdir / target).exists()

    server.start()
    snakemake(workdir, target)
    client = MlflowClient(server.uri)
    runs = client.search_runs([client.get_experiment_by_name("server").experiment_id])
    jobs = sorted(r.data.tags["rule"] for r in runs if r.data.tags.get("moefy.kind") != "workflow")
    assert jobs == ["calibrate", "data", "finetune"] or jobs == ["data", "finetune"], jobs
    assert all(r.info.status == "FINISHED" for r in runs)
    parents = {r.info.run_id for r in runs if r.data.tags.get("moefy.kind") == "workflow"}
    assert len(parents) == 2 and {r.data.tags["mlflow.parentRunId"] for r in runs if r.info.run_id not in parents} <= parents
    finetune = next(r for r in runs if r.data.tags.get("rule") == "finetune")
    assert "test_accuracy" in finetune.data.metrics and yaml.safe_load(finetune.data.params["epochs"]) == 1


def test_a_job_that_fails_while_the_server_is_down_reports_its_own_error(against, monkeypatch):
    """Marking the run FAILED cannot reach the server; the job's error, not the server's, is raised."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    with pytest.raises(RuntimeError, match="the job's own failure"):
        with tracking.job_run("finetune", {}):
            against.stop()
            raise RuntimeError("the job's own failure")
