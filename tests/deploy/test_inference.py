"""cstar_dsl.deploy.inference: optimize_for_inference keeps the function (max abs diff <= 1e-4) while it
folds batch norms, merges redundant 1x1 convs and lowers module calls to function calls."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import fx, nn

import cstar_dsl
from cstar_dsl.deploy import inference
from cstar_dsl.deploy.inference import InferenceReport, optimize_for_inference, to_torchscript
from cstar_dsl.model.factorized import LowRankLinear, Tucker2Conv2d
from tests.helpers import DIGITS

TOLERANCE = 1e-4


def _bn(channels: int) -> nn.BatchNorm2d:
    """A batch norm with non-trivial statistics and affine parameters, as after training."""
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.2, 0.2)
    return bn


class Block(nn.Module):
    """A ResNet basic block with a strided 1x1 shortcut, every conv in Tucker-2 form."""

    def __init__(self, c_in: int, c_out: int, ranks: tuple[int, int], shortcut_ranks: tuple[int, int]) -> None:
        super().__init__()
        self.conv1 = Tucker2Conv2d(nn.Conv2d(c_in, c_out, 3, 2, 1, bias=False), ranks)
        self.bn1 = _bn(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = Tucker2Conv2d(nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), (c_out, c_out))  # full rank
        self.bn2 = _bn(c_out)
        self.downsample = nn.Sequential(Tucker2Conv2d(nn.Conv2d(c_in, c_out, 1, 2, bias=False), shortcut_ranks),
                                        _bn(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.downsample(x))


class Small(nn.Module):
    """Conv-BN-ReLU, max pool, a residual block, a Tucker-2 conv with a bias, pooling and a low-rank head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = _bn(8)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.block = Block(8, 16, (5, 6), (3, 4))
        self.last = Tucker2Conv2d(nn.Conv2d(16, 16, 3, padding=1, bias=True), (16, 7))  # full output rank
        self.head_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = LowRankLinear(16, 10, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu(self.bn(self.stem(x))))
        x = self.last(self.block(x))
        return self.fc(torch.flatten(self.head_pool(x), 1))


def _randomized(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                module.weight.normal_(0, (2 / module.weight[0].numel()) ** 0.5)
                if module.bias is not None:
                    module.bias.uniform_(-0.1, 0.1)
    return model.eval()


def _max_difference(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    with torch.inference_mode():
        return (a(x) - b(x)).abs().max().item()


@pytest.fixture
def small() -> nn.Module:
    return _randomized(Small())


@pytest.mark.parametrize("batch", [1, 3])
def test_outputs_unchanged(small, batch):
    x = torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    fast = optimize_for_inference(small)
    with torch.inference_mode():
        assert small(x).abs().max().item() > 0.1  # a non-trivial output to compare
    assert _max_difference(fast, small, x) <= TOLERANCE


def test_every_pass_runs_and_the_graph_is_flat(small):
    report = InferenceReport()
    fast = optimize_for_inference(small, report=report)
    assert report.folded_bn == 4  # stem, block.bn1, block.bn2, the shortcut's
    # the shortcut's 1x1 -> strided 1x1 pair; conv2's square compress and expand; last's square expand
    assert report.merged == 4
    assert isinstance(fast, fx.GraphModule)
    modules = {type(m) for m in fast.modules()}
    assert not modules & {nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.Linear, Tucker2Conv2d}
    calls = [n.target for n in fast.graph.nodes if n.op == "call_function"]
    # stem 1, conv1 3, conv2 1 (full rank: one k x k conv), shortcut 2, last 2 (compress + core);
    # the 1x1 convs (conv1's compress and expand, the shortcut's two, last's compress) as products,
    # conv1's strided 5 -> 6 core channels-last
    assert calls.count(torch.conv2d) == 3 and calls.count(inference._pointwise_conv) == 5
    assert calls.count(inference._channels_last_conv) == 1
    assert "merged" in report.summary()


@pytest.mark.parametrize("channels", [8, inference.NARROW_STRIDED + 1])
def test_only_narrow_strided_convs_run_channels_last(channels):
    model = _randomized(nn.Sequential(nn.Conv2d(4, channels, 3, stride=2, padding=1), nn.ReLU(),
                                      nn.Conv2d(channels, 5, 1), nn.Conv2d(5, 3, 3, padding=1)))
    fast = optimize_for_inference(model)
    calls = [n.target for n in fast.graph.nodes if n.op == "call_function"]
    narrow = channels <= inference.NARROW_STRIDED
    assert calls.count(inference._channels_last_conv) == int(narrow)
    assert calls.count(torch.conv2d) == 1 + int(not narrow)  # the unstrided 3x3 conv stays NCHW
    x = torch.randn(2, 4, 15, 15, generator=torch.Generator().manual_seed(3))  # odd size: padding at the edge
    assert _max_difference(fast, model, x) <= TOLERANCE
    assert _max_difference(to_torchscript(model, x[:1]), model, x) <= TOLERANCE


@pytest.mark.parametrize("shape", [(1, 4, 8, 8), (3, 5, 7, 9), (2, 1, 2, 3), (4, 6, 5)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_the_2x2_max_pool_gives_the_pools_values(shape, channels_last):
    x = torch.randint(-3, 4, shape, generator=torch.Generator().manual_seed(5)).float()  # many ties
    x[(0,) * len(shape)] = float("nan")
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    expected = nn.functional.max_pool2d(x, 2)
    assert torch.equal(inference._max_pool_2x2(x).isnan(), expected.isnan())
    assert torch.equal(inference._max_pool_2x2(x).nan_to_num(), expected.nan_to_num())


@pytest.mark.parametrize(("pool", "lowered"), [
    (nn.MaxPool2d(2), "_max_pool_2x2"),
    (nn.MaxPool2d((2, 2), stride=2), "_max_pool_2x2"),
    (nn.MaxPool2d(3, 2, 1), "_max_pool"),
    (nn.MaxPool2d(2, ceil_mode=True), "_max_pool"),
    (nn.MaxPool2d(2, 1), "_max_pool"),
])
def test_max_pools_are_lowered_to_their_fast_forms(pool, lowered):
    model = _randomized(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), pool, nn.Conv2d(8, 4, 1)))
    fast = optimize_for_inference(model)
    calls = [n.target for n in fast.graph.nodes if n.op == "call_function"]
    assert getattr(inference, lowered) in calls
    for size in (16, 15):  # odd: a 2x2 pool drops the last row and column; ceil_mode keeps them
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
        assert _max_difference(fast, model, x) <= TOLERANCE
        assert _max_difference(to_torchscript(model, x[:1, :, :16, :16]), model, x) <= TOLERANCE


def test_identities_and_dropouts_go():
    model = _randomized(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Identity(), nn.Dropout(0.5), nn.Flatten(),
                                      nn.Dropout(0.2), nn.Linear(4 * 6 * 6, 2)))
    fast = optimize_for_inference(model)
    assert not {type(m) for m in fast.modules()} & {nn.Identity, nn.Dropout}
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(7))
    assert _max_difference(fast, model, x) <= TOLERANCE


