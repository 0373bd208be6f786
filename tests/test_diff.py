"""Recipe diffs: settings after `extend` and defaults, rules by selector, plans layer by layer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from cstar_dsl.cli import main
from cstar_dsl.lang.validate import load_spec
from cstar_dsl.plan.diff import Change, spec_changes

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "specs"


def test_settings_of_a_variant_against_its_base():
    changes = spec_changes(load_spec(SPECS / "resnet18.cstar"), load_spec(SPECS / "resnet18-8x.cstar"))
    assert changes == [
        Change("compress.budget", "16x params", "8x params"),
        Change('compress.layers."layer4.*"', "max_rank = 256", "max_rank = 384"),
        Change("evaluate.requirements.robust", ">= 40%", ">= 45%"),
    ]


def test_same_meaning_written_differently_is_no_change(tmp_path):
    text = (SPECS / "digits.cstar").read_text()
    variant = text.replace("eps = 0.1", "eps = 1e-1").replace("steps = 7", "steps = 7\n  restarts = 1")
    (tmp_path / "v.cstar").write_text(variant)
    assert spec_changes(load_spec(SPECS / "digits.cstar"), load_spec(tmp_path / "v.cstar")) == []


def test_rules_and_requirements_added_and_removed(tmp_path):
    text = (SPECS / "digits.cstar").read_text()
    variant = text.replace('keep = ["fc"]  # the 10-way classifier is tiny',
                           'keep = ["fc"]\n\n  layer type Conv2d {\n    min_rank = 4\n  }')
    variant = variant.replace("  require robust >= 40%\n", "")
    (tmp_path / "v.cstar").write_text(variant)
    changes = spec_changes(load_spec(SPECS / "digits.cstar"), load_spec(tmp_path / "v.cstar"))
    assert Change("compress.layers.type Conv2d", None, "min_rank = 4") in changes
    assert Change("evaluate.requirements.robust", ">= 40%", None) in changes


def test_cli_json_has_settings_layers_and_totals(capsys):
    assert main(["diff", "--format", "json", str(SPECS / "resnet18.cstar"), str(SPECS / "resnet18-8x.cstar")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [c["path"] for c in result["settings"]][0] == "compress.budget"
    assert result["layers"] and all(layer["before"]["ranks"] != layer["after"]["ranks"] for layer in result["layers"])
    totals = result["totals"]
    assert round(totals["before_ratio"]) == 16 and round(totals["after_ratio"]) == 8


def test_standard_input_resolves_extend_next_to_the_other_file():
    variant = (SPECS / "resnet18-8x.cstar").read_text().replace("8x params", "4x params")
    result = subprocess.run([sys.executable, "-m", "cstar_dsl", "diff", "--settings-only", "-",
                             str(SPECS / "resnet18-8x.cstar")], input=variant, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "compress.budget  4x params -> 8x params" in result.stdout


def test_an_invalid_side_is_reported_with_its_diagnostics(tmp_path, capsys):
    (tmp_path / "bad.cstar").write_text('extend "nowhere.cstar"\n')
    assert main(["diff", "--settings-only", str(SPECS / "digits.cstar"), str(tmp_path / "bad.cstar")]) == 1
    assert "error[extend-not-found]" in capsys.readouterr().out
