"""MLflow bookkeeping: one experiment per study, one parent run per workflow invocation,
one nested run per job.

The Snakefile creates the store and the parent run once, before jobs start (several jobs
creating a fresh SQLite store at once crash), and hands the parent's id to jobs through the
environment. A step run by hand, without a parent, gets a top-level run of its own.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from moefy.errors import MoefyError
from moefy.workflow import owners

PARENT_RUN_ENV = "MOEFY_MLFLOW_PARENT_RUN_ID"
OWNER_TAG = "moefy.owner"  # host:pid:start of the process that logs the run (see owners.py)
EXPERIMENT_ENV = "MLFLOW_EXPERIMENT_NAME"
URI_ENV = "MLFLOW_TRACKING_URI"
DEFAULT_STORE = Path("results") / "mlflow"

T = TypeVar("T")


def resolve_uri(configured: str | None = None) -> str:
    """Config value, else $MLFLOW_TRACKING_URI, else SQLite under results/mlflow/ (absolute)."""
    uri = configured or os.environ.get(URI_ENV)
    if uri:
        return uri
    return f"sqlite:///{(DEFAULT_STORE / 'mlflow.db').resolve()}"


def _artifact_location(uri: str) -> str | None:
    """Keep artifacts beside a local SQLite store instead of wherever the job's cwd is."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).parent / "artifacts").resolve().as_uri()
    return None


def _server() -> str:
    """The tracking server a message names: the one this process's jobs log to."""
    return os.environ.get(URI_ENV) or "the configured mlflow.tracking_uri"


class _RetryLine(logging.Handler):
    """One line on stderr for each of MLflow's HTTP retries, which urllib3 logs to a logger that
    nothing shows (no handler), so a job waiting on a server that is down says so."""

    def emit(self, record: logging.LogRecord) -> None:
        if not str(record.msg).startswith("Retrying"):
            return
        left = getattr(record.args[0], "total", None) if record.args else None
        print(
            f"moefy: the MLflow tracking server {_server()} did not answer; retrying ({left} retries left)",
            file=sys.stderr,
            flush=True,
        )


def _say_retries() -> None:
    pool = logging.getLogger("urllib3.connectionpool")
    if not any(isinstance(handler, _RetryLine) for handler in pool.handlers):
        pool.addHandler(_RetryLine(logging.WARNING))


def _client(uri: str):
    """An MlflowClient; for a local SQLite store, opened under a file lock, because the first
    client creates the tables and two processes doing that at once crash ("table already exists")."""
    from mlflow.tracking import MlflowClient

    if not uri.startswith("sqlite:///"):
        _say_retries()
        return MlflowClient(tracking_uri=uri)
    database = Path(uri[len("sqlite:///") :])
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(database.with_name(database.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            client = MlflowClient(tracking_uri=uri)
            client.search_experiments(max_results=1)  # forces the store (and its tables) into being now
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return client


# What MLflow's HTTP client says once its own retries (MLFLOW_HTTP_REQUEST_MAX_RETRIES, 7 by default,
# with backoff MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR, 2: about four minutes) found no server.
_UNREACHABLE = ("max retries exceeded", "connection refused", "failed to establish a new connection")


def unreachable_server(err: BaseException) -> MoefyError:
    """The clear error of a tracking server that stayed down through MLflow's retries."""
    from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR, MLFLOW_HTTP_REQUEST_MAX_RETRIES

    return MoefyError(
        f"the MLflow tracking server {_server()} did not answer after {MLFLOW_HTTP_REQUEST_MAX_RETRIES.get()} retries "
        f"(backoff factor {MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.get()}; set MLFLOW_HTTP_REQUEST_MAX_RETRIES and "
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR to wait longer): start it (make mlflow-server) or point mlflow.tracking_uri "
        f"at one that runs, then rerun; finished jobs are not redone ({type(err).__name__})"
    )


def _retry(call: Callable[..., T], *args: Any, attempts: int = 8, **kwargs: Any) -> T:
    """call(*args, **kwargs), again after a pause while SQLite refuses writers because another
    process holds its lock. A tracking server that stays down (MLflow's HTTP client retries on its
    own, logging each retry) becomes one clear MoefyError naming its URI."""
    import requests
    from mlflow.exceptions import MlflowException

    for attempt in range(attempts):
        try:
            return call(*args, **kwargs)
        except (MlflowException, requests.exceptions.ConnectionError) as err:
            if any(phrase in str(err).lower() for phrase in _UNREACHABLE):
                raise unreachable_server(err) from None
            if "locked" not in str(err).lower() or attempt == attempts - 1:
                raise
            time.sleep(0.2 * 2**attempt)
    raise AssertionError("unreachable")


def ensure_experiment(uri: str, name: str) -> str:
    """Create the store and the experiment if missing; return the experiment id."""
    from mlflow.exceptions import MlflowException

    client = _client(uri)
    experiment = _retry(client.get_experiment_by_name, name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return _retry(client.create_experiment, name, artifact_location=_artifact_location(uri))
    except MlflowException:  # another process created it first
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def close_interrupted_runs(client, experiment_id: str) -> int:
    """Mark runs whose process was killed (left RUNNING forever) as KILLED, so the UI does not show
    them as live; runs of processes still alive, here or on other hosts, are left alone."""
    running = _retry(client.search_runs, [experiment_id], "attributes.status = 'RUNNING'", max_results=5000)
    stale = [run for run in running if owners.is_dead(run.data.tags.get(OWNER_TAG, ""))]
    for run in stale:
        _retry(client.set_tag, run.info.run_id, "moefy.interrupted", "its process died while it ran")
        _retry(client.set_terminated, run.info.run_id, status="KILLED")
    return len(stale)


def start_workflow_run(uri: str, experiment: str, run_name: str, tags: Mapping[str, str]) -> str:
    """The parent run of one `snakemake` invocation; its id goes to every job via the environment."""
    client = _client(uri)
    experiment_id = ensure_experiment(uri, experiment)
    close_interrupted_runs(client, experiment_id)
    tags = {"moefy.kind": "workflow", OWNER_TAG: owners.token(), **tags}
    run = _retry(client.create_run, experiment_id, run_name=run_name, tags=tags)
    os.environ[PARENT_RUN_ENV] = run.info.run_id
    return run.info.run_id


def end_workflow_run(uri: str, run_id: str, succeeded: bool) -> None:
    client = _client(uri)
    _retry(client.set_terminated, run_id, status="FINISHED" if succeeded else "FAILED")


def log_workflow_artifact(path: str | os.PathLike) -> None:
    """Attach a study-level artifact (summary, plot) to the workflow's parent run, if there is one."""
    parent = os.environ.get(PARENT_RUN_ENV)
    if parent:
        client = _client(resolve_uri())
        _retry(client.log_artifact, parent, str(path))


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, Mapping):
        for key, item in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), item, out)
    else:
        out[prefix] = str(value)[:6000]


