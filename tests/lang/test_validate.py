"""Spec and validation stages: typed settings, defaults, extend, semantic checks, located errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from pydantic import ValidationError

from cstar_dsl.lang.errors import CStarError
from cstar_dsl.lang.spec import EnergyPolicy, LimitBudget, PgdAttack, RatioBudget, Spec
from cstar_dsl.lang.validate import check_file, load_spec
from tests.helpers import DIGITS, SPECS, line_of, variant


def _write(tmp_path: Path, text: str, name: str = "r.cstar") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _codes(path: Path, **options) -> list[tuple[str, int]]:
    with pytest.raises(CStarError) as caught:
        check_file(path, **options)
    return [(d.code, d.span.line if d.span else 0) for d in caught.value.diagnostics]


@pytest.mark.parametrize("path", sorted(SPECS.glob("*.cstar")), ids=lambda p: p.name)
def test_example_specs_are_valid(path):
    assert check_file(path).warnings == ()


def test_values_are_typed_and_defaults_filled():
    spec = load_spec(SPECS / "digits.cstar")
    assert spec.model.input == (1, 8, 8)
    assert spec.data.split == pytest.approx(0.8)
    assert spec.threat.eps == pytest.approx(0.1) and spec.threat.random_start is True
    assert spec.compress.budget == RatioBudget(metric="params", ratio=16 / 4)
    assert spec.train.admm.rho_schedule.kind == "geometric"
    assert spec.train.admm.interval.unit == "epoch"
    assert spec.train.pretrain.optimizer.momentum == 0.9  # default sgd settings
    assert [a.kind for a in spec.evaluate.attacks] == ["pgd", "fgsm"]
    assert [(r.metric, r.value) for r in spec.evaluate.requirements] == [("clean", 0.8), ("robust", 0.4)]


def test_units_and_fractions(tmp_path):
    spec = load_spec(SPECS / "resnet18.cstar")
    assert spec.threat.eps == pytest.approx(8 / 255)
    vgg = load_spec(SPECS / "vgg16.cstar")
    assert vgg.compress.budget == LimitBudget(metric="macs", limit=80e6)
    energy = variant(tmp_path, DIGITS, "compress {\n  policy = energy(95%)\n}\n")
    assert load_spec(energy).compress.policy == EnergyPolicy(threshold=0.95)


def test_spec_is_frozen_and_rejects_unknown_fields_from_python():
    spec = load_spec(SPECS / "digits.cstar")
    with pytest.raises(ValidationError):
        spec.model.classes = 3  # type: ignore[misc]
    data = spec.model_dump()
    data["threat"]["epss"] = 1
    with pytest.raises(ValidationError):
        Spec.model_validate(data)


def test_python_values_are_accepted():
    spec = load_spec(SPECS / "digits.cstar")
    again = Spec.model_validate(spec.model_dump())
    assert again == spec
    assert PgdAttack.model_validate({"kind": "pgd", "steps": 50}).steps == 50


def test_relative_paths_resolve_against_the_recipe_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = load_spec(SPECS / "mnist.cstar")
    assert spec.data.root == (SPECS / "../../shared/data/mnist-10k").resolve()


def test_extend_overrides_blocks_keys_rules_and_requirements(tmp_path):
    shutil.copy(SPECS / "resnet18.cstar", tmp_path)
    variant = load_spec(SPECS / "resnet18-8x.cstar")
    base = load_spec(SPECS / "resnet18.cstar")
    assert variant.compress.budget.ratio == 8 and base.compress.budget.ratio == 16
    assert variant.compress.keep == base.compress.keep  # untouched keys come from the base
    rules = {str(r.selector): r for r in variant.compress.layers}
    assert rules['"layer4.*"'].max_rank == 384  # merged by selector
    assert rules["type Linear"].dense  # kept from the base
    robust = [r.value for r in variant.evaluate.requirements if r.metric == "robust"]
    assert robust == [pytest.approx(0.45)]  # replaced by metric, not added
    assert len(variant.evaluate.requirements) == 2


def test_extend_paths_resolve_against_the_file_that_wrote_them(tmp_path):
    (tmp_path / "base").mkdir()
    mnist = 'model {\n  input = [1, 28, 28]\n}\n\ndata {\n  dataset = mnist\n  root = "mnist"\n  split = official\n}\n'
    variant(tmp_path / "base", DIGITS, mnist, "b.cstar")
    child = _write(tmp_path, 'extend "base/b.cstar"\n')
    assert load_spec(child).data.root == (tmp_path / "base" / "mnist").resolve()


def test_extend_cycle_and_missing_base(tmp_path):
    _write(tmp_path, 'extend "b.cstar"\n', "a.cstar")
    _write(tmp_path, 'extend "a.cstar"\n', "b.cstar")
    with pytest.raises(CStarError) as caught:
        check_file(tmp_path / "a.cstar")
    (diagnostic,) = caught.value.diagnostics
    assert diagnostic.code == "extend-cycle" and "a.cstar -> " in diagnostic.notes[0]
    assert _codes(_write(tmp_path, 'extend "nowhere.cstar"\n')) == [("extend-not-found", 1)]


def test_every_semantic_error_of_a_file_is_reported_together(tmp_path):
    path = variant(tmp_path, DIGITS, 'model {\n  arch = "cstar:digit-cnn"\n}\n\ndata {\n  batch_size = 0\n}\n\n'
                   "threat {\n  eps = -0.1\n}\n\ncompress {\n  budget = 4\n}\n")
    assert _codes(path) == [("unknown-model", line_of(path, 'arch = "cstar:digit-cnn"')),
                            ("out-of-range", line_of(path, "batch_size = 0")),
                            ("eps-not-positive", line_of(path, "eps = -0.1")),
                            ("missing-unit", line_of(path, "budget = 4"))]


def test_rule_that_contradicts_keep(tmp_path):
    rules = 'keep = ["fc", "conv*"]\n\n  layer "conv1" {\n    rank = 2\n  }\n\n  layer "fc" {\n    dense = true\n  }'
    path = variant(tmp_path, DIGITS, f"compress {{\n  {rules}\n}}\n")
    assert _codes(path) == [("rule-contradicts-keep", line_of(path, 'layer "conv1" {'))]


def test_import_models_need_explicit_permission(tmp_path):
    path = variant(tmp_path, DIGITS, 'model {\n  arch = "my_models.nets:small_cnn"\n}\n')
    assert _codes(path) == [("import-not-allowed", line_of(path, 'arch = "my_models.nets:small_cnn"'))]
    assert check_file(path, allow_import=True).spec.model.arch == "my_models.nets:small_cnn"


def test_method_phase_checks(tmp_path):
    no_admm = variant(tmp_path, DIGITS, "train {\n  admm = none\n}\n", "no-admm.cstar")
    assert _codes(no_admm) == [("missing-phase", line_of(no_admm, "train {"))]
    baseline = variant(tmp_path, DIGITS, "compress {\n  method = svd-finetune\n}\n", "baseline.cstar")
    (warning,) = check_file(baseline).warnings
    assert warning.code == "phase-ignored" and warning.severity == "warning"


def test_module_prefixes_are_normalized(tmp_path):
    prefixed = 'compress {\n  keep = ["module.fc"]\n\n  layer "_orig_mod.conv1" {\n    rank = 2\n  }\n}\n'
    spec = load_spec(variant(tmp_path, DIGITS, prefixed))
    assert spec.compress.keep == ("fc",)
    assert spec.compress.layers[0].selector.pattern == "conv1"
    assert spec.compress.layers[0].selector.matches("module.conv1", "Conv2d")
