rule evaluate:
    input:
        model=converted_model,
        reference=reference_model,
        test=rules.data.output.test,
        labels=rules.balance.output.labels,
        router=rules.selector.output.router,
        kernels=rules.calibrate.output[0],
    output:
        results("evaluate", CONVERTED, f"{CONVERSION}-{{selector}}.json"),
    log:
        logs("evaluate", f"{CONVERTED}/{CONVERSION}-{{selector}}"),
    benchmark:
        results("benchmarks", "evaluate", CONVERTED, f"{CONVERSION}-{{selector}}.tsv")
    conda:
        CONDA_ENV
    threads: COMPUTE["threads"]["evaluate"]
    resources:
        **cluster_resources("evaluate", ranked=True),
    params:
        launch=launch("evaluate"),
        omp=omp_threads,
        ablation=ablation_flags,
        task=config["task"],
        data=folder_of("test"),
        rules=rules_flags,
        device=COMPUTE["device"],
        settings=settings_flags({"batch_size": config["evaluate"]["batch_size"]}),
        reference=reference_flag,
    shell:
        "OMP_NUM_THREADS={params.omp} {params.launch} --model {input.model} {params.reference} --task {params.task} {params.ablation} "
        "--data {params.data} --labels {input.labels} --router {input.router} --kernels {input.kernels} {params.rules} --out {output} "
        "--device {params.device} {params.settings} > {log} 2>&1"
