import pytest
import torch

from moefy.coactivation import CoactivationCounter


def test_streaming_counts_equal_the_full_product():
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(n, 12, generator=g) for n in (5, 9, 1)]
    counter = CoactivationCounter(12)
    for h in batches:
        counter.update(h)
    fired = (torch.cat(batches) > 0).float()
    assert torch.equal(counter.counts, fired.t() @ fired)
    assert counter.tokens == 15
    assert counter.sparsity() == pytest.approx(1 - fired.mean().item())


def test_refuses_to_lose_exactness(monkeypatch):
    counter = CoactivationCounter(4)
    counter.tokens = 2**24
    with pytest.raises(ValueError, match="max_tokens"):
        counter.update(torch.ones(1, 4))
