"""One tiny Keras training per test session, shared by the training and evaluation tests."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_run() -> Iterator[dict]:
    """A 2-class, 32-px model trained for 1+1 epochs on hand-made cells; removed afterwards."""
    pytest.importorskip("tensorflow")
    from tests.training.tiny_data import train_tiny

    with tempfile.TemporaryDirectory(prefix="hv_tiny_") as tmp:
        yield train_tiny(Path(tmp))
