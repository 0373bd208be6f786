"""Spec stage: the validated recipe, one frozen pydantic model per block.

Values arrive as syntax nodes (from a file) or as plain Python values (from the API); the
``coerce`` functions turn both into typed settings and raise errors with stable cstar codes.
"""

from __future__ import annotations

import fnmatch
from functools import partial
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, field_validator

from . import coerce as c
from . import registry
from . import syntax as ast

_MODULE_PREFIXES = ("module.", "_orig_mod.")


class _Block(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _typed(function: Any, /, **options: Any) -> BeforeValidator:
    """A before-validator from a coerce function; None (an unset optional) passes through."""
    convert = partial(function, **options) if options else function
    return BeforeValidator(lambda value: None if value is None else convert(value))


def _int_at_least(low: int, what: str) -> BeforeValidator:
    return _typed(lambda v: int(c.at_least(c.integer(v), low, what)))


def _positive_number(what: str, code: str = "out-of-range") -> BeforeValidator:
    return _typed(lambda v: c.positive(c.number(v), what, code=code))


def _number_at_least(low: float, what: str) -> BeforeValidator:
    return _typed(lambda v: c.at_least(c.number(v), low, what))


def _path(value: object) -> Path:
    """A path; relative paths resolve against the folder of the recipe that wrote them."""
    if isinstance(value, Path):
        return value
    raw = Path(c.text(value, example='"data/mnist"'))
    if raw.is_absolute():
        return raw
    base = Path(value.span.source.path).resolve().parent if isinstance(value, ast.String) else Path.cwd()
    return (base / raw).resolve()


def _names(value: object, what: str) -> tuple[str, ...]:
    return c.sequence(value, lambda v: c.text(v, example='"layer4.1.conv2"'), what=what)


def normalize_module_name(name: str) -> str:
    """Drop the wrapper prefixes that DDP and torch.compile add (``module.``, ``_orig_mod.``)."""
    while name.startswith(_MODULE_PREFIXES):
        name = name.split(".", 1)[1]
    return name


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
    c.unknown(name, registry.registry_names(), what="model", code="unknown-model")


def _input_shape(value: object) -> tuple[int, int, int]:
    dims = c.sequence(value, lambda v: int(c.at_least(c.integer(v), 1, "every input dimension")), what="sizes")
    if len(dims) != 3:
        c.fail("wrong-type", f"`input` is channels, height, width: expected 3 sizes, got {len(dims)}",
               label="expected [C, H, W]", help="for example: input = [3, 32, 32]")
    return dims  # type: ignore[return-value]


class ModelSpec(_Block):
    """``model { ... }``: which network, its classes and input shape, optional starting weights."""

    arch: Annotated[str, BeforeValidator(_arch)]
    classes: Annotated[int, _int_at_least(2, "`classes`")]
    input: Annotated[tuple[int, int, int], _typed(_input_shape)]
    stem: Annotated[Literal["standard", "cifar"], _typed(c.choice, options=("standard", "cifar"), what="stem")] = "standard"
    weights: Annotated[Path | None, _typed(_path)] = None
    leaf: Annotated[tuple[str, ...], _typed(_names, what="module names or types")] = ()


# ------------------------------------------------------------------------- data


def _split(value: object) -> float | Literal["official"]:
    if isinstance(value, (ast.Name, str)):
        return c.choice(value, ("official",), what="split")  # type: ignore[return-value]
    share = c.percent(value, "the training share")
    if not 0 < share < 1:
        c.fail("out-of-range", "the training share must lie strictly between 0% and 100%", label="outside (0%, 100%)")
    return share


class DataSpec(_Block):
    """``data { ... }``: the data set, where it lives, and how it is batched and augmented."""

    dataset: Annotated[str, _typed(c.choice, options=registry.DATASETS, what="data set", code="unknown-dataset")]
    root: Annotated[Path | None, _typed(_path)] = None
    batch_size: Annotated[int, _int_at_least(1, "`batch_size`")] = 128
    split: Annotated[float | Literal["official"], _typed(_split)] = "official"
    augment: Annotated[str, _typed(c.choice, options=("standard", "none"), what="augmentation")] = "standard"
    download: Annotated[bool, _typed(c.boolean)] = False
    workers: Annotated[int, _int_at_least(0, "`workers`")] = 0
    mean: Annotated[tuple[float, ...] | None, _typed(c.sequence, convert=c.number, what="numbers")] = None
    std: Annotated[tuple[float, ...] | None, _typed(
        c.sequence, convert=lambda v: c.positive(c.number(v), "every std"), what="numbers")] = None


# ----------------------------------------------------------------------- threat


class ThreatSpec(_Block):
    """``threat { ... }``: the attacker trained against (inputs in [0, 1], so eps is in pixels)."""

    norm: Annotated[str, _typed(c.choice, options=("linf", "l2"), what="norm")]
    eps: Annotated[float, _positive_number("`eps`", "eps-not-positive")]
    step: Annotated[float, _positive_number("`step`")]
    steps: Annotated[int, _int_at_least(1, "`steps`")] = 10
    random_start: Annotated[bool, _typed(c.boolean)] = True
    restarts: Annotated[int, _int_at_least(1, "`restarts`")] = 1

    @field_validator("step")
    @classmethod
    def _step_within_eps(cls, step: float, info: ValidationInfo) -> float:
        eps = info.data.get("eps")
        if eps is not None and step > eps:
            c.fail("step-exceeds-eps", f"the attack step {step:.3g} is larger than eps {eps:.3g}",
                   label="larger than eps", help="a PGD step is a fraction of eps, typically eps/4 for 10 steps")
        return step


# --------------------------------------------------------------------- compress


class RatioBudget(_Block):
    """``16x params`` or ``4x macs``: the dense count divided by this ratio."""

    kind: Literal["ratio"] = "ratio"
    metric: Literal["params", "macs"]
    ratio: float


class LimitBudget(_Block):
    """``params <= 700k`` or ``macs <= 0.5G``: an absolute ceiling."""

    kind: Literal["limit"] = "limit"
    metric: Literal["params", "macs"]
    limit: float


Budget = Annotated[Union[RatioBudget, LimitBudget], Field(discriminator="kind")]
_BUDGET_HELP = "write the budget with its unit: `16x params`, `4x macs`, `params <= 700k` or `macs <= 0.5G`"


def _budget(value: object) -> object:
    if isinstance(value, (BaseModel, dict)):
        return value
    if isinstance(value, ast.Measure):
        metric = c.choice(value.unit, ("params", "macs"), what="budget metric")
        return {"kind": "ratio", "metric": metric, "ratio": c.ratio(value.amount, "the budget")}
    if isinstance(value, ast.Bound):
        metric = c.choice(value.subject, ("params", "macs"), what="budget metric")
        if value.op not in ("<=", "<"):
            c.fail("invalid-budget", f"a budget is a ceiling: write `{metric} <= ...`", label="use `<=`")
        return {"kind": "limit", "metric": metric, "limit": _absolute(value.limit)}
    if isinstance(value, ast.Quantity) and value.unit == "x":
        c.fail("missing-unit", f"`{value.text}` of what? A budget names its metric",
               label="add `params` or `macs`", help=_BUDGET_HELP)
    c.fail("missing-unit", f"the budget {c.describe(value)} has no unit", label="no unit", help=_BUDGET_HELP)


def _absolute(value: object) -> float:
    amount = value.scaled if isinstance(value, ast.Quantity) and value.unit in ast.SCALE else c.number(value)
    return c.positive(amount, "a budget limit")


class GlobalPolicy(_Block):
    """Ranks chosen jointly for the whole model under the budget, keeping the most spectral energy."""

    kind: Literal["global"] = "global"


class UniformPolicy(_Block):
    """The same compression ratio for every factorized layer."""

    kind: Literal["uniform"] = "uniform"


class EnergyPolicy(_Block):
    """Each layer keeps the smallest ranks that hold ``threshold`` of its spectral energy."""

    kind: Literal["energy"] = "energy"
    threshold: float
    positional: ClassVar[tuple[str, ...]] = ("threshold",)

    @field_validator("threshold", mode="before")
    @classmethod
    def _in_unit_interval(cls, value: object) -> float:
        share = value.scaled if isinstance(value, ast.Quantity) and value.unit == "%" else c.number(value)
        if not 0 < share <= 1:
            c.fail("energy-out-of-range", f"the energy to keep must lie in (0, 1], got {share:g}",
                   label="outside (0, 1]", help="for example energy(0.95) or energy(95%)")
        return share


class FixedPolicy(_Block):
    """Ranks exactly as the ``layer`` rules give them."""

    kind: Literal["fixed"] = "fixed"


_POLICIES = {"global": GlobalPolicy, "uniform": UniformPolicy, "energy": EnergyPolicy, "fixed": FixedPolicy}
Policy = Annotated[Union[GlobalPolicy, UniformPolicy, EnergyPolicy, FixedPolicy], Field(discriminator="kind")]


class Selector(_Block):
    """Which layers a rule applies to: an exact module name, a glob, or a layer type."""

    kind: Literal["name", "glob", "type"]
    pattern: str

    def matches(self, name: str, layer_type: str) -> bool:
        if self.kind == "type":
            return layer_type == self.pattern
        name = normalize_module_name(name)
        return name == self.pattern if self.kind == "name" else fnmatch.fnmatchcase(name, self.pattern)

    def __str__(self) -> str:
        return f"type {self.pattern}" if self.kind == "type" else f'"{self.pattern}"'


def _selector(value: object) -> object:
    if isinstance(value, (BaseModel, dict)):
        return value
    if isinstance(value, ast.Call):  # `layer type Conv2d`, lowered as type(Conv2d)
        layer_type = c.choice(value.args[0], registry.FACTORIZABLE_LAYER_TYPES, what="layer type",
                              code="unknown-layer-type")
        return {"kind": "type", "pattern": layer_type}
    pattern = normalize_module_name(c.text(value))
    if not pattern:
        c.fail("invalid-selector", "an empty selector matches no layer", label="empty")
    return {"kind": "glob" if any(ch in pattern for ch in "*?[") else "name", "pattern": pattern}


def _rank(value: object) -> int | tuple[int, int]:
    if isinstance(value, ast.List) or isinstance(value, (list, tuple)):
        ranks = c.sequence(value, lambda v: int(c.at_least(c.integer(v), 1, "a rank")), what="ranks")
        if len(ranks) != 2:
            c.fail("wrong-type", f"a Tucker-2 rank pair has 2 entries (input, output), got {len(ranks)}",
                   label="expected [r_in, r_out]")
        return ranks  # type: ignore[return-value]
    return int(c.at_least(c.integer(value, example="8"), 1, "a rank"))


class LayerRule(_Block):
    """``layer <selector> { ... }``: per-layer ratio, rank, rank bounds, or staying dense."""

    selector: Annotated[Selector, _typed(_selector)]
    ratio: Annotated[float | None, _typed(c.ratio, what="a layer's ratio")] = None
    rank: Annotated[int | tuple[int, int] | None, _typed(_rank)] = None
    min_rank: Annotated[int | None, _int_at_least(1, "`min_rank`")] = None
    max_rank: Annotated[int | None, _int_at_least(1, "`max_rank`")] = None
    dense: Annotated[bool, _typed(c.boolean)] = False

    @field_validator("rank")
    @classmethod
    def _rank_or_ratio(cls, rank: object, info: ValidationInfo) -> object:
        if rank is not None and info.data.get("ratio") is not None:
            c.fail("conflicting-keys", "a layer rule sets both `ratio` and `rank`", label="remove one",
                   help="`rank` fixes the ranks, `ratio` lets them follow from the layer's size")
        return rank

    @field_validator("max_rank")
    @classmethod
    def _bounds_ordered(cls, high: int | None, info: ValidationInfo) -> int | None:
        low = info.data.get("min_rank")
        if high is not None and low is not None and low > high:
            c.fail("rank-bounds", f"`min_rank` {low} is larger than `max_rank` {high}", label="below min_rank")
        return high

    @field_validator("dense")
    @classmethod
    def _dense_alone(cls, dense: bool, info: ValidationInfo) -> bool:
        others = [k for k in ("ratio", "rank", "min_rank", "max_rank") if info.data.get(k) is not None]
        if dense and others:
            c.fail("conflicting-keys", f"a dense layer has no ranks, but this rule also sets `{others[0]}`",
                   label="dense with ranks", help="drop `dense = true` or the rank settings")
        return dense


class CompressSpec(_Block):
    """``compress { ... }``: the method, the budget, the rank policy and per-layer rules."""

    method: Annotated[str, _typed(c.choice, options=registry.METHODS, what="method", code="unknown-method")]
    budget: Annotated[Budget, _typed(_budget)]
    policy: Annotated[Policy, _typed(c.variant, family=_POLICIES, what="rank policy", code="unknown-policy")] = GlobalPolicy()
    keep: Annotated[tuple[str, ...], _typed(_names, what="module names")] = ()
    min_rank: Annotated[int | None, _int_at_least(1, "`min_rank`")] = None
    hooi_sweeps: Annotated[int, _int_at_least(0, "`hooi_sweeps`")] = 0
    layers: tuple[LayerRule, ...] = ()

    @field_validator("keep", mode="after")
    @classmethod
    def _normalized(cls, keep: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(normalize_module_name(name) for name in keep)


# ------------------------------------------------------------------------ train


class Sgd(_Block):
    kind: Literal["sgd"] = "sgd"
    momentum: Annotated[float, _number_at_least(0, "`momentum`")] = 0.9
    weight_decay: Annotated[float, _number_at_least(0, "`weight_decay`")] = 5e-4
    nesterov: Annotated[bool, _typed(c.boolean)] = False


class Adam(_Block):
    kind: Literal["adam"] = "adam"
    weight_decay: Annotated[float, _number_at_least(0, "`weight_decay`")] = 0.0


class ConstantSchedule(_Block):
    kind: Literal["constant"] = "constant"


class CosineSchedule(_Block):
    kind: Literal["cosine"] = "cosine"


class StepSchedule(_Block):
    kind: Literal["step"] = "step"
    every: Annotated[int, _int_at_least(1, "`every`")]
    gamma: Annotated[float, _positive_number("`gamma`")] = 0.1
    positional: ClassVar[tuple[str, ...]] = ("every",)


class MultistepSchedule(_Block):
    kind: Literal["multistep"] = "multistep"
    milestones: Annotated[tuple[int, ...], _typed(c.sequence, convert=c.integer, what="epochs")]
    gamma: Annotated[float, _positive_number("`gamma`")] = 0.1
    positional: ClassVar[tuple[str, ...]] = ("milestones",)


class GeometricRho(_Block):
    """rho multiplied by ``factor`` at every Z/U update, capped at ``max``."""

    kind: Literal["geometric"] = "geometric"
    factor: Annotated[float, _number_at_least(1, "`factor`")]
    max: Annotated[float | None, _positive_number("`max`")] = None
    positional: ClassVar[tuple[str, ...]] = ("factor",)


_OPTIMIZERS = {"sgd": Sgd, "adam": Adam}
_SCHEDULES = {"constant": ConstantSchedule, "cosine": CosineSchedule, "step": StepSchedule,
              "multistep": MultistepSchedule}
_RHO_SCHEDULES = {"constant": ConstantSchedule, "geometric": GeometricRho}
Optimizer = Annotated[Union[Sgd, Adam], Field(discriminator="kind")]
LrSchedule = Annotated[Union[ConstantSchedule, CosineSchedule, StepSchedule, MultistepSchedule],
                       Field(discriminator="kind")]
RhoSchedule = Annotated[Union[ConstantSchedule, GeometricRho], Field(discriminator="kind")]


class Interval(_Block):
    """How often the ADMM Z and U variables are updated: every N epochs or N steps."""

    every: int
    unit: Literal["epoch", "step"]


def _interval(value: object) -> object:
    if isinstance(value, (BaseModel, dict)):
        return value
    if not isinstance(value, ast.Measure):
        c.fail("missing-unit", f"the interval {c.describe(value)} has no unit", label="epochs or steps?",
               help="write `1 epoch` or `200 steps`")
    unit = c.choice(value.unit, ("epoch", "epochs", "step", "steps"), what="interval unit")
    every = int(c.at_least(c.integer(value.amount), 1, "the interval"))
    return {"every": every, "unit": unit.removesuffix("s")}


class PhaseSpec(_Block):
    """A training phase: ``pretrain``, ``finetune`` (and, with more keys, ``admm``)."""

    epochs: Annotated[int, _int_at_least(0, "`epochs`")]
    lr: Annotated[float, _positive_number("`lr`")]
    optimizer: Annotated[Optimizer, _typed(c.variant, family=_OPTIMIZERS, what="optimizer")] = Sgd()
    schedule: Annotated[LrSchedule, _typed(c.variant, family=_SCHEDULES, what="learning-rate schedule")] = CosineSchedule()


class AdmmSpec(PhaseSpec):
    """``admm { ... }``: the joint phase; rho, its schedule and the Z/U update interval."""

    rho: Annotated[float, _positive_number("`rho`")] = 1e-3
    rho_schedule: Annotated[RhoSchedule, _typed(c.variant, family=_RHO_SCHEDULES, what="rho schedule")] = ConstantSchedule()
    interval: Annotated[Interval, _typed(_interval)] = Interval(every=1, unit="epoch")


class TrainSpec(_Block):
    """``train { ... }``: the seed, the device and the phases."""

    seed: Annotated[int, _int_at_least(0, "`seed`")] = 0
    device: Annotated[str, _typed(c.choice, options=("auto", "cpu", "cuda"), what="device")] = "auto"
    pretrain: PhaseSpec | None = None
    admm: AdmmSpec | None = None
    finetune: PhaseSpec | None = None


# --------------------------------------------------------------------- evaluate


class PgdAttack(_Block):
    """Projected gradient descent; ``eps`` and ``step`` default to the threat block's."""

    kind: Literal["pgd"] = "pgd"
    steps: Annotated[int, _int_at_least(1, "`steps`")] = 20
    restarts: Annotated[int, _int_at_least(1, "`restarts`")] = 1
    eps: Annotated[float | None, _positive_number("`eps`", "eps-not-positive")] = None
    step: Annotated[float | None, _positive_number("`step`")] = None


class FgsmAttack(_Block):
    """The fast gradient sign method: one step of size eps."""

    kind: Literal["fgsm"] = "fgsm"
    eps: Annotated[float | None, _positive_number("`eps`", "eps-not-positive")] = None


_ATTACKS = {"pgd": PgdAttack, "fgsm": FgsmAttack}
Attack = Annotated[Union[PgdAttack, FgsmAttack], Field(discriminator="kind")]


def _attack(value: object) -> object:
    return c.variant(value, _ATTACKS, what="attack", code="unknown-attack")


class RequirementSpec(_Block):
    """``require clean >= 95%``: checked after compiling; accuracy as a fraction in [0, 1]."""

    metric: Literal["clean", "robust"]
    op: Literal[">=", ">"]
    value: float


def _requirement(value: object) -> object:
    if not isinstance(value, ast.Requirement):
        return value
    bound = value.bound
    metric = c.choice(bound.subject, ("clean", "robust"), what="requirement metric")
    if bound.op not in (">=", ">"):
        c.fail("invalid-requirement", f"a requirement is a floor: write `require {metric} >= ...`",
               label="use `>=`")
    return {"metric": metric, "op": bound.op, "value": c.percent(bound.limit, "a required accuracy")}


class EvaluateSpec(_Block):
    """``evaluate { ... }``: the attacks reported and the accuracies required."""

    attacks: Annotated[tuple[Attack, ...], _typed(c.sequence, convert=_attack, what="attacks")] = (PgdAttack(),)
    requirements: tuple[Annotated[RequirementSpec, BeforeValidator(_requirement)], ...] = ()
    samples: Annotated[int | None, _int_at_least(1, "`samples`")] = None


# ----------------------------------------------------------------------- export


class ExportSpec(_Block):
    """``export { ... }``: the formats written next to the compiled model."""

    formats: Annotated[tuple[str, ...], _typed(
        c.sequence, convert=partial(c.choice, options=registry.EXPORT_FORMATS, what="export format"), what="formats")] = ("safetensors",)
    opset: Annotated[int, _int_at_least(17, "`opset`")] = 17


# ------------------------------------------------------------------------- spec


class Spec(_Block):
    """A whole validated recipe."""

    model: ModelSpec
    data: DataSpec
    threat: ThreatSpec
    compress: CompressSpec
    train: TrainSpec
    evaluate: EvaluateSpec = EvaluateSpec()
    export: ExportSpec = ExportSpec()
