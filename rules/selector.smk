rule selector:
    input:
        model=converted_model,
        labels=rules.balance.output.labels,
        hidden=rules.activations.output.hidden,
    output:
        router=results("selector", CONVERTED, f"{CONVERSION}-{{selector}}", "router.safetensors"),
        metrics=results("selector", CONVERTED, f"{CONVERSION}-{{selector}}", "metrics.json"),
    log:
        logs("selector", f"{CONVERTED}/{CONVERSION}-{{selector}}"),
    benchmark:
        results("benchmarks", "selector", CONVERTED, f"{CONVERSION}-{{selector}}.tsv")
    conda:
        CONDA_ENV
    threads: COMPUTE["threads"]["selector"]
    resources:
        **cluster_resources("selector", ranked=True),
    params:
        launch=launch("selector"),
        omp=omp_threads,
        ablation=ablation_flags,
        task=config["task"],
        budgets=settings_flags({"budgets": config["evaluate"]["budgets"]}),
        out=folder_of("router", "output"),
        device=COMPUTE["device"],
        settings=step_settings("selector"),
    shell:
        "OMP_NUM_THREADS={params.omp} {params.launch} --model {input.model} --task {params.task} {params.ablation} "
        "--labels {input.labels} --hidden {input.hidden} {params.budgets} --out {params.out} --device {params.device} "
        "{params.settings} > {log} 2>&1"
