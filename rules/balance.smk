rule balance:
    input:
        model=rules.finetune.output.model,
        labels=rules.split.output.labels,
        coactivation=rules.activations.output.coactivation,
    output:
        labels=results("balance", "{penalty}", "{split}-E{num_experts}", "labels.safetensors"),
        metrics=results("balance", "{penalty}", "{split}-E{num_experts}", "metrics.json"),
    log:
        logs("balance", "{penalty}/{split}-E{num_experts}"),
    conda:
        "../envs/moefy.yaml"
    threads: COMPUTE["threads"]["balance"]
    params:
        tags=wildcard_tags,
        task=config["task"],
        out=folder_of("labels", "output"),
        neighbors=config["split"]["coact_neighbors"],
        seed=config["seed"],
    shell:
        "{params.tags} OMP_NUM_THREADS={threads} python -m moefy.steps.balance --model {input.model} --task {params.task} --labels {input.labels} "
        "--coactivation {input.coactivation} --split {wildcards.split} --num-experts {wildcards.num_experts} "
        "--coact-neighbors {params.neighbors} --out {params.out} --seed {params.seed} > {log} 2>&1"
