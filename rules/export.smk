# On demand: ask for results/<study>/export/<penalty>/<split>-E<E>-<selector>-b<budget> to get a folder that
# moefy.export.load_moe restores for inference outside the workflow.


rule export:
    input:
        model=rules.finetune.output.model,
        labels=rules.balance.output.labels,
        router=rules.selector.output.router,
    output:
        directory(results("export", "{penalty}", "{split}-E{num_experts}-{selector}-b{budget}")),
    log:
        logs("export", "{penalty}/{split}-E{num_experts}-{selector}-b{budget}"),
    conda:
        "../envs/moefy.yaml"
    wildcard_constraints:
        budget=r"[0-9.]+",
    params:
        tags=wildcard_tags,
        task=config["task"],
    shell:
        "{params.tags} python -m moefy.steps.export --model {input.model} --labels {input.labels} --router {input.router} "
        "--split {wildcards.split} --num-experts {wildcards.num_experts} --selector {wildcards.selector} "
        "--budget {wildcards.budget} --out {output} > {log} 2>&1"
