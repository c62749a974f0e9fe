"""Length-grouped batches (evaluation order, seeded training order) and their shards over ranks."""

import numpy as np
import pytest

from moefy.data.batches import length_grouped_batches, shard_batches


def test_eval_batches_are_sorted_by_length():
    lengths = np.random.default_rng(0).integers(1, 100, 103)
    batches = length_grouped_batches(lengths, 10)
    order = np.concatenate(batches)
    assert sorted(order.tolist()) == list(range(103))
    assert np.all(np.diff(lengths[order]) >= 0)
    assert [len(b) for b in batches] == [10] * 10 + [3]


def test_train_batches_cover_every_index_once_and_depend_on_seed():
    lengths = np.random.default_rng(0).integers(1, 500, 1001)
    a = length_grouped_batches(lengths, 8, seed=1, pool=4)
    b = length_grouped_batches(lengths, 8, seed=1, pool=4)
    c = length_grouped_batches(lengths, 8, seed=2, pool=4)
    assert sorted(np.concatenate(a).tolist()) == list(range(1001))
    assert all(len(x) <= 8 for x in a)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))

    # grouping by length keeps padding well below that of random batches
    def spread(batches):
        return np.mean([lengths[x].max() - lengths[x].min() for x in batches])

    random_batches = np.array_split(np.random.default_rng(1).permutation(1001), 126)
    assert spread(a) < spread(random_batches) / 2


def test_empty_lengths_give_no_batches():
    assert length_grouped_batches([], 4) == []
    assert length_grouped_batches([], 4, seed=0) == []


@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_shard_batches_partition_each_batch(world_size):
    batches = length_grouped_batches(np.arange(50), 7, seed=0)
    shards = [shard_batches(batches, r, world_size) for r in range(world_size)]
    for i, batch in enumerate(batches):
        parts = [shards[r][i] for r in range(world_size)]
        assert np.array_equal(np.concatenate(parts), batch)
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
