"""What a job asks a cluster's scheduler for: the Snakemake resources that
snakemake-executor-plugin-slurm turns into sbatch flags (--mem, --time, --partition, --account,
--gpus / --gres, --nodes, --ntasks). Cores are the rule's threads (--cpus-per-task).

The values come from the config's `cluster` section (each rule may replace the section's keys) and
from `compute`; a local run reads none of them, since Snakemake limits local jobs only by the
resources given with --resources.
"""

from __future__ import annotations

from typing import Any

SETTINGS = ("partition", "account", "mem_mb", "runtime")


def rule_settings(cluster: dict[str, Any], rule: str) -> dict[str, Any]:
    """The section's partition, account, mem_mb and runtime, with the rule's own keys in their place."""
    return {**{key: cluster[key] for key in SETTINGS}, **cluster["rules"].get(rule, {})}


def job_resources(cluster: dict[str, Any], compute: dict[str, Any], rule: str, ranked: bool) -> dict[str, Any]:
    """The resources of `rule`'s jobs. `ranked`: the step is GPU-capable and starts compute.nproc_per_node
    ranks (moefy.workflow.launch.step_command); the others run as one process and ask for no GPU.

    On device cuda a ranked job on one node asks for nproc_per_node GPUs (--gpus). On several nodes
    it takes one task per node (--nodes N --ntasks N) and runs srun itself, one
    torch.distributed.run per node (`mpi` tells the plugin not to wrap the job in an srun of its
    own), with nproc_per_node GPUs on each node (--gres gpu:P, per node where --gpus would count
    the whole job's).
    """
    settings = rule_settings(cluster, rule)
    resources: dict[str, Any] = {"mem_mb": settings["mem_mb"], "runtime": settings["runtime"]}
    if settings["partition"]:
        resources["slurm_partition"] = settings["partition"]
    if settings["account"]:
        resources["slurm_account"] = settings["account"]
    if not ranked:
        return resources
    nodes, per_node = compute["nnodes"], compute["nproc_per_node"]
    gpus = compute["device"] == "cuda"
    if nodes > 1:
        resources.update(nodes=nodes, tasks=nodes, mpi="srun")
        if gpus:
            resources.update(gres=f"gpu:{per_node}", tasks_per_gpu=0)  # 0: no --ntasks-per-gpu
    elif gpus:
        resources["gpu"] = per_node
    return resources
