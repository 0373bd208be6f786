"""Model stage: registry names -> nn.Module (torchvision classifiers, CIFAR variants, our small CNNs).

Errors are raised as ``SpecProblem`` with the spec location they concern, so the caller can
point at the recipe line.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..files import FileProblem, load_failure, require_file
from ..lang.problems import SpecProblem
from ..lang.registry import normalize_module_name
from ..lang.spec import ModelSpec

_RESNETS = ("resnet", "resnext", "wide_resnet")


# ------------------------------------------------------------------ own models


def _conv_block(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class SmallCnn(nn.Module):
    """A VGG-style CNN: 3x3 conv blocks ('M' = 2x2 max-pool), global average pooling, one Linear."""

    def __init__(self, channels: int, classes: int, widths: tuple[int | str, ...]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for width in widths:
            if width == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += _conv_block(channels, int(width))
                channels = int(width)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class Mlp(nn.Module):
    """Two hidden layers of 256 units."""

    def __init__(self, inputs: int, classes: int, hidden: int = 256) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(inputs, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc3(torch.relu(self.fc2(x)))


def _digits_cnn(spec: ModelSpec) -> nn.Module:
    return SmallCnn(spec.input[0], spec.classes, (32, 64, "M", 128, 128))


_MNIST_WIDTHS: tuple[int | str, ...] = (32, 32, "M", 64, 64, "M", 128, 128, "M", 256)


def _mnist_cnn(width: int) -> Callable[[ModelSpec], nn.Module]:
    """`cstar:mnist-cnn` (about 0.58M parameters, nearly all in 3x3 convs) with every layer ``width`` times as wide:
    x2 has about 2.3M parameters and x4 about 9.3M, the scale of the CSTAR paper's ResNet-18."""

    def build(spec: ModelSpec) -> nn.Module:
        widths = tuple(w if w == "M" else int(w) * width for w in _MNIST_WIDTHS)
        return SmallCnn(spec.input[0], spec.classes, widths)

    return build


def _mlp(spec: ModelSpec) -> nn.Module:
    channels, height, width = spec.input
    return Mlp(channels * height * width, spec.classes)


OWN_MODELS: dict[str, Callable[[ModelSpec], nn.Module]] = {
    "digits-cnn": _digits_cnn,
    "mnist-cnn": _mnist_cnn(1),
    "mnist-cnn-x2": _mnist_cnn(2),
    "mnist-cnn-x4": _mnist_cnn(4),
    "mlp": _mlp,
}


# ---------------------------------------------------------------- torchvision


def _torchvision(name: str, spec: ModelSpec) -> nn.Module:
    from torchvision import models

    model = models.get_model(name, weights=None, num_classes=spec.classes)
    if spec.stem == "cifar":
        _cifar_variant(name, model)
    return model


def _cifar_variant(name: str, model: Any) -> None:
    """The usual 32x32 variants: a 3x3 stride-1 stem without max-pool (ResNets), a 512-wide head
    (VGG), a stride-1 first conv (MobileNetV2)."""
    # `model` is Any: torchvision is untyped, and its layers are reached by the names each family uses.
    if name.startswith(_RESNETS):
        model.conv1 = nn.Conv2d(3, model.conv1.out_channels, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    elif name.startswith("vgg"):
        model.avgpool = nn.AdaptiveAvgPool2d(1)
        model.classifier = nn.Linear(512, model.classifier[-1].out_features)
    elif name == "mobilenet_v2":
        model.features[0][0].stride = (1, 1)
    else:
        raise SpecProblem(
            ("model", "stem"), "unsupported-stem", f"there is no CIFAR stem variant of `{name}`",
            help="the CIFAR stem exists for ResNet/ResNeXt/Wide-ResNet, VGG and MobileNetV2; use `stem = standard`")


class Normalized(nn.Module):
    """``model`` behind a per-channel normalization, so that the whole module takes images in
    [0, 1] and an attack's eps is in pixels."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)


# -------------------------------------------------------------------- builders


def build_model(spec: ModelSpec, *, seed: int = 0, allow_import: bool = False) -> nn.Module:
    """The model a recipe names, initialized from ``seed`` (the caller's random state is left as it
    was), with its starting weights when it gives them; in eval mode."""
    source, _, name = spec.arch.partition(":")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if source == "torchvision":
            model = _torchvision(name, spec)
        elif source == "cstar":
            model = OWN_MODELS[name](spec)
        else:
            model = _imported(spec, allow_import)
    if spec.weights is not None:
        load_weights(model, spec.weights)
    return model.eval()


def _imported(spec: ModelSpec, allow_import: bool) -> nn.Module:
    import importlib

    if not allow_import:
        raise SpecProblem(("model", "arch"), "import-not-allowed", f"`{spec.arch}` would import and run your code",
                          help="pass --allow-import to allow `package.module:function` models")
    module_name, _, function = spec.arch.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), function)
        model = factory(num_classes=spec.classes)
    except Exception as error:  # the user's own code: report whatever it raised
        message = f"building `{spec.arch}` failed: {error}"
        raise SpecProblem(("model", "arch"), "model-import-failed", message) from error
    if not isinstance(model, nn.Module):
        raise SpecProblem(("model", "arch"), "model-import-failed",
                          f"`{spec.arch}` returned {type(model).__name__}, not a torch.nn.Module")
    return model


def load_weights(model: nn.Module, path: Path) -> None:
    """Load a safetensors file, or a torch checkpoint without unpickling arbitrary objects."""
    state = _read_state(path)
    state = {normalize_module_name(k): v for k, v in state.items()}
    expected = model.state_dict()
    mismatched = [f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
                  for k, v in state.items() if k in expected and expected[k].shape != v.shape]
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if mismatched or missing or unexpected:
        details = [*(f"shape mismatch {m}" for m in mismatched[:5]), *(f"missing {k}" for k in missing[:5]),
                   *(f"unexpected {k}" for k in unexpected[:5])]
        raise SpecProblem(("model", "weights"), "weights-mismatch",
                          f"the weights in {path.name} do not fit the model", notes=tuple(details),
                          help="check `arch`, `classes` and `stem` against the model that saved these weights")
    model.load_state_dict(state)


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        require_file(path, "weights file")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SpecProblem(("model", "weights"), "weights-not-found", f"no such weights file: {path}") from None
    except FileProblem as problem:
        raise SpecProblem(("model", "weights"), "unreadable-weights", str(problem), help=problem.help) from None
    except Exception as error:  # a corrupt or hostile file: never a traceback, never unpickled code
        reason = str(error) if path.suffix == ".safetensors" else load_failure(path, error)
        raise SpecProblem(("model", "weights"), "unreadable-weights", f"cannot read {path.name}: {reason}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SpecProblem(("model", "weights"), "unreadable-weights", f"{path.name} holds no state dict of tensors")
    return state
