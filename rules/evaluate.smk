rule evaluate:
    input:
        model=converted_model,
        reference=reference_model,
        test=rules.data.output.test,
        second_test=second_test(),
        labels=rules.balance.output.labels,
        router_file=rules.router.output.router_file,
        kernels=rules.calibrate.output[0],
    output:
        results("evaluate", CONVERTED, f"{CONVERSION}-{{router}}.json"),
    log:
        logs("evaluate", f"{CONVERTED}/{CONVERSION}-{{router}}"),
    benchmark:
        results("benchmarks", "evaluate", CONVERTED, f"{CONVERSION}-{{router}}.tsv")
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
        settings=settings_flags({key: config["evaluate"][key] for key in ("batch_size", "precision")}),
        reference=reference_flag,
        second_test=second_test_flag,
    shell:
        "OMP_NUM_THREADS={params.omp} {params.launch} --model {input.model} {params.reference} --task {params.task} {params.ablation} "
        "--data {params.data} --labels {input.labels} --router-file {input.router_file} --kernels {input.kernels} {params.rules} --out {output} "
        "--device {params.device} {params.settings} {params.second_test} > {log} 2>&1"
