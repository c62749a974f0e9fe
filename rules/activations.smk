rule activations:
    input:
        model=rules.finetune.output.model,
        train=rules.data.output.train,
    output:
        hidden=results("activations", "{penalty}", "hidden.safetensors"),
        coactivation=results("activations", "{penalty}", "coactivation.safetensors"),
        metrics=results("activations", "{penalty}", "metrics.json"),
    log:
        logs("activations", "{penalty}"),
    benchmark:
        results("benchmarks", "activations", "{penalty}.tsv")
    conda:
        "../envs/moefy.yaml"
    threads: COMPUTE["threads"]["activations"]
    params:
        tags=wildcard_tags,
        task=config["task"],
        launch=torchrun("activations"),
        omp=omp_threads,
        data=folder_of("train"),
        out=folder_of("metrics", "output"),
        seed=config["seed"],
        settings=step_settings("activations"),
    shell:
        "{params.tags} OMP_NUM_THREADS={params.omp} {params.launch} --model {input.model} --task {params.task} --data {params.data} "
        "--out {params.out} --seed {params.seed} {params.settings} > {log} 2>&1"
