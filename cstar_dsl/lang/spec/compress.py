"""Spec stage, `compress` block: method, budget, rank policy, `keep` and per-layer rules."""

from __future__ import annotations

import fnmatch
import math
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, Field, ValidationInfo, field_validator

from .. import coerce as c
from .. import limits, registry
from .. import syntax as ast
from ..render import si
from .base import Block, int_at_least, names, normalize_module_name, typed


class RatioBudget(Block):
    """``16x params`` or ``4x macs``: the dense count divided by this ratio."""

    kind: Literal["ratio"] = "ratio"
    metric: Literal["params", "macs"]
    ratio: float

    def text(self) -> str:
        """The budget as a recipe writes it: ``16x params``."""
        return f"{self.ratio:g}x {self.metric}"


class LimitBudget(Block):
    """``params <= 700k`` or ``macs <= 0.5G``: an absolute ceiling."""

    kind: Literal["limit"] = "limit"
    metric: Literal["params", "macs"]
    limit: float

    def text(self) -> str:
        """The budget as a recipe writes it: ``params <= 700k``."""
        return f"{self.metric} <= {si(self.limit)}"


Budget = Annotated[RatioBudget | LimitBudget, Field(discriminator="kind")]
_BUDGET_HELP = "write the budget with its unit: `16x params`, `4x macs`, `params <= 700k` or `macs <= 0.5G`"


def _budget(value: object) -> object:
    if isinstance(value, (BaseModel, dict)):
        return value
    if isinstance(value, ast.Measure):
        with c.inside("@unit"):
            metric = c.choice(value.unit, ("params", "macs"), what="budget metric")
        with c.inside("@amount"):
            return {"kind": "ratio", "metric": metric, "ratio": c.ratio(value.amount, "the budget")}
    if isinstance(value, ast.Bound):
        with c.inside("@subject"):
            metric = c.choice(value.subject, ("params", "macs"), what="budget metric")
        if value.op not in ("<=", "<"):
            c.fail("invalid-budget", f"a budget is a ceiling: write `{metric} <= ...`", label="use `<=`")
        with c.inside("@limit"):
            return {"kind": "limit", "metric": metric, "limit": _absolute(value.limit)}
    if isinstance(value, ast.Quantity) and value.unit == "x":
        c.fail("missing-unit", f"`{value.text}` of what? A budget names its metric",
               label="add `params` or `macs`", help=_BUDGET_HELP)
    c.fail("missing-unit", f"the budget {c.describe(value)} has no unit", label="no unit", help=_BUDGET_HELP)


def _absolute(value: object) -> float:
    amount = value.scaled if isinstance(value, ast.Quantity) and value.unit in ast.SCALE else c.number(value)
    if not math.isfinite(amount):
        c.fail("out-of-range", f"{c.describe(value)} is too large", label="not a finite limit")
    return c.positive(amount, "a budget limit")


class GlobalPolicy(Block):
    """Ranks chosen jointly for the whole model under the budget, keeping the most spectral energy."""

    kind: Literal["global"] = "global"


class UniformPolicy(Block):
    """The same compression ratio for every factorized layer."""

    kind: Literal["uniform"] = "uniform"


class EnergyPolicy(Block):
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


class FixedPolicy(Block):
    """Ranks exactly as the ``layer`` rules give them."""

    kind: Literal["fixed"] = "fixed"


_POLICIES = {"global": GlobalPolicy, "uniform": UniformPolicy, "energy": EnergyPolicy, "fixed": FixedPolicy}
Policy = Annotated[GlobalPolicy | UniformPolicy | EnergyPolicy | FixedPolicy, Field(discriminator="kind")]


class Selector(Block):
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
        with c.inside(0):
            layer_type = c.choice(value.args[0], registry.FACTORIZABLE_LAYER_TYPES, what="layer type",
                                  code="unknown-layer-type")
        return {"kind": "type", "pattern": layer_type}
    pattern = normalize_module_name(c.text(value))
    if not pattern:
        c.fail("invalid-selector", "an empty selector matches no layer", label="empty")
    return {"kind": "glob" if any(ch in pattern for ch in "*?[") else "name", "pattern": pattern}


