rule finetune:
    input:
        model=model_input(),
        data=rules.data.output.labels,
    output:
        model=directory(results("finetune", VARIANT, "model")),
        metrics=results("finetune", VARIANT, "metrics.json"),
    log:
        logs("finetune", VARIANT),
    benchmark:
        results("benchmarks", "finetune", f"{VARIANT}.tsv")
    conda:
        CONDA_ENV
    threads: variant_threads("finetune")
    resources:
        **cluster_resources("finetune", ranked=True),
    params:
        launch=launch("finetune"),
        omp=omp_threads,
        ablation=ablation_flags,
        task=config["task"],
        model=model_source,
        remote_code="--trust-remote-code" if config["model"]["trust_remote_code"] else "",
        data=folder_of("data"),
        out=folder_of("metrics", "output"),
        device=COMPUTE["device"],
        settings=step_settings("finetune"),
    shell:
        "OMP_NUM_THREADS={params.omp} {params.launch} --model {params.model} --task {params.task} {params.ablation} "
        "{params.remote_code} --data {params.data} --out {params.out} --device {params.device} {params.settings} > {log} 2>&1"
