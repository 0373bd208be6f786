"""Data stage: CIFAR-10/100 pickles and ImageNet-style folders, written tiny in their exact on-disk formats."""

from __future__ import annotations

import codecs
import io
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

from cstar_dsl.lang.problems import SpecProblem
from cstar_dsl.lang.validate import check_file, load_spec
from cstar_dsl.train.data import STATISTICS, augment, datasets, loader_batches
from tests.helpers import (
    RESNET18,
    SHARED_DATA,
    cifar_batch,
    cifar_pixels,
    dump_pickle,
    image_folders,
    tiny_cifar10,
    variant,
)

SHARED_CIFAR10 = SHARED_DATA / "cifar10"
CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))


# ----------------------------------------------------------------------- writers


def _recipe(tmp_path: Path, data: str, *, input_shape: str = "[3, 32, 32]", classes: int = 10) -> Path:
    """specs/resnet18.cstar with these `data` lines, input size and class count."""
    model = f"model {{\n  classes = {classes}\n  input = {input_shape}\n}}\n\n"
    return variant(tmp_path, RESNET18, f"{model}data {{\n{data}}}\n")


def _cifar_block(dataset: str, root: Path, extra: str = "") -> str:
    return f'  dataset = {dataset}\n  root = "{root}"\n{extra}'


