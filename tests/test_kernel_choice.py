"""The MoE kernel measured fastest here: the table, its lookups, and the layer following it."""

import json

import pytest
import torch
from torch import nn

from moefy.adapters.ffn import FFN
from moefy.conversion.routers import MLPRouter
from moefy.errors import MoefyError
from moefy.moe import kernel_choice
from moefy.moe import layer as moe_module
from moefy.moe.kernel_choice import (
    FORMAT,
    KernelTable,
    ffn_shape_key,
    layer_shape_key,
    measure,
    shape_key,
    skewed_picks,
    table_for,
)
from moefy.moe.layer import MoEFFN, default_kernel, kernel_calls

TABLE = KernelTable(
    num_experts=8,
    tokens=(1, 64, 4096),
    densities=(0.1, 0.5, 0.9),
    winners=(("bags", "bags", "masked"), ("looped", "looped", "masked"), ("grouped", "looped", "masked")),
)


def ffn(d=16, d_ff=64, gated=False):
    torch.manual_seed(0)
    return FFN(
        0,
        nn.Linear(d, d_ff, bias=not gated),
        nn.ReLU(),
        nn.Linear(d_ff, d, bias=not gated),
        lambda m: None,
        nn.Linear(d, d_ff, bias=False) if gated else None,
    )


def test_a_batch_takes_the_winner_of_its_nearest_cell():
    assert TABLE.choose(tokens=1, pairs=1) == "bags"  # density 1/8: nearest 0.1
    assert TABLE.choose(tokens=2, pairs=14) == "masked"  # 2 tokens ~ 1 on a log scale; density 0.875 -> 0.9
    assert TABLE.choose(tokens=100, pairs=100 * 4) == "looped"  # ~64 tokens, density 0.5
    assert TABLE.choose(tokens=3000, pairs=3000 * 7) == "masked"  # ~4096 tokens (log scale), density 0.875
    assert TABLE.choose(tokens=10**6, pairs=10**6) == "grouped"  # beyond the ladder: its last row


def test_tables_round_trip_and_bad_files_say_what_to_do():
    assert shape_key(16, 64, 8, False, d_out=16) == shape_key(16, 64, 8, False) == "d16-ff64-E8"
    assert shape_key(16, 64, 8, False, d_out=4) == "d16-ff64-E8-out4"  # a distilled grouped-query k projection
    document = {"format": FORMAT, "shapes": {shape_key(16, 64, 8, False): TABLE.to_json()}}
    assert table_for(json.loads(json.dumps(document)), shape_key(16, 64, 8, False), "k.json") == TABLE
    with pytest.raises(MoefyError, match="no kernel table for FFN shape d16-ff64-E8-gated.*rerun the calibrate step"):
        table_for(document, shape_key(16, 64, 8, True), "k.json")
    with pytest.raises(MoefyError, match="not a kernel calibration"):
        table_for({"shapes": {}}, shape_key(16, 64, 8, False), "k.json")
    broken = {"format": FORMAT, "shapes": {shape_key(16, 64, 8, False): {"tokens": [1]}}}
    with pytest.raises(MoefyError, match="damaged"):
        table_for(broken, shape_key(16, 64, 8, False), "k.json")


def rotating_picks(tokens: int, experts: int, k: int, always: tuple[int, ...] = ()) -> torch.Tensor:
    """Token t picks `always` and the next k of the other experts from t on: every other expert
    gets the same share of the tokens (up to one token)."""
    others = [e for e in range(experts) if e not in always]
    picked = torch.zeros(tokens, experts, dtype=torch.bool)
    for t in range(tokens):
        picked[t, list(always)] = True
        picked[t, [others[(t + j) % len(others)] for j in range(k)]] = True
    return picked


