"""What an out folder allows before a compile starts (pure: no torch, so it is said at once).

``cstar compile`` asks this before it imports torch or loads any data, and the compile driver
asks again when it takes the folder, so that the API refuses the same folders as the CLI.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import RunError

CHECKPOINT = "checkpoint.pt"
WEIGHTS = "model.safetensors"


def folder_problem(out: Path, *, resume: bool, force: bool, locked: bool) -> RunError | None:
    """Why ``out`` cannot take this run, and what to do, as the error to raise; None when it can.

    The lock itself is compared later: that needs the model, hence torch.
    """
    unfinished, finished = (out / CHECKPOINT).exists(), (out / WEIGHTS).exists()
    if resume and not unfinished and finished:
        return RunError(f"the run in {out} already finished; its model is {out / WEIGHTS}",
                        "use --force to compile again from the start")
    if resume and not unfinished:
        return RunError(f"no checkpoint in {out}", "run without --resume to start, or point --out at the run to resume")
    if not resume and unfinished and not force:
        return RunError(f"{out} holds an unfinished run ({CHECKPOINT})",
                        "pass --resume to continue it, --force to start over, or choose another --out")
    if not resume and finished and not (force or locked):
        return RunError(f"{out} already holds a compiled model",
                        "pass --force to overwrite it, or choose another --out")
    return None
