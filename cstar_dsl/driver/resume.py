"""Compile driver, out folder and resume: a fresh run or the checkpointed one, and the checkpoint of each epoch."""

from __future__ import annotations

import json
from typing import Any

from pydantic import TypeAdapter
from torch import nn

from .. import files
from ..deploy.artifacts import build_structure
from ..model import zoo as models
from ..plan.plans import Plan
from ..run_report import EpochRow, StructureChoice
from ..train import admm, checkpoint, distributed
from .outputs import OUTPUTS
from .runfolder import folder_problem
from .state import Context, Run, place, start_optimizer

CHECKPOINT_FORMAT = "cstar.checkpoint/1"
# The checkpoint keeps the plan and the history as JSON text: torch.load(weights_only=True) unpickles no classes.
_PLAN = TypeAdapter(Plan)
_HISTORY = TypeAdapter(list[EpochRow])


def prepare_out(context: Context, lock: dict[str, Any], net: nn.Module) -> Run:
    """A fresh run, or the one in the checkpoint; refuses what would lose or mix up earlier work."""
    options = context.options
    out = options.out
    lock_path = out / checkpoint.LOCK
    if options.locked:
        differences = checkpoint.lock_differences(checkpoint.read_lock(lock_path), lock, environment=True)
        if differences:
            raise checkpoint.CheckpointError(
                f"{lock_path} does not match this run: " + "; ".join(differences),
                help="run without --locked to compile anyway (the lock is then rewritten)")
    problem = folder_problem(out, resume=options.resume, force=options.force, locked=options.locked)
    if problem:
        raise checkpoint.CheckpointError(problem.message, help=problem.help)
    if options.resume:
        return _resume(context, lock, net)
    distributed.barrier(context.world)  # every rank has checked the folder before rank 0 changes it
    if context.world.is_main:
        if options.force:
            for name in (*OUTPUTS, checkpoint.CHECKPOINT):
                files.remove(out / name)
        files.write_text(lock_path, json.dumps(lock, indent=2) + "\n")
    return Run(net=net, model=place(models.Normalized(net, context.data.mean, context.data.std), context.device))


def _resume(context: Context, lock: dict[str, Any], net: nn.Module) -> Run:
    out = context.options.out
    checkpoint_path = out / checkpoint.CHECKPOINT
    old = checkpoint.read_lock(out / checkpoint.LOCK)
    differences = checkpoint.lock_differences(old, lock, environment=False)
    if differences:
        raise checkpoint.CheckpointError(
            f"cannot resume the run in {out}: " + "; ".join(differences),
            help="resume with the recipe and model the run started with, or start over with --force")
    state = checkpoint.load(checkpoint_path)
    return _restore(context, state, net)


def _restore(context: Context, state: dict[str, Any], net: nn.Module) -> Run:
    _same_phases(context, state)
    structure = json.loads(state["structure"])
    inner = {k.removeprefix("model."): v for k, v in state["model"].items() if k.startswith("model.")}
    if structure["kind"] != "dense":  # the checkpoint holds every weight: the starting weights are not read again
        bare = context.spec.model.model_copy(update={"weights": None})
        net = build_structure(bare, structure, inner, allow_import=context.options.allow_import)
    model = models.Normalized(net, context.data.mean, context.data.std)
    model.load_state_dict(state["model"])
    run = Run(phase_index=state["phase_index"], next_epoch=state["next_epoch"], net=net,
              model=place(model, context.device), structure=structure, rho=state["rho"],
              plan=_PLAN.validate_json(state["plan"]) if state["plan"] else None,
              history=_HISTORY.validate_json(state["history"]),
              phase_seconds=json.loads(state["phase_seconds"]))
    if state.get("choice"):
        run.choice = StructureChoice.model_validate_json(state["choice"])
    if state["admm"] is not None:
        saved = state["admm"]
        ranks = {name: tuple(r) for name, r in json.loads(saved["ranks"]).items()}
        run.admm = admm.AdmmState({k: v.to(context.device) for k, v in saved["z"].items()},
                                  {k: v.to(context.device) for k, v in saved["u"].items()}, ranks,
                                  saved.get("pruning_ratio"),
                                  tuple((name, int(kept)) for name, kept in json.loads(saved.get("kept_counts", "[]"))))
    if run.phase_index < len(context.phases):
        start_optimizer(context, run)
        assert run.optimizer is not None and run.schedule is not None
        if state["optimizer"] is not None:
            run.optimizer.load_state_dict(state["optimizer"])
            run.schedule.load_state_dict(state["schedule"])
    checkpoint.restore_rng(state["rng"])
    return run


def _same_phases(context: Context, state: dict[str, Any]) -> None:
    """The phases the checkpoint counted its phase index in are this run's: an `admm` block under `method = auto`
    was not run before auto's ADMM onto its choice existed, and a checkpoint of those days has no `phases`."""
    phases = [name for name, _ in context.phases]
    saved = json.loads(state["phases"]) if "phases" in state else [
        name for name in phases if not (name == "admm" and context.spec.compress.method == "auto")]
    if saved != phases:
        raise checkpoint.CheckpointError(
            f"cannot resume: the checkpoint counts the phases {', '.join(saved)}, and this cstar runs "
            f"{', '.join(phases)} for the recipe", help="start over with --force")


def save_checkpoint(context: Context, run: Run) -> None:
    """Rank 0 writes the run's whole state (weights, optimizer, ADMM, history, RNG) atomically."""
    assert run.model is not None
    if not context.world.is_main:
        return
    state = {
        "format": CHECKPOINT_FORMAT,
        "phases": json.dumps([name for name, _ in context.phases]),
        "phase_index": run.phase_index,
        "next_epoch": run.next_epoch,
        "structure": json.dumps(run.structure),
        "model": {k: v.detach().cpu() for k, v in run.model.state_dict().items()},
        "optimizer": run.optimizer.state_dict() if run.optimizer is not None else None,
        "schedule": run.schedule.state_dict() if run.schedule is not None else None,
        "admm": None if run.admm is None else {
            "z": {k: v.cpu() for k, v in run.admm.z.items()}, "u": {k: v.cpu() for k, v in run.admm.u.items()},
            "ranks": json.dumps({k: list(v) for k, v in run.admm.ranks.items()}),
            "pruning_ratio": run.admm.pruning_ratio, "kept_counts": json.dumps(run.admm.kept_counts)},
        "rho": run.rho,
        "plan": _PLAN.dump_json(run.plan).decode() if run.plan else "",
        "choice": run.choice.model_dump_json() if run.choice else "",
        "history": _HISTORY.dump_json(run.history).decode(),
        "phase_seconds": json.dumps(run.phase_seconds),
        "rng": checkpoint.rng_state(),
    }
    checkpoint.save(context.options.out / checkpoint.CHECKPOINT, state)
