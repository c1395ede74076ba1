"""Model-parallel flags and the shard layout (no MPI needed)."""

import pytest

from largebatch.config import UsageError, parse_config
from largebatch.parallel import shard_range, shard_sizes

BASE = ["--synthetic", "--model", "resnet18", "--epochs", "10"]


@pytest.mark.parametrize("total, parts", [(10, 2), (7, 2), (1_000_000, 3), (2048, 7), (5, 5)])
def test_shards_cover_everything_once_first_ranks_larger(total, parts):
    sizes = shard_sizes(total, parts)
    assert sum(sizes) == total and max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    ranges = [shard_range(total, parts, r) for r in range(parts)]
    assert ranges[0][0] == 0 and ranges[-1][1] == total
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))


def test_flags():
    cfg = parse_config(BASE + ["--enable-model-parallel", "--num-classes", "1000000"])
    assert cfg.dist.enable_model_parallel and cfg.dist.model_parallel_dim == 1 and cfg.data.num_classes == 1_000_000
    assert parse_config(BASE + ["--enable-model-parallel", "--model-parallel-dim", "0"]).dist.model_parallel_dim == 0
    assert not parse_config(BASE).dist.enable_model_parallel


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model-parallel-dim", "0"], "only with --enable-model-parallel"),
        (["--enable-model-parallel", "--model-parallel-dim", "2"], "invalid choice"),
        (["--enable-model-parallel", "--use-adasum"], "--use-adasum"),
        (["--enable-model-parallel", "--precision", "amp"], "loss scaling"),
        (["--enable-model-parallel", "--opt-level", "O2"], "loss scaling"),
    ],
)
def test_combinations_that_make_no_sense(argv, message):
    with pytest.raises(UsageError, match=message):
        parse_config(BASE + argv)
