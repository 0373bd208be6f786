"""Recipe diffs: settings after `extend` and defaults, rules by selector, plans layer by layer."""

from __future__ import annotations

import json
import subprocess
import sys

from cstar_dsl.cli import main
from cstar_dsl.lang.validate import load_spec
from cstar_dsl.plan.diff import Change, spec_changes
from tests.helpers import DIGITS, MNIST, ROOT, SPECS, variant


def test_settings_of_a_variant_against_its_base():
    changes = spec_changes(load_spec(SPECS / "resnet18.cstar"), load_spec(SPECS / "resnet18-8x.cstar"))
    assert changes == [
        Change("compress.budget", "16x params", "8x params"),
        Change('compress.layers."layer4.*"', "max_rank = 256", "max_rank = 384"),
        Change("evaluate.requirements.robust", ">= 40%", ">= 45%"),
    ]


def test_same_meaning_written_differently_is_no_change(tmp_path):
    same = variant(tmp_path, DIGITS, "threat {\n  eps = 1e-1\n  restarts = 1\n}\n")  # restarts = 1 is the default
    assert spec_changes(load_spec(DIGITS), load_spec(same)) == []


def test_rules_and_requirements_added_and_removed(tmp_path):
    # specs/mnist.cstar requires nothing: a variant adds a rule and a requirement, the reverse diff removes them
    more = variant(tmp_path, MNIST, "compress {\n  layer type Conv2d {\n    min_rank = 4\n  }\n}\n\n"
                                    "evaluate {\n  require robust >= 40%\n}\n")
    added, removed = spec_changes(load_spec(MNIST), load_spec(more)), spec_changes(load_spec(more), load_spec(MNIST))
    assert added == [Change("compress.layers.type Conv2d", None, "min_rank = 4"),
                     Change("evaluate.requirements.robust", None, ">= 40%")]
    assert removed == [Change("compress.layers.type Conv2d", "min_rank = 4", None),
                       Change("evaluate.requirements.robust", ">= 40%", None)]


def test_cli_json_has_settings_layers_and_totals(capsys):
    assert main(["diff", "--format", "json", str(SPECS / "resnet18.cstar"), str(SPECS / "resnet18-8x.cstar")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [c["path"] for c in result["settings"]][0] == "compress.budget"
    assert result["layers"] and all(layer["before"]["ranks"] != layer["after"]["ranks"] for layer in result["layers"])
    totals = result["totals"]
    assert round(totals["before_ratio"]) == 16 and round(totals["after_ratio"]) == 8


def test_standard_input_resolves_extend_next_to_the_other_file():
    variant = 'extend "resnet18-8x.cstar"\n\ncompress {\n  budget = 4x params\n}\n'  # relative: read from stdin
    result = subprocess.run([sys.executable, "-m", "cstar_dsl", "diff", "--settings-only", "-",
                             str(SPECS / "resnet18-8x.cstar")], input=variant, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "compress.budget  4x params -> 8x params" in result.stdout


def test_an_invalid_side_is_reported_with_its_diagnostics(tmp_path, capsys):
    (tmp_path / "bad.cstar").write_text('extend "nowhere.cstar"\n')
    assert main(["diff", "--settings-only", str(SPECS / "digits.cstar"), str(tmp_path / "bad.cstar")]) == 1
    assert "error[extend-not-found]" in capsys.readouterr().out
