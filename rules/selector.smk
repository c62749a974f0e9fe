rule selector:
    input:
        model=rules.finetune.output.model,
        labels=rules.balance.output.labels,
        hidden=rules.activations.output.hidden,
    output:
        router=results("selector", "{penalty}", "{split}-E{num_experts}-{selector}", "router.safetensors"),
        metrics=results("selector", "{penalty}", "{split}-E{num_experts}-{selector}", "metrics.json"),
    log:
        logs("selector", "{penalty}/{split}-E{num_experts}-{selector}"),
    conda:
        "../envs/moefy.yaml"
    threads: COMPUTE["threads"]["selector"]
    params:
        tags=wildcard_tags,
        task=config["task"],
        launch=torchrun("selector"),
        omp=omp_threads,
        out=folder_of("router", "output"),
        budgets=settings_flags({"budgets": config["evaluate"]["budgets"]}),
        seed=config["seed"],
        settings=step_settings("selector"),
    shell:
        "{params.tags} OMP_NUM_THREADS={params.omp} {params.launch} --model {input.model} --task {params.task} --labels {input.labels} "
        "--hidden {input.hidden} --split {wildcards.split} --num-experts {wildcards.num_experts} "
        "--selector {wildcards.selector} {params.budgets} --out {params.out} --seed {params.seed} "
        "{params.settings} > {log} 2>&1"
