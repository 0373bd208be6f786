"""Re-evaluating a compiled run folder: attacks parsed like recipe values, deterministic numbers, and
sanity checks that pass on an honest model and catch a gradient-masked one."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from cstar_dsl.deploy.artifacts import ArtifactError, load, model_description, save_model
from cstar_dsl.eval import evaluation  # its TestBatches by the module: pytest would collect the class
from cstar_dsl.eval.robustness import (
    AutoAttackSetting,
    MissingExtra,
    parse_attack,
    reevaluate,
    reevaluate_model,
    resolved_spec,
)
from cstar_dsl.eval.sanity import sanity_checks
from cstar_dsl.lang.errors import CStarError
from cstar_dsl.lang.spec import FgsmAttack, ModelSpec, PgdAttack, Spec
from cstar_dsl.lang.validate import check_file, load_spec
from cstar_dsl.model import zoo as models
from cstar_dsl.train.data import datasets
from tests.helpers import DIGITS, SPECS, variant

# A committed run's report: `cstar eval` reads a whole, valid report.json, and takes the recipe from it.
A_REPORT = SPECS.parent / "benchmarks" / "results" / "mnist" / "cstar-16x" / "report.json"


def _report_with(resolved: dict) -> str:
    return json.dumps({**json.loads(A_REPORT.read_text()), "resolved": resolved})
MEAN, STD = (0.3,), (0.37,)
SAMPLES = 200


def _digits_spec(folder: Path) -> Spec:
    mlp = 'model {\n  arch = "cstar:mlp"\n}\n\ncompress {\n  keep = ["fc3"]\n}\n'
    return check_file(variant(folder, DIGITS, mlp, "mlp-digits.cstar")).spec


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder as `cstar compile` writes it, with a plainly trained MLP (no compression) so that
    accuracies mean something: about 98% clean and 58% under PGD-20 at eps 0.1."""
    spec = _digits_spec(tmp_path_factory.mktemp("spec"))
    model = models.Normalized(models.build_model(ModelSpec(arch="cstar:mlp", classes=10, input=(1, 8, 8))), MEAN, STD)
    images, labels = datasets(spec).train.tensors
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    for _ in range(300):
        batch = torch.randint(0, len(labels), (64,), generator=generator)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(images[batch]), labels[batch]).backward()
        optimizer.step()
    folder = tmp_path_factory.mktemp("run")
    save_model(folder, model.eval(), model_description(spec.model, "cstar", {"kind": "dense"}, MEAN, STD))
    (folder / "report.json").write_text(_report_with(spec.model_dump(mode="json")))
    return folder


