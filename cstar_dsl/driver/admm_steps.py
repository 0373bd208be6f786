"""Compile driver, ADMM: the start, the Z- and U-steps with ranks re-planned each time, the rho schedule, the hooks."""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch
from torch import Tensor

from ..lang import registry
from ..lang.spec import AdmmSpec, PhaseSpec
from ..model import inventory, rewrite
from ..model.channel_cut import cut_channels
from ..model.joint import factorized_after_pruning, fisher_structure, joint_channels
from ..model.prune import admm_channels_rule, kept_whole, widths_of
from ..plan import allocate as planning
from ..plan.plans import Plan, Ranks
from ..train import admm, distributed
from .pruning import cached_scores, prune_structure
from .state import Context, Run


def admm_weights(run: Run, names: Iterable[str]) -> dict[str, Tensor]:
    """The weights of the named layers of the run's network (the live parameters)."""
    assert run.net is not None
    return {name: run.net.get_parameter(f"{name}.weight") for name in names}


def replan(context: Context, weights: dict[str, Tensor]) -> Plan:
    """The recipe's plan on the spectra of ``weights`` rather than of the starting weights."""
    layers = inventory.with_weights(context.layers, {k: v.detach().cpu() for k, v in weights.items()})
    return planning.make_plan(context.spec, layers, context.other_params)


def structure_plan(context: Context, weights: dict[str, Tensor], structure: str) -> Plan:
    """The plan ``structure`` is built to, on the spectra of ``weights``: low rank's own (a `SpecProblem` where ranks
    cannot meet the budget), for a structure that removes channels the plan of the budget it prunes to
    (planning.budget_plan), for joint-fisher the budget's target alone (planning.target_plan)."""
    if structure == "low-rank":
        return replan(context, weights)
    if structure == registry.JOINT_FISHER:  # its own allocation needs the budget's target alone
        return planning.target_plan(context.spec, context.layers, context.other_params, "joint-fisher chooses it")
    layers = inventory.with_weights(context.layers, {k: v.detach().cpu() for k, v in weights.items()})
    return planning.budget_plan(context.spec, layers, context.other_params)


def choose_ranks(context: Context, weights: dict[str, Tensor]) -> tuple[dict[str, tuple[int, ...]], Plan]:
    """The plan's policy on the spectra of ``weights``: the Z-step's ranks, re-chosen every time, and the plan."""
    plan = replan(context, weights)
    return rewrite.planned_ranks(plan), plan


def admm_structure(context: Context, run: Run) -> str:
    """What the ADMM phase projects onto: cstar's `structure`, or the candidate `method = auto`'s probe chose."""
    if context.spec.compress.method == "auto":
        assert run.choice is not None  # the probe runs before the ADMM phase starts
        return run.choice.winner
    return context.spec.compress.structure


def start_admm(context: Context, run: Run, phase: AdmmSpec) -> None:
    assert run.net is not None
    structure = admm_structure(context, run)
    if structure != "low-rank":
        run.admm = _channel_start(context, run, structure)
    else:
        ranks, run.plan = choose_ranks(context, admm_weights(run, context.layer_names))
        run.admm = admm.admm_start(admm_weights(run, ranks), ranks, context.spec.compress.hooi_sweeps)
    run.rho = phase.rho


def admm_update(context: Context, run: Run, phase: AdmmSpec) -> float:
    """Z-step (ranks or channels re-chosen on W + U), U-step, then the rho schedule; returns its seconds."""
    started = time.perf_counter()
    assert run.admm is not None
    weights = admm_weights(run, context.layer_names)
    shifted = {name: w.detach() + run.admm.u[name] if name in run.admm.u else w.detach() for name, w in weights.items()}
    if run.admm.pruning_ratio is not None:
        z, kept = _channel_projection(context, run, shifted, run.admm.pruning_ratio, run.admm.kept_counts)
        chosen = {name: weights[name] for name in z}
        state = dataclasses.replace(run.admm, z=z, ranks=kept)
    else:
        ranks, run.plan = choose_ranks(context, shifted)
        chosen = {name: weights[name] for name in ranks}
        # A layer the new plan starts to factorize joins with U = 0; one it leaves dense drops out.
        u = {name: run.admm.u.get(name, torch.zeros_like(w)) for name, w in chosen.items()}
        state = admm.z_step(chosen, admm.AdmmState(run.admm.z, u, run.admm.ranks), ranks,
                            context.spec.compress.hooi_sweeps)
    run.admm = admm.u_step(chosen, state)
    # Every rank computed these from the same weights; rank 0's copy makes them bit-identical anyway.
    distributed.broadcast([*run.admm.z.values(), *run.admm.u.values()], context.world)
    schedule = phase.rho_schedule
    if schedule.kind == "geometric":
        rho = min(run.rho * schedule.factor, schedule.max or float("inf"))
        # U is the dual scaled by 1/rho: when rho changes, U must be rescaled to stay the same dual (Boyd et al. 3.4.1)
        run.admm = dataclasses.replace(run.admm, u={k: v * (run.rho / rho) for k, v in run.admm.u.items()})
        run.rho = rho
    return time.perf_counter() - started


