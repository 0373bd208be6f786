"""Python API over the stages after validation: build the model, plan it, factorize it, compile it.

Each function is one stage the CLI runs, so notebooks and other tools can run any prefix:

    spec = cstar_dsl.load_spec("specs/resnet18.cstar")
    model = cstar_dsl.build_model(spec)
    plan = cstar_dsl.make_plan(spec, model)
    compressed = cstar_dsl.factorize(model, plan, spec)
    latency = cstar_dsl.measure_latency(spec, model, plan)    # batch-1 CPU time, dense vs compressed
    compiled = cstar_dsl.compile(spec, out="runs/resnet18")   # all of `cstar compile`
    model = cstar_dsl.load("runs/resnet18")                   # the artifact, without the recipe
    result = cstar_dsl.evaluate("runs/resnet18", ["pgd(steps = 50)"], sanity=True)  # all of `cstar eval`
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from torch import Tensor, fx, nn

from .lang.problems import SpecProblem
from .lang.registry import JOINT_FISHER, channel_allocation, channel_share
from .lang.spec import Spec
from .model import inventory, rewrite
from .model import zoo as models
from .plan import allocate as planning
from .plan.layers import LayerInfo
from .plan.plans import Plan

# What `cstar plan` says of `joint-fisher`, whose layers only the compile can choose.
FISHER_DEFERRED = (f"{JOINT_FISHER} chooses each layer's channels and ranks at compile time, from Fisher scores of "
                   "the trained model on adversarial examples of the training set; the table above is the dense model "
                   "and the budget it meets, and the compile's report lists its layers")

if TYPE_CHECKING:
    from .deploy.latency import LatencyComparison
    from .driver.pipeline import Compiled, Progress
    from .eval.robustness import Reevaluation


def build_model(spec: Spec, *, allow_import: bool = False) -> nn.Module:
    """The recipe's model (registry name, classes, stem, starting weights), initialized from the
    recipe's seed, in eval mode."""
    return models.build_model(spec.model, seed=spec.train.seed, allow_import=allow_import)


def make_plan(spec: Spec, model: nn.Module, *, structure: str | None = None) -> Plan:
    """Which layers the recipe factorizes and at which ranks, or, for a structure that removes channels, how many
    channels each layer keeps (and, joint, the ranks of what it keeps); never trains, never changes ``model``.

    ``structure`` (a name `method = auto` may choose: ``low-rank``, ``prune-uniform``, ``joint-25``...) plans that
    structure at the recipe's budget instead of the one ``cstar compile`` builds (see ``planned_structure``)."""
    return _structure_plan(spec, model, inventory.collect(model, spec.model.input, spec.model.leaf),
                           structure or planned_structure(spec))


def _structure_plan(spec: Spec, model: nn.Module, found: inventory.Inventory, structure: str) -> Plan:
    """``make_plan`` of one structure, on the model's inventory ``found``."""
    if structure == "low-rank":
        plan = planning.make_plan(spec, found.layers, found.other_params)
    elif structure == JOINT_FISHER:
        plan = planning.target_plan(spec, found.layers, found.other_params, "chosen at compile time")
        return dataclasses.replace(plan, warnings=(FISHER_DEFERRED,))
    else:
        plan = _channels_removed(spec, model, planning.budget_plan(spec, found.layers, found.other_params),
                                 found.layers, structure)
    if spec.model.weights is None and spec.compress.policy.kind in ("global", "energy") and any(
            layer.ranks for layer in plan.layers):
        note = ("no starting weights, so these ranks follow the spectra of a random initialization; "
                "`cstar compile` plans again from the trained weights")
        plan = dataclasses.replace(plan, warnings=(*plan.warnings, note))
    return plan


