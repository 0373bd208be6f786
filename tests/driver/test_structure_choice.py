"""`method = auto`: candidate structures probed on held-out training images, the most robust one compiled."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import cstar_dsl
from cstar_dsl.driver import compress as compress_module
from cstar_dsl.driver import probe, pruning
from cstar_dsl.driver.probe import split_holdout
from cstar_dsl.driver.state import CompileError, Progress
from cstar_dsl.lang.errors import CStarError
from cstar_dsl.lang.spec import ModelSpec
from cstar_dsl.lang.validate import check_file
from cstar_dsl.model import zoo
from cstar_dsl.model.channel_cut import cut_channels
from cstar_dsl.model.prune import channel_prune, weight_params
from cstar_dsl.run_report import Candidate, EpochRow, StructureChoice
from cstar_dsl.train.checkpoint import CheckpointError
from cstar_dsl.train.optimize import TrainingDiverged
from tests.helpers import DIGITS, line_of, variant


def _recipe(folder: Path, name: str, compress: str = "method = auto", train: str = "admm = none") -> Path:
    """A fast recipe over the digits example: its MLP, two-step attacks, one epoch per phase."""
    return variant(folder, DIGITS, f"""model {{
  arch = "cstar:mlp"
}}
threat {{
  step = 0.05
  steps = 2
}}
compress {{
  {compress}
  keep = ["fc3"]
}}
train {{
  pretrain {{ epochs = 1 }}
  finetune {{ epochs = 1 }}
  {train}
}}
evaluate {{
  attacks = [pgd(steps = 2)]
}}
export {{
  formats = [safetensors]
}}
""", f"{name}.cstar")


@pytest.mark.parametrize("size, share", [(10, 0.1), (1437, 0.1), (7, 0.5), (3, 0.01), (5, 0.99)])
def test_holdout_splits_the_training_indices_in_two(size: int, share: float) -> None:
    fit, held = split_holdout(size, share, seed=0)
    assert sorted(fit.tolist() + held.tolist()) == list(range(size))
    assert len(held) >= 1 and len(fit) >= 1
    assert abs(len(held) - size * share) <= max(1, size * share)
    again, held_again = split_holdout(size, share, seed=0)
    assert torch.equal(fit, again) and torch.equal(held, held_again)


def test_holdout_depends_on_the_seed() -> None:
    assert not torch.equal(split_holdout(1000, 0.1, 0)[1], split_holdout(1000, 0.1, 1)[1])


def test_choice_survives_a_checkpoint_round_trip() -> None:
    candidates = (Candidate(name="low-rank", params=10, macs=20, clean=0.9, robust=0.5, seconds=1.0),
                  Candidate(name="prune-global", params=11, macs=21, clean=None, robust=None, seconds=2.0))
    choice = StructureChoice(winner="prune-global", holdout=144, epochs=1, seconds=3.0, candidates=candidates)
    assert StructureChoice.model_validate_json(choice.model_dump_json()) == choice


def test_auto_compiles_exactly_what_the_winning_method_compiles(tmp_path: Path) -> None:
    auto = cstar_dsl.compile(_recipe(tmp_path, "auto"), tmp_path / "auto")
    choice = auto.report.structure_choice
    assert choice is not None
    assert [c.name for c in choice.candidates] == ["low-rank", "prune-uniform", "prune-global"]
    assert all(c.robust is not None and c.clean is not None and 0 <= c.robust <= c.clean + 1e-9
               for c in choice.candidates)
    assert choice.winner in {c.name for c in choice.candidates}
    assert auto.report.timings.phases["probe"] == pytest.approx(choice.seconds)
    method = {"low-rank": "method = svd-finetune", "prune-uniform": "method = channel-prune",
              "prune-global": "method = channel-prune\n  allocation = global"}[choice.winner]
    named = cstar_dsl.compile(_recipe(tmp_path, "named", method), tmp_path / "named")
    ours, theirs = (load_file(tmp_path / run / "model.safetensors") for run in ("auto", "named"))
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[key], theirs[key]) for key in ours)
    assert auto.report.accuracy == named.report.accuracy
    markdown = (tmp_path / "auto" / "report.md").read_text()
    assert "## Structure choice" in markdown and f"`{choice.winner}` (chosen)" in markdown
    assert cstar_dsl.load(tmp_path / "auto") is not None


@pytest.mark.parametrize("candidates", ["prune-uniform", "joint-fisher"])
def test_the_probe_sees_training_images_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, candidates: str) -> None:
    """The probe fine-tunes on the fit part of the training set and scores on the held-out rest; joint-fisher's
    scores (the adversarial loss's gradients) are measured on the fit part too."""
    seen: dict[str, list[torch.Tensor]] = {"fit": [], "held": []}
    real_batches, real_accuracy = probe.batches, probe.accuracy

    def fit_batches(context, generator):  # type: ignore[no-untyped-def]
        for x, y in real_batches(context, generator):
            seen["fit"].append(x.flatten(1))
            yield x, y

    def held_accuracy(model, batches, attack=None, generator=None):  # type: ignore[no-untyped-def]
        seen["held"] += [x.flatten(1) for x, _ in batches]
        return real_accuracy(model, batches, attack, generator)

    monkeypatch.setattr(probe, "batches", fit_batches)
    monkeypatch.setattr(pruning, "batches", fit_batches)
    monkeypatch.setattr(probe, "accuracy", held_accuracy)
    recipe = _recipe(tmp_path, "auto", f"method = auto\n  candidates = [{candidates}]\n  probe_holdout = 20%")
    cstar_dsl.compile(recipe, tmp_path / "out")
    data = cstar_dsl.datasets(check_file(recipe).spec)
    train, test = data.train.tensors[0].flatten(1), data.test.tensors[0].flatten(1)
    fit, held = torch.cat(seen["fit"]), torch.cat(seen["held"])

    def rows_in(rows: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
        return (torch.cdist(rows, pool) < 1e-6).any(1)

    assert rows_in(fit, train).all() and rows_in(held, train).all()
    assert not rows_in(held, test).any() and not rows_in(fit, test).any()
    assert not rows_in(held, fit).any()  # scored on images the probe never trained on
    assert len(held.unique(dim=0)) == pytest.approx(0.2 * len(train), abs=2)


def test_a_diverging_candidate_loses_and_the_rest_still_compete(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    real_epoch = probe.adversarial_epoch

    def low_rank_diverges(model, batches, optimizer, attack, *, phase, epoch, **options):  # type: ignore[no-untyped-def]
        if phase == "probe low-rank":
            raise TrainingDiverged(phase, epoch, 0, float("nan"))
        return real_epoch(model, batches, optimizer, attack, phase=phase, epoch=epoch, **options)

    monkeypatch.setattr(probe, "adversarial_epoch", low_rank_diverges)
    compiled = cstar_dsl.compile(_recipe(tmp_path, "auto", "method = auto\n  candidates = [low-rank, prune-uniform]"),
                                 tmp_path / "out")
    choice = compiled.report.structure_choice
    assert choice is not None and choice.winner == "prune-uniform"
    assert choice.candidates[0].robust is None
    assert "diverged" in (tmp_path / "out" / "report.md").read_text()


def test_every_candidate_diverging_stops_the_compile_with_help(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def diverges(model, batches, optimizer, attack, *, phase, epoch, **options):  # type: ignore[no-untyped-def]
        raise TrainingDiverged(phase, epoch, 0, float("nan"))

    monkeypatch.setattr(probe, "adversarial_epoch", diverges)
    with pytest.raises(CompileError, match="no candidate structure could be probed: prune-uniform: its probe "
                                           "diverged") as raised:
        cstar_dsl.compile(_recipe(tmp_path, "auto", "method = auto\n  candidates = [prune-uniform]"), tmp_path / "out")
    assert "finetune.lr" in (raised.value.help or "")


@pytest.mark.parametrize("setting, code, words", [
    ("candidates = [low-rank, channels]", "unknown-option", "channels"),
    ("candidates = []", "out-of-range", "empty"),
    ("candidates = [low-rank, low-rank]", "duplicate-key", "twice"),
    ("probe_holdout = 100%", "out-of-range", "strictly between"),
    ("probe_holdout = 0.1", "missing-unit", "percentage"),
    ("probe_epochs = 0", "out-of-range", "probe_epochs"),
    ("min_channels = 0", "out-of-range", "min_channels"),
    ("candidates = [joint-fishr]", "unknown-option", "joint-fisher"),
])
def test_probe_settings_are_checked_at_their_line(tmp_path: Path, setting: str, code: str, words: str) -> None:
    recipe = _recipe(tmp_path, "bad", f"method = auto\n  {setting}")
    with pytest.raises(CStarError) as raised:
        check_file(recipe)
    [diagnostic] = raised.value.diagnostics
    assert diagnostic.code == code and words in diagnostic.message + (diagnostic.label or "")
    assert diagnostic.span is not None and diagnostic.span.line == line_of(recipe, setting)


@pytest.mark.parametrize("compress, key", [
    ("method = channel-prune\n  probe_epochs = 2", "probe_epochs"),
    ("method = svd-finetune\n  candidates = [low-rank]", "candidates"),
    ("method = auto\n  allocation = global", "allocation"),
    ("method = svd-finetune\n  min_channels = 4", "min_channels"),
    ('method = svd-finetune\n  layer "fc1" {\n    min_channels = 4\n  }', "min_channels"),
])
def test_settings_a_method_does_not_use_are_warned_about(tmp_path: Path, compress: str, key: str) -> None:
    checked = check_file(_recipe(tmp_path, "warned", compress))
    assert [(w.code, f"`{key}`" in w.message) for w in checked.warnings] == [("setting-ignored", True)]


@pytest.mark.parametrize("arch, shape", [("cstar:mnist-cnn", (1, 28, 28)), ("torchvision:resnet18", (3, 32, 32)),
                                         ("torchvision:mobilenet_v2", (3, 32, 32))])
def test_the_channel_cut_is_the_uniform_prune_and_its_own_projection(arch: str, shape: tuple[int, ...]) -> None:
    net = zoo.build_model(ModelSpec(arch=arch, classes=10, input=shape), seed=0)
    example = torch.zeros(1, *shape)
    pruned = channel_prune(net, example, weight_params(net) // 16)
    # mnist-cnn's doubling widths leave its uniform share 5% under the budget: layers rounded up fill it, and the
    # cut must follow them. The others' shares come within 3% of it alone.
    assert bool(pruned.kept_counts) == (arch == "cstar:mnist-cnn")
    weights = {name: m.weight.detach() for name, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    cut = cut_channels(net, example, pruned.pruning_ratio, weights, kept_counts=pruned.kept_counts)
    applied = cut.apply(net)
    assert weight_params(applied) == pruned.params
    assert applied(example).shape == (1, 10)
    assert all(w.shape == pruned_w.shape for w, pruned_w in zip(applied.state_dict().values(),
                                                                pruned.model.state_dict().values(), strict=True))
    z = cut.project(weights)
    shrunk = {name: m.weight.shape[0] for name, m in applied.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
              and m.weight.shape[0] < weights[name].shape[0]}
    assert shrunk  # every output the model loses is a zero row of Z, depthwise convs included
    for name, kept in shrunk.items():
        zero_rows = int((z[name].flatten(1) == 0).all(dim=1).sum())
        assert zero_rows == weights[name].shape[0] - kept, name
    again = cut_channels(net, example, pruned.pruning_ratio, z, kept_counts=pruned.kept_counts)
    assert sorted(map(repr, again.items)) == sorted(map(repr, cut.items))  # Z's zeros are what is cut
    assert torch.equal(torch.cat([v.flatten() for v in again.project(z).values()]),
                       torch.cat([v.flatten() for v in z.values()]))


def test_a_joint_projection_keeps_the_channels_and_truncates_what_they_keep_to_their_ranks() -> None:
    net = zoo.build_model(ModelSpec(arch="cstar:mnist-cnn", classes=10, input=(1, 28, 28)), seed=0)
    example = torch.zeros(1, 1, 28, 28)
    pruned = channel_prune(net, example, weight_params(net) // 4)
    weights = {name: m.weight.detach() for name, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    cut = cut_channels(net, example, pruned.pruning_ratio, weights, kept_counts=pruned.kept_counts)
    ranks = {"features.10": (5, 7), "features.21": (9, 4), "fc": (3,)}
    z = cut.project(weights, ranks)
    channels_only = cut.project(weights)
    for name, weight in z.items():
        rows, columns = cut.kept_slices(name, tuple(weight.shape))
        assert int((weight.flatten(1).abs().sum(1) > 0).sum()) <= len(rows)  # removed outputs stay zero
        if name not in ranks:
            assert torch.equal(weight, channels_only[name])
            continue
        kept = weight[rows][:, columns]
        unfoldings = [kept.flatten(1), kept.transpose(0, 1).flatten(1)] if kept.dim() == 4 else [kept]
        for unfolding, rank in zip(unfoldings, ranks[name], strict=True):
            assert int(torch.linalg.matrix_rank(unfolding)) <= rank < min(unfolding.shape)


def test_cstar_onto_channels_compiles_a_pruned_model_at_the_budget(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, "channels", "method = cstar\n  structure = prune-uniform",
                     "admm {\n    epochs = 2\n    lr = 0.01\n    rho = 0.5\n  }")
    compiled = cstar_dsl.compile(recipe, tmp_path / "out")
    admm_rows = [row for row in compiled.report.history if row.phase == "admm"]
    residuals = [row.residual for row in admm_rows]
    assert len(residuals) == 2 and residuals[0] is not None and residuals[1] is not None
    assert residuals[1] < residuals[0]
    compression = compiled.report.compression
    assert compression.ratio >= 4
    layers = {layer.name: layer for layer in compiled.report.layers}
    # the output layer keeps its classes; its inputs follow fc2's cut
    assert layers["fc3"].shape_after is not None and layers["fc3"].shape_after[0] == 10
    assert all((layer.shape_after or layer.shape)[0] < layer.shape[0] for name, layer in layers.items()
               if name != "fc3")
    loaded = cstar_dsl.load(tmp_path / "out")
    x = torch.rand(3, 1, 8, 8)
    assert torch.allclose(loaded(x), compiled.model(x), atol=1e-5)


def test_a_budget_only_channels_reach_is_compiled_and_low_rank_steps_aside(tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    from cstar_dsl.cli import main

    recipe = _recipe(tmp_path, "far", "method = auto\n  candidates = [low-rank, prune-uniform]\n  budget = 64x params")
    compiled = cstar_dsl.compile(recipe, tmp_path / "out")
    choice = compiled.report.structure_choice
    assert choice is not None and choice.winner == "prune-uniform"
    low_rank = choice.candidates[0]
    assert low_rank.robust is None and low_rank.problem is not None
    assert "the budget 64x params cannot be met" in low_rank.problem and "20.00x" in low_rank.problem
    assert 64 * 0.97 <= compiled.report.compression.ratio <= 64 / 0.97
    pruned = variant(tmp_path, recipe, "compress {\n  method = channel-prune\n}\n", "pruned.cstar")
    for planned in (pruned, recipe):  # auto plans its first channel candidate, as its probe will compile
        assert main(["plan", str(planned)]) == 0
        out = capsys.readouterr().out
        assert "budget 64x params, 2 of 3 layers pruned" in out
        assert "low rank: the budget 64x params cannot be met" in out


def test_plan_lists_what_each_candidate_costs_at_the_budget(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    from cstar_dsl.cli import main

    recipe = _recipe(tmp_path, "auto", "method = auto\n  candidates = [low-rank, prune-uniform, joint-50]")
    assert main(["plan", str(recipe), "--format", "json"]) == 0
    costs = {cost["name"]: cost for cost in json.loads(capsys.readouterr().out)["candidates"]}
    assert list(costs) == ["low-rank", "prune-uniform", "joint-50"]
    for name, cost in costs.items():
        assert main(["plan", str(recipe), "--format", "json", "--structure", name]) == 0
        alone = json.loads(capsys.readouterr().out)
        assert "candidates" not in alone
        assert (cost["params"], cost["macs"], cost["problem"]) == (
            alone["totals"]["params_after"], alone["totals"]["macs_after"], None)
        assert cost["params"] <= alone["target"]
    far = variant(tmp_path, recipe, "compress {\n  budget = 64x params\n}\n", "far.cstar")
    assert main(["plan", str(far)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "low-rank cannot meet it (the budget 64x params cannot be met" in out and "prune-uniform 1.31k" in out


ADMM = "admm {\n    epochs = 2\n    lr = 0.01\n    rho = 0.5\n  }"


@pytest.mark.parametrize("candidate, method", [
    ("low-rank", "method = cstar"),
    ("prune-uniform", "method = cstar\n  structure = prune-uniform"),
])
def test_auto_with_an_admm_phase_is_cstar_onto_the_structure_it_chose(tmp_path: Path, candidate: str,
                                                                      method: str) -> None:
    auto = cstar_dsl.compile(_recipe(tmp_path, "auto", f"method = auto\n  candidates = [{candidate}]", ADMM),
                             tmp_path / "auto")
    assert [row.phase for row in auto.report.history].count("admm") == 2
    assert auto.report.structure_choice is not None and auto.report.structure_choice.winner == candidate
    named = cstar_dsl.compile(_recipe(tmp_path, "named", method, ADMM), tmp_path / "named")
    ours, theirs = (load_file(tmp_path / run / "model.safetensors") for run in ("auto", "named"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[key], theirs[key]) for key in ours)
    timeless = {"seconds", "zstep_seconds"}
    assert [r.model_dump(exclude=timeless) for r in auto.report.history] == [
        r.model_dump(exclude=timeless) for r in named.report.history]


@pytest.mark.parametrize("compress", ["method = auto\n  candidates = [prune-global]",
                                      "method = cstar\n  structure = prune-global"])
def test_admm_onto_a_global_prune_keeps_its_widths(tmp_path: Path, compress: str) -> None:
    auto = cstar_dsl.compile(_recipe(tmp_path, "auto", compress, ADMM), tmp_path / "auto")
    pruned = cstar_dsl.compile(_recipe(tmp_path, "pruned", "method = channel-prune\n  allocation = global"),
                               tmp_path / "pruned")
    widths = [(layer.name, layer.shape_after) for layer in pruned.report.layers]
    assert [(layer.name, layer.shape_after) for layer in auto.report.layers] == widths
    assert len({shape[0] / layer.shape[0] for layer, (_, shape) in zip(pruned.report.layers, widths, strict=True)
                if shape is not None and layer.name != "fc3"}) > 1, "a global ranking spreads the cut unevenly"
    assert auto.report.compression.params_compressed == pruned.report.compression.params_compressed
    assert all(layer.rule.startswith("cstar ADMM onto channels (global)") for layer in auto.report.layers
               if layer.name != "fc3")


@pytest.mark.parametrize("compress", ["method = auto\n  candidates = [joint-50]",
                                      "method = cstar\n  structure = joint"])
def test_admm_onto_a_joint_structure_cuts_channels_then_factorizes(tmp_path: Path, compress: str) -> None:
    compiled = cstar_dsl.compile(_recipe(tmp_path, "joint", compress, ADMM), tmp_path / "joint")
    layers = compiled.report.layers
    assert any(layer.ranks and layer.shape_after and layer.shape_after[0] < layer.shape[0] for layer in layers)
    assert compiled.report.compression.params_compressed == sum(layer.params_after for layer in layers)
    assert weight_params(cstar_dsl.load(tmp_path / "joint")) == compiled.report.compression.params_compressed
    assert compiled.report.compression.ratio >= 4 * 0.97 * 0.97


class _StopAfter(Progress):
    """Interrupts a compile once ``phase`` has finished its first epoch (a checkpoint is then on disk)."""

    def __init__(self, phase: str) -> None:
        self.phase = phase

    def epoch_done(self, row: EpochRow) -> None:
        if row.phase == self.phase:
            raise KeyboardInterrupt


@pytest.mark.parametrize("compress, train, phase", [
    ("method = cstar\n  structure = prune-uniform", "admm {\n    epochs = 2\n    lr = 0.01\n  }", "admm"),
    ("method = auto\n  candidates = [low-rank, prune-uniform]", "admm = none", "finetune"),
    ("method = auto\n  candidates = [low-rank, prune-global]", "admm {\n    epochs = 2\n    lr = 0.01\n  }", "admm"),
])
def test_a_resumed_run_ends_as_an_uninterrupted_one(tmp_path: Path, compress: str, train: str, phase: str) -> None:
    recipe = _recipe(tmp_path, "resumed", compress, train)
    whole = cstar_dsl.compile(recipe, tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        cstar_dsl.compile(recipe, tmp_path / "cut", progress=_StopAfter(phase))
    resumed = cstar_dsl.compile(recipe, tmp_path / "cut", resume=True)
    ours, theirs = (load_file(tmp_path / run / "model.safetensors") for run in ("whole", "cut"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[key], theirs[key]) for key in ours)
    assert _scores(resumed.report.structure_choice) == _scores(whole.report.structure_choice)
    assert resumed.report.layers == whole.report.layers


def test_a_checkpoint_that_counted_other_phases_is_not_resumed(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, "resumed", "method = auto\n  candidates = [prune-uniform]", ADMM)
    with pytest.raises(KeyboardInterrupt):
        cstar_dsl.compile(recipe, tmp_path / "cut", progress=_StopAfter("admm"))
    path = tmp_path / "cut" / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    del state["phases"]  # as written before `auto` ran its ADMM phase: then it ran pretrain and finetune only
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="counts the phases pretrain, finetune") as caught:
        cstar_dsl.compile(recipe, tmp_path / "cut", resume=True)
    assert "--force" in (caught.value.help or "")


def _scores(choice: StructureChoice | None) -> object:
    """A choice without its timings, which no two runs share."""
    if choice is None:
        return None
    return choice.winner, [c.model_dump(exclude={"seconds"}) for c in choice.candidates]


@pytest.mark.parametrize("compress, train, words", [
    ("method = auto\n  candidates = [prune-global, low-rank]", "admm = none",
     "auto: `cstar compile` probes prune-global, low-rank at this budget"),
    ("method = auto\n  candidates = [joint-25]", "admm = none",
     "joint: `cstar compile` removes one share of the output channels of each of the 2 pruned layers"),
    ("method = cstar\n  structure = prune-global", "admm {\n    epochs = 1\n    lr = 0.01\n  }",
     "cstar onto channels: the ADMM phase, then the compile, ranks the output channels of the 2 pruned layers"),
    ("method = cstar\n  structure = prune-uniform", "admm {\n    epochs = 1\n    lr = 0.01\n  }",
     "cstar onto channels: the ADMM phase, then the compile, removes one share"),
])
def test_plan_says_what_the_compile_will_do(tmp_path: Path, capsys: pytest.CaptureFixture[str], compress: str,
                                            train: str, words: str) -> None:
    from cstar_dsl.cli import main

    assert main(["plan", str(_recipe(tmp_path, "planned", compress, train))]) == 0
    assert words in " ".join(capsys.readouterr().out.split())


def test_cstar_plan_shows_the_channels_the_compile_keeps(tmp_path: Path) -> None:
    """A uniform share's widths do not depend on the weights: the plan before training is the compiled model's."""
    from cstar_dsl.api import build_model, make_plan

    recipe = _recipe(tmp_path, "pruned", "method = channel-prune")
    spec = check_file(recipe).spec
    planned = make_plan(spec, build_model(spec))
    compiled = cstar_dsl.compile(recipe, tmp_path / "out")
    assert [(p.name, p.shape_after, p.params_after, p.macs_after) for p in planned.layers] == \
           [(c.name, c.shape_after, c.params_after, c.macs_after) for c in compiled.report.layers]
    assert planned.params_after == compiled.report.compression.params_compressed == weight_params(compiled.model)


def test_a_recipe_that_names_no_method_chooses_its_structure(tmp_path: Path) -> None:
    recipe = tmp_path / "unnamed.cstar"
    recipe.write_text('model {\n  arch = "cstar:mlp"\n  classes = 10\n  input = [1, 8, 8]\n}\n'
                      "data {\n  dataset = digits\n}\n"
                      "threat {\n  norm = linf\n  eps = 0.1\n  step = 0.05\n  steps = 2\n}\n"
                      'compress {\n  budget = 4x params\n  keep = ["fc3"]\n}\n'
                      "train {\n  finetune {\n    epochs = 1\n    lr = 0.01\n  }\n}\n")
    checked = check_file(recipe)
    assert checked.spec.compress.method == "auto" and not checked.warnings


def test_a_candidate_that_cannot_meet_the_budget_steps_aside(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cstar_dsl.driver import compress
    from cstar_dsl.lang.problems import SpecProblem

    real_build = compress.build_structure

    def global_is_infeasible(context, net, structure, plan, score):  # type: ignore[no-untyped-def]
        if structure == "prune-global":
            raise SpecProblem(("compress", "budget"), "infeasible-budget", "channel pruning reaches no fewer than 9")
        return real_build(context, net, structure, plan, score)

    monkeypatch.setattr(compress, "build_structure", global_is_infeasible)
    recipe = _recipe(tmp_path, "auto", "method = auto\n  candidates = [prune-global, prune-uniform]")
    compiled = cstar_dsl.compile(recipe, tmp_path / "out")
    choice = compiled.report.structure_choice
    assert choice is not None and choice.winner == "prune-uniform"
    assert choice.candidates[0].robust is None and "no fewer than 9" in (choice.candidates[0].problem or "")
    assert "no fewer than 9" in (tmp_path / "out" / "report.md").read_text()


def test_the_probe_leaves_the_global_random_stream_as_it_found_it(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Building a candidate (a new module's initialization) and probing it (dropout) draw from torch's global
    stream: the choice must leave it as it found it, so that `auto` then builds and fine-tunes the winner exactly
    as the winner's own method would."""
    states: list[torch.Tensor] = []
    real_choose, real_probe = compress_module.choose_structure, probe._probe

    def recorded(*args, **kwargs):  # type: ignore[no-untyped-def]
        states.append(torch.get_rng_state())
        choice = real_choose(*args, **kwargs)
        states.append(torch.get_rng_state())
        return choice

    def with_dropout(*args, **kwargs):  # type: ignore[no-untyped-def]
        torch.rand(100)  # what a dropout layer draws
        return real_probe(*args, **kwargs)

    monkeypatch.setattr(compress_module, "choose_structure", recorded)
    monkeypatch.setattr(probe, "_probe", with_dropout)
    cstar_dsl.compile(_recipe(tmp_path, "auto", "method = auto\n  candidates = [low-rank, prune-uniform]"),
                      tmp_path / "out")
    assert len(states) == 2 and torch.equal(states[0], states[1])


def test_a_keep_glob_leaves_its_layers_whole_when_pruning(tmp_path: Path) -> None:
    from cstar_dsl.api import build_model, make_plan

    recipe = variant(tmp_path, DIGITS, 'model {\n  arch = "cstar:mlp"\n}\ncompress {\n  method = channel-prune\n'
                                       '  keep = ["fc[13]"]\n}\ntrain {\n  admm = none\n}\n')
    spec = check_file(recipe).spec
    plan = make_plan(spec, build_model(spec))
    whole = {layer.name for layer in plan.layers if layer.shape_after is not None
             and layer.shape_after[0] == layer.shape[0]}
    assert whole == {"fc1", "fc3"} and len(plan.layers) == 3


def test_auto_on_image_folders_scores_held_out_images_as_test_images(tmp_path: Path) -> None:
    """A folder data set crops and flips its training images as it reads them; the probe's held-out images are
    read with the test transform instead, and a whole `auto` compile runs on folders."""
    from tests.helpers import image_folders

    image_folders(tmp_path / "folders", {"cat": 6, "dog": 6}, {"cat": 2, "dog": 2})
    recipe = _recipe(tmp_path, "folders", "method = auto\n  candidates = [prune-uniform, low-rank]")
    recipe = variant(tmp_path, recipe, 'model {\n  classes = 2\n  input = [3, 8, 8]\n}\n'
                     f'data {{\n  dataset = imagenet\n  split = official\n  root = "{tmp_path / "folders"}"\n'
                     '  batch_size = 4\n'
                     '  augment = standard\n}\n', "folders-auto.cstar")
    data = cstar_dsl.datasets(check_file(recipe).spec)
    held = probe._evaluated(data.train, data.test)
    assert held.transform is data.test.transform and data.train.transform is not data.test.transform
    compiled = cstar_dsl.compile(recipe, tmp_path / "out")
    choice = compiled.report.structure_choice
    assert choice is not None and choice.holdout == 1 and len(choice.candidates) == 2
