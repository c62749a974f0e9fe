"""The epoch loop that finetune and train_moe share (moefy.training.loop), on a tiny BERT classifier
and 20 texts (3 batches of at most 8 per epoch): it keeps the best epoch's weights, stops at
total_steps, trains what the objective returns, and reports per-epoch means of the task loss and
of the objective's terms, the tokens seen, the history and the MLflow log."""

from __future__ import annotations

import random

import pytest
import torch

from builders import FILLER, NEGATIVE, POSITIVE
from moefy import dist
from moefy.adapters.models import load_model, load_tokenizer
from moefy.adapters.tasks import get_task
from moefy.data.batches import Encoded
from moefy.training import loop

CPU = dist.Context(rank=0, world_size=1, device=torch.device("cpu"))
TEXTS = 20


@pytest.fixture()
def tiny(tiny_relu_bert):
    rng = random.Random(0)
    labels = [i % 2 for i in range(TEXTS)]
    texts = [" ".join(rng.choices(FILLER, k=rng.randint(1, 6)) + rng.choices(NEGATIVE if y else POSITIVE, k=2)) for y in labels]
    torch.manual_seed(0)
    model = load_model(str(tiny_relu_bert), label_names=["fresh", "rotten"])
    return model, Encoded(load_tokenizer(str(tiny_relu_bert)), texts, max_length=16), torch.tensor(labels)


def run(model, data, labels, objective, measure, total_steps, epochs=3, before=None, log_steps=False, patience=None):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    logged, paused = [], []
    trained = loop.train_epochs(
        model, get_task("classification"), data, labels, CPU, optimizer, scheduler, name="test", epochs=epochs,
        total_steps=total_steps, batch_size=8, seed=0, objective=objective, measure=measure,
        log=lambda metrics, step: logged.append((dict(metrics), step)), pause=paused.append, before=before, log_steps=log_steps,
        patience=patience,
    )  # fmt: skip
    return trained, scheduler, logged, paused


def test_the_best_epoch_is_kept_and_each_epoch_reports_its_own_means(tiny, monkeypatch):
    model, data, labels = tiny
    monkeypatch.setattr(loop, "LOG_EVERY", 2)
    seen = []  # per step: (epoch, task loss per item, the objective's term, tokens of the batch)
    epochs, states = [], {}
    scores = {1: 0.5, 2: 0.9, 3: 0.7}  # the second epoch is the best

    def objective(batch):
        per_item = batch.task_loss.item() / batch.scale / len(batch)
        seen.append((len(epochs) + 1, per_item, 10.0 * batch.step, int(batch.inputs["attention_mask"].sum())))
        return batch.task_loss, {"term": 10.0 * batch.step}

    def measure(epoch):
        epochs.append(epoch)
        states[epoch.number] = {k: v.clone() for k, v in model.state_dict().items()}
        return {"validation_accuracy": scores[epoch.number], "epoch_seconds": epoch.seconds, "load/layer_0": 1.0}

    trained, scheduler, logged, paused = run(
        model, data, labels, objective, measure, total_steps=100, before=lambda: {"validation_accuracy": 0.1}, log_steps=True
    )
    assert (trained.best, trained.best_epoch, trained.steps) == (0.9, 2, 9) and scheduler.last_epoch == 9
    assert all(torch.equal(v, states[2][k]) for k, v in model.state_dict().items()), "the best epoch's weights"
    assert not all(torch.equal(v, states[3][k]) for k, v in model.state_dict().items())
    assert paused == ["test epoch 1", "test epoch 2", "test epoch 3"]
    for epoch in epochs:
        mine = [s for s in seen if s[0] == epoch.number]
        assert len(mine) == 3
        assert epoch.means["task"] == pytest.approx(sum(s[1] for s in mine) / 3, rel=1e-5)
        assert epoch.means["term"] == pytest.approx(sum(s[2] for s in mine) / 3)
        assert epoch.tokens == sum(s[3] for s in seen if s[0] <= epoch.number) == int(data.lengths.sum()) * epoch.number
    assert trained.tokens == epochs[-1].tokens
    assert [(h["epoch"], h["steps"], h["validation_accuracy"]) for h in trained.history] == [
        (0, 0, 0.1),
        (1, 3, 0.5),
        (2, 6, 0.9),
        (3, 9, 0.7),
    ]
    assert all("load/layer_0" not in h for h in trained.history), "per-layer metrics go to MLflow only"
    epoch_logs = [(m, step) for m, step in logged if "train_loss" not in m]
    assert [step for _, step in epoch_logs] == [0, 1, 2, 3] and epoch_logs[2][0]["load/layer_0"] == 1.0
    curve = [(m["train_loss"], step) for m, step in logged if "train_loss" in m]
    assert [step for _, step in curve] == [2, 4, 6, 8]
    assert [loss for loss, _ in curve] == pytest.approx([seen[step - 1][1] for _, step in curve], rel=1e-5)


