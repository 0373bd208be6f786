"""Data stage: the recipe's data set -> train and test sets of images in [0, 1], as tensors or image folders.

Images stay in [0, 1]; normalization belongs inside the model, so that an attack's eps is in
pixels. A missing or unreadable data folder is a ``SpecProblem`` at the recipe's ``data.root``
line that names the layout the loader expects. CIFAR's pickled batches are read with an
unpickler that builds numpy arrays and nothing else: a pickle can name any function to call.
"""

from __future__ import annotations

import functools
import io
import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from ..lang.problems import SpecProblem
from ..lang.spec import DataSpec, Spec

if TYPE_CHECKING:
    from torchvision.datasets import ImageFolder

DIGITS_TRAIN_SHARE = 0.8
# Per-channel statistics of each data set's training images, for the normalization in the model.
STATISTICS = {
    "digits": ((0.3049,), (0.3758,)),
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                "t10k-labels-idx1-ubyte")
_IMAGENET_SOURCE = ("ImageNet cannot be downloaded automatically: get ILSVRC2012 from https://image-net.org "
                    "(after registering), and sort the validation images into one folder per class like train/")


@dataclass(frozen=True)
class Datasets:
    """The exact train and test sets a compile uses, and how the model should normalize them.

    ``train`` and ``test`` are ``TensorDataset``s (images, labels) for the data sets that fit in
    memory, and ``ImageFolder``s (decoded and transformed per item) for ``imagenet``.
    """

    name: str
    train: Dataset
    test: Dataset
    mean: tuple[float, ...]
    std: tuple[float, ...]


def datasets(spec: Spec) -> Datasets:
    """The recipe's train and test sets (seeded by ``train.seed`` where a split is drawn).

    Raises:
        SpecProblem: ``data-not-found`` or ``data-unreadable`` at ``data.root`` (``data.download``
            for a download that cannot happen).
    """
    data = spec.data
    loader = _LOADERS[data.dataset]  # every registry data set has a loader (tests/train/test_data_formats.py)
    train, test = loader(spec)
    default_mean, default_std = STATISTICS[data.dataset]
    return Datasets(data.dataset, train, test, data.mean or default_mean, data.std or default_std)


def dataset_size(dataset: Dataset) -> int:
    """How many examples ``dataset`` holds."""
    # torch's Dataset declares no __len__, though every data set a recipe can name has one.
    return len(dataset)  # type: ignore[arg-type]


def loader_batches(dataset: Dataset, order: torch.Tensor, batch_size: int, workers: int, *,
                   generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) batches of ``dataset`` in exactly the index ``order`` given, so that a
    resumed run sees the batches an uninterrupted one would.

    A ``TensorDataset`` is indexed directly; any other goes through a ``DataLoader`` with
    ``workers`` processes. Per-item random transforms draw from torch's global generator with
    ``workers = 0``, and from worker seeds drawn from ``generator`` otherwise.
    """
    order = order.long().flatten()
    if isinstance(dataset, TensorDataset):
        images, labels = dataset.tensors
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            yield images[index], labels[index]
        return
    loader = DataLoader(Subset(dataset, order.tolist()), batch_size=batch_size, shuffle=False, num_workers=workers,
                        generator=generator)
    for images, labels in loader:
        yield images, labels


def _digits(data: DataSpec, seed: int) -> tuple[TensorDataset, TensorDataset]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(bunch.target, dtype=torch.long)
    share = data.split if isinstance(data.split, float) else DIGITS_TRAIN_SHARE
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    cut = round(share * len(labels))
    return (TensorDataset(images[order[:cut]], labels[order[:cut]]),
            TensorDataset(images[order[cut:]], labels[order[cut:]]))


def _mnist(data: DataSpec) -> tuple[TensorDataset, TensorDataset]:
    from torchvision.datasets import MNIST

    root = data.root or Path(".")
    layout = f"{root}/MNIST/raw/ with {', '.join(_MNIST_FILES)}"
    if not data.download and not all((root / "MNIST" / "raw" / name).is_file() for name in _MNIST_FILES):
        raise SpecProblem(("data", "root"), "data-not-found", f"no MNIST data set in {root}",
                          label="expected the MNIST files under this folder",
                          help=f"expected {layout}; or set `download = true` on a machine with internet")
    try:
        sets = [MNIST(str(root), train=train, download=data.download) for train in (True, False)]
    except Exception as error:  # torchvision reports a malformed file in many ways; all mean the same
        raise SpecProblem(("data", "root"), "data-unreadable", f"cannot read the MNIST data in {root}: {error}",
                          help=f"expected {layout}, in the IDX format") from error
    train, test = (TensorDataset(s.data.unsqueeze(1).float() / 255.0, s.targets.long()) for s in sets)
    return train, test


# ------------------------------------------------------------------------ CIFAR


@dataclass(frozen=True)
class _Cifar:
    """Where torchvision's CIFAR archive puts each file, and the keys its pickled dicts use."""

    title: str
    folder: str
    train: tuple[str, ...]
    test: str
    meta: str
    labels: str  # the label key of a batch
    names: str  # the class-name key of the meta file
    classes: int
    source: str  # the torchvision class whose url and checksum the download uses

    @property
    def files(self) -> tuple[str, ...]:
        return (*self.train, self.test, self.meta)

    def layout(self, root: Path) -> str:
        return f"{root}/{self.folder}/ with {', '.join(self.files)} (the python version of {self.title})"


