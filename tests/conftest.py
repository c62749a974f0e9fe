"""Tiny models and data, built in the tests (a random 2-layer BERT, a learnable toy sentiment CSV),
and the one tiny study that every end-to-end test reading a finished study shares.

The tiny study runs once per test session through the real Snakefile; tests that only read its
outputs (contracts, MLflow runs, seeds, parallel writers) share it, and the few that need a run
of their own (kills, locks, Ctrl-C) reuse its config and copy what they compare against.
"""

from __future__ import annotations

import copy
import csv
import importlib.util
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

POSITIVE = "good great fine superb lovely moving funny smart charming brilliant".split()
NEGATIVE = "bad awful dull boring weak messy tedious stupid bland clumsy".split()
FILLER = "the a movie film story plot this it was is and with its cast".split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
ROOT = Path(__file__).resolve().parents[1]


def build_tiny_bert(folder: Path, hidden_act: str = "gelu", layers: int = 2, d_ff: int = 64) -> Path:
    from transformers import BertConfig, BertModel, BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    words = SPECIAL + sorted(set(POSITIVE + NEGATIVE + FILLER))
    tokenizer = BertTokenizer(vocab={word: i for i, word in enumerate(words)}, do_lower_case=True)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=d_ff,
        max_position_embeddings=64,
        hidden_act=hidden_act,
    )
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


FAMILIES = ("bert", "roberta", "distilbert", "t5", "t5-gated", "gpt2", "llama", "mistral", "qwen2")
DECODERS = ("gpt2", "llama", "mistral", "qwen2")


def _family_config(family: str, vocab_size: int, layers: int, d_ff: int, hidden_act: str | None):
    """A tiny config of one family: d_model 32, 2 heads, the BERT test vocabulary's special ids."""
    import transformers as tf

    special = {"pad_token_id": 0}
    if family == "bert":
        return tf.BertConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            num_hidden_layers=layers,
            num_attention_heads=2,
            intermediate_size=d_ff,
            max_position_embeddings=64,
            hidden_act=hidden_act or "gelu",
        )
    if family == "roberta":
        return tf.RobertaConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            num_hidden_layers=layers,
            num_attention_heads=2,
            intermediate_size=d_ff,
            max_position_embeddings=70,
            type_vocab_size=1,
            hidden_act=hidden_act or "gelu",
            **special,
        )
    if family == "distilbert":
        return tf.DistilBertConfig(
            vocab_size=vocab_size,
            dim=32,
            n_layers=layers,
            n_heads=2,
            hidden_dim=d_ff,
            max_position_embeddings=64,
            activation=hidden_act or "gelu",
            **special,
        )
    if family in ("t5", "t5-gated"):
        # T5 classifiers read the decoder at the eos token: [SEP] ends every text of the test tokenizer.
        proj = ("gated-" if family == "t5-gated" else "") + (hidden_act or ("gelu" if family == "t5-gated" else "relu"))
        return tf.T5Config(
            vocab_size=vocab_size,
            d_model=32,
            d_kv=16,
            d_ff=d_ff,
            num_layers=layers,
            num_heads=2,
            feed_forward_proj=proj,
            eos_token_id=SPECIAL.index("[SEP]"),
            decoder_start_token_id=0,
            **special,
        )
    if family == "gpt2":
        return tf.GPT2Config(
            vocab_size=vocab_size,
            n_embd=32,
            n_layer=layers,
            n_head=2,
            n_positions=64,
            n_inner=d_ff,
            activation_function=hidden_act or "gelu_new",
            bos_token_id=2,
            eos_token_id=3,
        )
    kinds = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config}
    return kinds[family](
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=d_ff,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        hidden_act=hidden_act or "silu",
    )


def build_tiny(family: str, folder: Path, hidden_act: str | None = None, layers: int = 2, d_ff: int = 64) -> Path:
    """A random model of `family` with the toy vocabulary's tokenizer (input ids and mask only).

    Decoders are saved with their LM head, the others as base models; moefy adds the head it needs.
    """
    from transformers import AutoModel, AutoModelForCausalLM, BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    words = SPECIAL + sorted(set(POSITIVE + NEGATIVE + FILLER))
    tokenizer = BertTokenizer(
        vocab={word: i for i, word in enumerate(words)}, do_lower_case=True, model_input_names=["input_ids", "attention_mask"]
    )
    torch.manual_seed(0)
    config = _family_config(family, tokenizer.vocab_size, layers, d_ff, hidden_act)
    (AutoModelForCausalLM if family in DECODERS else AutoModel).from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_toy_sentiment(path: Path, rows: int = 240, seed: int = 0, mixed: bool = False) -> Path:
    """A CSV shaped like the Rotten Tomatoes file: category (fresh/rotten/plot), text, movie_name.

    With `mixed`, texts also carry words of the other sentiment, so some are hard to call and a
    perturbed model (an MoE at a small budget) changes some predictions.
    """
    rng = random.Random(seed)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["category", "text", "movie_name"])
        for i in range(rows):
            category = rng.choice(["fresh", "rotten", "plot"]) if i % 10 == 0 else rng.choice(["fresh", "rotten"])
            words = POSITIVE if category == "fresh" else NEGATIVE
            text = " ".join(rng.choice(FILLER) for _ in range(rng.randint(2, 8)))
            text += " " + " ".join(rng.choice(words) for _ in range(rng.randint(1, 3)))
            if mixed:
                other = NEGATIVE if words is POSITIVE else POSITIVE
                text += " " + " ".join(rng.choice(other) for _ in range(rng.randint(0, 3)))
            writer.writerow([category, text, f"movie {i % 7}"])
    return path


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
MERGED = ["full", "msmoe-G2-svd", "msmoe-G2-kd-svd-kd"]  # the upcycled model's merged models
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
        # MC-SMoE on the upcycled model: merged to 2 experts and compressed, one-shot and distilled
        "merging": {"models": list(UPCYCLED_MODELS), "groups": [2], "methods": ["mcsmoe"], "recovery": ["none", "kd"]},
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
    config.update(copy.deepcopy(overrides))
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


# --- the suite's time budget -----------------------------------------------------------------------

# CI stops a submission after 90 minutes; the suite keeps to a third of that, or says so loudly.
SUITE_BUDGET_MINUTES = 30


def pytest_sessionstart(session):
    session.config.stash[_STARTED] = time.time()


def budget_lines(minutes: float, durations: list[tuple[str, str, float]]) -> list[str]:
    """What the suite says at its end: its total, and past the budget one warning naming the slowest
    tests (nodeid, phase, seconds)."""
    lines = [f"moefy: the suite took {minutes:.1f} min ({len(durations)} test phases timed)"]
    if minutes > SUITE_BUDGET_MINUTES:
        slowest = sorted(durations, key=lambda d: d[2], reverse=True)[:5]
        named = ", ".join(f"{nodeid} ({when}, {seconds:.0f} s)" for nodeid, when, seconds in slowest)
        lines.append(
            f"WARNING: the suite took {minutes:.1f} min, over its {SUITE_BUDGET_MINUTES}-minute budget "
            f"(a third of CI's limit); slowest: {named}"
        )
    return lines


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    minutes = (time.time() - config.stash[_STARTED]) / 60
    reports = [r for kind in ("passed", "failed", "error", "skipped") for r in terminalreporter.stats.get(kind, [])]
    durations = [(r.nodeid, r.when, r.duration) for r in reports if hasattr(r, "duration")]
    for line in budget_lines(minutes, durations):
        terminalreporter.write_line(line, yellow=line.startswith("WARNING"), bold=line.startswith("WARNING"))


_STARTED = pytest.StashKey[float]()
