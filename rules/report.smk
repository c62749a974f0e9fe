rule report:
    input:
        evaluations(),
    output:
        summary=results("report", "summary.csv"),
        plot=report(
            results("report", "accuracy_vs_flops.png"),
            caption="../report/accuracy_vs_flops.rst",
            category="Results",
        ),
    log:
        logs("report"),
    conda:
        "../envs/moefy.yaml"
    params:
        out=folder_of("summary", "output"),
        title=f"{STUDY}: accuracy against FFN compute",
    shell:
        "python -m moefy.steps.report --evaluations {input} --out {params.out} --title {params.title:q} > {log} 2>&1"
