"""lm-eval-harness on the study's models (moefy.measure.harness, step harness): its offline task
gives the log-likelihood step evaluate computes, and inputs it cannot run say why in one line."""

import json
import math

import datasets.config
import huggingface_hub.constants
import pytest
import torch
from mlflow.tracking import MlflowClient

from builders import FILLER, NEGATIVE, POSITIVE, build_tiny
from moefy import dist
from moefy.adapters.models import load_model
from moefy.adapters.tasks import get_task
from moefy.data.batches import Encoded, eval_batches, iterate, measure
from moefy.errors import MoefyError
from moefy.measure import harness
from moefy.steps import harness as harness_step

TEXTS = [
    "the movie was good",
    "a dull boring plot with its cast and the story was weak",
    "this film is great",
    "it was bad",
    "the cast was fun and the plot was brilliant but the film was long and a bit messy",
]
TOLERANCE = 1e-6  # relative, float32 (3e-8 seen): lm-eval's batches are padded differently from evaluate's


def bos_tokenizer(max_length: int = 64):
    """A LLaMA-like word-level tokenizer (prepends <s>, appends nothing), saved with the data
    step's max_length as model_max_length."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>", *sorted(set(POSITIVE + NEGATIVE + FILLER))]
    tok = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>", model_max_length=max_length
    )


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    folder = build_tiny("llama", tmp_path_factory.mktemp("harness-llama"), tokenizer=False)
    bos_tokenizer().save_pretrained(folder)
    return folder


def evaluates_loglikelihood(model, tokenizer) -> tuple[float, int]:
    """(summed negative log-likelihood, predicted tokens) of TEXTS as step evaluate computes them
    (task causal_lm), in other batches than lm-eval's."""
    ctx, task, encoded = dist.setup("cpu"), get_task("causal_lm"), Encoded(tokenizer, TEXTS)
    nll = count = 0
    for _, inputs, logits in iterate(model, encoded, eval_batches(encoded, 3, ctx), ctx):
        score, n, _ = task.batch_stats(logits, inputs, None)
        nll, count = nll + score, count + n
    return nll, count


def test_offline_task_gives_evaluates_loglikelihood(tiny_llama):
    model, tokenizer, kind = harness.load_causal_lm(str(tiny_llama))
    result = harness.evaluate(model, tokenizer, TEXTS, batch_size=2)
    offline = result["offline"]
    nll, count = evaluates_loglikelihood(model, tokenizer)
    ctx, task, encoded = dist.setup("cpu"), get_task("causal_lm"), Encoded(tokenizer, TEXTS)
    assert kind == "transformers" and offline["same_as_evaluate"] and offline["differences_from_evaluate"] == []
    assert offline["documents"] == len(TEXTS) and offline["tokens"] == count == sum(len(t.split()) for t in TEXTS)
    assert offline["loglikelihood"] == pytest.approx(-nll, rel=TOLERANCE)
    assert offline["perplexity"] == pytest.approx(measure(model, task, encoded, None, 4, ctx), rel=TOLERANCE)
    # a word per token here, so lm-eval's own word perplexity is the same number
    assert offline["word_perplexity"] == pytest.approx(offline["perplexity"], rel=1e-9)
    assert offline["bits_per_byte"] == pytest.approx(nll / sum(len(t) for t in TEXTS) / math.log(2), rel=TOLERANCE)
    assert result["tasks"] == {} and offline["max_length"] == 64


def exported_moe(dense, folder):
    """The tiny LLaMA converted by moefy (random expert split, MLP routers) and exported at budget 0.5."""
    from moefy.adapters.ffn import find_ffns
    from moefy.conversion.routers import MLPRouter
    from moefy.moe.checkpoints import save_moe

    model, labels, routers = load_model(str(dense), "causal_lm"), {}, {}
    torch.manual_seed(0)
    for ffn in find_ffns(model):
        labels[ffn.index] = torch.randperm(ffn.d_ff) % 4
        routers[ffn.index] = MLPRouter(ffn.d_model, 4)
    return save_moe(dense, labels, routers, "mlp", 4, 0.5, folder, task="causal_lm")


def upcycled(dense, folder, routing="top_k"):
    """The tiny LLaMA upcycled by moefy (every other FFN into 4 experts), saved as train_moe saves it."""
    from moefy.adapters.models import load_tokenizer
    from moefy.moe.checkpoints import save_sparse_moe
    from moefy.moe.sparse import Routing
    from moefy.training.upcycling import upcycle_model

    torch.manual_seed(0)
    model = load_model(str(dense), "causal_lm")
    moes = upcycle_model(model, "every_other", 4, Routing(routing, k=2), drop_ratio=0.5, seed=3)
    return save_sparse_moe(model, moes, load_tokenizer(str(dense)), folder, "causal_lm")


