"""Compile driver, training: the phase loop (pretrain, ADMM, compress, finetune) and its epochs."""

from __future__ import annotations

import torch

from ..lang.spec import PhaseSpec, Spec
from ..run_report import EpochRow
from ..train import checkpoint, distributed
from ..train.optimize import TrainingDiverged, adversarial_epoch, training_attack, training_precision
from . import admm_steps
from .batches import batches, epoch_seed
from .compress import choose, compress
from .resume import save_checkpoint
from .state import CompileError, Context, Progress, Run, place, start_optimizer


def phases(spec: Spec) -> tuple[tuple[str, PhaseSpec], ...]:
    """The recipe's training phases in order, by name; finetune always comes last, even with no epochs."""
    train = spec.train
    found: list[tuple[str, PhaseSpec]] = []
    if train.pretrain is not None and train.pretrain.epochs > 0:
        found.append(("pretrain", train.pretrain))
    if spec.compress.method in ("cstar", "auto") and train.admm is not None:
        found.append(("admm", train.admm))
    finetune = train.finetune or PhaseSpec(epochs=0, lr=1e-3)
    found.append(("finetune", finetune))
    return tuple(found)


def train(context: Context, run: Run, progress: Progress) -> None:
    """Every phase from where the run stands, a checkpoint per epoch; compresses before finetune."""
    while run.phase_index < len(context.phases):
        name, phase = context.phases[run.phase_index]
        if name == "finetune" and run.structure["kind"] == "dense":
            progress.stage(f"compressing ({context.spec.compress.method})")
            compress(context, run, progress)
            run.optimizer = None
        if name == "admm" and context.spec.compress.method == "auto" and run.choice is None:
            # The ADMM phase projects onto the structure the probe chooses from the trained dense model.
            choose(context, run, progress)
            place(run.net, context.device)  # back where it trains (in place: the model wraps the same network)
        if run.optimizer is None:
            start_optimizer(context, run)
            save_checkpoint(context, run)
        if name == "admm" and run.admm is None:
            admm_steps.start_admm(context, run, phase)  # type: ignore[arg-type]
        progress.phase_started(name, phase.epochs, run.next_epoch, context.steps)
        for epoch in range(run.next_epoch, phase.epochs):
            _epoch(context, run, name, phase, epoch, progress)
            run.next_epoch = epoch + 1
            save_checkpoint(context, run)
        progress.phase_done(name)
        run.phase_index, run.next_epoch, run.optimizer, run.schedule = run.phase_index + 1, 0, None, None
    if run.structure["kind"] == "dense":  # a recipe whose last phase was not finetune cannot end dense
        compress(context, run, progress)


def _epoch(context: Context, run: Run, name: str, phase: PhaseSpec, epoch: int, progress: Progress) -> None:
    assert run.model is not None and run.optimizer is not None and run.schedule is not None
    seed = epoch_seed(context.spec.train.seed, run.phase_index, epoch)
    data_generator = torch.Generator().manual_seed(seed)
    attack_generator = torch.Generator(device=context.device).manual_seed(seed + 7919 * context.world.rank)
    world = context.world
    extra_loss, after_step = admm_steps.admm_hooks(context, run, phase, epoch) if name == "admm" else (None, None)

    def on_step(step: int, loss: float) -> None:
        if after_step is not None:
            after_step(step)
        progress.step(name, step, loss)

    lr = run.optimizer.param_groups[0]["lr"]
    try:
        result = adversarial_epoch(run.model, batches(context, data_generator), run.optimizer,
                                   training_attack(context.spec.threat), phase=name, epoch=epoch,
                                   generator=attack_generator, extra_loss=extra_loss, on_step=on_step,
                                   trainer=run.trainer, agree=(lambda value: distributed.sum_all([value], world)[0])
                                   if world.active else None,
                                   precision=training_precision(context.spec.train))
    except TrainingDiverged as error:
        raise CompileError(
            f"{error}; the last good checkpoint is kept in {context.options.out / checkpoint.CHECKPOINT}",
            help=f"{error.help}; then run again with --force") from None
    run.schedule.step()
    n = result.samples
    loss, clean, robust, seen = distributed.sum_all([result.loss * n, result.clean * n, result.robust * n, n], world)
    admm = admm_steps.epoch_end(context, run, phase, epoch) if name == "admm" else None
    row = EpochRow(phase=name, epoch=epoch, loss=loss / max(1, seen), clean=clean / max(1, seen),
                   robust=robust / max(1, seen), seconds=result.seconds, lr=lr,
                   **({} if admm is None else admm._asdict()))
    run.phase_seconds[name] = run.phase_seconds.get(name, 0.0) + result.seconds
    run.history.append(row)
    progress.epoch_done(row)
