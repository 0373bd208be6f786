"""Evaluate stage, for artifacts: re-evaluate a compiled model under any attacks, with gradient-masking sanity checks."""  # noqa: E501 (the one-line summary the brief asks for)

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import ModuleType
from typing import Annotated, ClassVar, Literal

import torch
from pydantic import ValidationError
from pydantic_core import PydanticCustomError
from torch import Tensor, nn

from .. import __version__, files
from ..deploy.artifacts import ArtifactError, load
from ..lang import coerce as c
from ..lang import syntax as ast
from ..lang.errors import CStarError, Diagnostic, did_you_mean
from ..lang.lower import Section, lower
from ..lang.parse import parse
from ..lang.render import plural
from ..lang.source import SourceFile, Span
from ..lang.spec import EvaluateSpec, FgsmAttack, PgdAttack, Spec, ThreatSpec
from ..lang.spec.base import Block, positive_number, typed
from ..lang.validate import check_sections
from ..train.attacks import Attack, Fgsm, Pgd, accuracy, evaluating
from ..train.data import datasets
from .evaluation import EVAL_BATCH, attack_for, attack_name, evaluate, test_batches

AUTOATTACK_VERSIONS = ("standard", "plus", "rand")
ATTACK_KINDS = ("pgd", "fgsm", "autoattack")
ORIGIN = "--attack"  # the file name diagnostics of an attack given on the command line show
# The attack is parsed as the one item of a recipe's attack list, on a line of its own, so that its
# diagnostics are the recipe's and map back to the user's text by an offset.
_BEFORE, _AFTER = "evaluate {\n  attacks = [\n", "\n  ]\n}\n"
_AUTOATTACK_NORMS = {"linf": "Linf", "l2": "L2"}
_UNBOUNDED = Pgd(eps=1.0, step=0.1, steps=50, norm="linf", random_start=True)
# The label of our own attacks in reports: kept as written when the code moved to cstar_dsl.train.attacks.
_OWN = f"cstar_dsl.attacks {__version__}"


class MissingExtra(Exception):
    """A feature needs an optional package that is not installed; the message says how to install it."""


@dataclass(frozen=True)
class AutoAttackSetting:
    """The original AutoAttack (Croce & Hein 2020), run through the optional ``pyautoattack`` package."""

    version: str = "standard"
    eps: float | None = None  # None: the run's threat eps


AttackSetting = PgdAttack | FgsmAttack | AutoAttackSetting


@dataclass(frozen=True)
class SanityCheck:
    """One gradient-masking check: its verdict and the numbers behind it."""

    name: str
    passed: bool
    detail: str


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


# ------------------------------------------------------------------- parsing


class _AutoAttackArguments(Block):
    kind: Literal["autoattack"] = "autoattack"
    version: Annotated[str, typed(c.choice, options=AUTOATTACK_VERSIONS, what="AutoAttack version")] = "standard"
    eps: Annotated[float | None, positive_number("`eps`", "eps-not-positive")] = None
    positional: ClassVar[tuple[str, ...]] = ("version",)


def parse_attack(text: str) -> PgdAttack | FgsmAttack | AutoAttackSetting:
    """One attack as a recipe writes it: ``pgd``, ``pgd(steps = 50, restarts = 5)``, ``fgsm``, ``autoattack``,
    ``autoattack(version = standard)``.

    Raises:
        CStarError: the recipe's own diagnostics, pointing into ``text`` (shown as the file ``--attack``).
    """
    try:
        return _parse_attack(_BEFORE + text + _AFTER, text)
    except CStarError as error:
        raise CStarError([_relocated(d, text) for d in error.diagnostics]) from None


def _parse_attack(wrapped: str, text: str) -> PgdAttack | FgsmAttack | AutoAttackSetting:
    lowered = lower(parse(wrapped, ORIGIN))
    node = _the_attack(lowered.root, lowered.diagnostics, text)
    name = node.name if isinstance(node, ast.Call) else node
    if isinstance(name, ast.Name) and name.value == "autoattack":
        return _autoattack_setting(node)
    if isinstance(name, ast.Name) and name.value not in ATTACK_KINDS:
        # The recipe's own message would offer pgd and fgsm only.
        raise CStarError([_unknown_attack(name)])
    try:
        check_sections(lowered.root, lowered.diagnostics)
    except CStarError as error:
        # Only the evaluate block is written, so the missing other blocks are no problem here.
        problems = [d for d in error.diagnostics if d.code != "missing-block"]
        if any(d.is_error for d in problems):
            raise CStarError(problems) from None
    return EvaluateSpec.model_validate(lowered.root["evaluate"]).attacks[0]


