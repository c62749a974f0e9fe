rule split:
    input:
        model=converted_model,
        coactivation=coactivation_for_split,
        hidden=hidden_for_split,
    output:
        labels=results("split", CONVERTED, CONVERSION, "labels.safetensors"),
        metrics=results("split", CONVERTED, CONVERSION, "metrics.json"),
    log:
        logs("split", f"{CONVERTED}/{CONVERSION}"),
    benchmark:
        results("benchmarks", "split", CONVERTED, f"{CONVERSION}.tsv")
    conda:
        CONDA_ENV
    threads: COMPUTE["threads"]["split"]
    resources:
        **cluster_resources("split", ranked=True),
    params:
        launch=launch("split"),
        omp=omp_threads,
        ablation=ablation_flags,
        task=config["task"],
        coactivation=coactivation_flag,
        hidden=hidden_flag,
        out=folder_of("labels", "output"),
        device=COMPUTE["device"],
        settings=step_settings("split"),
    shell:
        "OMP_NUM_THREADS={params.omp} {params.launch} --model {input.model} --task {params.task} {params.ablation} "
        "{params.coactivation} {params.hidden} --out {params.out} --device {params.device} {params.settings} > {log} 2>&1"
