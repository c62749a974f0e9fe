import pytest
from mlflow.tracking import MlflowClient

from moefy.workflow import tracking


def test_job_runs_nest_under_the_workflow_run(mlflow_store, monkeypatch):
    parent = tracking.start_workflow_run(mlflow_store, "test", "snakemake test", {"study": "t"})
    monkeypatch.setenv(tracking.PARENT_RUN_ENV, parent)
    with tracking.job_run(
        "evaluate", {"budgets": [0.1, 0.5], "nested": {"a": 1}}, {"split": "kmeans", "num_experts": 8, "router": "mlp"}
    ) as run:
        run.log_metrics({"test_accuracy/budget_0.1": 0.7, "x": 1})
    tracking.end_workflow_run(mlflow_store, parent, succeeded=True)

    client = MlflowClient(mlflow_store)
    child = client.get_run(run.run_id)
    assert child.data.tags["mlflow.parentRunId"] == parent
    assert child.data.tags["rule"] == "evaluate" and child.data.tags["wildcard.split"] == "kmeans"
    assert child.data.params["budgets"] == "[0.1, 0.5]" and child.data.params["nested.a"] == "1"
    assert child.data.metrics["test_accuracy/budget_0.1"] == pytest.approx(0.7)
    assert child.info.status == "FINISHED"
    assert client.get_run(parent).info.status == "FINISHED"


def test_a_failing_job_is_marked_failed(mlflow_store):
    with pytest.raises(RuntimeError):
        with tracking.job_run("finetune", {}) as run:
            raise RuntimeError("boom")
    assert MlflowClient(mlflow_store).get_run(run.run_id).info.status == "FAILED"


def test_disabled_runs_log_nothing(mlflow_store):
    """Ranks other than 0 get a run that records nothing, so a job logs exactly once."""
    with tracking.job_run("finetune", {"x": 1}, enabled=False) as run:
        run.log_metrics({"a": 1.0})
        run.set_tags({"t": "v"})
        run.log_artifact(__file__)
    client = MlflowClient(mlflow_store)
    experiment = client.get_experiment_by_name("test")
    assert experiment is None or client.search_runs([experiment.experiment_id]) == []


def test_experiment_creation_is_idempotent(mlflow_store):
    assert tracking.ensure_experiment(mlflow_store, "x") == tracking.ensure_experiment(mlflow_store, "x")


def test_default_store_is_under_results(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking.resolve_uri() == f"sqlite:///{tmp_path}/results/mlflow/mlflow.db"
    assert tracking.resolve_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


@pytest.mark.e2e
def test_jobs_creating_a_fresh_store_at_once_do_not_crash(tmp_path):
    """Steps run by hand in parallel (no Snakemake onstart) all create the SQLite store at once."""
    import subprocess
    import sys

    uri = f"sqlite:///{tmp_path / 'fresh' / 'mlflow.db'}"
    code = "from moefy.workflow import tracking; tracking.job_run('split', {}).__enter__()"
    env = {"MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": "race", "PATH": "/usr/bin:/bin"}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    errors = [p.communicate()[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, "\n".join(errors)
    runs = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("race").experiment_id])
    assert len(runs) == 4


def test_runs_of_killed_processes_are_closed_by_the_next_invocation(mlflow_store, monkeypatch):
    import subprocess
    import sys

    code = (
        "import os, signal; from moefy.workflow import tracking; "
        "tracking.start_workflow_run(os.environ['MLFLOW_TRACKING_URI'], 'test', 'snakemake test', {}); "
        "job = tracking.job_run('finetune', {}); job.__enter__(); os.kill(os.getpid(), signal.SIGKILL)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == -9
    client = MlflowClient(mlflow_store)
    experiment = client.get_experiment_by_name("test").experiment_id
    assert len(client.search_runs([experiment], "attributes.status = 'RUNNING'")) == 2
    alive = tracking.start_workflow_run(mlflow_store, "test", "snakemake test", {})  # this process: alive
    with tracking.job_run("evaluate", {}):
        tracking.start_workflow_run(mlflow_store, "test", "snakemake test", {})  # a later invocation
        runs = client.search_runs([experiment])
        assert sorted(r.info.status for r in runs) == ["KILLED", "KILLED", "RUNNING", "RUNNING", "RUNNING"]
    assert client.get_run(alive).info.status == "RUNNING"


def test_run_names_read_like_the_job_s_paths():
    assert (
        tracking.run_name("evaluate", {"penalty": "hoyer", "seed": 0, "split": "kmeans", "num_experts": 48, "router": "norm"})
        == "evaluate hoyer-seed0 kmeans-E48-norm"
    )
    assert tracking.run_name("finetune", {"penalty": "none", "seed": 1}) == "finetune none-seed1"
    assert tracking.run_name("data", {}) == "data"


def test_run_names_of_training_jobs_name_the_recovery_and_the_upcycled_model():
    wildcards = {"penalty": "none", "seed": 0, "split": "kmeans", "num_experts": 48, "router": "mlp", "recovery": "kd"}
    assert tracking.run_name("train_moe", wildcards) == "train_moe none-seed0 kmeans-E48-mlp-kd"
    assert tracking.run_name("evaluate", wildcards | {"recovery": "none"}) == "evaluate none-seed0 kmeans-E48-mlp"
    assert tracking.run_name("train_moe", {"penalty": "none", "seed": 1, "upcycled": "top2"}) == "train_moe none-seed1 top2"
    merged = {"penalty": "none", "seed": 0, "upcycled": "top2", "merged": "msmoe-G4-kd", "recovery": "kd"}
    assert tracking.run_name("train_moe", merged) == "train_moe none-seed0 top2 msmoe-G4-kd"
