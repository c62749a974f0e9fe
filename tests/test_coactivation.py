import pytest
import torch

from moefy import coactivation
from moefy.coactivation import CoactivationCounter


@pytest.mark.parametrize("int8", [True, False])
def test_streaming_counts_equal_the_full_product(monkeypatch, int8):
    if not int8:
        monkeypatch.setattr(coactivation, "_int8_matmul_works", lambda device_type: False)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(n, 12, generator=g) for n in (5, 9, 1, 16)]  # odd sizes: int8 path pads
    counter = CoactivationCounter(12)
    assert (counter._acc.dtype == torch.int32) == (int8 and coactivation._int8_matmul_works("cpu"))
    for h in batches:
        counter.update(h)
    fired = (torch.cat(batches) > 0).float()
    assert counter.counts.dtype == torch.float32
    assert torch.equal(counter.counts, fired.t() @ fired)
    assert counter.tokens == 31
    assert counter.sparsity() == pytest.approx(1 - fired.mean().item())


def test_refuses_to_lose_exactness():
    counter = CoactivationCounter(4)
    counter.tokens = 2**24
    with pytest.raises(ValueError, match="max_tokens"):
        counter.update(torch.ones(1, 4))
