# Sparse Upcycling: each model of upcycling.models built from a fine-tuned variant and trained on,
# beside the same variant trained on densely for the same steps (upcycle/<variant>/dense).
UPCYCLED = f"{VARIANT}/{{upcycled}}"


rule upcycle:
    input:
        model=rules.finetune.output.model,
    output:
        model=directory(results("upcycle", VARIANT, "{upcycled}", "initial", "model")),
        metrics=results("upcycle", VARIANT, "{upcycled}", "initial", "metrics.json"),
    log:
        logs("upcycle", UPCYCLED),
    benchmark:
        results("benchmarks", "upcycle", VARIANT, "{upcycled}.tsv")
    conda:
        CONDA_ENV
    threads: COMPUTE["threads"]["upcycle"]
    resources:
        **cluster_resources("upcycle"),
    params:
        launch=plain("upcycle"),
        ablation=ablation_flags,
        task=config["task"],
        out=folder_of("metrics", "output"),
        settings=upcycle_flags,
    shell:
        "OMP_NUM_THREADS={threads} {params.launch} --model {input.model} --task {params.task} --penalty {wildcards.penalty} "
        "--seed {wildcards.seed} --name {wildcards.upcycled} --out {params.out} {params.settings} > {log} 2>&1"


rule train_upcycled:
    input:
        model=rules.upcycle.output.model,
        data=rules.data.output.labels,
    output:
        model=directory(results("upcycle", VARIANT, "{upcycled}", "model")),
        metrics=results("upcycle", VARIANT, "{upcycled}", "metrics.json"),
    log:
        logs("train_moe", UPCYCLED),
    benchmark:
        results("benchmarks", "train_moe", VARIANT, "{upcycled}.tsv")
    conda:
        CONDA_ENV
    threads: COMPUTE["threads"]["train_moe"]
    resources:
        **cluster_resources("train_upcycled", ranked=True),
    params:
        launch=launch("train_moe"),
        omp=omp_threads,
        task=config["task"],
        data=folder_of("data"),
        out=folder_of("metrics", "output"),
        device=COMPUTE["device"],
        settings=step_settings("train_moe"),
    shell:
        "OMP_NUM_THREADS={params.omp} {params.launch} --mode moe --model {input.model} --task {params.task} "
        "--penalty {wildcards.penalty} --seed {wildcards.seed} --upcycled {wildcards.upcycled} --data {params.data} "
        "--out {params.out} --device {params.device} {params.settings} > {log} 2>&1"


rule continue_dense:
    input:
        model=rules.finetune.output.model,
        data=rules.data.output.labels,
    output:
        model=directory(results("upcycle", VARIANT, "dense", "model")),
        metrics=results("upcycle", VARIANT, "dense", "metrics.json"),
    log:
        logs("train_moe", f"{VARIANT}/dense"),
    benchmark:
        results("benchmarks", "train_moe", VARIANT, "dense.tsv")
    conda:
        CONDA_ENV
    threads: COMPUTE["threads"]["train_moe"]
    resources:
        **cluster_resources("continue_dense", ranked=True),
    params:
        launch=launch("train_moe"),
        omp=omp_threads,
        task=config["task"],
        data=folder_of("data"),
        out=folder_of("metrics", "output"),
        device=COMPUTE["device"],
        settings=step_settings("train_moe"),
    shell:
        "OMP_NUM_THREADS={params.omp} {params.launch} --mode dense --model {input.model} --task {params.task} "
        "--penalty {wildcards.penalty} --seed {wildcards.seed} --upcycled dense --data {params.data} "
        "--out {params.out} --device {params.device} {params.settings} > {log} 2>&1"


rule report_upcycling:
    input:
        trained=upcycled_metrics(),
    output:
        table=results("report", "upcycling.csv"),
        plot=report(
            results("report", "upcycling.png"),
            caption="../report/upcycling.rst",
            category="Results",
        ),
    log:
        logs("report_upcycling"),
    conda:
        CONDA_ENV
    resources:
        **cluster_resources("report_upcycling"),
    params:
        launch=plain("report_upcycling"),
        out=folder_of("table", "output"),
        title=f"{STUDY}: Sparse Upcycling against dense continuation",
    shell:
        "{params.launch} --trained {input.trained} --out {params.out} --title {params.title:q} > {log} 2>&1"
