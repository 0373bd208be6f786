"""Optimize stage, persistence: atomic checkpoints, the run's lock, and what resuming must match.

A checkpoint is a dict of tensors and plain values saved with ``torch.save`` and read back with
``torch.load(weights_only=True)``, so reading one never runs pickled code. Files are written to a
temporary name, fsynced and renamed (``files.replace``), so a kill or a full disk leaves the previous
file whole.
"""

from __future__ import annotations

import hashlib
import json
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import files
from ..errors import RunError

CHECKPOINT = "checkpoint.pt"
LOCK = "lock.json"


class CheckpointError(RunError):
    """A checkpoint or lock that cannot be written, read, or resumed from; says why and what to do."""


def save(path: Path, state: Mapping[str, Any]) -> None:
    """Write a checkpoint atomically (``files.replace``).

    Raises:
        files.FileProblem: the disk is full or the path may not be written; the previous file is kept.
    """
    files.write_stream(path, lambda handle: torch.save(dict(state), handle))


def load(path: Path) -> dict[str, Any]:
    """A checkpoint written by ``save``; refuses anything that would need unpickling code."""
    try:
        files.require_file(path, "checkpoint")
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint in {path.parent}",
                              help="run without --resume to start (with --force if --out holds a model), "
                                   "or point --out at the run to resume") from None
    except files.FileProblem as problem:
        raise CheckpointError(str(problem), help=problem.help) from None
    except Exception as error:  # a truncated or foreign file: explain, never a traceback
        raise CheckpointError(f"cannot read the checkpoint {path}: {files.load_failure(path, error)}",
                              help="the file is damaged or not a cstar checkpoint; start over with --force "
                                   "(without --resume)") from None
    if not isinstance(state, dict) or state.get("format") != "cstar.checkpoint/1":
        raise CheckpointError(f"{path} is not a cstar checkpoint")
    return state


def rng_state() -> dict[str, Any]:
    """The global random states a resumed run must continue from (CPU, and CUDA where present)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------- lock


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def structure_hash(model: nn.Module) -> str:
    """A hash of the model's structure: every parameter and buffer's name, shape and dtype, and the
    type of every module, independent of the values."""
    parts = [f"{name}:{type(module).__name__}" for name, module in model.named_modules()]
    parts += [f"{name}:{tuple(t.shape)}:{t.dtype}" for name, t in model.state_dict().items()]
    return sha256_text("\n".join(parts))


def make_lock(spec_text: str, model: nn.Module, seed: int, version: str) -> dict[str, Any]:
    return {
        "schema": "cstar.lock/1",
        "spec_sha256": sha256_text(spec_text),
        "model_structure_sha256": structure_hash(model),
        "seed": seed,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "cstar": version},
    }


def lock_differences(old: Mapping[str, Any], new: Mapping[str, Any], *, environment: bool) -> list[str]:
    """What differs between two locks, in words; versions count only when ``environment`` is asked."""
    differences = []
    if old.get("spec_sha256") != new["spec_sha256"]:
        differences.append("the recipe changed (its resolved text has another hash)")
    if old.get("model_structure_sha256") != new["model_structure_sha256"]:
        differences.append("the model's structure changed (layers, shapes or dtypes)")
    if old.get("seed") != new["seed"]:
        differences.append(f"the seed changed from {old.get('seed')} to {new['seed']}")
    if environment:
        for name, version in new["versions"].items():
            before = (old.get("versions") or {}).get(name)
            if before != version:
                differences.append(f"{name} changed from {before} to {version}")
    return differences


def read_lock(path: Path) -> dict[str, Any]:
    try:
        files.require_file(path, LOCK)
        lock = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"no {LOCK} in {path.parent}", help="compile once without --locked to lock") from None
    except files.FileProblem as problem:
        raise CheckpointError(str(problem), help=problem.help) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"cannot read {path}: {error}") from None
    if not isinstance(lock, dict) or lock.get("schema") != "cstar.lock/1":
        raise CheckpointError(f"{path} is not a cstar lock")
    return lock
