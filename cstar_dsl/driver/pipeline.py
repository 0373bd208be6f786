"""Compile driver: recipe -> model and data -> plan -> optimize (phases, checkpoints) -> evaluate -> artifacts.

Runs the stages in order and owns the run's state. It prints nothing: progress goes to a
``Progress`` object, which the CLI draws as bars. Every epoch ends in an atomic checkpoint, and
every source of randomness is derived from (seed, phase, epoch), so a resumed run ends with the
same weights as one that was never interrupted.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from .. import __version__, files
from ..deploy.artifacts import build_structure, model_description, save_model
from ..deploy.latency import LatencyComparison, compare_latency
from ..eval.evaluation import Evaluation, evaluate
from ..lang.problems import SpecProblem
from ..lang.spec import AdmmSpec, PhaseSpec, Spec
from ..model import inventory, rewrite
from ..model import zoo as models
from ..plan import allocate as planning
from ..report import document as report
from ..train import admm, checkpoint, distributed
from ..train.data import Datasets, augment, datasets, loader_batches
from ..train.optimize import TrainingDiverged, adversarial_epoch, make_optimizer, make_schedule, training_attack
from .runfolder import folder_problem

REPORT_SCHEMA = "cstar.report/1"
OUTPUTS = ("model.safetensors", "model.json", "report.json", "report.md", "curves.png", "ranks.png", "spec.cstar",
           checkpoint.LOCK)


class CompileError(Exception):
    """The run cannot go on: says where it stopped, what was kept, and the usual causes."""

    def __init__(self, message: str, help: str | None = None) -> None:
        super().__init__(message)
        self.help = help


@dataclass(frozen=True)
class CompileOptions:
    out: Path
    resume: bool = False
    locked: bool = False
    force: bool = False
    allow_import: bool = False
    device: str | None = None  # overrides the recipe's `train.device`
    spec_name: str = "spec.cstar"
    spec_text: str = ""  # the recipe as written, copied next to the model
    warnings: tuple[str, ...] = ()  # what checking the recipe warned about, one line each, for the report


class Progress:
    """What a compile reports while it runs; the default ignores everything."""

    def stage(self, text: str) -> None: ...

    def phase_started(self, phase: str, epochs: int, first_epoch: int, steps: int) -> None: ...

    def step(self, phase: str, step: int, loss: float) -> None: ...

    def epoch_done(self, row: dict[str, Any]) -> None: ...

    def phase_done(self, phase: str) -> None: ...


@dataclass(frozen=True)
class Compiled:
    """What a compile produced: the out folder, the report (as in report.json) and the model."""

    out: Path
    report: dict[str, Any]
    model: nn.Module

    @property
    def unmet(self) -> list[dict[str, Any]]:
        return [r for r in self.report["requirements"] if not r["met"]]


@dataclass
class _Run:
    """The state an epoch changes and a checkpoint keeps."""

    phase_index: int = 0
    next_epoch: int = 0
    net: nn.Module | None = None
    model: nn.Module | None = None
    structure: dict[str, Any] = field(default_factory=lambda: {"kind": "dense"})
    trainer: nn.Module | None = None  # the module that takes steps: ``model``, or its DDP copy
    optimizer: torch.optim.Optimizer | None = None
    schedule: torch.optim.lr_scheduler.LRScheduler | None = None
    admm: admm.AdmmState | None = None
    rho: float = 0.0
    plan: dict[str, Any] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    phase_seconds: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class _Context:
    """What stays fixed for the whole run."""

    spec: Spec
    options: CompileOptions
    device: torch.device
    data: Datasets
    layers: tuple[Any, ...]
    other_params: int
    phases: tuple[tuple[str, PhaseSpec], ...]
    world: distributed.World = distributed.World()

    @property
    def layer_names(self) -> set[str]:
        return {layer.name for layer in self.layers}


# ------------------------------------------------------------------------ entry


def compile_spec(spec: Spec, options: CompileOptions, progress: Progress | None = None) -> Compiled:
    """Compile ``spec`` into ``options.out``: train, compress, evaluate, and write the artifacts.

    Raises:
        SpecProblem: a setting that cannot run (data folder, device, budget), located in the recipe.
        checkpoint.CheckpointError: the out folder, lock or checkpoint refuses the run.
        files.FileProblem: the out folder cannot be written (a file, read-only, a full disk), or
            another process is writing to it.
        CompileError: training diverged (the last good checkpoint is kept).
    """
    world = distributed.from_environment()
    device = distributed.device_for(world, _device(options.device or spec.train.device))
    # One writer per run folder: rank 0 writes it, so rank 0 holds its lock until the run ends.
    with files.exclusive(options.out) if world.is_main else contextlib.nullcontext():
        distributed.start(world, device)
        try:
            return _compile(spec, options, progress or Progress(), world, device)
        finally:
            distributed.stop(world)


def _compile(spec: Spec, options: CompileOptions, progress: Progress, world: distributed.World,
             device: torch.device) -> Compiled:
    started = time.perf_counter()
    progress.stage("loading data and building the model")
    data = datasets(spec)
    _check_classes(spec, data)
    net = models.build_model(spec.model, seed=spec.train.seed, allow_import=options.allow_import)
    found = inventory.collect(net, spec.model.input, spec.model.leaf)
    dense = models.Normalized(net, data.mean, data.std)
    context = _Context(spec, options, device, data, found.layers, found.other_params, _phases(spec), world)
    lock = checkpoint.make_lock(spec_identity(spec, _recipe_folder(options)), dense, spec.train.seed, __version__)
    run = _prepare_out(context, lock, net)
    _train(context, run, progress)
    progress.stage("evaluating on the test set")
    assert run.model is not None
    result = evaluate(run.model, data.test, spec.evaluate, spec.threat, seed=spec.train.seed, device=device,
                      rank=world.rank, ranks=world.size, reduce=lambda counts: distributed.sum_all(counts, world))
    timed = None
    if world.is_main:  # one process times, on a CPU the other ranks are done with
        progress.stage("timing the dense and the compressed model (batch 1, CPU)")
        timed = compare_latency(dense, run.model, torch.zeros(1, *spec.model.input), leaves=spec.model.leaf)
    progress.stage("writing the artifacts")
    built = _report(context, run, result, time.perf_counter() - started, timed)
    if world.is_main:
        _write_artifacts(context, run, built, lock)
    distributed.barrier(world)
    return Compiled(options.out, built, run.model.cpu().eval())


def spec_identity(spec: Spec, recipe_folder: Path) -> str:
    """What the recipe means, as canonical JSON: its paths relative to ``recipe_folder``, as a
    recipe writes them. The spec holds absolute paths; hashed as they are, a run folder moved or
    copied with its recipe (another checkout, another machine) could not be resumed.
    """
    meaning = spec.model_dump(mode="json")
    for block, key in (("model", "weights"), ("data", "root")):
        if meaning[block].get(key) is not None:
            meaning[block][key] = Path(os.path.relpath(meaning[block][key], recipe_folder)).as_posix()
    return json.dumps(meaning, sort_keys=True, separators=(",", ":"))


def _recipe_folder(options: CompileOptions) -> Path:
    return Path(options.spec_name).resolve().parent


def _check_classes(spec: Spec, data: Datasets) -> None:
    """An image folder's class count is known only once it is read; `cstar check` knows the others."""
    found = getattr(data.train, "classes", None)
    if isinstance(found, list) and len(found) != spec.model.classes:
        raise SpecProblem(("model", "classes"), "dataset-mismatch",
                          f"`classes` is {spec.model.classes}, but the `{data.name}` folders hold {len(found)} classes",
                          label=f"expected {len(found)}", help=f"write `classes = {len(found)}`")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SpecProblem(("train", "device"), "device-not-available", "`device = cuda`, but no CUDA device is visible",
                          help="use `device = auto` to fall back to the CPU, or run on a machine with a GPU")
    return torch.device(name)


