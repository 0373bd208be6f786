"""Rewrite (cstar_dsl/model/rewrite.py, api.factorize): differential tests on real torchvision models.

At full rank a factorized layer computes exactly what the dense one does, so a model rewritten
from a plan whose every layer carries its full ranks must compute the original function. The
models are the CIFAR variants of resnet18, vgg16_bn and mobilenet_v2 (whose depthwise convs stay
dense), with their batch-norm statistics randomized so that every layer matters to the output.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from torch import fx, nn

from cstar_dsl import api
from cstar_dsl.lang.validate import load_spec
from cstar_dsl.model.factorized import LowRankLinear, Tucker2Conv2d
from cstar_dsl.plan.allocate import LayerPlan, Plan, factorized_params, full_ranks
from cstar_dsl.plan.layers import LayerInfo
from tests.helpers import DIGITS, SPECS, variant

# specs/resnet18-imagenet.cstar has no layer rule naming a ResNet layer, so MobileNet can take its settings
MOBILENET = ('model {\n  arch = "torchvision:mobilenet_v2"\n  classes = 10\n  input = [3, 32, 32]\n'
             "  stem = cifar\n}\n\ncompress {\n  budget = 2x params\n  keep = []\n  min_rank = 1\n}\n")


def _spec(arch: str, folder: Path):
    if arch == "resnet18":
        return load_spec(SPECS / "resnet18.cstar")
    if arch == "vgg16_bn":
        return load_spec(SPECS / "vgg16.cstar")
    return load_spec(variant(folder, SPECS / "resnet18-imagenet.cstar", MOBILENET, "mobilenet.cstar"))


def randomize_norms(model: nn.Module, seed: int = 1) -> None:
    """Random batch-norm affine parameters and running statistics (fresh ones are the identity)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.bias.normal_(0.0, 0.1, generator=generator)
                module.running_mean.normal_(0.0, 0.1, generator=generator)
                module.running_var.uniform_(0.5, 1.5, generator=generator)


def _info(layer: LayerPlan) -> LayerInfo:
    """The shape facts of a planned (ungrouped) layer, from its weight shape (positions unknown)."""
    kernel = tuple(layer.shape[2:]) if layer.type_name == "Conv2d" else (1, 1)
    return LayerInfo(layer.name, layer.type_name, layer.shape[1], layer.shape[0], kernel, 1, 1, 1, 1, ())


def at_full_rank(plan: Plan) -> Plan:
    """The same plan with every layer factorized at its full ranks, except grouped convs
    (``params_after`` updated; the MAC columns are left as they were)."""
    layers = []
    for layer in plan.layers:
        if layer.reason.startswith("grouped conv"):
            layers.append(layer)
            continue
        info = _info(layer)
        ranks = full_ranks(info)
        layers.append(dataclasses.replace(
            layer, ranks=ranks, method="tucker2" if info.is_conv else "svd", reason="full rank (test)",
            params_after=factorized_params(info, ranks)))
    return dataclasses.replace(plan, layers=tuple(layers))


@dataclasses.dataclass
class Rewritten:
    arch: str
    model: nn.Module
    plan: Plan
    graph: fx.GraphModule
    snapshot: dict[str, torch.Tensor]
    modules: dict[str, nn.Module]
    expected: torch.Tensor
    output: torch.Tensor