def _the_attack(root: Section, found: list[Diagnostic], text: str) -> ast.Value:
    """The single attack value, refusing text that closed the list and wrote more of the recipe."""
    section = root.get("evaluate")
    attacks = section.get("attacks") if isinstance(section, Section) else None
    whole = len(_BEFORE), len(_BEFORE) + len(text)
    if (not found and set(root) == {"evaluate"} and isinstance(section, Section) and set(section) == {"attacks"}
            and isinstance(attacks, ast.List) and len(attacks.items) == 1
            and whole[0] <= attacks.items[0].span.start and attacks.items[0].span.end <= whole[1]):
        return attacks.items[0]
    count = len(attacks.items) if isinstance(attacks, ast.List) and attacks.items else None
    source = SourceFile(ORIGIN, _BEFORE + text + _AFTER)
    raise CStarError([Diagnostic(
        "wrong-type", f"expected one attack, found {count}" if count and count > 1 else "expected one attack",
        source.span(*whole), label="not one attack",
        help="give one attack at a time: pgd, pgd(steps = 50, restarts = 5), fgsm or autoattack")])


def _unknown_attack(name: ast.Name) -> Diagnostic:
    return Diagnostic("unknown-attack", f"unknown attack `{c.clip(name.value)}`", name.span,
                      label=did_you_mean(name.value, ATTACK_KINDS) or "not a known attack",
                      help=f"choose one of: {', '.join(ATTACK_KINDS)}")


def _autoattack_setting(node: ast.Value) -> AutoAttackSetting:
    try:
        fields = c.variant(node, {"autoattack": _AutoAttackArguments}, what="attack", code="unknown-attack")
        arguments = _AutoAttackArguments.model_validate(fields)
    except PydanticCustomError as error:
        raise CStarError([_custom_diagnostic(error.type, error.context or {}, node)]) from None
    except ValidationError as error:
        raise CStarError([_argument_diagnostic(e, node) for e in error.errors(include_url=False)]) from None
    return AutoAttackSetting(arguments.version, arguments.eps)


def _argument_diagnostic(error: dict, node: ast.Value) -> Diagnostic:
    if error["type"] == "extra_forbidden" and isinstance(node, ast.Call):
        key = str(error["loc"][-1])
        keyword = node.keyword(key)
        allowed = [name for name in _AutoAttackArguments.model_fields if name != "kind"]
        return Diagnostic("unknown-argument", f"`autoattack` has no argument `{key}`",
                          keyword.name.span if keyword else node.span,
                          label=did_you_mean(key, allowed) or "unknown argument",
                          help=f"its arguments are: {', '.join(allowed)}")
    context = dict(error.get("ctx") or {})
    span = getattr(error.get("input"), "span", None)
    return _custom_diagnostic(error["type"], context, node, span)


def _custom_diagnostic(code: str, context: dict, node: ast.Value, span: Span | None = None) -> Diagnostic:
    for index in context.get("at", ()):
        if isinstance(node, ast.Call) and isinstance(index, int) and 0 <= index < len(node.args):
            span = node.args[index].span
    return Diagnostic(code, str(context.get("message", code)), span or node.span, label=context.get("label"),
                      help=context.get("help"))


def _relocated(diagnostic: Diagnostic, text: str) -> Diagnostic:
    """A diagnostic of the wrapped recipe, pointing into the user's own text instead."""
    span = diagnostic.span
    if span is None:
        return diagnostic
    source, offset = SourceFile(ORIGIN, text), len(_BEFORE)
    if span.start >= offset + len(text) and span.start > offset:
        # The parser stumbled on the list's closing bracket, which the user never wrote: the text ended early.
        return dataclasses.replace(diagnostic, code="unexpected-end", message="the attack ends before it is complete",
                                   span=source.span(len(text), len(text)))
    start = min(max(span.start - offset, 0), len(text))
    return dataclasses.replace(diagnostic, span=source.span(start, min(max(span.end - offset, start), len(text))))


# ------------------------------------------------------------- re-evaluation


def resolved_spec(folder: Path, *, allow_import: bool = False) -> Spec:
    """The validated recipe a run folder's ``report.json`` recorded (its ``resolved`` key).

    Raises:
        ArtifactError: the report is missing or unreadable, or its recipe no longer validates.
    """
    path = Path(folder) / "report.json"
    try:
        files.require_file(path, "report")
        report = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactError(f"{folder} holds no report.json, which records the recipe to evaluate with") from None
    except files.FileProblem as problem:
        raise ArtifactError(str(problem)) from None
    except (OSError, ValueError) as error:
        raise ArtifactError(f"cannot read {path}: {error}") from None
    resolved = report.get("resolved") if isinstance(report, dict) else None
    if not isinstance(resolved, dict):
        raise ArtifactError(f"{path} records no resolved recipe (its `resolved` key)")
    try:
        return Spec.model_validate(resolved, context={"allow_import": allow_import})
    except ValidationError as error:
        raise ArtifactError(f"the recipe recorded in {path} does not validate: {error}") from None


