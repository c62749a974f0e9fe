"""The studies the end-to-end tests run through the real Snakefile, and how they run it.

The tiny study (a random 2-layer BERT on the toy sentiment CSV: every split and router, a second
seed, attention converted too, a recovered conversion, an upcycled model merged and compressed)
runs once per test session (conftest's tiny_study); tests that only read its outputs share it, and
the few that need a run of their own (kills, locks, Ctrl-C) reuse its config. The SLURM study is
its kmeans / norm arm alone, run on a real single-node SLURM cluster (conftest's slurm_study).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from builders import build_tiny_bert, write_toy_sentiment

ROOT = Path(__file__).resolve().parents[1]

# --- running the real Snakefile ---------------------------------------------------------------------


def environment(workdir: Path) -> dict[str, str]:
    """The environment of a snakemake run: as a user's who calls .venv/bin/snakemake without activating
    the venv (its folder is not on PATH, and jobs must find the interpreter anyway)."""
    env = dict(os.environ)
    venv = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p and p != venv)
    env.pop("VIRTUAL_ENV", None)
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'results' / 'mlflow' / 'mlflow.db'}"
    env.pop("MOEFY_MLFLOW_PARENT_RUN_ID", None)
    return env


def snakemake_command(workdir: Path, *args: str, cores: int | None = 2) -> list[str]:
    """The command line of a snakemake run in `workdir`; cores None: none given (a cluster run's
    main snakemake, which has --jobs instead)."""
    return [
        sys.executable,
        "-m",
        "snakemake",
        "-s",
        str(ROOT / "Snakefile"),
        "--directory",
        str(workdir),
        "--configfile",
        str(workdir / "config.yaml"),
        *(["--cores", str(cores)] if cores is not None else []),
        *args,
    ]


def _fail_with_logs(workdir: Path, args, stderr: str) -> None:
    logs = "\n".join(f"--- {p}\n{p.read_text()[-3000:]}" for p in sorted((workdir / "results").glob("*/logs/**/*.log")))
    pytest.fail(f"snakemake {' '.join(args)} failed:\n{stderr[-5000:]}\n{logs}")


def snakemake(workdir: Path, *args: str, cores: int = 2, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real Snakefile in `workdir`; on failure, fail the test with the job logs."""
    done = subprocess.run(
        snakemake_command(workdir, *args, cores=cores),
        cwd=workdir,
        env=env or environment(workdir),
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        _fail_with_logs(workdir, args, done.stderr)
    return done


def start_snakemake(workdir: Path, *args: str, cores: int = 2) -> subprocess.Popen:
    """The real Snakefile in `workdir`, started in the background (see finish_snakemake). Its stderr
    goes to a file, not a pipe: a pipe nobody reads while other tests run would fill and stall it."""
    command = snakemake_command(workdir, *args, cores=cores)
    with open(workdir / "snakemake.stderr", "w") as stderr:
        return subprocess.Popen(command, cwd=workdir, env=environment(workdir), stdout=subprocess.DEVNULL, stderr=stderr)


def finish_snakemake(proc: subprocess.Popen, workdir: Path) -> None:
    """Wait for a start_snakemake run; on failure, fail the test with the job logs."""
    proc.wait()
    if proc.returncode != 0:
        _fail_with_logs(workdir, proc.args, (workdir / "snakemake.stderr").read_text())


# --- the shared tiny study ------------------------------------------------------------------------

TINY = "tiny"
E, D_FF, LAYERS = 4, 64, 2
SPLITS, ROUTERS = ["random", "kmeans", "coact"], ["groundtruth", "similarity", "mlp", "norm"]
# Every split and every router runs end to end; their cross product adds no path to test (each
# step handles one split or one router), so the study is its diagonal, plus norm (D2DMoE) on kmeans.
CONVERSIONS = [("random", "groundtruth"), ("kmeans", "similarity"), ("coact", "mlp"), ("kmeans", "norm")]
BUDGETS, THRESHOLDS = [0.25, 0.5, 0.75, 1.0], [0.0, 0.5, 1.0]
VARIANT = "hoyer-seed0"  # D2DMoE's penalty: its fine-tuning path is the one with most to test
ATTENTION = "hoyer-seed0-attention"  # its conversion with the attention projections too
REPLICATE = "hoyer-seed1"  # a second seed of one ablation: replicates and the report's spread
# Recovery (kd) of kmeans / similarity, and one upcycled model: drop-upcycled expert choice (top-k
# training, the default routing, is the unit tests' and trains the same way).
RECOVERED = f"kmeans-E{E}-similarity-kd"
MERGED = [
    "full",
    "msmoe-G2-svd",
    "msmoe-G2-kd-svd-kd",
    "hcsmoe-G2",
    "hcsmoe-G2-kd",
    "reap-G2",
    "reap-G2-kd",
]  # the upcycled model's
UPCYCLED_MODELS = {"expert-choice": {"experts": E, "routing": "expert_choice", "capacity_factor": 2.0, "drop_ratio": 0.5}}


def diagonal(conversions, **arm) -> dict:
    """One grid arm per (split, router): every split and router of `conversions`, not their product."""
    return {
        f"{split}-{router}": {"split": [split], "num_experts": [E], "router": [router], **arm} for split, router in conversions
    }


def tiny_config(**overrides) -> dict:
    """Every split and router on one Hoyer-fine-tuned tiny BERT, budgets and thresholds, plus a
    second seed of coact / mlp, kmeans / norm with the attention projections converted too, a recovered conversion, an upcycled model with its dense
    continuation, and that model merged and compressed (MC-SMoE, with and without distillation)."""
    config = {
        "study": TINY,
        "model": {"name_or_path": "model"},
        "dataset": {"path": "reviews.csv", "text_column": "text", "label_column": "category", "labels": ["rotten", "fresh"]},
        "grid": {
            **diagonal(CONVERSIONS, penalty=["hoyer"], thresholds=THRESHOLDS),
            "replicate": {"penalty": ["hoyer"], "seed": [1], "split": ["coact"], "num_experts": [E], "router": ["mlp"]},
            # D2DMoE on attention too: the variant's projections distilled, then kmeans / norm
            "attention": {
                "penalty": ["hoyer"],
                "convert": ["ffn+attention"],
                "split": ["kmeans"],
                "num_experts": [E],
                "router": ["norm"],
                "thresholds": THRESHOLDS,
            },
            "recovered": {
                "penalty": ["hoyer"],
                "split": ["kmeans"],
                "num_experts": [E],
                "router": ["similarity"],
                "recovery": ["kd"],
            },
        },
        "upcycling": {"penalty": "hoyer", "seeds": [0], "models": UPCYCLED_MODELS},
        # MC-SMoE on the upcycled model: merged to 2 experts and compressed, one-shot and distilled;
        # HC-SMoE merged and REAP pruned to 2 experts, one-shot and distilled
        "merging": {
            "models": list(UPCYCLED_MODELS),
            "groups": [2],
            "methods": ["mcsmoe", "hcsmoe", "reap"],
            "recovery": ["none", "kd"],
        },
        "usage": {"calibration_examples": 64},
        "train_moe": {"max_steps": 8, "batch_size": 16, "learning_rate": 1e-3},
        "finetune": {
            "epochs": 3,
            "batch_size": 16,
            "max_length": 32,
            "learning_rate": 3e-3,
            "freeze_embeddings": False,
            "sparsity_weight": 0.05,
            "precision": "fp32",
        },
        "activations": {"max_tokens": 3000, "sample_tokens": 1500, "batch_size": 32},
        "distill_attention": {
            "max_tokens": 3000,
            "max_epochs": 30,
            "flops_factor": 2.0,
        },  # width 32: R^2 0.92-0.96 (16: 0.56-0.83)
        "router": {"mlp_epochs": 5, "norm_hidden": 16},
        "evaluate": {"budgets": BUDGETS, "batch_size": 32},
    }
    config.update(overrides)
    return copy.deepcopy(config)  # the module's lists and models are shared: a test's edit stays its own


def change(config: dict, dotted: str, value) -> dict:
    """`config` with the key at `dotted` (e.g. finetune.epochs) set to `value`."""
    node = config
    *parents, last = dotted.split(".")
    for key in parents:
        node = node[key]
    node[last] = value
    return config


def make_workdir(root: Path, config: dict | None = None) -> Path:
    """A study folder: the tiny random BERT, the toy CSV (mixed sentiments, so small budgets change
    some predictions) and config.yaml."""
    build_tiny_bert(root / "model", layers=LAYERS, d_ff=D_FF)
    write_toy_sentiment(root / "reviews.csv", rows=400, mixed=True)
    (root / "config.yaml").write_text(yaml.safe_dump(config or tiny_config()))
    return root


def in_study(workdir: Path, step: str, *parts: str, variant: str = VARIANT) -> Path:
    """results/tiny/<step>/[<variant>/]...: every step after data and calibrate is per variant."""
    per_variant = step not in ("data", "calibrate", "report", "logs")
    return workdir.joinpath("results", TINY, step, *([variant] if per_variant else []), *parts)


# --- the tiny study on a real SLURM cluster ---------------------------------------------------------

SLURM_ARM = "kmeans-norm"  # one arm: every step of a conversion chain, without the grid's other arms
SLURM_CLUSTER = {
    "partition": "debug",
    "account": "moefy",
    "mem_mb": 2000,
    "runtime": 30,
    "rules": {"evaluate": {"mem_mb": 1500, "runtime": 20}},
}


def slurm_config(tracking_uri: str) -> dict:
    """The tiny study's kmeans / norm arm alone (data, calibrate, fine-tune, activations, split,
    balance, router, evaluate, report), with what its jobs ask the cluster for, logging to the
    tracking server at `tracking_uri`."""
    config = tiny_config(cluster=SLURM_CLUSTER, mlflow={"tracking_uri": tracking_uri})
    config["grid"] = {SLURM_ARM: config["grid"][SLURM_ARM]}
    del config["upcycling"], config["merging"]
    return config
