"""Artifacts: the compiled model as ``model.safetensors`` + ``model.json``, and ``load`` to rebuild it.

``model.json`` says how to rebuild the structure (the architecture, and the factorized layers' ranks, with the
pruned shapes they factorize for a joint structure; nothing for a dense or channel-pruned model, whose shapes the
weights carry), so ``cstar_dsl.load(folder)`` needs neither the recipe nor the code that trained it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeGuard

import torch
from pydantic import ValidationError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from .. import files
from ..errors import RunError
from ..lang import limits
from ..lang.problems import SpecProblem
from ..lang.spec import ModelSpec
from ..model import rewrite
from ..model import zoo as models
from ..model.prune import resize_to

# /2 adds the joint structure (channels pruned, then factorized); a /1 file reads the same way.
SCHEMA = "cstar.model/2"
_READABLE = ("cstar.model/1", SCHEMA)
_KINDS = ("dense", "factorized", "pruned", "joint")
WEIGHTS, DESCRIPTION = "model.safetensors", "model.json"


class ArtifactError(RunError):
    """A folder that holds no loadable cstar model; says what is missing."""


def model_description(model_spec: ModelSpec, method: str, structure: dict[str, Any],
                      mean: tuple[float, ...], std: tuple[float, ...]) -> dict[str, Any]:
    """What ``load`` needs: architecture (without the starting-weights path), structure, normalization."""
    return {
        "schema": SCHEMA,
        "model": model_spec.model_dump(mode="json", exclude={"weights"}),
        "method": method,
        "structure": structure,
        "normalize": {"mean": list(mean), "std": list(std)},
    }


def save_model(folder: Path, model: nn.Module, description: dict[str, Any]) -> None:
    """``model.safetensors`` (the whole normalized model's state) and ``model.json``, each atomically."""
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    payload = safetensors_bytes(state, metadata={"schema": SCHEMA})
    files.write_bytes(folder / WEIGHTS, payload)
    files.write_text(folder / DESCRIPTION, json.dumps(description, indent=2) + "\n")


def build_structure(model_spec: ModelSpec, structure: dict[str, Any], state: dict[str, Any] | None,
                    *, allow_import: bool = False) -> nn.Module:
    """The network (without normalization) in the saved structure, its weights not yet loaded.

    ``state`` holds the network's own state-dict entries; a pruned structure takes its shapes from them.
    """
    net = models.build_model(model_spec, allow_import=allow_import)
    kind = structure.get("kind", "dense")
    if kind in ("pruned", "joint") and state is None:
        raise ArtifactError(f"a {kind} structure needs the saved weights for its shapes")
    if kind == "joint":
        assert state is not None
        ranks = _factorized_ranks(net, structure.get("ranks"))
        # A factorized layer's pruned shape is in model.json (its weights hold the factors), the others' in the state.
        net = resize_to(net, {**state, **_pruned_shapes(net, structure.get("shapes"), ranks)})
        return rewrite.factorize_ranks(net, ranks, leaves=model_spec.leaf, decompose=False)
    if kind == "factorized":
        ranks = _factorized_ranks(net, structure.get("ranks"))
        return rewrite.factorize_ranks(net, ranks, leaves=model_spec.leaf, decompose=False)
    if kind == "pruned":
        assert state is not None
        return resize_to(net, state)
    return net


def _pruned_shapes(net: nn.Module, shapes: object, ranks: Mapping[str, object]) -> dict[str, torch.Tensor]:
    """Each factorized layer's pruned weight shape, as an empty tensor under its state-dict key: checked to be a
    shrunk copy of the dense layer's, so a hostile ``model.json`` can neither grow a layer nor leave one out."""
    if not isinstance(shapes, dict) or set(shapes) != set(ranks):
        raise ArtifactError("the joint structure needs `shapes`: the pruned weight shape of every factorized layer")
    found = {}
    for name, shape in shapes.items():
        dense = tuple(net.get_parameter(f"{name}.weight").shape)
        # Pruning removes outputs and inputs only: a kernel keeps its size.
        if (not isinstance(shape, list) or len(shape) != len(dense) or shape[2:] != list(dense[2:])
                or not all(type(s) is int and 1 <= s <= d for s, d in zip(shape, dense, strict=True))):  # noqa: E721
            raise ArtifactError(f"layer {name!r} has the pruned shape {shape!r}: expected {len(dense)} whole numbers, "
                                f"each from 1 to the dense shape {list(dense)}, the kernel's the same")
        found[f"{name}.weight"] = torch.empty(shape, device="meta")
    return found


def _factorized_ranks(net: nn.Module, ranks: object) -> dict[str, tuple[int, ...]]:
    """The saved ranks, each checked against the layer it names: a damaged or hostile ``model.json``
    must say what is wrong, not fail deep inside torch."""
    if not isinstance(ranks, dict):
        raise ArtifactError("the factorized structure has no `ranks` mapping of layer names to ranks")
    layers = dict(net.named_modules())
    checked = {}
    for name, rank in ranks.items():
        layer = layers.get(name)
        if not isinstance(layer, (nn.Linear, nn.Conv2d)):
            what = "no such layer" if layer is None else f"a {type(layer).__name__}, not a Linear or Conv2d"
            raise ArtifactError(f"the structure factorizes layer {name!r}: {what} in {type(net).__name__}")
        count = 2 if isinstance(layer, nn.Conv2d) else 1
        if (not isinstance(rank, list) or len(rank) != count
                or not all(type(r) is int and r >= 1 for r in rank)):  # noqa: E721 (a bool is no rank)
            raise ArtifactError(f"layer {name!r} has ranks {rank!r}: expected a list of {count} positive "
                                f"whole number{'s' * (count > 1)}")
        checked[name] = tuple(rank)
    return checked


def _read_description(folder: Path) -> dict[str, Any]:
    path = folder / DESCRIPTION
    try:
        description = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ArtifactError(f"cannot read {path}: {error}") from None
    if not isinstance(description, dict) or description.get("schema") not in _READABLE:
        raise ArtifactError(f"{path} is not a cstar model description ({' or '.join(_READABLE)})")
    return description


def _check_layout(description: dict[str, Any], path: Path) -> None:
    normalize = description.get("normalize")
    if (not isinstance(description.get("structure"), dict) or not isinstance(normalize, dict)
            or not all(_numbers(normalize.get(key)) for key in ("mean", "std"))):
        raise ArtifactError(f"{path} lacks a `structure` or a `normalize` with `mean` and `std` lists of numbers")
    if description["structure"].get("kind", "dense") not in _KINDS:
        raise ArtifactError(f"{path} has an unknown structure kind {description['structure'].get('kind')!r}")


def _numbers(value: object) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)