def _place(value: Any, device: torch.device) -> Any:
    """A model or an image batch on ``device``; on a GPU in channels-last layout, which cuDNN's
    convolutions (and bf16 autocast) run faster in. The values are the same in either layout."""
    if device.type != "cuda":
        return value.to(device)
    return value.to(device, memory_format=torch.channels_last)


def _phases(spec: Spec) -> tuple[tuple[str, PhaseSpec], ...]:
    train = spec.train
    phases: list[tuple[str, PhaseSpec]] = []
    if train.pretrain is not None and train.pretrain.epochs > 0:
        phases.append(("pretrain", train.pretrain))
    if spec.compress.method == "cstar" and train.admm is not None:
        phases.append(("admm", train.admm))
    finetune = train.finetune or PhaseSpec(epochs=0, lr=1e-3)
    phases.append(("finetune", finetune))
    return tuple(phases)


# -------------------------------------------------------------- out and resume


def _prepare_out(context: _Context, lock: dict[str, Any], net: nn.Module) -> _Run:
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
        raise checkpoint.CheckpointError(problem[0], help=problem[1])
    if options.resume:
        return _resume(context, lock, net)
    distributed.barrier(context.world)  # every rank has checked the folder before rank 0 changes it
    if context.world.is_main:
        if options.force:
            for name in (*OUTPUTS, checkpoint.CHECKPOINT):
                files.remove(out / name)
        files.write_text(lock_path, json.dumps(lock, indent=2) + "\n")
    return _Run(net=net, model=_place(models.Normalized(net, context.data.mean, context.data.std), context.device))


