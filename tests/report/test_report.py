"""The report stage: report.md states every fact of the report, and the two plots are real PNGs in all cases."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cstar_dsl.report import document
from cstar_dsl.run_report import Accuracy, EpochRow, LayerReport, RunReport

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PGD = "pgd(linf, eps=0.1, step=0.025, steps=20, restarts=1)"
FGSM = "fgsm(linf, eps=0.1)"


def markdown(report: dict[str, Any]) -> str:
    """report.md of the report as report.json would hold it: the typed report validates it first."""
    return document.markdown(RunReport.model_validate(report))


def plot_curves(history: list[dict[str, Any]], path: Path, test: dict[str, Any] | None = None) -> None:
    document.plot_curves([EpochRow.model_validate(row) for row in history], path,
                         test=None if test is None else Accuracy.model_validate(test))


def plot_ranks(layers: list[dict[str, Any]], path: Path) -> None:
    document.plot_ranks([LayerReport.model_validate(layer) for layer in layers], path)


def _layer(name: str, kind: str, method: str, shape: list[int], ranks: list[int] | None, before: int, after: int,
           energy: float | None, rule: str = "policy global", reason: str = "") -> dict[str, Any]:
    return {"name": name, "type": kind, "method": method, "shape": shape, "rule": rule, "ranks": ranks,
            "params_before": before, "params_after": after, "macs_before": before * 64, "macs_after": after * 64,
            "energy_kept": energy, "reason": reason}


def _history() -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for epoch in range(4):
        rows.append({"phase": "pretrain", "epoch": epoch, "loss": 2.1 - 0.4 * epoch, "clean": 0.3 + 0.15 * epoch,
                     "robust": 0.2 + 0.08 * epoch, "seconds": 3.2, "lr": 0.05})
    for epoch in range(3):
        rows.append({"phase": "admm", "epoch": epoch, "loss": 1.1 - 0.1 * epoch, "clean": 0.8, "robust": 0.5,
                     "seconds": 3.5, "lr": 0.01, "rho": 0.001 * 1.5**epoch, "residual": 0.12 / (epoch + 1)})
    for epoch in range(2):
        rows.append({"phase": "finetune", "epoch": epoch, "loss": 0.7, "clean": 0.9 + 0.02 * epoch,
                     "robust": 0.55 + 0.01 * epoch, "seconds": 2.5, "lr": 0.005})
    return rows


@pytest.fixture
def report() -> dict[str, Any]:
    return {
        "schema": "cstar.report/1",
        "spec": "specs/digits.cstar",
        "spec_sha256": "ab12" * 16,
        "method": "cstar",
        "compression": {"budget": "4x params", "metric": "params", "target_ratio": 4.0, "params_dense": 240000,
                        "params_compressed": 59800, "ratio": 4.01, "macs_dense": 5000000, "macs_compressed": 1300000,
                        "other_params": 1098},
        "accuracy": {"clean": 0.95, "robust": {PGD: 0.61, FGSM: 0.7}},
        "latency": {"dense_ms": {"median": 0.2366, "q1": 0.2259, "q3": 0.2613, "minimum": 0.2201,
                                 "cpu_median": 0.2379, "repeats": 30},
                    "compressed_ms": {"median": 0.1949, "q1": 0.1838, "q3": 0.231, "minimum": 0.1779,
                                      "cpu_median": 0.1959, "repeats": 30},
                    "speedup": 1.214, "threads": 1, "batch": 1, "cpu": "Intel(R) Xeon(R) Processor", "cores": 2,
                    "form": "optimize_for_inference"},
        "attacks": {PGD: {"attack": "pgd", "norm": "linf", "eps": 0.1, "step": 0.025, "steps": 20,
                          "random_start": True, "restarts": 1},
                    FGSM: {"attack": "fgsm", "norm": "linf", "eps": 0.1}},
        "threat": {"norm": "linf", "eps": 0.1, "step": 0.025, "steps": 7, "random_start": True, "restarts": 1},
        "requirements": [{"metric": "clean", "op": ">=", "value": 0.8, "measured": 0.95, "met": True},
                         {"metric": "robust", "op": ">=", "value": 0.4, "measured": 0.61, "met": True}],
        "layers": [
            _layer("features.0", "Conv2d", "tucker2", [32, 1, 3, 3], [8, 1], 288, 100, 0.93),
            _layer("features.3", "Conv2d", "tucker2", [64, 32, 3, 3], [16, 12], 18432, 4032, 0.871),
            _layer("classifier.0", "Linear", "svd", [128, 1024], [24], 131072, 27648, 0.8),
            _layer("fc", "Linear", "dense", [10, 128], None, 1280, 1280, None, rule="keep", reason="kept by the spec"),
        ],
        "history": _history(),
        "timings": {"total_seconds": 120.5, "phases": {"pretrain": 40.1, "admm": 30.2, "finetune": 20.0},
                    "evaluate_seconds": 10.3},
        "data": {"name": "digits", "train_size": 1438, "test_size": 359},
        "machine": {"device": "cpu", "processor": "AMD EPYC", "threads": 2, "python": "3.11.7", "torch": "2.14.1",
                    "cstar": "0.1.0"},
        "seed": 0,
        "warnings": ["admm residual 0.04 is above the tolerance 0.01"],
        "resolved": {},
    }


def _section(text: str, title: str) -> str:
    """The body of one "## title" section."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    assert match, f"no section {title!r}"
    return match.group(1)


