rule activations:
    input:
        model=rules.finetune.output.model,
        train=rules.data.output.train,
    output:
        hidden=results("activations", "hidden.safetensors"),
        coactivation=results("activations", "coactivation.safetensors"),
        metrics=results("activations", "metrics.json"),
    log:
        logs("activations"),
    benchmark:
        results("benchmarks", "activations.tsv")
    conda:
        "../envs/moefy.yaml"
    threads: COMPUTE["threads"]["activations"]
    params:
        task=config["task"],
        launch=torchrun("activations"),
        omp=omp_threads,
        data=folder_of("train"),
        out=folder_of("metrics", "output"),
        seed=config["seed"],
        settings=step_settings("activations"),
    shell:
        "OMP_NUM_THREADS={params.omp} {params.launch} --model {input.model} --task {params.task} --data {params.data} "
        "--out {params.out} --seed {params.seed} {params.settings} > {log} 2>&1"
