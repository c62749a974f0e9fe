rule report:
    input:
        evaluations(),
    output:
        summary=results("report", "summary.csv"),
        by_method=results("report", "by_method.csv"),
        flops_at_99pct=results("report", "flops_at_99pct.csv"),
        plot=report(
            results("report", "accuracy_vs_flops.png"),
            caption="../report/accuracy_vs_flops.rst",
            category="Results",
        ),
    log:
        logs("report"),
    conda:
        CONDA_ENV
    resources:
        **cluster_resources("report"),
    params:
        launch=plain("report"),
        out=folder_of("summary", "output"),
        title=f"{STUDY}: accuracy against {'whole-model' if GRID.distilled else 'FFN'} compute",
    shell:
        "{params.launch} --evaluations {input} --out {params.out} --title {params.title:q} > {log} 2>&1"


rule report_serving:
    input:
        served=[results("serve", folder, "served.json") for folder in SERVED],
        gguf=served_measurements("gguf"),
        harness=served_measurements("harness"),
    output:
        results("report", "serving.csv"),
    log:
        logs("report_serving"),
    conda:
        CONDA_ENV
    resources:
        **cluster_resources("report_serving"),
    params:
        launch=plain("report_serving"),
        out=lambda wildcards, output: str(Path(output[0]).parent),
    shell:
        "{params.launch} --served {input.served} --gguf {input.gguf} --harness {input.harness} --out {params.out} > {log} 2>&1"
