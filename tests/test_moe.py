import pytest
import torch
from torch import nn

from builders import synthetic_ffn
from moefy.adapters.ffn import FFN, find_ffns
from moefy.adapters.models import load_classifier, load_tokenizer
from moefy.conversion.routers import (
    GroundTruthRouter,
    MLPRouter,
    NormRouter,
    SimilarityRouter,
    expert_centroids,
    expert_mass,
    representative_router,
)
from moefy.errors import MoefyError
from moefy.moe import layer as moe_module
from moefy.moe.layer import (
    MoEFFN,
    moefy_model,
    set_experts_per_token,
    set_threshold,
    threshold_pick,
)

E = 8


def balanced_labels(d_ff: int, seed: int) -> torch.Tensor:
    return torch.randperm(d_ff, generator=torch.Generator().manual_seed(seed)) % E


def moefied(folder, router: str):
    torch.manual_seed(0)  # the same fresh classifier head as `dense` below
    model = load_classifier(str(folder), label_names=["a", "b"], activation="relu").eval()
    ffns = find_ffns(model)
    labels = {f.index: balanced_labels(f.d_ff, f.index) for f in ffns}
    routers = {}
    for f in ffns:
        if router == "groundtruth":
            routers[f.index] = GroundTruthRouter(labels[f.index], E)
        elif router == "similarity":
            routers[f.index] = SimilarityRouter(expert_centroids(f.w_in.weight.detach(), labels[f.index], E))
        elif router == "representative":
            with torch.no_grad():
                h = f.activations(torch.randn(64, f.d_model))
            routers[f.index] = representative_router(f, labels[f.index], E, h, per_expert=2)
        else:
            torch.manual_seed(f.index)
            routers[f.index] = MLPRouter(f.d_model, E)
    return model, moefy_model(model, labels, routers, E), labels


@pytest.fixture(scope="module")
def batch(tiny_bert):
    tokenizer = load_tokenizer(str(tiny_bert))
    return tokenizer(
        ["the movie was good and funny", "bad", "a dull boring plot with its cast"], padding=True, return_tensors="pt"
    )


@pytest.mark.parametrize("router", ["groundtruth", "similarity", "mlp", "representative"])
def test_full_budget_gives_the_dense_logits(tiny_bert, batch, router):
    torch.manual_seed(0)
    dense = load_classifier(str(tiny_bert), label_names=["a", "b"], activation="relu").eval()
    model, layers, _ = moefied(tiny_bert, router)
    set_experts_per_token(layers, E)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, dense(**batch).logits, rtol=0, atol=1e-5)


