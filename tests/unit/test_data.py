"""The resumable sampler: one global order per (seed, epoch), O(1) resume, world-size changes."""

from __future__ import annotations

import itertools
from collections import Counter

import torch

from disttrain.data import DataCursor, ResumableBatchSampler, ShardedEvalBatches, advance, epoch_order


def sampler(n=100, batch=12, rank=0, world=1, accum=1, seed=0, start=None, shuffle=True):
    start = start or DataCursor()
    return ResumableBatchSampler(n, batch, rank=rank, world_size=world, grad_accum=accum, seed=seed,
                                 shuffle=shuffle, start=start)  # fmt: skip


def step_batches(n, batch, world, accum, start, steps, seed=0):
    """What every rank consumes in `steps` optimizer steps: list (per step) of list (per rank) of ids."""
    iters = [iter(sampler(n, batch, r, world, accum, seed, start)) for r in range(world)]
    return [[sum((next(it) for _ in range(accum)), []) for it in iters] for _ in range(steps)]


def test_epoch_order_is_a_seeded_permutation():
    a, b = epoch_order(50, seed=1, epoch=0, shuffle=True), epoch_order(50, seed=1, epoch=0, shuffle=True)
    assert torch.equal(a, b) and sorted(a.tolist()) == list(range(50))
    assert not torch.equal(a, epoch_order(50, seed=1, epoch=1, shuffle=True)), "reshuffled every epoch"
    assert not torch.equal(a, epoch_order(50, seed=2, epoch=0, shuffle=True))
    assert epoch_order(5, seed=1, epoch=3, shuffle=False).tolist() == [0, 1, 2, 3, 4]


def test_a_step_splits_the_global_batch_over_ranks_and_microbatches():
    (step,) = step_batches(n=100, batch=12, world=2, accum=3, start=DataCursor(), steps=1)
    everything = step[0] + step[1]
    assert len(everything) == 12 and len(set(everything)) == 12
    assert set(everything) == set(epoch_order(100, 0, 0, True)[:12].tolist())


def test_every_sample_once_per_epoch_up_to_the_remainder():
    n, batch = 100, 12
    steps = step_batches(n, batch, world=2, accum=2, start=DataCursor(), steps=n // batch)
    seen = Counter(i for step in steps for rank in step for i in rank)
    assert max(seen.values()) == 1 and len(seen) == (n // batch) * batch


def test_resume_from_cursor_continues_the_same_stream():
    n, batch, world, accum = 100, 12, 2, 2
    full = step_batches(n, batch, world, accum, DataCursor(), steps=20)
    cursor = DataCursor()
    for _ in range(11):  # crosses the epoch boundary at step 8
        cursor = advance(cursor, batch, n)
    assert cursor == DataCursor(epoch=1, offset=3 * batch)
    resumed = step_batches(n, batch, world, accum, cursor, steps=9)
    assert resumed == full[11:]


def test_world_size_change_repeats_or_skips_nothing():
    n, batch = 96, 16
    first = step_batches(n, batch, world=2, accum=1, start=DataCursor(), steps=2)
    cursor = advance(advance(DataCursor(), batch, n), batch, n)
    rest = step_batches(n, batch, world=1, accum=2, start=cursor, steps=n // batch - 2)
    seen = Counter(i for seg in (first, rest) for step in seg for rank in step for i in rank)
    assert sorted(seen) == list(range(n)) and set(seen.values()) == {1}


def test_resume_is_o1():
    # Starting deep into epoch 10**6 must not iterate through earlier data.
    it = iter(sampler(n=1000, batch=10, start=DataCursor(epoch=10**6, offset=500)))
    assert next(it) == epoch_order(1000, 0, 10**6, True)[500:510].tolist()


def test_eval_sharding_covers_each_sample_once_with_equal_batch_counts():
    n, batch, world = 103, 20, 4
    shards = [list(ShardedEvalBatches(n, batch, r, world)) for r in range(world)]
    assert len({len(s) for s in shards}) == 1, "same number of batches on every rank"
    ids = list(itertools.chain.from_iterable(itertools.chain.from_iterable(shards)))
    assert sorted(ids) == list(range(n))


def test_tensor_datasets_are_gathered_whole_with_the_same_values():
    from torch.utils.data import TensorDataset
    from torch.utils.data._utils.collate import default_collate

    from disttrain.data import make_loader

    x, y = torch.randn(50, 1, 8, 8), torch.arange(50)
    ds = TensorDataset(x, y)
    batches = ShardedEvalBatches(50, 16, rank=0, world_size=2)  # 8-sample slices, the last one short
    fast = list(make_loader(ds, batches, num_workers=0, pin=False))
    slow = [default_collate([ds[i] for i in ids]) for ids in batches]
    assert len(fast) == len(slow) == 4 and len(fast[-1][0]) == 2
    for (fx, fy), (sx, sy) in zip(fast, slow):
        assert torch.equal(fx, sx) and torch.equal(fy, sy)
    # A rank whose slice is empty gets None, as before.
    assert list(make_loader(ds, ShardedEvalBatches(50, 16, rank=1, world_size=2), 0, False))[-1] is None
