"""Spec stage, cross-block checks: what no single block can check (method vs phases, model vs data set, ...)."""

from __future__ import annotations

import fnmatch
from types import SimpleNamespace

from pydantic import BaseModel

from . import limits
from .errors import Diagnostic
from .locate import locate
from .lower import Section
from .registry import JOINT_FISHER
from .render import plural
from .resolve import is_drop


def semantic_checks(blocks: dict[str, BaseModel], root: Section) -> list[Diagnostic]:
    """Checks across fields and blocks; each runs once the blocks it reads are valid, and reports
    every instance it finds."""
    view = SimpleNamespace(**blocks)
    return [diagnostic for needed, check in _CHECKS if all(name in blocks for name in needed)
            for diagnostic in check(view, root)]


def _rules_against_keep(spec: SimpleNamespace, root: Section) -> list[Diagnostic]:
    found = []
    for index, rule in enumerate(spec.compress.layers):
        if rule.dense or not rule.sets_ranks or rule.selector.kind == "type":
            continue  # a floor on a kept layer's width bounds nothing: `keep` removes no channel of it
        kept = next((k for k in spec.compress.keep
                     if k == rule.selector.pattern or fnmatch.fnmatchcase(rule.selector.pattern, k)), None)
        if kept is not None:
            found.append(Diagnostic(
                "rule-contradicts-keep", f"layer rule {rule.selector} compresses a layer that `keep` leaves dense",
                locate(root, ("compress", "layers", index, "selector")), label=f"kept dense by `keep` entry \"{kept}\"",
                help="remove the layer from `keep`, or drop this rule"))
    return found


def _phases_for_method(spec: SimpleNamespace, root: Section) -> list[Diagnostic]:
    method, train = spec.compress.method, spec.train
    found = []
    if method == "cstar" and train.admm is None:
        found.append(Diagnostic(
            "missing-phase", "method `cstar` needs an `admm` phase", locate(root, ("train",)),
            label="no `admm { ... }` here", help="add `admm { epochs = ..., lr = ... }` to the train block"))
    if method not in ("cstar", "auto") and train.admm is not None:
        found.append(Diagnostic(
            "phase-ignored", f"method `{method}` has no ADMM phase; the `admm` block is not used",
            locate(root, ("train", "admm")), severity="warning", label="ignored",
            help="drop it with `admm = none` in the train block; move its epochs to `finetune` to give "
                 "the method the same total epochs"))
    if train.finetune is None:
        found.append(Diagnostic(
            "missing-phase", f"method `{method}` needs a `finetune` phase", locate(root, ("train",)),
            label="no `finetune { ... }` here", help="add `finetune { epochs = ..., lr = ... }` to the train block"))
    return found


_PRUNING_SETTINGS = {"allocation": ("uniform", "spreads the removed channels"),
                     "importance": ("l1", "scores the channels")}
_PROBE_SETTINGS = ("candidates", "probe_epochs", "probe_holdout")


def _pruning_settings_for_method(spec: SimpleNamespace, root: Section) -> list[Diagnostic]:
    compress = spec.compress
    found = []
    if compress.method == "auto" and compress.allocation != "uniform":
        found.append(_ignored(root, "allocation", "method `auto` compares both allocations (`candidates`)",
                              "list `prune-uniform` or `prune-global` in `candidates` instead"))
    channel_admm = compress.method == "cstar" and compress.structure != "low-rank"
    if compress.method not in ("channel-prune", "auto"):
        why = ("cstar's ADMM onto channels takes each layer's count from `structure` and removes the channels of "
               "least weight"
               if channel_admm else f"method `{compress.method}` removes no channels")
        # cstar onto a global ranking takes each layer's count from that ranking, which `importance` scores.
        used = {"importance"} if channel_admm and compress.structure == "prune-global" else set()
        found += [_ignored(root, key, why, f"`{key}` chooses how `channel-prune` {what}; drop it for this method")
                  for key, (default, what) in _PRUNING_SETTINGS.items()
                  if getattr(compress, key) != default and key not in used]
    if compress.method == "cstar" and compress.structure == JOINT_FISHER and "policy" in compress.model_fields_set:
        found.append(_ignored(root, "policy", f"structure `{JOINT_FISHER}` chooses ranks by its Fisher scores",
                              "drop `policy`; the layer rules' `rank`, `ratio`, `min_rank`, `max_rank` and `dense` "
                              "still bound them"))
    removes_channels = compress.method in ("channel-prune", "auto") or channel_admm
    if not removes_channels:
        why, help = (f"method `{compress.method}` removes no channels",
                     "`min_channels` bounds the structures that remove channels; drop it for this method")
        if compress.min_channels is not None:
            found.append(_ignored(root, "min_channels", why, help))
        found += [Diagnostic("setting-ignored", f"{why}; `min_channels` is not used",
                             locate(root, ("compress", "layers", index, "min_channels")), severity="warning",
                             label="ignored", help=help)
                  for index, rule in enumerate(compress.layers) if rule.min_channels is not None]
    if compress.method != "cstar" and "structure" in compress.model_fields_set:
        why = ("method `auto` projects its ADMM phase onto the candidate its probe chose" if compress.method == "auto"
               else f"method `{compress.method}` has no ADMM phase")
        found.append(_ignored(root, "structure", why,
                              "`structure` chooses what cstar's ADMM projects onto; drop it for this method"))
    if compress.method != "auto":
        found += [_ignored(root, key, f"method `{compress.method}` compiles the structure it names",
                           f"`{key}` sets how `method = auto` chooses a structure; drop it, or write `method = auto`")
                  for key in _PROBE_SETTINGS if key in compress.model_fields_set]
    return found


