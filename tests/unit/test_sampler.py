"""The rank shards of largebatch/data/sampler.py, every rank's built in this one process:
what the mpirun tests rely on (each sample once per epoch, equal step counts, exact resume)
checked directly, for many sizes, without starting any job."""

from __future__ import annotations

import itertools

import pytest
import torch

from largebatch.data.sampler import TrainShard, ValShard, mix, sample_seed

SEED, EPOCH = 3, 2


def shards(num_samples: int, size: int, seed: int = SEED, epoch: int = EPOCH) -> list[list[int]]:
    return [[i for i, _ in TrainShard(num_samples, rank, size, seed, epoch)] for rank in range(size)]


@pytest.mark.parametrize("num_samples, size", [(103, 1), (103, 2), (103, 3), (100, 4), (7, 7), (50, 8)])
def test_train_shards_are_disjoint_equal_and_cover_all_but_the_remainder(num_samples, size):
    parts = shards(num_samples, size)
    per_rank = num_samples // size
    assert [len(p) for p in parts] == [per_rank] * size, "every rank must run the same number of steps"
    assert [len(TrainShard(num_samples, r, size, SEED, EPOCH)) for r in range(size)] == [per_rank] * size
    used = [i for p in parts for i in p]
    assert len(set(used)) == len(used), "a sample was given to two ranks (or twice to one)"
    assert set(used) <= set(range(num_samples))
    assert num_samples - len(used) == num_samples % size, "more than the remainder sat out"


def test_the_epoch_order_depends_on_seed_and_epoch_not_on_the_number_of_ranks():
    full = shards(103, 1)[0]
    for size in (2, 3, 5):
        # Rank r reads the r-th cut of the one permutation: concatenated, the shards are its prefix.
        assert list(itertools.chain(*shards(103, size))) == full[: 103 // size * size]
    assert shards(103, 1) == shards(103, 1), "the same (seed, epoch) must give the same order"
    assert shards(103, 1, epoch=EPOCH + 1) != shards(103, 1), "each epoch needs a new order"
    assert shards(103, 1, seed=SEED + 1) != shards(103, 1), "another --seed needs another order"
    assert sorted(full) == list(range(103))


@pytest.mark.parametrize("size, start", [(1, 0), (1, 40), (2, 17), (3, 33), (3, 34)])
def test_resuming_from_a_position_continues_the_same_order(size, start):
    for rank in range(size):
        whole = list(TrainShard(103, rank, size, SEED, EPOCH))
        resumed = TrainShard(103, rank, size, SEED, EPOCH, start=start)
        assert list(resumed) == whole[start:], f"rank {rank} resumed at {start} reads another order"
        assert len(resumed) == len(whole) - start


def test_sample_seeds_depend_only_on_seed_epoch_and_index():
    seen: dict[int, int] = {}
    for size, start in [(1, 0), (2, 0), (3, 5), (4, 11)]:
        for rank in range(size):
            for index, seed in TrainShard(103, rank, size, SEED, EPOCH, start=start):
                assert seed == sample_seed(SEED, EPOCH, index)
                # Whichever rank count, rank or resume position read it: the same crop.
                assert seen.setdefault(index, seed) == seed
    grid = {sample_seed(s, e, i) for s in range(3) for e in range(4) for i in range(200)}
    assert len(grid) == 3 * 4 * 200, "two different (seed, epoch, index) got the same sample seed"
    assert all(0 <= s < 2**63 for s in grid)


def test_seeds_are_those_runs_before_the_shared_mixer_used():
    """A checkpoint holds a position in an epoch's order, not the order: resuming a run
    started before the seed mixer was shared must see the very same order and crops."""
    assert mix(SEED, EPOCH) == SEED * 1_000_003 + EPOCH
    assert sample_seed(SEED, EPOCH, 57) == ((SEED * 1_000_003 + EPOCH) * 1_000_003 + 57) % 2**63
    before = torch.randperm(103, generator=torch.Generator().manual_seed(SEED * 1_000_003 + EPOCH)).tolist()
    assert shards(103, 1)[0] == before


@pytest.mark.parametrize("num_samples, size", [(77, 2), (77, 3), (80, 4), (5, 8), (1, 1)])
def test_validation_shards_read_every_image_exactly_once_without_padding(num_samples, size):
    parts = [list(ValShard(num_samples, rank, size)) for rank in range(size)]
    indices = sorted(i for p in parts for i, _ in p)
    assert indices == list(range(num_samples)), "validation must see every image once, none twice"
    lengths = [len(ValShard(num_samples, rank, size)) for rank in range(size)]
    assert lengths == [len(p) for p in parts] and max(lengths) - min(lengths) <= 1
    assert all(seed == 0 for p in parts for _, seed in p), "validation is not augmented"
