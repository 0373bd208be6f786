"""Spec stage, shared parts: the frozen block base and the before-validators built on ``coerce``."""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Any

from pydantic import BaseModel, BeforeValidator, ConfigDict

from .. import coerce as c
from .. import syntax as ast
from ..registry import normalize_module_name  # noqa: F401 (re-exported)


class Block(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def typed(function: Any, /, **options: Any) -> BeforeValidator:
    """A before-validator from a coerce function; None (an unset optional) passes through."""
    convert = partial(function, **options) if options else function
    return BeforeValidator(lambda value: None if value is None else convert(value))


def int_at_least(low: int, what: str, high: int | None = None) -> BeforeValidator:
    """A whole number of at least ``low`` (and at most ``high``, when given)."""
    def convert(value: object) -> int:
        number = int(c.at_least(c.integer(value), low, what, written=c.shown(value)))
        return number if high is None else int(c.at_most(number, high, what, written=c.shown(value)))
    return typed(convert)


def positive_number(what: str, code: str = "out-of-range") -> BeforeValidator:
    return typed(lambda v: c.positive(c.number(v), what, code=code, written=c.shown(v)))


def number_at_least(low: float, what: str) -> BeforeValidator:
    return typed(lambda v: c.at_least(c.number(v), low, what, written=c.shown(v)))


def path(value: object) -> Path:
    """A path; relative paths resolve against the folder of the recipe that wrote them."""
    if isinstance(value, Path):
        return value
    raw = Path(c.text(value, example='"data/mnist"'))
    if raw.is_absolute():
        return raw
    base = Path(os.path.realpath(value.span.source.path)).parent if isinstance(value, ast.String) else Path.cwd()
    # realpath, not Path.resolve, which raises on a symlink loop: the reader of the path reports that.
    return Path(os.path.realpath(base / raw))


def names(value: object, what: str) -> tuple[str, ...]:
    return c.sequence(value, lambda v: c.text(v, example='"layer4.1.conv2"'), what=what)
