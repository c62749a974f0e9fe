# Recovery after conversion: the converted model trained at recover.budget, then evaluated at every
# budget and threshold like the unrecovered one (evaluate/<variant>/<conversion>-<recovery>.json),
# with the router it was recovered with (router.safetensors: the router step's, or after a
# softmax-gated recovery the trained router and its gates).
RECOVERED = f"{CONVERSION}-{{router}}-{{recovery}}"


rule recover:
    input:
        model=rules.finetune.output.model,
        data=rules.data.output.labels,
        labels=ffn_only(rules.balance.output.labels),
        router_file=ffn_only(rules.router.output.router_file),
    output:
        model=directory(results("recover", VARIANT, RECOVERED, "model")),
        metrics=results("recover", VARIANT, RECOVERED, "metrics.json"),
        router=results("recover", VARIANT, RECOVERED, "router.safetensors"),
    log:
        logs("recover", f"{VARIANT}/{RECOVERED}"),
    benchmark:
        results("benchmarks", "recover", VARIANT, f"{RECOVERED}.tsv")
    conda:
        CONDA_ENV
    threads: COMPUTE["threads"]["train_moe"]
    resources:
        **cluster_resources("recover", ranked=True),
    params:
        launch=launch("train_moe"),
        omp=omp_threads,
        ablation=ablation_flags,
        task=config["task"],
        data=folder_of("data"),
        out=folder_of("metrics", "output"),
        device=COMPUTE["device"],
        settings=" ".join([step_settings("train_moe"), step_settings("recover")]),
    shell:
        "OMP_NUM_THREADS={params.omp} {params.launch} --mode recover --model {input.model} --task {params.task} "
        "{params.ablation} --data {params.data} --labels {input.labels} --router-file {input.router_file} --out {params.out} "
        "--device {params.device} {params.settings} > {log} 2>&1"


use rule evaluate as evaluate_recovered with:
    input:
        model=rules.recover.output.model,
        reference=rules.finetune.output.model,
        test=rules.data.output.test,
        second_test=second_test(),
        labels=ffn_only(rules.balance.output.labels),
        router_file=rules.recover.output.router,
        kernels=rules.calibrate.output[0],
    output:
        results("evaluate", VARIANT, f"{RECOVERED}.json"),
    log:
        logs("evaluate", f"{VARIANT}/{RECOVERED}"),
    benchmark:
        results("benchmarks", "evaluate", VARIANT, f"{RECOVERED}.tsv")
