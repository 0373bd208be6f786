"""Report stage: the compile report as Markdown for people, and its two plots (training curves, ranks)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..lang.render import plural, si

if TYPE_CHECKING:  # matplotlib is imported inside the plot functions: importing this module stays cheap
    from matplotlib.axes import Axes

DASH = "–"  # what every missing or null value renders as
ARROW = "→"
DPI = 120
MAX_FIGURE_WIDTH = 20.0  # inches: a 200-layer network still gives a figure a browser can show
MAX_TICK_LABELS = 100
MAX_LABEL_CHARS = 32
ACCURACY_METRICS = frozenset({"clean", "robust"})
OPERATORS = {">=": "≥", "<=": "≤", ">": ">", "<": "<", "==": "="}
# Colour-blind-safe (Okabe-Ito); one per layer method in the ranks plot, in order of first appearance.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")
BEFORE_COLOUR = "#BBBBBB"
FONT_SAFE_BELOW = 0x0530  # code points below Armenian: Latin, IPA, Greek, Cyrillic


# ---------------------------------------------------------------------------------------------- Markdown


def markdown(report: Mapping[str, Any]) -> str:
    """The report as GitHub Markdown, ending with a newline; null or missing values render as "–"."""
    sections = [
        _header(report),
        _summary(report),
        _requirements(report.get("requirements")),
        _layers(report.get("layers")),
        _training(report.get("history")),
        _timings(report.get("timings")),
        _data(report.get("data")),
        _machine(report.get("machine"), report.get("seed")),
        _warnings(report.get("warnings")),
        ["## Plots", "", "![curves](curves.png)", "", "![ranks](ranks.png)"],
    ]
    return "\n\n".join("\n".join(lines) for lines in sections) + "\n"


def _header(report: Mapping[str, Any]) -> list[str]:
    lines = [f"# cstar report: {_text(report.get('spec'))}", ""]
    facts = [f"spec sha256 {_code(report.get('spec_sha256'))}"]
    if report.get("schema") is not None:
        facts.append(f"schema {_code(report.get('schema'))}")
    lines.append(", ".join(facts))
    return lines


def _summary(report: Mapping[str, Any]) -> list[str]:
    compression = _mapping(report.get("compression"))
    accuracy = _mapping(report.get("accuracy"))
    dense, compressed = compression.get("params_dense"), compression.get("params_compressed")
    ratio = compression.get("ratio")
    if _num(ratio) is None:  # older or partial reports: the ratio still follows from the counts
        ratio = _quotient(dense, compressed)
    macs_dense, macs_compressed = compression.get("macs_dense"), compression.get("macs_compressed")
    rows = [
        ["Method", _text(report.get("method"))],
        ["Parameters", f"{_span(dense, compressed, _count)} ({_ratio(ratio)} smaller)"],
        ["Target", f"{_ratio(compression.get('target_ratio'))} (budget {_text(compression.get('budget'))})"],
        ["MACs", f"{_span(macs_dense, macs_compressed, _count)} "
                 f"({_ratio(_quotient(macs_dense, macs_compressed))} fewer)"],
        ["Latency (batch 1, CPU)", _latency(report.get("latency"))],
        ["Clean accuracy", _pct(accuracy.get("clean"))],
        *_robust_rows(accuracy.get("robust"), report.get("attacks")),
        ["Threat (training)", _threat(report.get("threat"))],
    ]
    requirements = _records(report.get("requirements"))
    if requirements:
        met = sum(1 for requirement in requirements if requirement.get("met") is True)
        rows.append(["Requirements", f"{met} of {len(requirements)} met"])
    return ["## Summary", "", *_table(["", "Value"], rows)]


def _latency(latency: Any) -> str:
    timing = _mapping(latency)
    dense = _mapping(timing.get("dense_ms")).get("median")
    compressed = _mapping(timing.get("compressed_ms")).get("median")
    if _num(dense) is None and _num(compressed) is None:
        return DASH
    return (f"{_span(dense, compressed, _milliseconds)} ({_ratio(_quotient(dense, compressed))} faster; "
            f"{_plural(timing.get('threads'), 'thread')}, {_text(timing.get('cpu'))})")


def _milliseconds(value: Any) -> str:
    text = _general(value)
    return text if text == DASH else f"{text} ms"


def _robust_rows(robust: Any, attacks: Any) -> list[list[str]]:
    if _num(robust) is not None or not isinstance(robust, Mapping):
        return [["Robust accuracy", _pct(robust)]]
    # An attack listed but never measured still gets its row, so a missing number is visible.
    names = list(robust) + [name for name in _mapping(attacks) if name not in robust]
    if not names:
        return [["Robust accuracy", DASH]]
    return [[f"Robust accuracy, {_code(name)}", _pct(robust.get(name))] for name in names]


def _threat(threat: Any) -> str:
    if not isinstance(threat, Mapping) or not threat:
        return DASH
    parts = [_text(threat.get("norm"))]
    known = {"norm", "eps", "step", "steps", "random_start", "restarts"}
    if "eps" in threat:
        parts.append(f"eps {_text(threat.get('eps'))}")
    if "step" in threat:
        parts.append(f"step {_text(threat.get('step'))}")
    if "steps" in threat:
        parts.append(f"{_text(threat.get('steps'))} steps")
    if "random_start" in threat:
        parts.append("random start" if threat.get("random_start") else "no random start")
    if "restarts" in threat:
        parts.append(_plural(threat.get("restarts"), "restart"))
    parts += [f"{key} {_text(value)}" for key, value in threat.items() if key not in known]
    return ", ".join(parts)


def _requirements(requirements: Any) -> list[str]:
    records = _records(requirements)
    if not records:
        return ["## Requirements", "", "none"]
    rows = []
    for requirement in records:
        metric = requirement.get("metric")
        operator = requirement.get("op")
        floor = f"{OPERATORS.get(operator, _text(operator))} {_metric_value(metric, requirement.get('value'))}"
        rows.append([_text(metric), floor, _metric_value(metric, requirement.get("measured")),
                     _status(requirement.get("met"))])
    return ["## Requirements", "", *_table(["Metric", "Required", "Measured", "Status"], rows, "llrl")]


def _status(met: Any) -> str:
    if met is True:
        return "✅ met"
    if met is False:
        return "❌ NOT MET"
    return DASH  # not evaluated: neither a pass nor a failure


def _metric_value(metric: Any, value: Any) -> str:
    return _pct(value) if metric in ACCURACY_METRICS else _text(value)


def _layers(layers: Any) -> list[str]:
    records = _records(layers)
    if not records:
        return ["## Layers", "", "none"]
    header = ["Layer", "Type", "Method", "Shape", "Rule", "Ranks", "Params", "Energy kept", "Note"]
    rows = [
        [_code(layer.get("name")), _text(layer.get("type")), _text(layer.get("method")), _shape(layer),
         _text(layer.get("rule")), _ranks(layer.get("ranks")),
         _span(layer.get("params_before"), layer.get("params_after"), _count), _pct(layer.get("energy_kept")),
         _text(layer.get("reason"))]
        for layer in records
    ]
    return ["## Layers", "", *_table(header, rows, "llllllrrl")]


def _shape(layer: Mapping[str, Any]) -> str:
    shape = _dims(layer.get("shape"))
    if "shape_after" not in layer:
        return shape
    return f"{shape} {ARROW} {_dims(layer.get('shape_after'))}"  # a pruned layer's new shape


def _dims(shape: Any) -> str:
    if isinstance(shape, Sequence) and not isinstance(shape, str) and shape:
        return "×".join(_text(size) for size in shape)
    return _text(shape)


def _ranks(ranks: Any) -> str:
    if isinstance(ranks, Sequence) and not isinstance(ranks, str):
        return ", ".join(_text(rank) for rank in ranks) or DASH
    return _text(ranks)


def _training(history: Any) -> list[str]:
    phases = _phases(_records(history))
    if not phases:
        return ["## Training", "", "no training epochs"]
    with_admm = any("rho" in row or "residual" in row for _, rows in phases for row in rows)
    header = ["Phase", "Epochs", "Final loss", "Train clean", "Train robust", "Final LR"]
    header += ["Final rho", "Final residual"] if with_admm else []
    header += ["Seconds"]
    table = []
    for name, rows in phases:
        last = rows[-1]
        line = [_text(name), str(len(rows)), _fixed(last.get("loss"), 4), _pct(last.get("clean")),
                _pct(last.get("robust")), _general(last.get("lr"))]
        if with_admm:
            line += [_general(last.get("rho")), _general(last.get("residual"))]
        line.append(_fixed(_total(row.get("seconds") for row in rows), 1))
        table.append(line)
    align = "lrrrrr" + ("rr" if with_admm else "") + "r"
    return ["## Training", "", *_table(header, table, align)]


def _phases(history: Sequence[Mapping[str, Any]]) -> list[tuple[Any, list[Mapping[str, Any]]]]:
    """Consecutive epochs of one phase grouped, in training order."""
    phases: list[tuple[Any, list[Mapping[str, Any]]]] = []
    for row in history:
        if phases and phases[-1][0] == row.get("phase"):
            phases[-1][1].append(row)
        else:
            phases.append((row.get("phase"), [row]))
    return phases


def _timings(timings: Any) -> list[str]:
    timings = _mapping(timings)
    if not timings:
        return ["## Timings", "", "none"]
    rows = [[_text(name), _duration(seconds)] for name, seconds in _mapping(timings.get("phases")).items()]
    rows.append(["evaluation", _duration(timings.get("evaluate_seconds"))])
    rows.append(["**total**", f"**{_duration(timings.get('total_seconds'))}**"])
    return ["## Timings", "", *_table(["Stage", "Time"], rows, "lr")]


def _data(data: Any) -> list[str]:
    data = _mapping(data)
    items = [("Data set", _text(data.get("name"))), ("Training examples", _grouped(data.get("train_size"))),
             ("Test examples", _grouped(data.get("test_size")))]
    items += _extras(data, {"name", "train_size", "test_size"})
    return ["## Data", "", *(f"- {label}: {value}" for label, value in items)]


def _machine(machine: Any, seed: Any) -> list[str]:
    machine = _mapping(machine)
    labels = {"device": "Device", "processor": "Processor", "threads": "Threads", "python": "Python",
              "torch": "torch", "cstar": "cstar"}
    items = [(label, _text(machine.get(key))) for key, label in labels.items()]
    items += _extras(machine, set(labels))
    items.append(("Seed", _text(seed)))
    return ["## Machine", "", *(f"- {label}: {value}" for label, value in items)]


def _extras(mapping: Mapping[str, Any], known: set[str]) -> list[tuple[str, str]]:
    # Keys a later report schema adds still show up instead of vanishing silently.
    return [(_text(key), _text(value)) for key, value in mapping.items() if key not in known]


def _warnings(warnings: Any) -> list[str]:
    if isinstance(warnings, str):
        warnings = [warnings]
    if not isinstance(warnings, Sequence) or not warnings:
        return ["## Warnings", "", "none"]
    # Continuation lines are indented so a multi-line warning stays one bullet.
    return ["## Warnings", "", *("- " + _text(warning).replace("\n", "\n  ") for warning in warnings)]


def _table(header: Sequence[str], rows: Iterable[Sequence[str]], align: str = "") -> list[str]:
    rules = {"l": "---", "r": "---:", "c": ":---:"}
    align = align.ljust(len(header), "l")
    lines = [_row(header), "|" + "|".join(rules[a] for a in align) + "|"]
    return lines + [_row(row) for row in rows]


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(_cell(cell) for cell in cells) + " |"


def _cell(text: str) -> str:
    # A bare "|" would end the cell and a newline the row; GFM reads "\|" as a literal pipe, even in code spans.
    return " ".join(text.splitlines()).replace("|", "\\|")


# ---------------------------------------------------------------------------------------------- values


def _num(value: Any) -> float | None:
    """The value as a float, or None when it is missing or not a number (a bool is a flag, not a number)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def _text(value: Any) -> str:
    if value is None or (isinstance(value, str) and not value):
        return DASH
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        return _general(value)
    if isinstance(value, Mapping):
        return ", ".join(f"{_text(key)}={_text(item)}" for key, item in value.items()) or DASH
    if isinstance(value, Sequence) and not isinstance(value, str):
        return ", ".join(_text(item) for item in value) or DASH
    return str(value)


