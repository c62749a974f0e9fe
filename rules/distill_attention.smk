# D2DMoE for attention: the fine-tuned model with each attention projection distilled into a ReLU
# MLP (distill_attention/<variant>/model, with distillation.json), which the conversion chain of
# `<variant>-attention` splits into experts beside the FFNs.


rule distill_attention:
    input:
        model=rules.finetune.output.model,
        train=rules.data.output.train,
    output:
        model=directory(results("distill_attention", VARIANT, "model")),
    log:
        logs("distill_attention", VARIANT),
    benchmark:
        results("benchmarks", "distill_attention", f"{VARIANT}.tsv")
    conda:
        CONDA_ENV
    threads: variant_threads("distill_attention")
    resources:
        **cluster_resources("distill_attention", ranked=True),
    params:
        launch=launch("distill_attention"),
        omp=omp_threads,
        ablation=ablation_flags,
        task=config["task"],
        data=folder_of("train"),
        width_multiple=GRID.width_multiple,
        device=COMPUTE["device"],
        settings=step_settings("distill_attention"),
    shell:
        "OMP_NUM_THREADS={params.omp} {params.launch} --model {input.model} --task {params.task} {params.ablation} "
        "--data {params.data} --width-multiple {params.width_multiple} --out {output.model} --device {params.device} "
        "{params.settings} > {log} 2>&1"
