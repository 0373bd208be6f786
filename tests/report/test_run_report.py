"""The run report's model (RunReport): what a compile writes and returns, what every committed report.json holds,
and what docs/compile.md says report.json holds."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import TypeAdapter

from cstar_dsl.plan.plans import LayerPlan, Plan
from cstar_dsl.report.document import markdown
from cstar_dsl.run_report import REPORT_SCHEMA, ReportError, RunReport, parse_report
from tests.helpers import ROOT

COMMITTED = sorted((ROOT / "benchmarks" / "results").glob("**/report.json"))
COMPILE_DOC = ROOT / "docs" / "compile.md"

RECIPE = """extend "{base}"

model {{
  arch = "cstar:mlp"
}}

compress {{
  method = {method}
  keep = ["fc3"]
}}

train {{
  pretrain {{
    epochs = 0
  }}
{admm}
  finetune {{
    epochs = 1
  }}
}}

evaluate {{
  samples = 40
}}
"""
ADMM = """  admm {
    epochs = 1
  }"""


@pytest.fixture(scope="module", params=["cstar", "channel-prune", "auto"])
def compiled(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    import cstar_dsl

    folder = tmp_path_factory.mktemp(request.param)
    recipe = folder / "quick.cstar"
    recipe.write_text(RECIPE.format(base=(ROOT / "specs" / "digits.cstar").as_posix(), method=request.param,
                                    admm=ADMM if request.param == "cstar" else ""))
    return cstar_dsl.compile(recipe, out=folder / "run"), folder / "run"


# ---------------------------------------------------------------------------------------------- a compile's report


def test_the_compile_returns_the_report_it_wrote(compiled):
    result, out = compiled
    assert isinstance(result.report, RunReport)
    on_disk = parse_report((out / "report.json").read_bytes(), out / "report.json")
    assert on_disk == result.report
    assert (out / "report.md").read_text() == markdown(on_disk)
    assert on_disk.schema_name == REPORT_SCHEMA
    assert on_disk.exports[0].file == "model.safetensors"
    assert all((out / export.file).stat().st_size == export.bytes for export in on_disk.exports)


def test_report_json_keeps_its_keys_and_leaves_out_what_a_row_lacks(compiled):
    result, out = compiled
    data = json.loads((out / "report.json").read_text())
    assert data["schema"] == REPORT_SCHEMA and "schema_name" not in data
    choice = result.report.structure_choice
    assert (choice is not None) == (result.report.method == "auto")
    assert list(data) == [field.alias or name for name, field in RunReport.model_fields.items()
                          if name != "structure_choice" or choice is not None]  # only `auto` chooses
    for row in data["history"]:
        assert ("rho" in row) == (row["phase"] == "admm"), row  # the ADMM columns only in ADMM epochs
    pruned = result.report.method == "channel-prune" or (choice is not None and choice.winner.startswith("prune"))
    for layer in data["layers"]:
        assert ("shape_after" in layer) == pruned, layer
    assert any(layer["method"] == ("pruned" if pruned else "svd") for layer in data["layers"])


def test_the_plan_totals_are_the_reports(compiled):
    result, _ = compiled
    report = result.report
    assert report.compression.params_compressed == sum(layer.params_after for layer in report.layers)
    assert report.compression.macs_dense == sum(layer.macs_before for layer in report.layers)
    assert report.history[-1].params is None and report.history[-1].phase == "finetune"


# ---------------------------------------------------------------------------------------------- files on disk


@pytest.mark.parametrize("path", COMMITTED, ids=lambda path: str(path.relative_to(ROOT / "benchmarks" / "results")))
def test_every_committed_report_validates_and_writes_back_the_same(path: Path):
    text = path.read_text()
    report = parse_report(text, path)
    expected = json.loads(text)
    expected.setdefault("latency", None)  # written before latency was measured: read as "not measured"
    assert json.loads(report.to_json()) == expected


def test_there_are_committed_reports_of_every_method():
    methods = {json.loads(path.read_text())["method"] for path in COMMITTED}
    assert {"cstar", "svd-finetune", "channel-prune"} <= methods


@pytest.mark.parametrize(("change", "named"), [
    (lambda data: data["compression"].pop("ratio"), "`compression.ratio`: Field required"),
    (lambda data: data["accuracy"].update(clean="high"), "`accuracy.clean`: Input should be a valid number"),
    (lambda data: data.update(schema="cstar.report/9"),
     "`schema`: Input should be 'cstar.report/1' or 'cstar.report/2'"),
    (lambda data: data["layers"][0].update(colour="red"), "`layers.0.colour`: Extra inputs are not permitted"),
])
def test_a_malformed_report_names_the_key_at_fault(change, named):
    path = COMMITTED[0]
    data = json.loads(path.read_text())
    change(data)
    with pytest.raises(ReportError, match=re.escape(named)) as caught:
        parse_report(json.dumps(data), path)
    assert str(caught.value).startswith(f"{path} is not a cstar run report ({REPORT_SCHEMA}): ")


def test_a_file_that_is_not_json_is_a_report_error():
    with pytest.raises(ReportError, match="the file: Invalid JSON"):
        parse_report("{", Path("report.json"))


def test_nan_is_written_as_json_did():
    path = COMMITTED[0]
    data = json.loads(path.read_text())
    data["history"][0]["loss"] = float("nan")
    report = parse_report(json.dumps(data), path)
    assert '"loss": NaN' in report.to_json()


# ---------------------------------------------------------------------------------------------- the docs


def _doc_tables() -> tuple[set[str], dict[str, set[str]]]:
    """docs/compile.md's two tables of report.json: its top-level keys, and the keys of each object."""
    text = COMPILE_DOC.read_text()
    section = text[text.index("Every key, object by object."):text.index("## Exit codes")]
    keys_table, objects_table = [block for block in section.split("\n\n") if block.startswith("| key |")
                                 or block.startswith("| object |")]
    rows = [[cell.strip() for cell in line.strip("|").split(" | ")] for line in keys_table.splitlines()[2:]]
    top = {row[0].strip("`") for row in rows}
    objects: dict[str, set[str]] = {}
    for line in objects_table.splitlines()[2:]:
        paths, keys = (cell.strip() for cell in line.strip("|").split(" | "))
        for path in re.findall(r"`([^`]+)`", paths):
            objects[path] = set(re.findall(r"`([^`]+)`", keys))
    return top, objects