class Quantized(nn.Module):
    """A gradient-masking "defense": the input is rounded to quarters first, whose gradient is zero."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(torch.round(x * 4) / 4)


# ------------------------------------------------------------------- parsing


@pytest.mark.parametrize(("text", "expected"), [
    ("pgd", PgdAttack()),
    ("pgd(steps = 50, restarts = 5)", PgdAttack(steps=50, restarts=5)),
    ("pgd(eps = 8/255, step = 2/255)", PgdAttack(eps=8 / 255, step=2 / 255)),
    ("fgsm", FgsmAttack()),
    ("fgsm(eps = 0.05)", FgsmAttack(eps=0.05)),
    ("autoattack", AutoAttackSetting()),
    ("autoattack(version = standard)", AutoAttackSetting("standard")),
    ("autoattack(plus, eps = 0.1)", AutoAttackSetting("plus", 0.1)),
    ("  pgd  # with a comment", PgdAttack()),
])
def test_attacks_parse_as_in_recipes(text, expected):
    assert parse_attack(text) == expected


@pytest.mark.parametrize(("text", "code", "label", "column"), [
    ("pgd(stesp = 5)", "unknown-argument", "did you mean `step`?", 5),
    ("pdg", "unknown-attack", "did you mean `pgd`?", 1),
    ("autoatack", "unknown-attack", "did you mean `autoattack`?", 1),
    ("autoattack(versoin = standard)", "unknown-argument", "did you mean `version`?", 12),
    ("autoattack(version = standrd)", "unknown-option", "did you mean `standard`?", 22),
    ("autoattack(eps = 0)", "eps-not-positive", "must be > 0", 18),
    ("pgd(steps = 0)", "out-of-range", "must be >= 1", 13),
    ("pgd(steps = 5", "unexpected-end", "expected `)` or `,`", 14),
    ("pgd, fgsm", "wrong-type", "not one attack", 1),
    ("pgd]\n  samples = [5", "wrong-type", "not one attack", 1),
    ("", "wrong-type", "not one attack", 1),
])
def test_bad_attacks_are_diagnostics_pointing_into_the_text(text, code, label, column):
    with pytest.raises(CStarError) as raised:
        parse_attack(text)
    (diagnostic,) = raised.value.diagnostics
    assert (diagnostic.code, diagnostic.label) == (code, label)
    assert (diagnostic.span.path, diagnostic.span.line, diagnostic.span.column) == ("--attack", 1, column)
    assert diagnostic.span.source.text == text


# --------------------------------------------------------------- the recipe


@pytest.mark.parametrize("name", sorted(p.name for p in SPECS.glob("*.cstar")))
def test_the_recorded_recipe_validates_back_to_the_same_spec(name):
    spec = load_spec(SPECS / name)
    assert Spec.model_validate(json.loads(json.dumps(spec.model_dump(mode="json")))) == spec


def test_a_folder_without_a_recorded_recipe_is_an_artifact_error(tmp_path):
    with pytest.raises(ArtifactError, match="no report.json"):
        resolved_spec(tmp_path)
    (tmp_path / "report.json").write_text(_report_with({"model": {}}))
    with pytest.raises(ArtifactError, match="does not validate"):
        resolved_spec(tmp_path)
    (tmp_path / "report.json").write_text(json.dumps({"resolved": {"model": {}}}))  # not a whole report
    with pytest.raises(ArtifactError, match=r"not a cstar run report \(cstar.report/2\): `spec`: Field required"):
        resolved_spec(tmp_path)
    (tmp_path / "report.json").write_text("{")
    with pytest.raises(ArtifactError, match="not a cstar run report .*: the file: Invalid JSON"):
        resolved_spec(tmp_path)


# ----------------------------------------------------------- re-evaluation


def test_reevaluation_defaults_to_the_recipe_attacks_and_is_deterministic(run):
    first = reevaluate(run, samples=SAMPLES, seed=0)
    assert list(first.robust) == ["pgd(linf, eps=0.1, step=0.025, steps=20, restarts=1)", "fgsm(linf, eps=0.1)"]
    assert first.implementations == dict.fromkeys(first.robust, "cstar_dsl.attacks 0.1.0")
    assert first.samples == SAMPLES and first.sanity == ()
    assert first.clean > 0.9 and 0.2 < min(first.robust.values()) < first.clean
    second = reevaluate(run, samples=SAMPLES, seed=0)
    assert (second.clean, second.robust) == (first.clean, first.robust)
    assert json.loads(json.dumps(first.to_dict()))["robust"] == first.robust


def test_sanity_checks_pass_on_the_honest_model(run):
    given = [parse_attack("pgd(steps = 10)"), parse_attack("pgd"), parse_attack("pgd(steps = 20)")]  # one twice
    result = reevaluate(run, given, samples=SAMPLES, sanity=True)
    assert len(result.robust) == 2
    checks = {check.name: check for check in result.sanity}
    assert list(checks) == ["more steps do not help the model", "an unbounded attack reaches ~0%",
                            "iterative beats single-step"]
    assert all(check.passed for check in result.sanity), result.sanity
    # the strongest given PGD is the baseline: here the 20-step one, 5x = 100 steps with 3 restarts
    assert "steps=20, restarts=1)" in checks["more steps do not help the model"].detail
    assert "steps=100, restarts=3)" in checks["more steps do not help the model"].detail
    assert "0.0% (0/200)" in checks["an unbounded attack reaches ~0%"].detail


def test_the_unbounded_check_catches_a_gradient_masked_model(run):
    spec = resolved_spec(run)
    honest = reevaluate_model(load(run), spec, samples=SAMPLES)
    result = reevaluate_model(Quantized(load(run)), spec, samples=SAMPLES, sanity=True)
    checks = {check.name: check for check in result.sanity}
    # the masked model looks far more robust than the honest one, and the check says why not to believe it
    assert min(result.robust.values()) > min(honest.robust.values()) + 0.2
    assert not checks["an unbounded attack reaches ~0%"].passed
    assert "pgd(linf, eps=1, step=0.1, steps=50, restarts=1)" in checks["an unbounded attack reaches ~0%"].detail


def test_the_sanity_checks_take_test_batches_read_as_needed(run):
    """A data set that is not in memory (ImageNet folders) reaches the checks as TestBatches, not a list."""
    spec, model = resolved_spec(run), load(run)
    read_as_needed = evaluation.TestBatches(datasets(spec).test, 50, torch.device("cpu"))
    checks = sanity_checks(model, read_as_needed, (), spec.threat, {}, 0, [])  # the baseline: a default PGD
    assert len(checks) == 3
    assert checks == sanity_checks(model, list(read_as_needed), (), spec.threat, {}, 0, [])


def test_a_missing_autoattack_package_is_a_clear_error(run, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyautoattack", None)  # what an environment without it looks like
    with pytest.raises(MissingExtra, match="pip install pyautoattack"):
        reevaluate(run, [AutoAttackSetting()], samples=5)


@pytest.mark.skipif(importlib.util.find_spec("pyautoattack") is None, reason="needs the optional pyautoattack")
def test_autoattack_is_at_least_as_strong_as_pgd_and_leaves_the_random_state_alone(run):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    result = reevaluate(run, [PgdAttack(), AutoAttackSetting()], samples=20, sanity=True)
    assert torch.equal(torch.get_rng_state(), state)
    name = "autoattack(standard, linf, eps=0.1)"
    assert result.implementations[name].startswith("pyautoattack ")
    assert result.implementations[name].endswith(" (autoattack standard)")
    assert result.robust[name] <= result.robust["pgd(linf, eps=0.1, step=0.025, steps=20, restarts=1)"]
    assert all(check.passed for check in result.sanity), result.sanity
    assert result.sanity[-1].name == "autoattack raises none of its flags"


def test_samples_take_the_first_test_images_and_must_be_positive(run):
    assert reevaluate(run, [FgsmAttack()], samples=10).samples == 10
    with pytest.raises(ValueError, match="at least 1"):
        reevaluate(run, samples=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_the_attacks_run_on_the_gpu_when_asked(run):
    on_cpu = reevaluate(run, [FgsmAttack()], samples=50, sanity=True)
    on_gpu = reevaluate(run, [FgsmAttack()], samples=50, sanity=True, device="cuda")
    assert on_gpu.clean == on_cpu.clean
    assert abs(on_gpu.robust["fgsm(linf, eps=0.1)"] - on_cpu.robust["fgsm(linf, eps=0.1)"]) <= 0.02


def test_recorded_paths_start_at_the_recipes_folder_wherever_eval_runs(tmp_path, monkeypatch):
    """A report records where its recipe sat (relative to the run folder), so `cstar eval` finds the data folder and
    the starting weights a recipe named relative to itself from any working folder; an older report, without it,
    keeps the working folder."""
    (tmp_path / "recipes" / "data").mkdir(parents=True)
    (tmp_path / "runs" / "one").mkdir(parents=True)
    resolved = Spec.model_validate({**json.loads(A_REPORT.read_text())["resolved"]}).model_dump(mode="json")
    resolved["data"]["root"], resolved["model"]["weights"] = "data", "../start.safetensors"
    report = {**json.loads(_report_with(resolved)), "recipe_folder": "../../recipes"}
    (tmp_path / "runs" / "one" / "report.json").write_text(json.dumps(report))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    spec = resolved_spec(Path("..") / "runs" / "one")
    assert spec.data.root == tmp_path / "recipes" / "data"
    assert spec.model.weights == tmp_path / "start.safetensors"
    del report["recipe_folder"]
    (tmp_path / "runs" / "one" / "report.json").write_text(json.dumps(report))
    assert resolved_spec(Path("..") / "runs" / "one").data.root == elsewhere / "data"