def _code(value: Any) -> str:
    """A name as an inline code span, so Markdown never interprets the underscores or stars in it."""
    text = _text(value)
    if text == DASH:
        return DASH
    fence = "``" if "`" in text else "`"
    pad = " " if fence == "``" else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _pct(value: Any) -> str:
    number = _num(value)
    if number is None:
        return DASH
    return f"{number * 100:.1f}%" if math.isfinite(number) else str(number)


def _fixed(value: Any, digits: int) -> str:
    number = _num(value)
    return DASH if number is None else f"{number:.{digits}f}"


def _general(value: Any) -> str:
    number = _num(value)
    return DASH if number is None else f"{number:.4g}"


def _grouped(value: Any) -> str:
    number = _num(value)
    if number is None:
        return DASH
    return f"{number:,.0f}" if math.isfinite(number) else str(number)


def _count(value: Any) -> str:
    """A parameter or MAC count with an SI suffix and one decimal (59.8k, 5.0M); exact below a thousand."""
    number = _num(value)
    if number is None:
        return DASH
    if not math.isfinite(number):
        return str(number)
    if abs(number) < 1000:
        return f"{number:.0f}" if number == int(number) else f"{number:.1f}"
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        # Compare after rounding, so 999,960 reads 1.0M rather than 1000.0k.
        if round(abs(number) / scale, 1) >= 1:
            return f"{number / scale:.1f}{suffix}"
    return f"{number:.0f}"  # unreachable: |number| >= 1000 matches "k"


