"""The MoE training step on a tiny task: recovery lowers the distillation loss and wins back accuracy
at its budget (measured by the real evaluate step on the written-back model), upcycled models save
and reload to the same logits, a dense continuation trains every weight, and bad requests are
clear errors. Steps run in-process (the workflow tests launch them as Snakemake jobs)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from transformers import BertModel

from builders import DECODERS, build_tiny, build_tiny_bert, write_toy_sentiment
from moefy.adapters.attention import find_projections
from moefy.adapters.ffn import ProjectionMLP
from moefy.adapters.models import load_model, load_tokenizer, save_model
from moefy.adapters.tasks import get_task
from moefy.conversion.routers import LinearRouter, MLPRouter, router_tensors
from moefy.errors import MoefyError
from moefy.files import load_tensors, read_json, save_tensors
from moefy.moe.checkpoints import load_sparse_moe, save_sparse_moe
from moefy.moe.sparse import Routing, mask_padding
from moefy.steps import data as data_step
from moefy.steps import evaluate as evaluate_step
from moefy.steps import finetune as finetune_step
from moefy.steps import train_moe as train_moe_step
from moefy.steps import upcycle as upcycle_step
from moefy.training.lora import adapter_parameters, add_lora, attention_targets
from moefy.training.moe_training import LossWeights, distillation_loss, select_trainable
from moefy.training.upcycling import upcycle_model

E, BUDGET, FFN_SCALE = 8, 0.125, 10.0


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread for every in-process training here: the tiny task's numbers (which the recovery
    test's bounds were set on) then do not depend on how many cores the machine has."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def task(tmp_path_factory, one_thread):
    """A fine-tuned tiny ReLU BERT on the toy task, its data, and a random conversion (labels + MLP
    router). Its FFN weights start FFN_SCALE times larger than BERT's initialisation, so that its FFNs carry
    the model (in a tiny BERT initialised as usual they add little beside the residual stream, and
    no conversion could lose accuracy to recover), and it has no dropout: on 300 texts dropout's
    noise in the student's logits outweighs what distillation can win back. The fine-tune's learning
    rate is 1e-3: at 3e-3 these large FFNs made it chaotic, so that the float summation order of
    the CPU's kernels (AVX2 or AVX-512) decided between a model at 0.68 and one at 0.87 test
    accuracy. At 1e-3 every kernel choice tried (AVX-512, AVX2, unvectorised; MKL held to AVX2)
    gave 0.97-1.0, and the unrecovered MoE at BUDGET 0.77-0.83 of it."""
    root = tmp_path_factory.mktemp("train-moe")
    tiny_relu_bert = build_tiny_bert(root / "initial", hidden_act="relu")
    initial = BertModel.from_pretrained(tiny_relu_bert, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    with torch.no_grad():
        for layer in initial.encoder.layer:
            layer.intermediate.dense.weight.mul_(FFN_SCALE)
            layer.output.dense.weight.mul_(FFN_SCALE)
    initial.save_pretrained(tiny_relu_bert)
    csv = write_toy_sentiment(root / "reviews.csv", rows=800, mixed=True)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    data_step.main(
        [
            "--path",
            str(csv),
            "--text-column",
            "text",
            "--label-column",
            "category",
            "--labels",
            "rotten",
            "fresh",
            "--out",
            str(root / "data"),
        ]
    )
    finetune_step.main(
        ["--model", str(tiny_relu_bert), "--data", str(root / "data"), "--out", str(root / "finetune"), "--epochs", "10",
         "--batch-size", "16", "--max-length", "32", "--learning-rate", "1e-3", "--no-freeze-embeddings", "--precision", "fp32"]
    )  # fmt: skip
    model = load_model(str(root / "finetune" / "model"))
    generator = torch.Generator().manual_seed(0)
    labels, routers = {}, {}
    for index in range(2):
        labels[index] = torch.randperm(64, generator=generator) % E
        torch.manual_seed(index)
        routers[index] = MLPRouter(model.config.hidden_size, E)
    save_tensors(
        root / "labels.safetensors",
        {f"layer.{i}": t.to(torch.int32) for i, t in labels.items()},
        {"split": "random", "num_experts": str(E)},
    )
    save_tensors(root / "router.safetensors", router_tensors(routers), {"router": "mlp", "num_experts": str(E), "layers": "2"})
    return root


def conversion_flags(root):
    return ["--labels", str(root / "labels.safetensors"), "--router-file", str(root / "router.safetensors"),
            "--router", "mlp", "--num-experts", str(E), "--split", "random"]  # fmt: skip


def train(root, mode, out, *extra, model=None):
    train_moe_step.main(
        ["--mode", mode, "--model", str(model or root / "finetune" / "model"), "--data", str(root / "data"), "--out", str(out),
         "--batch-size", "16", "--learning-rate", "3e-3", "--seed", "0", *extra]
    )  # fmt: skip
    return read_json(out / "metrics.json")


def upcycle(root, out, *extra):
    upcycle_step.main(["--model", str(root / "finetune" / "model"), "--name", "test", "--out", str(out), *extra])
    return out / "model"


def evaluate(root, model, out, *extra):
    evaluate_step.main(
        ["--model", str(model), "--data", str(root / "data"), *conversion_flags(root), "--penalty", "none", "--seed", "0",
         "--budgets", str(BUDGET), "1.0", "--out", str(out), *extra]
    )  # fmt: skip
    return {r["budget"]: r for r in json.loads(out.read_text()) if r.get("rule") == "top_k"}


def test_evaluate_in_bf16_keeps_fp32_s_predictions_within_a_stated_share(task, tmp_path):
    """evaluate.precision bf16: the dense model and the MoE run in bfloat16 (same weights); the
    record keeps the fp32 dense model's accuracy, equal to an fp32 run's, and the share of the bf16
    dense model's predictions equal to its. Stated share: at least 95% of the test texts keep their
    fp32 prediction, and accuracy moves at most 3 points at every budget (bf16's 8-bit mantissa)."""
    fp32 = evaluate(task, task / "finetune" / "model", tmp_path / "fp32.json")
    bf16 = evaluate(task, task / "finetune" / "model", tmp_path / "bf16.json", "--precision", "bf16")
    for budget in (BUDGET, 1.0):
        assert (fp32[budget]["inference_precision"], bf16[budget]["inference_precision"]) == ("fp32", "bf16")
        assert bf16[budget]["fp32_dense_test_accuracy"] == fp32[1.0]["test_accuracy"]
        assert bf16[budget]["fp32_dense_agreement"] >= 0.95
        assert abs(bf16[budget]["test_accuracy"] - fp32[budget]["test_accuracy"]) <= 0.03
        assert "fp32_dense_agreement" not in fp32[budget]


def test_recovery_lowers_the_distillation_loss_and_wins_back_accuracy(task, tmp_path):
    out = tmp_path / "recover"
    metrics = train(task, "recover", out, *conversion_flags(task), "--recovery", "kd", "--budget", str(BUDGET),
                    "--epochs", "4", "--distill-alpha", "1.0", "--temperature", "2", "--learning-rate", "1e-3")  # fmt: skip
    history = metrics["history"]
    assert history[0]["epoch"] == 0 and history[-1]["validation_distill_loss"] < 0.8 * history[0]["validation_distill_loss"], (
        history
    )
    assert metrics["k"] == round(BUDGET * E) and metrics["train_steps"] > 0
    before = evaluate(task, task / "finetune" / "model", tmp_path / "before.json")
    after = evaluate(task, out / "model", tmp_path / "after.json")
    print(
        f"relative accuracy at budget {BUDGET}: {before[BUDGET]['relative_accuracy']:.4f} -> {after[BUDGET]['relative_accuracy']:.4f}"
    )
    assert before[BUDGET]["relative_accuracy"] < 0.97, (
        "the unrecovered MoE at this budget must lose accuracy for the test to mean anything"
    )
    assert after[BUDGET]["test_accuracy"] > before[BUDGET]["test_accuracy"] + 0.02
    assert after[BUDGET]["test_accuracy"] == pytest.approx(metrics["test_accuracy"], abs=1e-9), (
        "evaluate measures what training kept"
    )
    # only the experts trained: every other weight of the recovered checkpoint is the fine-tuned model's
    dense, recovered = load_model(str(task / "finetune" / "model")).state_dict(), load_model(str(out / "model")).state_dict()
    changed = {k for k in dense if not torch.equal(dense[k], recovered[k])}
    assert changed and all(".intermediate.dense." in k or ".output.dense." in k and "attention" not in k for k in changed), (
        changed
    )


def test_unweighted_recovery_routes_with_the_router_step_s_file(task, tmp_path):
    out = tmp_path / "recover"
    train(task, "recover", out, *conversion_flags(task), "--recovery", "task", "--budget", str(BUDGET), "--max-steps", "2")
    assert (out / "router.safetensors").read_bytes() == (task / "router.safetensors").read_bytes()


def test_softmax_gated_recovery_trains_the_router_and_evaluate_measures_what_it_kept(task, tmp_path):
    """kd-softmax on a linear router: the router and the gate scales train, its file holds both,
    and evaluate, weighing every pick by those gates with the inference kernels, measures at the
    trained budget the test accuracy the training step measured with its own layer."""
    model = load_model(str(task / "finetune" / "model"))
    torch.manual_seed(0)
    routers = {i: LinearRouter(model.config.hidden_size, E) for i in range(2)}
    meta = {"router": "linear", "num_experts": str(E), "layers": "2"}
    save_tensors(tmp_path / "linear.safetensors", router_tensors(routers), meta)
    flags = ["--labels", str(task / "labels.safetensors"), "--router-file", str(tmp_path / "linear.safetensors"),
             "--router", "linear", "--num-experts", str(E), "--split", "random"]  # fmt: skip
    out = tmp_path / "recover"
    metrics = train(task, "recover", out, *flags, "--recovery", "kd-softmax", "--budget", str(BUDGET), "--epochs", "1",
                    "--router-learning-rate", "1e-2")  # fmt: skip
    saved = load_tensors(out / "router.safetensors")
    scales = [float(saved[f"layer.{i}.gate.scale"]) for i in range(2)]
    assert all(scale != 0 for scale in scales), scales
    assert not torch.equal(saved["layer.0.proj.weight"], routers[0].proj.weight), "the router trained"
    evaluate_step.main(
        ["--model", str(out / "model"), "--reference", str(task / "finetune" / "model"), "--data", str(task / "data"),
         *flags[:2], "--router-file", str(out / "router.safetensors"), *flags[4:], "--penalty", "none", "--seed", "0",
         "--budgets", str(BUDGET), "1.0", "--out", str(tmp_path / "eval.json")]
    )  # fmt: skip
    records = {r["budget"]: r for r in json.loads((tmp_path / "eval.json").read_text()) if r.get("rule") == "top_k"}
    assert records[BUDGET]["test_accuracy"] == pytest.approx(metrics["test_accuracy"], abs=1e-9)
    assert records[1.0]["experts_per_token"] == E
    with pytest.raises(MoefyError, match="has softmax gates, which weigh every expert even at budget 1: give .* --reference"):
        evaluate_step.main(
            ["--model", str(out / "model"), "--data", str(task / "data"), *flags[:2], "--router-file",
             str(out / "router.safetensors"), *flags[4:], "--penalty", "none", "--seed", "0", "--out", str(tmp_path / "x.json")]
        )  # fmt: skip


def test_upcycled_training_saves_a_model_that_reloads_to_what_was_measured(task, tmp_path):
    out = tmp_path / "upcycle"
    initial = upcycle(task, tmp_path / "init", "--experts", "4", "--k", "2", "--layers", "all")
    metrics = train(
        task,
        "moe",
        out,
        "--max-steps",
        "12",
        "--load-loss-weight",
        "0.01",
        "--z-weight",
        "0.001",
        "--upcycled",
        "test",
        model=initial,
    )
    assert metrics["train_steps"] == 12 and metrics["upcycling"]["layers"] == [0, 1] and metrics["upcycled"] == "test"
    assert metrics["train_tokens"] == metrics["history"][-1]["train_tokens"] > 12 * 16
    assert metrics["total_parameters"] > metrics["active_parameters"]
    # 2 of 4 full copies: twice the dense FFN's FLOPs, plus the routers
    assert metrics["ffn_flops_fraction"] == pytest.approx(2.0 + 2 * 2 * 32 * 4 / metrics["dense_ffn_flops_per_token"], rel=1e-6)
    assert 1.0 <= metrics["test_load_max_over_mean"] <= 4.0 and metrics["test_dropped_share"] == 0.0
    model, moes, tokenizer = load_sparse_moe(out / "model")
    assert sorted(moes) == [0, 1] and moes[0].routing == Routing("top_k", k=2)
    again = evaluate_upcycled(model, tokenizer, task)
    assert again == pytest.approx(metrics["test_accuracy"], abs=1e-9)


def evaluate_upcycled(model, tokenizer, root):
    from moefy.data.subsets import read_subset

    texts, labels = read_subset(root / "data" / "test.jsonl")
    with torch.no_grad():
        predictions = []
        for start in range(0, len(texts), 128):
            inputs = tokenizer(texts[start : start + 128], padding=True, truncation=True, return_tensors="pt")
            predictions += model(**inputs).logits.argmax(-1).tolist()
    return sum(p == y for p, y in zip(predictions, labels)) / len(labels)


def test_dense_continuation_trains_every_weight_for_the_same_steps(task, tmp_path):
    metrics = train(task, "dense", tmp_path / "dense", "--max-steps", "12")
    assert metrics["train_steps"] == 12 and metrics["ffn_flops_fraction"] == 1.0
    assert metrics["total_parameters"] == metrics["active_parameters"]
    assert "upcycling" not in metrics


def test_bad_requests_are_clear_errors(task, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train(task, "recover", tmp_path / "x")
    assert (
        "--mode recover needs --labels, --router-file, --split, --router, --num-experts, --recovery task, kd, task-softmax or kd-softmax"
        in capsys.readouterr().err
    )
    with pytest.raises(SystemExit):
        train(task, "recover", tmp_path / "x", *conversion_flags(task), "--recovery", "kd", "--trainable", "routers")
    assert "invalid choice: 'routers'" in capsys.readouterr().err
    with pytest.raises(MoefyError, match="not an MoE model trained by moefy"):
        train(task, "moe", tmp_path / "x")
    with pytest.raises(MoefyError, match=r"recover.lora_rank must be at least 1.*got 0"):
        train(task, "recover", tmp_path / "x", *conversion_flags(task), "--recovery", "kd", "--trainable", "lora",
              "--lora-rank", "0")  # fmt: skip
    with pytest.raises(MoefyError, match="FFNs 0-1"):
        upcycle(task, tmp_path / "x", "--layers", "5")
    assert not (tmp_path / "x").exists(), "nothing half-written"


@pytest.mark.parametrize("family", ["bert", "t5-gated", "gpt2", "llama"])
def test_save_and_reload_give_identical_logits(family, tmp_path):
    folder = build_tiny(family, tmp_path / family)
    task = "causal_lm" if family in DECODERS else "classification"
    torch.manual_seed(0)
    model = load_model(str(folder), task, label_names=None if task == "causal_lm" else ["a", "b"])
    moes = upcycle_model(model, "every_other", 4, Routing("expert_choice", capacity_factor=2.0), drop_ratio=0.5, seed=3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # as if trained: nothing may come back from the dense file
    tokenizer = load_tokenizer(str(folder))
    save_sparse_moe(model, moes, tokenizer, tmp_path / "saved", task)
    reloaded, reloaded_moes, _ = load_sparse_moe(tmp_path / "saved")
    mask_padding(model, moes.values())  # as load_sparse_moe does: padding takes no expert-choice capacity
    inputs = tokenizer(["the movie was good", "bad plot"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, model.eval()(**inputs).logits)
    assert sorted(reloaded_moes) == sorted(moes) and reloaded_moes[1].routing.kind == "expert_choice"
    with pytest.raises(MoefyError, match="not an MoE model trained by moefy"):
        load_sparse_moe(folder)


def test_distillation_loss_is_zero_for_the_teacher_and_t2_kl_otherwise():
    teacher = torch.tensor([[2.0, 0.0, -1.0]])
    assert float(distillation_loss(teacher, teacher, 2.0)) == pytest.approx(0.0, abs=1e-7)
    student = torch.zeros(1, 3)
    p = (teacher / 2).softmax(-1)
    expected = 4 * float((p * (p.log() - math.log(1 / 3))).sum())
    assert float(distillation_loss(student, teacher, 2.0)) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(MoefyError, match="distill must be in"):
        LossWeights(distill=1.5)


def test_trainable_parameters(tiny_relu_bert):
    model = load_model(str(tiny_relu_bert), label_names=["a", "b"])
    moes = upcycle_model(model, "all", 4, Routing())
    routers = {id(p) for moe in moes.values() for p in moe.router.parameters()}
    experts = {id(p) for moe in moes.values() for n, p in moe.named_parameters() if not n.startswith("router.")}
    assert {id(p) for p in select_trainable(model, moes.values(), "experts")} == experts
    assert {id(p) for p in select_trainable(model, moes.values(), "routers")} == routers
    assert {id(p) for p in select_trainable(model, moes.values(), "experts_and_routers")} == experts | routers
    assert len(select_trainable(model, moes.values(), "all")) == len(list(model.parameters()))
    with pytest.raises(MoefyError, match="no MoE layer"):
        select_trainable(load_model(str(tiny_relu_bert), label_names=["a", "b"]), [], "experts")


def train_on_1_and_2_ranks(tmp_path, *flags: str) -> None:
    """train_moe with `flags` as a plain process and on 2 gloo CPU ranks (torch.distributed.run), as
    compute.nproc_per_node 1 and 2 run it, side by side with one thread each, into tmp_path/1 and
    tmp_path/2. They log to the task fixture's MLflow store: a fresh store costs each process
    seconds of table creation."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launchers = {1: [], 2: ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]}
    runs = {}
    for ranks, launcher in launchers.items():
        with (tmp_path / f"{ranks}.log").open("w") as log:
            runs[ranks] = subprocess.Popen(
                [sys.executable, *launcher, "-m", "moefy.steps.train_moe", *flags, "--device", "cpu", "--out", str(tmp_path / str(ranks))],
                env=env, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
    for ranks, run in runs.items():
        assert run.wait() == 0, (tmp_path / f"{ranks}.log").read_text()[-3000:]


@pytest.mark.e2e
def test_two_cpu_ranks_train_the_same_model_as_one(task, tmp_path):
    """Data parallel over 2 gloo ranks: each rank takes half of every global batch and DDP averages
    the gradients, so the weights match one rank's up to float summation order (1e-5 after 6 steps).
    Attention key biases are the exception: their exact gradient is 0 (a softmax does not change
    when one query's scores all shift together), so Adam turns rounding noise into steps of random
    sign; they are compared through the logits, which they cannot change. For the same reason the
    experts are drop-upcycled: identical copies give the router an exact gradient of 0 too.
    Adam does the same, more rarely, to any weight whose gradient is near 0 in a step (a few of
    2,048 in a tiny FFN, by 2.5e-5 on an AVX-512 CPU): so at most 0.5% of a tensor's elements may
    miss 1e-5, and none by a tenth of one step. Ranks that trained apart (no gradient averaging)
    miss in most elements, by whole steps."""
    initial = upcycle(task, tmp_path / "init", "--experts", "4", "--layers", "1", "--drop-ratio", "0.5")
    learning_rate = 3e-3
    train_on_1_and_2_ranks(
        tmp_path, "--mode", "moe", "--model", str(initial), "--data", str(task / "data"), "--batch-size", "16",
        "--learning-rate", str(learning_rate), "--max-steps", "6", "--load-loss-weight", "0",
    )  # fmt: skip
    one, _, _ = load_sparse_moe(tmp_path / "1" / "model")
    two, _, _ = load_sparse_moe(tmp_path / "2" / "model")
    for (name, a), b in zip(one.state_dict().items(), two.state_dict().values()):
        if name.endswith("attention.self.key.bias"):
            continue
        misses = ~torch.isclose(a, b, atol=1e-5, rtol=1e-4)
        assert misses.float().mean() <= 0.005, f"{name}: {int(misses.sum())} of {a.numel()} differ by more than 1e-5"
        assert (a - b).abs().max() < learning_rate / 10, f"{name}: differs by {float((a - b).abs().max()):.2e}"
    tokenizer = load_tokenizer(str(initial))
    inputs = tokenizer(["good funny smart", "a dull boring plot"], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(one(**inputs).logits, two(**inputs).logits, atol=1e-5, rtol=1e-4)


def test_merge_steps_chain_usage_merge_compress_distil_evaluate(task, tmp_path):
    """The MC-SMoE chain by its steps on a drop-upcycled model (experts that differ): merging
    lowers memory, distillation from the full SMoE brings the merged model closer to it."""
    from moefy.steps import compress as compress_step
    from moefy.steps import evaluate_smoe as evaluate_smoe_step
    from moefy.steps import merge as merge_step
    from moefy.steps import usage as usage_step

    full = upcycle(task, tmp_path / "up", "--layers", "all", "--experts", "4", "--drop-ratio", "0.5")
    data = ["--data", str(task / "data")]
    usage_step.main(["--model", str(full), *data, "--calibration-examples", "64", "--out", str(tmp_path / "usage")])
    usage = read_json(tmp_path / "usage" / "metrics.json")
    assert usage["calibration_examples"] == 64 and 0 < usage["mean_weight_cosine"] < 0.9  # drop-upcycled: apart
    assert all(len(scores) == 4 and max(scores) > 0 for scores in usage["reap"].values())
    for method, grouping in (("prune", "global"), ("msmoe", "global"), ("reap", "reap"), ("hcsmoe", "reap")):
        merge_step.main(["--model", str(full), "--usage", str(tmp_path / "usage" / "usage.safetensors"), "--method", method,
                         "--groups", "2", "--grouping", grouping, "--out", str(tmp_path / method)])  # fmt: skip
    for method in ("reap", "hcsmoe"):  # REAP's budgets: 4 experts over the 2 layers, at least 1 each
        experts = read_json(tmp_path / method / "metrics.json")["experts_per_layer"]
        assert sum(experts.values()) == 4 and min(experts.values()) >= 1, experts
    compress_step.main(["--model", str(tmp_path / "msmoe" / "model"), "--rank-fraction", "0.25", "--out", str(tmp_path / "svd")])
    distilled = train(task, "merged", tmp_path / "kd", "--teacher", str(full), "--recovery", "kd", "--max-steps", "20",
                      "--distill-alpha", "0.9", "--learning-rate", "3e-4", model=tmp_path / "svd" / "model")  # fmt: skip
    first, last = distilled["history"][0], distilled["history"][-1]
    assert last["validation_distill_loss"] < first["validation_distill_loss"], distilled["history"]
    records = {}
    for name, folder in (("full", full), ("prune-G2", tmp_path / "prune" / "model"), ("msmoe-G2", tmp_path / "msmoe" / "model"),
                         ("msmoe-G2-svd-kd", tmp_path / "kd" / "model")):  # fmt: skip
        out = tmp_path / "evaluate" / f"{name}.json"
        evaluate_smoe_step.main(["--model", str(folder), *data, "--name", name, "--out", str(out)])
        records[name] = read_json(out)
    assert records["full"]["experts_per_layer"] == {"0": 4, "1": 4}
    for name in ("prune-G2", "msmoe-G2", "msmoe-G2-svd-kd"):  # global grouping: 2 per layer on average
        experts = records[name]["experts_per_layer"]
        assert sum(experts.values()) == 4 and min(experts.values()) >= 1, experts
    assert records["msmoe-G2-svd-kd"]["recovery_steps"] == 20 and records["msmoe-G2-svd-kd"]["method"] == "mcsmoe"
    sizes = [records[n]["bytes_on_disk"] for n in ("full", "msmoe-G2", "msmoe-G2-svd-kd")]
    assert sizes == sorted(sizes, reverse=True), sizes
    # prune keeps k = 2 of 2 experts per token; merged layers compute a token's 2 picks once when they share a group
    assert records["msmoe-G2"]["computed_experts_per_token"] < 2 == records["full"]["computed_experts_per_token"]
    assert records["full"]["ffn_flops_fraction"] > records["msmoe-G2"]["ffn_flops_fraction"]
    # the upcycled FFNs cost more than dense ones; on the whole model the extra is diluted by attention
    assert 1 < records["full"]["model_flops_fraction"] < records["full"]["ffn_flops_fraction"]
    with pytest.raises(MoefyError, match="does not describe the MoE layers"):
        merge_step.main(["--model", str(tmp_path / "prune" / "model"), "--usage", str(tmp_path / "usage" / "usage.safetensors"),
                         "--method", "msmoe", "--groups", "1", "--out", str(tmp_path / "bad")])  # fmt: skip
    with pytest.raises(MoefyError, match="merge a full SMoE"):
        merge_step.main(["--model", str(tmp_path / "msmoe" / "model"), "--usage", str(tmp_path / "usage" / "usage.safetensors"),
                         "--method", "msmoe", "--groups", "1", "--out", str(tmp_path / "bad")])  # fmt: skip
    assert not (tmp_path / "bad").exists()


def test_distilled_attention_projections_keep_the_fine_tuned_accuracy(task, tmp_path):
    """D2DMoE's first stage on a model that learnt the task (0.97-1.0 test accuracy): every q, k, v
    and o replaced by an MLP distilled on 3,000 training tokens keeps test accuracy within 5 points
    (4 of 77 texts), and the MLPs reproduce their projections (held-out R^2 above 0.95; 0.99-1.0 measured)."""
    from moefy.steps import distill_attention as distill_step

    out = tmp_path / "distilled"
    distill_step.main(["--model", str(task / "finetune" / "model"), "--data", str(task / "data"), "--out", str(out),
                       "--max-tokens", "3000", "--max-epochs", "30", "--width-multiple", "8", "--device", "cpu"])  # fmt: skip
    report = read_json(out / "distillation.json")["projections"]
    assert len(report) == 8 and all(entry["width"] % 8 == 0 for entry in report.values())
    assert min(entry["r2"] for entry in report.values()) > 0.95, report
    tokenizer = load_tokenizer(str(out))
    dense = evaluate_upcycled(load_model(str(task / "finetune" / "model")).eval(), tokenizer, task)
    distilled = evaluate_upcycled(load_model(str(out)).eval(), tokenizer, task)
    print(f"test accuracy {dense:.4f} dense, {distilled:.4f} with distilled projections")
    assert dense > 0.9 and distilled >= dense - 0.05


LORA_FAMILIES = {"bert": "classification", "gpt2": "causal_lm", "llama": "causal_lm"}
ADAPTED = {"bert": 8, "gpt2": 4, "llama": 8}  # 2 layers of q, k, v, o (GPT-2: fused qkv, o)


def lora_recovery(task, family, tmp_path):
    """A tiny random model of `family` converted with the task fixture's labels and router (2 layers,
    d 32, d_ff 64, E experts) and given LoRA adapters, then trained 2 AdamW steps on the task loss
    without weight decay (so a weight that changed had a gradient); with its weights before them."""
    folder = build_tiny(family, tmp_path / family)
    kind = LORA_FAMILIES[family]
    label_names = ["rotten", "fresh"] if kind == "classification" else None
    torch.manual_seed(0)
    model = load_model(str(folder), kind, label_names=label_names)
    moes, built = train_moe_step.build(recover_args(task, folder), model)
    lora = add_lora(model, moes.values(), rank=4, alpha=8, dropout=0.0)
    trainable = select_trainable(model, moes.values(), "lora")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    tokenizer = load_tokenizer(str(folder))
    inputs = tokenizer(["the movie was good and funny", "a dull boring plot", "great cast"], padding=True, return_tensors="pt")
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.0)
    model.train()
    for _ in range(2):
        logits = model(**inputs).logits
        get_task(kind).loss_sum(logits, inputs, torch.tensor([1, 0, 1]) if label_names else None).backward()
        optimizer.step()
        optimizer.zero_grad()
    return SimpleNamespace(
        model=model.eval(), moes=moes, labels=built["labels"], lora=lora, trainable=trainable, before=before,
        inputs=inputs, folder=folder, kind=kind, label_names=label_names,
    )  # fmt: skip


def recover_args(task, folder):
    """train_moe's arguments for recovering `folder` with the task fixture's conversion at budget 0.25."""
    return train_moe_step.parse_args(
        ["--mode", "recover", "--model", str(folder), "--data", str(task / "data"), "--out", str(folder / "out"),
         *conversion_flags(task), "--recovery", "task", "--budget", "0.25"]
    )  # fmt: skip


@pytest.mark.parametrize("family", sorted(LORA_FAMILIES))
def test_lora_recovery_trains_only_the_adapters_and_the_experts(task, family, tmp_path):
    """Adapters on every attention projection and on nothing else (not the routers); the adapters
    and the experts train, and every other weight, the projections' own included, stays."""
    run = lora_recovery(task, family, tmp_path)
    adapted = [name for name, module in run.model.named_modules() if hasattr(module, "lora_A")]
    assert len(adapted) == ADAPTED[family] and not any("router" in name for name in adapted), adapted
    adapters = {id(p) for p in adapter_parameters(run.model)}
    experts = {id(p) for moe in run.moes.values() for name, p in moe.named_parameters() if not name.startswith("router.")}
    assert adapters and experts and {id(p) for p in run.trainable} == adapters | experts
    after = dict(run.model.named_parameters())
    changed = {name for name, p in after.items() if not torch.equal(p, run.before[name])}
    assert changed == {name for name, p in after.items() if id(p) in adapters | experts}, sorted(changed)


def test_lora_without_an_attention_projection_left_is_a_clear_error(tiny_relu_bert):
    model = load_model(str(tiny_relu_bert), label_names=["a", "b"])
    for projection in find_projections(model):  # as D2DMoE's attention variant leaves them
        projection.replace(ProjectionMLP(projection.linear.in_features, 8, projection.linear.out_features))
    with pytest.raises(MoefyError, match="recover.trainable lora .* none left .* use recover.trainable experts"):
        add_lora(model, [], rank=4, alpha=8, dropout=0.0)


@pytest.mark.parametrize("family", sorted(LORA_FAMILIES))
def test_a_lora_recovered_model_reloads_to_the_logits_it_trained_to(task, family, tmp_path):
    """The adapters merged into the projections and the experts written back into the FFNs, as the
    step saves them: the checkpoint, converted again as evaluate converts it, computes what the
    trained model computed, and its attention projections are no longer the original ones."""
    run = lora_recovery(task, family, tmp_path)
    with torch.no_grad():
        trained = run.model(**run.inputs).logits
        merged = run.lora.merge_and_unload()
        assert merged is run.model and not any(hasattr(module, "lora_A") for module in merged.modules())
        pristine = load_model(str(run.folder), run.kind, label_names=run.label_names)
        recovered = train_moe_step.recovered(pristine, merged, run.moes, run.labels)
        save_model(recovered, load_tokenizer(str(run.folder)), tmp_path / "saved")
        reloaded = load_model(str(tmp_path / "saved"), run.kind)
        train_moe_step.build(recover_args(task, tmp_path / "saved"), reloaded)
        again = reloaded.eval()(**run.inputs).logits
    torch.testing.assert_close(again, trained, atol=1e-5, rtol=0)
    original = load_model(str(run.folder), run.kind, label_names=run.label_names)
    projections = {f"{name}.weight" for name in attention_targets(original, [])}
    saved = load_model(str(tmp_path / "saved"), run.kind).state_dict()
    assert all(not torch.equal(saved[k], v) for k, v in original.state_dict().items() if k in projections)


def test_the_recover_step_merges_low_rank_updates_into_the_attention_projections(task, tmp_path):
    """The step as the workflow runs it (--trainable lora): in the saved checkpoint the experts and
    the attention projections' weights changed, each projection by a matrix of rank at most
    lora_rank, and every other weight (biases, norms, embeddings, head) is the fine-tuned model's."""
    metrics = train(task, "recover", tmp_path / "lora", *conversion_flags(task), "--recovery", "task", "--budget", str(BUDGET),
                    "--trainable", "lora", "--lora-rank", "2", "--max-steps", "3")  # fmt: skip
    assert metrics["train_steps"] == 3
    dense = load_model(str(task / "finetune" / "model"))
    projections = {f"{name}.weight" for name in attention_targets(dense, [])}
    before, after = dense.state_dict(), load_model(str(tmp_path / "lora" / "model")).state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    ffns = {k for k in before if (".intermediate.dense." in k or ".output.dense." in k) and "attention" not in k}
    assert projections <= changed <= projections | ffns and changed & ffns, sorted(changed)
    for key in projections:
        assert 0 < torch.linalg.matrix_rank(after[key].double() - before[key].double(), rtol=1e-3) <= 2, key


@pytest.mark.e2e
def test_two_cpu_ranks_recover_with_lora_as_one(task, tmp_path):
    """LoRA recovery of a tiny random LLaMA causal LM on 2 gloo ranks against 1 process, as the step
    saves it (adapters merged into the attention projections, experts written back into the FFNs):
    every weight within 1e-5 (measured: 8e-7 in the experts, 1e-8 in the merged projections), and
    so the logits (5e-8). Recovery task, not kd: this random model's logits are so close to its
    dense teacher's that many expert gradients of the distillation loss are near 0, and Adam turns
    their rounding noise into steps of either sign (0.5% of an expert tensor, by a tenth of a step)."""
    folder = build_tiny("llama", tmp_path / "llama")
    tokenizer = load_tokenizer(str(folder))
    tokenizer.model_max_length = 32  # as finetune saves it for every later step
    tokenizer.save_pretrained(folder)
    train_on_1_and_2_ranks(
        tmp_path, "--mode", "recover", "--model", str(folder), "--task", "causal_lm", "--data", str(task / "data"),
        *conversion_flags(task), "--recovery", "task", "--budget", "0.25", "--trainable", "lora", "--lora-rank", "4",
        "--batch-size", "16", "--learning-rate", "3e-3", "--max-steps", "6",
    )  # fmt: skip
    one = load_model(str(tmp_path / "1" / "model"), "causal_lm")
    two = load_model(str(tmp_path / "2" / "model"), "causal_lm")
    dense = load_model(str(folder), "causal_lm").state_dict()
    trained = {f"{name}.weight" for name in attention_targets(load_model(str(folder), "causal_lm"), [])}
    trained |= {k for k in dense if ".mlp." in k}
    for (name, a), b in zip(one.state_dict().items(), two.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=lambda m, name=name: f"{name}: {m}")
        assert torch.equal(a, dense[name]) is (name not in trained), name
    inputs = tokenizer(["good funny smart", "a dull boring plot"], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(one(**inputs).logits, two(**inputs).logits, atol=1e-5, rtol=0)
