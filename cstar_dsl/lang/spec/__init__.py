"""Spec stage: the validated recipe, one frozen pydantic model per block.

Values arrive as syntax nodes (from a file) or as plain Python values (from the API); the
``coerce`` functions turn both into typed settings and raise errors with stable cstar codes.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, ValidationInfo, field_validator

from .. import coerce as c
from .. import limits, registry
from .. import syntax as ast
from .base import Block, int_at_least, names, normalize_module_name, path, positive_number, typed
from .compress import (
    Budget,
    CompressSpec,
    EnergyPolicy,
    FixedPolicy,
    GlobalPolicy,
    LayerRule,
    LimitBudget,
    Policy,
    RatioBudget,
    Selector,
    UniformPolicy,
)
from .train import (
    Adam,
    AdmmSpec,
    ConstantSchedule,
    CosineSchedule,
    GeometricRho,
    Interval,
    MultistepSchedule,
    PhaseSpec,
    Sgd,
    StepSchedule,
    TrainSpec,
)

__all__ = [
    "Adam", "AdmmSpec", "Attack", "Budget", "CompressSpec", "ConstantSchedule", "CosineSchedule", "DataSpec",
    "EnergyPolicy", "EvaluateSpec", "ExportSpec", "FgsmAttack", "FixedPolicy", "GeometricRho", "GlobalPolicy",
    "Interval", "LayerRule", "LimitBudget", "ModelSpec", "MultistepSchedule", "PgdAttack", "PhaseSpec", "Policy",
    "RatioBudget", "RequirementSpec", "Selector", "Sgd", "Spec", "StepSchedule", "ThreatSpec", "TrainSpec",
    "UniformPolicy", "normalize_module_name",
]

# ------------------------------------------------------------------------ model


def _arch(value: object, info: ValidationInfo) -> str:
    name = c.text(value, example='"torchvision:resnet18"')
    if name in registry.registry_names():
        return name
    if registry.is_import_path(name) and not name.startswith(("torchvision:", "cstar:")):
        if (info.context or {}).get("allow_import"):
            return name
        c.fail("import-not-allowed", f"`{name}` would import and run your own code",
               label="a user model factory", help="pass --allow-import to allow `package.module:function` models")
    prefixed = next((f"{source}:{name}" for source in ("torchvision", "cstar")
                     if f"{source}:{name}" in registry.registry_names()), None)
    c.unknown(name, registry.registry_names(), what="model", code="unknown-model", match=prefixed)


def _input_shape(value: object) -> tuple[int, int, int]:
    dims = c.sequence(value, lambda v: int(c.at_least(c.integer(v), 1, "every input dimension")), what="sizes")
    if len(dims) != 3:
        c.fail("wrong-type", f"`input` is channels, height, width: expected 3 sizes, got {len(dims)}",
               label="expected [C, H, W]", help="for example: input = [3, 32, 32]")
    problem = limits.input_problem(dims)
    if problem:
        c.fail("out-of-range", f"`input` is too large: {problem}", label="too large",
               help=f"each side at most {limits.MAX_INPUT_SIDE}; for example: input = [3, 224, 224]")
    return dims


_STEMS = ("standard", "cifar")


class ModelSpec(Block):
    """``model { ... }``: which network, its classes and input shape, optional starting weights."""

    arch: Annotated[str, BeforeValidator(_arch)]
    classes: Annotated[int, int_at_least(2, "`classes`", limits.MAX_CLASSES)]
    input: Annotated[tuple[int, int, int], typed(_input_shape)]
    stem: Annotated[Literal["standard", "cifar"], typed(c.choice, options=_STEMS, what="stem")] = "standard"
    weights: Annotated[Path | None, typed(path)] = None
    leaf: Annotated[tuple[str, ...], typed(names, what="module names or types")] = ()


# ------------------------------------------------------------------------- data


def _split(value: object) -> float | Literal["official"]:
    if isinstance(value, (ast.Name, str)):
        return c.choice(value, ("official",), what="split")  # type: ignore[return-value]
    share = c.percent(value, "the training share", code="out-of-range")
    if not 0 < share < 1:
        c.fail("out-of-range", "the training share must lie strictly between 0% and 100%", label="outside (0%, 100%)")
    return share


class DataSpec(Block):
    """``data { ... }``: the data set, where it lives, and how it is batched and augmented."""

    dataset: Annotated[str, typed(c.choice, options=registry.DATASETS, what="data set", code="unknown-dataset")]
    root: Annotated[Path | None, typed(path)] = None
    batch_size: Annotated[int, int_at_least(1, "`batch_size`", limits.MAX_BATCH_SIZE)] = 128
    split: Annotated[float | Literal["official"] | None, typed(_split)] = None  # None: the data set's default
    augment: Annotated[str, typed(c.choice, options=("standard", "none"), what="augmentation")] = "standard"
    download: Annotated[bool, typed(c.boolean)] = False
    workers: Annotated[int, int_at_least(0, "`workers`", limits.MAX_WORKERS)] = 0
    mean: Annotated[tuple[float, ...] | None, typed(c.sequence, convert=c.number, what="numbers")] = None
    std: Annotated[tuple[float, ...] | None, typed(
        c.sequence, convert=lambda v: c.positive(c.number(v), "every std"), what="numbers")] = None


# ----------------------------------------------------------------------- threat


class ThreatSpec(Block):
    """``threat { ... }``: the attacker trained against (inputs in [0, 1], so eps is in pixels)."""

    norm: Annotated[str, typed(c.choice, options=("linf", "l2"), what="norm")]
    eps: Annotated[float, positive_number("`eps`", "eps-not-positive")]
    step: Annotated[float, positive_number("`step`")]
    steps: Annotated[int, int_at_least(1, "`steps`", limits.MAX_ATTACK_STEPS)] = 10
    random_start: Annotated[bool, typed(c.boolean)] = True
    restarts: Annotated[int, int_at_least(1, "`restarts`", limits.MAX_RESTARTS)] = 1

    @field_validator("step")
    @classmethod
    def _step_within_eps(cls, step: float, info: ValidationInfo) -> float:
        eps = info.data.get("eps")
        if eps is not None and step > eps:
            c.fail("step-exceeds-eps", f"the attack step {step:.3g} is larger than eps {eps:.3g}",
                   label="larger than eps", help="a PGD step is a fraction of eps, typically eps/4 for 10 steps",
                   related=("threat", "eps"))
        return step


# --------------------------------------------------------------------- evaluate


class PgdAttack(Block):
    """Projected gradient descent; ``eps`` and ``step`` default to the threat block's."""

    kind: Literal["pgd"] = "pgd"
    steps: Annotated[int, int_at_least(1, "`steps`", limits.MAX_ATTACK_STEPS)] = 20
    restarts: Annotated[int, int_at_least(1, "`restarts`", limits.MAX_RESTARTS)] = 1
    eps: Annotated[float | None, positive_number("`eps`", "eps-not-positive")] = None
    step: Annotated[float | None, positive_number("`step`")] = None

    @field_validator("step")
    @classmethod
    def _step_within_eps(cls, step: float | None, info: ValidationInfo) -> float | None:
        eps = info.data.get("eps")
        if step is not None and eps is not None and step > eps:
            c.fail("step-exceeds-eps", f"the attack step {step:.3g} is larger than its eps {eps:.3g}",
                   label="larger than eps", help="a PGD step is a fraction of eps, typically eps/4")
        return step