def _ratio(value: Any) -> str:
    number = _num(value)
    return DASH if number is None else f"{number:.2f}×"


def _span(before: Any, after: Any, fmt: Any) -> str:
    return f"{fmt(before)} {ARROW} {fmt(after)}"


def _quotient(numerator: Any, denominator: Any) -> float | None:
    top, bottom = _num(numerator), _num(denominator)
    if top is None or bottom is None or bottom == 0:
        return None
    return top / bottom


def _total(values: Iterable[Any]) -> float | None:
    numbers_ = [number for number in map(_num, values) if number is not None]
    return sum(numbers_) if numbers_ else None


def _duration(value: Any) -> str:
    seconds = _num(value)
    if seconds is None:
        return DASH
    if not math.isfinite(seconds) or seconds < 60:
        return f"{seconds:.1f} s"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    human = f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"
    return f"{seconds:.1f} s ({human})"


def _plural(value: Any, noun: str) -> str:
    number = _num(value)
    return plural(number, noun) if number is not None else f"{_text(value)} {noun}s"


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _records(value: Any) -> list[Mapping[str, Any]]:
    if not isinstance(value, Sequence) or isinstance(value, str):
        return []
    return [item for item in value if isinstance(item, Mapping)]


# ---------------------------------------------------------------------------------------------- plots


