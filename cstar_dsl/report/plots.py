"""Report stage: the report's two plots, training curves (curves.png) and ranks per layer (ranks.png)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..lang.render import si
from .values import ARROW, _count, _phases, _total

if TYPE_CHECKING:  # matplotlib is imported inside the plot functions: importing this module stays cheap
    from matplotlib.axes import Axes

    from ..run_report import Accuracy, EpochRow, LayerReport

DPI = 120
MAX_FIGURE_WIDTH = 20.0  # inches: a 200-layer network still gives a figure a browser can show
MAX_TICK_LABELS = 100
MAX_LABEL_CHARS = 32
# Colour-blind-safe (Okabe-Ito); one per layer method in the ranks plot, in order of first appearance.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")
BEFORE_COLOUR = "#BBBBBB"
FONT_SAFE_BELOW = 0x0530  # code points below Armenian: Latin, IPA, Greek, Cyrillic


def plot_curves(history: Sequence[EpochRow], path: Path, test: Accuracy | None = None) -> None:
    """Training curves as a PNG: train accuracies, loss, and ADMM residual when recorded; phases marked.

    ``test`` is the report's ``accuracy`` (clean, and robust per attack): the test set is evaluated
    once, at the end, so it is drawn as points after the last epoch, labelled as such, not as a curve.
    """
    from matplotlib.figure import Figure

    rows = list(history)
    if not rows:
        _save_message("no training epochs", path)
        return
    epochs = list(range(1, len(rows) + 1))
    with_residual = any(_finite(row.residual) is not None for row in rows)
    panels = 3 if with_residual else 2
    fig = Figure(figsize=(5.0 * panels, 4.2), layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False)[0]
    spans = _phase_spans(rows)
    markers = len(rows) <= 60  # a one-epoch phase is a single point: invisible without a marker

    accuracy = axes[0]
    _line(accuracy, epochs, [_scaled(row.clean, 100) for row in rows], "train clean", markers)
    _line(accuracy, epochs, [_scaled(row.robust, 100) for row in rows], "train robust (PGD examples trained on)",
          markers)
    _test_points(accuracy, len(rows), test)
    accuracy.set_ylim(-2, 102)
    _decorate(accuracy, "Accuracy: training batches per epoch", "accuracy (%)", spans, len(rows))

    loss = axes[1]
    values = [_finite(row.loss) for row in rows]
    admm = any(row.phase == "admm" for row in rows)
    label = ("adversarial loss; in admm epochs\nplus the penalty " + r"$\rho/2\,\|W-Z+U\|^2$") if admm else (
        "adversarial loss")
    _line(loss, epochs, values, label, markers, colour="#D55E00")
    _log_if_spread(loss, values)
    _decorate(loss, "Training loss (what the optimizer minimized)", "loss", spans, len(rows))

    if with_residual:
        _residual_panel(axes[2], rows, spans, markers)
    fig.savefig(path, dpi=DPI)


def _test_points(ax: Axes, last: int, test: Accuracy | None) -> None:
    """The final test-set accuracies as labelled points just after the last epoch."""
    if test is None:
        return
    robust = [_finite(value) for value in test.robust.values()]
    points = [("test clean", _finite(test.clean), "#0072B2", "*"),
              ("test robust (worst attack)", min((v for v in robust if v is not None), default=None), "#E69F00", "*")]
    for label, value, colour, marker in points:
        if value is not None:
            ax.plot([last + 0.35], [value * 100], marker, color=colour, markersize=11, markeredgecolor="black",
                    label=f"{label}, after training: {value:.1%}", linestyle="none", clip_on=False)


def _plain_ticks(ax: Axes, shown: Callable[[float], str] | None = None) -> None:
    """Log-axis ticks as plain numbers (0.2, 1, 2; or 10k with ``shown=si``), not 2x10^-1: a reader
    should not have to decode them. Minor ticks are labelled at 2 and 5 only, so they never crowd."""
    from matplotlib.ticker import FuncFormatter

    def label(value: float, minor: bool) -> str:
        mantissa = round(value / 10 ** math.floor(math.log10(value)), 6) if value > 0 else 0
        if minor and mantissa not in (2, 5):
            return ""
        return shown(value) if shown else f"{value:g}"

    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: label(value, False)))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda value, _: label(value, True)))


def _residual_panel(ax: Axes, rows: Sequence[EpochRow], spans: list[tuple[str, int, int]], markers: bool) -> None:
    epochs = [index for index, row in enumerate(rows, 1) if _finite(row.residual) is not None]
    residuals = [_finite(rows[index - 1].residual) for index in epochs]
    _line(ax, epochs, residuals, r"residual $\|W-Z\|/\|W\|$", markers, colour="#009E73")
    _log_if_spread(ax, residuals)
    _decorate(ax, "ADMM residual", "mean residual", spans, len(rows), legend=False)
    handles, labels = ax.get_legend_handles_labels()
    rhos = [_finite(rows[index - 1].rho) for index in epochs]
    if any(rho is not None for rho in rhos):
        # rho grows by orders of magnitude under a geometric schedule: its own axis keeps both curves readable.
        twin = ax.twinx()
        _line(twin, epochs, rhos, r"$\rho$ (penalty weight, right axis)", markers, colour="#CC79A7", style="--")
        _log_if_spread(twin, rhos, spread=1.0)
        twin.set_ylabel(r"$\rho$")
        more_handles, more_labels = twin.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    ax.legend(handles, labels, fontsize=8, loc="best")


def _line(ax: Axes, x: Sequence[int], y: Sequence[float | None], label: str, markers: bool,
          colour: str | None = None, style: str = "-") -> None:
    if all(value is None for value in y):
        return  # an all-missing series would only add an empty legend entry
    values = [math.nan if value is None else value for value in y]  # NaN leaves a gap in the line
    ax.plot(x, values, style, label=label, color=colour, marker="o" if markers else None, markersize=3)


def _decorate(ax: Axes, title: str, ylabel: str, spans: list[tuple[str, int, int]], count: int,
              legend: bool = True) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_title(title, pad=16)  # room above for the phase names
    ax.set_xlabel("epoch (all phases)")
    ax.set_ylabel(ylabel)
    ax.set_xlim(0.5, count + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.grid(True, alpha=0.3)
    for index, (name, first, last) in enumerate(spans):
        if index:
            ax.axvline(first - 0.5, linestyle="--", color="0.45", linewidth=0.9)
        ax.text((first + last) / 2, 1.01, name, transform=ax.get_xaxis_transform(), ha="center", va="bottom",
                fontsize=8, color="0.3")
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")


def _phase_spans(rows: Sequence[EpochRow]) -> list[tuple[str, int, int]]:
    """(label, first epoch, last epoch) per run of consecutive epochs of one phase, 1-based."""
    spans: list[tuple[str, int, int]] = []
    first = 1
    for name, group in _phases(rows):
        spans.append((_plot_text(name), first, first + len(group) - 1))
        first += len(group)
    return spans


def _log_if_spread(ax: Axes, values: Sequence[float | None], spread: float = 50.0) -> None:
    positive = [value for value in values if value is not None]
    # A log axis only when every value can sit on it and they span enough to need it.
    if positive and min(positive) > 0 and max(positive) / min(positive) > spread:
        ax.set_yscale("log")
        _plain_ticks(ax)


def plot_ranks(layers: Sequence[LayerReport], path: Path) -> None:
    """Parameters before and after per layer as a PNG (log bars), with the energy kept on a twin axis."""
    from matplotlib.figure import Figure

    rows = sorted(layers, key=lambda row: _natural(row.name))  # one order for every method
    if not rows:
        _save_message("no layers", path)
        return
    count = len(rows)
    width = min(MAX_FIGURE_WIDTH, max(6.0, 2.0 + 0.3 * count))
    fig = Figure(figsize=(width, 5.5), layout="constrained")
    ax = fig.subplots()
    before = [_positive(row.params_before) for row in rows]
    after = [_positive(row.params_after) for row in rows]
    _bars(ax, [index - 0.2 for index in range(count)], before, "params before", BEFORE_COLOUR)
    methods = list(dict.fromkeys(_plot_text(row.method) for row in rows))
    for colour_index, method in enumerate(methods):
        picked = [index for index, row in enumerate(rows) if _plot_text(row.method) == method]
        _bars(ax, [index + 0.2 for index in picked], [after[index] for index in picked],
              f"after: {method}" + (" (ranks on the bar)" if method in ("svd", "tucker2") else ""),
              PALETTE[colour_index % len(PALETTE)])
    _rank_labels(ax, rows, after)
    counts = [value for value in before + after if value is not None]
    if counts:
        ax.set_yscale("log")  # a 1,000-parameter head next to a 2M-parameter conv: only a log axis shows both
        _plain_ticks(ax, shown=si)
        ax.set_ylim(bottom=min(counts) / 3)  # else the smallest bar starts at the axis and all but vanishes
    ax.set_ylabel("parameters")
    ax.set_xlim(-0.7, count - 0.3)
    ax.set_title(f"Parameters per layer: {_count(_total(before))} {ARROW} {_count(_total(after))}")
    _layer_ticks(ax, [_plot_text(row.name) for row in rows])
    handles, labels = ax.get_legend_handles_labels()
    energy = [(index, kept) for index, row in enumerate(rows) if (kept := _finite(row.energy_kept)) is not None]
    if energy:
        twin = ax.twinx()
        twin.plot([index for index, _ in energy], [value for _, value in energy], "D", color="black",
                  markersize=4 if count <= 60 else 2, label="energy kept")
        twin.set_ylim(0, 1.05)
        twin.set_ylabel("energy kept")
        more_handles, more_labels = twin.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    if handles:
        # Above the axes, not inside: with hundreds of layers every spot inside covers some bars.
        fig.legend(handles, labels, fontsize=8, loc="outside upper center", ncols=min(len(handles), int(width // 1.5)),
                   frameon=False)
    fig.savefig(path, dpi=DPI)


def _rank_labels(ax: Axes, rows: Sequence[LayerReport], after: Sequence[float | None]) -> None:
    """What each after-bar is, written on it: its ranks ("14x11"), "dense", or "pruned"."""
    size = 7 if len(rows) <= 40 else 5
    for index, (row, height) in enumerate(zip(rows, after, strict=True)):
        text = "x".join(map(str, row.ranks)) if row.ranks else _plot_text(row.method)
        if height is not None and len(rows) <= 100:
            ax.text(index + 0.2, height * 1.15, text, rotation=90, ha="center", va="bottom", fontsize=size)


def _natural(name: str) -> tuple[tuple[int, int | str], ...]:
    """A sort key that puts `features.3` before `features.10`."""
    import re

    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", name))


def _bars(ax: Axes, x: Sequence[float], heights: Sequence[float | None], label: str, colour: str) -> None:
    kept = [(position, height) for position, height in zip(x, heights, strict=True) if height is not None]
    if kept:
        ax.bar([position for position, _ in kept], [height for _, height in kept], width=0.4, label=label,
               color=colour)


def _layer_ticks(ax: Axes, names: Sequence[str]) -> None:
    count = len(names)
    step = math.ceil(count / MAX_TICK_LABELS)  # past 100 layers, label every other (third, ...) one
    fontsize = 8 if count <= 40 else 6 if count <= 100 else 5
    labels = [_shorten(name) for name in names[::step]]
    ax.set_xticks(list(range(0, count, step)), labels, rotation=60 if count <= 40 else 90, ha="right",
                  rotation_mode="anchor", fontsize=fontsize)


def _shorten(name: str) -> str:
    # The end of a module path tells layers apart ("layer4.1.conv2"); keep it.
    return name if len(name) <= MAX_LABEL_CHARS else "…" + name[-(MAX_LABEL_CHARS - 1):]


def _save_message(message: str, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 3))
    fig.text(0.5, 0.5, message, ha="center", va="center", fontsize=16, color="0.35")
    fig.savefig(path, dpi=DPI)


def _plot_text(text: str) -> str:
    """Text safe for a plot: no "$" (which would start mathtext) and no character the font may lack."""
    text = text or "-"
    # Matplotlib warns on a missing glyph; its bundled DejaVu Sans covers Latin, Greek and Cyrillic.
    text = "".join(char if char.isprintable() and ord(char) < FONT_SAFE_BELOW else "?" for char in text)
    return text.replace("$", r"\$")


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _positive(value: int) -> float | None:
    """A count a log axis can show: none for a layer pruned away."""
    return float(value) if value > 0 else None


def _scaled(value: float | None, factor: float) -> float | None:
    number = _finite(value)
    return None if number is None else number * factor