def hf_moe(dense, folder):
    """A Hugging Face MoE class (Qwen2-MoE: top-2 of 4 experts and a shared expert), random weights."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.Qwen2MoeConfig(
        vocab_size=39, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        intermediate_size=64, moe_intermediate_size=16, shared_expert_intermediate_size=24, num_experts=4,
        num_experts_per_tok=2, max_position_embeddings=64, pad_token_id=0,
    )  # fmt: skip
    tf.Qwen2MoeForCausalLM(config).save_pretrained(folder)
    bos_tokenizer().save_pretrained(folder)
    return folder


MOES = [(exported_moe, "moefy MoE"), (upcycled, "moefy sparse MoE"), (hf_moe, "transformers")]


@pytest.mark.parametrize(("make", "kind"), MOES, ids=["exported", "upcycled", "qwen2_moe"])
def test_moe_models_give_evaluates_loglikelihood_too(tiny_llama, tmp_path, make, kind):
    model, tokenizer, loaded_as = harness.load_causal_lm(str(make(tiny_llama, tmp_path / "moe")))
    offline = harness.evaluate(model, tokenizer, TEXTS, batch_size=2)["offline"]
    nll, count = evaluates_loglikelihood(model, tokenizer)
    assert loaded_as == kind and offline["same_as_evaluate"] and offline["tokens"] == count
    assert offline["loglikelihood"] == pytest.approx(-nll, rel=TOLERANCE)


def test_expert_choice_runs_one_text_at_a_time_and_says_it_differs(tiny_llama, tmp_path):
    model, tokenizer, _ = harness.load_causal_lm(str(upcycled(tiny_llama, tmp_path / "moe", "expert_choice")))
    offline = harness.offline(model, tokenizer, TEXTS, None, 4)
    assert offline["batch_size"] == 1 and offline["differences_from_evaluate"] == [
        "5 texts: expert choice routes each batch as a whole, and evaluate's batches are others"
    ]


def test_says_where_evaluate_predicts_other_tokens(tiny_llama):
    tokenizer = bos_tokenizer(max_length=5)  # evaluate truncates the longer texts to 5 tokens
    assert harness.differences_from_evaluate(tokenizer, TEXTS, 1, 64) == [
        "2 texts: longer than the tokenizer's model_max_length 5, where evaluate truncates them"
    ]
    assert harness.differences_from_evaluate(tokenizer, TEXTS[2:4], 1, 2) == [
        "2 texts: longer than lm-eval's max_length 2: it predicts them in windows"
    ]
    from transformers import AutoTokenizer

    bert_like = AutoTokenizer.from_pretrained(build_tiny("bert", tiny_llama.parent / "bert"))  # [CLS] text [SEP]
    assert harness.differences_from_evaluate(bert_like, TEXTS[:1], bert_like.cls_token_id, 64) == [
        "1 texts: the tokenizer adds special tokens besides one leading BOS (evaluate predicts those after the first)"
    ]


def test_unloadable_tasks_and_inputs_are_one_clear_error(tiny_llama, tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    needs_hub = {"task": "needs_hub", "dataset_path": "moefy-tests/absent", "output_type": "loglikelihood_rolling"}
    (tmp_path / "needs_hub.yaml").write_text(json.dumps(needs_hub | {"test_split": "test", "doc_to_target": "{{text}}"}))
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)  # the built-in index takes 15 s to build
    with pytest.raises(
        MoefyError, match=r"needs_hub needs its dataset from the Hugging Face hub.*; no_such_task is not an lm-eval task"
    ):
        harness.load_tasks(manager, ["needs_hub", "no_such_task"])

    model, tokenizer, _ = harness.load_causal_lm(str(tiny_llama))
    with pytest.raises(MoefyError, match="no held-out texts to evaluate on"):
        harness.evaluate(model, tokenizer, ["", "  "])
    with pytest.raises(MoefyError, match="holds a BertModel model, not a causal LM with a next-token head"):
        harness.load_causal_lm(str(build_tiny("bert", tmp_path / "bert")))


def test_named_tasks_give_lm_evals_metrics(tiny_llama, tmp_path):
    """A task of lm-eval's own kinds (multiple choice) from a local file, as a hub task runs once loaded."""
    from lm_eval.tasks import TaskManager

    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t, "label": i % 2}) + "\n" for i, t in enumerate(TEXTS)))
    choice = {
        "task": "toy_choice",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(tmp_path / "docs.jsonl")}},
    }
    choice |= {"output_type": "multiple_choice", "test_split": "test", "doc_to_text": "{{text}} it was"}
    choice |= {"doc_to_choice": ["good", "bad"], "doc_to_target": "{{label}}", "metric_list": [{"metric": "acc"}]}
    (tmp_path / "toy_choice.yaml").write_text(json.dumps(choice))
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    model, tokenizer, _ = harness.load_causal_lm(str(tiny_llama))
    metrics = harness.named_tasks(manager, harness.load_tasks(manager, ["toy_choice"]), model, tokenizer, None, 4)
    assert set(metrics) == {"toy_choice"} and {"acc", "acc_stderr"} <= set(metrics["toy_choice"])
    assert metrics["toy_choice"]["acc"] in {i / len(TEXTS) for i in range(len(TEXTS) + 1)}


def test_step_writes_its_json_and_mlflow_run(tiny_llama, tmp_path, mlflow_store):
    texts = tmp_path / "test.jsonl"
    texts.write_text("".join(json.dumps({"text": text}) + "\n" for text in TEXTS))
    out = tmp_path / "harness.json"
    harness_step.main(["--model", str(tiny_llama), "--texts", str(texts), "--out", str(out), "--max-length", "8"])
    result = json.loads(out.read_text())
    assert result["model_kind"] == "transformers" and result["offline"]["max_length"] == 8
    assert result["offline"]["differences_from_evaluate"] == [
        "2 texts: longer than lm-eval's max_length 8: it predicts them in windows"
    ]
    client = MlflowClient(mlflow_store)
    (run,) = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    assert run.data.metrics["offline.perplexity"] == pytest.approx(result["offline"]["perplexity"])