def _model_spec(description: dict[str, Any], path: Path, allow_import: bool) -> ModelSpec:
    try:
        return ModelSpec.model_validate(description.get("model"), context={"allow_import": allow_import})
    except ValidationError as error:
        reasons = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'model'}: {e['msg']}" for e in error.errors())
        raise ArtifactError(f"{path} describes a model cstar cannot build: {reasons}") from None


def size_problem(description: dict[str, Any]) -> str | None:
    """What in an (edited) ``model.json`` is too large to build: classes, input or ranks past the
    bounds a recipe has (``cstar_dsl.limits``), or None. Only numbers are judged here."""
    model = description.get("model")
    model = model if isinstance(model, dict) else {}
    classes, shape = model.get("classes"), model.get("input")
    if _whole(classes) and classes > limits.MAX_CLASSES:
        return f"{classes} classes (at most {limits.MAX_CLASSES})"
    if isinstance(shape, list) and all(_whole(side) for side in shape):
        found = limits.input_problem(shape)
        if found:
            return found
    structure = description.get("structure")
    ranks = structure.get("ranks") if isinstance(structure, dict) else None
    for name, pair in (ranks.items() if isinstance(ranks, dict) else ()):
        largest = max((r for r in pair if _whole(r)), default=0) if isinstance(pair, list) else 0
        if largest > limits.MAX_RANK:
            return f"rank {largest} for {str(name)[:100]} (at most {limits.MAX_RANK})"
    return None


def _whole(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def load(folder: str | Path, *, allow_import: bool = False) -> nn.Module:
    """The compiled model in ``folder`` (images in [0, 1] in, logits out), in eval mode, on the CPU.

    Raises:
        ArtifactError: the folder lacks ``model.json`` or ``model.safetensors``, or they do not match.
    """
    folder = Path(folder)
    for name in (DESCRIPTION, WEIGHTS):
        try:
            files.require_file(folder / name)
        except FileNotFoundError:
            raise ArtifactError(f"{folder} holds no compiled model: {name} is missing") from None
        except files.FileProblem as problem:
            raise ArtifactError(str(problem)) from None
    description = _read_description(folder)
    too_large = size_problem(description)
    if too_large:
        raise ArtifactError(f"{folder / DESCRIPTION} asks for {too_large}; refused before building anything")
    try:
        state = load_file(str(folder / WEIGHTS))
    except Exception as error:  # safetensors raises its own error type for a damaged file
        raise ArtifactError(f"cannot read {folder / WEIGHTS}: {error}") from None
    _check_layout(description, folder / DESCRIPTION)
    model_spec = _model_spec(description, folder / DESCRIPTION, allow_import)
    inner = {name.removeprefix("model."): t for name, t in state.items() if name.startswith("model.")}
    try:
        net = build_structure(model_spec, description["structure"], inner, allow_import=allow_import)
    except SpecProblem as problem:
        raise ArtifactError(f"{folder / DESCRIPTION}: {problem.message}") from None
    normalize = description["normalize"]
    model = models.Normalized(net, tuple(normalize["mean"]), tuple(normalize["std"]))
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise ArtifactError(f"the weights in {folder / WEIGHTS} do not fit {folder / DESCRIPTION}: {error}") from None
    return model.eval()
