import pytest
import torch
from torch import nn

from moefy.adapters.ffn import FFN
from moefy.conversion.routers import (
    LOSSES,
    GroundTruthRouter,
    MLPRouter,
    NormRouter,
    RouterSettings,
    SimilarityRouter,
    budget_to_k,
    build_routers,
    expert_centroids,
    expert_mass,
    expert_output_norms,
    fit_router,
    representative_router,
    router_tensors,
    scaled_mass,
    topk_recall,
    train_router,
)
from moefy.errors import MoefyError


def synthetic_layer(n=3000, d=16, d_ff=64, E=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    w_in = torch.randn(d_ff, d, generator=g)
    labels = torch.arange(d_ff) % E
    x = torch.randn(n, d, generator=g)
    return x, w_in, labels, E


def test_expert_centroids_are_means_of_normalised_rows():
    _, w_in, labels, E = synthetic_layer()
    c = expert_centroids(w_in, labels, E)
    rows = torch.nn.functional.normalize(w_in, dim=1)
    torch.testing.assert_close(c[3], rows[labels == 3].mean(0))


def test_recall_is_one_for_the_oracle_and_lower_for_noise():
    x, w_in, labels, E = synthetic_layer()
    mass = expert_mass(torch.relu(x @ w_in.t()), labels, E)
    assert topk_recall(mass, mass, 2) == 1.0
    assert topk_recall(torch.randn(mass.shape), mass, 2) < 0.9


def test_scaled_mass_is_in_unit_interval():
    target = scaled_mass(torch.tensor([[0.0, 2.0, 4.0], [0.0, 0.0, 0.0]]))
    assert torch.equal(target, torch.tensor([[0.0, 0.5, 1.0], [0.0, 0.0, 0.0]]))


def test_mlp_router_learns_better_than_its_similarity_start():
    x, w_in, labels, E = synthetic_layer()
    h = torch.relu(x @ w_in.t() + 0.5)
    mass = expert_mass(h, labels, E)
    c = expert_centroids(w_in, labels, E)
    fit = train_router(
        MLPRouter(16, E, c),
        LOSSES["mlp"],
        x[:2500],
        scaled_mass(mass[:2500]),
        x[2500:],
        scaled_mass(mass[2500:]),
        epochs=40,
        batch_size=256,
        learning_rate=3e-3,
        patience=5,
        seed=0,
    )
    assert fit.best_heldout_loss < fit.initial_heldout_loss
    similarity = SimilarityRouter(c)(x[2500:])
    with torch.no_grad():
        learned = fit.router(x[2500:])
    assert topk_recall(learned, mass[2500:], 2) > topk_recall(similarity, mass[2500:], 2)


def test_mlp_router_starts_as_the_similarity_ranking():
    x, w_in, labels, E = synthetic_layer()
    c = expert_centroids(w_in, labels, E)
    with torch.no_grad():
        assert torch.equal(MLPRouter(16, E, c)(x).argsort(-1), SimilarityRouter(c)(x).argsort(-1))


def test_routers_round_trip_through_tensors():
    x, w_in, labels, E = synthetic_layer()
    c = expert_centroids(w_in, labels, E)
    routers = [
        ("similarity", SimilarityRouter(c)),
        ("mlp", MLPRouter(16, E)),
        ("groundtruth", GroundTruthRouter(labels, E)),
        ("norm", NormRouter(16, E, hidden=24)),
    ]
    for name, router in routers:
        rebuilt = build_routers(name, router_tensors({0: router}), {0: labels}, E)[0]
        h = torch.relu(x @ w_in.t())
        with torch.no_grad():
            assert torch.equal(rebuilt(x, h), router(x, h))


def test_budget_to_k():
    assert [budget_to_k(b, 48) for b in (0.01, 0.1, 0.2, 0.25, 0.5, 1.0)] == [1, 5, 10, 12, 24, 48]


def test_expert_output_norms_are_the_norms_of_each_experts_output():
    x, w_in, labels, E = synthetic_layer(n=50)
    labels = torch.randperm(64, generator=torch.Generator().manual_seed(3)) % E
    h = torch.relu(x @ w_in.t())
    w_out = torch.randn(16, 64)
    expected = torch.stack([(h[:, labels == e] @ w_out[:, labels == e].t()).norm(dim=-1) for e in range(E)], dim=-1)
    torch.testing.assert_close(expert_output_norms(h, w_out, labels, E), expected)
    torch.testing.assert_close(expert_output_norms(h, w_out, labels, E, chunk_floats=1), expected)  # one token per chunk


def test_norm_router_learns_the_expert_output_norms():
    x, w_in, labels, E = synthetic_layer()
    h = torch.relu(x @ w_in.t() - 0.5)
    norms = expert_output_norms(h, torch.randn(16, 64), labels, E)
    target = norms / norms.mean()
    torch.manual_seed(0)
    fit = train_router(
        NormRouter(16, E, hidden=64),
        LOSSES["norm"],
        x[:2500],
        target[:2500],
        x[2500:],
        target[2500:],
        epochs=40,
        batch_size=256,
        learning_rate=3e-3,
        patience=5,
        seed=0,
    )
    assert fit.best_heldout_loss < 0.5 * fit.initial_heldout_loss
    with torch.no_grad():
        predicted = fit.router(x[2500:])
    assert predicted.min() >= 0
    assert topk_recall(predicted, norms[2500:], 2) > topk_recall(torch.rand(predicted.shape), norms[2500:], 2) + 0.1


def test_every_router_gives_non_negative_contributions():
    x, w_in, labels, E = synthetic_layer(n=200)
    c = expert_centroids(w_in, labels, E)
    h = torch.relu(x @ w_in.t())
    for router in (SimilarityRouter(c), MLPRouter(16, E, c), GroundTruthRouter(labels, E), NormRouter(16, E)):
        with torch.no_grad():
            assert router.contribution(x, h).min() >= 0, type(router).__name__


def planted_ffn(d=16, d_ff=64, E=8, gated=False, seed=0) -> tuple[FFN, torch.Tensor]:
    """An FFN whose every expert has one loud neuron (rows 32x the others): its |h| decides the
    expert's mass, so the representative router should rank experts as the oracle does."""
    torch.manual_seed(seed)
    labels = torch.randperm(d_ff) % E
    w_in, w_out = nn.Linear(d, d_ff), nn.Linear(d_ff, d)
    w_gate = nn.Linear(d, d_ff) if gated else None
    with torch.no_grad():
        quiet = torch.ones(d_ff)
        for e in range(E):
            quiet[(labels == e).nonzero()[0]] = 32.0  # the first neuron of each expert is loud
        for linear in (w_in,) if w_gate is None else (w_in, w_gate):
            linear.weight.mul_(quiet[:, None] / 32)
            linear.bias.zero_()
    return FFN(0, w_in, nn.ReLU() if not gated else nn.SiLU(), w_out, lambda m: None, w_gate=w_gate), labels


@pytest.mark.parametrize("gated", [False, True])
def test_the_representative_router_reproduces_the_oracles_top_k_on_a_planted_case(gated):
    ffn, labels = planted_ffn(gated=gated)
    E, x = 8, torch.randn(4000, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        router = representative_router(ffn, labels, E, ffn.activations(x[:3000]), per_expert=1)
    loud = torch.tensor([(labels == e).nonzero()[0].item() for e in range(E)])
    chosen = [int(((ffn.w_in.weight - row).abs().sum(1) == 0).nonzero()[0]) for row in router.w_in]
    assert chosen == loud.tolist(), "each expert's representative is its loud neuron"
    with torch.no_grad():
        oracle = expert_mass(ffn.activations(x[3000:]), labels, E)
        scores = router(x[3000:])
    assert topk_recall(scores, oracle, 2) > 0.97
    agree = (scores.topk(2).indices.sort().values == oracle.topk(2).indices.sort().values).all(-1).float().mean()
    assert agree > 0.85
    assert router.flops_per_token() == 2 * E * 16 * (2 if gated else 1) + 2 * E


def test_the_representative_routers_scale_makes_its_score_the_experts_mass():
    """One neuron per expert (size 1): the representative is the expert, and the scale is 1."""
    ffn, labels = planted_ffn(d_ff=8, E=8)
    x = torch.randn(500, 16)
    with torch.no_grad():
        router = representative_router(ffn, labels, 8, ffn.activations(x), per_expert=1)
    torch.testing.assert_close(router.scale, torch.ones(8))
    with torch.no_grad():
        torch.testing.assert_close(router(x), expert_mass(ffn.activations(x), labels, 8), rtol=1e-5, atol=1e-5)


def test_the_representative_router_round_trips_and_fits_through_fit_router():
    ffn, labels = planted_ffn(gated=True)
    x = torch.randn(2000, 16)
    router, stats = fit_router("representative", ffn, labels, x, 8, RouterSettings(representatives=2), [0.25], seed=0)
    assert router.w_in.shape == (16, 16) and router.w_gate.shape == (16, 16)
    assert stats["recall@0.25"] > 0.9 and "epochs_run" not in stats, "no training"
    rebuilt = build_routers("representative", router_tensors({0: router}), {0: labels}, 8)[0]
    with torch.no_grad():
        assert torch.equal(rebuilt(x), router(x)) and rebuilt.contribution(x).min() >= 0


def test_the_representative_router_refuses_what_it_cannot_compute():
    ffn, labels = planted_ffn()
    with pytest.raises(MoefyError, match="between 1 and the expert size 8"):
        representative_router(ffn, labels, 8, torch.zeros(10, 64), per_expert=9)
    ffn.act = nn.Tanh()
    with pytest.raises(MoefyError, match="Tanh is not one the representative router computes"):
        representative_router(ffn, labels, 8, torch.zeros(10, 64), per_expert=1)


def test_a_router_whose_last_epoch_was_its_best_stopped_at_its_cap():
    x, w_in, labels, E = synthetic_layer(n=1200)
    mass = scaled_mass(expert_mass(torch.relu(x @ w_in.t() + 0.5), labels, E))

    def fit(epochs, learning_rate, patience=2):
        torch.manual_seed(0)
        router = MLPRouter(16, E, expert_centroids(w_in, labels, E))
        return train_router(
            router, LOSSES["mlp"], x[:1000], mass[:1000], x[1000:], mass[1000:], epochs=epochs, batch_size=100,
            learning_rate=learning_rate, patience=patience, seed=0,
        )  # fmt: skip

    capped = fit(epochs=2, learning_rate=1e-3)  # far from converged: every epoch improves
    assert (capped.epochs_run, capped.best_epoch) == (2, 2) and capped.stopped_at_cap
    diverged = fit(epochs=20, learning_rate=50.0, patience=1)  # no epoch beats the start: patience ends it
    assert diverged.best_epoch == 0 and diverged.epochs_run == 1 and not diverged.stopped_at_cap


def test_fit_router_records_whether_a_trained_router_stopped_at_its_cap():
    ffn, labels = planted_ffn()
    x = torch.randn(1000, 16, generator=torch.Generator().manual_seed(2))
    _, stats = fit_router("norm", ffn, labels, x, 8, RouterSettings(mlp_epochs=1, mlp_batch_size=100), [0.25], seed=0)
    assert stats["stopped_at_cap"] is (stats["best_epoch"] == stats["epochs_run"] == 1) is True
    _, untrained = fit_router("similarity", ffn, labels, x, 8, RouterSettings(), [0.25], seed=0)
    assert "stopped_at_cap" not in untrained, "nothing trained, nothing capped"
