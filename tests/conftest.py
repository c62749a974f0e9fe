"""Tiny models and data, built in the tests: a random 2-layer BERT and a learnable toy sentiment CSV."""

from __future__ import annotations

import csv
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=d_ff, max_position_embeddings=64, hidden_act=hidden_act,
    )
    BertModel(config).save_pretrained(folder)
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
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # this venv's python / torchrun
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'results' / 'mlflow' / 'mlflow.db'}"
    env.pop("MOEFY_MLFLOW_PARENT_RUN_ID", None)
    return env


def snakemake_command(workdir: Path, *args: str, cores: int = 2) -> list[str]:
    return [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(workdir),
            "--configfile", str(workdir / "config.yaml"), "--cores", str(cores), *args]


def snakemake(workdir: Path, *args: str, cores: int = 2) -> subprocess.CompletedProcess:
    """Run the real Snakefile in `workdir`; on failure, fail the test with the job logs."""
    done = subprocess.run(snakemake_command(workdir, *args, cores=cores), cwd=workdir, env=environment(workdir),
                          capture_output=True, text=True)
    if done.returncode != 0:
        logs = "\n".join(f"--- {p}\n{p.read_text()[-3000:]}" for p in sorted((workdir / "results").glob("*/logs/**/*.log")))
        pytest.fail(f"snakemake {' '.join(args)} failed:\n{done.stderr[-5000:]}\n{logs}")
    return done