def _table_row(text: str, first_cell: str) -> list[str]:
    for line in text.splitlines():
        cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if cells and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no table row starting with {first_cell!r}")


# ---------------------------------------------------------------------------------------------- markdown


def test_markdown_states_names_accuracies_and_counts(report):
    text = markdown(report)
    assert text.startswith("# cstar report: specs/digits.cstar\n") and text.endswith("\n")
    for layer in report["layers"]:
        assert f"`{layer['name']}`" in _section(text, "Layers")
    assert _table_row(text, f"Robust accuracy, `{PGD}`")[1] == "61.0%"
    assert _table_row(text, f"Robust accuracy, `{FGSM}`")[1] == "70.0%"
    assert _table_row(text, "Clean accuracy")[1] == "95.0%"
    parameters = _table_row(text, "Parameters")[1]
    assert "240.0k" in parameters and "59.8k" in parameters and "4.01×" in parameters
    assert "4.00×" in _table_row(text, "Target")[1] and "4x params" in _table_row(text, "Target")[1]
    assert "3.85×" in _table_row(text, "MACs")[1]  # 5.0M / 1.3M, computed: the report has no MACs ratio
    assert _table_row(text, "Latency (batch 1, CPU)")[1] == (
        "0.2366 ms → 0.1949 ms (1.21× faster; 1 thread, Intel(R) Xeon(R) Processor)")
    assert _table_row(text, "`features.0`")[5:8] == ["8, 1", "288 → 100", "93.0%"]
    assert _table_row(text, "`fc`")[-1] == "kept by the spec"
    assert "![curves](curves.png)" in text and "![ranks](ranks.png)" in text
    assert report["warnings"][0] in _section(text, "Warnings")


def test_every_table_row_has_as_many_cells_as_its_header(report):
    report["layers"][0]["name"] = "odd|name"
    for line_block in markdown(report).split("\n\n"):
        lines = [line for line in line_block.splitlines() if line.startswith("|")]
        widths = {len(re.split(r"(?<!\\)\|", line)) for line in lines}
        assert len(widths) <= 1, line_block


def test_training_table_has_one_row_per_phase_with_final_values(report):
    training = _section(markdown(report), "Training")
    pretrain = _table_row(training, "pretrain")
    assert pretrain[1] == "4" and pretrain[2] == "0.9000" and pretrain[3] == "75.0%" and pretrain[4] == "44.0%"
    assert pretrain[-1] == "12.8"  # 4 epochs of 3.2 s
    admm = _table_row(training, "admm")
    assert admm[1] == "3" and admm[6:8] == ["0.00225", "0.04"]  # final rho and residual
    assert _table_row(training, "finetune")[6:8] == ["–", "–"]  # no rho or residual outside ADMM
    assert "no training epochs" in _section(markdown({**report, "history": []}), "Training")


def test_not_met_appears_exactly_when_a_requirement_fails(report):
    assert "NOT MET" not in markdown(report)
    assert _table_row(_section(markdown(report), "Requirements"), "robust")[1:] == ["≥ 40.0%", "61.0%", "✅ met"]
    failing = copy.deepcopy(report)
    failing["requirements"][1].update(measured=0.31, met=False)
    text = markdown(failing)
    assert text.count("NOT MET") == 1
    assert _table_row(_section(text, "Requirements"), "robust")[2:] == ["31.0%", "❌ NOT MET"]
    assert "1 of 2 met" in _table_row(text, "Requirements")[1]
    assert _section(markdown({**report, "requirements": []}), "Requirements").strip() == "none"


def test_pipe_in_a_layer_name_is_escaped(report):
    report["layers"][1]["name"] = "blocks|0.conv"
    text = markdown(report)
    assert r"blocks\|0.conv" in text
    assert "blocks|0" not in text.replace(r"\|", "")


