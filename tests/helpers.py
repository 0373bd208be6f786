"""Shared test helpers: the checkout's paths, test recipes written as `extend` variants, the CLI, tiny data files.

Plain constants and functions live here (test modules import them: `from tests.helpers import SPECS`); fixtures,
which pytest hands to a test by name, live in tests/conftest.py.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "specs"
DOCS = ROOT / "docs"
PACKAGE = ROOT / "cstar_dsl"
FIXTURES = ROOT / "tests" / "fixtures"
DIGITS = SPECS / "digits.cstar"
MNIST = SPECS / "mnist.cstar"
RESNET18 = SPECS / "resnet18.cstar"
SHARED_DATA = ROOT.parent / "shared" / "data"  # the real data sets, next to the checkout where a machine has them


# ----------------------------------------------------------------------- recipes


def variant(folder: Path, base: Path, overrides: str = "", name: str = "r.cstar") -> Path:
    """Writes ``folder/name``: a recipe that extends ``base`` (by its absolute path) with ``overrides``.

    The overrides merge over the base as docs/language.md says: blocks key by key, `PHASE = none` drops a phase.
    """
    path = folder / name
    path.write_text(f'extend "{base.resolve()}"\n\n{overrides}', encoding="utf-8")
    return path


def line_of(path: Path, text: str) -> int:
    """The 1-based number of the first line of ``path`` that reads ``text`` (surrounding blanks ignored)."""
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    return lines.index(text.strip()) + 1


TINY = """
model {{
  arch = "cstar:mlp"
  classes = 10
  input = [1, 8, 8]
}}

data {{
  dataset = digits
  batch_size = 128
  augment = {augment}
}}

threat {{
  norm = linf
  eps = 0.1
  step = 0.05
  steps = 2
}}

compress {{
  method = {method}
  budget = 4x params
  keep = ["fc3"]
}}

train {{
  seed = 0
  device = cpu
  pretrain {{
    epochs = {pretrain}
    lr = {lr}
  }}
{admm}
  finetune {{
    epochs = {finetune}
    lr = 0.01
  }}
}}

evaluate {{
  attacks = [pgd(steps = 3), fgsm]
  samples = 120
{requirements}
}}
"""
ADMM = """  admm {{
    epochs = {epochs}
    lr = 0.01
    rho = 0.01
    rho_schedule = geometric(factor = 2, max = 0.05)
    interval = {interval}
  }}"""


def write_spec(folder: Path, *, method: str = "cstar", pretrain: int = 1, admm: int = 2, finetune: int = 1,
               lr: float = 0.05, interval: str = "1 epoch", requirements: str = "", augment: str = "none",
               name: str = "tiny.cstar") -> Path:
    """The tiny MLP recipe on digits that the compile tests run in seconds (no export, no requirement by default)."""
    phases = ADMM.format(epochs=admm, interval=interval) if method == "cstar" else ""
    path = folder / name
    path.write_text(TINY.format(method=method, pretrain=pretrain, lr=lr, admm=phases, finetune=finetune,
                                requirements=requirements, augment=augment))
    return path


# ---------------------------------------------------------------------- the CLI


def compile_cli(*args: str | Path) -> int:
    """`cstar compile ARGS --quiet` in this process; its exit code."""
    from cstar_dsl.cli import main

    return main(["compile", *map(str, args), "--quiet"])


def run_cli(*args: str | Path, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """The CLI in its own process (this checkout's package, one thread): a hang fails the test, never blocks it."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "cstar_dsl", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=environment, timeout=120)


# ---------------------------------------------------------- model folders, data files


def save_model_folder(folder: Path, factorized: bool) -> Path:
    """A digits CNN saved as `cstar compile` saves one (model.safetensors + model.json), dense or factorized."""
    from cstar_dsl.deploy.artifacts import model_description, save_model
    from cstar_dsl.lang.spec import ModelSpec
    from cstar_dsl.model.rewrite import factorize_ranks
    from cstar_dsl.model.zoo import Normalized, build_model

    spec = ModelSpec(arch="cstar:digits-cnn", classes=10, input=(1, 8, 8))
    ranks = {"features.3": (8, 8), "features.7": (8, 16), "fc": (4,)}
    net = build_model(spec)
    if factorized:
        net = factorize_ranks(net, ranks)
        structure = {"kind": "factorized", "ranks": {name: list(r) for name, r in ranks.items()}}
    else:
        structure = {"kind": "dense"}
    save_model(folder, Normalized(net, (0.3,), (0.37,)), model_description(spec, "cstar", structure, (0.3,), (0.37,)))
    return folder


def cifar_batch(pixels: np.ndarray, labels: list[int], key: bytes = b"labels", **more: Any) -> dict[bytes, Any]:
    """A batch as the real files hold it: bytes keys, a uint8 N x 3072 array, a list of labels."""
    return {b"batch_label": b"a tiny batch", key: labels, b"data": pixels,
            b"filenames": [f"image_{i}.png".encode() for i in range(len(labels))], **more}


def dump_pickle(path: Path, value: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as stream:
        pickle.dump(value, stream, protocol=2)


def cifar_pixels(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 3072), dtype=np.uint8)


def tiny_cifar10(root: Path, per_batch: int = 2, tests: int = 3) -> tuple[np.ndarray, list[int]]:
    """Five train batches, a test batch and batches.meta in cifar-10-batches-py/; the train pixels and labels."""
    folder = root / "cifar-10-batches-py"
    pixels, labels = cifar_pixels(5 * per_batch, 0), [i % 10 for i in range(5 * per_batch)]
    for i in range(5):
        part = slice(i * per_batch, (i + 1) * per_batch)
        dump_pickle(folder / f"data_batch_{i + 1}", cifar_batch(pixels[part], labels[part]))
    dump_pickle(folder / "test_batch", cifar_batch(cifar_pixels(tests, 1), [9 - i % 10 for i in range(tests)]))
    dump_pickle(folder / "batches.meta", {b"label_names": [f"class{i}".encode() for i in range(10)],
                                          b"num_cases_per_batch": per_batch, b"num_vis": 3072})
    return pixels, labels


def image_folders(root: Path, train: dict[str, int], val: dict[str, int]) -> None:
    """ImageNet's layout: root/train/<class>/*, root/val/<class>/*, tiny PNG and JPEG images."""
    from PIL import Image

    for part, counts in (("train", train), ("val", val)):
        for index, (name, count) in enumerate(counts.items()):
            (root / part / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                colour = (40 * index + 20, 10 * i, 200 - 30 * index)
                suffix = "png" if i % 2 else "JPEG"
                Image.new("RGB", (40 + 4 * i, 30), colour).save(root / part / name / f"{name}_{i}.{suffix}",
                                                                 format="PNG" if suffix == "png" else "JPEG")
