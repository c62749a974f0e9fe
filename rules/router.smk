rule router:
    input:
        model=converted_model,
        labels=rules.balance.output.labels,
        hidden=rules.activations.output.hidden,
    output:
        router_file=results("router", CONVERTED, f"{CONVERSION}-{{router}}", "router.safetensors"),
        metrics=results("router", CONVERTED, f"{CONVERSION}-{{router}}", "metrics.json"),
    log:
        logs("router", f"{CONVERTED}/{CONVERSION}-{{router}}"),
    benchmark:
        results("benchmarks", "router", CONVERTED, f"{CONVERSION}-{{router}}.tsv")
    conda:
        CONDA_ENV
    threads: COMPUTE["threads"]["router"]
    resources:
        **cluster_resources("router", ranked=True),
    params:
        launch=launch("router"),
        omp=omp_threads,
        ablation=ablation_flags,
        task=config["task"],
        budgets=settings_flags({"budgets": config["evaluate"]["budgets"]}),
        out=folder_of("router_file", "output"),
        device=COMPUTE["device"],
        settings=step_settings("router"),
    shell:
        "OMP_NUM_THREADS={params.omp} {params.launch} --model {input.model} --task {params.task} {params.ablation} "
        "--labels {input.labels} --hidden {input.hidden} {params.budgets} --out {params.out} --device {params.device} "
        "{params.settings} > {log} 2>&1"