def _rank(value: object) -> int | tuple[int, int]:
    if isinstance(value, ast.List) or isinstance(value, (list, tuple)):
        ranks = c.sequence(value, _one_rank, what="ranks")
        if len(ranks) != 2:
            c.fail("wrong-type", f"a Tucker-2 rank pair has 2 entries (output, input), got {len(ranks)}",
                   label="expected [r_out, r_in]")
        return ranks
    return _one_rank(value)


def _one_rank(value: object) -> int:
    rank = int(c.at_least(c.integer(value, example="8"), 1, "a rank", written=c.shown(value)))
    return int(c.at_most(rank, limits.MAX_RANK, "a rank", written=c.shown(value)))


def _structures(value: object) -> tuple[str, ...]:
    chosen = c.sequence(value, _structure, what="structures")
    if not chosen:
        c.fail("out-of-range", "`candidates` is empty: `auto` needs at least one structure to compile",
               label="empty", help=f"list some of {', '.join(registry.STRUCTURES)}, {registry.JOINT}")
    if len(set(chosen)) != len(chosen):
        c.fail("duplicate-key", "a structure is listed twice in `candidates`", label="listed twice")
    return chosen


def _structure(value: object) -> str:
    word = value.value if isinstance(value, (ast.Name, ast.String)) else ""
    if word.startswith(f"{registry.JOINT}-") and not registry.is_joint(word):
        c.fail("unknown-option", f"unknown structure `{c.clip(word)}`: a joint structure's share of channels is a "
               f"multiple of 5 between 5 and 95, or `{registry.JOINT_FISHER}`", label="not a joint share",
               help="for example `joint-25` (channels take a quarter of the compression, ranks the rest)")
    return c.choice(value, (*registry.STRUCTURES, *registry.JOINT_STRUCTURES), what="structure")


def _holdout(value: object) -> float:
    share = c.percent(value, "the held-out share", code="out-of-range")
    if not 0 < share < 1:
        c.fail("out-of-range", "the held-out share must lie strictly between 0% and 100%", label="outside (0%, 100%)",
               help="for example `probe_holdout = 10%`")
    return share


class LayerRule(Block):
    """``layer <selector> { ... }``: per-layer ratio, rank, rank bounds, or staying dense."""

    selector: Annotated[Selector, typed(_selector)]
    ratio: Annotated[float | None, typed(c.ratio, what="a layer's ratio")] = None
    rank: Annotated[int | tuple[int, int] | None, typed(_rank)] = None
    min_rank: Annotated[int | None, int_at_least(1, "`min_rank`", limits.MAX_RANK)] = None
    max_rank: Annotated[int | None, int_at_least(1, "`max_rank`", limits.MAX_RANK)] = None
    dense: Annotated[bool, typed(c.boolean)] = False
    # The outputs no structure that removes channels takes this layer below (ranks are a separate axis: a dense
    # layer may lose channels).
    min_channels: Annotated[int | None, int_at_least(1, "`min_channels`", limits.MAX_RANK)] = None

    @property
    def sets_ranks(self) -> bool:
        """Whether the rule decides the layer's ranks (a rule of `min_channels` alone bounds its width only)."""
        return self.dense or any(value is not None for value in (self.ratio, self.rank, self.min_rank, self.max_rank))

    @field_validator("rank")
    @classmethod
    def _rank_or_ratio(cls, rank: object, info: ValidationInfo) -> object:
        if rank is not None and info.data.get("ratio") is not None:
            c.fail("conflicting-keys", "a layer rule sets both `ratio` and `rank`", label="remove one",
                   help="`rank` fixes the ranks, `ratio` lets them follow from the layer's size")
        return rank

    @field_validator("min_rank", "max_rank")
    @classmethod
    def _bounds_without_fixed_rank(cls, bound: int | None, info: ValidationInfo) -> int | None:
        if bound is not None and info.data.get("rank") is not None:
            c.fail("conflicting-keys", f"a layer rule sets both `rank` and `{info.field_name}`", label="remove one",
                   help="`rank` fixes the ranks; `min_rank` and `max_rank` bound ranks the policy chooses")
        return bound

    @field_validator("max_rank")
    @classmethod
    def _bounds_ordered(cls, high: int | None, info: ValidationInfo) -> int | None:
        low = info.data.get("min_rank")
        if high is not None and low is not None and low > high:
            c.fail("rank-bounds", f"`min_rank` {low} is larger than `max_rank` {high}", label="below min_rank",
                   help="make `min_rank` at most `max_rank`")
        return high

    @field_validator("dense")
    @classmethod
    def _dense_alone(cls, dense: bool, info: ValidationInfo) -> bool:
        others = [k for k in ("ratio", "rank", "min_rank", "max_rank") if info.data.get(k) is not None]
        if dense and others:
            c.fail("conflicting-keys", f"a dense layer has no ranks, but this rule also sets `{others[0]}`",
                   label="dense with ranks", help="drop `dense = true` or the rank settings")
        return dense


