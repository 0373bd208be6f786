"""joint-fisher end to end: channels and ranks removed by Fisher scores on the adversarial loss, compiled by `method =
cstar` (ADMM onto it) and by `method = auto` (probed beside the others); its plan, model.json, `load`, `cstar plan`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import cstar_dsl
from cstar_dsl.cli import main
from cstar_dsl.lang.validate import check_file
from cstar_dsl.model.prune import weight_params
from tests.helpers import DIGITS, variant

RECIPE = """threat {{
  step = 0.05
  steps = 2
}}
compress {{
  {compress}
  budget = 8x params
}}
train {{
  pretrain {{ epochs = 2 }}
  {admm}
  finetune {{ epochs = 1 }}
}}
evaluate {{
  attacks = [pgd(steps = 2)]
}}
export {{
  formats = [safetensors]
}}
"""


def _recipe(folder: Path, name: str, compress: str, admm: str = "admm { epochs = 1 }") -> Path:
    return variant(folder, DIGITS, RECIPE.format(compress=compress, admm=admm), f"{name}.cstar")


def test_cstar_projects_onto_the_fisher_structure_and_compiles_its_plan(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, "fisher", "method = cstar\n  structure = joint-fisher")
    result = cstar_dsl.compile(recipe, tmp_path / "out")
    layers = result.report.layers
    pruned = [layer for layer in layers if layer.shape_after and layer.shape_after[0] < layer.shape[0]]
    assert pruned and all(layer.rule.startswith("Fisher on the adversarial loss") for layer in pruned)
    head = next(layer for layer in layers if layer.name == "fc")
    assert head.ranks is None and head.shape_after[0] == 10  # the classifier keeps its outputs, at full rank
    params = sum(layer.params_after for layer in layers)
    target = sum(layer.params_before for layer in layers) / 8
    assert 0.97 * target <= params <= target
    description = json.loads((tmp_path / "out" / "model.json").read_text())
    assert description["structure"]["kind"] == "joint"
    loaded = cstar_dsl.load(tmp_path / "out")
    assert weight_params(loaded) == params == result.report.compression.params_compressed
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), result.model.cpu().eval()(x))


def test_auto_probes_joint_fisher_beside_the_others_and_reports_every_score(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, "auto", "method = auto\n  candidates = [prune-uniform, joint-fisher]", "admm = none")
    choice = cstar_dsl.compile(recipe, tmp_path / "out").report.structure_choice
    assert choice is not None and [c.name for c in choice.candidates] == ["prune-uniform", "joint-fisher"]
    assert all(c.robust is not None and c.params > 0 for c in choice.candidates)
    assert "joint-fisher" in (tmp_path / "out" / "report.md").read_text()


def test_cstar_plan_shows_the_budget_and_says_the_layers_are_chosen_at_compile_time(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = _recipe(tmp_path, "plan", "method = auto\n  candidates = [prune-uniform, joint-fisher]")
    assert main(["plan", str(recipe), "--format", "json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert {c["name"]: c["measured"] for c in plan["candidates"]} == {"prune-uniform": False, "joint-fisher": True}
    assert main(["plan", str(recipe), "--structure", "joint-fisher"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "joint-fisher chooses each layer's channels and ranks at compile time" in out
    assert main(["plan", str(recipe), "--structure", "joint-fisher", "--latency"]) == 0
    assert "layers are chosen at compile time; the compile's report times them" in " ".join(
        capsys.readouterr().out.split())


def test_a_policy_joint_fisher_does_not_use_is_warned_about(tmp_path: Path) -> None:
    checked = check_file(_recipe(tmp_path, "policy", "method = cstar\n  structure = joint-fisher\n  policy = uniform"))
    assert [(w.code, "`policy`" in w.message) for w in checked.warnings] == [("setting-ignored", True)]
