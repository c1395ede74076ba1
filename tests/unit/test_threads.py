"""CPU threads per process: --threads, else OMP_NUM_THREADS as given (PyTorch alone caps it
at the core count)."""

import os

import pytest
import torch

from largebatch.config import UsageError, parse_config
from largebatch.job import configure_threads


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_omp_num_threads_is_honoured_above_the_core_count(monkeypatch, threads):
    wanted = (os.cpu_count() or 1) + 2
    monkeypatch.setenv("OMP_NUM_THREADS", str(wanted))
    configure_threads(None)
    assert torch.get_num_threads() == wanted
    configure_threads(3)  # the flag wins
    assert torch.get_num_threads() == 3


@pytest.mark.parametrize("value", ["", "0", "two", "4,2"])
def test_unusable_omp_num_threads_leaves_pytorch_as_it_is(monkeypatch, threads, value):
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", value)
    configure_threads(None)
    assert torch.get_num_threads() == 1


def test_flag(tmp_path):
    base = ["--train-dir", str(tmp_path), "--val-dir", str(tmp_path)]
    assert parse_config(base + ["--threads", "6"]).numerics.threads == 6
    assert parse_config(base).numerics.threads is None
    with pytest.raises(UsageError, match="--threads"):
        parse_config(base + ["--threads", "0"])
