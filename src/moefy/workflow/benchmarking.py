"""What the benchmark scripts share: the machine they ran on, their JSON file and their MLflow run."""

from __future__ import annotations

import json
import os
import platform
import re
from pathlib import Path

import torch

from moefy import native
from moefy.measure import machine
from moefy.workflow import tracking


def where(device: torch.device) -> dict:
    """The Python, OMP threads, CPU / GPU and looped MoE kernel (native or the Python loop, and
    why) a benchmark measured, for its records."""
    return {
        "python": platform.python_version(),
        "omp_threads": os.environ.get("OMP_NUM_THREADS"),
        "looped_kernel": native.implementation(device),
        **machine.describe(device),
    }


def save(
    name: str,
    rows: list[dict],
    here: dict,
    quick: bool,
    json_path: Path | None,
    log_mlflow: bool,
    keys: tuple[str, ...],
    prefix=None,
) -> None:
    """Write {machine, quick, rows} to `json_path` and log each row's `keys` as MLflow metrics named
    `<prefix(row)>/<key>` in experiment moefy-benchmarks (the JSON as an artifact)."""
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({"machine": here, "quick": quick, "rows": rows}, indent=2) + "\n")
    if not log_mlflow:
        return
    prefix = prefix or (lambda row: row["case"])
    os.environ.setdefault(tracking.EXPERIMENT_ENV, "moefy-benchmarks")
    with tracking.job_run(name, {"quick": quick, **here}) as run:
        run.log_metrics({re.sub(r"[^\w\-. /]", "_", f"{prefix(r)}/{key}"): float(r[key]) for r in rows for key in keys})
        if json_path:
            run.log_artifact(json_path)
