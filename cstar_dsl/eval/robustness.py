"""Evaluate stage, `cstar eval`: a compiled model re-evaluated under any attacks, with the sanity checks."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn

from .. import __version__, files
from ..deploy.artifacts import ArtifactError, load
from ..errors import RunError
from ..lang.problems import SpecProblem
from ..lang.spec import EvaluateSpec, Spec
from ..run_report import ReportError, parse_report
from ..train.data import datasets
from .attack_text import AttackSetting, AutoAttackSetting, parse_attack
from .autoattack import MissingExtra, autoattack_implementation, autoattack_module, run_autoattack
from .evaluation import attack_for, attack_name, evaluate, test_batches
from .sanity import SanityCheck, sanity_checks

__all__ = ["AttackSetting", "AutoAttackSetting", "EvalError", "MissingExtra", "Reevaluation", "SanityCheck",
           "parse_attack", "reevaluate", "reevaluate_model", "resolved_spec"]

# The label of our own attacks in reports: kept as written when the code moved to cstar_dsl.train.attacks.
_OWN = f"cstar_dsl.attacks {__version__}"


class EvalError(RunError):
    """A compiled model that cannot be evaluated here (its data set is gone, no GPU); says what to do."""


@dataclass(frozen=True)
class Reevaluation:
    """Accuracies as fractions in [0, 1]; ``robust`` and ``implementations`` are keyed by attack name."""

    clean: float
    robust: dict[str, float]
    implementations: dict[str, str]
    sanity: tuple[SanityCheck, ...]
    samples: int
    seconds: float

    def to_dict(self) -> dict:
        """The JSON-ready form (accuracies stay fractions)."""
        return {"clean": self.clean, "robust": dict(self.robust), "implementations": dict(self.implementations),
                "sanity": [dataclasses.asdict(check) for check in self.sanity], "samples": self.samples,
                "seconds": self.seconds}


def resolved_spec(folder: Path, *, allow_import: bool = False) -> Spec:
    """The validated recipe a run folder's ``report.json`` recorded (its ``resolved`` key).

    Raises:
        ArtifactError: the report is missing, unreadable or not a run report, or its recipe no longer validates.
    """
    path = Path(folder) / "report.json"
    try:
        files.require_file(path, "report")
        report = parse_report(path.read_bytes(), path)
    except FileNotFoundError:
        raise ArtifactError(f"{folder} holds no report.json, which records the recipe to evaluate with") from None
    except files.FileProblem as problem:
        raise ArtifactError(str(problem)) from None
    except OSError as error:
        raise ArtifactError(f"cannot read {path}: {error}") from None
    except ReportError as error:
        raise ArtifactError(str(error)) from None
    base = Path(folder).resolve() / report.recipe_folder if report.recipe_folder is not None else None
    try:
        return Spec.model_validate(_paths_from(report.resolved, base), context={"allow_import": allow_import})
    except ValidationError as error:
        raise ArtifactError(f"the recipe recorded in {path} does not validate: {error}") from None


def _paths_from(resolved: dict[str, Any], base: Path | None) -> dict[str, Any]:
    """The recorded recipe with its relative paths (`weights`, `root`) taken from ``base``, the recipe's folder;
    without one (an older report), they stay relative to the current folder."""
    if base is None:
        return resolved
    found = {block: dict(values) if isinstance(values, dict) else values for block, values in resolved.items()}
    for block, key in (("model", "weights"), ("data", "root")):
        section = found.get(block)
        if isinstance(section, dict) and isinstance(section.get(key), str) and not Path(section[key]).is_absolute():
            section[key] = os.path.normpath(base / section[key])
    return found


def reevaluate(folder: Path, attacks: Sequence[AttackSetting] = (), *, samples: int | None = None,
               sanity: bool = False, seed: int = 0, device: str = "cpu", allow_import: bool = False) -> Reevaluation:
    """Clean and robust accuracy of the compiled model in ``folder`` under ``attacks`` (default: the
    recipe's), on the first ``samples`` test images (default: as many as the recipe evaluated);
    with ``sanity``, the gradient-masking checks too.

    Raises:
        ArtifactError: the folder holds no loadable model or no recorded recipe.
        MissingExtra: an AutoAttack is asked for and ``pyautoattack`` is not installed.
        EvalError: the recorded recipe no longer runs here (its data folder is gone), or ``device``
            is ``cuda`` on a machine without one.
    """
    spec = resolved_spec(folder, allow_import=allow_import)
    model = load(folder, allow_import=allow_import)
    try:
        return reevaluate_model(model, spec, attacks, samples=samples, sanity=sanity, seed=seed, device=device)
    except SpecProblem as problem:  # a recipe setting, but of the recorded recipe: no line of the user's to show
        raise EvalError(f"{folder}: {problem.message}", help=problem.help) from None


def reevaluate_model(model: nn.Module, spec: Spec, attacks: Sequence[AttackSetting] = (), *,
                     samples: int | None = None, sanity: bool = False, seed: int = 0,
                     device: str = "cpu") -> Reevaluation:
    """``reevaluate`` for a model already in hand (taking images in [0, 1], giving logits)."""
    started = time.perf_counter()
    if samples is not None and samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise EvalError(f"device `{device}`, but no CUDA device is visible on this machine",
                        help="evaluate on the CPU: --device cpu")
    settings = tuple(attacks) or tuple(spec.evaluate.attacks)
    if any(isinstance(s, AutoAttackSetting) for s in settings):
        autoattack_module()  # a missing extra fails now, not after the slower attacks
    target = torch.device(device)
    model = model.to(target)
    test = datasets(spec).test
    samples = samples if samples is not None else spec.evaluate.samples
    # One run per distinct attack: `pgd` and `pgd(steps = 20)` are the same attack under one name.
    own = {attack_name(attack_for(s, spec.threat)): s for s in settings if not isinstance(s, AutoAttackSetting)}
    evaluation = evaluate(model, test, EvaluateSpec(attacks=tuple(own.values()), samples=samples), spec.threat,
                          seed=seed, device=target)
    batches = test_batches(test, samples, target)
    robust, implementations, flags = {}, {}, []
    for setting in settings:
        if isinstance(setting, AutoAttackSetting):
            name, value, found = run_autoattack(model, batches, setting, spec.threat, seed)
            robust[name], implementations[name] = value, autoattack_implementation(setting)
            flags += [f"{name}: {message}" for message in found]
        else:
            name = attack_name(attack_for(setting, spec.threat))
            robust[name], implementations[name] = evaluation.robust[name], _OWN
    checks = sanity_checks(model, batches, settings, spec.threat, robust, seed, flags) if sanity else ()
    return Reevaluation(evaluation.clean, robust, implementations, checks, evaluation.samples,
                        time.perf_counter() - started)
