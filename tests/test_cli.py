import argparse
import re
import shlex

import pytest

from moefy.config import STEP_SECTIONS, section_defaults
from moefy.errors import MoefyError
from moefy.workflow.cli import add_section_flags, run_step, settings_flags


@pytest.mark.parametrize("section", STEP_SECTIONS)
def test_flags_round_trip_through_the_step_parser(section):
    settings = section_defaults(section)
    parser = argparse.ArgumentParser()
    add_section_flags(parser, section)
    assert vars(parser.parse_args(shlex.split(settings_flags(settings)))) == settings


def test_non_default_values_round_trip():
    settings = {**section_defaults("finetune"), "freeze_embeddings": False, "max_train_examples": 500, "precision": "bf16"}
    parser = argparse.ArgumentParser()
    add_section_flags(parser, "finetune")
    assert vars(parser.parse_args(shlex.split(settings_flags(settings)))) == settings
    parser = argparse.ArgumentParser()
    add_section_flags(parser, "evaluate")
    args = parser.parse_args(shlex.split(settings_flags({"budgets": [0.25, 1.0], "batch_size": 8})))
    assert args.budgets == [0.25, 1.0] and args.batch_size == 8


def test_enum_flags_reject_unknown_values():
    parser = argparse.ArgumentParser()
    add_section_flags(parser, "finetune")
    with pytest.raises(SystemExit):
        parser.parse_args(["--activation", "swish"])


def test_user_error_is_one_line_and_exit_2(capsys):
    def main(argv):
        raise MoefyError("config key x: bad")

    with pytest.raises(SystemExit) as exit_info:
        run_step(main)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "config key x: bad" in err and "Traceback" not in err


def test_shared_flags_read_the_same_in_every_step():
    from moefy.workflow.cli import ablation, step_parser

    parser = step_parser("split", "Step split: doc.", "model", "penalty", "seed", "split", "num_experts")
    args = parser.parse_args(
        ["--model", "m", "--penalty", "hoyer", "--seed", "2", "--split", "coact", "--num-experts", "8", "--out", "o"]
    )
    assert ablation(args) == {"penalty": "hoyer", "seed": 2, "split": "coact", "num_experts": 8}
    with pytest.raises(SystemExit):  # names come from the schema's vocabulary
        parser.parse_args(["--model", "m", "--split", "kmean", "--num-experts", "8", "--out", "o"])


@pytest.mark.parametrize(
    "step",
    [
        "data",
        "finetune",
        "activations",
        "split",
        "balance",
        "router",
        "evaluate",
        "export",
        "report",
        "fetch",
        "gguf",
        "harness",
        "serve",
        "remote_code",
        "report_serving",
    ],
)
def test_every_step_has_one_parser_with_out(step):
    import importlib

    module = importlib.import_module(f"moefy.steps.{step}")
    with pytest.raises(SystemExit) as exit_info:
        module.parse_args(["--help"])
    assert exit_info.value.code == 0
    source = importlib.util.find_spec(f"moefy.steps.{step}").loader.get_source(f"moefy.steps.{step}")
    assert "step_parser(" in source and "argparse.ArgumentParser(" not in source
    assert "--method" not in source and "MOEFY_WILDCARDS" not in source


def test_one_rank_runs_a_plain_process_and_more_use_torch_distributed_run():
    from moefy.workflow.launch import step_command, threads_per_rank

    assert step_command("evaluate", 1, python="/venv/bin/python") == "/venv/bin/python -m moefy.steps.evaluate"
    assert step_command("finetune", 2, python="/my venv/python") == (
        "'/my venv/python' -m torch.distributed.run --standalone --nproc_per_node=2 -m moefy.steps.finetune"
    )
    assert threads_per_rank(8, 2) == 4 and threads_per_rank(1, 4) == 1


def test_several_nodes_run_one_torch_distributed_run_per_node_at_a_c10d_rendezvous(tmp_path):
    """The multi-node command line: srun starts one launcher per node, all meeting at the first
    node of the allocation (or the configured endpoint); run through a shell with stand-ins for
    srun and scontrol, it expands to what each node would run."""
    import subprocess

    from moefy.workflow.launch import step_command

    command = step_command("finetune", 4, python="/venv/bin/python", nnodes=2)
    assert command.startswith("srun --nodes=2 --ntasks-per-node=1 /venv/bin/python -m torch.distributed.run --nnodes=2 ")
    assert "--nproc_per_node=4 --rdzv-backend=c10d" in command and "--standalone" not in command
    assert step_command("finetune", 4, python="/venv/bin/python", nnodes=2, rdzv_endpoint="node7:29400").endswith(
        '--rdzv-endpoint=node7:29400 --rdzv-id="$SLURM_JOB_ID" -m moefy.steps.finetune'
    )
    for name, body in (("srun", 'echo "$@"'), ("scontrol", "echo gpu-a; echo gpu-b")):
        (tmp_path / name).write_text(f"#!/bin/sh\n{body}\n")
        (tmp_path / name).chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "SLURM_JOB_NODELIST": "gpu-[a-b]", "SLURM_JOB_ID": "42"}
    ran = subprocess.run(["sh", "-c", command], env=env, capture_output=True, text=True, check=True).stdout.split()
    assert ran[:3] == ["--nodes=2", "--ntasks-per-node=1", "/venv/bin/python"]
    assert "--rdzv-endpoint=gpu-a:29500" in ran and "--rdzv-id=42" in ran and ran[-2:] == ["-m", "moefy.steps.finetune"]


def test_jobs_find_the_interpreter_that_runs_snakemake_first(monkeypatch):
    from moefy.workflow.launch import interpreter_first_on_path

    monkeypatch.setenv("PATH", "/usr/bin:/venv/bin:/bin")
    interpreter_first_on_path("/venv/bin/python")
    import os

    assert os.environ["PATH"] == "/venv/bin:/usr/bin:/bin"


def test_the_conda_environment_installs_this_checkout(tmp_path, monkeypatch):
    """envs/moefy.yaml's pip line names ${MOEFY_SOURCE}; pip expands it to the folder the workflow exports."""
    import os

    import yaml

    from moefy.workflow.launch import SOURCE_ENV, export_source_folder

    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    env = yaml.safe_load((root / "envs" / "moefy.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert pip == ["-e ${MOEFY_SOURCE}"]
    monkeypatch.setenv(SOURCE_ENV, "")
    export_source_folder(root)
    assert os.environ[SOURCE_ENV] == str(root) and (root / "pyproject.toml").is_file()
    for rule in (root / "rules").glob("*.smk"):
        if rule.name != "common.smk":
            text = rule.read_text()  # `use rule ... with:` inherits the conda: of the rule it reuses
            assert text.count("conda:") == len(re.findall(r"^\s*rule \w+:", text, re.M)), f"{rule.name}: a rule without conda:"