class FgsmAttack(Block):
    """The fast gradient sign method: one step of size eps."""

    kind: Literal["fgsm"] = "fgsm"
    eps: Annotated[float | None, positive_number("`eps`", "eps-not-positive")] = None


_ATTACKS: dict[str, type[Block]] = {"pgd": PgdAttack, "fgsm": FgsmAttack}
Attack = Annotated[PgdAttack | FgsmAttack, Field(discriminator="kind")]


def _attack(value: object) -> object:
    return c.variant(value, _ATTACKS, what="attack", code="unknown-attack")


class RequirementSpec(Block):
    """``require clean >= 95%``: checked after compiling; accuracy as a fraction in [0, 1]."""

    metric: Literal["clean", "robust"]
    op: Literal[">=", ">"]
    value: float


def _requirement(value: object) -> object:
    if not isinstance(value, ast.Requirement):
        return value
    bound = value.bound
    with c.inside("@subject"):
        metric = c.choice(bound.subject, ("clean", "robust"), what="requirement metric")
    if bound.op not in (">=", ">"):
        c.fail("invalid-requirement", f"a requirement is a floor: write `require {metric} >= ...`",
               label="use `>=`")
    with c.inside("@limit"):
        share = c.percent(bound.limit, "a required accuracy")
    return {"metric": metric, "op": bound.op, "value": share}


class EvaluateSpec(Block):
    """``evaluate { ... }``: the attacks reported and the accuracies required."""

    attacks: Annotated[tuple[Annotated[Attack, BeforeValidator(_attack)], ...], typed(c.items, what="attacks")] = (
        PgdAttack(),
    )
    requirements: tuple[Annotated[RequirementSpec, BeforeValidator(_requirement)], ...] = ()
    samples: Annotated[int | None, int_at_least(1, "`samples`")] = None


# ----------------------------------------------------------------------- export


_export_format = partial(c.choice, options=registry.EXPORT_FORMATS, what="export format")


class ExportSpec(Block):
    """``export { ... }``: the formats written next to the compiled model."""

    formats: Annotated[tuple[Annotated[str, typed(_export_format)], ...], typed(c.items, what="formats")] = (
        "safetensors",
    )
    opset: Annotated[int, int_at_least(17, "`opset`")] = 18  # what torch.onnx's exporter writes natively

    @field_validator("formats")
    @classmethod
    def _each_once(cls, formats: tuple[str, ...]) -> tuple[str, ...]:
        repeated = sorted({f for f in formats if formats.count(f) > 1})
        if repeated:
            c.fail("duplicate-key", f"export format `{repeated[0]}` is listed twice", label="listed twice",
                   help="list each format once")
        return formats


# ------------------------------------------------------------------------- spec


class Spec(Block):
    """A whole validated recipe."""

    model: ModelSpec
    data: DataSpec
    threat: ThreatSpec
    compress: CompressSpec
    train: TrainSpec
    evaluate: EvaluateSpec = EvaluateSpec()
    export: ExportSpec = ExportSpec()
