"""The tiny study's kmeans / norm arm through `--workflow-profile profiles/slurm` on a real
single-node SLURM cluster (tests/slurm_cluster.py), logging to a real MLflow tracking server
(tests/mlflow_server.py): the executor plugin submits every job with sbatch, reads its state with
squeue, the outputs are those of the local run, and so are the job runs on the server, which was
killed and restarted while the study ran.

Its fine-tune is cancelled with scancel in a first invocation (conftest's slurm_study), and a second
invocation finishes the study; CI installs the daemons from Debian's packages and sets
MOEFY_REQUIRE_SLURM, so this runs there and is never skipped.
"""

from __future__ import annotations

import collections
import filecmp
import json
import re

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from slurm_cluster import rule_of
from studies import TINY

pytestmark = pytest.mark.e2e

# The arm's jobs, each run once to completion across both invocations (the report's plot aside,
# every rule with a shell is a SLURM job; `all` runs where snakemake runs).
JOBS = ["data", "calibrate", "finetune", "activations", "split", "balance", "router", "evaluate", "report"]
# What the machine measures, not what the study computes: times, speed-ups, and the kernels
# chosen by timing them (their results are the same).
WALL_CLOCK = re.compile(r"seconds|(^|_)ms(_|$)|speedup|kernel")
ARM = {"penalty": "hoyer", "convert": "ffn", "split": "kmeans", "num_experts": 4, "router": "norm"}


def test_a_cancelled_job_is_reported_failed_and_rerun_by_the_next_invocation(slurm_study):
    first, second = slurm_study.runs
    assert slurm_study.cancelled, "the fine-tune never showed up as RUNNING in squeue"
    assert first["returncode"] != 0, first["stderr"][-3000:]
    assert "Error in rule finetune" in first["stderr"] and "CANCELLED" in first["stderr"], first["stderr"][-3000:]
    states = {job["JobID"]: job["State"] for job in slurm_study.jobs}
    assert states[slurm_study.cancelled].startswith("CANCELLED")
    assert second["returncode"] == 0, second["stderr"][-5000:]
    assert "rule finetune:" in second["stderr"]  # the second invocation ran it again


def test_every_job_shows_up_in_sacct_as_completed_once(slurm_study):
    done = [job for job in slurm_study.jobs if job["JobID"] != slurm_study.cancelled]
    assert {job["State"] for job in done} == {"COMPLETED"}, done
    assert {job["ExitCode"] for job in done} == {"0:0"}
    assert collections.Counter(rule_of(job["Comment"]) for job in done) == collections.Counter(JOBS)


def test_jobs_ask_for_the_config_s_cores_memory_time_partition_and_account(slurm_study):
    by_rule = {rule_of(job["Comment"]): job for job in slurm_study.jobs if job["JobID"] != slurm_study.cancelled}
    finetune, evaluate, calibrate = by_rule["finetune"], by_rule["evaluate"], by_rule["calibrate"]
    # cluster: partition debug, account moefy, 2000 MB, 30 min; compute.threads.finetune 2
    assert (finetune["ReqCPUS"], finetune["ReqMem"], finetune["Timelimit"]) == ("2", "2000M", "00:30:00")
    assert {(job["Partition"], job["Account"]) for job in by_rule.values()} == {("debug", "moefy")}
    # cluster.rules.evaluate replaces memory and time limit; one core (compute.threads.evaluate)
    assert (evaluate["ReqCPUS"], evaluate["ReqMem"], evaluate["Timelimit"]) == ("1", "1500M", "00:20:00")
    # calibrate takes every core of a local run; on a cluster, the cores it times with
    assert calibrate["ReqCPUS"] == "1"


def _without_wall_clock(value):
    if isinstance(value, dict):
        return {k: _without_wall_clock(v) for k, v in value.items() if not WALL_CLOCK.search(k)}
    if isinstance(value, list):
        return [_without_wall_clock(v) for v in value]
    return value