def _channel_start(context: Context, run: Run, structure: str) -> admm.AdmmState:
    """ADMM onto channels: each layer's count of channels is fixed once, by the structure's prune of the trained
    dense model (a uniform share and the layers rounded up, one global ranking, or a joint structure's channels,
    with its ranks); which channels, each Z-step chooses again on W + U. Z = Proj(W), U = 0."""
    assert run.net is not None
    net = copy.deepcopy(run.net).cpu()
    spec, plan = context.spec, structure_plan(context, admm_weights(run, context.layer_names), structure)
    share = registry.channel_share(structure)
    if structure == registry.JOINT_FISHER:  # its channels and ranks, by Fisher scores on the dense model
        joint = fisher_structure(net, spec, plan, context.layers, torch.zeros(1, *spec.model.input),
                                 cached_scores(context, run))
        pruned, run.plan = joint.pruned, joint.plan
    elif share is not None:  # a joint structure: its channels, and the ranks every Z truncates what they keep to
        pruned = joint_channels(net, spec, plan, share)
        # Planned once, now: ranks its split cannot meet stop the compile before the ADMM epochs, not after them.
        run.plan = factorized_after_pruning(pruned, spec, plan, context.layers, admm_channels_rule("uniform")).plan
    else:
        allocation = registry.channel_allocation(structure)
        # A uniform share does not depend on the scores: L1 spares the Taylor pass.
        pruned, run.plan = prune_structure(context, net, plan, allocation,
                                           importance="l1" if allocation == "uniform" else None)
        if allocation != "uniform":
            pruned = widths_of(net, pruned)
    weights = admm_weights(run, context.layer_names)
    z, kept = _channel_projection(context, run, weights, pruned.pruning_ratio, pruned.kept_counts)
    return admm.AdmmState(z, {name: torch.zeros_like(weights[name]) for name in z}, kept, pruned.pruning_ratio,
                          pruned.kept_counts)


def _channel_projection(context: Context, run: Run, weights: dict[str, Tensor], pruning_ratio: float,
                        kept_counts: tuple[tuple[str, int], ...]) -> tuple[dict[str, Tensor], dict[str, Ranks]]:
    """Z: ``weights`` with the channels of least weight zeroed, each layer down to the count the share and
    ``kept_counts`` give it; and each layer's kept outputs."""
    assert run.net is not None
    cut = cut_channels(run.net, torch.zeros(1, *context.spec.model.input), pruning_ratio, weights,
                       keep=kept_whole(context.spec, context.layer_names), kept_counts=kept_counts)
    ranks = _joint_ranks(context, run)
    touched = ({name for name, _, _ in cut.items} | set(ranks)) & set(weights)
    z = cut.project({name: weights[name] for name in touched}, ranks, context.spec.compress.hooi_sweeps)
    kept = cut.kept_outputs(run.net)
    return z, {name: (kept.get(name, weights[name].shape[0]),) for name in z}


def _joint_ranks(context: Context, run: Run) -> dict[str, Ranks]:
    """The ranks Z truncates what a joint structure's channels keep to: those its plan set at the start of the
    phase (none for a structure of channels alone)."""
    if not registry.is_joint(admm_structure(context, run)) or run.plan is None:
        return {}
    return rewrite.planned_ranks(run.plan)


def admm_hooks(context: Context, run: Run, phase: PhaseSpec,
               epoch: int) -> tuple[Callable[[], Tensor], Callable[[int], None] | None]:
    """The ADMM penalty added to each step's loss, and the Z/U update after every ``interval`` steps."""
    assert isinstance(phase, AdmmSpec)
    steps = context.steps

    def extra_loss() -> Tensor:
        assert run.admm is not None
        return admm.penalty(admm_weights(run, run.admm.ranks), run.admm, run.rho)

    def after_step(step: int) -> None:
        if (epoch * steps + step + 1) % phase.interval.every == 0:
            admm_update(context, run, phase)

    return extra_loss, after_step if phase.interval.unit == "step" else None


class AdmmColumns(NamedTuple):
    """The ADMM columns of an epoch's history row."""

    rho: float
    residual: float
    zstep_seconds: float
    params: int | None


def epoch_end(context: Context, run: Run, phase: PhaseSpec, epoch: int) -> AdmmColumns:
    """The Z/U update when the interval counts epochs, and the ADMM columns of the epoch's history row."""
    zstep_seconds = 0.0
    if isinstance(phase, AdmmSpec) and phase.interval.unit == "epoch" and (epoch + 1) % phase.interval.every == 0:
        zstep_seconds = admm_update(context, run, phase)
    assert run.admm is not None
    residuals = admm.residuals(admm_weights(run, run.admm.ranks), run.admm)
    return AdmmColumns(run.rho, sum(residuals.values()) / max(1, len(residuals)), zstep_seconds,
                       run.plan.params_after if run.plan else None)
