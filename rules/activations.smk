rule activations:
    input:
        model=rules.finetune.output.model,
        train=rules.data.output.train,
    output:
        hidden=results("activations", VARIANT, "hidden.safetensors"),
        coactivation=results("activations", VARIANT, "coactivation.safetensors"),
        metrics=results("activations", VARIANT, "metrics.json"),
    log:
        logs("activations", VARIANT),
    benchmark:
        results("benchmarks", "activations", f"{VARIANT}.tsv")
    conda:
        CONDA_ENV
    threads: variant_threads("activations")
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
