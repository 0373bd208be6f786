"""The joint structure (cstar_dsl/model/joint.py): channels pruned, then what the layers keep factorized; the plan's
cost model is the built model's, on resnet18, vgg16_bn, mobilenet_v2 and mnist-cnn, over budgets and splits."""

from __future__ import annotations

from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

from cstar_dsl import api
from cstar_dsl.lang import registry
from cstar_dsl.lang.problems import SpecProblem
from cstar_dsl.lang.spec import Spec
from cstar_dsl.lang.validate import load_spec
from cstar_dsl.model import inventory
from cstar_dsl.model.channel_cut import cut_channels
from cstar_dsl.model.channel_groups import channel_groups
from cstar_dsl.model.joint import Joint, channel_target, fisher_structure, joint_structure
from cstar_dsl.model.prune import kept_whole, output_layer, protected_modules, weight_params
from cstar_dsl.plan import allocate, robust
from cstar_dsl.plan.plans import Plan
from tests.helpers import SPECS, variant

MOBILENET = ('model {\n  arch = "torchvision:mobilenet_v2"\n  classes = 10\n  input = [3, 32, 32]\n'
             "  stem = cifar\n}\n\ncompress {\n  keep = []\n  min_rank = 1\n}\n")
# Each model's recipe, and the largest ratio its low-rank plan reaches (mobilenet_v2's depthwise convs stay dense).
MODELS = {"resnet18": (SPECS / "resnet18.cstar", "", 64), "vgg16_bn": (SPECS / "vgg16.cstar", "", 64),
          "mobilenet_v2": (SPECS / "resnet18-imagenet.cstar", MOBILENET, 16),
          "mnist-cnn": (SPECS / "mnist.cstar", "", 256)}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # pruning trials are many tiny ops; see tests/model/test_prune.py
    yield
    torch.set_num_threads(threads)


@cache
def _recipe(arch: str, ratio: int, folder: Path) -> Spec:
    base, extra, _ = MODELS[arch]
    recipe = variant(folder, base, extra, f"{arch}.cstar")
    return load_spec(variant(folder, recipe, f"compress {{\n  budget = {ratio}x params\n}}\n", f"{arch}-{ratio}.cstar"))