class JobRun:
    """A job's MLflow run; on ranks other than 0 every call does nothing."""

    def __init__(self, client=None, run_id: str | None = None):
        self._client = client
        self.run_id = run_id

    @property
    def active(self) -> bool:
        return self._client is not None

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        if not self.active or not metrics:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(key, float(value), now, step) for key, value in metrics.items()]
        for start in range(0, len(batch), 1000):
            _retry(self._client.log_batch, self.run_id, metrics=batch[start : start + 1000])

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        if self.active:
            _retry(self._client.log_artifact, self.run_id, str(path), artifact_path)

    def publish(self, paths) -> None:
        """Log report files to this run and to the workflow's parent run, where the UI shows them first."""
        for path in paths:
            self.log_artifact(path)
            log_workflow_artifact(path)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if self.active:
            from mlflow.entities import RunTag

            _retry(self._client.log_batch, self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def run_name(step: str, wildcards: Mapping[str, Any]) -> str:
    """`evaluate hoyer-seed0 kmeans-E48-norm`, `train_moe none-seed0 top2`, `merge none-seed0 top2
    msmoe-G4`: the job's step and its place in the grid, as in its paths."""
    variant = "-".join(
        str(wildcards[k]) if k == "penalty" else f"seed{wildcards[k]}" for k in ("penalty", "seed") if k in wildcards
    )
    names = {"num_experts": "E{}", "shared_experts": "S{}"}
    conversion = "-".join(
        names.get(k, "{}").format(wildcards[k])
        for k in ("split", "num_experts", "shared_experts", "router")
        if k in wildcards and (k != "shared_experts" or wildcards[k])
    )
    if conversion and wildcards.get("recovery", "none") != "none":
        conversion += f"-{wildcards['recovery']}"
    parts = (step, variant, conversion, str(wildcards.get("upcycled", "")), str(wildcards.get("merged", "")))
    return " ".join(part for part in parts if part)


@contextmanager
def job_run(
    step: str,
    params: Mapping[str, Any],
    wildcards: Mapping[str, Any] | None = None,
    enabled: bool = True,
) -> Iterator[JobRun]:
    """One MLflow run for one job: tagged with its rule and its place in the grid (`wildcards`: the
    step's penalty, seed, split, num_experts, router flags), params = its resolved settings.

    The run is nested under $MOEFY_MLFLOW_PARENT_RUN_ID when the workflow set it. It ends
    FAILED if the block raises, so a crashed job is visible in the UI.
    """
    if not enabled:
        yield JobRun()
        return
    from mlflow.entities import Param
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    uri = resolve_uri()
    client = _client(uri)
    experiment_id = ensure_experiment(uri, os.environ.get(EXPERIMENT_ENV, "moefy"))
    wildcards = dict(wildcards or {})
    tags = {"rule": step, OWNER_TAG: owners.token(), **{f"wildcard.{k}": str(v) for k, v in wildcards.items()}}
    parent = os.environ.get(PARENT_RUN_ENV)
    if parent:
        tags[MLFLOW_PARENT_RUN_ID] = parent
    name = run_name(step, wildcards)
    run = _retry(client.create_run, experiment_id, run_name=name, tags=tags)
    flat: dict[str, str] = {}
    _flatten("", dict(params), flat)
    flat.update({f"wildcard.{k}": str(v) for k, v in wildcards.items()})
    param_list = [Param(k, v) for k, v in flat.items()]
    for start in range(0, len(param_list), 100):
        _retry(client.log_batch, run.info.run_id, params=param_list[start : start + 100])
    job = JobRun(client, run.info.run_id)
    try:
        yield job
    except BaseException:
        with contextlib.suppress(MoefyError):  # the server is gone too: the job's own error is the one to report
            _retry(client.set_terminated, run.info.run_id, status="FAILED")
        raise
    _retry(client.set_terminated, run.info.run_id, status="FINISHED")
