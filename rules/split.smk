rule split:
    input:
        model=rules.finetune.output.model,
        coactivation=coactivation_for_split,
    output:
        labels=results("split", "{penalty}", "{split}-E{num_experts}", "labels.safetensors"),
        metrics=results("split", "{penalty}", "{split}-E{num_experts}", "metrics.json"),
    log:
        logs("split", "{penalty}/{split}-E{num_experts}"),
    conda:
        "../envs/moefy.yaml"
    threads: COMPUTE["threads"]["split"]
    params:
        tags=wildcard_tags,
        task=config["task"],
        launch=torchrun("split"),
        omp=omp_threads,
        out=folder_of("labels", "output"),
        coactivation=coactivation_flag,
        seed=config["seed"],
        settings=step_settings("split"),
    shell:
        "{params.tags} OMP_NUM_THREADS={params.omp} {params.launch} --model {input.model} --task {params.task} --method {wildcards.split} "
        "--num-experts {wildcards.num_experts} {params.coactivation} "
        "--out {params.out} --seed {params.seed} {params.settings} > {log} 2>&1"
