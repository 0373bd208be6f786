"""Optimize stage, channel-prune baseline: L1 or Taylor filter pruning (Torch-Pruning) at a matched parameter budget."""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from ..lang.problems import SpecProblem
from ..lang.spec import Spec
from ..plan.layers import LayerInfo
from ..plan.plans import LayerPlan, Plan
from ..plan.rules import channel_floors, kept_by
from .channel_groups import channel_groups
from .factorized import conv_geometry
from .inventory import collect, replace_module

_WEIGHTED = (nn.Conv2d, nn.Linear)
# Torch-Pruning keeps int(C * (1 - ratio)) channels; nudging the kept share up by far less than 1/C makes an exact
# k/C share floor to k instead of k - 1 through rounding error.
_NUDGE = 1e-9


@dataclass(frozen=True)
class Pruned:
    model: nn.Module  # a pruned deep copy; the caller's model is left untouched
    pruning_ratio: float  # the per-layer share of channels removed
    params: int  # weight_params(model) after pruning
    # (name, outputs kept) of the layers whose count is not the share's: a uniform prune's layers rounded up to fill
    # the budget, or, from widths_of, every pruned layer of a prune no one share describes (a global ranking).
    kept_counts: tuple[tuple[str, int], ...] = ()


def weight_params(model: nn.Module) -> int:
    """Weights of every Conv2d and Linear (biases left out, as in cstar's compression ratio), groups-aware."""
    # weight.numel() already divides the input channels by the conv's groups.
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, _WEIGHTED))


def channel_prune(model: nn.Module, example_input: torch.Tensor, target_params: int, *,
                  keep: Iterable[str] = (), allocation: str = "uniform", importance: str = "l1",
                  floors: Mapping[str, int] | None = None) -> Pruned:
    """A pruned model with weight_params(pruned) <= target_params, as close to it as the allocation allows: the
    smallest pruning ratio that fits, by bisection.

    ``uniform`` removes the same share of every layer's channels (Li et al.), then rounds some layers' counts up
    to fill the budget (see _widen); ``global`` ranks the channels of all
    layers together by their mean-normalized scores (Torch-Pruning's global pruning), so layers lose different shares.
    A channel's score is its filters' L1 norm (``l1``), or the first-order Taylor estimate |weight x gradient| of the
    loss change on removing it (``taylor``, Molchanov et al.): the caller leaves that loss's gradients on ``model``.
    No layer named in ``floors`` keeps fewer outputs than its floor (the recipe's `min_channels`).
    """
    template = copy.deepcopy(model)
    if weight_params(template) <= target_params:
        return Pruned(template, 0.0, weight_params(template))
    protected = protected_modules(template, example_input, keep)
    if importance == "taylor":
        if any(p.grad is None for p in model.parameters() if p.requires_grad):
            raise ValueError("Taylor importance needs the loss's gradients on the model's parameters")
        for copied, original in zip(template.parameters(), model.parameters(), strict=True):
            copied.grad = original.grad.detach().clone() if original.grad is not None else None
    if allocation == "global":
        return _global_prune(_Trials(template, example_input, protected, global_pruning=True, importance=importance,
                                     floors=floors), target_params)
    shares = _kept_shares(template, protected)
    trial = _Trials(template, example_input, protected, importance=importance, floors=floors)
    smallest = trial(shares[0]) if shares else Pruned(template, 0.0, weight_params(template))
    if smallest.params > target_params:
        raise _infeasible(smallest, target_params)
    # Invariant: shares[low] fits the budget, shares[high] does not (index len(shares) is the unpruned model). Each
    # share is a breakpoint where some layer's kept channel count changes, so bisecting over them finds the smallest
    # pruning ratio that fits in about log2(len(shares)) trials (9 for resnet18), and every trial is a distinct model.
    low, high, best = 0, len(shares), smallest
    while high - low > 1:
        mid = (low + high) // 2
        pruned = trial(shares[mid])
        if pruned.params <= target_params:
            low, best = mid, pruned
        else:
            high = mid
    return _widen(trial, best, shares[low], target_params)


# A uniform share below this share of the budget is filled by raising layers; if the layers in the order they run
# still leave it unfilled, they are packed again, the largest raises first.
_FILL = 0.97