def plot_curves(history: Sequence[Mapping[str, Any]], path: Path, test: Mapping[str, Any] | None = None) -> None:
    """Training curves as a PNG: train accuracies, loss, and ADMM residual when recorded; phases marked.

    ``test`` is the report's ``accuracy`` (clean, and robust per attack): the test set is evaluated
    once, at the end, so it is drawn as points after the last epoch, labelled as such, not as a curve.
    """
    from matplotlib.figure import Figure

    rows = _records(history)
    if not rows:
        _save_message("no training epochs", path)
        return
    epochs = list(range(1, len(rows) + 1))
    with_residual = any(_finite(row.get("residual")) is not None for row in rows)
    panels = 3 if with_residual else 2
    fig = Figure(figsize=(5.0 * panels, 4.2), layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False)[0]
    spans = _phase_spans(rows)
    markers = len(rows) <= 60  # a one-epoch phase is a single point: invisible without a marker

    accuracy = axes[0]
    for key, label in (("clean", "train clean"), ("robust", "train robust (PGD examples trained on)")):
        _line(accuracy, epochs, [_scaled(row.get(key), 100) for row in rows], label, markers)
    _test_points(accuracy, len(rows), test)
    accuracy.set_ylim(-2, 102)
    _decorate(accuracy, "Accuracy: training batches per epoch", "accuracy (%)", spans, len(rows))

    loss = axes[1]
    values = [_finite(row.get("loss")) for row in rows]
    admm = any(row.get("phase") == "admm" for row in rows)
    label = ("adversarial loss; in admm epochs\nplus the penalty " + r"$\rho/2\,\|W-Z+U\|^2$") if admm else (
        "adversarial loss")
    _line(loss, epochs, values, label, markers, colour="#D55E00")
    _log_if_spread(loss, values)
    _decorate(loss, "Training loss (what the optimizer minimized)", "loss", spans, len(rows))

    if with_residual:
        _residual_panel(axes[2], rows, spans, markers)
    fig.savefig(path, dpi=DPI)