class _Unpool(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.MaxPool2d(2, return_indices=True)
        self.unpool = nn.MaxUnpool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values, indices = self.pool(x)
        return self.unpool(values, indices)


def test_a_max_pool_returning_indices_stays_a_module():
    model = _Unpool().eval()
    fast = optimize_for_inference(model)
    assert isinstance(fast.get_submodule("pool"), nn.MaxPool2d)
    x = torch.randn(1, 2, 6, 6, generator=torch.Generator().manual_seed(6))
    assert _max_difference(fast, model, x) == 0


@pytest.mark.parametrize("options", [{"fold_bn": False}, {"merge": False}, {"lower": False}, {"matmul_1x1": False},
                                     {"fold_bn": False, "merge": False, "lower": False}])
def test_each_pass_alone_keeps_the_function(small, options):
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    assert _max_difference(optimize_for_inference(small, **options), small, x) <= TOLERANCE


def test_model_left_untouched(small):
    before = copy.deepcopy(small.state_dict())
    optimize_for_inference(small)
    after = small.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert isinstance(small.block.conv2, Tucker2Conv2d) and isinstance(small.bn, nn.BatchNorm2d)


def test_low_rank_chain_is_not_merged_back_to_dense():
    """Merging a rank-2 1x1 chain 16 -> 2 -> 16 would multiply its MACs by 4: it stays two convs."""
    model = nn.Sequential(nn.Conv2d(16, 2, 1, bias=False), nn.Conv2d(2, 16, 1)).eval()
    report = InferenceReport()
    fast = optimize_for_inference(model, report=report)
    assert report.merged == 0
    x = torch.randn(1, 16, 5, 5)
    assert _max_difference(fast, model, x) <= TOLERANCE


def test_strided_one_by_one_conv_subsamples_first():
    model = nn.Sequential(nn.Conv2d(4, 6, 1, stride=2)).eval()
    fast = optimize_for_inference(model)
    for size in (7, 8):  # odd sizes keep the last row and column, as the strided conv does
        x = torch.randn(2, 4, size, size)
        assert _max_difference(fast, model, x) <= TOLERANCE


class Clashing(nn.Module):
    """Two convs whose qualified names, "a.b_c" and "a_b.c", flatten to the same attribute name."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.a_b = nn.Module(), nn.Module()
        self.a.b_c = nn.Conv2d(4, 5, 1)
        self.a_b.c = nn.Conv2d(5, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a_b.c(self.a.b_c(x))


@pytest.mark.parametrize("matmul_1x1", [True, False])  # False: both convs lower to "weight" and "bias"
def test_unbatched_input_and_clashing_names(matmul_1x1):
    model = _randomized(Clashing())
    fast = optimize_for_inference(model, matmul_1x1=matmul_1x1)
    for x in (torch.randn(4, 6, 6), torch.randn(2, 4, 6, 6)):  # Conv2d also takes C x H x W
        assert _max_difference(fast, model, x) <= TOLERANCE


def test_factorized_recipe_model():
    """The whole pipeline on the digits recipe: load, build, plan, factorize, optimize."""
    spec = cstar_dsl.load_spec(DIGITS)
    torch.manual_seed(0)
    model = cstar_dsl.build_model(spec)
    for module in model.modules():  # trained-looking batch norm statistics
        if isinstance(module, nn.BatchNorm2d):
            with torch.no_grad():
                module.running_var.uniform_(0.5, 2.0)
                module.running_mean.uniform_(-0.3, 0.3)
    factorized = cstar_dsl.factorize(model, cstar_dsl.make_plan(spec, model), spec).eval()
    report = InferenceReport()
    fast = optimize_for_inference(factorized, leaves=spec.model.leaf, report=report)
    assert report.folded_bn > 0
    x = torch.randn(4, *spec.model.input, generator=torch.Generator().manual_seed(3))
    assert _max_difference(fast, factorized, x) <= TOLERANCE


def test_torchscript_export_keeps_the_function_at_any_batch_size(small):
    scripted = to_torchscript(small, torch.randn(1, 3, 16, 16))
    assert isinstance(scripted, torch.jit.ScriptModule)
    for batch in (1, 3):
        x = torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(4))
        assert _max_difference(scripted, small, x) <= TOLERANCE
