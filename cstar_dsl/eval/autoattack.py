"""Evaluate stage, AutoAttack: the original attack (optional ``pyautoattack``), its flags collected, not printed."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, version
from types import ModuleType

import torch
from torch import Tensor, nn

from ..errors import RunError
from ..lang.spec import ThreatSpec
from ..train.attacks import accuracy, evaluating
from .attack_text import AutoAttackSetting
from .evaluation import EVAL_BATCH

_AUTOATTACK_NORMS = {"linf": "Linf", "l2": "L2"}


class MissingExtra(RunError):
    """A feature needs an optional package that is not installed; the message says how to install it."""


def autoattack_module() -> ModuleType:
    try:
        return importlib.import_module("pyautoattack")
    except ModuleNotFoundError as error:
        if error.name != "pyautoattack":
            raise
        raise MissingExtra("AutoAttack needs the optional package `pyautoattack`: pip install pyautoattack") from None


def autoattack_implementation(setting: AutoAttackSetting) -> str:
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


def run_autoattack(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], setting: AutoAttackSetting,
                    threat: ThreatSpec, seed: int) -> tuple[str, float, list[str]]:
    """The accuracy on AutoAttack's adversarial examples (recomputed, as RobustBench does) and its flags."""
    module = autoattack_module()
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
