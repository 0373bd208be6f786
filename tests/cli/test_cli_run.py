"""`cstar export` and `cstar eval` on a folder `cstar compile` wrote, as a user runs them."""

from __future__ import annotations

import json

import onnx
import pytest

from cstar_dsl.cli import main
from tests.helpers import compile_cli, variant, write_spec


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run")
    tiny = write_spec(folder, pretrain=1, admm=1, finetune=1)
    spec = variant(folder, tiny, "export {\n  formats = [safetensors, onnx]\n}\n")
    assert compile_cli(spec, "--out", folder / "out") == 0
    return folder / "out"


def test_compile_exports_the_recipes_formats_and_reports_the_check(run_folder):
    report = json.loads((run_folder / "report.json").read_text())
    onnx_entry = next(e for e in report["exports"] if e["format"] == "onnx")
    assert onnx_entry["file"] == "model.onnx" and onnx_entry["max_abs_diff"] <= 1e-4
    graph = onnx.load(str(run_folder / "model.onnx")).graph
    assert sum(node.op_type in ("Gemm", "MatMul") for node in graph.node) == 5  # fc1, fc2 factorized (2 each) + fc3


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "torch.export"])
def test_export_writes_a_checked_file(run_folder, tmp_path, capsys, fmt):
    target = tmp_path / f"model-{fmt}"
    assert main(["export", str(run_folder), "--format", fmt, "--out", str(target)]) == 0
    output = capsys.readouterr().out
    assert target.stat().st_size > 0
    assert "max abs difference" in output and f"wrote {target}" in output


def test_export_of_a_folder_without_a_model_fails_clearly(tmp_path, capsys):
    assert main(["export", str(tmp_path)]) == 4
    assert "error[export-failed]" in capsys.readouterr().out


def test_eval_reevaluates_with_the_recipes_attacks_and_sanity_checks(run_folder, capsys):
    report = json.loads((run_folder / "report.json").read_text())
    assert main(["eval", str(run_folder), "--format", "json", "--sanity"]) in (0, 3)
    result = json.loads(capsys.readouterr().out)
    assert result["clean"] == pytest.approx(report["accuracy"]["clean"])
    assert result["robust"] == pytest.approx(report["accuracy"]["robust"])
    assert {check["name"] for check in result["sanity"]} >= {"an unbounded attack reaches ~0%"}


def test_eval_takes_attacks_from_the_command_line(run_folder, capsys):
    assert main(["eval", str(run_folder), "--attack", "pgd(steps = 5)", "--samples", "50"]) == 0
    output = capsys.readouterr().out
    assert "pgd(linf, eps=0.1, step=0.05, steps=5, restarts=1)" in output and "50 test images" in output
    assert main(["eval", str(run_folder), "--attack", "pgd(stesp = 5)"]) == 2
    assert "error[unknown-argument]" in capsys.readouterr().out


def test_eval_of_a_folder_without_a_model_fails_clearly(tmp_path, capsys):
    assert main(["eval", str(tmp_path)]) == 4
    assert "error[eval-failed]" in capsys.readouterr().out


def test_nproc_is_dropped_from_the_command_each_rank_runs():
    from cstar_dsl.cli.compile import _without_nproc

    assert _without_nproc(["compile", "a.cstar", "--nproc", "2", "--quiet"]) == ["compile", "a.cstar", "--quiet"]
    assert _without_nproc(["compile", "a.cstar", "--nproc=4"]) == ["compile", "a.cstar"]