@cache
def _model(arch: str, folder: Path) -> nn.Module:
    torch.manual_seed(0)
    return api.build_model(_recipe(arch, 2, folder))


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(arch=st.sampled_from(sorted(MODELS)), data=st.data(), share=st.sampled_from(registry.JOINT_SHARES))
def test_a_joint_plan_costs_what_its_model_costs(tmp_path_factory: pytest.TempPathFactory, arch: str,
                                                 data: st.DataObject, share: int) -> None:
    folder = tmp_path_factory.getbasetemp()
    ratio = data.draw(st.integers(4, MODELS[arch][2]), label="ratio")
    spec, model = _recipe(arch, ratio, folder), _model(arch, folder)
    dense = inventory.collect(model, spec.model.input, spec.model.leaf)
    example = torch.zeros(1, *spec.model.input)
    try:
        low_rank = allocate.make_plan(spec, dense.layers, dense.other_params)
        joint = joint_structure(model, spec, low_rank, dense.layers, example, share / 100)
    except SpecProblem:  # the budget, or one side of the split, is out of reach; the candidate steps aside
        assume(False)
        raise
    built = joint.build(spec, decompose=False)
    measured = inventory.collect(built, spec.model.input, spec.model.leaf)
    # Exact: every removed channel counted in each layer it touches, in parameters and MACs.
    assert joint.plan.params_after == weight_params(built)
    assert joint.plan.macs_after == sum(layer.macs for layer in measured.layers)
    assert joint.plan.params_before == low_rank.params_before and joint.plan.macs_before == low_rank.macs_before
    # The budget is met, and not by a wide margin: channels take their share, the ranks fill the rest.
    assert 0.97 * low_rank.target <= joint.plan.params_after <= low_rank.target
    assert joint.pruned.params <= channel_target(low_rank, share / 100)
    pruned = {name: m.weight.shape for name, m in joint.pruned.model.named_modules()
              if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert [layer.name for layer in joint.plan.layers] == [layer.name for layer in dense.layers]
    for layer in joint.plan.layers:
        assert layer.shape_after == tuple(pruned[layer.name])
        assert (layer.ranks is None) == (layer.method in ("dense", "pruned"))
    head = next(name for name, m in model.named_modules() if m is output_layer(model, example))
    assert next(layer for layer in joint.plan.layers if layer.name == head).shape_after[0] == spec.model.classes
    assert any(layer.ranks and layer.shape_after != layer.shape for layer in joint.plan.layers)
    with torch.no_grad():
        assert built.eval()(torch.randn(2, *spec.model.input)).shape == (2, spec.model.classes)


def test_the_split_is_a_share_of_the_compression_on_a_log_scale() -> None:
    plan = allocate.Plan(policy="global", budget="64x params", metric="params", target=1000.0, layers=(
        allocate.LayerPlan("a", "Linear", (80, 800), "default", "svd", (1,), "", 64_000, 1_000, 64_000, 1_000, None),))
    assert channel_target(plan, 0.5) == 8_000  # 64x: 8x from channels, 8x left to ranks
    assert channel_target(plan, 0.25) == 22_627  # 64 ** 0.25 = 2.83x from channels
    assert [registry.channel_share(name) for name in ("joint", "joint-25", "joint-95", "joint-33", "low-rank")] == [
        0.5, 0.25, 0.95, None, None]


def _weight_scores(model: nn.Module, example: torch.Tensor, keep: list[str]) -> tuple[
        tuple[robust.ChannelGroup, ...], robust.Fisher]:
    """A stand-in for the driver's Fisher scores, a function of the weights alone: each channel scores its filter's
    squared L1 norm, each rank component its squared singular value."""
    groups = channel_groups(model, example, protected_modules(model, example, keep))
    weights = {name: m.weight.detach() for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    channels = {group.root: tuple(float(row.abs().sum()) ** 2 for row in weights[group.root]) for group in groups}
    modes = {name: tuple(tuple((torch.linalg.svdvals(w.transpose(0, mode).reshape(w.shape[mode], -1)) ** 2).tolist())
                         for mode in range(2 if w.dim() == 4 else 1)) for name, w in weights.items()}
    return groups, robust.Fisher(channels, modes)


def _check_joint_plan(joint: Joint, spec: Spec, model: nn.Module, budget: Plan) -> None:
    """The plan's totals are the built model's, the budget is met within 3%, the shapes are the pruned model's, and
    the output layer keeps its classes."""
    built = joint.build(spec, decompose=False)
    measured = inventory.collect(built, spec.model.input, spec.model.leaf)
    assert joint.plan.params_after == weight_params(built)
    assert joint.plan.macs_after == sum(layer.macs for layer in measured.layers)
    assert 0.97 * budget.target <= joint.plan.params_after <= budget.target
    pruned = {name: m.weight.shape for name, m in joint.pruned.model.named_modules()
              if isinstance(m, (nn.Conv2d, nn.Linear))}
    for layer in joint.plan.layers:
        assert layer.shape_after == tuple(pruned[layer.name])
    example = torch.zeros(1, *spec.model.input)
    head = next(name for name, m in model.named_modules() if m is output_layer(model, example))
    assert next(layer for layer in joint.plan.layers if layer.name == head).shape_after[0] == spec.model.classes
    # A cut replaying the counts (the ADMM phase's projection and its final cut) leaves the same widths.
    weights = {name: m.weight for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    cut = cut_channels(model, example, joint.pruned.pruning_ratio, weights, keep=kept_whole(spec, weights),
                       kept_counts=joint.pruned.kept_counts).apply(model)
    assert {name: m.weight.shape for name, m in cut.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))} == pruned
    with torch.no_grad():
        assert built.eval()(torch.randn(2, *spec.model.input)).shape == (2, spec.model.classes)


def _fisher_plan_checked(arch: str, ratio: int, folder: Path) -> None:
    """joint-fisher on ``arch`` at ``ratio``, planned to the budget's target as the compile plans it, checked."""
    spec, model = _recipe(arch, ratio, folder), _model(arch, folder)
    dense = inventory.collect(model, spec.model.input, spec.model.leaf)
    example = torch.zeros(1, *spec.model.input)
    budget = allocate.target_plan(spec, dense.layers, dense.other_params, "joint-fisher chooses it")
    keep = kept_whole(spec, (layer.name for layer in dense.layers))
    joint = fisher_structure(model, spec, budget, dense.layers, example,
                             lambda current: _weight_scores(current, example, keep))
    _check_joint_plan(joint, spec, model, budget)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ratio=st.integers(3, 300))
def test_a_fisher_plan_costs_what_its_model_costs(tmp_path_factory: pytest.TempPathFactory, ratio: int) -> None:
    _fisher_plan_checked("mnist-cnn", ratio, tmp_path_factory.getbasetemp())


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_a_fisher_plan_follows_residual_sums_and_depthwise_convs(tmp_path_factory: pytest.TempPathFactory,
                                                                 arch: str) -> None:
    _fisher_plan_checked(arch, 3, tmp_path_factory.getbasetemp())