def reevaluate(folder: Path, attacks: Sequence[AttackSetting] = (), *, samples: int | None = None,
               sanity: bool = False, seed: int = 0, device: str = "cpu", allow_import: bool = False) -> Reevaluation:
    """Clean and robust accuracy of the compiled model in ``folder`` under ``attacks`` (default: the
    recipe's), on the first ``samples`` test images (default: as many as the recipe evaluated);
    with ``sanity``, the gradient-masking checks too.

    Raises:
        ArtifactError: the folder holds no loadable model or no recorded recipe.
        MissingExtra: an AutoAttack is asked for and ``pyautoattack`` is not installed.
    """
    spec = resolved_spec(folder, allow_import=allow_import)
    model = load(folder, allow_import=allow_import)
    return reevaluate_model(model, spec, attacks, samples=samples, sanity=sanity, seed=seed, device=device)


def reevaluate_model(model: nn.Module, spec: Spec, attacks: Sequence[AttackSetting] = (), *,
                     samples: int | None = None, sanity: bool = False, seed: int = 0,
                     device: str = "cpu") -> Reevaluation:
    """``reevaluate`` for a model already in hand (taking images in [0, 1], giving logits)."""
    started = time.perf_counter()
    if samples is not None and samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    settings = tuple(attacks) or tuple(spec.evaluate.attacks)
    if any(isinstance(s, AutoAttackSetting) for s in settings):
        _autoattack_module()  # a missing extra fails now, not after the slower attacks
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
            name, value, found = _run_autoattack(model, batches, setting, spec.threat, seed)
            robust[name], implementations[name] = value, _autoattack_implementation(setting)
            flags += [f"{name}: {message}" for message in found]
        else:
            name = attack_name(attack_for(setting, spec.threat))
            robust[name], implementations[name] = evaluation.robust[name], _OWN
    checks = _sanity(model, batches, settings, spec.threat, robust, seed, flags) if sanity else ()
    return Reevaluation(evaluation.clean, robust, implementations, checks, evaluation.samples,
                        time.perf_counter() - started)


# ------------------------------------------------------------ sanity checks


def _sanity(model: nn.Module, batches: list[tuple[Tensor, Tensor]], settings: tuple[AttackSetting, ...],
            threat: ThreatSpec, robust: dict[str, float], seed: int, flags: list[str]) -> tuple[SanityCheck, ...]:
    n = sum(len(y) for _, y in batches)
    measure = _Measure(model, batches, seed, n)
    baseline = _strongest_pgd(settings, threat, robust)
    base_accuracy = robust.get(attack_name(baseline))
    if base_accuracy is None:
        base_accuracy = measure(baseline)
    checks = [
        _more_steps_check(baseline, base_accuracy, measure),
        _unbounded_check(measure),
        _single_step_check(baseline, base_accuracy, measure),
    ]
    if any(isinstance(s, AutoAttackSetting) for s in settings):
        checks.append(SanityCheck("autoattack raises none of its flags", not flags,
                                  "; ".join(flags) or "no flag: randomness, softmax output, zero gradients, "
                                  "dynamic defense, Square beating the white-box attacks, out-of-ball examples"))
    return tuple(checks)


@dataclass(frozen=True)
class _Measure:
    """Accuracy under an attack on the evaluated images, the attack's random starts seeded by ``seed``."""

    model: nn.Module
    batches: list[tuple[Tensor, Tensor]]
    seed: int
    samples: int

    def __call__(self, attack: Attack) -> float:
        device = self.batches[0][0].device
        return accuracy(self.model, self.batches, attack, torch.Generator(device=device).manual_seed(self.seed))

    def tolerance(self) -> float:
        """Noise allowed between two attack runs: one image or half a point, whichever is larger."""
        return max(1 / self.samples, 0.005)

    def shown(self, value: float) -> str:
        return f"{value:.1%} ({round(value * self.samples)}/{self.samples})"


def _strongest_pgd(settings: tuple[AttackSetting, ...], threat: ThreatSpec, robust: dict[str, float]) -> Pgd:
    given = [attack_for(s, threat) for s in settings if isinstance(s, PgdAttack)]
    if not given:
        return attack_for(PgdAttack(), threat)  # type: ignore[return-value]
    return min(given, key=lambda a: (robust[attack_name(a)], -a.steps * a.restarts))  # type: ignore[return-value]


