"""Report stage: the compile report as Markdown for people (report.md)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .values import (
    ARROW,
    DASH,
    _code,
    _count,
    _duration,
    _fixed,
    _general,
    _grouped,
    _mapping,
    _num,
    _pct,
    _phases,
    _plural,
    _quotient,
    _ratio,
    _records,
    _span,
    _text,
    _total,
)

ACCURACY_METRICS = frozenset({"clean", "robust"})
OPERATORS = {">=": "≥", "<=": "≤", ">": ">", "<": "<", "==": "="}


def markdown(report: Mapping[str, Any]) -> str:
    """The report as GitHub Markdown, ending with a newline; null or missing values render as "–"."""
    sections = [
        _header(report),
        _summary(report),
        *([_structure_choice(report["structure_choice"])] if report.get("structure_choice") else []),
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
        floor = f"{OPERATORS.get(str(operator), _text(operator))} {_metric_value(metric, requirement.get('value'))}"
        rows.append([_text(metric), floor, _metric_value(metric, requirement.get("measured")),
                     _status(requirement.get("met"))])
    return ["## Requirements", "", *_table(["Metric", "Required", "Measured", "Status"], rows, "llrl")]


def _status(met: Any) -> str:
    if met is True:
        return "✅ met"
    if met is False:
        return "❌ NOT MET"
    return DASH  # not evaluated: neither a pass nor a failure


def _structure_choice(choice: Any) -> list[str]:
    choice = _mapping(choice)
    candidates = _records(choice.get("candidates"))
    rows = [[_code(c.get("name")) + (" (chosen)" if c.get("name") == choice.get("winner") else ""),
             _count(c.get("params")), _count(c.get("macs")), _pct(c.get("clean")),
             _pct(c.get("robust")) if c.get("robust") is not None or c.get("clean") is not None else "diverged",
             _duration(c.get("seconds"))] for c in candidates]
    why = (f"`method = auto` compiled {_code(choice.get('winner'))}: the most robust candidate (under the training "
           f"attack) on {_grouped(choice.get('holdout'))} held-out training images, after "
           f"{_text(choice.get('epochs'))} epoch(s) of adversarial fine-tuning each; the test set played no part.")
    header = ["Candidate", "Params", "MACs", "Held-out clean", "Held-out robust", "Probe time"]
    return ["## Structure choice", "", why, "", *_table(header, rows, "lrrrrr")]


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
