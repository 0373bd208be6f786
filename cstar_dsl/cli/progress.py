"""Command line: the two displays of a compile's progress, log lines (pipes, --quiet) and rich bars (a terminal)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.console import Console

from ..lang.render import plural

if TYPE_CHECKING:
    from ..run_report import EpochRow


def _epoch_line(row: EpochRow) -> str:
    line = (f"{row.phase} epoch {row.epoch + 1}: loss {row.loss:.3f}, train clean {row.clean:.1%}, "
            f"robust {row.robust:.1%}, {row.seconds:.1f} s")
    if row.rho is not None and row.residual is not None:
        line += f", rho {row.rho:.3g}, ||W-Z||/||W|| {row.residual:.3f}"
    return line


class LogProgress:
    """One line per stage and per epoch: for logs, pipes and --quiet."""

    def __init__(self, console: Console) -> None:
        self.console = console

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def stage(self, text: str) -> None:
        self.console.out(f"-- {text}")

    def phase_started(self, phase: str, epochs: int, first_epoch: int, steps: int) -> None:
        resumed = f", resuming at epoch {first_epoch + 1}" if first_epoch else ""
        self.console.out(f"-- {phase}: {plural(epochs, 'epoch')} of {plural(steps, 'step')}{resumed}")

    def step(self, phase: str, step: int, loss: float) -> None:
        return None

    def epoch_done(self, row: EpochRow) -> None:
        self.console.out(_epoch_line(row))

    def phase_done(self, phase: str) -> None:
        return None


class RichProgress(LogProgress):
    """A bar per phase (epochs) and one for the current epoch (steps, live loss)."""

    def __init__(self, console: Console) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        super().__init__(console)
        self.bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TextColumn("{task.fields[status]}"), TimeElapsedColumn(), console=console)
        self.phase_task: Any = None
        self.epoch_task: Any = None

    def __enter__(self) -> RichProgress:
        self.bars.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bars.stop()

    def stage(self, text: str) -> None:
        self.bars.console.print(f"[bold]--[/] {text}")

    def phase_started(self, phase: str, epochs: int, first_epoch: int, steps: int) -> None:
        self.phase_task = self.bars.add_task(phase, total=epochs, completed=first_epoch, status="")
        self.epoch_task = self.bars.add_task("  epoch", total=steps, status="")

    def step(self, phase: str, step: int, loss: float) -> None:
        self.bars.update(self.epoch_task, completed=step + 1, status=f"loss {loss:.3f}")

    def epoch_done(self, row: EpochRow) -> None:
        status = f"train clean {row.clean:.1%}  robust {row.robust:.1%}  loss {row.loss:.3f}"
        self.bars.update(self.phase_task, advance=1, status=status)
        self.bars.reset(self.epoch_task)
        self.bars.console.print(_epoch_line(row), highlight=False)

    def phase_done(self, phase: str) -> None:
        self.bars.remove_task(self.epoch_task)