def _more_steps_check(baseline: Pgd, base_accuracy: float, measure: _Measure) -> SanityCheck:
    """PGD with 5x the steps and 2 more restarts must not leave the model more accurate, beyond noise."""
    stronger = dataclasses.replace(baseline, steps=baseline.steps * 5, restarts=baseline.restarts + 2)
    strong_accuracy = measure(stronger)
    tolerance = measure.tolerance()
    return SanityCheck(
        "more steps do not help the model", strong_accuracy <= base_accuracy + tolerance,
        f"{attack_name(baseline)}: {measure.shown(base_accuracy)}; {attack_name(stronger)}: "
        f"{measure.shown(strong_accuracy)} ({(strong_accuracy - base_accuracy) * 100:+.1f} points); "
        f"allowed rise {_points(tolerance)} (1 image or 0.5 points, whichever is larger)")


def _unbounded_check(measure: _Measure) -> SanityCheck:
    """An L-inf attack of eps 1 can reach any image: unless gradients are masked, it leaves ~0% accuracy."""
    reached = measure(_UNBOUNDED)
    allowed = max(0.01, 2 / measure.samples)
    return SanityCheck(
        "an unbounded attack reaches ~0%", reached <= allowed + 1e-12,
        f"{attack_name(_UNBOUNDED)}: {measure.shown(reached)}; allowed at most {allowed:.1%} "
        f"(1% or 2 images, whichever is larger)")


def _points(share: float) -> str:
    return plural(float(f"{share * 100:.2g}"), "point")


def _single_step_check(baseline: Pgd, base_accuracy: float, measure: _Measure) -> SanityCheck:
    """The single-step attack at the same eps must not beat the iterative one, beyond noise."""
    single: Attack = Fgsm(baseline.eps) if baseline.norm == "linf" else Pgd(
        baseline.eps, baseline.eps, 1, baseline.norm, random_start=False)
    single_accuracy = measure(single)
    tolerance = measure.tolerance()
    return SanityCheck(
        "iterative beats single-step", single_accuracy >= base_accuracy - tolerance,
        f"{attack_name(single)}: {measure.shown(single_accuracy)}; {attack_name(baseline)}: "
        f"{measure.shown(base_accuracy)}; the single step may be lower by {_points(tolerance)} at most "
        f"(1 image or 0.5 points, whichever is larger)")


# ----------------------------------------------------------------- AutoAttack


def _autoattack_module() -> ModuleType:
    try:
        return importlib.import_module("pyautoattack")
    except ModuleNotFoundError as error:
        if error.name != "pyautoattack":
            raise
        raise MissingExtra("AutoAttack needs the optional package `pyautoattack`: pip install pyautoattack") from None


def _autoattack_implementation(setting: AutoAttackSetting) -> str:
    try:
        installed = version("pyautoattack")
    except PackageNotFoundError:
        installed = "unknown version"
    return f"pyautoattack {installed} (autoattack {setting.version})"


class _Flags(logging.Handler):
    """Collects the warnings AutoAttack logs (its own gradient-masking flags) instead of printing them."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _run_autoattack(model: nn.Module, batches: list[tuple[Tensor, Tensor]], setting: AutoAttackSetting,
                    threat: ThreatSpec, seed: int) -> tuple[str, float, list[str]]:
    """The accuracy on AutoAttack's adversarial examples (recomputed, as RobustBench does) and its flags."""
    module = _autoattack_module()
    eps = setting.eps if setting.eps is not None else threat.eps
    name = f"autoattack({setting.version}, {threat.norm}, eps={eps:g})"
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    flags = _Flags()
    # A logger of our own, outside logging's registry: AutoAttack's flags are collected, nothing is printed.
    logger = logging.Logger("cstar.autoattack", logging.WARNING)
    logger.addHandler(flags)
    # AutoAttack seeds torch's global generator; fork_rng gives the caller's random state back after.
    with evaluating(model), torch.random.fork_rng(devices=_cuda_devices(x.device)):
        adversary = module.AutoAttack(model, norm=_AUTOATTACK_NORMS[threat.norm], eps=eps, version=setting.version,
                                      seed=seed, device=x.device)
        for part in (adversary, adversary.apgd, adversary.apgd_targeted):
            part.logger = logger
        adversarial, _ = adversary.run_standard_evaluation(x, y, batch_size=EVAL_BATCH)
    found = [*dict.fromkeys(flags.messages), *_outside_ball(adversarial, x, eps, threat.norm)]  # once per target
    return name, accuracy(model, [(adversarial, y)]), found


def _outside_ball(adversarial: Tensor, x: Tensor, eps: float, norm: str) -> list[str]:
    delta = (adversarial - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    found = []
    if bool(torch.isnan(adversarial).any()) or float(size.max()) > eps + 1e-5:
        found.append(f"adversarial examples leave the {norm} ball: largest perturbation {float(size.max()):.4g}")
    if float(adversarial.min()) < 0 or float(adversarial.max()) > 1:
        found.append("adversarial examples leave the image range [0, 1]")
    return found


def _cuda_devices(device: torch.device) -> list[int]:
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]
