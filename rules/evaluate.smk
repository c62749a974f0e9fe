rule evaluate:
    input:
        model=rules.finetune.output.model,
        test=rules.data.output.test,
        labels=rules.balance.output.labels,
        router=rules.selector.output.router,
    output:
        results("evaluate", "{penalty}", "{split}-E{num_experts}-{selector}.json"),
    log:
        logs("evaluate", "{penalty}/{split}-E{num_experts}-{selector}"),
    benchmark:
        results("benchmarks", "evaluate", "{penalty}", "{split}-E{num_experts}-{selector}.tsv")
    conda:
        "../envs/moefy.yaml"
    threads: COMPUTE["threads"]["evaluate"]
    params:
        tags=wildcard_tags,
        task=config["task"],
        launch=torchrun("evaluate"),
        omp=omp_threads,
        data=folder_of("test"),
        settings=step_settings("evaluate"),
    shell:
        "{params.tags} OMP_NUM_THREADS={params.omp} {params.launch} --model {input.model} --task {params.task} "
        "--data {params.data} --labels {input.labels} --router {input.router} --split {wildcards.split} "
        "--num-experts {wildcards.num_experts} --selector {wildcards.selector} --out {output} "
        "{params.settings} > {log} 2>&1"
