"""Shared test fixtures; the constants and plain helpers they build on are in tests/helpers.py."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import DIGITS


@pytest.fixture
def keep_threads() -> Iterator[None]:
    """Restores torch's intra-op thread count, for tests of code that sets it (benchmarks, latency)."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def digits_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The working folder, holding a copy of specs/digits.cstar (for recipes that extend it by its short name)."""
    shutil.copy(DIGITS, tmp_path / "digits.cstar")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "200")  # a wide table, so that layer names are not cut
    return tmp_path