_CIFAR10 = _Cifar("CIFAR-10", "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch",
                  "batches.meta", "labels", "label_names", 10, "CIFAR10")
_CIFAR100 = _Cifar("CIFAR-100", "cifar-100-python", ("train",), "test", "meta", "fine_labels", "fine_label_names",
                   100, "CIFAR100")
_CIFAR_SIDE = 32


class _Refused(pickle.UnpicklingError):
    """A call a CIFAR file never needs, refused before it happens."""


def _latin1(text: object, encoding: object = "latin1", errors: object = "strict") -> bytes:
    """Python 3 pickles ``bytes`` at protocol 2 as ``_codecs.encode(text, "latin1")``; any other
    codec is refused (a codec name can make Python import a module)."""
    if not isinstance(text, str) or encoding != "latin1" or errors != "strict":
        raise _Refused(f"`_codecs.encode` with the codec {encoding!r} (bytes are written with 'latin1')")
    return text.encode("latin1")


@functools.cache
def _allowed_globals() -> dict[tuple[str, str], object]:
    try:  # numpy 2 moved numpy.core to numpy._core; the old name warns, so never import it
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    return {
        # Python 2 numpy (the real files) and numpy 1.x write numpy.core, numpy 2 writes numpy._core.
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1,
    }


class _ArraysOnly(pickle.Unpickler):
    """Unpickles dicts, lists, strings, numbers and numpy arrays; any other global is refused
    before it is called."""

    def find_class(self, module: str, name: str) -> Any:
        found = _allowed_globals().get((module, name))
        if found is None:
            raise _Refused(f"`{module}.{name}`")
        return found