def test_values_a_report_lacks_render_as_a_dash_never_none(report):
    del report["accuracy"]["robust"][FGSM]  # listed in attacks, never measured
    report["compression"].update(target_ratio=None, budget="params <= 60k")  # a limit budget has no target ratio
    report["requirements"][1].update(measured=None, met=False)  # `require robust` with no attack measured
    report["latency"] = None  # a report written before latency was measured
    text = markdown(report)
    assert "None" not in text and "nan" not in text
    assert _table_row(text, f"Robust accuracy, `{FGSM}`")[1] == "–"
    assert _table_row(text, "Target")[1] == "– (budget params <= 60k)"
    assert _table_row(_section(text, "Requirements"), "robust")[2:] == ["–", "❌ NOT MET"]
    assert _table_row(text, "Latency (batch 1, CPU)")[1] == "–"
    assert _table_row(text, "`fc`")[5] == "–" and _table_row(text, "`fc`")[7] == "–"  # no ranks, no energy kept
    del report["latency"]  # older reports have no `latency` key at all
    assert _table_row(markdown(report), "Latency (batch 1, CPU)")[1] == "–"


def test_a_pruned_layer_shows_its_shape_after_pruning(report):
    pruned = _layer("features.3", "Conv2d", "pruned", [64, 32, 3, 3], None, 18432, 9216, None)
    pruned["shape_after"] = [32, 32, 3, 3]
    text = markdown({**report, "method": "channel-prune", "layers": [pruned]})
    assert _table_row(text, "`features.3`")[3:6] == ["64×32×3×3 → 32×32×3×3", "policy global", "–"]


def test_counts_use_si_suffixes_consistently(report):
    report["compression"].update(params_dense=999_960, params_compressed=512, macs_dense=3_200_000_000)
    text = markdown(report)
    assert _table_row(text, "Parameters")[1].startswith("1.0M → 512 ")
    assert _table_row(text, "MACs")[1].startswith("3.2G → 1.3M ")


# ---------------------------------------------------------------------------------------------- plots


def _assert_png(path: Path, min_bytes: int = 5000) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > min_bytes


def test_curves_and_ranks_are_pngs(report, tmp_path):
    plot_curves(report["history"], tmp_path / "curves.png")
    plot_ranks(report["layers"], tmp_path / "ranks.png")
    _assert_png(tmp_path / "curves.png", 20_000)
    _assert_png(tmp_path / "ranks.png", 10_000)


def test_empty_inputs_still_give_pngs(tmp_path):
    plot_curves([], tmp_path / "curves.png")
    plot_ranks([], tmp_path / "ranks.png")
    _assert_png(tmp_path / "curves.png", 1000)
    _assert_png(tmp_path / "ranks.png", 1000)


def test_one_phase_and_gaps_in_the_history(report, tmp_path):
    history = [row for row in report["history"] if row["phase"] == "pretrain"]
    history[1] = {**history[1], "robust": float("nan"), "loss": float("nan")}
    plot_curves(history, tmp_path / "one.png")
    plot_curves(history[:1], tmp_path / "single.png")
    _assert_png(tmp_path / "one.png")
    _assert_png(tmp_path / "single.png")


def test_many_layers_keep_the_figure_bounded(tmp_path):
    layers = [_layer(f"encoder.stage{i // 50 + 1}.blocks.{i % 50}.depthwise_separable.conv{i % 3 + 1}", "Conv2d",
                     "tucker2" if i % 3 else "dense", [256, 256, 3, 3], [64, 64] if i % 3 else None,
                     589824, 200000 if i % 3 else 589824, 0.9 if i % 3 else None) for i in range(200)]
    layers.append(_layer("odd $name", "Conv2d", "pruned", [8, 8, 1, 1], None, 64, 0, None))
    plot_ranks(layers, tmp_path / "ranks.png")
    _assert_png(tmp_path / "ranks.png")
    width, height = _png_size(tmp_path / "ranks.png")
    assert width <= 20 * 120 and height < width


def test_layers_pruned_away_or_without_energy(tmp_path):
    plot_ranks([_layer("a", "Linear", "dense", [4, 4], None, 16, 16, None),
                _layer("b", "Linear", "pruned", [4, 4], None, 16, 0, None)], tmp_path / "ranks.png")
    _assert_png(tmp_path / "ranks.png", 1000)


def test_names_the_font_lacks_or_mathtext_would_parse_raise_no_warning(report, tmp_path):
    # pytest turns warnings into errors here: a missing glyph or a mathtext parse would fail the test.
    layers = [{**report["layers"][0], "name": "编码器.层0", "method": "✅"},
              {**report["layers"][1], "name": r"cost$\frac{a}{$b", "method": "svd\x01"}]
    history = [{**row, "phase": "预训练 🚀"} for row in report["history"][:3]]
    plot_ranks(layers, tmp_path / "ranks.png")
    plot_curves(history, tmp_path / "curves.png")
    _assert_png(tmp_path / "ranks.png")
    _assert_png(tmp_path / "curves.png")


def _png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[16:24]  # the IHDR chunk's width and height, big-endian
    return int.from_bytes(header[:4], "big"), int.from_bytes(header[4:], "big")


def test_importing_the_report_module_does_not_import_matplotlib():
    code = "import sys, cstar_dsl.report.document; print('matplotlib' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
