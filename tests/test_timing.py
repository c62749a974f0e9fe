import torch
from torch import nn

from builders import synthetic_ffn
from moefy.conversion.routers import MLPRouter
from moefy.measure import timing
from moefy.measure.timing import PAIR_EVERY, paired_timing, total_seconds
from moefy.moe.layer import MoEFFN


def test_paired_timing_times_the_dense_ffn_next_to_every_other_moe_call_alternately_before_and_after(monkeypatch):
    d, d_ff, experts = 16, 96, 12
    moe = MoEFFN(synthetic_ffn(d, d_ff, False, True, nn.ReLU()), torch.arange(d_ff) % experts, MLPRouter(d, experts), experts)
    moe.k = 3
    x = torch.randn(2, 5, d)
    assert PAIR_EVERY == 2
    events = []
    dense, forward = timing.time_dense, moe.forward
    monkeypatch.setattr(timing, "time_dense", lambda layer, x: events.append("dense") or dense(layer, x))
    monkeypatch.setattr(moe, "forward", lambda x: events.append("moe") or forward(x))
    with torch.no_grad():
        alone = moe(x)
        events.clear()
        with paired_timing([moe]) as clocks:
            assert all(torch.equal(moe(x), alone) for _ in range(5)), "the paired dense call changes nothing"
        assert events == ["moe", "dense", "moe", "dense", "moe", "moe", "moe", "dense"]
        moe_seconds, paired_seconds, dense_seconds = total_seconds(clocks)
        assert moe_seconds > paired_seconds > 0 and dense_seconds > 0, "3 of the 5 calls were paired"
        events.clear()
        moe.k = experts
        with paired_timing([moe]) as clocks:
            moe(x)
        assert events == ["moe"] and total_seconds(clocks)[2] == 0.0, "the dense path is not paired"
        moe.k = 3
        events.clear()
        with paired_timing([moe], paired=False) as clocks:
            moe(x)
        assert events == ["moe"] and total_seconds(clocks)[0] > 0, "unpaired: the MoE alone is timed"
        events.clear()
        moe(x)
        assert events == ["moe"] and clocks[0].calls == 1, "outside the block nothing is timed"
