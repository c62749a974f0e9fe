"""What jobs ask a cluster for (moefy.workflow.cluster), the config section it reads, and the SLURM profile."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from moefy.config import schema, validate
from moefy.errors import MoefyError
from moefy.workflow.cluster import job_resources

ROOT = Path(__file__).resolve().parents[1]


def _config(**sections) -> dict:
    config = {
        "study": "s",
        "model": {"name_or_path": "m"},
        "dataset": {"path": "d.csv", "text_column": "text", "label_column": "label"},
        "grid": {"a": {"split": ["random"], "num_experts": [4], "router": ["groundtruth"]}},
        **sections,
    }
    return validate(config)


def test_cpu_steps_and_ranked_steps_on_cpu_ask_for_memory_and_time_and_no_gpu():
    config = _config()
    for ranked in (False, True):
        resources = job_resources(config["cluster"], config["compute"], "finetune", ranked)
        assert resources == {"mem_mb": 8000, "runtime": 120}  # the documented defaults; no partition or account


def test_a_rule_s_keys_replace_the_section_s_and_partition_and_account_pass_through():
    config = _config(
        cluster={
            "partition": "cpu",
            "account": "lab",
            "mem_mb": 4000,
            "rules": {"finetune": {"mem_mb": 64000, "partition": "gpu"}},
        }
    )
    finetune = job_resources(config["cluster"], config["compute"], "finetune", ranked=True)
    split = job_resources(config["cluster"], config["compute"], "split", ranked=True)
    assert finetune == {"mem_mb": 64000, "runtime": 120, "slurm_partition": "gpu", "slurm_account": "lab"}
    assert split == {"mem_mb": 4000, "runtime": 120, "slurm_partition": "cpu", "slurm_account": "lab"}


def test_on_cuda_ranked_steps_ask_for_one_gpu_per_rank_and_the_others_for_none():
    config = _config(compute={"device": "cuda", "nproc_per_node": 4})
    assert job_resources(config["cluster"], config["compute"], "finetune", ranked=True)["gpu"] == 4
    plain = job_resources(config["cluster"], config["compute"], "balance", ranked=False)
    assert not {"gpu", "gres", "nodes"} & set(plain)


def test_several_nodes_take_one_task_per_node_and_gpus_per_node():
    config = _config(compute={"device": "cuda", "nproc_per_node": 8, "nnodes": 2})
    resources = job_resources(config["cluster"], config["compute"], "finetune", ranked=True)
    # srun in the rule starts one torch.distributed.run per node, so the plugin must not wrap it
    assert resources == {
        "mem_mb": 8000,
        "runtime": 120,
        "nodes": 2,
        "tasks": 2,
        "mpi": "srun",
        "gres": "gpu:8",
        "tasks_per_gpu": 0,
    }
    cpu = _config(compute={"nproc_per_node": 2, "nnodes": 3})
    cpu_resources = job_resources(cpu["cluster"], cpu["compute"], "evaluate", ranked=True)
    assert (cpu_resources["nodes"], cpu_resources["tasks"], "gres" in cpu_resources) == (3, 3, False)


@pytest.mark.parametrize(
    "cluster, named",
    [
        ({"rules": {"finetun": {"mem_mb": 1}}}, "finetun"),
        ({"rules": {"finetune": {"memory": 1}}}, "memory"),
        ({"mem_mb": 0}, "mem_mb"),
        ({"runtime": "1h"}, "runtime"),
        ({"partition": ""}, "partition"),
    ],
)
def test_a_bad_cluster_section_names_the_key(cluster, named):
    with pytest.raises(MoefyError, match=named):
        _config(cluster=cluster)


def _rules_with_a_job() -> dict[str, tuple[str, str]]:
    """Every rule of rules/*.smk that runs a command, but the fetches (local rules): name ->
    (file name, the rule's text)."""
    rules = {}
    for path in (ROOT / "rules").glob("*.smk"):
        for block in re.split(r"(?m)^\s*rule ", path.read_text())[1:]:
            name = block.split(":", 1)[0]
            if "shell:" in block and not name.startswith("fetch_"):
                rules[name] = (path.name, block)
    return rules


def test_the_schema_lists_every_rule_that_submits_a_job_and_every_such_rule_asks_for_resources():
    listed = set(schema()["properties"]["cluster"]["properties"]["rules"]["propertyNames"]["enum"])
    rules = _rules_with_a_job()
    assert listed == set(rules)
    for name, (file, block) in rules.items():
        ranked = "launch=launch(" in block
        expected = f'**cluster_resources("{name}"' + (", ranked=True)" if ranked else ")")
        assert expected in block, f"rule {name} in {file} does not ask for its cluster resources"


def test_fetches_run_where_snakemake_runs():
    data = (ROOT / "rules" / "data.smk").read_text()
    assert re.search(r"localrules:\s+fetch_model,", data) and re.search(r"localrules:\s+fetch_dataset,", data)


def test_the_slurm_profile_uses_the_executor_and_keeps_the_default_profile_s_settings():
    slurm = yaml.safe_load((ROOT / "profiles" / "slurm" / "config.yaml").read_text())
    default = yaml.safe_load((ROOT / "profiles" / "default" / "config.yaml").read_text())
    assert slurm["executor"] == "slurm"
    assert default.items() <= slurm.items()  # a --workflow-profile replaces profiles/default
    # sacct says "CANCELLED by <uid>" for a scancel'd job, which plugin 2.8.0 waits on forever
    assert slurm["slurm-status-command"] == "squeue"