def test_the_layer_runs_the_kernel_its_table_chooses_and_computes_popular_experts_for_every_token():
    layer = MoEFFN(ffn(), torch.arange(64) % 8, MLPRouter(16, 8), 8, kernels=TABLE)
    reference = MoEFFN(ffn(), torch.arange(64) % 8, MLPRouter(16, 8), 8)
    x = torch.randn(64, 16)
    assert TABLE.masked_share(64) == pytest.approx(0.7), "looped wins up to 0.5 and loses at 0.9 in the 64-token row"
    cases = (
        (rotating_picks(64, 8, 4), "looped", []),  # every expert at share 0.5 < 0.7: gathered
        (rotating_picks(64, 8, 7), "masked", None),  # every expert at 0.875: the table's cell, masked
        (rotating_picks(64, 8, 2, always=(0, 5)), "looped", [0, 5]),  # experts 0 and 5 at share 1, the rest at 1/3
        # density 7/8: the table's cell says masked, however uneven the picks
        (rotating_picks(64, 8, 1, always=(0, 1, 2, 3, 4, 5)), "masked", None),
    )
    with torch.no_grad():
        for picked, expected, popular in cases:
            kernel_calls([layer])
            got = layer.experts_forward(x, picked)
            assert kernel_calls([layer]) == {expected: 1}
            if popular is not None:
                assert layer.popular_experts(picked).nonzero().flatten().tolist() == popular
            torch.testing.assert_close(got, reference.experts_forward(x, picked, kernel="masked"), rtol=0, atol=1e-5)
        layer.k = 8
        layer(x)
        assert kernel_calls([layer]) == {}, "every expert: the dense matmuls, no kernel"


def test_a_table_saying_masked_gets_masked_however_uneven_the_picks():
    """The table was measured on skewed picks; no rule of the layer's overrides it."""
    layer = MoEFFN(ffn(), torch.arange(64) % 8, MLPRouter(16, 8), 8, kernels=TABLE)
    uneven = rotating_picks(64, 8, 1, always=(0, 1, 2, 3, 4, 5))  # six experts at share 1, two at 1/2
    with torch.no_grad():
        kernel_calls([layer])
        layer.experts_forward(torch.randn(64, 16), uneven)
    assert TABLE.choose(64, int(uneven.sum())) == "masked" and kernel_calls([layer]) == {"masked": 1}


def test_the_calibration_draws_picks_as_uneven_as_a_trained_router_s():
    picked = skewed_picks(4096, 48, 24, torch.Generator().manual_seed(0))
    assert torch.equal(picked.sum(-1), torch.full((4096,), 24)), "k distinct experts per token"
    share = picked.float().mean(0)
    assert share.max() > 0.9 and share.min() < 0.25, "some experts take nearly every token, others few"


def test_the_share_where_masked_dense_takes_over_comes_from_the_measured_row():
    assert TABLE.masked_share(1) is None, "looped never wins on one token"
    assert TABLE.masked_share(4096) == pytest.approx(0.7), "looped wins at 0.5, masked from 0.9"
    everywhere = KernelTable(8, (64,), (0.1, 0.5), (("looped", "looped"),))
    assert everywhere.masked_share(64) == 1.0, "looped wins at every density: only experts every token picks"
    layer = MoEFFN(ffn(), torch.arange(64) % 8, MLPRouter(16, 8), 8, kernels=TABLE)
    assert layer.masked_share(1) == moe_module.LOOPED_DENSE_SHARE, "no share measured: the fixed rule's"


def test_without_a_table_fixed_rules_choose():
    assert default_kernel(tokens=1, pairs=4, num_experts=8, expert_size=32, on_gpu=False) == "bags"
    assert default_kernel(tokens=1024, pairs=1024 * 2, num_experts=8, expert_size=32, on_gpu=False) == "looped"
    assert default_kernel(tokens=1024, pairs=1024 * 2, num_experts=8, expert_size=32, on_gpu=True) == "grouped"
    assert default_kernel(tokens=1024, pairs=1024 * 2, num_experts=8, expert_size=4, on_gpu=False) == "masked"


def test_an_unaligned_layer_never_runs_grouped_mm_whatever_the_table_says():
    layer = MoEFFN(ffn(6, 18), torch.arange(18) % 6, MLPRouter(6, 6), 6, kernels=TABLE)  # 6-float rows: not aligned
    assert TABLE.choose(tokens=10**6, pairs=10**6) == "grouped"
    assert layer.choose_kernel(tokens=10**6, pairs=10**6) == "masked", "experts of 3 neurons: masked-dense instead"


