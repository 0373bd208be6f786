"""Artifacts: the compiled model as ``model.safetensors`` + ``model.json``, and ``load`` to rebuild it.

``model.json`` says how to rebuild the structure (the architecture, and either the factorized
layers' ranks or nothing for a dense or channel-pruned model, whose shapes the weights carry), so
``cstar_dsl.load(folder)`` needs neither the recipe nor the code that trained it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from . import checkpoint, limits, models, rewrite
from .prune import resize_to
from .spec import ModelSpec

SCHEMA = "cstar.model/1"
WEIGHTS, DESCRIPTION = "model.safetensors", "model.json"


class ArtifactError(Exception):
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
    checkpoint.write_atomic(folder / WEIGHTS, lambda handle: handle.write(payload))
    checkpoint.write_text(folder / DESCRIPTION, json.dumps(description, indent=2) + "\n")


def build_structure(model_spec: ModelSpec, structure: dict[str, Any], state: dict[str, Any] | None,
                    *, allow_import: bool = False) -> nn.Module:
    """The network (without normalization) in the saved structure, its weights not yet loaded.

    ``state`` holds the network's own state-dict entries; a pruned structure takes its shapes from them.
    """
    net = models.build_model(model_spec, allow_import=allow_import)
    kind = structure.get("kind", "dense")
    if kind == "factorized":
        ranks = {name: tuple(r) for name, r in structure["ranks"].items()}
        return rewrite.factorize_ranks(net, ranks, leaves=model_spec.leaf, decompose=False)
    if kind == "pruned":
        if state is None:
            raise ArtifactError("a pruned structure needs the saved weights for its shapes")
        return resize_to(net, state)
    return net


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


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def load(folder: str | Path, *, allow_import: bool = False) -> nn.Module:
    """The compiled model in ``folder`` (images in [0, 1] in, logits out), in eval mode, on the CPU.

    Raises:
        ArtifactError: the folder lacks ``model.json`` or ``model.safetensors``, or they do not match.
    """
    folder = Path(folder)
    for name in (DESCRIPTION, WEIGHTS):
        if not (folder / name).is_file():
            raise ArtifactError(f"{folder} holds no compiled model: {name} is missing")
    try:
        description = json.loads((folder / DESCRIPTION).read_text())
    except (OSError, ValueError) as error:
        raise ArtifactError(f"cannot read {folder / DESCRIPTION}: {error}") from None
    if not isinstance(description, dict) or description.get("schema") != SCHEMA:
        raise ArtifactError(f"{folder / DESCRIPTION} is not a cstar model description ({SCHEMA})")
    problem = size_problem(description)
    if problem:
        raise ArtifactError(f"{folder / DESCRIPTION} asks for {problem}; refused before building anything")
    try:
        state = load_file(str(folder / WEIGHTS))
    except Exception as error:  # safetensors raises its own error type for a damaged file
        raise ArtifactError(f"cannot read {folder / WEIGHTS}: {error}") from None
    model_spec = ModelSpec.model_validate(description["model"], context={"allow_import": allow_import})
    inner = {name.removeprefix("model."): t for name, t in state.items() if name.startswith("model.")}
    net = build_structure(model_spec, description["structure"], inner, allow_import=allow_import)
    normalize = description["normalize"]
    model = models.Normalized(net, tuple(normalize["mean"]), tuple(normalize["std"]))
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise ArtifactError(f"the weights in {folder / WEIGHTS} do not fit {folder / DESCRIPTION}: {error}") from None
    return model.eval()
