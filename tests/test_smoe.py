"""The SMoE adapter: every supported Hugging Face MoE family, converted to SparseMoE layers, computes
what it computed before (padding, shared experts, dense layers, Switch's expert capacity); fewer
experts install in a block's place; load_hf_smoe round-trips a saved model and names what it cannot load."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from torch import nn

from builders import FILLER, NEGATIVE, POSITIVE, SPECIAL
from moefy.adapters.families import smoe_families
from moefy.adapters.smoe import CapacityLimited, SharedExpertMoE, convert_smoes, find_smoe_blocks, load_hf_smoe
from moefy.errors import MoefyError
from moefy.moe.sparse import SparseMoE

VOCAB = 100
DECODER = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
DECODER |= dict(max_position_embeddings=64, pad_token_id=0)


def switch_config(expert_capacity: int = 64) -> tf.SwitchTransformersConfig:
    """Encoder and decoder of 2 blocks, block 1 of each sparse; capacity 64 drops no token of a batch here."""
    return tf.SwitchTransformersConfig(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=16,
        d_ff=16,
        num_layers=2,
        num_decoder_layers=2,
        num_sparse_encoder_layers=1,
        num_sparse_decoder_layers=1,
        num_heads=2,
        num_experts=4,
        expert_capacity=expert_capacity,
        router_bias=True,
        decoder_start_token_id=0,
    )


def make_config(family: str):
    if family == "mixtral":
        return tf.MixtralConfig(**DECODER, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2)
    if family == "qwen2_moe":  # layer 0 dense (mlp_only_layers), layer 1 MoE with a shared expert
        return tf.Qwen2MoeConfig(
            **DECODER,
            intermediate_size=64,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            num_experts=4,
            num_experts_per_tok=2,
            mlp_only_layers=[0],
            norm_topk_prob=False,
        )
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(
            **DECODER,
            head_dim=16,
            intermediate_size=64,
            moe_intermediate_size=16,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=True,
        )
    if family == "olmoe":
        return tf.OlmoeConfig(**DECODER, intermediate_size=16, num_experts=6, num_experts_per_tok=2, norm_topk_prob=False)
    return switch_config()


HEADS = {
    "mixtral": tf.MixtralForCausalLM,
    "qwen2_moe": tf.Qwen2MoeForCausalLM,
    "qwen3_moe": tf.Qwen3MoeForCausalLM,
    "olmoe": tf.OlmoeForCausalLM,
    "switch_transformers": tf.SwitchTransformersForConditionalGeneration,
}
# family -> (block names, experts, k, renormalised gates)
EXPECTED = {
    "mixtral": (["model.layers.0.mlp", "model.layers.1.mlp"], 4, 2, True),
    "qwen2_moe": (["model.layers.1.mlp"], 4, 2, False),
    "qwen3_moe": (["model.layers.0.mlp", "model.layers.1.mlp"], 8, 2, True),
    "olmoe": (["model.layers.0.mlp", "model.layers.1.mlp"], 6, 2, False),
    "switch_transformers": (["encoder.block.1.layer.1.mlp", "decoder.block.1.layer.2.mlp"], 4, 1, False),
}


def tiny(family: str, config=None) -> nn.Module:
    torch.manual_seed(0)
    model = HEADS[family](config or make_config(family)).eval()
    with torch.no_grad():  # HF initialises Switch's router bias to 0: make it count
        for name, param in model.named_parameters():
            if name.endswith("router.classifier.bias"):
                param.normal_()
    return model


def batch(family: str) -> dict[str, torch.Tensor]:
    """3 right-padded sequences of 7, 5 and 3 tokens (pad id 0); Switch also gets decoder inputs."""
    torch.manual_seed(1)
    ids = torch.randint(1, VOCAB, (3, 7))
    mask = (torch.arange(7) < torch.tensor([[7], [5], [3]])).long()
    inputs = {"input_ids": ids * mask, "attention_mask": mask}
    if family == "switch_transformers":
        inputs["decoder_input_ids"] = torch.randint(1, VOCAB, (3, 4))
    return inputs


def logits(model: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def test_families_listed_sorted():
    assert smoe_families() == sorted(EXPECTED)


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_converted_model_equals_original(family):
    model = tiny(family)
    inputs = batch(family)
    before = logits(model, inputs)
    names, experts, k, renormalize = EXPECTED[family]
    assert [b.name for b in find_smoe_blocks(model)] == names
    moes = convert_smoes(model)
    assert sorted(moes) == list(range(len(names)))
    for moe in moes.values():
        assert isinstance(moe, SparseMoE) and moe.num_experts == experts
        assert (moe.routing.kind, moe.routing.k, moe.routing.renormalize) == ("top_k", k, renormalize)
        assert moe.w_gate is not None or family == "switch_transformers"
    # the blocks' own modules are gone: the model computes with the SparseMoE layers only
    assert not any(type(m).__name__.endswith(("SparseMoeBlock", "SparseMLP")) for m in model.modules())
    torch.testing.assert_close(logits(model, inputs), before, atol=1e-5, rtol=0)
    with pytest.raises(MoefyError, match="no MoE block left"):
        find_smoe_blocks(model)


def test_to_sparse_equals_block_on_its_own():
    """The bare layer, gate/up halves in their places: a gate-up swap would change every output."""
    model = tiny("mixtral")
    block = find_smoe_blocks(model)[0]
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(block.to_sparse()(x), block.block(x), atol=1e-6, rtol=0)


def test_qwen2_moe_shared_expert_keeps_checkpoint_keys():
    model = tiny("qwen2_moe")
    original = {k: v.clone() for k, v in model.state_dict().items() if ".shared_expert" in k}
    assert len(original) == 4  # gate_proj, up_proj, down_proj, shared_expert_gate
    convert_smoes(model)
    assert isinstance(model.model.layers[1].mlp, SharedExpertMoE)
    after = model.state_dict()
    for key, value in original.items():
        assert torch.equal(after[key], value), key


def test_switch_capacity_dropped_as_in_hf():
    """Capacity 2 of 7-token sequences on 4 experts: HF drops tokens, and the installed layer drops the same."""
    model = tiny("switch_transformers", switch_config(expert_capacity=2))
    inputs = batch("switch_transformers")
    before = logits(model, inputs)
    bare = find_smoe_blocks(model)[0].to_sparse()
    moes = convert_smoes(model)
    wrappers = [m for m in model.modules() if isinstance(m, CapacityLimited)]
    assert len(wrappers) == 2 and wrappers[0].moe is moes[0]
    torch.testing.assert_close(logits(model, inputs), before, atol=1e-5, rtol=0)
    assert moes[0].tokens_dropped > 0  # the case is real: some encoder token was over capacity
    encoder_in = torch.randn(3, 7, 32)
    with torch.no_grad():  # without the wrapper, every token is routed: the outputs differ
        assert not torch.allclose(bare(encoder_in), model.encoder.block[1].layer[1].mlp(encoder_in))


def fewer_experts(moe: SparseMoE, keep: int = 2) -> SparseMoE:
    """The first `keep` experts of `moe`, with a fresh router over them."""

    def first(t):
        return None if t is None else t.detach()[:keep]

    return SparseMoE(
        w_in=first(moe.w_in),
        w_out=first(moe.w_out),
        act=moe.act,
        router=nn.Linear(moe.d_model, keep, bias=False),
        routing=moe.routing,
        w_gate=first(moe.w_gate),
        b_in=first(moe.b_in),
        expert_bias=first(moe.expert_bias),
    )


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_install_fewer_experts(family):
    model = tiny(family)
    inputs = batch(family)
    shape = logits(model, inputs).shape
    for block in find_smoe_blocks(model):
        block.install(fewer_experts(block.to_sparse()))
    out = logits(model, inputs)
    assert out.shape == shape and torch.isfinite(out).all()
    moes = [m for m in model.modules() if isinstance(m, SparseMoE)]
    assert len(moes) == len(EXPECTED[family][0]) and all(m.num_experts == 2 for m in moes)


def test_convert_needs_float32():
    model = tiny("olmoe").to(torch.bfloat16)
    with pytest.raises(MoefyError, match="float32.*model.float"):
        convert_smoes(model)


def test_install_rejects_another_width():
    block = find_smoe_blocks(tiny("olmoe"))[0]
    other = SparseMoE(torch.zeros(2, 16, 8), torch.zeros(2, 8, 16), nn.SiLU(), nn.Linear(16, 2), block.to_sparse().routing)
    with pytest.raises(MoefyError, match="d_model 16"):
        block.install(other)


def save_tiny(family: str, folder):
    """A tiny random model of `family` saved with a word-level tokenizer (pad id 0)."""
    words = SPECIAL + sorted(set(POSITIVE + NEGATIVE + FILLER))
    tokenizer = tf.BertTokenizer(
        vocab={w: i for i, w in enumerate(words)}, do_lower_case=True, model_input_names=["input_ids", "attention_mask"]
    )
    model = tiny(family)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer


def save_tiny_mixtral(folder):
    return save_tiny("mixtral", folder)


def test_load_hf_smoe_round_trip(tmp_path):
    original, tokenizer = save_tiny_mixtral(tmp_path / "mixtral")
    model, moes, loaded_tokenizer = load_hf_smoe(str(tmp_path / "mixtral"), "causal_lm")
    assert not model.training and sorted(moes) == [0, 1] and loaded_tokenizer.pad_token_id == 0
    inputs = loaded_tokenizer(["the movie was good and funny", "bad", "a dull plot"], padding=True, return_tensors="pt")
    real = inputs["attention_mask"].bool()
    assert not real.all()  # padded: padding goes to no expert, real tokens are computed as before
    torch.testing.assert_close(logits(model, inputs)[real], logits(original, inputs)[real], atol=1e-5, rtol=0)
    assert all(moe.load.sum() == 2 * real.sum() for moe in moes.values())  # k = 2 pairs per real token
    classifier, _, _ = load_hf_smoe(str(tmp_path / "mixtral"), "classification")
    assert logits(classifier, inputs).shape == (3, 2)


def test_load_hf_smoe_names_what_it_cannot_load(tmp_path):
    switch = tmp_path / "switch"
    switch_config().save_pretrained(switch)
    for task in ("classification", "causal_lm"):
        with pytest.raises(MoefyError, match="'switch_transformers'.*supports none"):
            load_hf_smoe(str(switch), task)
    olmoe = tmp_path / "olmoe"
    make_config("olmoe").save_pretrained(olmoe)
    with pytest.raises(MoefyError, match="sequence-classification head.*supports causal_lm"):
        load_hf_smoe(str(olmoe), "classification")
    with pytest.raises(MoefyError, match="task 'seq2seq' is unknown"):
        load_hf_smoe(str(olmoe), "seq2seq")
    with pytest.raises(MoefyError, match=f"{tmp_path / 'missing'} does not exist"):
        load_hf_smoe(str(tmp_path / "missing"), "causal_lm")


def test_unsupported_family_names_supported_ones(tmp_path):
    config = tf.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    supported = ", ".join(smoe_families())
    with pytest.raises(MoefyError, match=f"'bert'.*supported: {supported}"):
        find_smoe_blocks(tf.BertModel(config))
    config.save_pretrained(tmp_path / "bert")
    with pytest.raises(MoefyError, match=f"'bert'.*supported: {supported}"):
        load_hf_smoe(str(tmp_path / "bert"), "classification")
