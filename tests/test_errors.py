"""Run-time errors: one base with a message and help, one table of exit codes, and a bug is never a user error."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from rich.console import Console

from cstar_dsl.cli import main
from cstar_dsl.cli.output import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_INVALID,
    EXIT_USAGE,
    exit_code,
    print_error,
)
from cstar_dsl.deploy.artifacts import ArtifactError
from cstar_dsl.deploy.export import ExportError
from cstar_dsl.driver.state import CompileError
from cstar_dsl.errors import RunError
from cstar_dsl.eval import robustness
from cstar_dsl.eval.attack_text import parse_attack
from cstar_dsl.eval.autoattack import MissingExtra
from cstar_dsl.eval.robustness import EvalError
from cstar_dsl.files import FileProblem
from cstar_dsl.lang.errors import ArgumentError, CStarError, Diagnostic
from cstar_dsl.lang.problems import SpecProblem
from cstar_dsl.lang.validate import check_file
from cstar_dsl.train.checkpoint import CheckpointError
from cstar_dsl.train.optimize import TrainingDiverged

ROOT = next(folder for folder in Path(__file__).resolve().parents if (folder / "specs").is_dir())
DIGITS = ROOT / "specs" / "digits.cstar"
# Every run-time error a stage raises with a message and a help text of its own.
RUN_ERRORS = (CheckpointError, CompileError, ExportError, ArtifactError, EvalError, FileProblem, MissingExtra)


def _printed(error: CStarError | RunError, **options: object) -> tuple[int, str]:
    buffer = io.StringIO()
    code = print_error(Console(file=buffer, width=200), error, "full", **options)
    return code, buffer.getvalue()


@pytest.mark.parametrize("kind", RUN_ERRORS)
def test_each_run_time_error_is_a_run_error_with_its_message_and_help(kind: type[RunError]):
    error = kind("the thing broke", help="do this instead")
    assert isinstance(error, RunError)
    assert (str(error), error.message, error.help) == ("the thing broke", "the thing broke", "do this instead")


def test_a_diverged_phase_and_a_spec_problem_are_run_errors_with_help():
    diverged = TrainingDiverged("admm", 2, 7, float("nan"))
    assert isinstance(diverged, RunError) and "admm phase diverged at epoch 2, step 7" in diverged.message
    assert "`train.admm.lr` or `rho`" in str(diverged.help)
    assert "rho" not in str(TrainingDiverged("finetune", 0, 0, float("inf")).help)
    problem = SpecProblem(("data", "root"), "data-not-found", "no data here", help="download it")
    assert isinstance(problem, RunError) and (problem.message, problem.help) == ("no data here", "download it")


@pytest.mark.parametrize(("error", "expected"), [
    (ArgumentError([Diagnostic("wrong-type", "expected one attack")]), EXIT_USAGE),
    (CStarError([Diagnostic("unknown-key", "unknown key")]), EXIT_INVALID),
    (SpecProblem(("compress", "budget"), "infeasible-budget", "too small"), EXIT_INVALID),
    *((kind("x"), EXIT_FAILED) for kind in RUN_ERRORS),
    (TrainingDiverged("pretrain", 0, 1, float("nan")), EXIT_FAILED),
    (KeyboardInterrupt(), EXIT_INTERRUPTED),
], ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else str(value))
def test_the_exit_code_follows_the_error_class(error: CStarError | RunError | KeyboardInterrupt, expected: int):
    assert exit_code(error) == expected


def test_the_documented_exit_codes_keep_their_numbers():
    assert (EXIT_INVALID, EXIT_USAGE, EXIT_FAILED, EXIT_INTERRUPTED) == (1, 2, 4, 130)


def test_a_run_error_prints_its_message_and_help_under_the_commands_code():
    code, out = _printed(ExportError("the ONNX file differs", help="try --format torchscript"), failed="export-failed")
    assert code == EXIT_FAILED
    assert out.startswith("error[export-failed]: the ONNX file differs")
    assert "= help: try --format torchscript" in out


def test_a_spec_problem_prints_at_its_recipe_line_or_under_its_own_code():
    checked = check_file(DIGITS)
    problem = SpecProblem(("compress", "budget"), "infeasible-budget", "the budget cannot be met", help="raise it")
    code, out = _printed(problem, checked=checked)
    assert code == EXIT_INVALID and "error[infeasible-budget]" in out and "digits.cstar:" in out and "-->" in out
    code, out = _printed(problem)
    assert code == EXIT_INVALID and out.startswith("error[infeasible-budget]") and "-->" not in out


# ---------------------------------------------------------------- a bug is a bug


def _broken(kind: type[Exception]):
    def broken(*args: object, **kwargs: object) -> None:
        raise kind("an internal function is broken")
    return broken


@pytest.mark.parametrize("bug", [ValueError, TypeError, RuntimeError, KeyError])
def test_a_bug_in_eval_keeps_its_traceback(monkeypatch, tmp_path: Path, capsys, bug: type[Exception]):
    monkeypatch.setattr(robustness, "reevaluate", _broken(bug))
    with pytest.raises(bug, match="an internal function is broken"):
        main(["eval", str(tmp_path)])
    assert "error[" not in capsys.readouterr().out


def test_the_same_place_raising_a_run_error_is_reported(monkeypatch, tmp_path: Path, capsys):
    def gone(*args: object, **kwargs: object) -> None:
        raise EvalError("the data folder is gone", help="restore it")
    monkeypatch.setattr(robustness, "reevaluate", gone)
    assert main(["eval", str(tmp_path)]) == EXIT_FAILED
    out = capsys.readouterr().out
    assert "error[eval-failed]: the data folder is gone" in out and "= help: restore it" in out


@pytest.mark.parametrize(("target", "argv"), [
    ("cstar_dsl.deploy.export.export", ["export", "{tmp}"]),
    ("cstar_dsl.api.make_plan", ["plan", str(DIGITS)]),
    ("cstar_dsl.api.make_plan", ["diff", str(DIGITS), str(DIGITS)]),
    ("cstar_dsl.driver.pipeline.compile_spec", ["compile", str(DIGITS), "--out", "{tmp}/run", "--quiet"]),
], ids=["export", "plan", "diff", "compile"])
def test_a_bug_in_any_command_keeps_its_traceback(monkeypatch, tmp_path: Path, capsys, target: str,
                                                  argv: list[str]):
    monkeypatch.setattr(target, _broken(ValueError))
    with pytest.raises(ValueError, match="an internal function is broken"):
        main([argument.replace("{tmp}", str(tmp_path)) for argument in argv])
    assert "error[" not in capsys.readouterr().out


# ---------------------------------------------------------- converted at the source


def test_an_attack_written_wrong_is_an_argument_error():
    with pytest.raises(ArgumentError) as raised:
        parse_attack("pgd(stesp = 5)")
    assert [d.code for d in raised.value.diagnostics] == ["unknown-argument"]


def test_a_recorded_recipe_that_no_longer_runs_is_an_eval_error(monkeypatch, tmp_path: Path):
    monkeypatch.setattr(robustness, "resolved_spec", lambda folder, allow_import: check_file(DIGITS).spec)
    monkeypatch.setattr(robustness, "load", lambda folder, allow_import: torch.nn.Identity())

    def no_data(*args: object, **kwargs: object) -> None:
        raise SpecProblem(("data", "root"), "data-not-found", "no MNIST data set in data", help="download it")
    monkeypatch.setattr(robustness, "reevaluate_model", no_data)
    with pytest.raises(EvalError) as raised:
        robustness.reevaluate(tmp_path)
    assert (raised.value.message, raised.value.help) == (f"{tmp_path}: no MNIST data set in data", "download it")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine with a GPU runs on cuda")
def test_eval_on_cuda_without_a_gpu_is_an_eval_error():
    with pytest.raises(EvalError, match="no CUDA device") as raised:
        robustness.reevaluate_model(torch.nn.Identity(), check_file(DIGITS).spec, device="cuda")
    assert raised.value.help is not None and "--device cpu" in raised.value.help