def plan_recipe(spec: Spec, model: nn.Module, structure: str | None = None) -> tuple[str, Plan]:
    """``make_plan`` and the structure it planned: ``structure``, or what `cstar compile` builds (see
    ``planned_structure``). Under `method = auto`, where ranks cannot meet the budget, the plan is the first other
    candidate's, as the compile's low-rank candidate steps aside; the plan's warnings say why."""
    chosen = structure or planned_structure(spec)
    try:
        return chosen, make_plan(spec, model, structure=chosen)
    except SpecProblem as problem:
        others = [name for name in spec.compress.candidates if name != "low-rank"]
        if structure or spec.compress.method != "auto" or problem.code != "infeasible-budget" or not others:
            raise
        return others[0], make_plan(spec, model, structure=others[0])


@dataclass(frozen=True)
class CandidateCost:
    """One structure `method = auto` will probe, planned at the recipe's budget: its conv and linear weights and
    MACs, or why it cannot meet the budget."""

    name: str
    params: int | None
    macs: int | None
    problem: str | None = None
    measured: bool = False  # chosen at compile time from the trained model (joint-fisher): no cost before that

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "params": self.params, "macs": self.macs, "problem": self.problem,
                "measured": self.measured}


def candidate_costs(spec: Spec, model: nn.Module) -> list[CandidateCost]:
    """Every candidate of the recipe, planned as ``make_plan`` plans it (a global ranking's widths estimated on the
    starting weights); what the probe will compare, before it trains anything."""
    found, costs = inventory.collect(model, spec.model.input, spec.model.leaf), []
    for name in spec.compress.candidates:
        if name == JOINT_FISHER:
            costs.append(CandidateCost(name, None, None, measured=True))
            continue
        try:
            plan = _structure_plan(spec, model, found, name)
        except SpecProblem as problem:
            costs.append(CandidateCost(name, None, None, problem.message))
            continue
        costs.append(CandidateCost(name, plan.params_after, plan.macs_after))
    return costs


def planned_structure(spec: Spec) -> str:
    """The structure `cstar compile` builds: the method's own, or the one candidate of `method = auto`. With several
    candidates the probe chooses at compile time; the plan shows the low-rank one (the budget every candidate meets),
    or the first listed when low rank is not a candidate."""
    compress = spec.compress
    if compress.method == "channel-prune":
        return f"prune-{compress.allocation}"
    if compress.method == "cstar":
        return compress.structure
    if compress.method == "auto" and (len(compress.candidates) == 1 or "low-rank" not in compress.candidates):
        return compress.candidates[0]
    return "low-rank"


def _channels_removed(spec: Spec, model: nn.Module, plan: Plan, layers: Sequence[LayerInfo], structure: str) -> Plan:
    """The plan of the channel-pruned (or joint) model. The widths a uniform share leaves do not depend on the
    weights, so they are the compile's; a global ranking's are estimated by L1 on the starting weights; a joint
    plan's ranks follow the spectra of the pruned starting weights."""
    import torch

    from .model.joint import joint_structure
    from .model.prune import admm_channels_rule, prune_rule, prune_to_plan, pruned_plan

    example = torch.zeros(1, *spec.model.input)
    share = channel_share(structure)
    if share is not None:
        joint = joint_structure(model, spec, plan, layers, example, share)
        return dataclasses.replace(joint.plan, warnings=plan.warnings)
    allocation = channel_allocation(structure)
    pruned = prune_to_plan(model, spec, plan, example, allocation=allocation)
    rule = admm_channels_rule(allocation) if spec.compress.method == "cstar" \
        else prune_rule(spec.compress.importance, allocation)
    notes = plan.warnings  # the budget they meet is the budget plan's (Plan.params_budget), and its notes hold
    if allocation == "global":
        notes += ("a global ranking's widths depend on the trained weights: these are an estimate by L1 norm on "
                  "the starting weights",)
    return dataclasses.replace(pruned_plan(plan, layers, pruned, spec, rule, allocation), warnings=notes)


def factorize(model: nn.Module, plan: Plan, spec: Spec | None = None) -> fx.GraphModule:
    """A new GraphModule with the planned layers factorized; ``model`` itself is left untouched."""
    leaves = spec.model.leaf if spec else ()
    sweeps = spec.compress.hooi_sweeps if spec else 0
    return rewrite.factorize(model, plan, leaves=leaves, sweeps=sweeps)


