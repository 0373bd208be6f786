"""The robustness-aware allocation (cstar_dsl/plan/robust.py), on synthetic chains of convs whose pruning is simulated
exactly (a layer's outputs are the next layer's inputs): the budget is met within 3%, the barrier never empties a
layer, lower scores go first, and channels and ranks trade on one scale."""

from __future__ import annotations

import math
import random
from collections.abc import Mapping

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cstar_dsl.lang.problems import SpecProblem
from cstar_dsl.plan import robust
from cstar_dsl.plan.costs import factorized_params
from cstar_dsl.plan.layers import LayerInfo
from cstar_dsl.plan.robust import ChannelGroup, Fisher, Reach
from tests.plan.test_plan import spec

PROPERTY = settings(deadline=None, derandomize=True, max_examples=40, suppress_health_check=[HealthCheck.too_slow])


class Chain:
    """Convs c0 -> c1 -> ... -> a Linear head (the output layer, never pruned), each conv's outputs one group."""

    def __init__(self, widths: list[int], inputs: int = 3, classes: int = 10, positions: int = 16) -> None:
        self.widths, self.inputs, self.classes, self.positions = widths, inputs, classes, positions
        self.names = [f"features.{i}" for i in range(len(widths))]
        self.calls = 0

    def layers(self, counts: Mapping[str, int] | None = None) -> tuple[LayerInfo, ...]:
        counts = counts or {}
        kept = [counts.get(name, width) for name, width in zip(self.names, self.widths, strict=True)]
        ins = [self.inputs, *kept[:-1]]
        convs = [LayerInfo(name, "Conv2d", c_in, c_out, (3, 3), 1, 1, self.positions, self.positions, ())
                 for name, c_in, c_out in zip(self.names, ins, kept, strict=True)]
        head = LayerInfo("fc", "Linear", kept[-1], self.classes, (1, 1), 1, 1, 1, 1, (), produces_output=True)
        return (*convs, head)

    def measure(self, counts: Mapping[str, int]) -> tuple[LayerInfo, ...]:
        self.calls += 1
        return self.layers(counts)

    def groups(self) -> tuple[ChannelGroup, ...]:
        consumers = [*self.names[1:], "fc"]
        return tuple(ChannelGroup(name, width, (Reach(name, True, tuple(range(width))),
                                                Reach(after, False, tuple(range(width)))))
                     for name, after, width in zip(self.names, consumers, self.widths, strict=True))

    def fisher(self, rng: random.Random, channel_scale: float = 1.0, rank_scale: float = 1.0) -> Fisher:
        channels = {name: tuple(channel_scale * rng.expovariate(1) for _ in range(width))
                    for name, width in zip(self.names, self.widths, strict=True)}
        modes: dict[str, tuple[tuple[float, ...], ...]] = {}
        for layer in self.layers():
            sizes = (layer.out_features, layer.in_features) if layer.is_conv else (
                min(layer.out_features, layer.in_features),)
            modes[layer.name] = tuple(tuple(sorted((rank_scale * rng.expovariate(1) / (k + 1) for k in range(size)),
                                                   reverse=True)) for size in sizes)
        return Fisher(channels, modes)


def _cost(layers: tuple[LayerInfo, ...], ranks: Mapping[str, tuple[int, ...]]) -> int:
    return sum(factorized_params(layer, ranks[layer.name]) if layer.name in ranks else layer.params
               for layer in layers)


@PROPERTY
@given(widths=st.lists(st.integers(4, 48), min_size=2, max_size=5), ratio=st.sampled_from([2, 4, 8, 16, 32]),
       seed=st.integers(0, 2**16))
def test_the_budget_is_met_within_three_percent_and_no_layer_is_emptied(widths: list[int], ratio: int,
                                                                         seed: int) -> None:
    chain = Chain(widths)
    dense = chain.layers()
    target = sum(layer.params for layer in dense) / ratio
    compress = spec(budget=f"{ratio}x params", min_rank=1).compress
    try:
        allocation = robust.allocate(chain.groups(), chain.fisher(random.Random(seed)), dense, chain.measure,
                                     compress, target)
    except SpecProblem as problem:  # a tiny chain whose head alone is over the budget
        assert problem.code == "infeasible-budget"
        assert sum(layer.params for layer in dense if layer.name == "fc") + 9 * 3 * len(widths) > 0.5 * target
        return
    built = chain.layers(allocation.kept_counts)
    assert allocation.layers == built
    total = _cost(built, allocation.ranks)
    assert total <= target
    # Within 3% wherever a channel is a fine enough unit: the channels given back, then ranks, fill the rest.
    coarsest = max(max(saved) for saved in robust.channel_savings(chain.groups(), dense, "params").values())
    if coarsest <= 0.029 * target:
        assert total >= 0.97 * target
    assert all(1 <= count < width for name, width in zip(chain.names, widths, strict=True)
               if (count := allocation.kept_counts.get(name, width)) != width)
    assert built[-1].out_features == chain.classes and "fc" not in allocation.ranks  # its classes, at full rank
    for layer in built:
        ranks = allocation.ranks.get(layer.name)
        if ranks is not None:  # factorized only where it saves, and never past what pruning left
            assert factorized_params(layer, ranks) < layer.params
            assert all(1 <= r <= full for r, full in zip(ranks, (layer.out_features, layer.in_features)
                                                         if layer.is_conv else (min(layer.out_features,
                                                                                    layer.in_features),),
                                                         strict=True))


