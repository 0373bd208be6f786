"""Compile driver, entry: recipe -> model and data -> plan -> optimize (phases, checkpoints) -> evaluate -> artifacts.

Runs the stages in order; the run's state and its stages live in the modules beside this one (state,
resume, phases, batches, admm_steps, compress, outputs). It prints nothing: progress goes to a
``Progress`` object, which the CLI draws as bars. Every epoch ends in an atomic checkpoint, and
every source of randomness is derived from (seed, phase, epoch), so a resumed run ends with the
same weights as one that was never interrupted.
"""

from __future__ import annotations

import contextlib
import time

import torch

from .. import __version__, files
from ..deploy.latency import compare_latency
from ..eval.evaluation import evaluate
from ..lang.problems import SpecProblem
from ..lang.spec import Spec
from ..model import inventory
from ..model import zoo as models
from ..train import checkpoint, distributed
from ..train.data import Datasets, datasets
from .outputs import OUTPUTS, REPORT_SCHEMA, build_report, recipe_folder, spec_identity, write_model, write_report
from .phases import phases, train
from .resume import prepare_out
from .state import Compiled, CompileError, CompileOptions, Context, Progress

__all__ = ["OUTPUTS", "REPORT_SCHEMA", "CompileError", "CompileOptions", "Compiled", "Progress", "compile_spec",
           "spec_identity"]


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
    context = Context(spec, options, device, data, found.layers, found.other_params, phases(spec), world)
    lock = checkpoint.make_lock(spec_identity(spec, recipe_folder(options)), dense, spec.train.seed, __version__)
    run = prepare_out(context, lock, net)
    train(context, run, progress)
    progress.stage("evaluating on the test set")
    assert run.model is not None
    result = evaluate(run.model, data.test, spec.evaluate, spec.threat, seed=spec.train.seed, device=device,
                      rank=world.rank, ranks=world.size, reduce=lambda counts: distributed.sum_all(counts, world))
    timed = None
    if world.is_main:  # one process times, on a CPU the other ranks are done with
        progress.stage("timing the dense and the compressed model (batch 1, CPU)")
        timed = compare_latency(dense, run.model, torch.zeros(1, *spec.model.input), leaves=spec.model.leaf)
    progress.stage("writing the artifacts")
    seconds = time.perf_counter() - started  # the run's time, as before the report listed the exports
    exports = write_model(context, run) if world.is_main else ()  # the report lists the files rank 0 wrote
    built = build_report(context, run, result, seconds, timed, exports)
    if world.is_main:
        write_report(context, built, lock)
    distributed.barrier(world)
    return Compiled(options.out, built, run.model.cpu().eval())


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


