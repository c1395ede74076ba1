from pathlib import Path

import pytest

from largebatch.data.digits import write_digits


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> Path:
    """A real ImageFolder: 400 of scikit-learn's digits as 16-pixel JPEGs (320 train, 80 val)."""
    root = tmp_path_factory.mktemp("digits")
    write_digits(root, size=16, val_fraction=0.2, seed=0, limit=400)
    return root


@pytest.fixture(scope="session")
def digits_odd(tmp_path_factory) -> Path:
    """Validation set of 77 images: not divisible by 2 ranks nor by the batch size."""
    root = tmp_path_factory.mktemp("digits_odd")
    write_digits(root, size=16, val_fraction=77 / 300, seed=1, limit=300)
    return root


@pytest.fixture(params=["horovod", "torch"])
def engine(request) -> str:
    """Tests of behaviour both engines must have take this and run once on each."""
    return request.param
