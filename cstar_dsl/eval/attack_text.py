"""Evaluate stage, `--attack` text: one attack written as in a recipe -> its setting, with the recipe's diagnostics."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

from pydantic import ValidationError
from pydantic_core import ErrorDetails, PydanticCustomError

from ..lang import coerce as c
from ..lang import syntax as ast
from ..lang.errors import ArgumentError, CStarError, Diagnostic, did_you_mean
from ..lang.lower import Section, lower
from ..lang.parse import parse
from ..lang.source import SourceFile, Span
from ..lang.spec import EvaluateSpec, FgsmAttack, PgdAttack
from ..lang.spec.base import Block, positive_number, typed
from ..lang.validate import check_sections

AUTOATTACK_VERSIONS = ("standard", "plus", "rand")
ATTACK_KINDS = ("pgd", "fgsm", "autoattack")
ORIGIN = "--attack"  # the file name diagnostics of an attack given on the command line show
# The attack is parsed as the one item of a recipe's attack list, on a line of its own, so that its
# diagnostics are the recipe's and map back to the user's text by an offset.
_BEFORE, _AFTER = "evaluate {\n  attacks = [\n", "\n  ]\n}\n"


@dataclass(frozen=True)
class AutoAttackSetting:
    """The original AutoAttack (Croce & Hein 2020), run through the optional ``pyautoattack`` package."""

    version: str = "standard"
    eps: float | None = None  # None: the run's threat eps


AttackSetting = PgdAttack | FgsmAttack | AutoAttackSetting


class _AutoAttackArguments(Block):
    kind: Literal["autoattack"] = "autoattack"
    version: Annotated[str, typed(c.choice, options=AUTOATTACK_VERSIONS, what="AutoAttack version")] = "standard"
    eps: Annotated[float | None, positive_number("`eps`", "eps-not-positive")] = None
    positional: ClassVar[tuple[str, ...]] = ("version",)


def parse_attack(text: str) -> PgdAttack | FgsmAttack | AutoAttackSetting:
    """One attack as a recipe writes it: ``pgd``, ``pgd(steps = 50, restarts = 5)``, ``fgsm``, ``autoattack``,
    ``autoattack(version = standard)``.

    Raises:
        ArgumentError: the recipe's own diagnostics, pointing into ``text`` (shown as the file ``--attack``).
    """
    try:
        return _parse_attack(_BEFORE + text + _AFTER, text)
    except CStarError as error:
        raise ArgumentError([_relocated(d, text) for d in error.diagnostics]) from None


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


def _argument_diagnostic(error: ErrorDetails, node: ast.Value) -> Diagnostic:
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
