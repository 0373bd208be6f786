"""A joint structure (channels pruned, then factorized) end to end: the plan and its JSON, `cstar diff`, the compile,
model.json (schema /2) and `load`, the ONNX export; a hostile model.json is refused; a /1 artifact still loads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import cstar_dsl
from cstar_dsl.cli import main
from cstar_dsl.deploy.artifacts import ArtifactError, load
from cstar_dsl.deploy.export import export
from cstar_dsl.model.prune import weight_params
from tests.helpers import DIGITS, save_model_folder, variant

JOINT = """threat {
  step = 0.05
  steps = 2
}
compress {
  method = auto
  candidates = [joint-50]
  budget = 8x params
}
train {
  pretrain { epochs = 1 }
  finetune { epochs = 1 }
  admm = none
}
evaluate {
  attacks = [pgd(steps = 2)]
}
export {
  formats = [safetensors]
}
"""


@pytest.fixture(scope="module")
def recipe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return variant(tmp_path_factory.mktemp("joint"), DIGITS, JOINT, "joint.cstar")


@pytest.fixture(scope="module")
def compiled(recipe: Path) -> tuple[Path, cstar_dsl.api.Compiled]:
    folder = recipe.parent / "run"
    return folder, cstar_dsl.compile(recipe, folder)


def test_the_compiled_joint_model_is_its_plan_and_loads_from_its_files(compiled) -> None:
    folder, result = compiled
    layers = result.report.layers
    both = [layer for layer in layers if layer.ranks and layer.shape_after and layer.shape_after != layer.shape]
    assert both, "no layer is both pruned and factorized"
    description = json.loads((folder / "model.json").read_text())
    assert description["schema"] == "cstar.model/2" and description["structure"]["kind"] == "joint"
    assert description["structure"]["shapes"] == {layer.name: list(layer.shape_after) for layer in layers
                                                  if layer.ranks is not None}
    loaded = load(folder)
    assert weight_params(loaded) == result.report.compression.params_compressed == sum(
        layer.params_after for layer in layers)
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), result.model.cpu().eval()(x))


def test_the_joint_model_exports_to_onnx_that_computes_the_same(compiled) -> None:
    folder, _ = compiled
    exported = export(folder, "onnx")  # export checks the file against PyTorch on several batches, or raises
    assert exported.path.is_file() and exported.max_abs_diff is not None


def test_plan_json_and_diff_carry_the_channels_and_the_ranks(recipe: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", str(recipe), "--format", "json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert (plan["schema"], plan["structure"]) == ("cstar.plan/2", "joint-50")
    joint = [layer for layer in plan["layers"] if layer["ranks"] and layer["shape_after"] != layer["shape"]]
    assert joint and plan["totals"]["params_after"] == sum(layer["params_after"] for layer in plan["layers"])
    low_rank = variant(tmp_path, recipe, "compress {\n  candidates = [low-rank]\n}\n", "low-rank.cstar")
    assert main(["plan", str(low_rank), "--format", "json", "--structure", "joint-50"]) == 0
    assert json.loads(capsys.readouterr().out)["layers"] == plan["layers"]  # --structure plans what auto would
    capsys.readouterr()
    assert main(["diff", str(low_rank), str(recipe)]) == 0
    out = capsys.readouterr().out
    name = joint[0]["name"]
    row = next(line for line in out.splitlines() if line.strip().startswith(name))
    assert f"{joint[0]['shape'][0]} -> {joint[0]['shape_after'][0]}, tucker2" in row


@pytest.mark.parametrize("edit, words", [
    (lambda s: s.pop("shapes"), "needs `shapes`"),
    (lambda s: s["shapes"].update({next(iter(s["shapes"])): [10_000, 10_000, 3, 3]}), "from 1 to the dense shape"),
    (lambda s: s["shapes"].update({next(iter(s["shapes"])): [0, 1, 3, 3]}), "from 1 to the dense shape"),
    (lambda s: s["shapes"].update({next(iter(s["shapes"])): "64x32"}), "expected 4 whole numbers"),
    (lambda s: s["shapes"].update({"features.99": [1, 1, 3, 3]}), "needs `shapes`"),
])
def test_a_hostile_joint_model_json_is_refused_with_its_cause(compiled, tmp_path: Path, edit, words: str) -> None:
    folder = tmp_path / "edited"
    shutil.copytree(compiled[0], folder)
    description = json.loads((folder / "model.json").read_text())
    edit(description["structure"])
    (folder / "model.json").write_text(json.dumps(description))
    with pytest.raises(ArtifactError, match=words):
        load(folder)


def test_an_artifact_of_the_first_schema_still_loads(tmp_path: Path) -> None:
    folder = save_model_folder(tmp_path, factorized=True)
    description = json.loads((folder / "model.json").read_text())
    (folder / "model.json").write_text(json.dumps({**description, "schema": "cstar.model/1"}))
    assert load(folder)(torch.zeros(1, 1, 8, 8)).shape == (1, 10)
