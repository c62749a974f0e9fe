# MC-SMoE: each upcycled model of merging.models calibrated once (usage), merged by every method
# to every group count, distilled from the full SMoE (-kd) and compressed (-svd) as its name says,
# then evaluated beside the full SMoE: merge/<variant>/<upcycled>/evaluate/<name>.json (a causal LM's
# against the full SMoE's greedy tokens, in its evaluate/full.json).
MERGED = f"{VARIANT}/{{upcycled}}"


rule usage:
    input:
        model=rules.train_upcycled.output.model,
        data=rules.data.output.labels,
    output:
        usage=merge_folder("usage", "usage.safetensors"),
        metrics=merge_folder("usage", "metrics.json"),
    log:
        logs("usage", MERGED),
    benchmark:
        results("benchmarks", "usage", VARIANT, "{upcycled}.tsv")
    conda:
        CONDA_ENV
    threads: COMPUTE["threads"]["merge"]
    resources:
        **cluster_resources("usage", ranked=True),
    params:
        launch=launch("usage"),
        task=config["task"],
        data=folder_of("data"),
        out=folder_of("usage", "output"),
        device=COMPUTE["device"],
        settings=step_settings("usage"),
    shell:
        "OMP_NUM_THREADS={threads} {params.launch} --model {input.model} --task {params.task} --penalty {wildcards.penalty} "
        "--seed {wildcards.seed} --upcycled {wildcards.upcycled} --data {params.data} --out {params.out} "
        "--device {params.device} {params.settings} > {log} 2>&1"


rule merge:
    input:
        model=rules.train_upcycled.output.model,
        usage=rules.usage.output.usage,
    output:
        model=directory(merge_folder("{method}-G{groups}", "model")),
        metrics=merge_folder("{method}-G{groups}", "metrics.json"),
    log:
        logs("merge", f"{MERGED}/{{method}}-G{{groups}}"),
    benchmark:
        results("benchmarks", "merge", VARIANT, "{upcycled}", "{method}-G{groups}.tsv")
    conda:
        CONDA_ENV
    threads: COMPUTE["threads"]["merge"]
    resources:
        **cluster_resources("merge"),
    params:
        launch=plain("merge"),
        task=config["task"],
        out=folder_of("metrics", "output"),
        settings=step_settings("merge"),
    shell:
        "OMP_NUM_THREADS={threads} {params.launch} --model {input.model} --usage {input.usage} --method {wildcards.method} "
        "--groups {wildcards.groups} --task {params.task} --penalty {wildcards.penalty} --seed {wildcards.seed} "
        "--upcycled {wildcards.upcycled} --name {wildcards.method}-G{wildcards.groups} --out {params.out} "
        "{params.settings} > {log} 2>&1"


rule distill_merged:
    input:
        model=merge_folder("{chain}", "model"),
        teacher=rules.train_upcycled.output.model,
        data=rules.data.output.labels,
    output:
        model=directory(merge_folder("{chain}-kd", "model")),
        metrics=merge_folder("{chain}-kd", "metrics.json"),
    log:
        logs("distill_merged", f"{MERGED}/{{chain}}-kd"),
    benchmark:
        results("benchmarks", "distill_merged", VARIANT, "{upcycled}", "{chain}-kd.tsv")
    conda:
        CONDA_ENV
    threads: COMPUTE["threads"]["train_moe"]
    resources:
        **cluster_resources("distill_merged", ranked=True),
    params:
        launch=launch("train_moe"),
        omp=omp_threads,
        task=config["task"],
        data=folder_of("data"),
        out=folder_of("metrics", "output"),
        device=COMPUTE["device"],
        settings=" ".join([step_settings("train_moe"), merged_distillation_flags()]),
    shell:
        "OMP_NUM_THREADS={params.omp} {params.launch} --mode merged --model {input.model} --teacher {input.teacher} "
        "--task {params.task} --penalty {wildcards.penalty} --seed {wildcards.seed} --recovery kd "
        "--upcycled {wildcards.upcycled} --name {wildcards.chain}-kd --data {params.data} --out {params.out} "
        "--device {params.device} {params.settings} > {log} 2>&1"


rule compress:
    input:
        model=merge_folder("{chain}", "model"),
    output:
        model=directory(merge_folder("{chain}-svd", "model")),
        metrics=merge_folder("{chain}-svd", "metrics.json"),
    log:
        logs("compress", f"{MERGED}/{{chain}}-svd"),
    benchmark:
        results("benchmarks", "compress", VARIANT, "{upcycled}", "{chain}-svd.tsv")
    conda:
        CONDA_ENV
    threads: COMPUTE["threads"]["merge"]
    resources:
        **cluster_resources("compress"),
    params:
        launch=plain("compress"),
        task=config["task"],
        out=folder_of("metrics", "output"),
        settings=step_settings("compress"),
    shell:
        "OMP_NUM_THREADS={threads} {params.launch} --model {input.model} --task {params.task} "
        "--penalty {wildcards.penalty} --seed {wildcards.seed} --upcycled {wildcards.upcycled} "
        "--name {wildcards.chain}-svd --out {params.out} {params.settings} > {log} 2>&1"


rule evaluate_smoe:
    input:
        model=merged_model,
        data=rules.data.output.labels,
        full=full_smoe_record,
    output:
        merge_folder("evaluate", "{merged}.json"),
    log:
        logs("evaluate_smoe", f"{MERGED}/{{merged}}"),
    benchmark:
        results("benchmarks", "evaluate_smoe", VARIANT, "{upcycled}", "{merged}.tsv")
    conda:
        CONDA_ENV
    threads: COMPUTE["threads"]["evaluate"]
    resources:
        **cluster_resources("evaluate_smoe", ranked=True),
    params:
        launch=launch("evaluate_smoe"),
        task=config["task"],
        data=folder_of("data"),
        device=COMPUTE["device"],
        full=full_record_flag,
    shell:
        "OMP_NUM_THREADS={threads} {params.launch} --model {input.model} --task {params.task} "
        "--penalty {wildcards.penalty} --seed {wildcards.seed} --upcycled {wildcards.upcycled} --name {wildcards.merged} "
        "--data {params.data} {params.full} --out {output} --device {params.device} > {log} 2>&1"


rule report_merging:
    input:
        evaluations=merged_evaluations(),
        dense=merging_dense_references(),
    output:
        table=results("report", "merging.csv"),
        ranks=results("report", "merging_ranks.csv"),
        flips=results("report", "merging_flips.txt"),
        plot=report(
            results("report", "merging.png"),
            caption="../report/merging.rst",
            category="Results",
        ),
    log:
        logs("report_merging"),
    conda:
        CONDA_ENV
    resources:
        **cluster_resources("report_merging"),
    params:
        launch=plain("report_merging"),
        out=folder_of("table", "output"),
        title=f"{STUDY}: merged and compressed SMoEs (MC-SMoE) against the full SMoE",
    shell:
        "{params.launch} --evaluations {input.evaluations} --dense {input.dense} --out {params.out} "
        "--title {params.title:q} > {log} 2>&1"
