# Served copies of a causal_lm study's decoders (config serve): each a transformers MoE class's folder
# that AutoModelForCausalLM loads with remote code off, beside served.json (the class, experts, k,
# the logits' difference from moefy's model). Ask for serve/<variant>/<recovered>-b<budget>/served.json
# (a softmax-gated recovery at one budget), serve/<variant>/<upcycled>/served.json or
# serve/<variant>/<upcycled>-<merged>/served.json (a merged, pruned or compressed one of merging).
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
        **cluster_resources("serve_upcycled"),
    params:
        launch=plain("serve"),
        out=folder_of("record", "output"),
    shell:
        "{params.launch} --sparse-model {input.model} --task causal_lm --penalty {wildcards.penalty} "
        "--seed {wildcards.seed} --out {params.out} > {log} 2>&1"


rule serve_merged:
    input:
        model=merge_folder("{merged}", "model"),
    output:
        model=directory(results("serve", VARIANT, "{upcycled}-{merged}", "model")),
        record=results("serve", VARIANT, "{upcycled}-{merged}", "served.json"),
    log:
        logs("serve", f"{VARIANT}/{{upcycled}}-{{merged}}"),
    conda:
        CONDA_ENV
    resources:
        **cluster_resources("serve_merged"),
    params:
        launch=plain("serve"),
        out=folder_of("record", "output"),
    shell:
        "{params.launch} --sparse-model {input.model} --task causal_lm --penalty {wildcards.penalty} "
        "--seed {wildcards.seed} --out {params.out} > {log} 2>&1"


# Every served folder, and the dense model it came from (serve/<variant>/dense), in llama.cpp (GGUF
# of each serve.gguf type: perplexity of the test texts, tokens/s) and in lm-eval (serve.harness).
rule gguf:
    input:
        model=served_model,
        texts=rules.data.output.test,
    output:
        results("serve", VARIANT, "{served}", "gguf", "gguf.json"),
    log:
        logs("gguf", f"{VARIANT}/{{served}}"),
    wildcard_constraints:
        served=r"[^/]+",
    conda:
        CONDA_ENV
    threads: COMPUTE["threads"]["evaluate"]
    resources:
        **cluster_resources("gguf"),
    params:
        launch=plain("gguf"),
        types=" ".join(config["serve"]["gguf"]),
        out=lambda wildcards, output: str(Path(output[0]).parent),
    shell:
        "{params.launch} --model {input.model} --texts {input.texts} --types {params.types} --threads {threads} "
        "--out {params.out} > {log} 2>&1"


rule harness:
    input:
        model=served_model,
        texts=rules.data.output.test,
    output:
        results("serve", VARIANT, "{served}", "harness.json"),
    log:
        logs("harness", f"{VARIANT}/{{served}}"),
    wildcard_constraints:
        served=r"[^/]+",
    conda:
        CONDA_ENV
    threads: COMPUTE["threads"]["evaluate"]
    resources:
        **cluster_resources("harness"),
    params:
        launch=plain("harness"),
        tasks=settings_flags({"tasks": config["serve"]["lm_eval_tasks"]}),
        device=COMPUTE["device"],
    shell:
        "OMP_NUM_THREADS={threads} {params.launch} --model {input.model} --texts {input.texts} --device {params.device} {params.tasks} "
        "--out {output} > {log} 2>&1"
