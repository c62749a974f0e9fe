rule activations:
    input:
        model=converted_model,
        train=rules.data.output.train,
    output:
        hidden=results("activations", CONVERTED, "hidden.safetensors"),
        coactivation=results("activations", CONVERTED, "coactivation.safetensors"),
        metrics=results("activations", CONVERTED, "metrics.json"),
    log:
        logs("activations", CONVERTED),
    benchmark:
        results("benchmarks", "activations", f"{CONVERTED}.tsv")
    conda:
        CONDA_ENV
    threads: variant_threads("activations")
    resources:
        **cluster_resources("activations", ranked=True),
    params:
        launch=launch("activations"),
        omp=omp_threads,
        ablation=ablation_flags,
        task=config["task"],
        data=folder_of("train"),
        out=folder_of("metrics", "output"),
        device=COMPUTE["device"],
        settings=step_settings("activations"),
    shell:
        "OMP_NUM_THREADS={params.omp} {params.launch} --model {input.model} --task {params.task} {params.ablation} "
        "--data {params.data} --out {params.out} --device {params.device} {params.settings} > {log} 2>&1"