def _test_points(ax: Axes, last: int, test: Mapping[str, Any] | None) -> None:
    """The final test-set accuracies as labelled points just after the last epoch."""
    accuracy = _mapping(test)
    robust = [_finite(value) for value in _mapping(accuracy.get("robust")).values()]
    points = [("test clean", _finite(accuracy.get("clean")), "#0072B2", "*"),
              ("test robust (worst attack)", min((v for v in robust if v is not None), default=None), "#E69F00", "*")]
    for label, value, colour, marker in points:
        if value is not None:
            ax.plot([last + 0.35], [value * 100], marker, color=colour, markersize=11, markeredgecolor="black",
                    label=f"{label}, after training: {value:.1%}", linestyle="none", clip_on=False)


def _plain_ticks(ax: Axes, shown: Any = None) -> None:
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


def _residual_panel(ax: Axes, rows: Sequence[Mapping[str, Any]], spans: list[tuple[str, int, int]],
                    markers: bool) -> None:
    epochs = [index for index, row in enumerate(rows, 1) if _finite(row.get("residual")) is not None]
    residuals = [_finite(rows[index - 1].get("residual")) for index in epochs]
    _line(ax, epochs, residuals, r"residual $\|W-Z\|/\|W\|$", markers, colour="#009E73")
    _log_if_spread(ax, residuals)
    _decorate(ax, "ADMM residual", "mean residual", spans, len(rows), legend=False)
    handles, labels = ax.get_legend_handles_labels()
    rhos = [_finite(rows[index - 1].get("rho")) for index in epochs]
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


def _phase_spans(rows: Sequence[Mapping[str, Any]]) -> list[tuple[str, int, int]]:
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


def plot_ranks(layers: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Parameters before and after per layer as a PNG (log bars), with the energy kept on a twin axis."""
    from matplotlib.figure import Figure

    rows = sorted(_records(layers), key=lambda row: _natural(_text(row.get("name"))))  # one order for every method
    if not rows:
        _save_message("no layers", path)
        return
    count = len(rows)
    width = min(MAX_FIGURE_WIDTH, max(6.0, 2.0 + 0.3 * count))
    fig = Figure(figsize=(width, 5.5), layout="constrained")
    ax = fig.subplots()
    before = [_positive(row.get("params_before")) for row in rows]
    after = [_positive(row.get("params_after")) for row in rows]
    _bars(ax, [index - 0.2 for index in range(count)], before, "params before", BEFORE_COLOUR)
    methods = list(dict.fromkeys(_plot_text(row.get("method")) for row in rows))
    for colour_index, method in enumerate(methods):
        picked = [index for index, row in enumerate(rows) if _plot_text(row.get("method")) == method]
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
    _layer_ticks(ax, [_plot_text(row.get("name")) for row in rows])
    handles, labels = ax.get_legend_handles_labels()
    energy = [(index, _finite(row.get("energy_kept"))) for index, row in enumerate(rows)]
    energy = [(index, value) for index, value in energy if value is not None]
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


def _rank_labels(ax: Axes, rows: Sequence[Mapping[str, Any]], after: Sequence[float | None]) -> None:
    """What each after-bar is, written on it: its ranks ("14x11"), "dense", or "pruned"."""
    size = 7 if len(rows) <= 40 else 5
    for index, (row, height) in enumerate(zip(rows, after, strict=True)):
        ranks = row.get("ranks")
        text = "x".join(map(str, ranks)) if isinstance(ranks, list) and ranks else _plot_text(row.get("method"))
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


def _plot_text(value: Any) -> str:
    """Text safe for a plot: no "$" (which would start mathtext) and no character the font may lack."""
    text = _text(value)
    text = "-" if text == DASH else text
    # Matplotlib warns on a missing glyph; its bundled DejaVu Sans covers Latin, Greek and Cyrillic.
    text = "".join(char if char.isprintable() and ord(char) < FONT_SAFE_BELOW else "?" for char in text)
    return text.replace("$", r"\$")


def _finite(value: Any) -> float | None:
    number = _num(value)
    return number if number is not None and math.isfinite(number) else None


def _positive(value: Any) -> float | None:
    number = _finite(value)
    return number if number is not None and number > 0 else None


def _scaled(value: Any, factor: float) -> float | None:
    number = _finite(value)
    return None if number is None else number * factor
