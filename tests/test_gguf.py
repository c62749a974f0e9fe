"""GGUF export and llama.cpp measurement: tiny random Qwen2-MoE (shared expert, gates not
renormalised), LLaMA and Mixtral folders, converted by llama.cpp's own converter and run in
llama.cpp, against transformers on the same token ids.

Tolerances (what F32 achieves here, with logits of magnitude about 8): with llama.cpp's KV cache in
F32 the logits match to 1e-4 (measured: under 2e-5), perplexity to 1e-5 relative (measured: 5e-7),
and greedy decoding picks the same 16 tokens. With llama.cpp's default F16 KV cache the logits of
the test texts match to 5e-2 (measured: under 2e-2) and perplexity to 1e-3 (measured: 1.4e-5), but
a generated continuation's logits drifted by up to 0.4, enough to flip a greedy pick with a 0.1
margin: exact comparisons use the F32 cache. Q8_0 weights: perplexity within 5% of F32's.

Every test here needs llama-cpp-python (a dependency) and llama.cpp's converter, fetched once from
the installed llama-cpp-python's source archive on PyPI into ~/.cache/moefy/llama.cpp: they run in
CI, never skip. The tokenizer is llama.cpp's own copy of GPT-2's (the converter accepts only
tokenizers it recognises), so the tiny models have a 50,257-token vocabulary.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from builders import gguf_decoder_config, gpt2_tokenizer
from moefy.adapters.tasks import get_task
from moefy.errors import MoefyError
from moefy.serving import llama_cpp_measure as measure
from moefy.serving.converter import llama_cpp_source
from moefy.serving.gguf import to_gguf

pytestmark = pytest.mark.gguf

MAX_LENGTH = 64
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "It was a sunny day in the park, and the children played until the evening came.",
    "Mixture-of-Experts layers compute only the experts a router picks for each token.",
    "Hello",
]
PROMPT = "Once upon a time, in a small village by the sea,"
FAMILIES = ("qwen2moe", "llama", "mixtral")


def build(family: str, folder: Path, tokenizer, zero_shared_gate: bool = False, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(gguf_decoder_config(family, len(tokenizer), **overrides)).eval()
    for layer in model.model.layers if zero_shared_gate else ():
        layer.mlp.shared_expert_gate.weight.data.zero_()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def tokenizer():
    return gpt2_tokenizer(llama_cpp_source(), MAX_LENGTH)


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tokenizer):
    """{name: (transformers model, folder, F32 GGUF file)}: the three families, and a Qwen2-MoE with
    renormalised gates (norm_topk_prob true), one with all-zero shared-expert gates; two conversions at a time."""
    root = tmp_path_factory.mktemp("gguf")
    builds = {family: (family, {}) for family in FAMILIES} | {"qwen2moe-norm": ("qwen2moe", {"norm_topk_prob": True})}
    models = {name: build(family, root / name, tokenizer, **kw) for name, (family, kw) in builds.items()}
    models["qwen2moe-zero-gate"] = build("qwen2moe", root / "qwen2moe-zero-gate", tokenizer, zero_shared_gate=True)
    with ThreadPoolExecutor(2) as pool:
        files = pool.map(lambda name: to_gguf(root / name, root / f"{name}-F32.gguf", "F32"), models)
    return {name: (models[name], root / name, path) for name, path in zip(models, files)}


def hf_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def hf_perplexity(model, tokenizer) -> tuple[float, int]:
    """moefy's own causal_lm metric on the transformers model (the number llama.cpp's must match)."""
    task, nll, count = get_task("causal_lm"), 0.0, 0
    for text in TEXTS:
        inputs = tokenizer([text], return_tensors="pt", truncation=True)
        with torch.no_grad():
            score, n, _ = task.batch_stats(model(**inputs).logits, inputs, None)
        nll, count = nll + score, count + n
    return task.metric_of(nll, count), count


@pytest.mark.parametrize("family", FAMILIES)
def test_f32_logits_and_perplexity_match_transformers(converted, tokenizer, family):
    model, _, path = converted[family]
    with measure.open_gguf(path, threads=2, context=MAX_LENGTH, logits=True, kv_cache="F32") as llm:
        for text in TEXTS:
            ids = measure.tokenize(llm, text, MAX_LENGTH)
            assert ids == tokenizer(text).input_ids  # the GGUF's tokenizer is the folder's
            expected = hf_logits(model, ids)
            assert np.abs(measure.logits_of(llm, ids) - expected).max() < 1e-4
        exact = measure.perplexity(llm, TEXTS, MAX_LENGTH)
    with measure.open_gguf(path, threads=2, context=MAX_LENGTH, logits=True) as llm:  # llama.cpp's default F16 KV cache
        ids = measure.tokenize(llm, TEXTS[1], MAX_LENGTH)
        assert np.abs(measure.logits_of(llm, ids) - hf_logits(model, ids)).max() < 5e-2
        served = measure.perplexity(llm, TEXTS, MAX_LENGTH)
    expected_ppl, count = hf_perplexity(model, tokenizer)
    assert exact["predicted_tokens"] == count and exact["skipped_texts"] == 1  # "Hello" is one token: nothing to predict
    assert exact["perplexity"] == pytest.approx(expected_ppl, rel=1e-5)
    assert served["perplexity"] == pytest.approx(expected_ppl, rel=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_are_the_same_as_transformers(converted, tokenizer, family):
    model, _, path = converted[family]
    with measure.open_gguf(path, threads=2, context=MAX_LENGTH, logits=True, kv_cache="F32") as llm:
        got = measure.greedy(llm, PROMPT, 16)
    prompt = torch.tensor([got["prompt_ids"]])
    with torch.no_grad():
        expected = model.generate(
            prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=16, min_new_tokens=16
        )
    assert got["tokens"] == expected[0, prompt.shape[1] :].tolist()
    assert got["text"] == tokenizer.decode(got["tokens"])


def test_llama_cpp_does_not_renormalise_qwen2moe_gates(converted, tokenizer):
    """norm_topk_prob true converts without a word, but llama.cpp computes Qwen2-MoE's top-k gates
    unrenormalised: such a model must be served as a class llama.cpp renormalises (Mixtral)."""
    model, _, path = converted["qwen2moe-norm"]
    ids = tokenizer(TEXTS[1]).input_ids
    with measure.open_gguf(path, threads=2, context=MAX_LENGTH, logits=True, kv_cache="F32") as llm:
        assert np.abs(measure.logits_of(llm, ids) - hf_logits(model, ids)).max() > 0.1
        model.config.norm_topk_prob = False
        for layer in model.model.layers:
            layer.mlp.gate.norm_topk_prob = False
        assert np.abs(measure.logits_of(llm, ids) - hf_logits(model, ids)).max() < 1e-4


def test_an_all_zero_shared_expert_gate_is_a_clear_error_not_nan(converted, tokenizer):
    """transformers computes sigmoid(0) = 0.5; llama.cpp computes it as silu(0) / 0 = NaN."""
    model, _, path = converted["qwen2moe-zero-gate"]
    with measure.open_gguf(path, threads=2, context=MAX_LENGTH, logits=True) as llm:
        with pytest.raises(MoefyError, match=r"non-finite logits(.|\n)*all-zero weights(.|\n)*tiny non-zero weights"):
            measure.perplexity(llm, TEXTS, MAX_LENGTH)
    assert np.isfinite(hf_logits(model, tokenizer(TEXTS[0]).input_ids)).all()


def test_the_step_writes_q8_0_close_to_f32_and_measures_it(converted, tmp_path, mlflow_store):
    from moefy.steps import gguf as step

    _, folder, f32 = converted["qwen2moe"]
    texts = tmp_path / "test.jsonl"
    texts.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    out = tmp_path / "out"
    flags = ["--types", "Q8_0", "--texts", str(texts), "--threads", "2", "--prompt-tokens", "8", "--decode-tokens", "4"]
    step.main(["--model", str(folder), "--out", str(out), *flags, "--repeats", "2"])
    result = json.loads((out / step.RESULT).read_text())
    assert sorted(p.name for p in out.iterdir()) == ["gguf.json", "model-Q8_0.gguf"]  # no temporary file left
    (q8,) = result["records"]
    assert q8["type"] == "Q8_0" and q8["bytes"] == (out / "model-Q8_0.gguf").stat().st_size
    assert q8["bytes"] < 0.35 * f32.stat().st_size  # 8.5 bits a weight against 32; vectors stay F32
    assert result["max_length"] == MAX_LENGTH and q8["predicted_tokens"] > 0 and len(q8["decode_seconds"]) == 2
    assert q8["prompt_tokens_per_s"] > 0 and q8["decode_tokens_per_s"] > 0
    with measure.open_gguf(f32, threads=2, context=MAX_LENGTH, logits=True) as llm:  # the step's F16 KV cache
        assert q8["perplexity"] == pytest.approx(measure.perplexity(llm, TEXTS, MAX_LENGTH)["perplexity"], rel=0.05)


def test_an_architecture_llama_cpp_does_not_know_is_a_clear_error(converted, tmp_path):
    _, folder, _ = converted["llama"]
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    for item in folder.iterdir():
        (unknown / item.name).write_bytes(item.read_bytes())
    config = json.loads((unknown / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps(config | {"architectures": ["NoSuchModelForCausalLM"]}))
    with pytest.raises(
        MoefyError, match=r"could not write .* as GGUF F32 .*: llama.cpp has no such architecture; export (.|\n)*NoSuch"
    ):
        to_gguf(unknown, tmp_path / "unknown.gguf", "F32")
    assert not any(tmp_path.glob("*.gguf*")) and not any(tmp_path.glob(".unknown.gguf*"))


def test_bad_inputs_are_clear_errors(converted, tmp_path):
    _, folder, _ = converted["llama"]
    with pytest.raises(MoefyError, match=r"GGUF type 'Q4_K' is not one moefy writes; choose one of F32, F16, BF16, Q8_0"):
        to_gguf(folder, tmp_path / "x.gguf", "Q4_K")
    with pytest.raises(MoefyError, match=r"has no config.json; give the folder of an exported model"):
        to_gguf(tmp_path, tmp_path / "x.gguf", "F32")
    with pytest.raises(MoefyError, match=r"x.gguf does not exist; write it first"):
        with measure.open_gguf(tmp_path / "x.gguf", threads=2, context=8):
            pass
    damaged = tmp_path / "damaged.gguf"
    damaged.write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(MoefyError, match=r"could not load .*damaged.gguf; write it again(.|\n)*log says:\n.*failed to read"):
        with measure.open_gguf(damaged, threads=2, context=8):
            pass


def test_a_llama_cpp_checkout_can_stand_in_for_the_fetched_converter(tmp_path, monkeypatch):
    fetched = llama_cpp_source()
    monkeypatch.setenv("MOEFY_LLAMA_CPP", str(fetched))
    assert llama_cpp_source() == fetched
    monkeypatch.setenv("MOEFY_LLAMA_CPP", str(tmp_path))
    with pytest.raises(
        MoefyError, match=r"\$MOEFY_LLAMA_CPP .* has no convert_hf_to_gguf.py or gguf-py; point it at a llama.cpp checkout"
    ):
        llama_cpp_source()