def _widen(trial: _Trials, pruned: Pruned, share: Fraction, target_params: int) -> Pruned:
    """``pruned`` with some layers given one output more than ``share`` keeps while the budget allows: every layer
    keeps its share of channels rounded down or up, so the prune stays uniform and fills the budget.

    The next share can add a channel to every layer at once (k/32 of a 32-wide layer is 2k/64 of a 64-wide one),
    which on a network of doubling widths overshoots the budget by a large part of it: 19% of it at 256x on
    mnist-cnn. A share within 3% of the budget is kept as it is. Otherwise layers are raised in the order they
    run; if that leaves more than 3% of the budget unused (a cheap early raise can block a costly one that fits
    only alone), the raises are packed largest first."""
    if pruned.params >= _FILL * target_params:
        return pruned  # close enough: each raise is a pruning trial, and a deep network has many layers
    raises = [(name, count) for name, width in trial.prunable if (count := _kept(share, width) + 1) <= width]
    filled = _raised(trial, pruned, share, target_params, raises)
    if filled.params >= _FILL * target_params:
        return filled
    costs = {name: trial(share, {name: count}).params for name, count in raises}
    largest_first = sorted(raises, key=lambda raise_: costs[raise_[0]], reverse=True)
    return max(filled, _raised(trial, pruned, share, target_params, largest_first), key=lambda p: p.params)


def _raised(trial: _Trials, pruned: Pruned, share: Fraction, target_params: int,
            raises: Sequence[tuple[str, int]]) -> Pruned:
    """``pruned`` with each of ``raises`` (a layer and its count of outputs) taken, in turn, where it still fits."""
    counts: dict[str, int] = {}
    for name, count in raises:
        wider = trial(share, {**counts, name: count})
        # No change: the layer's channels are coupled to other layers' (a residual sum), and the group's count
        # follows another member's ratio.
        if wider.params <= target_params and wider.params != pruned.params:
            counts[name], pruned = count, wider
    return pruned


def _kept(share: Fraction, width: int) -> int:
    """The outputs a ``width``-wide layer keeps at a kept ``share`` (Torch-Pruning's rounding, see _NUDGE)."""
    return int(width * (1 - torch_pruning_ratio(float(1 - share))))


def prune_to_plan(model: nn.Module, spec: Spec, plan: Plan, example_input: torch.Tensor, *,
                  allocation: str = "uniform", importance: str = "l1") -> Pruned:
    """``model`` channel-pruned to the parameters ``plan`` leaves: the layers the recipe's `compress.keep` names,
    and those a `keep` rule leaves dense, stay whole; no layer goes below its `min_channels`."""
    kept = kept_whole(spec, (layer.name for layer in plan.layers))
    return channel_prune(model, example_input, plan.params_budget, keep=kept, allocation=allocation,
                         importance=importance, floors=floors_of(spec, plan))


def floors_of(spec: Spec, plan: Plan) -> dict[str, int]:
    """Each layer's `min_channels` (plan.rules.channel_floors) by the plan's layers."""
    return channel_floors(spec.compress, [(layer.name, layer.type_name, layer.shape[0]) for layer in plan.layers])


def kept_whole(spec: Spec, layer_names: Iterable[str]) -> list[str]:
    """The modules no channel pruning touches: the layers `compress.keep` matches (names or globs), and an exact
    name there that is a container module."""
    exact = {name for name in spec.compress.keep if not any(ch in name for ch in "*?[")}
    return sorted(exact | {name for name in layer_names if kept_by(spec.compress, name) is not None})


def admm_channels_rule(allocation: str) -> str:
    """The rule a layer of cstar's ADMM onto channels names, by how the channel counts were spread."""
    return f"cstar ADMM onto channels ({allocation})"


def widths_of(model: nn.Module, pruned: Pruned) -> Pruned:
    """``pruned`` described by every layer's count of outputs rather than by a share: what a cut replays for a prune
    that is not uniform (a global ranking), where no one share gives each layer its count."""
    dense = {name: _out_channels(m) for name, m in model.named_modules() if isinstance(m, _WEIGHTED)}
    kept = tuple((name, _out_channels(m)) for name, m in pruned.model.named_modules()
                 if isinstance(m, _WEIGHTED) and _out_channels(m) < dense[name])
    return replace(pruned, pruning_ratio=0.0, kept_counts=kept)


def prune_rule(importance: str, allocation: str) -> str:
    """The rule a pruned layer's plan names: how its channels were scored and spread."""
    return f"channel-prune ({'L1' if importance == 'l1' else 'Taylor'}, {allocation})"