def _unpickle(path: Path) -> dict[Any, Any]:
    """The dict in a CIFAR file, with ``str`` keys (Python 2 wrote them as byte strings)."""
    try:
        # bytes: Python 2 strings stay bytes, as numpy needs for the arrays' raw data
        loaded = _ArraysOnly(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except _Refused as refused:
        raise _unreadable(path, f"it asks to call {refused}, which a CIFAR file never needs; refused, "
                                "because unpickling it could run code") from refused
    except Exception as error:  # a truncated or corrupt pickle fails in many ways; all mean the same
        raise _unreadable(path, f"not a readable pickle ({type(error).__name__}: {error})") from error
    if not isinstance(loaded, dict):
        raise _unreadable(path, f"holds a {type(loaded).__name__}, not a dict")
    return {key.decode("latin1") if isinstance(key, bytes) else key: value for key, value in loaded.items()}


def _unreadable(path: Path, why: str) -> SpecProblem:
    return SpecProblem(("data", "root"), "data-unreadable", f"cannot read {path}: {why}",
                       help="replace the file with the original one, or download the data set again")


def _cifar(data: DataSpec, kind: _Cifar) -> tuple[TensorDataset, TensorDataset]:
    root = data.root or Path(".")
    folder = root / kind.folder
    missing = [name for name in kind.files if not (folder / name).is_file()]
    if missing and data.download:
        _download_cifar(root, kind)
        missing = [name for name in kind.files if not (folder / name).is_file()]
    if missing:
        absent = f"missing: {', '.join(missing)}; " if folder.is_dir() else ""
        raise SpecProblem(("data", "root"), "data-not-found", f"no {kind.title} data set in {root}",
                          label=f"expected {kind.folder}/ under this folder",
                          help=f"expected {kind.layout(root)}; {absent}or set `download = true` on a machine with "
                               "internet")
    _check_class_names(folder / kind.meta, kind)
    return _cifar_batches([folder / name for name in kind.train], kind), _cifar_batches([folder / kind.test], kind)


def _download_cifar(root: Path, kind: _Cifar) -> None:
    """Fetch and check torchvision's archive; its CIFAR classes would also unpickle the files
    without restriction, so only the download helper is used."""
    import torchvision.datasets
    from torchvision.datasets import utils

    source = getattr(torchvision.datasets, kind.source)
    try:
        utils.download_and_extract_archive(source.url, str(root), filename=source.filename, md5=source.tgz_md5)
    except Exception as error:  # no network, a proxy, a bad checksum: the data is not there either way
        raise SpecProblem(("data", "download"), "data-not-found",
                          f"could not download {kind.title} into {root}: {error}",
                          help=f"download {source.url} by hand and unpack it, so that there is "
                               f"{kind.layout(root)}") from error


def _check_class_names(path: Path, kind: _Cifar) -> None:
    """The meta file names the classes; a count other than the data set's means another data set."""
    names = _unpickle(path).get(kind.names)
    if not isinstance(names, list) or len(names) != kind.classes:
        found = len(names) if isinstance(names, list) else "no"
        raise _unreadable(path, f"`{kind.names}` lists {found} class names, not {kind.classes}")


def _cifar_batches(paths: list[Path], kind: _Cifar) -> TensorDataset:
    images, labels = zip(*(_cifar_batch(path, kind) for path in paths), strict=True)
    pixels = np.concatenate(images)  # a fresh, writable array: torch warns about read-only ones
    count = len(pixels)
    tensor = torch.from_numpy(pixels).view(count, 3, _CIFAR_SIDE, _CIFAR_SIDE)  # rows hold R, G, B planes
    return TensorDataset(tensor.float() / 255.0, torch.from_numpy(np.concatenate(labels)))


def _cifar_batch(path: Path, kind: _Cifar) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(path)
    pixels, labels = batch.get("data"), batch.get(kind.labels)
    size = 3 * _CIFAR_SIDE * _CIFAR_SIDE
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim != 2 or pixels.shape[1] != size:
        shape = f"{pixels.dtype} {pixels.shape}" if isinstance(pixels, np.ndarray) else type(pixels).__name__
        raise _unreadable(path, f"`data` is {shape}, not a uint8 array of N x {size} pixels")
    try:
        labels = np.asarray(labels)
    except Exception as error:  # a ragged or odd label list
        raise _unreadable(path, f"`{kind.labels}` is not a list of class numbers") from error
    if labels.shape != (len(pixels),) or labels.dtype.kind not in "iu":
        raise _unreadable(path, f"`{kind.labels}` is not a list of {len(pixels)} class numbers")
    if len(labels) and not 0 <= labels.min() <= labels.max() < kind.classes:
        raise _unreadable(path, f"`{kind.labels}` has class numbers outside 0..{kind.classes - 1}")
    return pixels, labels.astype(np.int64)


# ------------------------------------------------------------------- ImageFolder


def _image_folders(data: DataSpec, shape: tuple[int, int, int]) -> tuple[ImageFolder, ImageFolder]:
    """ImageNet-style folders: ROOT/train/<class>/ and ROOT/val/<class>/, decoded per item."""
    root = data.root or Path(".")
    layout = (f"{root}/train/<class>/ and {root}/val/<class>/, one folder per class with its images "
              "(.JPEG, .png, ...), the same class folders in both")
    if data.download:
        raise SpecProblem(("data", "download"), "data-not-found", "ImageNet cannot be downloaded automatically",
                          label="no automatic download", help=f"{_IMAGENET_SOURCE}, then expect {layout}")
    missing = [f"{part}/" for part in ("train", "val") if not (root / part).is_dir()]
    if missing:
        raise SpecProblem(("data", "root"), "data-not-found", f"no image folders in {root}",
                          label="expected train/ and val/ under this folder",
                          help=f"expected {layout}; missing: {', '.join(missing)}. {_IMAGENET_SOURCE}")
    train_transform, test_transform = _folder_transforms(shape, data.augment == "standard")
    train = _image_folder(root / "train", train_transform, layout)
    test = _image_folder(root / "val", test_transform, layout)
    if train.classes != test.classes:  # a label is a class's index in the sorted list, so the lists must agree
        difference = _difference(train.classes, test.classes)
        raise SpecProblem(("data", "root"), "data-unreadable", f"train/ and val/ in {root} have different classes: "
                          f"{difference}", help=f"expected {layout}")
    return train, test


def _image_folder(folder: Path, transform: Callable[[Any], torch.Tensor], layout: str) -> ImageFolder:
    from torchvision.datasets import ImageFolder

    try:
        return ImageFolder(str(folder), transform=transform)
    except Exception as error:  # no class folders, or a class folder without images
        raise SpecProblem(("data", "root"), "data-unreadable", f"cannot read the images in {folder}: {error}",
                          help=f"expected {layout}") from error


def _folder_transforms(shape: tuple[int, int, int], augmenting: bool) -> tuple[Callable[[Any], torch.Tensor], ...]:
    """The standard ImageNet transforms at the model's input size, ending in [0, 1] tensors (no
    normalization: it lives in the model)."""
    from torchvision.transforms import v2

    channels, height, width = shape
    resize = round(min(height, width) * 256 / 224)  # the usual 256 -> 224 ratio, at any input size
    to_tensor = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    if channels == 1:  # ImageFolder decodes to RGB
        to_tensor.insert(0, v2.Grayscale(1))
    evaluate = [v2.Resize(resize), v2.CenterCrop((height, width))]
    train = [v2.RandomResizedCrop((height, width)), v2.RandomHorizontalFlip()] if augmenting else evaluate
    return v2.Compose([*train, *to_tensor]), v2.Compose([*evaluate, *to_tensor])


def _difference(train: list[str], test: list[str], shown: int = 5) -> str:
    def listed(names: list[str]) -> str:
        more = f" and {len(names) - shown} more" if len(names) > shown else ""
        return ", ".join(names[:shown]) + more

    parts = [f"only in {where}/: {listed(sorted(set(mine) - set(other)))}"
             for where, mine, other in (("train", train, test), ("val", test, train)) if set(mine) - set(other)]
    return "; ".join(parts)


_LOADERS: dict[str, Callable[[Spec], tuple[Dataset, Dataset]]] = {
    "digits": lambda spec: _digits(spec.data, spec.train.seed),
    "mnist": lambda spec: _mnist(spec.data),
    "cifar10": lambda spec: _cifar(spec.data, _CIFAR10),
    "cifar100": lambda spec: _cifar(spec.data, _CIFAR100),
    "imagenet": lambda spec: _image_folders(spec.data, spec.model.input),
}


def augment(images: torch.Tensor, dataset: str, generator: torch.Generator) -> torch.Tensor:
    """The standard training augmentation of the data set's kind, on a batch: a random crop after
    zero padding (4 pixels for 32x32 and larger colour images, 2 for digits), and a horizontal flip
    for natural images only (a flipped digit is another symbol)."""
    natural = dataset not in ("digits", "mnist")
    pad = 4 if natural else (2 if images.shape[-1] >= 16 else 1)
    batch, _, height, width = images.shape
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    rows = torch.randint(0, 2 * pad + 1, (batch,), generator=generator)
    cols = torch.randint(0, 2 * pad + 1, (batch,), generator=generator)
    crops = torch.stack([padded[i, :, r:r + height, c:c + width] for i, (r, c) in enumerate(zip(rows.tolist(),
                                                                                             cols.tolist(),
                                                                                             strict=True))])
    if natural:
        flip = torch.rand(batch, generator=generator) < 0.5
        crops[flip] = crops[flip].flip(-1)
    return crops
