# Served copies of a causal_lm study's decoders (config serve): each a transformers MoE class's folder
# that AutoModelForCausalLM loads with remote code off, beside served.json (the class, experts, k,
# the logits' difference from moefy's model). Ask for serve/<variant>/<recovered>-b<budget>/served.json
# (a softmax-gated recovery at one budget) or serve/<variant>/<upcycled>/served.json.
SERVED_RECOVERY = f"{CONVERSION}-linear-{{recovery}}"


rule serve:
    input:
        model=results("recover", VARIANT, SERVED_RECOVERY, "model"),
        labels=ffn_only(rules.balance.output.labels),
        router_file=results("recover", VARIANT, SERVED_RECOVERY, "router.safetensors"),
    output:
        model=directory(results("serve", VARIANT, f"{SERVED_RECOVERY}-b{{budget}}", "model")),
        record=results("serve", VARIANT, f"{SERVED_RECOVERY}-b{{budget}}", "served.json"),
    log:
        logs("serve", f"{VARIANT}/{SERVED_RECOVERY}-b{{budget}}"),
    wildcard_constraints:
        budget=r"[0-9.]+",
        recovery=r"[a-z]+-softmax",
    conda:
        CONDA_ENV
    resources:
        **cluster_resources("serve"),
    params:
        launch=plain("serve"),
        ablation=ablation_flags,  # --budget among them
        out=folder_of("record", "output"),
    shell:
        "{params.launch} --model {input.model} --task causal_lm {params.ablation} --router linear --labels {input.labels} "
        "--router-file {input.router_file} --out {params.out} > {log} 2>&1"


rule serve_upcycled:
    input:
        model=rules.train_upcycled.output.model,
    output:
        model=directory(results("serve", VARIANT, "{upcycled}", "model")),
        record=results("serve", VARIANT, "{upcycled}", "served.json"),
    log:
        logs("serve", UPCYCLED),
    conda:
        CONDA_ENV
    resources:
        **cluster_resources("serve"),
    params:
        launch=plain("serve"),
        out=folder_of("record", "output"),
    shell:
        "{params.launch} --sparse-model {input.model} --task causal_lm --penalty {wildcards.penalty} "
        "--seed {wildcards.seed} --out {params.out} > {log} 2>&1"