@pytest.fixture(scope="module", params=["resnet18", "vgg16_bn", "mobilenet_v2"])
def rewritten(request, tmp_path_factory) -> Rewritten:
    spec = _spec(request.param, tmp_path_factory.mktemp(request.param))
    torch.manual_seed(0)
    model = api.build_model(spec)
    randomize_norms(model)
    plan = at_full_rank(api.make_plan(spec, model))
    snapshot = {key: value.clone() for key, value in model.state_dict().items()}
    modules = dict(model.named_modules())
    graph = api.factorize(model, plan, spec)
    x = torch.randn(2, *spec.model.input, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, output = model(x), graph.eval()(x)
    return Rewritten(request.param, model, plan, graph, snapshot, modules, expected, output)


def test_full_rank_rewrite_computes_the_same_function(rewritten):
    assert rewritten.output.shape == rewritten.expected.shape == (2, 10)
    assert float(rewritten.expected.abs().max()) > 1e-2, "the output is too small for the test to mean anything"
    difference = float((rewritten.output - rewritten.expected).abs().max())
    assert difference <= 1e-4, f"{rewritten.arch}: max abs difference {difference:.3g}"


def test_the_callers_model_is_untouched(rewritten):
    state = rewritten.model.state_dict()
    assert state.keys() == rewritten.snapshot.keys()
    assert all(torch.equal(state[key], value) for key, value in rewritten.snapshot.items())
    modules = dict(rewritten.model.named_modules())
    assert modules.keys() == rewritten.modules.keys()
    assert all(modules[name] is module for name, module in rewritten.modules.items())
    assert not any(isinstance(m, (Tucker2Conv2d, LowRankLinear)) for m in rewritten.model.modules())
    shared = {p.data_ptr() for p in rewritten.graph.parameters()} & {p.data_ptr() for p in rewritten.model.parameters()}
    assert not shared, "the rewritten model shares weights with the caller's"


def test_the_graph_is_valid(rewritten):
    rewritten.graph.graph.lint()
    assert isinstance(rewritten.graph, fx.GraphModule)
    called = {node.target for node in rewritten.graph.graph.nodes if node.op == "call_module"}
    assert {layer.name for layer in rewritten.plan.layers} <= called


def test_layers_are_swapped_at_the_same_names(rewritten):
    factorized = {layer.name: layer for layer in rewritten.plan.layers if layer.ranks is not None}
    assert factorized
    for name, layer in factorized.items():
        module = rewritten.graph.get_submodule(name)
        original = rewritten.modules[name]
        if isinstance(original, nn.Conv2d):
            assert isinstance(module, Tucker2Conv2d) and module.ranks == layer.ranks
            assert (module.core.stride, module.core.padding) == (original.stride, original.padding)
        else:
            assert isinstance(module, LowRankLinear) and (module.rank,) == layer.ranks
    children = {f"{name}.{child}" for name, module in rewritten.graph.named_modules()
                if isinstance(module, (Tucker2Conv2d, LowRankLinear)) for child, _ in module.named_children()}
    after = {name for name, _ in rewritten.graph.named_modules() if name} - children
    before = {name for name, _ in rewritten.model.named_modules() if name}
    assert after <= before and {name for name in before if isinstance(rewritten.modules[name], (nn.Conv2d, nn.Linear))
                                } <= after


def test_untouched_layers_keep_their_type(rewritten):
    # fx turns containers into plain Modules; the modules the graph calls keep their own types.
    factorized = {layer.name for layer in rewritten.plan.layers if layer.ranks is not None}
    called = {node.target for node in rewritten.graph.graph.nodes if node.op == "call_module"} - factorized
    assert called
    for name in called:
        assert type(rewritten.graph.get_submodule(name)) is type(rewritten.modules[name]), name
    dense = [layer for layer in rewritten.plan.layers if layer.ranks is None]
    if rewritten.arch == "mobilenet_v2":
        assert len(dense) == 17 and all(layer.reason.startswith("grouped conv") for layer in dense)
        assert all(type(rewritten.graph.get_submodule(layer.name)) is nn.Conv2d for layer in dense)
    else:
        assert not dense


def test_parameter_count_matches_the_plan(rewritten):
    total = sum(p.numel() for p in rewritten.graph.parameters())
    assert total == rewritten.plan.params_after + rewritten.plan.other_params


# ------------------------------------------------------------ a real plan


def test_a_planned_resnet18_has_the_plans_parameter_count():
    spec = load_spec(SPECS / "resnet18.cstar")
    torch.manual_seed(0)
    model = api.build_model(spec)
    plan = api.make_plan(spec, model)
    graph = api.factorize(model, plan, spec)
    total = sum(p.numel() for p in graph.parameters())
    assert total == plan.params_after + plan.other_params
    assert 16 <= plan.params_before / plan.params_after
    assert total < sum(p.numel() for p in model.parameters()) / 10
    for layer in plan.layers:
        module = graph.get_submodule(layer.name)
        if layer.ranks is None:
            assert type(module) is type(model.get_submodule(layer.name))  # conv1 and fc are kept dense
        else:
            assert isinstance(module, Tucker2Conv2d) and module.ranks == layer.ranks
    assert isinstance(graph.get_submodule("conv1"), nn.Conv2d) and isinstance(graph.get_submodule("fc"), nn.Linear)
    with torch.no_grad():
        out = graph(torch.randn(1, 3, 32, 32))
    assert out.shape == (1, 10) and bool(torch.isfinite(out).all())


# ------------------------------------------------ small models: sweeps, leaves


class _Gate(nn.Module):
    """A module fx cannot trace: its forward branches on a tensor value."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) if x.sum() > 0 else -x


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.gate = _Gate()
        self.head = nn.Conv2d(8, 16, 3, stride=2)
        self.fc = nn.Linear(16 * 3 * 3, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.head(self.gate(torch.relu(self.stem(x)))), 1))


def test_leaf_modules_are_kept_whole_and_the_rest_factorized(tmp_path):
    from cstar_dsl.model import inventory
    from cstar_dsl.plan import allocate as planning

    leaf = 'model {\n  leaf = ["gate"]\n}\n\ncompress {\n  budget = 1.1x params\n  keep = []\n  hooi_sweeps = 2\n}\n'
    spec = load_spec(variant(tmp_path, DIGITS, leaf, "leaf.cstar"))
    torch.manual_seed(0)
    model = _Net().eval()
    found = inventory.collect(model, spec.model.input, spec.model.leaf)
    assert sorted(layer.name for layer in found.layers) == ["fc", "head", "stem"]  # gate.conv is inside the leaf
    plan = at_full_rank(planning.make_plan(spec, found.layers, found.other_params))
    graph = api.factorize(model, plan, spec)
    assert type(graph.get_submodule("gate")) is _Gate and type(graph.get_submodule("gate.conv")) is nn.Conv2d
    assert isinstance(graph.get_submodule("head"), Tucker2Conv2d)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(graph(x), model(x), rtol=1e-4, atol=1e-5)


def test_hooi_sweeps_from_the_spec_are_used():
    spec = load_spec(DIGITS)
    torch.manual_seed(0)
    model = api.build_model(spec)
    plan = api.make_plan(spec, model)
    swept = spec.model_copy(update={"compress": spec.compress.model_copy(update={"hooi_sweeps": 3})})
    plain, refined = api.factorize(model, plan, spec), api.factorize(model, plan, swept)
    improved = 0
    with torch.no_grad():
        for layer in plan.layers:
            if layer.method != "tucker2":
                continue
            dense = model.get_submodule(layer.name).weight
            errors = [float(torch.linalg.norm(g.get_submodule(layer.name).dense_weight() - dense))
                      for g in (plain, refined)]
            assert errors[1] <= errors[0] * (1 + 1e-5), (layer.name, errors)
            improved += errors[1] < errors[0] * (1 - 1e-4)
    assert improved, "HOOI sweeps changed nothing: were they passed on?"
