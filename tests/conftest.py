"""Shared by every test. This file also makes pytest (import mode "prepend", pinned in
pyproject.toml) put tests/ on sys.path, which is how test modules import tests/helpers.py.
largebatch, lars and schedulers come from the editable install (tools/setup.sh)."""

import pytest


def pytest_runtest_setup(item):
    # A test marked gpu needs CUDA; on machines without it, it skips and says so rather
    # than failing. Imported here, not at the top: collecting the suite needs no torch.
    if item.get_closest_marker("gpu") is not None:
        import torch

        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU")
