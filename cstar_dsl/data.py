"""Data stage: the recipe's data set -> train and test sets of images in [0, 1], as tensors.

Images stay in [0, 1]; normalization belongs inside the model, so that an attack's eps is in
pixels. A missing or unreadable data folder is a ``SpecProblem`` at the recipe's ``data.root``
line that names the layout the loader expects.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from .problems import SpecProblem
from .spec import DataSpec, Spec

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


@dataclass(frozen=True)
class Datasets:
    """The exact train and test sets a compile uses, and how the model should normalize them."""

    name: str
    train: TensorDataset
    test: TensorDataset
    mean: tuple[float, ...]
    std: tuple[float, ...]


def datasets(spec: Spec) -> Datasets:
    """The recipe's train and test sets (seeded by ``train.seed`` where a split is drawn).

    Raises:
        SpecProblem: ``data-not-found`` or ``data-unreadable`` at ``data.root``;
            ``dataset-not-available`` for a data set this version cannot load yet.
    """
    data = spec.data
    if data.dataset == "digits":
        train, test = _digits(data, spec.train.seed)
    elif data.dataset == "mnist":
        train, test = _mnist(data)
    else:
        raise SpecProblem(("data", "dataset"), "dataset-not-available",
                          f"loading `{data.dataset}` is not available in this version of cstar",
                          help="digits and mnist load today; CIFAR and ImageFolder loaders are planned")
    default_mean, default_std = STATISTICS[data.dataset]
    return Datasets(data.dataset, train, test, data.mean or default_mean, data.std or default_std)


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
