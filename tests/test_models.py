import re

import pytest
import torch

from moefy.adapters.ffn import capture, find_ffns
from moefy.adapters.models import load_classifier, load_tokenizer
from moefy.errors import MoefyError


def test_relu_swap_and_fresh_head(tiny_bert):
    model = load_classifier(str(tiny_bert), label_names=["neg", "pos"], activation="relu")
    assert model.config.hidden_act == "relu" and model.config.id2label == {0: "neg", 1: "pos"}
    ffns = find_ffns(model)
    assert [f.index for f in ffns] == [0, 1]
    assert all(isinstance(f.act, torch.nn.ReLU) for f in ffns)
    assert (ffns[0].d_model, ffns[0].d_ff) == (32, 64)


def test_capture_sees_ffn_input_and_activations(tiny_bert):
    model = load_classifier(str(tiny_bert), label_names=["a", "b"], activation="relu").eval()
    tokenizer = load_tokenizer(str(tiny_bert))
    inputs = tokenizer(["the movie was good", "bad plot"], padding=True, return_tensors="pt")
    ffns = find_ffns(model)
    with capture(ffns) as seen, torch.no_grad():
        model(**inputs)
    for ffn in ffns:
        x, h = seen[ffn.index]["x"], seen[ffn.index]["h"]
        assert x.shape[-1] == 32 and h.shape[-1] == 64
        torch.testing.assert_close(h, torch.relu(ffn.w_in(x)))
        assert (h == 0).any()


def test_unknown_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(MoefyError, match="cannot load the model config"):
        load_classifier(str(tmp_path / "nowhere"))


def test_unsupported_family_is_named(tmp_path):
    from transformers import OPTConfig, OPTModel

    OPTModel(
        OPTConfig(
            num_hidden_layers=1,
            hidden_size=16,
            ffn_dim=32,
            num_attention_heads=2,
            vocab_size=50,
            max_position_embeddings=16,
            word_embed_proj_dim=16,
        )
    ).save_pretrained(tmp_path)
    with pytest.raises(MoefyError, match="model type 'opt' is not supported yet; supported: bert, camembert, distilbert"):
        load_classifier(str(tmp_path), label_names=["a", "b"])


@pytest.mark.parametrize("family", ["bert", "t5", "gpt2"])
def test_a_model_saved_without_its_tokenizer_is_refused(tmp_path, family):
    """transformers would build an empty tokenizer from config.json (BERT: 5 special tokens, T5: 104)."""
    from builders import build_tiny

    folder = build_tiny(family, tmp_path / family, layers=1, tokenizer=False)
    with pytest.raises(
        MoefyError, match=rf"no tokenizer files \(tokenizer.json, vocab.txt, .*\) in {re.escape(str(folder))}: copy"
    ):
        load_tokenizer(str(folder))


def test_a_tokenizer_of_only_special_tokens_is_refused(tmp_path, tiny_bert):
    from transformers import BertTokenizer

    from builders import SPECIAL

    BertTokenizer(vocab={word: i for i, word in enumerate(SPECIAL)}).save_pretrained(tmp_path)
    with pytest.raises(MoefyError, match=r"has 0 tokens besides its 5 special ones: an empty tokenizer.*copy the tokenizer"):
        load_tokenizer(str(tmp_path))
    assert len(load_tokenizer(str(tiny_bert))) == 39  # the toy vocabulary: 34 words besides the 5 special tokens
