# moefy: fine-tune -> [distill attention] -> activations -> split -> balance -> router -> [recover] -> evaluate -> report,
# fine-tune -> upcycle -> train (beside a dense continuation) -> report_upcycling,
# and trained upcycled model -> usage -> merge -> [distil] -> [compress -> distil] -> evaluate_smoe -> report_merging.
# `snakemake --cores all` runs the grid in config.yaml; asking for one evaluate/*.json file runs one ablation.
from snakemake.utils import min_version

min_version("9.0")


# config.yaml is the default study; `--configfile other.yaml` replaces it instead of merging into it,
# so keys of the default study (its fetch specs, say) never leak into another study.
if not workflow.overwrite_configfiles:

    configfile: "config.yaml"


report: "report/workflow.rst"


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/calibrate.smk"
include: "rules/finetune.smk"
include: "rules/distill_attention.smk"
include: "rules/activations.smk"
include: "rules/split.smk"
include: "rules/balance.smk"
include: "rules/router.smk"
include: "rules/evaluate.smk"
include: "rules/recover.smk"
include: "rules/upcycle.smk"
include: "rules/merge.smk"
include: "rules/export.smk"
include: "rules/serve.smk"
include: "rules/report.smk"


rule all:
    default_target: True
    input:
        rules.report.output,
        rules.report_upcycling.output if GRID.upcycled else [],
        rules.report_merging.output if GRID.merged else [],
        rules.report_serving.output if SERVED else [],


onstart:
    check_before_jobs()


onsuccess:
    end_mlflow_workflow_run(succeeded=True)


onerror:
    end_mlflow_workflow_run(succeeded=False)