def test_training_stops_at_total_steps_and_trains_what_the_objective_returns(tiny):
    model, data, labels = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []

    def nothing(batch):  # no gradient reaches any weight
        calls.append(batch.step)
        return 0.0 * batch.task_loss, {}

    trained, scheduler, logged, paused = run(
        model, data, labels, nothing, lambda epoch: {"validation_accuracy": 0.5}, total_steps=5
    )
    assert trained.steps == calls[-1] + 1 == 5 and scheduler.last_epoch == 5
    assert [h["steps"] for h in trained.history] == [3, 5] and paused == ["test epoch 1", "test epoch 2"]
    assert trained.best_epoch == 1, "a tie keeps the earlier epoch"
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    untrained, *_ = run(model, data, labels, nothing, lambda epoch: {"validation_accuracy": 0.5}, total_steps=5, epochs=0)
    assert (untrained.best, untrained.best_epoch, untrained.steps, untrained.history) == (None, 0, 0, [])


def test_patience_stops_training_after_that_many_epochs_without_a_better_one(tiny):
    model, data, labels = tiny
    scores = {1: 0.6, 2: 0.8, 3: 0.7, 4: 0.8, 5: 0.9, 6: 1.0}  # epoch 2 best, then two epochs no better (a tie is none)

    def measure(epoch):
        return {"validation_accuracy": scores[epoch.number]}

    trained, _, _, paused = run(model, data, labels, lambda b: (b.task_loss, {}), measure, total_steps=100, epochs=6, patience=2)
    assert (trained.epochs_run, trained.best_epoch, trained.steps) == (4, 2, 12)
    assert paused == [f"test epoch {n}" for n in (1, 2, 3, 4)], "the fifth epoch never starts"
    assert not trained.stopped_at_cap, "patience ended it, not the cap"
    unlimited, *_ = run(model, data, labels, lambda b: (b.task_loss, {}), measure, total_steps=100, epochs=6)
    assert (unlimited.epochs_run, unlimited.best_epoch) == (6, 6), "without patience only the cap stops it"


@pytest.mark.parametrize(
    ("start", "scores", "total_steps", "capped"),
    [
        (None, {1: 0.6, 2: 0.7, 3: 0.8}, 100, True),  # the epoch cap ended it, still improving
        (0.5, {1: 0.6, 2: 0.7, 3: 0.8}, 100, True),
        (None, {1: 0.6, 2: 0.7}, 5, True),  # the step cap ended it in epoch 2, its best
        (None, {1: 0.6, 2: 0.8, 3: 0.7}, 100, False),  # its best epoch came before the last
        (0.9, {1: 0.6, 2: 0.7, 3: 0.8}, 100, False),  # the last epoch never beat the model before training
    ],
)
def test_a_run_whose_last_epoch_beat_everything_before_it_stopped_at_its_cap(tiny, start, scores, total_steps, capped):
    model, data, labels = tiny
    before = None if start is None else (lambda: {"validation_accuracy": start})
    trained, *_ = run(
        model, data, labels, lambda b: (b.task_loss, {}), lambda e: {"validation_accuracy": scores[e.number]},
        total_steps=total_steps, before=before, patience=2,
    )  # fmt: skip
    assert trained.epochs_run == len(scores)
    assert trained.stopped_at_cap is capped
