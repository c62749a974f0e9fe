# Which MoE kernel is fastest here, measured once for the study's FFN shape (and distilled attention
# projections' shapes, when the grid converts them) and every expert count (with shared experts, of
# the routed part), in the precision evaluate runs in.
# It takes every core so that nothing else runs while it times; the kernels inside use the
# threads an evaluate job gets.


rule calibrate:
    input:
        model=model_input(),
    output:
        results("calibrate", "moe_kernels.json"),
    log:
        logs("calibrate"),
    benchmark:
        results("benchmarks", "calibrate.tsv")
    conda:
        CONDA_ENV
    threads: calibrate_threads()
    resources:
        **cluster_resources("calibrate"),
    params:
        launch=plain("calibrate"),
        omp=threads_per_rank(COMPUTE["threads"]["evaluate"], COMPUTE["nproc_per_node"]),
        task=config["task"],
        model=model_source,
        remote_code="--trust-remote-code" if config["model"]["trust_remote_code"] else "",
        experts=settings_flags(
            {
                "num_experts": [e for e, _ in GRID.expert_shapes],
                "shared_experts": [s for _, s in GRID.expert_shapes],
            }
        ),
        activation=config["finetune"]["activation"],
        precision=config["evaluate"]["precision"],
        projections=(
            f"--projection-flops-factor {config['distill_attention']['flops_factor']} --width-multiple {GRID.width_multiple}"
            if GRID.distilled
            else ""
        ),
        out=folder_of(0, "output"),
        device=COMPUTE["device"],
    shell:
        "OMP_NUM_THREADS={params.omp} {params.launch} --model {params.model} --task {params.task} {params.experts} "
        "--activation {params.activation} --precision {params.precision} {params.projections} {params.remote_code} --out {params.out} --device {params.device} > {log} 2>&1"
