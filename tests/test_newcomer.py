"""What a newcomer trips over (issue 12): recipes against their data, absurd sizes, warnings in the
report, the plan at any width, fast feedback, readable plots, dropping a block, movable runs, wording."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from cstar_dsl.deploy.artifacts import ArtifactError, load, model_description, save_model, size_problem
from cstar_dsl.lang import limits
from cstar_dsl.lang.errors import CStarError
from cstar_dsl.lang.spec import ModelSpec
from cstar_dsl.lang.validate import check_file
from cstar_dsl.model import zoo as models
from cstar_dsl.run_report import Accuracy, EpochRow, LayerReport
from tests.helpers import DIGITS, RESNET18, ROOT, compile_cli, line_of, variant, write_spec


def _codes(path: Path) -> list[tuple[str, int, str]]:
    with pytest.raises(CStarError) as raised:
        check_file(path)
    return [(d.code, d.span.line if d.span else 0, d.message) for d in raised.value.diagnostics]


def _data(dataset: str, root: str) -> str:
    """A `data` block for a data set other than digits (which has an official split, not the base's 80%)."""
    return f'data {{\n  dataset = {dataset}\n  root = "{root}"\n  split = official\n}}\n'


# ------------------------------------------------------------ 1. recipe against data


@pytest.mark.parametrize(("dataset", "shape", "classes"), [
    ("digits", "[1, 8, 8]", 10), ("mnist", "[1, 28, 28]", 10), ("cifar10", "[3, 32, 32]", 10),
    ("cifar100", "[3, 32, 32]", 100)])
def test_each_fixed_data_set_accepts_its_own_shape_and_classes(tmp_path, dataset, shape, classes):
    data = "" if dataset == "digits" else "\n" + _data(dataset, "data")
    path = variant(tmp_path, DIGITS, f"model {{\n  classes = {classes}\n  input = {shape}\n}}\n{data}")
    assert check_file(path).spec.model.input == tuple(json.loads(shape))


def test_an_mnist_input_on_digits_is_refused_at_the_input_line(tmp_path):
    """Before the check, this compiled and reported 58M MACs for 8x8 images (4.7M in truth)."""
    path = variant(tmp_path, DIGITS, "model {\n  input = [1, 28, 28]\n}\n")
    found = _codes(path)
    assert found == [("dataset-mismatch", line_of(path, "input = [1, 28, 28]"),
                      "`input` is [1, 28, 28], but `digits` images are 1x8x8")]


def test_wrong_channels_and_classes_are_both_reported(tmp_path):
    path = variant(tmp_path, DIGITS, "model {\n  classes = 100\n  input = [1, 32, 32]\n}\n\n" + _data("cifar10", "c"))
    found = _codes(path)
    lines = [line_of(path, "classes = 100"), line_of(path, "input = [1, 32, 32]")]
    assert [(code, line) for code, line, _ in found] == [("dataset-mismatch", line) for line in lines]
    assert "`cifar10` has 10 classes" in found[0][2]


def test_imagenet_folders_need_rgb_and_any_size_above_the_crop(tmp_path):
    imagenet = "\n" + _data("imagenet", "i")
    ok = variant(tmp_path, DIGITS, "model {\n  classes = 37\n  input = [3, 160, 96]\n}\n" + imagenet, "ok.cstar")
    assert check_file(ok).spec.model.classes == 37  # the folders decide, at load time
    found = _codes(variant(tmp_path, DIGITS, "model {\n  input = [1, 4, 224]\n}\n" + imagenet, "small.cstar"))
    assert [m for _, _, m in found] == ["`input` has 1 channel, but `imagenet` images are RGB",
                                         "`input` is 4x224 pixels, too small for `imagenet` crops"]


# --------------------------------------------------------------------- 2. absurd sizes


@pytest.mark.parametrize(("overrides", "message"), [
    ("model {\n  classes = 100001\n}\n", "`classes` must be at most 100000, got 100001"),
    ("data {\n  batch_size = 1M\n}\n", "`batch_size` must be at most 65536, got 1M"),
    ("train {\n  finetune {\n    epochs = 1" + "0" * 38 + "\n  }\n}\n",
     "`epochs` must be at most 100000, got 1" + "0" * 20 + "..."),
    ("threat {\n  steps = 1G\n}\n", "`steps` must be at most 100000, got 1G"),
    ("compress {\n  min_rank = 70000\n}\n", "`min_rank` must be at most 65536, got 70000"),  # a rank bound
], ids=["classes", "batch_size", "epochs", "steps", "min_rank"])
def test_absurd_sizes_are_out_of_range(tmp_path, overrides, message):
    found = _codes(variant(tmp_path, DIGITS, overrides))
    assert [(code, m) for code, _, m in found] == [("out-of-range", message)]


def test_the_bounds_leave_room_for_real_runs(tmp_path):
    path = variant(tmp_path, DIGITS, f"data {{\n  batch_size = 4k\n}}\n\n"
                                     f"train {{\n  finetune {{\n    epochs = {limits.MAX_EPOCHS}\n  }}\n}}\n")
    assert check_file(path).spec.train.finetune.epochs == limits.MAX_EPOCHS
    assert limits.input_problem((3, 2048, 2048)) is None  # 12.6M values
    assert limits.input_problem((3, 16384, 16384)) is not None
    assert "larger than 16384" in limits.input_problem((1, 16385, 1))


def _saved(tmp_path: Path) -> Path:
    spec = ModelSpec(arch="cstar:mlp", classes=10, input=(1, 8, 8))
    model = models.Normalized(models.build_model(spec, seed=0), (0.5,), (0.25,))
    save_model(tmp_path, model, model_description(spec, "cstar", {"kind": "dense"}, (0.5,), (0.25,)))
    return tmp_path


@pytest.mark.parametrize(("edit", "said"), [
    (lambda d: d["model"].update(classes=10**12), "1000000000000 classes (at most 100000)"),
    (lambda d: d["model"].update(input=[3, 100000, 100000]), "an input side of 100000 is larger than 16384"),
    (lambda d: d["model"].update(input=[512, 1024, 1024]), "536,870,912 values per example"),
    (lambda d: d.update(structure={"kind": "factorized", "ranks": {"fc1": [10**9]}}),
     "rank 1000000000 for fc1 (at most 65536)"),
])
def test_an_edited_model_json_asking_for_absurd_sizes_is_refused_before_building(tmp_path, monkeypatch, edit, said):
    folder = _saved(tmp_path)
    description = json.loads((folder / "model.json").read_text())
    edit(description)
    (folder / "model.json").write_text(json.dumps(description))
    built = []
    monkeypatch.setattr(models, "build_model", lambda *a, **k: built.append(a))
    with pytest.raises(ArtifactError, match="asks for .*refused before building anything") as raised:
        load(folder)
    assert said in str(raised.value)
    assert not built


def test_a_sane_model_json_has_no_size_problem(tmp_path):
    folder = _saved(tmp_path)
    assert size_problem(json.loads((folder / "model.json").read_text())) is None
    assert size_problem({"model": "garbage", "structure": {"ranks": {"x": "y"}}}) is None  # shape errors are not sizes
    assert isinstance(load(folder)(torch.rand(1, 1, 8, 8)), torch.Tensor)


# ---------------------------------------------------------------- 10. help and wording


def test_plural_says_one_epoch_and_two_points():
    from cstar_dsl.lang.render import plural

    assert [plural(1, "epoch"), plural(2, "epoch"), plural(0, "file"), plural(1.0, "point"), plural(0.5, "point"),
            plural(1_000_000, "step")] == ["1 epoch", "2 epochs", "0 files", "1 point", "0.5 points", "1000000 steps"]


def test_compile_and_export_help_say_what_they_do(capsys):
    from cstar_dsl import cli

    for command in ("compile", "export"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
    printed = " ".join(capsys.readouterr().out.split())
    assert "Train, compress and evaluate the model a recipe describes" in printed
    assert "onnx (default; for inference servers)" in printed and "safetensors (the weights alone" in printed


def test_the_log_says_1_epoch_of_1_step():
    from io import StringIO

    from rich.console import Console

    from cstar_dsl.cli.progress import LogProgress

    stream = StringIO()
    LogProgress(Console(file=stream, width=100)).phase_started("finetune", 1, 0, 1)
    assert stream.getvalue() == "-- finetune: 1 epoch of 1 step\n"


def test_the_final_table_has_a_header_for_every_column():
    from cstar_dsl.cli.compile import _report_table
    from cstar_dsl.run_report import parse_report

    path = Path(__file__).resolve().parent.parent / "benchmarks/results/mnist/cstar-16x/report.json"
    headers = [column.header for column in _report_table(parse_report(path.read_text(), path)).columns]
    assert all(headers) and headers == ["measure", "value"]


def test_sanity_lines_wrap_at_100_columns():
    from cstar_dsl.cli.output import wrapped

    detail = ("pgd(linf, eps=0.1, step=0.025, steps=20, restarts=1): 89.4% (321/359); pgd(linf, eps=0.1, "
              "step=0.025, steps=100, restarts=3): 89.1% (320/359) (-0.3 points); allowed rise 0.56 points "
              "(1 image or 0.5 points, whichever is larger)")
    line = f"ok   more steps do not help the model: {detail}"
    lines = wrapped(line).splitlines()
    assert len(line) > 200 and len(lines) == 3 and all(len(part) <= 100 for part in lines)
    assert " ".join(" ".join(lines).split()) == " ".join(line.split())  # every word kept, in order
    assert lines[1].startswith("     ") and "pgd(linf" in lines[0]


# ------------------------------------------- 3, 5, 9: one tiny compile with a warning, moved


@pytest.fixture(scope="module")
def warned_run(tmp_path_factory):
    """A tiny svd-finetune recipe that keeps its base's `admm` block: checked with a warning."""
    folder = tmp_path_factory.mktemp("warned") / "project"
    folder.mkdir()
    base = write_spec(folder, method="cstar", pretrain=1, admm=1, finetune=1, name="base.cstar")
    spec = folder / "variant.cstar"
    # `root` is unused by digits, but it is a path: the lock must hash it as written, not resolved
    spec.write_text(f'extend "{base.name}"\n\ndata {{\n  root = "data"\n}}\n\n'
                    'compress {\n  method = svd-finetune\n}\n')
    assert compile_cli(spec, "--out", folder / "run") == 0
    return spec, folder / "run"


def test_check_time_warnings_reach_report_json_and_report_md(warned_run):
    _, out = warned_run
    warnings = json.loads((out / "report.json").read_text())["warnings"]
    assert any("warning[phase-ignored] method `svd-finetune` has no ADMM phase" in w for w in warnings), warnings
    assert any(w.startswith("base.cstar:") or "/base.cstar:" in w for w in warnings)  # where it is, as check says
    markdown = (out / "report.md").read_text()
    assert "## Warnings" in markdown and "phase-ignored" in markdown.split("## Warnings", 1)[1]


def test_a_taken_out_folder_is_refused_before_torch_is_imported(warned_run, tmp_path):
    import subprocess
    import sys

    spec, out = warned_run
    script = ("import sys\nfrom cstar_dsl import cli\n"
              f"code = cli.main(['compile', {str(spec)!r}, '--out', {str(out)!r}])\n"
              "print('exit', code, 'torch imported:', 'torch' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            cwd=ROOT)
    assert "already holds a compiled model" in result.stdout
    assert result.stdout.rstrip().endswith("exit 4 torch imported: False")


def test_the_first_line_comes_before_the_data(tmp_path, capsys, monkeypatch):
    from cstar_dsl import cli
    from cstar_dsl.driver import pipeline

    spec = variant(tmp_path, DIGITS)
    seen = []
    monkeypatch.setattr(pipeline, "compile_spec", lambda *a, **k: seen.append(capsys.readouterr().out) or 1 / 0)
    with pytest.raises(ZeroDivisionError):
        cli.main(["compile", str(spec), "--out", str(tmp_path / "run"), "--quiet"])
    assert seen == [f"-- compiling {spec} into {tmp_path / 'run'}/\n"]


def test_the_spec_hash_does_not_depend_on_where_the_checkout_sits(tmp_path):
    from cstar_dsl.driver.pipeline import spec_identity

    model = 'model {\n  input = [1, 28, 28]\n  weights = "w/start.safetensors"\n}\n\n'
    here, there = tmp_path / "a" / "specs", tmp_path / "elsewhere" / "deep" / "specs"
    for folder in (here, there):
        folder.mkdir(parents=True)
    one, two = (check_file(variant(folder, DIGITS, model + _data("mnist", "../data/mnist"))).spec
                for folder in (here, there))
    assert one.data.root != two.data.root  # the resolved paths differ ...
    assert spec_identity(one, here) == spec_identity(two, there)  # ... what the recipe means does not
    assert '"root":"../data/mnist"' in spec_identity(one, here)
    changed = check_file(variant(there, DIGITS, model + _data("mnist", "../data/mnist-10k"))).spec
    assert spec_identity(changed, there) != spec_identity(two, there)
    from cstar_dsl.driver.outputs import recipe_meaning  # what report.json's `resolved` holds

    meaning = recipe_meaning(one, here)
    assert (meaning["data"]["root"], meaning["model"]["weights"]) == ("../data/mnist", "w/start.safetensors")
    assert meaning == recipe_meaning(two, there) and str(tmp_path) not in json.dumps(meaning)


def test_a_run_folder_moved_with_its_recipe_is_accepted_by_its_lock(warned_run, tmp_path):
    """--locked compares the whole lock (the spec hash first) before it re-runs the recipe in place."""
    import shutil

    spec, out = warned_run
    moved = tmp_path / "moved" / "project"
    shutil.copytree(spec.parent, moved)
    lock = json.loads((out / "lock.json").read_text())
    assert compile_cli(moved / spec.name, "--out", moved / out.name, "--locked") == 0
    assert json.loads((moved / out.name / "lock.json").read_text())["spec_sha256"] == lock["spec_sha256"]


# --------------------------------------------------------------- 4, 7. the plan at any width


@pytest.fixture(scope="module")
def resnet_plan():
    from cstar_dsl.api import build_model, make_plan

    spec = check_file(RESNET18).spec
    return make_plan(spec, build_model(spec))


def _plan_text(plan, width: int, pruning: bool = False, allocation: str = "uniform") -> list[str]:
    from io import StringIO

    from rich.console import Console

    from cstar_dsl.cli.output import wrapped
    from cstar_dsl.cli.plan import _plan_notes, _plan_table

    stream = StringIO()
    console = Console(file=stream, width=width, highlight=False)
    console.print(_plan_table(plan, "resnet18.cstar: torchvision:resnet18", console.width, pruning=pruning))
    for line in _plan_notes(plan, console.width, pruning=pruning, allocation=allocation):
        console.out(wrapped(line, console.width))
    return stream.getvalue().splitlines()


@pytest.mark.parametrize("width", [80, 100, 160])
def test_the_plan_has_one_line_a_layer_within_the_width(resnet_plan, width):
    lines = _plan_text(resnet_plan, width)
    assert max(len(line) for line in lines) <= width
    for layer in resnet_plan.layers:  # each layer on exactly one line, with its ranks and sizes
        rows = [line for line in lines if line.split() and line.split()[0] == layer.name]
        assert len(rows) == 1, (layer.name, rows)
        if layer.ranks is not None:
            assert f"tucker2 {'x'.join(map(str, layer.ranks))}" in rows[0] or "svd" in rows[0]
    assert not any(line.strip() and line.split()[0].startswith("ple.") for line in lines)  # no folded names


def test_the_plan_uses_the_width_it_has(resnet_plan):
    narrow, middle, wide = (_plan_text(resnet_plan, width) for width in (80, 100, 160))
    header = {width: next(line for line in text if line.split()[:1] == ["layer"]).split()
              for width, text in ((80, narrow), (100, middle), (160, wide))}
    assert header[80] == ["layer", "shape", "ranks", "params", "MACs"]
    assert header[100] == ["layer", "shape", "ranks", "params", "MACs", "energy"]
    assert header[160] == ["layer", "kind", "shape", "rule", "ranks", "params", "MACs", "energy"]
    # what a narrow table leaves out is said once under it
    assert "dense (kept dense by `keep`): conv1, fc" in narrow
    assert 'ranks by layer "layer4.*": 5 layers' in narrow and "ranks by default: 14 layers" in narrow
    assert any("dense: kept dense by `keep`" in line for line in wide)
    assert not any(line.startswith("ranks by") for line in wide)


def _pruned_resnet_plan(folder: Path, allocation: str = "uniform"):
    from cstar_dsl.api import build_model, make_plan

    recipe = variant(folder, RESNET18, f"compress {{\n  method = channel-prune\n  allocation = {allocation}\n}}\n"
                                       "train {\n  admm = none\n}\n")
    spec = check_file(recipe).spec
    return make_plan(spec, build_model(spec))


def test_a_channel_prune_plan_shows_the_channels_each_layer_keeps(tmp_path):
    plan = _pruned_resnet_plan(tmp_path)
    assert all(layer.ranks is None and layer.shape_after is not None for layer in plan.layers)
    for width in (80, 160):
        lines = _plan_text(plan, width, pruning=True)
        text = "\n".join(lines)
        assert "tucker2" not in text and "energy" not in text
        assert "channels" in next(line for line in lines if "layer" in line.split()[:1])
        rows = {line.split()[0]: line for line in lines if line.split() and line.split()[0].startswith(("conv1",
                                                                                                          "layer1.0"))}
        kept = next(layer for layer in plan.layers if layer.name == "layer1.0.conv1").shape_after
        assert kept is not None and "dense" in rows["conv1"]
        assert re.search(f"64 ?(→|->) ?{kept[0]} ", rows["layer1.0.conv1"])
        assert max(len(line) for line in lines) <= width
        assert "one share of the output channels" in text
    ranked = " ".join(_plan_text(_pruned_resnet_plan(tmp_path, "global"), 160, pruning=True, allocation="global"))
    assert "ranks the output channels" in ranked and "one share" not in ranked


# ------------------------------------------------------------------- 8. dropping a block


def test_a_baseline_variant_drops_the_bases_admm_phase_without_a_warning(tmp_path):
    baseline = "compress {\n  method = svd-finetune\n}\n"
    checked = check_file(variant(tmp_path, DIGITS, baseline + "\ntrain {\n  admm = none\n}\n"))
    assert checked.spec.train.admm is None and checked.warnings == ()
    assert checked.spec.train.pretrain is not None and checked.spec.train.finetune.epochs == 4  # the rest stays
    kept = check_file(variant(tmp_path, DIGITS, baseline, "kept.cstar"))
    assert [d.code for d in kept.warnings] == ["phase-ignored"]  # what the drop is for


def test_a_drop_is_undone_by_a_later_variant_that_gives_the_block_again(tmp_path):
    dropped = variant(tmp_path, DIGITS, "train {\n  pretrain = none\n}\n", "nopre.cstar")
    again = variant(tmp_path, dropped, "train {\n  pretrain {\n    epochs = 2\n    lr = 0.1\n  }\n}\n")
    pretrain = check_file(again).spec.train.pretrain
    assert (pretrain.epochs, pretrain.lr) == (2, 0.1)  # a fresh block: nothing merged from the dropped one


def test_none_stays_an_ordinary_option_elsewhere():
    assert check_file(DIGITS).spec.data.augment == "none"


# ------------------------------------------------------------------------- 6. the plots


HISTORY = [EpochRow(phase=phase, epoch=epoch, loss=loss, clean=0.9, robust=0.5, seconds=1.0, lr=0.01,
                    **({"rho": rho, "residual": 0.5 / (epoch + 1)} if phase == "admm" else {}))
           for phase, epoch, loss, rho in [("pretrain", 0, 2.0, 0), ("pretrain", 1, 0.06, 0), ("admm", 0, 9.0, 0.2),
                                           ("admm", 1, 3.0, 2.0), ("finetune", 0, 0.1, 0)]]
LAYERS = [LayerReport(name=name, type="Conv2d", shape=(64, 64, 3, 3), rule="policy global", method=method,
                      ranks=ranks, reason="", params_before=1000 * (i + 1), params_after=300 * (i + 1),
                      macs_before=0, macs_after=0, energy_kept=0.9 if ranks else None)
          for i, (name, method, ranks) in enumerate([("features.10", "tucker2", (43, 55)), ("fc", "dense", None),
                                                      ("features.3", "tucker2", (19, 19))])]


def _figure_of(monkeypatch, draw):
    from matplotlib.figure import Figure

    drawn = []
    monkeypatch.setattr(Figure, "savefig", lambda figure, *a, **k: drawn.append(figure))
    draw()
    return drawn[0]


def test_curves_say_what_they_show(monkeypatch, tmp_path):
    from cstar_dsl.report.document import plot_curves

    test = Accuracy(clean=0.992, robust={"pgd": 0.894, "fgsm": 0.922})
    figure = _figure_of(monkeypatch, lambda: plot_curves(HISTORY, tmp_path / "c.png", test=test))
    accuracy, loss, residual = figure.axes[:3]
    labels = [text.get_text() for ax in figure.axes for text in (ax.get_legend().get_texts() if ax.get_legend()
                                                                   else [])]
    assert "test clean, after training: 99.2%" in labels
    assert "test robust (worst attack), after training: 89.4%" in labels  # the lower of the two attacks
    assert any("penalty" in label and "admm" in label for label in labels)  # the ADMM loss includes it, said so
    assert "training batches" in accuracy.get_title()
    figure.canvas.draw()
    rho_axis = figure.axes[-1]
    ticks = [t.get_text() for t in rho_axis.get_yticklabels(minor=False) + rho_axis.get_yticklabels(minor=True)]
    assert "2" in ticks and not any("10^" in t or "times" in t for t in ticks), ticks
    assert loss.get_yscale() == "log" and "0.1" in [t.get_text() for t in loss.get_yticklabels()]


def test_ranks_plot_writes_the_ranks_and_keeps_one_layer_order(monkeypatch, tmp_path):
    from cstar_dsl.report.document import plot_ranks

    figure = _figure_of(monkeypatch, lambda: plot_ranks(LAYERS, tmp_path / "r.png"))
    ax = figure.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["fc", "features.3", "features.10"]
    assert {t.get_text() for t in ax.texts} == {"dense", "19x19", "43x55"}
    again = _figure_of(monkeypatch, lambda: plot_ranks(list(reversed(LAYERS)), tmp_path / "r.png"))
    assert [t.get_text() for t in again.axes[0].get_xticklabels()] == ["fc", "features.3", "features.10"]