def _ignored(root: Section, key: str, why: str, help: str) -> Diagnostic:
    return Diagnostic("setting-ignored", f"{why}; `{key}` is not used", locate(root, ("compress", key)),
                      severity="warning", label="ignored", help=help)


def _fixed_policy_ranks(spec: SimpleNamespace, root: Section) -> list[Diagnostic]:
    if spec.compress.policy.kind != "fixed" or any(r.rank is not None for r in spec.compress.layers):
        return []
    return [Diagnostic(
        "fixed-needs-rank", "policy `fixed` takes its ranks from `layer` rules, but none sets `rank`",
        locate(root, ("compress", "policy")), label="no ranks to use",
        help='add rules such as `layer type Conv2d { rank = 16 }`, or choose `policy = global`')]


def _data_root(spec: SimpleNamespace, root: Section) -> list[Diagnostic]:
    if spec.data.dataset == "digits" or spec.data.root is not None:
        return []
    return [Diagnostic(
        "missing-key", f"data set `{spec.data.dataset}` needs `root`, the folder that holds it",
        locate(root, ("data",)), label="`root` is missing",
        help='add `root = "path/to/data"` (relative to this recipe), or `download = true` with a root to fill')]


def _split_for_dataset(spec: SimpleNamespace, root: Section) -> list[Diagnostic]:
    dataset, split = spec.data.dataset, spec.data.split
    if dataset == "digits" and split == "official":
        return [Diagnostic(
            "invalid-split", "`digits` has no official train/test split", locate(root, ("data", "split")),
            label="no official split", help="give the training share, for example `split = 80%` (the default)")]
    if dataset != "digits" and isinstance(split, float):
        return [Diagnostic(
            "invalid-split", f"`{dataset}` has an official train/test split; a share cannot replace it",
            locate(root, ("data", "split")), label="not for this data set",
            help="remove `split` (or write `split = official`)")]
    return []


def _normalization_channels(spec: SimpleNamespace, root: Section) -> list[Diagnostic]:
    channels = spec.model.input[0]
    found = []
    for key in ("mean", "std"):
        values = getattr(spec.data, key)
        if values is not None and len(values) != channels:
            found.append(Diagnostic(
                "shape-mismatch",
                f"`{key}` has {plural(len(values), 'value')} but the input has {plural(channels, 'channel')}",
                locate(root, ("data", key)), label=f"expected {plural(channels, 'value')}",
                help="give one value per input channel (model.input is [C, H, W])"))
    return found


def _input_against_dataset(spec: SimpleNamespace, root: Section) -> list[Diagnostic]:
    """The model's input and classes must be what the data set delivers, or the run crashes (or,
    worse, plans and reports the MACs of images it never sees)."""
    dataset, (channels, height, width) = spec.data.dataset, spec.model.input
    fixed = limits.FIXED_SHAPES.get(dataset)
    found = []
    if fixed is not None and fixed[0] != spec.model.input:
        expected = "x".join(map(str, fixed[0]))
        found.append(Diagnostic(
            "dataset-mismatch", f"`input` is {_shape(spec.model.input)}, but `{dataset}` images are {expected}",
            locate(root, ("model", "input")), label=f"expected {_shape(fixed[0])}",
            help=f"write `input = {_shape(fixed[0])}`, or choose the data set this model is for"))
    if fixed is None and channels != limits.FOLDER_CHANNELS:
        found.append(Diagnostic(
            "dataset-mismatch", f"`input` has {plural(channels, 'channel')}, but `{dataset}` images are RGB",
            locate(root, ("model", "input")), label=f"expected {limits.FOLDER_CHANNELS} channels",
            help=f"write `input = [3, {height}, {width}]`"))
    if fixed is None and min(height, width) < limits.MIN_FOLDER_SIDE:
        found.append(Diagnostic(
            "dataset-mismatch", f"`input` is {height}x{width} pixels, too small for `{dataset}` crops",
            locate(root, ("model", "input")), label=f"at least {limits.MIN_FOLDER_SIDE}x{limits.MIN_FOLDER_SIDE}",
            help="the usual ImageNet input is `input = [3, 224, 224]`"))
    if fixed is not None and fixed[1] != spec.model.classes:
        found.append(Diagnostic(
            "dataset-mismatch", f"`classes` is {spec.model.classes}, but `{dataset}` has {fixed[1]} classes",
            locate(root, ("model", "classes")), label=f"expected {fixed[1]}",
            help=f"write `classes = {fixed[1]}`: the model needs one output per class of the data set"))
    return found


def _shape(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def _drops_without_a_block(spec: SimpleNamespace, root: Section) -> list[Diagnostic]:
    """`PHASE = none` that found no block to drop: the recipe says something that changes nothing."""
    train = root.get("train")
    return [Diagnostic(
        "nothing-to-drop", f"`{key} = none` drops nothing: there is no `{key}` block here or in a base",
        locate(root, ("train", key)), severity="warning", label="nothing to drop",
        help=f"remove this line: `{key} = none` removes the `{key}` block of an `extend`ed recipe")
        for key, value in (train.items() if isinstance(train, Section) else ()) if is_drop(value)]


_CHECKS = (
    (("compress",), _rules_against_keep),
    (("compress", "train"), _phases_for_method),
    (("compress",), _fixed_policy_ranks),
    (("compress",), _pruning_settings_for_method),
    (("data",), _data_root),
    (("data",), _split_for_dataset),
    (("model", "data"), _normalization_channels),
    (("model", "data"), _input_against_dataset),
    (("train",), _drops_without_a_block),
)
