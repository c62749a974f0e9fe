rule balance:
    input:
        model=converted_model,
        labels=rules.split.output.labels,
        coactivation=rules.activations.output.coactivation,
    output:
        labels=results("balance", CONVERTED, CONVERSION, "labels.safetensors"),
        metrics=results("balance", CONVERTED, CONVERSION, "metrics.json"),
    log:
        logs("balance", f"{CONVERTED}/{CONVERSION}"),
    benchmark:
        results("benchmarks", "balance", CONVERTED, f"{CONVERSION}.tsv")
    conda:
        CONDA_ENV
    threads: COMPUTE["threads"]["balance"]
    resources:
        **cluster_resources("balance"),
    params:
        launch=plain("balance"),
        ablation=ablation_flags,
        task=config["task"],
        out=folder_of("labels", "output"),
        neighbors=config["split"]["coact_neighbors"],
    shell:
        "OMP_NUM_THREADS={threads} {params.launch} --model {input.model} --task {params.task} {params.ablation} "
        "--labels {input.labels} --coactivation {input.coactivation} --coact-neighbors {params.neighbors} "
        "--out {params.out} > {log} 2>&1"
