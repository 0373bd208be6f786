"""Report stage: what the compile driver writes next to the model, report.md and its two plots."""

from .markdown import markdown
from .plots import plot_curves, plot_ranks

__all__ = ["markdown", "plot_curves", "plot_ranks"]
