"""Planning stage, the plan's data: what happens to each layer (LayerPlan), the whole Plan and its JSON form."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

Ranks = tuple[int, ...]  # (r,) for a Linear, (r_out, r_in) for a conv
# /2: a layer may carry both `shape_after` (channels pruned) and `ranks` (what it keeps, factorized): a joint plan.
PLAN_SCHEMA = "cstar.plan/2"


@dataclass(frozen=True)
class LayerPlan:
    """What happens to one layer, and why."""

    name: str
    type_name: str
    shape: tuple[int, ...]
    rule: str
    method: str  # "svd", "tucker2" or "dense"; "pruned" once the channel-prune baseline has pruned it
    ranks: Ranks | None
    reason: str
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    energy_kept: float | None
    shape_after: tuple[int, ...] | None = None  # the shape channel pruning left (pruned and joint plans only)

    def to_dict(self) -> dict[str, object]:
        """The layer's JSON form; ``shape_after`` only where pruning set it."""
        data = {**asdict(self), "ranks": list(self.ranks) if self.ranks else None, "shape": list(self.shape)}
        if self.shape_after is None:
            del data["shape_after"]
        else:
            data["shape_after"] = list(self.shape_after)
        return data


@dataclass(frozen=True)
class Plan:
    """The whole plan, with totals over conv and linear weights (biases and norms excluded)."""

    policy: str
    budget: str
    metric: str
    target: float
    layers: tuple[LayerPlan, ...]
    other_params: int = 0
    warnings: tuple[str, ...] = field(default=())

    @property
    def params_before(self) -> int:
        return sum(layer.params_before for layer in self.layers)

    @property
    def params_after(self) -> int:
        return sum(layer.params_after for layer in self.layers)

    @property
    def macs_before(self) -> int:
        return sum(layer.macs_before for layer in self.layers)

    @property
    def macs_after(self) -> int:
        return sum(layer.macs_after for layer in self.layers)

    @property
    def params_budget(self) -> int:
        """The weight parameters a structure that removes channels may keep: the low-rank plan's count (never above
        its target), or a parameter budget's target where the plan leaves layers dense that ranks could not shrink.
        """
        if self.metric == "params" and self.params_after > self.target:
            return math.floor(self.target)
        return self.params_after

    @property
    def ratio(self) -> float:
        """Achieved compression of the budget's metric: dense / compressed."""
        if self.metric == "macs":
            return self.macs_before / max(1, self.macs_after)
        return self.params_before / max(1, self.params_after)

    def to_dict(self) -> dict[str, object]:
        """The JSON form (schema in docs/plan.md)."""
        return {
            "schema": PLAN_SCHEMA,
            "policy": self.policy,
            "budget": self.budget,
            "metric": self.metric,
            "target": self.target,
            "totals": {
                "params_before": self.params_before, "params_after": self.params_after,
                "macs_before": self.macs_before, "macs_after": self.macs_after,
                "other_params": self.other_params, "ratio": self.ratio,
            },
            "layers": [layer.to_dict() for layer in self.layers],
            "warnings": list(self.warnings),
        }