def test_channels_of_least_score_per_weight_saved_go_first() -> None:
    chain = Chain([16, 16])
    fisher = chain.fisher(random.Random(0))
    # The first layer's channels are worth a thousand times the second's: the second loses them.
    fisher = Fisher({"features.0": tuple(s * 1000 for s in fisher.channels["features.0"]),
                     "features.1": fisher.channels["features.1"]}, fisher.modes)
    dense = chain.layers()
    target = sum(layer.params for layer in dense) / 2
    allocation = robust.allocate(chain.groups(), fisher, dense, chain.measure, spec(budget="2x params").compress,
                                 target)
    assert allocation.kept_counts.get("features.1", 16) < allocation.kept_counts.get("features.0", 16)


@pytest.mark.parametrize(("channel_scale", "rank_scale"), [(1e6, 1.0), (1.0, 1e6)])
def test_a_channel_and_a_rank_trade_on_one_scale(channel_scale: float, rank_scale: float) -> None:
    """Channels a million times dearer than rank components: the budget is met by ranks; the reverse, by
    channels. The same chain and budget; only the scores move."""
    chain = Chain([32, 32, 32])
    dense = chain.layers()
    target = sum(layer.params for layer in dense) / 8
    fisher = chain.fisher(random.Random(1), channel_scale, rank_scale)
    allocation = robust.allocate(chain.groups(), fisher, dense, chain.measure, spec(budget="8x params").compress,
                                 target)
    removed = sum(width - allocation.kept_counts.get(name, width)
                  for name, width in zip(chain.names, chain.widths, strict=True))
    if channel_scale > rank_scale:
        assert allocation.ranks and removed < sum(chain.widths) // 4
    else:
        assert not allocation.ranks and removed > sum(chain.widths) // 2


def test_the_barrier_spares_a_layer_its_last_channels() -> None:
    """Equal scores everywhere: a price on their plain sum would empty the cheapest layer first; the barrier makes
    each further channel of a layer dearer, so every layer keeps a share."""
    chain = Chain([32, 32, 32])
    flat = Fisher({name: (1.0,) * 32 for name in chain.names},
                  {layer.name: tuple((1.0,) * n for n in ((32, layer.in_features) if layer.is_conv else (10,)))
                   for layer in chain.layers()})
    dense = chain.layers()
    target = sum(layer.params for layer in dense) / 16
    compress = spec(budget="16x params", rules=(('"features.*"', ("dense = true",)),)).compress
    allocation = robust.allocate(chain.groups(), flat, dense, chain.measure, compress, target)
    assert min(allocation.kept_counts.get(name, 32) for name in chain.names) >= 4


def test_a_budget_no_removal_reaches_names_the_largest_reachable_ratio() -> None:
    chain = Chain([4, 4])
    dense = chain.layers()
    with pytest.raises(SpecProblem) as raised:
        robust.allocate(chain.groups(), chain.fisher(random.Random(0)), dense, chain.measure,
                        spec(budget="1000x params").compress, sum(layer.params for layer in dense) / 1000)
    assert raised.value.code == "infeasible-budget" and "largest reachable ratio" in raised.value.message


def test_the_barrier_loss_is_fishers_sum_for_small_removals_and_grows_without_bound() -> None:
    assert math.isclose(robust.barrier_loss(100.0, 0.01), 0.01, rel_tol=1e-3)
    assert robust.barrier_loss(100.0, 99.0) > 4 * 99.0
    assert robust.barrier_loss(0.0, 0.0) == 0.0


def test_savings_count_every_row_and_column_a_channel_takes() -> None:
    chain = Chain([8, 16])
    savings = robust.channel_savings(chain.groups(), chain.layers(), "params")
    assert savings["features.0"] == (3 * 9 + 16 * 9,) * 8  # its filter, and the next conv's input column
    assert savings["features.1"] == (8 * 9 + 10,) * 16  # its filter, and the classifier's input column
    macs = robust.channel_savings(chain.groups(), chain.layers(), "macs")
    assert macs["features.0"] == ((3 * 9 + 16 * 9) * 16,) * 8


def test_no_layer_goes_below_its_floor() -> None:
    chain = Chain([32, 32, 32])
    dense = chain.layers()
    target = sum(layer.params for layer in dense) / 32
    fisher = chain.fisher(random.Random(2))
    allocation = robust.allocate(chain.groups(), fisher, dense, chain.measure, spec(budget="32x params").compress,
                                 target, floors={"features.1": 12})
    assert allocation.kept_counts.get("features.1", 32) >= 12
    free = robust.allocate(chain.groups(), fisher, dense, chain.measure, spec(budget="32x params").compress, target)
    assert free.kept_counts.get("features.1", 32) < 12  # the floor bound: without it the layer loses more


def test_a_rules_fixed_ranks_keep_the_channels_they_need() -> None:
    """Pruning the layer, or the one that feeds it, below a rule's fixed ranks would make them unbuildable: the
    allocation keeps both wide enough, and the layer at its ranks."""
    chain = Chain([32, 32, 32])
    dense = chain.layers()
    target = sum(layer.params for layer in dense) / 8
    compress = spec(budget="8x params", rules=(('"features.1"', ("rank = [12, 10]",)),)).compress
    allocation = robust.allocate(chain.groups(), chain.fisher(random.Random(3)), dense, chain.measure, compress,
                                 target)
    assert allocation.ranks["features.1"] == (12, 10)
    assert allocation.kept_counts.get("features.1", 32) >= 12 and allocation.kept_counts.get("features.0", 32) >= 10
    assert _cost(chain.layers(allocation.kept_counts), allocation.ranks) <= target
