"""`cstar plan FILE [--format table|json]`: the table and totals, the JSON schema, and planning errors
reported as located diagnostics (file:line:col) with exit code 1."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from cstar_dsl.cli import main
from cstar_dsl.plan.allocate import LayerPlan
from tests.helpers import DIGITS, DOCS, line_of, run_cli

TOP_KEYS = {"spec", "model", "structure", "seconds", "schema", "policy", "budget", "metric", "target", "totals",
            "layers", "warnings"}
BUDGET_LINE = line_of(DIGITS, "budget = 4x params")  # digits.cstar's, which the variants below keep
TOTAL_KEYS = {"params_before", "params_after", "macs_before", "macs_after", "other_params", "ratio"}


def write(name: str, text: str) -> str:
    """Writes a recipe into the working folder (`digits_folder`); its name, as the CLI is given it."""
    Path(name).write_text(text)
    return name


def test_plan_prints_the_table_and_totals(digits_folder, capsys):
    assert main(["plan", "digits.cstar"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("digits.cstar: cstar:digits-cnn")
    header = next(line for line in out.splitlines() if line.strip().startswith("layer"))
    assert header.split() == ["layer", "kind", "shape", "rule", "ranks", "params", "MACs", "energy"]
    rows = {line.split()[0]: line for line in out.splitlines() if line.strip().startswith(("fc ", "features."))}
    assert set(rows) == {"fc", "features.0", "features.3", "features.7", "features.10"}
    assert 'keep "fc"' in rows["fc"] and "dense: kept dense by `keep`" in rows["fc"]
    assert "dense: rank 1 already" in rows["features.0"]
    assert re.search(r"tucker2 \d+x\d+", rows["features.10"]) and re.search(r"\d+\.\d%\s*$", rows["features.10"])
    assert "128x128x3x3" in rows["features.10"]
    assert re.search(r"^\s*total\s+241\.2k -> \S+\s+4\.738M -> \S+", out, re.M)
    summary = re.search(r"^budget 4x params, policy global: (\d) of 5 layers factorized; params (\d+\.\d\d)x, "
                        r"MACs (\d+\.\d\d)x \(conv \+ linear weights; 714 other parameters unchanged\); "
                        r"planned in \d+\.\d s$", out, re.M)
    assert summary, out
    assert summary.group(1) == "3" and 4.0 <= float(summary.group(2)) <= 4.12
    assert "note: no starting weights" in out


def test_plan_json_has_the_documented_keys(digits_folder, capsys):
    assert main(["plan", "--format", "json", "digits.cstar"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) == TOP_KEYS
    assert (data["spec"], data["model"], data["schema"]) == ("digits.cstar", "cstar:digits-cnn", "cstar.plan/2")
    assert (data["policy"], data["budget"], data["metric"]) == ("global", "4x params", "params")
    assert isinstance(data["seconds"], float) and data["seconds"] >= 0
    assert len(data["warnings"]) == 1 and "random initialization" in data["warnings"][0]
    totals = data["totals"]
    assert set(totals) == TOTAL_KEYS and totals["other_params"] == 714
    assert totals["ratio"] == pytest.approx(totals["params_before"] / totals["params_after"])
    assert totals["params_after"] <= data["target"] == pytest.approx(totals["params_before"] / 4)
    fields = {field.name for field in dataclasses.fields(LayerPlan)} - {"shape_after"}  # set by pruning only
    names = [layer["name"] for layer in data["layers"]]
    assert names == ["fc", "features.0", "features.3", "features.7", "features.10"]
    for layer in data["layers"]:
        assert set(layer) == fields
        assert layer["method"] in ("svd", "tucker2", "dense")
        assert (layer["ranks"] is None) == (layer["method"] == "dense")
        assert isinstance(layer["shape"], list)
    assert sum(layer["params_after"] for layer in data["layers"]) == totals["params_after"]


def test_docs_plan_md_documents_the_json_keys():
    text = (DOCS / "plan.md").read_text()
    section = text[text.index("## JSON"):text.index("\n## ", text.index("## JSON") + 1)]
    documented = {name for line in section.splitlines() if line.startswith("| `")
                  for name in re.findall(r"`([a-z_]+)`", line.split("|")[1])}
    assert documented == TOP_KEYS | {"candidates"} | {field.name for field in dataclasses.fields(LayerPlan)}
    assert all(f"`{key}`" in section for key in TOTAL_KEYS)


def _plan_json() -> dict[str, object]:
    result = run_cli("plan", "--format", "json", "specs/digits.cstar")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    data.pop("seconds")
    return data


def test_plan_is_reproducible_across_runs():
    assert _plan_json() == _plan_json()


def test_a_rule_that_matches_nothing_points_at_the_rule(digits_folder, capsys):
    name = write("typo.cstar", 'extend "digits.cstar"\n\ncompress {\n  layer "featurs.3" {\n    rank = 4\n  }\n}\n')
    assert main(["plan", name]) == 1
    out = capsys.readouterr().out
    assert out.startswith('error[selector-matches-nothing]: layer rule "featurs.3" matches no Linear or Conv2d layer')
    assert " --> typo.cstar:4:9\n" in out
    assert '4 |   layer "featurs.3" {' in out
    assert '^^^^^^^^^^^ did you mean "features.3"?' in out
    assert "= help:" in out and "Traceback" not in out


def test_a_keep_entry_that_matches_nothing_points_at_keep(digits_folder, capsys):
    name = write("keep.cstar", 'extend "digits.cstar"\n\ncompress {\n  keep = ["fc", "feature.7"]\n}\n')
    assert main(["plan", "--format", "json", name]) == 1
    [diagnostic] = json.loads(capsys.readouterr().out)
    assert diagnostic["code"] == "selector-matches-nothing" and diagnostic["label"] == 'did you mean "features.7"?'
    assert (diagnostic["file"], diagnostic["line"]) == ("keep.cstar", 4)


def test_an_infeasible_budget_points_at_the_budget(digits_folder, capsys):
    name = write("tight.cstar", 'extend "digits.cstar"\n\ncompress {\n  budget = 1000x params\n}\n')
    assert main(["plan", name]) == 1
    out = capsys.readouterr().out
    match = re.match(r"error\[infeasible-budget\]: the budget 1000x params cannot be met: "
                     r"the largest reachable ratio is (\d+\.\d\d)x\n --> tight\.cstar:4:12\n", out)
    assert match, out
    assert f"^^^^^^^^^^^^ at most {match.group(1)}x here" in out
    # the stated ratio is reachable
    write("reachable.cstar", f'extend "digits.cstar"\n\ncompress {{\n  budget = {match.group(1)}x params\n}}\n')
    assert main(["plan", "--format", "json", "reachable.cstar"]) == 0
    assert json.loads(capsys.readouterr().out)["totals"]["ratio"] >= float(match.group(1))


def test_a_problem_caused_by_a_variant_points_at_the_base_line_it_concerns(digits_folder, capsys):
    # The variant raises the floor; the budget the floor makes infeasible was written in digits.cstar.
    name = write("floor.cstar", 'extend "digits.cstar"\n\ncompress {\n  min_rank = 60\n}\n')
    assert main(["plan", name]) == 1
    out = capsys.readouterr().out
    assert out.startswith("error[infeasible-budget]: the budget 4x params cannot be met")
    assert f" --> digits.cstar:{BUDGET_LINE}:12\n" in out


def test_plan_format_concise_prints_concise_diagnostics(digits_folder, capsys):
    name = write("floor.cstar", 'extend "digits.cstar"\n\ncompress {\n  min_rank = 60\n}\n')
    assert main(["plan", "--format", "concise", name]) == 1
    assert capsys.readouterr().out.startswith(f"digits.cstar:{BUDGET_LINE}:12: error[infeasible-budget]")


def test_plan_json_errors_are_diagnostics(digits_folder, capsys):
    name = write("tight.cstar", 'extend "digits.cstar"\n\ncompress {\n  budget = 1000x params\n}\n')
    assert main(["plan", "--format", "json", name]) == 1
    [diagnostic] = json.loads(capsys.readouterr().out)
    assert (diagnostic["code"], diagnostic["file"], diagnostic["line"], diagnostic["column"]) == (
        "infeasible-budget", "tight.cstar", 4, 12)


def test_an_invalid_recipe_is_reported_before_planning(digits_folder, capsys):
    name = write("bad.cstar", 'extend "digits.cstar"\n\ncompress {\n  polcy = global\n}\n')
    assert main(["plan", name]) == 1
    out = capsys.readouterr().out
    assert "error[unknown-key]" in out and " --> bad.cstar:4:3" in out


def test_plan_usage_errors_exit_2():
    result = run_cli("plan", "no-such-file.cstar")
    assert result.returncode == 2 and "no such file" in result.stderr


def test_the_module_entry_point_plans():
    assert set(_plan_json()) == TOP_KEYS - {"seconds"}