def measure_latency(spec: Spec, model: nn.Module, plan: Plan, *, threads: int = 1, repeats: int = 30,
                    structure: str | None = None) -> LatencyComparison:
    """What the plan buys in time: the batch-1 CPU latency of ``model`` and of the model the plan
    makes of it (factorized, channel-pruned to the plan's parameters, or both), both in their inference
    form, timed in turns on this machine with ``threads`` threads. Weights do not change the time."""
    import torch

    from .deploy.latency import compare_latency

    example = torch.randn(1, *spec.model.input, generator=torch.Generator().manual_seed(0))
    compressed = _compressed(spec, model, plan, example, structure or planned_structure(spec))
    return compare_latency(model, compressed, example, threads=threads, repeats=repeats, leaves=spec.model.leaf)


def _compressed(spec: Spec, model: nn.Module, plan: Plan, example: Tensor, structure: str) -> nn.Module:
    """The model in ``structure``, for timing: latency depends on the kept widths and ranks, not on which channels.
    With a uniform share the widths are the same whatever the scores; with a global ranking (or Taylor scores, which
    need the adversarial loss's gradients that `cstar compile` computes) the L1 widths are an estimate."""
    from .model.joint import joint_structure
    from .model.prune import prune_to_plan

    if structure == JOINT_FISHER:
        raise ValueError(f"{JOINT_FISHER} has no layers to time before it is compiled: its channels and ranks follow "
                         "Fisher scores of the trained model")
    share = channel_share(structure)
    if share is not None:  # the budget plan, met by pruning and then ranks, as make_plan did
        found = inventory.collect(model, spec.model.input, spec.model.leaf)
        budget = planning.budget_plan(spec, found.layers, found.other_params)
        return joint_structure(model, spec, budget, found.layers, example, share).build(spec)
    if structure != "low-rank":
        return prune_to_plan(model, spec, plan, example, allocation=channel_allocation(structure)).model
    return factorize(model, plan, spec)


def compile(spec: Spec | str | Path, out: str | Path, *, resume: bool = False, force: bool = False,
            locked: bool = False, device: str | None = None, allow_import: bool = False,
            progress: Progress | None = None) -> Compiled:
    """Run ``cstar compile``: train, compress, evaluate, and write the artifacts into ``out``.

    ``spec`` is a validated ``Spec`` or the path of a recipe. Returns the report (the ``RunReport``
    report.json holds) and the compressed model; ``Compiled.unmet`` lists requirements not met.
    """
    from .driver.pipeline import CompileOptions, compile_spec
    from .lang.validate import load_spec

    text = ""
    name = "spec.cstar"
    if not isinstance(spec, Spec):
        loaded = load_spec(spec, allow_import=allow_import)  # first: it refuses a FIFO before anything reads it
        name, text = str(spec), Path(spec).read_text(encoding="utf-8")
        spec = loaded
    options = CompileOptions(out=Path(out), resume=resume, locked=locked, force=force, allow_import=allow_import,
                             device=device, spec_name=name, spec_text=text)
    return compile_spec(spec, options, progress)


def evaluate(folder: str | Path, attacks: Sequence[str] = (), *, samples: int | None = None, sanity: bool = False,
             seed: int = 0, device: str = "cpu", allow_import: bool = False) -> Reevaluation:
    """Run ``cstar eval``: re-evaluate the compiled model in ``folder`` on its recipe's test set.

    ``attacks`` are written as in a recipe (``"pgd(steps = 50, restarts = 5)"``, ``"fgsm"``,
    ``"autoattack"``); none means the recipe's own. ``sanity`` adds the gradient-masking checks.
    """
    from .eval.robustness import parse_attack, reevaluate

    return reevaluate(Path(folder), [parse_attack(text) for text in attacks], samples=samples, sanity=sanity, seed=seed,
                      device=device, allow_import=allow_import)
