"""How a rule starts a step: the command line, and the threads each rank gets.

One rank runs the step as a plain process; more ranks start it with torch.distributed.run from
the same interpreter (on several nodes, one per node of a SLURM allocation, through srun), so no
`torchrun` script has to be on PATH (rules/common.smk puts the
interpreter that runs Snakemake first on the jobs' PATH).
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

RDZV_PORT = 29500
# The first node of the SLURM allocation, read when the job's shell starts (on that node).
FIRST_SLURM_NODE = '$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)'


def step_command(
    step: str, nproc_per_node: int = 1, python: str | None = None, nnodes: int = 1, rdzv_endpoint: str | None = None
) -> str:
    """One rank: a plain process. Several on one node: torch.distributed.run --standalone. Several
    nodes: one torch.distributed.run per node of the SLURM allocation (srun, one task per node)
    meeting at a c10d rendezvous on `rdzv_endpoint`, by default the allocation's first node."""
    python = shlex.quote(python or sys.executable)
    module = f"-m moefy.steps.{step}"
    if nnodes == 1 and nproc_per_node == 1:
        return f"{python} {module}"
    if nnodes == 1:
        return f"{python} -m torch.distributed.run --standalone --nproc_per_node={nproc_per_node} {module}"
    endpoint = shlex.quote(rdzv_endpoint) if rdzv_endpoint else f'"{FIRST_SLURM_NODE}:{RDZV_PORT}"'
    return (
        f"srun --nodes={nnodes} --ntasks-per-node=1 {python} -m torch.distributed.run --nnodes={nnodes} "
        f'--nproc_per_node={nproc_per_node} --rdzv-backend=c10d --rdzv-endpoint={endpoint} --rdzv-id="$SLURM_JOB_ID" {module}'
    )


def threads_per_rank(threads: int, nproc_per_node: int) -> int:
    """OMP threads of each rank: the job's cores split evenly over its ranks (at least one)."""
    return max(1, threads // nproc_per_node)


def interpreter_first_on_path(python: str | None = None) -> None:
    """Put the folder of `python` (default: this interpreter) first on PATH, for the jobs this
    process starts: their `python` is then this one unless a conda environment is activated."""
    folder = str(Path(python or sys.executable).parent)
    rest = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != folder]
    os.environ["PATH"] = os.pathsep.join([folder, *rest])


SOURCE_ENV = "MOEFY_SOURCE"


def export_source_folder(folder: str | os.PathLike) -> None:
    """Tell the processes this one starts where the workflow's checkout is: envs/moefy.yaml installs
    moefy from ${MOEFY_SOURCE}, which pip expands when Snakemake builds the rules' conda environment."""
    os.environ[SOURCE_ENV] = str(Path(folder).resolve())