def masked_dense(ffn: FFN, x: torch.Tensor, picked: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The reference: the dense FFN with the neurons of unpicked experts zeroed."""
    return ffn.w_out(ffn.activations(x) * picked[..., labels])


def picked_by(moe: MoEFFN, x: torch.Tensor) -> torch.Tensor:
    return moe.select(x.reshape(-1, moe.d_model))[0].view(*x.shape[:-1], -1).float()


@pytest.mark.parametrize(
    "kernel", ["bags", "looped", "looped, every expert for every token", "looped in blocks", "grouped", "masked"]
)
@pytest.mark.parametrize("router", ["groundtruth", "similarity", "mlp", "representative"])
def test_partial_budget_computes_exactly_the_chosen_experts(tiny_bert, router, kernel, monkeypatch):
    """Every kernel, also on the oracle's activations (it computed every neuron to pick)."""
    if kernel == "looped, every expert for every token":  # computed for all, masked: no gather
        monkeypatch.setattr(moe_module, "LOOPED_DENSE_SHARE", 0.0)
        kernel = "looped"
    if kernel == "looped in blocks":  # blocks of 4 of the 35 tokens, the last one shorter
        monkeypatch.setattr(moe_module, "LOOPED_BLOCK_TOKENS", 4)
        kernel = "looped"
    torch.manual_seed(0)
    reference = load_classifier(str(tiny_bert), label_names=["a", "b"], activation="relu").eval()
    ffn = find_ffns(reference)[0]
    _, layers, labels = moefied(tiny_bert, router)
    moe: MoEFFN = layers[0]
    forward = moe.experts_forward
    monkeypatch.setattr(moe, "experts_forward", lambda x, picked, h=None: forward(x, picked, kernel=kernel, h=h))
    x = torch.randn(5, 7, moe.d_model)
    with torch.no_grad():
        for k in (1, 3, E - 1):
            moe.k = k
            picked = picked_by(moe, x)
            assert torch.equal(picked.sum(-1), torch.full((5, 7), float(k)))
            expected = masked_dense(ffn, x, picked, labels[0])
            torch.testing.assert_close(moe(x), expected, rtol=0, atol=1e-5)
            assert torch.equal(moe.experts_per_token, torch.full((5, 7), float(k)))
        assert not torch.allclose(moe(x), ffn.w_out(ffn.activations(x)), atol=1e-3)


@pytest.mark.parametrize(
    "kernel",
    [
        "bags",
        "looped",
        "looped, popular experts for every token",
        "looped in blocks",
        "grouped",
        "auto",
        "grouped in slabs",
        "masked",
    ],
)
@pytest.mark.parametrize("gated,bias,act", [(True, False, nn.SiLU()), (False, True, nn.GELU()), (True, True, nn.ReLU())])
def test_both_kernels_match_the_masked_dense_ffn(kernel, gated, bias, act, monkeypatch):
    d, d_ff, experts = 16, 96, 12
    if kernel == "grouped in slabs":  # 5 pairs per slab: slabs cut through experts' groups
        monkeypatch.setattr(moe_module, "SLAB_FLOATS", 5 * d)
        kernel = "grouped"
    if kernel == "looped, popular experts for every token":  # experts at a share >= 0.3 masked, the rest gathered
        monkeypatch.setattr(moe_module, "LOOPED_DENSE_SHARE", 0.3)
        kernel = "looped"
    if kernel == "looped in blocks":  # blocks of 3 tokens: 40 tokens end in a block of 1
        monkeypatch.setattr(moe_module, "LOOPED_BLOCK_TOKENS", 3)
        monkeypatch.setattr(moe_module, "NATIVE_BLOCK_TOKENS", 3)
        kernel = "looped"
    ffn = synthetic_ffn(d, d_ff, gated, bias, act)
    labels = torch.randperm(d_ff, generator=torch.Generator().manual_seed(2)) % experts
    moe = MoEFFN(ffn, labels, MLPRouter(d, experts), experts)
    with torch.no_grad():
        for tokens in (1, 2, 40):
            x = torch.randn(tokens, d)
            picked = torch.rand(tokens, experts) < 0.3  # any pattern, also tokens with no expert
            got = moe.experts_forward(x, picked, kernel=kernel)
            torch.testing.assert_close(got, masked_dense(ffn, x, picked.float(), labels), rtol=0, atol=1e-5)
        moe.k = experts
        x = torch.randn(3, 4, d)
        torch.testing.assert_close(moe(x), ffn.w_out(ffn.activations(x)), rtol=0, atol=1e-5)


def test_auto_kernel_uses_bags_for_few_tokens_and_the_expert_loop_for_many(monkeypatch):
    d, d_ff, experts = 16, 192, 12  # experts of 16 neurons
    moe = MoEFFN(synthetic_ffn(d, d_ff, False, True, nn.ReLU()), torch.arange(d_ff) % experts, MLPRouter(d, experts), experts)
    moe.k = 3
    used = []
    monkeypatch.setattr(MoEFFN, "_bags", lambda self, x, token, expert, h=None: used.append("bags") or torch.zeros(len(token), d))
    monkeypatch.setattr(MoEFFN, "_looped", lambda self, x, picked, h, out, gates=None: used.append("looped") or out)
    moe(torch.randn(1, d))  # 3 pairs for 12 experts: bags
    moe(torch.randn(64, d))  # 192 pairs: one matmul pair per expert (grouped_mm is the GPU's choice)
    assert used == ["bags", "looped"]
    assert moe_module.default_kernel(64, 192, experts, 16, on_gpu=True) == "grouped"


def test_auto_kernel_runs_many_tokens_on_tiny_experts_masked_dense(monkeypatch):
    d, d_ff, experts = 16, 96, 24  # experts of 4 neurons
    ffn = synthetic_ffn(d, d_ff, False, True, nn.ReLU())
    labels = torch.arange(d_ff) % experts
    moe = MoEFFN(ffn, labels, MLPRouter(d, experts), experts)
    monkeypatch.setattr(MoEFFN, "_grouped", lambda *args: pytest.fail("tiny experts must not use grouped_mm"))
    monkeypatch.setattr(MoEFFN, "_looped", lambda *args: pytest.fail("tiny experts must not loop over experts"))
    x, picked = torch.randn(64, d), torch.rand(64, experts) < 0.3
    torch.testing.assert_close(moe.experts_forward(x, picked), masked_dense(ffn, x, picked.float(), labels), rtol=0, atol=1e-5)


def test_weights_grouped_mm_cannot_read_never_go_through_it(monkeypatch):
    d, d_ff, experts = 6, 96, 6  # rows of 6 floats: not 16-byte aligned; experts of 16 neurons, big enough for it
    ffn = synthetic_ffn(d, d_ff, False, True, nn.ReLU())
    labels = torch.arange(d_ff) % experts
    moe = MoEFFN(ffn, labels, MLPRouter(d, experts), experts)
    monkeypatch.setattr(MoEFFN, "_grouped", lambda *args: pytest.fail("unaligned weights must not use grouped_mm"))
    assert moe.choose_kernel(tokens=50, pairs=150, on_gpu=True) == "looped"
    x, picked = torch.randn(50, d), torch.rand(50, experts) < 0.5
    torch.testing.assert_close(moe.experts_forward(x, picked), masked_dense(ffn, x, picked.float(), labels), rtol=0, atol=1e-5)


def test_unbalanced_labels_are_refused():
    ffn = synthetic_ffn(16, 64, False, True, nn.ReLU())
    labels = torch.arange(64) % 8
    labels[0] = 1
    with pytest.raises(MoefyError, match="exactly d_ff / E neurons per expert"):
        MoEFFN(ffn, labels, MLPRouter(16, 8), 8)


def test_groundtruth_picks_the_experts_with_most_activation(tiny_bert):
    torch.manual_seed(0)
    reference = load_classifier(str(tiny_bert), label_names=["a", "b"], activation="relu").eval()
    ffn = find_ffns(reference)[0]
    _, layers, labels = moefied(tiny_bert, "groundtruth")
    moe = layers[0]
    x = torch.randn(4, moe.d_model)
    h = ffn.activations(x)
    mass = torch.stack([h[:, labels[0] == e].clamp(min=0).sum(-1) for e in range(E)], dim=-1)
    torch.testing.assert_close(expert_mass(h, labels[0], E), mass)
    moe.k = 2
    assert torch.equal(picked_by(moe, x).bool(), torch.zeros(4, E, dtype=torch.bool).scatter_(1, mass.topk(2).indices, True))


def test_a_smaller_budget_changes_predictions(tiny_bert, batch):
    model, layers, _ = moefied(tiny_bert, "similarity")
    with torch.no_grad():
        full = model(**batch).logits
        set_experts_per_token(layers, 1)
        assert not torch.allclose(model(**batch).logits, full)


@pytest.mark.parametrize("gated, d_out", [(False, 64), (True, 64), (False, 16)])
def test_flops_per_token_counts_the_picked_experts_and_the_router(gated, d_out):
    """4 of 16 experts of a 64 -> 256 -> d_out FFN (a gate too, or a narrower output: a distilled
    grouped-query k projection) and the MLP router's 2 * (64 * 16 + 16 * 16) FLOPs, by hand."""
    torch.manual_seed(0)
    linear = {name: nn.Linear(*shape) for name, shape in (("in", (64, 256)), ("gate", (64, 256)), ("out", (256, d_out)))}
    ffn = FFN(0, linear["in"], nn.ReLU(), linear["out"], lambda m: None, linear["gate"] if gated else None)
    router = MLPRouter(64, 16)
    layer = MoEFFN(ffn, torch.arange(256) % 16, router, 16)
    dense = 2 * 256 * ((2 if gated else 1) * 64 + d_out)
    assert (
        layer.dense_flops_per_token
        == dense
        == sum(2 * m.weight.numel() for m in (ffn.w_in, ffn.w_gate, ffn.w_out) if m is not None)
    )
    assert router.flops_per_token() == 2 * (64 * 16 + 16 * 16)
    assert layer.flops_per_token(4, router_runs=True) == pytest.approx(dense / 4 + 2 * (64 * 16 + 16 * 16))
    assert layer.flops_per_token(16, router_runs=False) == dense


def test_dynamic_k_rule_keeps_experts_near_the_tokens_best():
    c = torch.tensor([[1.0, 0.5, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0], [4.0, 3.0, 2.0, 1.0]])
    assert threshold_pick(c, 0.0).tolist() == [[True, False, True, False], [False] * 4, [True, False, False, False]]
    assert threshold_pick(c, 0.5).tolist() == [[True, True, True, False], [False] * 4, [True, True, True, False]]
    assert threshold_pick(c, 1.0).all()


@pytest.mark.parametrize("router", ["groundtruth", "mlp", "norm"])
def test_dynamic_k_layer_computes_the_threshold_picks(router):
    d, d_ff, experts = 16, 96, 12
    ffn = synthetic_ffn(d, d_ff, False, True, nn.ReLU())
    labels = torch.randperm(d_ff, generator=torch.Generator().manual_seed(2)) % experts
    torch.manual_seed(3)
    router = {"groundtruth": GroundTruthRouter(labels, experts), "mlp": MLPRouter(d, experts), "norm": NormRouter(d, experts, 8)}[
        router
    ]
    moe = MoEFFN(ffn, labels, router, experts)
    x = torch.randn(30, d)
    with torch.no_grad():
        set_threshold([moe], 0.4)
        picked = threshold_pick(router.contribution(x, ffn.activations(x)), 0.4)
        torch.testing.assert_close(moe(x), masked_dense(ffn, x, picked.float(), labels), rtol=0, atol=1e-5)
        assert torch.equal(moe.experts_per_token, picked.sum(-1).float())
        assert moe.experts_per_token.min() >= (0 if router == "groundtruth" else 1)
        set_threshold([moe], 0.0)
        fewest = moe(x) is not None and moe.experts_per_token.clone()
        set_threshold([moe], 1.0)
        torch.testing.assert_close(moe(x), ffn.w_out(ffn.activations(x)), rtol=0, atol=1e-5)
        assert moe.experts_per_token is None  # dense: no router
    assert fewest.mean() < picked.sum(-1).float().mean()
    set_experts_per_token([moe], 3)
    assert moe.tau is None and moe.k == 3


def test_top_k_picks_the_k_highest_router_scores():
    ffn = synthetic_ffn(16, 96, gated=False, bias=True, act=nn.ReLU())
    moe = MoEFFN(ffn, torch.arange(96) % 12, MLPRouter(16, 12), 12)
    x = torch.randn(50, 16)
    with torch.no_grad():
        scores = moe.router(x)
        for k in (1, 6, 11):
            moe.k = k
            floor = scores.sort(dim=-1, descending=True).values[:, k - 1 : k]
            assert torch.equal(moe.select(x)[0], scores >= floor)


@pytest.mark.parametrize(
    "kernel", ["masked", "grouped", "bags", "looped", "looped, popular experts for every token", "looped in blocks"]
)
@pytest.mark.parametrize("gated", [False, True])
def test_gradients_flow_through_the_layer_as_through_the_masked_dense_ffn(kernel, gated, monkeypatch):
    """The fresh projections are overwritten in place only where autograd does not need them."""
    if kernel == "looped, popular experts for every token":
        monkeypatch.setattr(moe_module, "LOOPED_DENSE_SHARE", 0.3)
        kernel = "looped"
    if kernel == "looped in blocks":  # in-place updates of views of the output, recorded by autograd
        monkeypatch.setattr(moe_module, "LOOPED_BLOCK_TOKENS", 6)
        monkeypatch.setattr(moe_module, "LOOPED_DENSE_SHARE", 0.5)
        kernel = "looped"
    ffn = synthetic_ffn(16, 96, gated=gated, bias=True, act=nn.ReLU())
    labels = torch.arange(96) % 12
    moe = MoEFFN(ffn, labels, MLPRouter(16, 12), 12)
    picked = torch.rand(20, 12, generator=torch.Generator().manual_seed(3)) < 0.4
    x = torch.randn(20, 16, requires_grad=True)
    moe.experts_forward(x, picked, kernel=kernel).square().sum().backward()
    reference = x.detach().clone().requires_grad_()
    masked_dense(ffn, reference, picked.float(), labels).square().sum().backward()
    torch.testing.assert_close(x.grad, reference.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("oracle", [False, True])
def test_the_looped_kernel_writes_its_intermediates_into_one_reused_block_each_unless_autograd_records_it(oracle, monkeypatch):
    d, d_ff, experts = 16, 96, 12
    ffn = synthetic_ffn(d, d_ff, gated=True, bias=True, act=nn.ReLU())
    labels = torch.arange(d_ff) % experts
    moe = MoEFFN(ffn, labels, MLPRouter(d, experts), experts)
    monkeypatch.setattr(moe_module, "LOOPED_BLOCK_TOKENS", 8)
    monkeypatch.setattr(moe_module, "LOOPED_DENSE_SHARE", 1.01)  # no expert popular: every one gathered
    monkeypatch.setattr(moe_module.native, "looped_kernel", lambda: None)  # the Python loop (looped.cpp has its own)
    taken: list[tuple[str, int | None]] = []
    take = moe_module._LoopScratch.take

    def spy(self, name: str, rows: int) -> torch.Tensor | None:
        buffer = take(self, name, rows)
        taken.append((name, None if buffer is None else buffer.data_ptr()))
        return buffer

    monkeypatch.setattr(moe_module._LoopScratch, "take", spy)
    x = torch.randn(20, d)
    picked = torch.rand(20, experts, generator=torch.Generator().manual_seed(6)) < 0.5
    h = moe.dense_activations(x) if oracle else None
    expected = masked_dense(ffn, x, picked.float(), labels)
    with torch.no_grad():
        torch.testing.assert_close(moe.experts_forward(x, picked, kernel="looped", h=h), expected, rtol=0, atol=1e-5)
    names = {"up", "out"} if oracle else {"rows", "gate", "up", "out"}
    assert {name for name, _ in taken} == names
    for name in names:  # every expert of every block (3: 8 + 8 + 4 tokens) writes into the same rows
        addresses = {address for n, address in taken if n == name}
        assert len(addresses) == 1 and None not in addresses
    taken.clear()
    x.requires_grad_()  # out= ops cannot be differentiated: every op allocates its own
    moe.experts_forward(x, picked, kernel="looped").sum().backward()
    assert taken and all(address is None for _, address in taken)


@pytest.mark.parametrize("act", [nn.GELU(), nn.ReLU()])  # GELU: negative activations count too
def test_the_oracle_picks_the_experts_with_the_most_activation_mass_without_reordering_them(act):
    d, d_ff, experts = 16, 96, 12
    ffn = synthetic_ffn(d, d_ff, gated=False, bias=True, act=act)
    labels = torch.randperm(d_ff, generator=torch.Generator().manual_seed(4)) % experts
    other = torch.randperm(d_ff, generator=torch.Generator().manual_seed(5)) % experts
    x = torch.randn(30, d)
    with torch.no_grad():
        h = ffn.activations(x)
        for router_labels, in_order in ((labels, True), (other, False)):  # an oracle for another split: reordered
            moe = MoEFFN(ffn, labels, GroundTruthRouter(router_labels, experts), experts)
            assert moe._oracle_in_order is in_order
            mass = expert_mass(h, router_labels, experts)
            moe.k = 4
            top = torch.zeros_like(mass, dtype=torch.bool).scatter_(-1, mass.topk(4, dim=-1).indices, True)
            assert torch.equal(moe.select(x)[0], top)
            moe.tau = 0.5
            assert torch.equal(moe.select(x)[0], threshold_pick(mass, 0.5))


@pytest.mark.parametrize("kernel", ["bags", "looped", "masked"])  # grouped_mm takes no float64 (tests/test_cuda.py: GPU)
def test_every_kernel_reads_the_weights_the_layer_was_moved_to(kernel):
    """.to() replaces the parameters (another dtype here, a GPU elsewhere): no kernel may keep
    reading views of the old ones."""
    ffn = synthetic_ffn(16, 96, gated=True, bias=True, act=nn.SiLU())
    labels = torch.arange(96) % 12
    moe = MoEFFN(ffn, labels, MLPRouter(16, 12), 12).to(torch.float64)
    for linear in (ffn.w_in, ffn.w_gate, ffn.w_out):
        linear.double()
    x, picked = torch.randn(30, 16, dtype=torch.float64), torch.rand(30, 12) < 0.4
    with torch.no_grad():
        got = moe.experts_forward(x, picked, kernel=kernel)
        torch.testing.assert_close(got, masked_dense(ffn, x, picked.double(), labels), rtol=1e-10, atol=1e-10)


def test_an_unknown_kernel_is_a_clear_error_naming_the_kernels():
    moe = MoEFFN(synthetic_ffn(16, 96, False, True, nn.ReLU()), torch.arange(96) % 12, MLPRouter(16, 12), 12)
    with pytest.raises(MoefyError, match="no MoE kernel 'mixed': choose one of bags, looped, grouped, masked or 'auto'"):
        moe.experts_forward(torch.randn(4, 16), torch.ones(4, 12, dtype=torch.bool), kernel="mixed")