def test_the_outputs_are_the_local_run_s_wall_clock_fields_aside(slurm_study, tiny_study):
    ours, local = slurm_study.workdir / "results" / TINY, tiny_study / "results" / TINY
    compared = 0
    for path in sorted(p for p in ours.rglob("*") if p.is_file()):
        relative = path.relative_to(ours)
        if relative.parts[0] in ("logs", "benchmarks", "report", "calibrate") or relative.name == ".lock":
            continue  # logs, timings, the study's lock; the report has other rows (below)
        theirs = local / relative
        assert theirs.exists(), f"{relative}: written by the SLURM run, not by the local one"
        if path.suffix == ".json":
            assert _without_wall_clock(json.loads(path.read_text())) == _without_wall_clock(json.loads(theirs.read_text())), (
                relative
            )
        else:
            assert filecmp.cmp(path, theirs, shallow=False), f"{relative} differs between the SLURM and the local run"
        compared += 1
    assert compared >= 20  # data, the fine-tuned model, activations, split, balance, router, evaluation
    for table in ("summary.csv", "by_method.csv", "flops_at_99pct.csv"):
        ours_rows, local_rows = (_arm_rows(folder / "report" / table) for folder in (ours, local))
        assert len(ours_rows) > 0
        pd.testing.assert_frame_equal(ours_rows, local_rows)


def _arm_rows(path):
    """The arm's rows as the file's text (a column's type follows the other rows of the table)."""
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    for column, value in ARM.items():
        table = table[table[column] == str(value)]
    if "seed" in table:
        table = table[table["seed"] == "0"]
    table = table.drop(columns=[c for c in table.columns if WALL_CLOCK.search(c)])
    return table.reset_index(drop=True)


def _tracking_uri(study) -> str:
    return yaml.safe_load((study.workdir / "config.yaml").read_text())["mlflow"]["tracking_uri"]


def _job_runs(uri: str) -> tuple[list, list]:
    """The workflow (parent) runs and the job runs of the tiny study's experiment at `uri`."""
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(TINY).experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("moefy.kind") == "workflow"]
    return parents, [r for r in runs if r.data.tags.get("moefy.kind") != "workflow"]


def _job_key(run) -> tuple:
    return run.data.tags["rule"], tuple(sorted((k, v) for k, v in run.data.tags.items() if k.startswith("wildcard.")))


def test_every_job_logs_one_finished_run_to_the_server_as_the_local_run_does(slurm_study, tiny_study):
    uri = _tracking_uri(slurm_study)
    assert uri.startswith("http://127.0.0.1:")
    parents, jobs = _job_runs(uri)
    # one parent per invocation: the cancelled one failed, the second finished
    assert sorted(r.info.status for r in parents) == ["FAILED", "FINISHED"]
    finished = [r for r in jobs if r.info.status == "FINISHED"]
    assert collections.Counter(r.data.tags["rule"] for r in finished) == collections.Counter(JOBS)
    # the cancelled fine-tune's run, if its process got that far before scancel: not FINISHED
    others = [(r.data.tags["rule"], r.info.status) for r in jobs if r.info.status != "FINISHED"]
    assert others in ([], [("finetune", "FAILED")], [("finetune", "KILLED")]), others
    assert {r.data.tags["mlflow.parentRunId"] for r in jobs} <= {r.info.run_id for r in parents}
    local = {_job_key(r): r for r in _job_runs(f"sqlite:///{tiny_study / 'results' / 'mlflow' / 'mlflow.db'}")[1]}
    for run in finished:
        theirs = local[_job_key(run)]
        assert set(run.data.params) == set(theirs.data.params), _job_key(run)
        assert set(run.data.metrics) == set(theirs.data.metrics), _job_key(run)
        assert _without_wall_clock(run.data.metrics) == _without_wall_clock(theirs.data.metrics), _job_key(run)


def test_a_server_killed_while_a_job_runs_is_waited_out_and_the_job_logged_once(slurm_study):
    outage = slurm_study.outage
    assert outage, "the tracking server was never stopped: no evaluate job showed up as RUNNING"
    assert outage["retried"], f"no job log says it retried during the {outage['seconds']:.0f} s outage"
    assert slurm_study.runs[1]["returncode"] == 0  # the study waited it out
    uri = _tracking_uri(slurm_study)
    evaluations = [r for r in _job_runs(uri)[1] if r.data.tags["rule"] == outage["rule"]]
    assert [r.info.status for r in evaluations] == ["FINISHED"]
