"""The `cstar` command line (``commands``): the only code that prints."""

from .commands import main, run

__all__ = ["main", "run"]
