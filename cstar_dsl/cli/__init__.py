"""The `cstar` command line: the only code that prints. ``entry`` parses and dispatches; one module a command
(check, fmt, plan, diff, compile, export, eval); ``progress`` and ``output`` are shared."""

from .entry import main, run

__all__ = ["main", "run"]
