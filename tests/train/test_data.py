"""Data stage: digits split, MNIST from IDX files in torchvision's layout, clear errors."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import torch

from cstar_dsl.lang.problems import SpecProblem
from cstar_dsl.lang.validate import check_file, load_spec
from cstar_dsl.train.data import datasets
from tests.helpers import DIGITS, MNIST, SHARED_DATA, line_of, variant

SHARED_MNIST = SHARED_DATA / "mnist-10k"


def _recipe(tmp_path: Path, data: str, seed: int = 0) -> Path:
    """specs/digits.cstar with these `data` lines and seed; for MNIST, the input and split MNIST has."""
    model = ""
    if "dataset = mnist" in data:  # the model's input must be what the data set delivers
        model, data = "model {\n  input = [1, 28, 28]\n}\n\n", data + "  split = official\n"
    return variant(tmp_path, DIGITS, f"{model}data {{\n{data}}}\n\ntrain {{\n  seed = {seed}\n}}\n")


def _write_idx(folder: Path, prefix: str, images: torch.Tensor, labels: torch.Tensor) -> None:
    """MNIST's IDX format: big-endian magic 2051 (images) / 2049 (labels), then sizes, then bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    count, rows, cols = images.shape
    (folder / f"{prefix}-images-idx3-ubyte").write_bytes(
        struct.pack(">IIII", 2051, count, rows, cols) + images.to(torch.uint8).numpy().tobytes())
    (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(
        struct.pack(">II", 2049, count) + labels.to(torch.uint8).numpy().tobytes())


def _tiny_mnist(root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (12, 28, 28), generator=generator)
    labels = torch.arange(12) % 10
    _write_idx(root / "MNIST" / "raw", "train", images, labels)
    _write_idx(root / "MNIST" / "raw", "t10k", images[:5], labels[:5])
    return images, labels


def test_digits_split_is_seeded_and_in_unit_range(tmp_path):
    first = datasets(load_spec(DIGITS))
    again = datasets(load_spec(DIGITS))
    other = datasets(load_spec(_recipe(tmp_path, "  dataset = digits\n", seed=1)))
    assert (len(first.train), len(first.test)) == (1438, 359)  # 80% of 1,797
    assert torch.equal(first.train.tensors[1], again.train.tensors[1])
    assert not torch.equal(first.train.tensors[1], other.train.tensors[1])
    images = first.train.tensors[0]
    assert images.shape[1:] == (1, 8, 8) and images.min() == 0 and images.max() == 1


def test_digits_split_share(tmp_path):
    sets = datasets(load_spec(_recipe(tmp_path, "  split = 50%\n")))
    assert abs(len(sets.train) - len(sets.test)) <= 1


def test_mnist_reads_idx_files_in_torchvision_layout(tmp_path):
    images, labels = _tiny_mnist(tmp_path / "mnist")
    sets = datasets(load_spec(_recipe(tmp_path, '  dataset = mnist\n  root = "mnist"\n')))
    assert (len(sets.train), len(sets.test)) == (12, 5)
    x, y = sets.train.tensors
    assert x.shape == (12, 1, 28, 28) and torch.equal(y, labels)
    assert torch.allclose(x[:, 0] * 255, images.float())
    assert sets.mean == (0.1307,) and sets.std == (0.3081,)


def test_missing_data_folder_points_at_the_root_line(tmp_path):
    path = _recipe(tmp_path, '  dataset = mnist\n  root = "nowhere"\n')
    checked = check_file(path)
    with pytest.raises(SpecProblem) as caught:
        datasets(checked.spec)
    diagnostic = checked.diagnostic(caught.value)
    assert diagnostic.code == "data-not-found"
    assert (diagnostic.span.line, diagnostic.span.column) == (line_of(path, 'root = "nowhere"'), 10)
    assert "MNIST/raw/" in diagnostic.help and "download = true" in diagnostic.help


def test_malformed_idx_file_is_a_clear_error(tmp_path):
    _tiny_mnist(tmp_path / "mnist")
    (tmp_path / "mnist" / "MNIST" / "raw" / "train-images-idx3-ubyte").write_bytes(b"\x00\x01garbage")
    with pytest.raises(SpecProblem) as caught:
        datasets(load_spec(_recipe(tmp_path, '  dataset = mnist\n  root = "mnist"\n')))
    assert caught.value.code == "data-unreadable"


def test_every_registry_data_set_has_a_loader():
    from cstar_dsl.lang import registry
    from cstar_dsl.train import data

    assert set(data._LOADERS) == set(registry.DATASETS)


@pytest.mark.skipif(not SHARED_MNIST.is_dir(), reason="the shared MNIST-10k folder is not next to this checkout")
def test_the_benchmark_data_loads():
    sets = datasets(load_spec(MNIST))
    assert (len(sets.train), len(sets.test)) == (8000, 2000)
    assert set(sets.test.tensors[1].tolist()) == set(range(10))
