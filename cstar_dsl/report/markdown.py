"""Report stage: the compile report as Markdown for people (report.md)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from ..lang.render import plural
from .values import (
    ARROW,
    DASH,
    _code,
    _count,
    _duration,
    _fixed,
    _general,
    _grouped,
    _pct,
    _phases,
    _quotient,
    _ratio,
    _span,
    _text,
    _total,
)

if TYPE_CHECKING:
    from ..run_report import (
        Accuracy,
        DataInfo,
        EpochRow,
        Latency,
        LayerReport,
        Machine,
        Requirement,
        RunReport,
        StructureChoice,
        Threat,
        Timings,
    )

ACCURACY_METRICS = frozenset({"clean", "robust"})
OPERATORS = {">=": "≥", ">": ">"}


def markdown(report: RunReport) -> str:
    """The report as GitHub Markdown, ending with a newline; a value the report lacks renders as "–"."""
    sections = [
        _header(report),
        _summary(report),
        *([_structure_choice(report.structure_choice)] if report.structure_choice else []),
        _requirements(report.requirements),
        _layers(report.layers),
        _training(report.history),
        _timings(report.timings),
        _data(report.data),
        _machine(report.machine, report.seed),
        _warnings(report.warnings),
        ["## Plots", "", "![curves](curves.png)", "", "![ranks](ranks.png)"],
    ]
    return "\n\n".join("\n".join(lines) for lines in sections) + "\n"


def _header(report: RunReport) -> list[str]:
    return [f"# cstar report: {_text(report.spec)}", "",
            f"spec sha256 {_code(report.spec_sha256)}, schema {_code(report.schema_name)}"]


def _summary(report: RunReport) -> list[str]:
    compression = report.compression
    dense, compressed = compression.params_dense, compression.params_compressed
    macs_dense, macs_compressed = compression.macs_dense, compression.macs_compressed
    rows = [
        ["Method", _text(report.method)],
        ["Parameters", f"{_span(dense, compressed, _count)} ({_ratio(compression.ratio)} smaller)"],
        ["Target", f"{_ratio(compression.target_ratio)} (budget {_text(compression.budget)})"],
        ["MACs", f"{_span(macs_dense, macs_compressed, _count)} "
                 f"({_ratio(_quotient(macs_dense, macs_compressed))} fewer)"],
        ["Latency (batch 1, CPU)", _latency(report.latency)],
        ["Clean accuracy", _pct(report.accuracy.clean)],
        *_robust_rows(report.accuracy, report.attacks),
        ["Threat (training)", _threat(report.threat)],
    ]
    if report.requirements:
        met = sum(1 for requirement in report.requirements if requirement.met)
        rows.append(["Requirements", f"{met} of {len(report.requirements)} met"])
    return ["## Summary", "", *_table(["", "Value"], rows)]


def _latency(latency: Latency | None) -> str:
    if latency is None:
        return DASH
    dense, compressed = latency.dense_ms.median, latency.compressed_ms.median
    return (f"{_span(dense, compressed, _milliseconds)} ({_ratio(_quotient(dense, compressed))} faster; "
            f"{plural(latency.threads, 'thread')}, {_text(latency.cpu)})")


def _milliseconds(value: float | None) -> str:
    text = _general(value)
    return text if text == DASH else f"{text} ms"


def _robust_rows(accuracy: Accuracy, attacks: Iterable[str]) -> list[list[str]]:
    robust = accuracy.robust
    # An attack listed but never measured still gets its row, so a missing number is visible.
    names = list(robust) + [name for name in attacks if name not in robust]
    if not names:
        return [["Robust accuracy", DASH]]
    return [[f"Robust accuracy, {_code(name)}", _pct(robust.get(name))] for name in names]


def _threat(threat: Threat) -> str:
    return ", ".join([threat.norm, f"eps {_text(threat.eps)}", f"step {_text(threat.step)}", f"{threat.steps} steps",
                      "random start" if threat.random_start else "no random start",
                      plural(threat.restarts, "restart")])


def _requirements(requirements: Sequence[Requirement]) -> list[str]:
    if not requirements:
        return ["## Requirements", "", "none"]
    rows = [[requirement.metric, f"{OPERATORS[requirement.op]} {_metric_value(requirement.metric, requirement.value)}",
             _metric_value(requirement.metric, requirement.measured), _status(requirement)]
            for requirement in requirements]
    return ["## Requirements", "", *_table(["Metric", "Required", "Measured", "Status"], rows, "llrl")]


def _status(requirement: Requirement) -> str:
    return "✅ met" if requirement.met else "❌ NOT MET"


def _structure_choice(choice: StructureChoice) -> list[str]:
    rows = [[_code(c.name) + (" (chosen)" if c.name == choice.winner else ""), _count(c.params), _count(c.macs),
             _pct(c.clean), c.problem or "-" if c.robust is None else _pct(c.robust), _duration(c.seconds)]
            for c in choice.candidates]
    why = (f"`method = auto` compiled {_code(choice.winner)}: the most robust candidate (under the training attack) "
           f"on {_grouped(choice.holdout)} held-out training images, after {plural(choice.epochs, 'epoch')} of "
           "adversarial fine-tuning each; the test set played no part.")
    header = ["Candidate", "Params", "MACs", "Held-out clean", "Held-out robust", "Probe time"]
    return ["## Structure choice", "", why, "", *_table(header, rows, "lrrrrr")]


def _metric_value(metric: str, value: float | None) -> str:
    return _pct(value) if metric in ACCURACY_METRICS else _text(value)


def _layers(layers: Sequence[LayerReport]) -> list[str]:
    if not layers:
        return ["## Layers", "", "none"]
    header = ["Layer", "Type", "Method", "Shape", "Rule", "Ranks", "Params", "Energy kept", "Note"]
    rows = [
        [_code(layer.name), _text(layer.type), _text(layer.method), _shape(layer), _text(layer.rule),
         _dims(layer.ranks, ", "), _span(layer.params_before, layer.params_after, _count), _pct(layer.energy_kept),
         _text(layer.reason)]
        for layer in layers
    ]
    return ["## Layers", "", *_table(header, rows, "llllllrrl")]


def _shape(layer: LayerReport) -> str:
    if layer.shape_after is None:
        return _dims(layer.shape)
    return f"{_dims(layer.shape)} {ARROW} {_dims(layer.shape_after)}"  # a pruned layer's new shape


def _dims(sizes: Sequence[int] | None, separator: str = "×") -> str:
    return separator.join(map(str, sizes)) if sizes else DASH


def _training(history: Sequence[EpochRow]) -> list[str]:
    phases = _phases(history)
    if not phases:
        return ["## Training", "", "no training epochs"]
    with_admm = any(row.rho is not None or row.residual is not None for row in history)
    header = ["Phase", "Epochs", "Final loss", "Train clean", "Train robust", "Final LR"]
    header += ["Final rho", "Final residual"] if with_admm else []
    header += ["Seconds"]
    table = []
    for name, rows in phases:
        last = rows[-1]
        line = [_text(name), str(len(rows)), _fixed(last.loss, 4), _pct(last.clean), _pct(last.robust),
                _general(last.lr)]
        if with_admm:
            line += [_general(last.rho), _general(last.residual)]
        line.append(_fixed(_total(row.seconds for row in rows), 1))
        table.append(line)
    align = "lrrrrr" + ("rr" if with_admm else "") + "r"
    return ["## Training", "", *_table(header, table, align)]


def _timings(timings: Timings) -> list[str]:
    rows = [[_text(name), _duration(seconds)] for name, seconds in timings.phases.items()]
    rows.append(["evaluation", _duration(timings.evaluate_seconds)])
    rows.append(["**total**", f"**{_duration(timings.total_seconds)}**"])
    return ["## Timings", "", *_table(["Stage", "Time"], rows, "lr")]


def _data(data: DataInfo) -> list[str]:
    items = [("Data set", _text(data.name)), ("Training examples", _grouped(data.train_size)),
             ("Test examples", _grouped(data.test_size))]
    return ["## Data", "", *(f"- {label}: {value}" for label, value in items)]


def _machine(machine: Machine, seed: int) -> list[str]:
    items: list[tuple[str, str | int]] = [
        ("Device", machine.device), ("Processor", machine.processor), ("Threads", machine.threads),
        ("Python", machine.python), ("torch", machine.torch), ("cstar", machine.cstar), ("Seed", seed)]
    return ["## Machine", "", *(f"- {label}: {_text(value)}" for label, value in items)]


def _warnings(warnings: Sequence[str]) -> list[str]:
    if not warnings:
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