@pytest.mark.parametrize("gated", [False, True])
def test_measuring_fills_every_cell_with_its_fastest_kernel(gated):
    table = measure(ffn(gated=gated), 8, torch.device("cpu"), repeats=1)
    assert (
        table.num_experts == 8
        and len(table.winners) == len(table.tokens)
        and all(len(r) == len(table.densities) for r in table.winners)
    )
    for row, winners in enumerate(table.winners):
        for column, winner in enumerate(winners):
            timed = {k: ms[row][column] for k, ms in table.milliseconds.items() if ms[row][column] is not None}
            assert "masked" in timed and winner == min(timed, key=timed.get)
    assert table.milliseconds["bags"][-1][-1] is None, "bags are not timed on thousands of tokens"


@pytest.mark.parametrize("gated", [False, True])
def test_a_layer_looks_up_the_table_its_ffn_was_calibrated_under(gated):
    dense = ffn(gated=gated)
    layer = MoEFFN(dense, torch.arange(64) % 8, MLPRouter(16, 8), 8)
    assert layer_shape_key(layer) == ffn_shape_key(dense, 8) == ("d16-ff64-E8-gated" if gated else "d16-ff64-E8")


def test_a_bf16_layer_looks_up_the_table_measured_in_bf16():
    """evaluate.precision bf16: the calibration times the kernels in bf16 under their own key, which
    the layer cast to bf16 (as evaluate casts the model) finds, and its routed part keeps the dtype."""
    from moefy.steps.calibrate import routed_part

    dense = ffn(gated=True)
    layer = MoEFFN(dense, torch.arange(64) % 8, MLPRouter(16, 6), 8, shared_experts=2).to(torch.bfloat16)
    for linear in (dense.w_in, dense.w_gate, dense.w_out):
        linear.to(torch.bfloat16)
    part = routed_part(dense, 8, 2)
    assert part.w_in.weight.dtype == torch.bfloat16
    assert layer_shape_key(layer) == ffn_shape_key(part, 6) == "d16-ff48-E6-gated-bf16"
    table = measure(part, 6, torch.device("cpu"), repeats=1, max_seconds_per_call=0.01)
    assert table.tokens and all(winners for winners in table.winners)


def test_a_layer_with_shared_experts_looks_up_the_table_of_its_routed_part():
    from moefy.steps.calibrate import routed_part

    dense = ffn(gated=True)
    labels = torch.arange(64) % 8  # experts 6 and 7 shared
    layer = MoEFFN(dense, labels, MLPRouter(16, 6), 8, shared_experts=2)
    part = routed_part(dense, 8, 2)
    assert layer_shape_key(layer) == ffn_shape_key(part, 6) == "d16-ff48-E6-gated"
    x = torch.randn(5, 16)
    with torch.no_grad():
        torch.testing.assert_close(part.activations(x), dense.activations(x)[:, :48])
    assert routed_part(dense, 8, 0) is dense


def test_the_calibration_times_a_cells_kernels_in_turns_so_a_burst_of_load_slows_each_of_them_once(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(kernel_choice.time, "perf_counter", lambda: clock[0])
    ran: list[str] = []

    def kernel(name: str, seconds: float):
        def call():
            ran.append(name)
            busy = 1 <= len(ran) - 3 <= 3  # the first three timed calls (after 3 warm-ups) run under load
            clock[0] += seconds + (10 if busy else 0)

        return call

    calls = {"looped": kernel("looped", 1), "masked": kernel("masked", 2), "bags": kernel("bags", 3)}
    milliseconds = kernel_choice._fastest_milliseconds(calls, lambda: None, repeats=3)
    warm_ups = ["looped", "masked", "bags"]
    rounds = [["looped", "masked", "bags"], ["masked", "bags", "looped"], ["bags", "looped", "masked"]]
    assert ran == warm_ups + [name for round_ in rounds for name in round_]
    assert milliseconds == {"looped": 1000, "masked": 2000, "bags": 3000}