def _resume(context: _Context, lock: dict[str, Any], net: nn.Module) -> _Run:
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


def _restore(context: _Context, state: dict[str, Any], net: nn.Module) -> _Run:
    structure = json.loads(state["structure"])
    inner = {k.removeprefix("model."): v for k, v in state["model"].items() if k.startswith("model.")}
    if structure["kind"] != "dense":  # the checkpoint holds every weight: the starting weights are not read again
        bare = context.spec.model.model_copy(update={"weights": None})
        net = build_structure(bare, structure, inner, allow_import=context.options.allow_import)
    model = models.Normalized(net, context.data.mean, context.data.std)
    model.load_state_dict(state["model"])
    run = _Run(phase_index=state["phase_index"], next_epoch=state["next_epoch"], net=net,
               model=_place(model, context.device), structure=structure, rho=state["rho"],
               plan=json.loads(state["plan"]) if state["plan"] else None, history=json.loads(state["history"]),
               phase_seconds=json.loads(state["phase_seconds"]))
    if state["admm"] is not None:
        saved = state["admm"]
        ranks = {name: tuple(r) for name, r in json.loads(saved["ranks"]).items()}
        run.admm = admm.AdmmState({k: v.to(context.device) for k, v in saved["z"].items()},
                                  {k: v.to(context.device) for k, v in saved["u"].items()}, ranks)
    if run.phase_index < len(context.phases):
        _start_optimizer(context, run)
        assert run.optimizer is not None and run.schedule is not None
        if state["optimizer"] is not None:
            run.optimizer.load_state_dict(state["optimizer"])
            run.schedule.load_state_dict(state["schedule"])
    checkpoint.restore_rng(state["rng"])
    return run


def _save_checkpoint(context: _Context, run: _Run) -> None:
    assert run.model is not None
    if not context.world.is_main:
        return
    state = {
        "format": "cstar.checkpoint/1",
        "phase_index": run.phase_index,
        "next_epoch": run.next_epoch,
        "structure": json.dumps(run.structure),
        "model": {k: v.detach().cpu() for k, v in run.model.state_dict().items()},
        "optimizer": run.optimizer.state_dict() if run.optimizer is not None else None,
        "schedule": run.schedule.state_dict() if run.schedule is not None else None,
        "admm": None if run.admm is None else {
            "z": {k: v.cpu() for k, v in run.admm.z.items()}, "u": {k: v.cpu() for k, v in run.admm.u.items()},
            "ranks": json.dumps({k: list(v) for k, v in run.admm.ranks.items()})},
        "rho": run.rho,
        "plan": json.dumps(run.plan) if run.plan else "",
        "history": json.dumps(run.history),
        "phase_seconds": json.dumps(run.phase_seconds),
        "rng": checkpoint.rng_state(),
    }
    checkpoint.save(context.options.out / checkpoint.CHECKPOINT, state)


# --------------------------------------------------------------------- training