def _tiny_cifar100(root: Path) -> None:
    folder = root / "cifar-100-python"
    for name, count in (("train", 6), ("test", 4)):
        fine = [(37 * i) % 100 for i in range(count)]
        dump_pickle(folder / name, cifar_batch(cifar_pixels(count, count), fine, key=b"fine_labels",
                                               coarse_labels=[label // 5 for label in fine]))
    dump_pickle(folder / "meta", {b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
                                  b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]})


class _Python2Pickler(pickle._Pickler):  # type: ignore[name-defined]  # the pure-Python pickler can be extended
    """Writes what Python 2's cPickle wrote for the real CIFAR files: strings as byte strings
    (BINSTRING), and numpy's array constructor under its Python 2 name numpy.core.multiarray."""

    dispatch = dict(pickle._Pickler.dispatch)  # type: ignore[attr-defined]

    def save_string(self, value: bytes | str) -> None:
        raw = value.encode("ascii") if isinstance(value, str) else value
        self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw if len(raw) < 256
                   else pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(value)

    def save_function(self, value: object, name: str | None = None) -> None:
        if getattr(value, "__name__", "") == "_reconstruct":
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(value)
        else:
            self.save_global(value, name)

    dispatch[bytes] = save_string
    dispatch[str] = save_string
    dispatch[type(len)] = save_function


class _Calls:
    """Unpickles as ``function(*args)``: what a malicious pickle does."""

    def __init__(self, function: object, *args: object) -> None:
        self.function, self.args = function, args

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return self.function, self.args


def _problem(spec_path: Path) -> SpecProblem:
    with pytest.raises(SpecProblem) as caught:
        datasets(load_spec(spec_path))
    return caught.value


# ------------------------------------------------------------------------- CIFAR


def test_cifar10_reads_the_torchvision_layout(tmp_path):
    pixels, labels = tiny_cifar10(tmp_path / "cifar")
    sets = datasets(load_spec(_recipe(tmp_path, _cifar_block("cifar10", tmp_path / "cifar"))))
    assert isinstance(sets.train, TensorDataset) and (len(sets.train), len(sets.test)) == (10, 3)  # official split
    x, y = sets.train.tensors
    assert x.shape == (10, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.long
    assert 0 <= x.min() and x.max() <= 1
    assert torch.equal(x, torch.from_numpy(pixels).reshape(10, 3, 32, 32).float() / 255)
    assert y.tolist() == labels and sets.test.tensors[1].tolist() == [9, 8, 7]
    assert (sets.mean, sets.std) == STATISTICS["cifar10"]


def test_cifar_pixels_land_at_their_channel_row_and_column(tmp_path):
    tiny_cifar10(tmp_path / "cifar")
    marked = np.zeros((1, 3072), dtype=np.uint8)
    # Each row holds the red plane, then green, then blue, each plane row-major over 32 x 32.
    marked[0, 0 * 1024 + 5 * 32 + 7] = 255  # red, row 5, column 7
    marked[0, 1 * 1024 + 31 * 32 + 0] = 102  # green, row 31, column 0
    marked[0, 2 * 1024 + 0 * 32 + 31] = 51  # blue, row 0, column 31
    dump_pickle(tmp_path / "cifar" / "cifar-10-batches-py" / "test_batch", cifar_batch(marked, [3]))
    image = datasets(load_spec(_recipe(tmp_path, _cifar_block("cifar10", tmp_path / "cifar")))).test.tensors[0][0]
    assert image[0, 5, 7] == 1.0 and image[1, 31, 0] == pytest.approx(0.4) and image[2, 0, 31] == pytest.approx(0.2)
    assert image.count_nonzero() == 3


def test_cifar100_uses_the_fine_labels(tmp_path):
    _tiny_cifar100(tmp_path / "c100")
    sets = datasets(load_spec(_recipe(tmp_path, _cifar_block("cifar100", tmp_path / "c100"), classes=100)))
    assert (len(sets.train), len(sets.test)) == (6, 4)
    assert sets.train.tensors[0].shape == (6, 3, 32, 32)
    assert sets.train.tensors[1].tolist() == [0, 37, 74, 11, 48, 85]
    assert (sets.mean, sets.std) == STATISTICS["cifar100"]


def test_python2_pickles_like_the_real_files_load(tmp_path):
    pixels, _ = tiny_cifar10(tmp_path / "cifar")
    stream = io.BytesIO()
    _Python2Pickler(stream, protocol=2).dump(cifar_batch(pixels[:2], [4, 2]))
    assert b"numpy.core.multiarray" in stream.getvalue() and b"_codecs" not in stream.getvalue()
    (tmp_path / "cifar" / "cifar-10-batches-py" / "test_batch").write_bytes(stream.getvalue())
    test = datasets(load_spec(_recipe(tmp_path, _cifar_block("cifar10", tmp_path / "cifar")))).test
    assert torch.equal(test.tensors[0] * 255, torch.from_numpy(pixels[:2]).reshape(2, 3, 32, 32).float())
    assert test.tensors[1].tolist() == [4, 2]


def test_cifar_augmentation_keeps_the_shape(tmp_path):
    tiny_cifar10(tmp_path / "cifar")
    images = datasets(load_spec(_recipe(tmp_path, _cifar_block("cifar10", tmp_path / "cifar")))).train.tensors[0]
    out = augment(images[:4], "cifar10", torch.Generator().manual_seed(0))
    assert out.shape == (4, 3, 32, 32) and 0 <= out.min() and out.max() <= 1


def test_missing_cifar_folder_names_the_layout(tmp_path):
    path = _recipe(tmp_path, _cifar_block("cifar100", tmp_path / "nowhere"), classes=100)
    checked = check_file(path)
    with pytest.raises(SpecProblem) as caught:
        datasets(checked.spec)
    problem, diagnostic = caught.value, checked.diagnostic(caught.value)
    assert (problem.code, problem.loc) == ("data-not-found", ("data", "root"))
    root_line = path.read_text().splitlines().index(f'  root = "{tmp_path / "nowhere"}"') + 1
    assert diagnostic.span.line == root_line
    assert all(name in diagnostic.help for name in ("cifar-100-python/", "train", "test", "meta", "download = true"))


def test_a_missing_cifar10_batch_is_named(tmp_path):
    tiny_cifar10(tmp_path / "cifar")
    (tmp_path / "cifar" / "cifar-10-batches-py" / "data_batch_4").unlink()
    problem = _problem(_recipe(tmp_path, _cifar_block("cifar10", tmp_path / "cifar")))
    assert problem.code == "data-not-found" and "missing: data_batch_4" in problem.help
    assert all(name in problem.help for name in (*CIFAR10_TRAIN, "test_batch", "batches.meta"))


@pytest.mark.parametrize(("call", "named"), [
    (lambda marker: _Calls(print, "PWNED"), "print"),
    (lambda marker: _Calls(os.system, f"touch {marker}"), "system"),
    (lambda marker: _Calls(codecs.encode, "text", "rot13"), "rot13"),
], ids=["print", "os.system", "other-codec"])
def test_a_pickle_that_calls_a_function_is_refused_unexecuted(tmp_path, capsys, call, named):
    tiny_cifar10(tmp_path / "cifar")
    marker = tmp_path / "executed"
    dump_pickle(tmp_path / "cifar" / "cifar-10-batches-py" / "data_batch_2", cifar_batch(call(marker), [1]))
    problem = _problem(_recipe(tmp_path, _cifar_block("cifar10", tmp_path / "cifar")))
    assert problem.code == "data-unreadable" and named in problem.message and "data_batch_2" in problem.message
    assert "PWNED" not in capsys.readouterr().out and not marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "wrong-shape", "bad-labels", "not-a-dict", "meta"])
def test_malformed_cifar_files_are_unreadable(tmp_path, damage):
    tiny_cifar10(tmp_path / "cifar")
    folder = tmp_path / "cifar" / "cifar-10-batches-py"
    if damage == "truncated":
        data = (folder / "data_batch_3").read_bytes()
        (folder / "data_batch_3").write_bytes(data[:len(data) // 2])
    elif damage == "wrong-shape":
        dump_pickle(folder / "data_batch_3", cifar_batch(np.zeros((2, 3000), dtype=np.uint8), [0, 1]))
    elif damage == "bad-labels":
        dump_pickle(folder / "data_batch_3", cifar_batch(cifar_pixels(2, 0), [0, 10]))
    elif damage == "not-a-dict":
        dump_pickle(folder / "data_batch_3", [1, 2, 3])
    else:
        dump_pickle(folder / "batches.meta", {b"label_names": [b"one", b"two"]})
    problem = _problem(_recipe(tmp_path, _cifar_block("cifar10", tmp_path / "cifar")))
    assert (problem.code, problem.loc) == ("data-unreadable", ("data", "root"))
    assert ("batches.meta" if damage == "meta" else "data_batch_3") in problem.message


def test_download_fetches_the_archive_and_still_reads_it_restricted(tmp_path, monkeypatch):
    from torchvision.datasets import utils

    fetched = []

    def fake_download(url: str, root: str, **options: object) -> None:
        fetched.append((url, options["md5"]))
        tiny_cifar10(Path(root))

    monkeypatch.setattr(utils, "download_and_extract_archive", fake_download)
    spec = load_spec(_recipe(tmp_path, _cifar_block("cifar10", tmp_path / "fresh", "  download = true\n")))
    assert len(datasets(spec).train) == 10
    assert fetched == [("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a")]
    assert len(datasets(spec).test) == 3 and len(fetched) == 1  # the files are there now: no second download


def test_a_failed_download_points_at_the_download_line(tmp_path, monkeypatch):
    from torchvision.datasets import utils

    def offline(*args: object, **options: object) -> None:
        raise OSError("no network")

    monkeypatch.setattr(utils, "download_and_extract_archive", offline)
    problem = _problem(_recipe(tmp_path, _cifar_block("cifar10", tmp_path / "fresh", "  download = true\n")))
    assert (problem.code, problem.loc) == ("data-not-found", ("data", "download"))
    assert "no network" in problem.message and "cifar-10-batches-py/" in problem.help


def test_a_resnet18_recipe_loads_its_cifar_folder(tmp_path):
    tiny_cifar10(tmp_path / "cifar")
    spec = load_spec(_recipe(tmp_path, _cifar_block("cifar10", tmp_path / "cifar", "  batch_size = 4\n")))
    assert (spec.model.arch, spec.model.stem, spec.model.input) == ("torchvision:resnet18", "cifar", (3, 32, 32))
    sets = datasets(spec)
    batches = list(loader_batches(sets.train, torch.arange(len(sets.train)), spec.data.batch_size, spec.data.workers))
    assert [tuple(images.shape) for images, _ in batches] == [(4, 3, 32, 32), (4, 3, 32, 32), (2, 3, 32, 32)]


@pytest.mark.skipif(not (SHARED_CIFAR10 / "cifar-10-batches-py").is_dir(),
                    reason="no real CIFAR-10 in ../shared/data/cifar10 (see ../shared/data/README.md)")
def test_the_real_cifar10_loads(tmp_path):
    sets = datasets(load_spec(_recipe(tmp_path, _cifar_block("cifar10", SHARED_CIFAR10))))
    assert (len(sets.train), len(sets.test)) == (50000, 10000)
    assert set(sets.test.tensors[1].tolist()) == set(range(10))


# -------------------------------------------------------------------- ImageFolder


def _folder_block(root: Path, extra: str = "") -> str:
    return f'  dataset = imagenet\n  root = "{root}"\n{extra}'


def test_image_folders_load_with_the_standard_transforms(tmp_path):
    image_folders(tmp_path / "net", {"cat": 3, "dog": 2}, {"cat": 1, "dog": 2})
    spec = load_spec(_recipe(tmp_path, _folder_block(tmp_path / "net"), input_shape="[3, 24, 20]", classes=2))
    sets = datasets(spec)
    assert (len(sets.train), len(sets.test)) == (5, 3) and sets.train.classes == sets.test.classes == ["cat", "dog"]
    assert [label for _, label in sets.train.samples] == [0, 0, 0, 1, 1]
    for dataset in (sets.train, sets.test):
        image, label = dataset[len(dataset) - 1]
        assert image.shape == (3, 24, 20) and image.dtype == torch.float32 and label == 1
        assert 0 <= image.min() and image.max() <= 1
    first, again = sets.test[0][0], sets.test[0][0]
    assert torch.equal(first, again)  # evaluation: resize and center crop, nothing random
    assert (sets.mean, sets.std) == STATISTICS["imagenet"]


def test_image_folders_without_augmentation_crop_the_center(tmp_path):
    image_folders(tmp_path / "net", {"cat": 2, "dog": 1}, {"cat": 1, "dog": 1})
    block = _folder_block(tmp_path / "net", "  augment = none\n")
    sets = datasets(load_spec(_recipe(tmp_path, block, input_shape="[3, 16, 16]", classes=2)))
    assert torch.equal(sets.train[0][0], sets.train[0][0]) and sets.train[0][0].shape == (3, 16, 16)


def test_image_folders_with_different_classes_are_unreadable(tmp_path):
    image_folders(tmp_path / "net", {"cat": 1, "dog": 1}, {"cat": 1, "emu": 1})
    problem = _problem(_recipe(tmp_path, _folder_block(tmp_path / "net"), classes=2))
    assert (problem.code, problem.loc) == ("data-unreadable", ("data", "root"))
    assert "only in train/: dog" in problem.message and "only in val/: emu" in problem.message


def test_a_class_folder_without_images_is_unreadable(tmp_path):
    image_folders(tmp_path / "net", {"cat": 1, "dog": 1}, {"cat": 1, "dog": 1})
    (tmp_path / "net" / "val" / "dog" / "dog_0.JPEG").unlink()
    problem = _problem(_recipe(tmp_path, _folder_block(tmp_path / "net"), classes=2))
    assert problem.code == "data-unreadable" and "dog" in problem.message


def test_missing_image_folders_name_the_layout(tmp_path):
    image_folders(tmp_path / "net", {"cat": 1, "dog": 1}, {})
    problem = _problem(_recipe(tmp_path, _folder_block(tmp_path / "net"), classes=2))
    assert (problem.code, problem.loc) == ("data-not-found", ("data", "root"))
    assert "missing: val/" in problem.help and "train/<class>/" in problem.help and "image-net.org" in problem.help


def test_imagenet_cannot_be_downloaded(tmp_path):
    problem = _problem(_recipe(tmp_path, _folder_block(tmp_path / "net", "  download = true\n"), classes=2))
    assert (problem.code, problem.loc) == ("data-not-found", ("data", "download"))
    assert "image-net.org" in problem.help


# ----------------------------------------------------------------------- batches


class _Numbered(Dataset):
    """Item i is (a 1 x 2 x 2 image filled with i, label i): shows which items a batch holds."""

    def __len__(self) -> int:
        return 7

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.full((1, 2, 2), float(index)), index


def test_loader_batches_follow_the_given_order():
    order = torch.tensor([5, 0, 6, 2, 2, 1, 3])
    numbered = _Numbered()
    tensors = TensorDataset(*(torch.stack(column) if i == 0 else torch.tensor(column)
                              for i, column in enumerate(zip(*(numbered[i] for i in range(7)), strict=True))))
    for dataset in (numbered, tensors):
        batches = list(loader_batches(dataset, order, 3, 0))
        assert [labels.tolist() for _, labels in batches] == [[5, 0, 6], [2, 2, 1], [3]]
        assert torch.equal(torch.cat([images[:, 0, 0, 0] for images, _ in batches]), order.float())
        assert all(labels.dtype == torch.long for _, labels in batches)


def test_loader_batches_of_image_folders(tmp_path):
    image_folders(tmp_path / "net", {"cat": 2, "dog": 2}, {"cat": 1, "dog": 1})
    test = datasets(load_spec(_recipe(tmp_path, _folder_block(tmp_path / "net"), input_shape="[3, 8, 8]",
                                      classes=2))).test
    (images, labels), = loader_batches(test, torch.tensor([1, 0]), 4, 0)
    assert images.shape == (2, 3, 8, 8) and labels.tolist() == [1, 0]