def pruned_plan(plan: Plan, before: Sequence[LayerInfo], pruned: Pruned, spec: Spec, rule: str,
                allocation: str) -> Plan:
    """``plan`` as pruning carried it out: every layer's channels, params and MACs after, measured on the pruned
    model, so the totals are the built model's."""
    after = {layer.name: layer for layer in collect(pruned.model, spec.model.input, spec.model.leaf).layers}
    floors = floors_of(spec, plan)
    # A layer whose outputs stay whole (kept, or the output layer) keeps the rule that said so; see kept_whole.
    whole = {entry.name: entry.rule for entry in plan.layers if (new := after.get(entry.name)) is not None
             and new.shape[0] == entry.shape[0]}
    layers = tuple(_pruned_layer(layer, after.get(layer.name), whole.get(layer.name, rule),
                                 _pruned_reason(layer, after.get(layer.name), pruned, allocation,
                                                floors.get(layer.name)))
                   for layer in before)
    return replace(plan, layers=layers)


def _pruned_layer(layer: LayerInfo, new: LayerInfo | None, rule: str, reason: str) -> LayerPlan:
    """A layer as pruning left it: ``new`` is None when no channel of it is left."""
    return LayerPlan(name=layer.name, type_name=layer.type_name, shape=tuple(layer.shape), rule=rule,
                     method="dense" if new and new.params == layer.params else "pruned", ranks=None, reason=reason,
                     params_before=layer.params, params_after=new.params if new else 0, macs_before=layer.macs,
                     macs_after=new.macs if new else 0, energy_kept=None,
                     shape_after=tuple(new.shape) if new else None)


def _pruned_reason(before: LayerInfo, after: LayerInfo | None, pruned: Pruned, allocation: str,
                   floor: int | None) -> str:
    kept = after.shape[0] if after is not None else 0
    if floor is not None and kept == floor < before.shape[0]:
        return f"{kept} of {before.shape[0]} outputs kept: its `min_channels`"
    if allocation == "fisher":
        return f"{kept} of {before.shape[0]} outputs kept (Fisher on the adversarial loss, per weight saved)"
    if allocation != "uniform":
        return f"{kept} of {before.shape[0]} outputs kept (the channels of all layers ranked together)"
    if before.name in dict(pruned.kept_counts):
        return (f"{kept} of {before.shape[0]} outputs kept: the uniform share ({pruned.pruning_ratio:.1%} removed) "
                "rounded up, to fill the budget")
    return f"{pruned.pruning_ratio:.1%} of channels removed"


# A scan in steps of this share finds where the budget is met; bisection then refines it.
_GLOBAL_SCAN_STEP = Fraction(1, 20)
_GLOBAL_BISECTIONS = 16


def _global_prune(trial: _Trials, target_params: int) -> Pruned:
    """The smallest global pruning ratio that meets the budget (see _global_search), the layers the ranking would
    take below their floor (`min_channels`) held at it and the rest ranked again, until none is below."""
    fixed: dict[str, int] = {}
    while True:
        pruned = _global_search(trial, target_params, fixed)
        widths = {name: _out_channels(m) for name, m in pruned.model.named_modules() if isinstance(m, _WEIGHTED)}
        below = {name: floor for name, floor in trial.floors.items() if name in widths and widths[name] < floor}
        if not below:
            return pruned
        if below.items() <= fixed.items():  # held at its floor and still below: the groups' counts do not apply
            raise RuntimeError(f"the global ranking cannot hold {', '.join(sorted(below))} at their floors")
        fixed.update(below)


def _global_search(trial: _Trials, target_params: int, fixed: Mapping[str, int]) -> Pruned:
    """The smallest global pruning ratio (the share of all prunable channels removed) that meets the budget, the
    layers of ``fixed`` keeping their counts.

    Params fall as the ratio grows only until the threshold would empty a layer: Torch-Pruning then skips that layer
    whole, and the model grows again. So a forward scan stops at the first ratio that fits (or where params stop
    falling), and bisection refines the last step, inside the region where params are monotone."""
    low, smallest = Fraction(0), None
    while (high := low + _GLOBAL_SCAN_STEP) < 1:
        pruned = trial(1 - high, fixed)
        if smallest is not None and pruned.params >= smallest.params:
            break  # past the monotone region
        smallest = pruned
        if pruned.params <= target_params:
            break
        low = high
    if smallest is None or smallest.params > target_params:
        raise _infeasible(smallest or trial(1 - _GLOBAL_SCAN_STEP, fixed), target_params)
    best = smallest
    for _ in range(_GLOBAL_BISECTIONS):
        mid = (low + high) / 2
        pruned = trial(1 - mid, fixed)
        if pruned.params <= target_params:
            high, best = mid, pruned
        else:
            low = mid
    return best


