"""Spec stage, `train` block: seed, device and the pretrain / admm / finetune phases."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, BeforeValidator, Field, field_validator

from .. import coerce as c
from .. import limits
from .. import syntax as ast
from .base import Block, int_at_least, number_at_least, positive_number, typed


class Sgd(Block):
    kind: Literal["sgd"] = "sgd"
    momentum: Annotated[float, number_at_least(0, "`momentum`")] = 0.9
    weight_decay: Annotated[float, number_at_least(0, "`weight_decay`")] = 5e-4
    nesterov: Annotated[bool, typed(c.boolean)] = False


class Adam(Block):
    kind: Literal["adam"] = "adam"
    weight_decay: Annotated[float, number_at_least(0, "`weight_decay`")] = 0.0


class ConstantSchedule(Block):
    kind: Literal["constant"] = "constant"


class CosineSchedule(Block):
    kind: Literal["cosine"] = "cosine"


class StepSchedule(Block):
    kind: Literal["step"] = "step"
    every: Annotated[int, int_at_least(1, "`every`")]
    gamma: Annotated[float, positive_number("`gamma`")] = 0.1
    positional: ClassVar[tuple[str, ...]] = ("every",)


class MultistepSchedule(Block):
    kind: Literal["multistep"] = "multistep"
    milestones: Annotated[tuple[Annotated[int, int_at_least(1, "a milestone")], ...], typed(c.items, what="epochs")]
    gamma: Annotated[float, positive_number("`gamma`")] = 0.1
    positional: ClassVar[tuple[str, ...]] = ("milestones",)

    @field_validator("milestones")
    @classmethod
    def _increasing(cls, milestones: tuple[int, ...]) -> tuple[int, ...]:
        if list(milestones) != sorted(set(milestones)):
            c.fail("out-of-range", f"milestones must increase, got {list(milestones)}", label="not increasing",
                   help="list the epochs at which the learning rate drops, in order")
        return milestones


class GeometricRho(Block):
    """rho multiplied by ``factor`` at every Z/U update, capped at ``max``."""

    kind: Literal["geometric"] = "geometric"
    factor: Annotated[float, number_at_least(1, "`factor`")]
    max: Annotated[float | None, positive_number("`max`")] = None
    positional: ClassVar[tuple[str, ...]] = ("factor",)


_OPTIMIZERS = {"sgd": Sgd, "adam": Adam}
_SCHEDULES = {"constant": ConstantSchedule, "cosine": CosineSchedule, "step": StepSchedule,
              "multistep": MultistepSchedule}
_RHO_SCHEDULES = {"constant": ConstantSchedule, "geometric": GeometricRho}
Optimizer = Annotated[Sgd | Adam, Field(discriminator="kind")]
LrSchedule = Annotated[ConstantSchedule | CosineSchedule | StepSchedule | MultistepSchedule,
                       Field(discriminator="kind")]
RhoSchedule = Annotated[ConstantSchedule | GeometricRho, Field(discriminator="kind")]


class Interval(Block):
    """How often the ADMM Z and U variables are updated: every N epochs or N steps."""

    every: int
    unit: Literal["epoch", "step"]


def _interval(value: object) -> object:
    if isinstance(value, (BaseModel, dict)):
        return value
    if not isinstance(value, ast.Measure):
        c.fail("missing-unit", f"the interval {c.describe(value)} has no unit", label="epochs or steps?",
               help="write `1 epoch` or `200 steps`")
    with c.inside("@unit"):
        unit = c.choice(value.unit, ("epoch", "epochs", "step", "steps"), what="interval unit")
    with c.inside("@amount"):
        every = int(c.at_least(c.integer(value.amount), 1, "the interval"))
    return {"every": every, "unit": unit.removesuffix("s")}


class PhaseSpec(Block):
    """A training phase: ``pretrain``, ``finetune`` (and, with more keys, ``admm``)."""

    epochs: Annotated[int, int_at_least(0, "`epochs`", limits.MAX_EPOCHS)]
    lr: Annotated[float, positive_number("`lr`")]
    optimizer: Annotated[Optimizer, typed(c.variant, family=_OPTIMIZERS, what="optimizer")] = Sgd()
    schedule: Annotated[LrSchedule, typed(c.variant, family=_SCHEDULES, what="learning-rate schedule")] = (
        CosineSchedule()
    )


class AdmmSpec(PhaseSpec):
    """``admm { ... }``: the joint phase; rho, its schedule and the Z/U update interval."""

    rho: Annotated[float, positive_number("`rho`")] = 1e-3
    rho_schedule: Annotated[RhoSchedule, typed(c.variant, family=_RHO_SCHEDULES, what="rho schedule")] = (
        ConstantSchedule()
    )
    interval: Annotated[Interval, typed(_interval)] = Interval(every=1, unit="epoch")


def _phase_or_none(value: object) -> object:
    # `admm = none` drops a base's phase (see resolve.merge); left over, it means no phase
    return None if isinstance(value, ast.Name) and value.value == "none" else value


PhaseOrNone = Annotated[PhaseSpec | None, BeforeValidator(_phase_or_none)]


class TrainSpec(Block):
    """``train { ... }``: the seed, the device and the phases."""

    seed: Annotated[int, int_at_least(0, "`seed`")] = 0
    device: Annotated[str, typed(c.choice, options=("auto", "cpu", "cuda"), what="device")] = "auto"
    # bf16: the training forward passes and the attacks that make training examples run under
    # autocast; the final evaluation is always float32.
    precision: Annotated[str, typed(c.choice, options=("fp32", "bf16"), what="precision")] = "fp32"
    pretrain: PhaseOrNone = None
    admm: Annotated[AdmmSpec | None, BeforeValidator(_phase_or_none)] = None
    finetune: PhaseOrNone = None