def _train(context: _Context, run: _Run, progress: Progress) -> None:
    while run.phase_index < len(context.phases):
        name, phase = context.phases[run.phase_index]
        if name == "finetune" and run.structure["kind"] == "dense":
            progress.stage(f"compressing ({context.spec.compress.method})")
            _compress(context, run)
            run.optimizer = None
        if run.optimizer is None:
            _start_optimizer(context, run)
            _save_checkpoint(context, run)
        if name == "admm" and run.admm is None:
            _start_admm(context, run, phase)  # type: ignore[arg-type]
        steps = -(-len(context.data.train) // context.spec.data.batch_size)  # type: ignore[arg-type]
        progress.phase_started(name, phase.epochs, run.next_epoch, steps)
        for epoch in range(run.next_epoch, phase.epochs):
            _epoch(context, run, name, phase, epoch, progress)
            run.next_epoch = epoch + 1
            _save_checkpoint(context, run)
        progress.phase_done(name)
        run.phase_index, run.next_epoch, run.optimizer, run.schedule = run.phase_index + 1, 0, None, None
    if run.structure["kind"] == "dense":  # a recipe whose last phase was not finetune cannot end dense
        _compress(context, run)


def _start_optimizer(context: _Context, run: _Run) -> None:
    assert run.model is not None
    _, phase = context.phases[run.phase_index]
    run.trainer = distributed.wrap(run.model, context.world, context.device)
    run.optimizer = make_optimizer(phase, run.model.parameters())
    run.schedule = make_schedule(phase, run.optimizer)


def _epoch_seed(seed: int, phase_index: int, epoch: int) -> int:
    return seed * 1_000_003 + phase_index * 10_007 + epoch


def _batches(context: _Context, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
    train = context.data.train
    size = context.spec.data.batch_size
    order = torch.randperm(len(train), generator=generator)  # type: ignore[arg-type]
    # Every rank draws the same order and takes its share of each global batch.
    shares = [distributed.share(order[start:start + size], context.world) for start in range(0, len(order), size)]
    if isinstance(train, TensorDataset):
        images, labels = train.tensors
        for index in shares:
            batch = images[index]
            if context.spec.data.augment == "standard":
                batch = augment(batch, context.data.name, generator)
            yield _place(batch, context.device), labels[index].to(context.device)
        return
    # Folders augment per item, drawing from the global generator: seeded per epoch, so a resumed run
    # sees the same crops. (Each rank's batches are its shares when the batch size divides evenly.)
    torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
    local = -(-size // context.world.size)
    for images, labels in loader_batches(train, torch.cat(shares), local, context.spec.data.workers,
                                         generator=generator):
        yield _place(images, context.device), labels.to(context.device)


def _epoch(context: _Context, run: _Run, name: str, phase: PhaseSpec, epoch: int, progress: Progress) -> None:
    assert run.model is not None and run.optimizer is not None and run.schedule is not None
    seed = _epoch_seed(context.spec.train.seed, run.phase_index, epoch)
    data_generator = torch.Generator().manual_seed(seed)
    attack_generator = torch.Generator(device=context.device).manual_seed(seed + 7919 * context.world.rank)
    world = context.world
    extra_loss, after_step = _admm_hooks(context, run, phase, epoch) if name == "admm" else (None, None)

    def on_step(step: int, loss: float) -> None:
        if after_step is not None:
            after_step(step)
        progress.step(name, step, loss)

    lr = run.optimizer.param_groups[0]["lr"]
    try:
        result = adversarial_epoch(run.model, _batches(context, data_generator), run.optimizer,
                                   training_attack(context.spec.threat), phase=name, epoch=epoch,
                                   generator=attack_generator, extra_loss=extra_loss, on_step=on_step,
                                   trainer=run.trainer, agree=(lambda value: distributed.sum_all([value], world)[0])
                                   if world.active else None,
                                   precision=torch.bfloat16 if context.spec.train.precision == "bf16" else None)
    except TrainingDiverged as error:
        raise CompileError(
            f"{error}; the last good checkpoint is kept in {context.options.out / checkpoint.CHECKPOINT}",
            help=f"lower `train.{name}.lr`" + (" or `rho`" if name == "admm" else "")
                 + ", or check the data's range ([0, 1] images); then run again with --force") from None
    run.schedule.step()
    n = result.samples
    loss, clean, robust, seen = distributed.sum_all([result.loss * n, result.clean * n, result.robust * n, n], world)
    row: dict[str, Any] = {"phase": name, "epoch": epoch, "loss": loss / max(1, seen), "clean": clean / max(1, seen),
                           "robust": robust / max(1, seen), "seconds": result.seconds, "lr": lr}
    if name == "admm":
        zstep_seconds = 0.0
        if isinstance(phase, AdmmSpec) and phase.interval.unit == "epoch" and (epoch + 1) % phase.interval.every == 0:
            zstep_seconds = _admm_update(context, run, phase)
        assert run.admm is not None
        residuals = admm.residuals(_admm_weights(run, run.admm.ranks), run.admm)
        row.update(rho=run.rho, residual=sum(residuals.values()) / max(1, len(residuals)), zstep_seconds=zstep_seconds,
                   params=run.plan["totals"]["params_after"] if run.plan else None)
    run.phase_seconds[name] = run.phase_seconds.get(name, 0.0) + result.seconds
    run.history.append(row)
    progress.epoch_done(row)


# ------------------------------------------------------------------------- ADMM


def _admm_weights(run: _Run, names: Any) -> dict[str, Tensor]:
    assert run.net is not None
    return {name: run.net.get_submodule(name).weight for name in names}


def _choose_ranks(context: _Context, weights: dict[str, Tensor]) -> tuple[dict[str, tuple[int, ...]], dict]:
    """The plan's policy on the spectra of ``weights``: the Z-step's ranks, re-chosen every time."""
    layers = inventory.with_weights(context.layers, {k: v.detach().cpu() for k, v in weights.items()})
    plan = planning.make_plan(context.spec, layers, context.other_params)
    return rewrite.planned_ranks(plan), plan.to_dict()


def _start_admm(context: _Context, run: _Run, phase: AdmmSpec) -> None:
    assert run.net is not None
    ranks, run.plan = _choose_ranks(context, _admm_weights(run, context.layer_names))
    run.admm = admm.admm_start(_admm_weights(run, ranks), ranks, context.spec.compress.hooi_sweeps)
    run.rho = phase.rho


def _admm_update(context: _Context, run: _Run, phase: AdmmSpec) -> float:
    """Z-step (ranks re-chosen on W + U), U-step, then the rho schedule; returns its seconds."""
    started = time.perf_counter()
    assert run.admm is not None
    weights = _admm_weights(run, context.layer_names)
    shifted = {name: w.detach() + run.admm.u[name] if name in run.admm.u else w.detach() for name, w in weights.items()}
    ranks, run.plan = _choose_ranks(context, shifted)
    chosen = {name: weights[name] for name in ranks}
    # A layer the new plan starts to factorize joins with U = 0; one it leaves dense drops out.
    u = {name: run.admm.u.get(name, torch.zeros_like(w)) for name, w in chosen.items()}
    state = admm.z_step(chosen, admm.AdmmState(run.admm.z, u, run.admm.ranks), ranks, context.spec.compress.hooi_sweeps)
    run.admm = admm.u_step(chosen, state)
    # Every rank computed these from the same weights; rank 0's copy makes them bit-identical anyway.
    distributed.broadcast([*run.admm.z.values(), *run.admm.u.values()], context.world)
    schedule = phase.rho_schedule
    if schedule.kind == "geometric":
        rho = min(run.rho * schedule.factor, schedule.max or float("inf"))  # type: ignore[union-attr]
        # U is the dual scaled by 1/rho: when rho changes, U must be rescaled to stay the same dual (Boyd et al. 3.4.1)
        run.admm = admm.AdmmState(run.admm.z, {k: v * (run.rho / rho) for k, v in run.admm.u.items()}, run.admm.ranks)
        run.rho = rho
    return time.perf_counter() - started


def _admm_hooks(context: _Context, run: _Run, phase: PhaseSpec,
                epoch: int) -> tuple[Callable[[], Tensor], Callable[[int], None] | None]:
    assert isinstance(phase, AdmmSpec)
    steps = -(-len(context.data.train) // context.spec.data.batch_size)

    def extra_loss() -> Tensor:
        assert run.admm is not None
        return admm.penalty(_admm_weights(run, run.admm.ranks), run.admm, run.rho)

    def after_step(step: int) -> None:
        if (epoch * steps + step + 1) % phase.interval.every == 0:
            _admm_update(context, run, phase)

    return extra_loss, after_step if phase.interval.unit == "step" else None


# -------------------------------------------------------------------- compress


def _compress(context: _Context, run: _Run) -> None:
    """Dense -> the method's compressed structure: factorized at the ranks of the last Z-step (cstar)
    or of a plan on the trained weights (svd-finetune), or channel-pruned to the same parameters."""
    assert run.net is not None
    spec = context.spec
    net = run.net.cpu()
    method = spec.compress.method
    if method == "cstar" and run.admm is not None:
        ranks = dict(run.admm.ranks)
        _energy_of_weights(context, run, ranks)
    else:
        ranks, run.plan = _choose_ranks(context, _admm_weights(run, context.layer_names))
    if method == "channel-prune":
        run.net, run.plan = _prune(context, net, run.plan)
        run.structure = {"kind": "pruned"}
    else:
        run.net = rewrite.factorize_ranks(net, ranks, leaves=spec.model.leaf, sweeps=spec.compress.hooi_sweeps)
        run.structure = {"kind": "factorized", "ranks": {k: list(v) for k, v in ranks.items()}}
    run.admm = None
    run.model = _place(models.Normalized(run.net, context.data.mean, context.data.std), context.device)


def _energy_of_weights(context: _Context, run: _Run, ranks: dict[str, tuple[int, ...]]) -> None:
    """The plan of the last Z-step measured its energy on W + U; what the final factorization keeps is W's."""
    assert run.plan is not None
    weights = {name: w.detach().cpu() for name, w in _admm_weights(run, ranks).items()}
    layers = {layer.name: layer for layer in inventory.with_weights(context.layers, weights)}
    for entry in run.plan["layers"]:
        if entry["name"] in ranks:
            entry["energy_kept"] = planning.energy_kept(layers[entry["name"]], ranks[entry["name"]])


def _export(context: _Context) -> list[dict[str, Any]]:
    """The recipe's `export` formats, each checked against PyTorch (see ``cstar_dsl.export``)."""
    from ..deploy.export import ExportError, export

    written = []
    for fmt in context.spec.export.formats:
        try:
            exported = export(context.options.out, fmt, opset=context.spec.export.opset)
        except ExportError as error:
            raise CompileError(f"the model is compiled and saved, but exporting it as {fmt} failed: {error}",
                               help=f"`cstar export {context.options.out} --format {fmt}` retries just the export; "
                                    "or drop the format from the recipe's `export` block") from None
        written.append({"format": fmt, "file": exported.path.name, "bytes": exported.bytes,
                        "max_abs_diff": exported.max_abs_diff, "checked_with": exported.checked_with})
    return written


def _pruned_reason(before: Any, after: Any, pruning_ratio: float, allocation: str) -> str:
    if allocation == "uniform":
        return f"{pruning_ratio:.1%} of channels removed"
    kept = after.shape[0] if after is not None else 0
    return f"{kept} of {before.shape[0]} outputs kept ({pruning_ratio:.1%} of all channels removed, ranked globally)"


# Enough adversarial batches for stable Taylor scores; a few seconds even on two cores.
TAYLOR_BATCHES = 8


def _adversarial_gradients(context: _Context, net: nn.Module) -> None:
    """The gradient of the adversarial loss over the first TAYLOR_BATCHES training batches, left on ``net``'s weights
    (then on the CPU): Taylor importance scores each channel by |weight x gradient| of the loss robustness needs."""
    model = models.Normalized(net, context.data.mean, context.data.std).to(context.device).eval()
    seed = context.spec.train.seed
    attack, generator = training_attack(context.spec.threat), torch.Generator(device=context.device).manual_seed(seed)
    net.zero_grad(set_to_none=True)
    for x, y in itertools.islice(_batches(context, torch.Generator().manual_seed(seed)), TAYLOR_BATCHES):
        F.cross_entropy(model(attack(model, x, y, generator)), y).backward()
    # Each rank saw its own share of the batches; all must prune the same channels, so rank 0's scores count.
    distributed.broadcast([p.grad for p in net.parameters() if p.grad is not None], context.world)
    net.cpu()


def _prune(context: _Context, net: nn.Module, plan: dict[str, Any] | None) -> tuple[nn.Module, dict[str, Any]]:
    """Torch-Pruning filter pruning (L1 or Taylor scores) to the parameter count the factorized model would have."""
    from ..model.prune import channel_prune

    assert plan is not None
    spec = context.spec
    kept = set(spec.compress.keep) | {layer["name"] for layer in plan["layers"] if layer["rule"].startswith("keep")}
    example = torch.zeros(1, *spec.model.input)
    allocation, importance = spec.compress.allocation, spec.compress.importance
    if importance == "taylor":
        _adversarial_gradients(context, net)
    pruned = channel_prune(net, example, plan["totals"]["params_after"], keep=sorted(kept), allocation=allocation,
                           importance=importance)
    after = {layer.name: layer for layer in inventory.collect(pruned.model, spec.model.input, spec.model.leaf).layers}
    layers = []
    for layer in context.layers:
        new = after.get(layer.name)
        params_after = new.params if new else 0
        layers.append({"name": layer.name, "type": layer.type_name,
                       "method": "dense" if new and new.params == layer.params else "pruned",
                       "shape": list(layer.shape), "shape_after": list(new.shape) if new else None,
                       "rule": f"channel-prune ({'L1' if importance == 'l1' else 'Taylor'}, {allocation})",
                       "ranks": None,
                       "params_before": layer.params, "params_after": params_after,
                       "macs_before": layer.macs, "macs_after": new.macs if new else 0, "energy_kept": None,
                       "reason": _pruned_reason(layer, new, pruned.pruning_ratio, allocation)})
    totals = {"params_before": sum(x["params_before"] for x in layers),
              "params_after": sum(x["params_after"] for x in layers),
              "macs_before": sum(x["macs_before"] for x in layers), "macs_after": sum(x["macs_after"] for x in layers),
              "other_params": context.other_params}
    totals["ratio"] = totals["params_before"] / max(1, totals["params_after"])
    return pruned.model, {**plan, "layers": layers, "totals": totals}


# ----------------------------------------------------------------------- report


def _report(context: _Context, run: _Run, result: Evaluation, seconds: float,
            latency: LatencyComparison | None) -> dict[str, Any]:
    spec = context.spec
    assert run.plan is not None
    totals = run.plan["totals"]
    measured = {"clean": result.clean, "robust": result.worst_robust}
    requirements = []
    for requirement in spec.evaluate.requirements:
        value = measured[requirement.metric]
        floor = requirement.value
        met = value is not None and (value >= floor if requirement.op == ">=" else value > floor)
        requirements.append({"metric": requirement.metric, "op": requirement.op, "value": requirement.value,
                             "measured": value, "met": met})
    target = spec.compress.budget
    return {
        "schema": REPORT_SCHEMA,
        "spec": context.options.spec_name,
        "spec_sha256": checkpoint.sha256_text(spec_identity(spec, _recipe_folder(context.options))),
        "method": spec.compress.method,
        "compression": {"budget": run.plan.get("budget"), "metric": target.metric,
                        "target_ratio": getattr(target, "ratio", None),
                        "params_dense": totals["params_before"], "params_compressed": totals["params_after"],
                        "ratio": totals["params_before"] / max(1, totals["params_after"]),
                        "macs_dense": totals["macs_before"], "macs_compressed": totals["macs_after"],
                        "other_params": totals["other_params"]},
        "accuracy": {"clean": result.clean, "robust": result.robust},
        "latency": None if latency is None else latency.to_dict(),
        "attacks": result.attacks,
        "threat": spec.threat.model_dump(mode="json"),
        "requirements": requirements,
        "layers": [{("type" if key == "type_name" else key): value for key, value in layer.items()}
                   for layer in run.plan["layers"]],
        "history": run.history,
        "timings": {"total_seconds": seconds, "phases": run.phase_seconds, "evaluate_seconds": result.seconds},
        "data": {"name": context.data.name, "train_size": len(context.data.train), "test_size": result.samples},
        "machine": {"device": str(context.device), "processor": platform.processor() or platform.machine(),
                    "threads": torch.get_num_threads(), "python": platform.python_version(),
                    "torch": torch.__version__, "cstar": __version__},
        "seed": spec.train.seed,
        "warnings": [*context.options.warnings, *run.plan.get("warnings", [])],
        "resolved": spec.model_dump(mode="json"),
    }


def _write_artifacts(context: _Context, run: _Run, built: dict[str, Any], lock: dict[str, Any]) -> None:
    out = context.options.out
    assert run.model is not None
    description = model_description(context.spec.model, context.spec.compress.method, run.structure,
                                     context.data.mean, context.data.std)
    description["plan"] = run.plan
    save_model(out, run.model, description)
    built["exports"] = _export(context)
    files.write_text(out / "report.json", json.dumps(built, indent=2) + "\n")
    files.write_text(out / "report.md", report.markdown(built))
    # savefig picks the format from the name, so the temporary file keeps ".png".
    files.replace(out / "curves.png", lambda path: report.plot_curves(built["history"], path, test=built["accuracy"]),
                  suffix=".png")
    files.replace(out / "ranks.png", lambda path: report.plot_ranks(built["layers"], path), suffix=".png")
    files.write_text(out / "spec.cstar", context.options.spec_text)
    files.write_text(out / checkpoint.LOCK, json.dumps(lock, indent=2) + "\n")
    # The checkpoint goes last: until every artifact is on disk, --resume can still finish the run.
    files.remove(out / checkpoint.CHECKPOINT)