def _infeasible(smallest: Pruned, target_params: int) -> SpecProblem:
    return SpecProblem(
        ("compress", "budget"), "infeasible-budget",
        f"channel pruning reaches no fewer than {smallest.params:,} weight parameters (removing "
        f"{smallest.pruning_ratio:.1%} of the channels), above the budget of {target_params:,}",
        help=f"raise the budget to at least {smallest.params:,} parameters, or keep fewer layers unpruned (`keep`, "
             "`min_channels`)",
    )


def resize_to(model: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """In place: replace Conv2d, Linear and BatchNorm2d modules whose shapes differ from `state`'s tensors (keys are
    state_dict keys like `features.0.weight`) with fresh modules of the state's shapes, same hyperparameters (kernel,
    stride, padding, dilation, bias presence, groups scaled for depthwise, eps, momentum, affine), so that
    `model.load_state_dict(state)` then works. Used to rebuild a pruned model from a checkpoint or artifact without
    re-running the pruner. Returns model."""
    for name, module in list(model.named_modules()):
        fresh = _resized(module, name, state)
        if fresh is not None:
            replace_module(model, name, fresh)
    return model


class _Trials:
    """One-shot pruning of a fresh deep copy per kept share: Torch-Pruning cannot undo or redo a pruning step."""

    def __init__(self, template: nn.Module, example_input: torch.Tensor, protected: list[nn.Module], *,
                 global_pruning: bool = False, importance: str = "l1",
                 scores: Mapping[str, Sequence[float]] | None = None, floors: Mapping[str, int] | None = None) -> None:
        self.template, self.example_input = template, example_input
        self.protected_names = [_name(template, m) for m in protected]
        self.global_pruning, self.importance, self.scores = global_pruning, importance, scores
        self.protected = protected
        self.floors = dict(floors or {})

    def counts(self, share: Fraction, kept_counts: Mapping[str, int] | None) -> dict[str, int]:
        """``kept_counts``, with every floored layer raised to its floor where the count (or, uniform, the share's)
        is below it; a global ranking's layers have no share, so only the counts given are raised. Layers whose
        outputs are removed together (a residual sum) all take the highest count among them: Torch-Pruning prunes
        such a group by one member's count."""
        counts = dict(kept_counts or {})
        if not self.floors:
            return counts
        widths = dict(self.prunable)
        for name, floor in self.floors.items():
            if name not in widths:
                continue
            count = counts.get(name, widths[name] if self.global_pruning else _kept(share, widths[name]))
            if count < floor or name in counts:
                counts[name] = max(count, floor)
        for members in self.coupled:
            highest = max((counts[name] for name in members if name in counts), default=None)
            if highest is not None:
                counts.update({name: highest for name in members})
        return counts

    @functools.cached_property
    def coupled(self) -> list[list[str]]:
        """The layers whose outputs each of Torch-Pruning's dependency groups removes together (two or more)."""
        groups = channel_groups(self.template, self.example_input, self.protected)
        members = [[reach.layer for reach in group.reach if reach.removes_outputs] for group in groups]
        return [names for names in members if len(names) > 1]

    @functools.cached_property
    def prunable(self) -> list[tuple[str, int]]:
        """(name, outputs) of every layer a share can shrink, in the order the layers run."""
        skip = {id(sub) for m in self.protected for sub in m.modules()}
        return [(_name(self.template, m), _out_channels(m)) for m in forward_order(self.template, self.example_input)
                if id(m) not in skip and _out_channels(m) > 1]

    def __call__(self, share: Fraction, kept_counts: Mapping[str, int] | None = None) -> Pruned:
        kept_counts = self.counts(share, kept_counts)
        model = copy.deepcopy(self.template)
        for copied, original in zip(model.parameters(), self.template.parameters(), strict=True):
            # deepcopy drops gradients; Taylor scores read them (a copy each: the pruner slices them with the weights).
            copied.grad = None if original.grad is None else original.grad.clone()
        ignored = [model.get_submodule(name) for name in self.protected_names]
        ratio = torch_pruning_ratio(float(1 - share))
        # Li et al. rank filters by L1 norm within each layer; a uniform per-layer ratio (no global ranking) is their
        # setting and never empties a layer. Torch-Pruning's group mean also scores channels that residual additions
        # couple by every layer they touch, not by one arbitrary root layer.
        # Across layers the scores must be comparable, so global ranking divides each layer's by its mean.
        normalizer = "mean" if self.global_pruning else None
        importance: tp.importance.Importance
        if self.scores is not None:
            importance = _GivenScores(model, self.scores)
        elif self.importance == "taylor":
            importance = tp.importance.TaylorImportance(group_reduction="mean", normalizer=normalizer)
        else:
            importance = tp.importance.MagnitudeImportance(p=1, group_reduction="mean", normalizer=normalizer)
        # The dependency graph is traced with autograd, so it needs grad even if the caller runs under no_grad.
        with torch.enable_grad(), warnings.catch_warnings():
            # Torch-Pruning warns about cases it then handles itself (unwrapped parameters it prunes along their last
            # dimension, a recursion cap in shape inference); those are notes for its own users, and warnings are
            # errors in cstar's tests. Only its own warnings are silenced: torch's still surface.
            warnings.filterwarnings("ignore", module=r"torch_pruning\.")
            # MetaPruner (an alias of BasePruner in 1.6) is the name every torch-pruning release >= 1.4 has.
            pruner = tp.pruner.MetaPruner(model, self.example_input, importance=importance,
                                          global_pruning=self.global_pruning, pruning_ratio=ratio,
                                          pruning_ratio_dict=kept_count_ratios(model, kept_counts or {}) or None,
                                          ignored_layers=ignored)
            pruner.step()
        # Tracing leaves the model in eval mode; give back the mode the caller's model was in.
        model.train(self.template.training)
        return Pruned(model, float(1 - share), weight_params(model), tuple(sorted((kept_counts or {}).items())))


class _GivenScores(tp.importance.Importance):
    """Scores measured elsewhere (Fisher on the adversarial loss), by the name of each group's root layer."""

    def __init__(self, model: nn.Module, scores: Mapping[str, Sequence[float]]) -> None:
        self.names = {id(module): name for name, module in model.named_modules()}
        self.scores = scores

    def __call__(self, group: Any) -> torch.Tensor | None:
        name = self.names[id(group[0].dep.target.module)]
        # None: Torch-Pruning leaves the group alone (a root of a type the scores do not cover, such as a Conv1d).
        return torch.tensor(self.scores[name], dtype=torch.float64) if name in self.scores else None


def prune_counts(model: nn.Module, example_input: torch.Tensor, kept_counts: Mapping[str, int], *,
                 keep: Iterable[str] = (), scores: Mapping[str, Sequence[float]] | None = None) -> Pruned:
    """``model`` (left untouched) with each named layer down to its count of outputs, and the layers its channels
    reach following; the channels of lowest ``scores`` go (by the name of their group's root layer), or of lowest
    L1 norm."""
    template = copy.deepcopy(model)
    protected = protected_modules(template, example_input, keep)
    pruned = _Trials(template, example_input, protected, scores=scores)(Fraction(1), kept_counts)
    return replace(pruned, pruning_ratio=0.0)


def torch_pruning_ratio(pruning_ratio: float) -> float:
    """The ratio to give Torch-Pruning for a share of channels removed (see _NUDGE)."""
    return max(0.0, pruning_ratio - _NUDGE)


def kept_count_ratios(model: nn.Module, kept_counts: Mapping[str, int]) -> dict[nn.Module, float]:
    """Torch-Pruning's per-layer ratios that make each named layer of ``model`` keep its count of outputs."""
    ratios: dict[nn.Module, float] = {}
    for name, kept in kept_counts.items():
        module = model.get_submodule(name)
        if not isinstance(module, _WEIGHTED):
            raise ValueError(f"{name!r} is not a Conv2d or Linear layer")
        ratios[module] = torch_pruning_ratio(1 - kept / _out_channels(module))
    return ratios


def _kept_shares(model: nn.Module, protected: list[nn.Module]) -> list[Fraction]:
    """Every kept share k/C below 1 at which a prunable layer's channel count changes, keeping >= 1 channel each."""
    skip = {id(sub) for m in protected for sub in m.modules()}
    # A single-channel layer is never pruned by Torch-Pruning, so it does not bound the share from below.
    widths = {_out_channels(m) for m in model.modules() if isinstance(m, _WEIGHTED) and id(m) not in skip} - {1}
    if not widths:
        return []
    floor = Fraction(1, min(widths))
    return sorted({share for c in widths for k in range(1, c) if (share := Fraction(k, c)) >= floor})


def _out_channels(module: nn.Conv2d | nn.Linear) -> int:
    return module.out_channels if isinstance(module, nn.Conv2d) else module.out_features


def output_layer(model: nn.Module, example_input: torch.Tensor) -> nn.Module:
    """The last Conv2d or Linear to run: its outputs are the model's classes, so they must never be pruned."""
    runs = _layer_runs(model, example_input)
    if not runs:
        raise ValueError("channel pruning needs a model with at least one Conv2d or Linear layer")
    return runs[-1]


def forward_order(model: nn.Module, example_input: torch.Tensor) -> list[nn.Conv2d | nn.Linear]:
    """The Conv2d and Linear layers of ``model`` in the order a forward pass first runs them."""
    return list({id(m): m for m in _layer_runs(model, example_input)}.values())


def _layer_runs(model: nn.Module, example_input: torch.Tensor) -> list[nn.Conv2d | nn.Linear]:
    """Every call of a Conv2d or Linear in one forward pass, in order (a layer called twice is there twice)."""
    order: list[nn.Conv2d | nn.Linear] = []
    hooks = [m.register_forward_hook(lambda m, _i, _o: order.append(m)) for m in model.modules()
             if isinstance(m, _WEIGHTED)]
    training = model.training
    try:
        # eval and no_grad: a probe forward must not move BatchNorm running statistics.
        with torch.no_grad():
            model.eval()(example_input)
    finally:
        model.train(training)
        for hook in hooks:
            hook.remove()
    return order


def protected_modules(model: nn.Module, example_input: torch.Tensor, keep: Iterable[str]) -> list[nn.Module]:
    """The modules of ``model`` no prune takes channels from: its output layer and the ``keep`` modules."""
    return [output_layer(model, example_input), *(module_named(model, name) for name in keep)]


def module_named(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"no module named {name!r} to keep unpruned") from None


def _name(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def _resized(module: nn.Module, name: str, state: Mapping[str, torch.Tensor]) -> nn.Module | None:
    prefix = f"{name}." if name else ""
    if isinstance(module, nn.Conv2d):
        return _conv(module, state[prefix + "weight"]) if prefix + "weight" in state else None
    if isinstance(module, nn.Linear):
        return _linear(module, state[prefix + "weight"]) if prefix + "weight" in state else None
    if isinstance(module, nn.BatchNorm2d):
        # running_mean carries the width even for affine=False layers, which have no weight.
        key = next((prefix + k for k in ("weight", "running_mean") if prefix + k in state), None)
        return _batchnorm(module, state[key].shape[0]) if key is not None else None
    return None


def _conv(conv: nn.Conv2d, weight: torch.Tensor) -> nn.Conv2d | None:
    if weight.shape == conv.weight.shape:
        return None
    out_channels = weight.shape[0]
    # Pruning a depthwise conv removes whole groups (one per channel); other grouped convs keep their group count.
    depthwise = conv.groups > 1 and conv.groups == conv.in_channels
    groups = out_channels // (conv.out_channels // conv.groups) if depthwise else conv.groups
    return nn.Conv2d(weight.shape[1] * groups, out_channels, **conv_geometry(conv), groups=groups,
                     bias=conv.bias is not None, padding_mode=conv.padding_mode,
                     device=conv.weight.device, dtype=conv.weight.dtype)


def _linear(linear: nn.Linear, weight: torch.Tensor) -> nn.Linear | None:
    if weight.shape == linear.weight.shape:
        return None
    return nn.Linear(weight.shape[1], weight.shape[0], linear.bias is not None,
                     device=linear.weight.device, dtype=linear.weight.dtype)


def _batchnorm(norm: nn.BatchNorm2d, features: int) -> nn.BatchNorm2d | None:
    if features == norm.num_features:
        return None
    reference = norm.running_mean if norm.running_mean is not None else norm.weight
    factory: dict[str, Any] = {"device": reference.device, "dtype": reference.dtype} if reference is not None else {}
    return nn.BatchNorm2d(features, norm.eps, norm.momentum, norm.affine, norm.track_running_stats, **factory)
