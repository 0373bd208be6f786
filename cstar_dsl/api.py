"""Python API over the stages after validation: build the model, plan it, factorize it.

Each function is one stage the CLI runs, so notebooks and other tools can run any prefix:

    spec = cstar_dsl.load_spec("specs/resnet18.cstar")
    model = cstar_dsl.build_model(spec)
    plan = cstar_dsl.make_plan(spec, model)
    compressed = cstar_dsl.factorize(model, plan, spec)
"""

from __future__ import annotations

import dataclasses

from torch import fx, nn

from . import inventory, models, rewrite
from . import plan as planning
from .plan import Plan
from .spec import Spec


def build_model(spec: Spec, *, allow_import: bool = False) -> nn.Module:
    """The recipe's model (registry name, classes, stem, starting weights), initialized from the
    recipe's seed, in eval mode."""
    return models.build_model(spec.model, seed=spec.train.seed, allow_import=allow_import)


def make_plan(spec: Spec, model: nn.Module) -> Plan:
    """Which layers the recipe factorizes and at which ranks; never trains, never changes ``model``."""
    found = inventory.collect(model, spec.model.input, spec.model.leaf)
    plan = planning.make_plan(spec, found.layers, found.other_params)
    if spec.model.weights is None and spec.compress.policy.kind in ("global", "energy"):
        note = ("no starting weights, so these ranks follow the spectra of a random initialization; "
                "`cstar compile` plans again from the trained weights")
        plan = dataclasses.replace(plan, warnings=(*plan.warnings, note))
    return plan


def factorize(model: nn.Module, plan: Plan, spec: Spec | None = None) -> fx.GraphModule:
    """A new GraphModule with the planned layers factorized; ``model`` itself is left untouched."""
    leaves = spec.model.leaf if spec else ()
    sweeps = spec.compress.hooi_sweeps if spec else 0
    return rewrite.factorize(model, plan, leaves=leaves, sweeps=sweeps)