def _schema_objects() -> tuple[set[str], dict[str, set[str]]]:
    """The model's JSON schema as the same two tables: top-level keys, and each nested object's keys by path."""
    schema = RunReport.model_json_schema()
    definitions = schema["$defs"]

    def resolve(node: dict[str, Any]) -> dict[str, Any]:
        if "$ref" in node:
            return definitions[node["$ref"].rsplit("/", 1)[-1]]
        for choice in node.get("anyOf", []):  # `X or null`: the object's own shape
            if "$ref" in choice or choice.get("type") == "array":
                return resolve(choice)
        if node.get("type") == "array" and "items" in node:
            return {**resolve(node["items"]), "_array": True}
        return node

    objects: dict[str, set[str]] = {}

    def walk(node: dict[str, Any], prefix: str) -> None:
        for key, child in node["properties"].items():
            shape = resolve(child)
            if "properties" in shape:
                path = f"{prefix}{key}" + ("[]" if shape.get("_array") else "")
                objects[path] = set(shape["properties"])
                walk(shape, f"{path}.")

    walk(schema, "")
    return set(schema["properties"]), objects


def test_the_docs_list_every_key_of_the_model_and_no_other():
    assert _doc_tables() == _schema_objects()


# ---------------------------------------------------------------------------------------------- layering and plans


def test_the_report_model_imports_neither_torch_nor_the_report_package():
    code = ("import sys, cstar_dsl.run_report\n"
            "print(sorted(name for name in sys.modules if name == 'torch' or name.startswith('cstar_dsl.report')))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_a_plan_with_a_pruned_layer_survives_the_checkpoints_json():
    layer = LayerPlan(name="conv", type_name="Conv2d", shape=(8, 4, 3, 3), rule="channel-prune (L1, uniform)",
                      method="pruned", ranks=None, reason="50.0% of channels removed", params_before=288,
                      params_after=144, macs_before=2880, macs_after=1440, energy_kept=None, shape_after=(4, 4, 3, 3))
    plan = Plan(policy="global", budget="2x params", metric="params", target=2.0, layers=(layer,), other_params=12)
    adapter = TypeAdapter(Plan)
    assert adapter.validate_json(adapter.dump_json(plan)) == plan
    assert plan.to_dict()["layers"][0]["shape_after"] == [4, 4, 3, 3]
    dense = LayerPlan(**{**layer.__dict__, "method": "dense", "shape_after": None})
    assert "shape_after" not in dense.to_dict()  # `cstar plan --json` keeps its shape
