"""`finetune.precision: auto` trains in bf16 only where bf16 is measured to be faster."""

import pytest
import torch

from moefy.errors import MoefyError
from moefy.training import precision


def test_bf16_is_chosen_only_with_a_clear_margin():
    assert precision.choose({"fp32": 1.0, "bf16": 0.2}) == "bf16"  # AVX512-BF16 / AMX: several times faster
    assert precision.choose({"fp32": 0.12, "bf16": 0.64}) == "fp32"  # AVX2 only: emulated bf16, 5x slower
    assert precision.choose({"fp32": 1.0, "bf16": 0.8}) == "fp32"  # a near tie must not change the numbers
    assert precision.choose({"fp32": 1.0}) == "fp32"  # autocast refused bf16


def test_auto_measures_and_a_fixed_precision_does_not(monkeypatch):
    calls = []
    monkeypatch.setattr(precision, "probe_seconds", lambda device, d, d_ff: calls.append((d, d_ff)) or {"fp32": 1.0, "bf16": 0.1})
    assert precision.resolve("auto", torch.device("cpu"), 32, 64) == ("bf16", {"fp32": 1.0, "bf16": 0.1})
    assert precision.resolve("fp32", torch.device("cpu"), 32, 64) == ("fp32", {})
    assert precision.resolve("bf16", torch.device("cpu"), 32, 64) == ("bf16", {})
    assert calls == [(32, 64)]
    with pytest.raises(MoefyError, match="finetune.precision 'fp16' is unknown"):
        precision.resolve("fp16", torch.device("cpu"), 32, 64)


def test_the_probe_times_both_precisions_here():
    seconds = precision.probe_seconds(torch.device("cpu"), 32, 64)
    assert seconds["fp32"] > 0 and set(seconds) <= {"fp32", "bf16"}
    assert precision.resolve("auto", torch.device("cpu"), 32, 64)[0] in ("fp32", "bf16")
