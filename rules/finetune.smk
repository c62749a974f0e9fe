rule finetune:
    input:
        model=model_input(),
        data=rules.data.output.labels,
    output:
        model=directory(results("finetune", "{penalty}", "model")),
        metrics=results("finetune", "{penalty}", "metrics.json"),
    log:
        logs("finetune", "{penalty}"),
    benchmark:
        results("benchmarks", "finetune", "{penalty}.tsv")
    conda:
        "../envs/moefy.yaml"
    threads: COMPUTE["threads"]["finetune"]
    params:
        task=config["task"],
        launch=torchrun("finetune"),
        omp=omp_threads,
        model=model_source,
        remote_code="--trust-remote-code" if config["model"]["trust_remote_code"] else "",
        data=folder_of("data"),
        out=folder_of("metrics", "output"),
        seed=config["seed"],
        settings=step_settings("finetune"),
        tags=wildcard_tags,
    shell:
        "{params.tags} OMP_NUM_THREADS={params.omp} {params.launch} --model {params.model} --task {params.task} {params.remote_code} "
        "--data {params.data} --out {params.out} --seed {params.seed} --sparsity-penalty {wildcards.penalty} "
        "{params.settings} > {log} 2>&1"
