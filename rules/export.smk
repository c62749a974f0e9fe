# On demand: ask for results/<study>/export/<penalty>-seed<seed>/<split>-E<E>-<router>-b<budget> to get a
# folder that moefy.export.load_moe restores for inference outside the workflow, and for the same path
# with -remote-code (a classifier) to get one that transformers loads with trust_remote_code=True and
# no moefy installed.


rule export:
    input:
        model=rules.finetune.output.model,
        labels=ffn_only(rules.balance.output.labels),
        router_file=ffn_only(rules.router.output.router_file),
    output:
        directory(results("export", VARIANT, f"{CONVERSION}-{{router}}-b{{budget}}")),
    log:
        logs("export", f"{VARIANT}/{CONVERSION}-{{router}}-b{{budget}}"),
    wildcard_constraints:
        budget=r"[0-9.]+",
    conda:
        CONDA_ENV
    resources:
        **cluster_resources("export"),
    params:
        launch=plain("export"),
        ablation=lambda wildcards: ablation_flags({k: v for k, v in wildcards.items() if k != "budget"}),
        task=config["task"],
    shell:
        "{params.launch} --model {input.model} --task {params.task} {params.ablation} --labels {input.labels} "
        "--router-file {input.router_file} --budget {wildcards.budget} --out {output} > {log} 2>&1"


rule export_remote_code:
    input:
        rules.export.output,
    output:
        directory(results("export", VARIANT, f"{CONVERSION}-{{router}}-b{{budget}}-remote-code")),
    log:
        logs("remote_code", f"{VARIANT}/{CONVERSION}-{{router}}-b{{budget}}"),
    wildcard_constraints:
        budget=r"[0-9.]+",
    conda:
        CONDA_ENV
    resources:
        **cluster_resources("export_remote_code"),
    params:
        launch=plain("remote_code"),
    shell:
        "{params.launch} --export {input} --out {output} > {log} 2>&1"
