"""Compile driver, run state: the options, the progress sink, the run's context and its changing state."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import RunError
from ..lang.spec import PhaseSpec, Spec
from ..plan.plans import Plan
from ..plan.robust import ChannelGroup, Fisher
from ..run_report import EpochRow, Requirement, RunReport
from ..train import admm, distributed
from ..train.data import Datasets, dataset_size
from ..train.optimize import make_optimizer, make_schedule

if TYPE_CHECKING:
    from .probe import StructureChoice


class CompileError(RunError):
    """The run cannot go on: says where it stopped, what was kept, and the usual causes."""


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

    def epoch_done(self, row: EpochRow) -> None: ...

    def phase_done(self, phase: str) -> None: ...


@dataclass(frozen=True)
class Compiled:
    """What a compile produced: the out folder, the report (what report.json holds) and the model."""

    out: Path
    report: RunReport
    model: nn.Module

    @property
    def unmet(self) -> tuple[Requirement, ...]:
        return self.report.unmet


@dataclass
class Run:
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
    plan: Plan | None = None
    choice: StructureChoice | None = None  # method auto: the probed candidates and the winner
    # joint-fisher's scores of the dense network, measured once: the probe, the winner's build and the ADMM start
    # all build from the same dense weights (not checkpointed: measured again on resume).
    fisher: tuple[tuple[ChannelGroup, ...], Fisher] | None = None
    history: list[EpochRow] = field(default_factory=list)
    phase_seconds: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Context:
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

    @property
    def steps(self) -> int:
        """Optimizer steps in an epoch: one per global batch."""
        return -(-dataset_size(self.data.train) // self.spec.data.batch_size)


def place(value: Any, device: torch.device) -> Any:
    """A model or an image batch on ``device``; on a GPU in channels-last layout, which cuDNN's
    convolutions (and bf16 autocast) run faster in. The values are the same in either layout."""
    if device.type != "cuda":
        return value.to(device)
    return value.to(device, memory_format=torch.channels_last)


def start_optimizer(context: Context, run: Run) -> None:
    """The current phase's optimizer and schedule, over the model (wrapped for DDP when distributed)."""
    assert run.model is not None
    _, phase = context.phases[run.phase_index]
    run.trainer = distributed.wrap(run.model, context.world, context.device)
    run.optimizer = make_optimizer(phase, run.model.parameters())
    run.schedule = make_schedule(phase, run.optimizer)
