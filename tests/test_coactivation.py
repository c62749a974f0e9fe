import pytest
import torch

from moefy.conversion import coactivation
from moefy.conversion.coactivation import CoactivationCounter, choose_kernel, excess, fastest_kernel, probe_seconds


@pytest.mark.parametrize("kernel", ["int8", "float32"])
def test_streaming_counts_equal_the_full_product(kernel):
    if kernel == "int8" and "int8" not in probe_seconds("cpu", 12):
        pytest.skip("torch._int_mm does not work on this CPU")
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(n, 12, generator=g) for n in (5, 9, 1, 16)]  # odd sizes: int8 path pads
    counter = CoactivationCounter(12, kernel=kernel)
    assert counter._acc.dtype == (torch.int32 if kernel == "int8" else torch.float32)
    for h in batches:
        counter.update(h)
    fired = (torch.cat(batches) > 0).float()
    assert counter.counts.dtype == torch.float32
    assert torch.equal(counter.counts, fired.t() @ fired)
    assert counter.tokens == 31
    assert counter.sparsity() == pytest.approx(1 - fired.mean().item())


def test_the_kernel_is_the_one_measured_faster_not_the_one_that_works():
    # an AVX2-only CPU: int8 works, 56x slower (the measurement in the issue that found this)
    assert choose_kernel({"float32": 0.087, "int8": 4.84}) == "float32"
    assert choose_kernel({"float32": 0.05, "int8": 0.008}) == "int8"  # VNNI: int8 wins
    assert choose_kernel({"float32": 0.05, "int8": 0.045}) == "float32"  # within 20%: the simpler path
    assert choose_kernel({"float32": 0.05}) == "float32"  # int8 refused on this device


def test_a_counter_takes_the_probe_s_choice(monkeypatch):
    slow_int8 = {"float32": 0.01, "int8": 1.0}
    monkeypatch.setattr(coactivation, "probe_seconds", lambda device_type, d_ff: slow_int8)
    fastest_kernel.cache_clear()
    try:
        assert fastest_kernel("cpu", 64) == ("float32", (("float32", 0.01), ("int8", 1.0)))
        assert CoactivationCounter(64).kernel == "float32"
        monkeypatch.setattr(coactivation, "probe_seconds", lambda device_type, d_ff: {"float32": 1.0, "int8": 0.1})
        fastest_kernel.cache_clear()
        assert CoactivationCounter(64).kernel == "int8"
    finally:
        fastest_kernel.cache_clear()


def test_the_probe_times_every_working_kernel_on_this_machine():
    seconds = probe_seconds("cpu", 96)
    assert "float32" in seconds and all(s > 0 for s in seconds.values())
    assert fastest_kernel("cpu", 96)[0] in ("int8", "float32")


def test_refuses_to_lose_exactness():
    counter = CoactivationCounter(4, kernel="float32")
    counter.tokens = 2**24
    with pytest.raises(ValueError, match="max_tokens"):
        counter.update(torch.ones(1, 4))


def test_excess_is_co_activation_above_independent_firing():
    counts = torch.tensor([[10.0, 5.0, 1.0], [5.0, 10.0, 0.0], [1.0, 0.0, 2.0]])
    above = excess(counts, tokens=20)
    assert above[0, 1] == 0 and above[0, 2] == 0  # at or below chance (10 * 10 / 20 = 5, 10 * 2 / 20 = 1): clamped
    assert excess(torch.tensor([[10.0, 8.0], [8.0, 10.0]]), tokens=20)[0, 1] == pytest.approx(8 - 5)