class CompressSpec(Block):
    """``compress { ... }``: the method, the budget, the rank policy and per-layer rules."""

    # Unnamed, the structure is chosen by measuring: no single structure was the most robust at every budget of the
    # benchmark (docs/results.md), and low rank alone lost by 8 points at 64x.
    method: Annotated[str, typed(c.choice, options=registry.METHODS, what="method", code="unknown-method")] = "auto"
    budget: Annotated[Budget, typed(_budget)]
    policy: Annotated[Policy, typed(c.variant, family=_POLICIES, what="rank policy", code="unknown-policy")] = (
        GlobalPolicy()
    )
    keep: Annotated[tuple[str, ...], typed(names, what="module names")] = ()
    min_rank: Annotated[int | None, int_at_least(1, "`min_rank`", limits.MAX_RANK)] = None
    # A floor on every layer's outputs for the structures that remove channels (a layer rule's own overrides it).
    min_channels: Annotated[int | None, int_at_least(1, "`min_channels`", limits.MAX_RANK)] = None
    hooi_sweeps: Annotated[int, int_at_least(0, "`hooi_sweeps`")] = 0
    # channel-prune only: the same share of every layer's channels, or one ranking of all channels.
    allocation: Annotated[str, typed(c.choice, options=("uniform", "global"), what="channel allocation")] = "uniform"
    # channel-prune only: a channel's score, its L1 norm or the Taylor estimate on the adversarial loss.
    importance: Annotated[str, typed(c.choice, options=("l1", "taylor"), what="channel importance")] = "l1"
    # cstar only: the structure its ADMM phase projects onto: ranks (Tucker-2 / SVD), channels (each layer's count
    # from a uniform share or one global ranking), or a joint structure's channels and then its ranks.
    structure: Annotated[str, typed(_structure)] = "low-rank"
    # auto only: the structures to compare, the fine-tuning epochs each gets, and the share of the training set held
    # out to score them (never the test set).
    candidates: Annotated[tuple[str, ...], typed(_structures)] = registry.STRUCTURES
    probe_epochs: Annotated[int, int_at_least(1, "`probe_epochs`", limits.MAX_EPOCHS)] = 1
    probe_holdout: Annotated[float, typed(_holdout)] = 0.1
    layers: tuple[LayerRule, ...] = ()

    @property
    def removes_channels(self) -> bool:
        """Whether the compiled model is channel-pruned and nothing else: `channel-prune`, or cstar's ADMM onto
        channels (`prune-uniform`, `prune-global`; a joint structure is factorized as well)."""
        return self.method == "channel-prune" or (self.method == "cstar" and self.structure.startswith("prune-"))

    @field_validator("keep", mode="after")
    @classmethod
    def _normalized(cls, keep: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(normalize_module_name(name) for name in keep)
