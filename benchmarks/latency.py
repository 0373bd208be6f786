"""Batch-1 CPU latency of dense vs factorized models: is a factorized model as fast as it is small?

For each model (a recipe in specs/) and each target compression ratio R, the recipe's budget is
replaced by ``R x params`` (every other setting kept), the model is planned and factorized, and the
dense and factorized models are timed in the same process, on the same input, taking turns so that
a load change on the machine hits both alike:

- eval mode, ``torch.inference_mode()``, batch size 1, ``torch.set_num_threads(threads)``;
- ``warmup`` calls of each model first, not timed; then ``repeats`` timed calls of each, in turns
  of ``block`` calls in a row (10), each turn after one untimed call, so that every model runs
  with its own weights in the caches, as a served model does (``--block 0``: single calls
  alternating, caches cold; see ``measure``);
- the median wall time and its interquartile range are reported (with the minimum, the median
  process CPU time and the load average in the JSON);
- the machine may be shared: every case is timed in ``rounds`` sweeps over all cases, minutes
  apart, and each row reports the round whose timings were the least spread out (smallest
  IQR / median), so a burst of load from other processes spoils a round, not the result. The
  speedups of all rounds are kept in the JSON (``speedup_by_round``).

Four modes are timed per case, each applied to the dense and the factorized model alike:
``eager`` (the model as built and as ``cstar_dsl.factorize`` returns it), ``inference`` (passed
through ``cstar_dsl.deploy.inference.optimize_for_inference``: batch norms folded, redundant 1x1 convs
merged, module calls lowered to function calls), ``torchscript`` (that, traced and frozen by
``cstar_dsl.deploy.inference.to_torchscript``: no Python between ops) and ``onnxruntime`` (the model as
``cstar export`` writes it, run by ONNX Runtime, which fuses conv + batch norm + ReLU and has far
less per-op overhead than PyTorch at batch 1). The target: from 8x on, the
speedup must be at least half the MAC reduction of the plan.

    .venv/bin/python benchmarks/latency.py            # full run: 1 thread, ~3.5 minutes on 2 cores
    .venv/bin/python benchmarks/latency.py --quick    # smoke run: 8x only, 5 repetitions, ~15 s
    .venv/bin/python benchmarks/latency.py --threads 2 --output benchmarks/results/latency-2threads.json
    .venv/bin/python benchmarks/latency.py --experiments --rounds 2   # the optimization variants
    .venv/bin/python benchmarks/latency.py --layers --ratios 8 32 --repeats 50   # per-layer times

Results go to benchmarks/results/latency.json (``--quick``: latency-quick.json; ``--experiments``:
experiments.json; ``--layers``: layers.json); docs/performance.md discusses them.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import cstar_dsl  # noqa: E402
from cstar_dsl.deploy.inference import optimize_for_inference, to_torchscript  # noqa: E402
from cstar_dsl.deploy.latency import BLOCK, Timing, cpu_name, measure  # noqa: E402
from cstar_dsl.lang.spec import Spec  # noqa: E402
from cstar_dsl.lang.spec.compress import RatioBudget  # noqa: E402
from cstar_dsl.model.factorized import Tucker2Conv2d  # noqa: E402

MODELS = {"resnet18": ROOT / "specs" / "resnet18.cstar", "vgg16": ROOT / "specs" / "vgg16.cstar",
          "digits": ROOT / "specs" / "digits.cstar"}
DEFAULT_MODELS = ("resnet18", "vgg16")
RATIOS = (2.0, 4.0, 8.0, 16.0, 32.0)
TARGET_FROM = 8.0  # the target applies from this ratio on
MODES = ("eager", "inference", "torchscript", "onnxruntime")
RESULTS = ROOT / "benchmarks" / "results"


# ------------------------------------------------------------ models, plans


def with_budget(spec: Spec, ratio: float) -> Spec:
    """The spec with its budget replaced by ``ratio x params``; every other setting kept."""
    budget = RatioBudget(metric="params", ratio=ratio)
    return spec.model_copy(update={"compress": spec.compress.model_copy(update={"budget": budget})})


def load(name: str, seed: int = 0) -> tuple[Spec, nn.Module]:
    """A registered model's spec and its dense model (random weights from ``seed``), in eval mode."""
    spec = cstar_dsl.load_spec(MODELS[name])
    torch.manual_seed(seed)
    return spec, cstar_dsl.build_model(spec).eval()


def example_input(spec: Spec, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1, *spec.model.input, generator=generator)


def form(mode: str, model: nn.Module, spec: Spec, x: torch.Tensor) -> nn.Module:
    """The model as timed in ``mode``: as it is, optimized, optimized and frozen with TorchScript, or
    exported to ONNX and run by ONNX Runtime (which folds batch norms and fuses Conv+ReLU itself)."""
    if mode == "eager":
        return model
    if mode == "inference":
        return optimize_for_inference(model, leaves=spec.model.leaf)
    if mode == "onnxruntime":
        return OnnxRuntimeModel(model, x)
    return to_torchscript(model, x, leaves=spec.model.leaf)


class OnnxRuntimeModel(nn.Module):
    """A model exported to ONNX (opset 18, torch.onnx's dynamo exporter) and run by an ONNX Runtime
    session with all graph optimizations and as many intra-op threads as torch uses."""

    def __init__(self, model: nn.Module, x: torch.Tensor) -> None:
        import io
        import tempfile

        import onnxruntime

        super().__init__()
        with tempfile.TemporaryDirectory() as folder, contextlib.redirect_stdout(io.StringIO()), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's notes on its own internals
            path = Path(folder) / "model.onnx"
            torch.onnx.export(model, (x,), str(path), dynamo=True, opset_version=18, verbose=False,
                              input_names=["images"], output_names=["logits"])
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()
            options.inter_op_num_threads = 1
            options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
            self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {"images": x.numpy()})[0])


# --------------------------------------------------------------- the runs


@dataclass
class Case:
    """One model at one ratio, ready to time: the calls of every mode and the plan's totals."""

    name: str
    ratio: float
    macs_ratio: float
    params_ratio: float
    calls: dict[str, Callable[[], object]]
    rounds: list[tuple[dict[str, Timing], tuple[float, float]]]


def prepare(name: str, spec: Spec, model: nn.Module, ratios: Iterable[float], *, modes: Sequence[str] = MODES,
            log: Callable[[str], None] = lambda _: None) -> list[Case]:
    """Plan and factorize ``model`` at each ratio, build each mode's dense and factorized forms
    and check that the optimized forms compute what the models they come from compute."""
    unknown = set(modes) - set(MODES)
    if unknown:
        raise ValueError(f"unknown modes {sorted(unknown)}; known: {', '.join(MODES)}")
    x = example_input(spec)
    dense_forms = {mode: form(mode, model, spec, x) for mode in modes}
    for mode in modes:
        _check_same(dense_forms[mode], model, x, f"{name} dense ({mode})")
    cases = []
    for ratio in ratios:
        started = time.perf_counter()
        ratio_spec = with_budget(spec, ratio)
        plan = cstar_dsl.make_plan(ratio_spec, model)
        factorized = cstar_dsl.factorize(model, plan, ratio_spec).eval()
        calls: dict[str, Callable[[], object]] = {}
        for mode in modes:
            fast = form(mode, factorized, spec, x)
            _check_same(fast, factorized, x, f"{name} at {ratio:g}x ({mode})")
            calls[f"dense/{mode}"] = _bind(dense_forms[mode], x)
            calls[f"factorized/{mode}"] = _bind(fast, x)
        cases.append(Case(name, ratio, plan.macs_before / max(1, plan.macs_after),
                          plan.params_before / max(1, plan.params_after), calls, []))
        log(f"  prepared {name} at {ratio:g}x in {time.perf_counter() - started:.1f} s")
    return cases


def time_cases(cases: Sequence[Case], *, repeats: int, warmup: int, rounds: int, block: int = BLOCK,
               log: Callable[[str], None] = lambda _: None) -> None:
    """Time every case ``rounds`` times, one sweep over all cases per round, so each case's
    rounds lie minutes apart and a burst of load from other processes spoils at most one."""
    for index in range(rounds):
        started = time.perf_counter()
        for case in cases:
            load_before = os.getloadavg()[0]
            timings = measure(case.calls, repeats=repeats, warmup=warmup, block=block)
            case.rounds.append((timings, (load_before, os.getloadavg()[0])))
        log(f"  round {index + 1}/{rounds} took {time.perf_counter() - started:.1f} s")


def rows_of(case: Case, modes: Sequence[str], threads: int, warmup: int) -> list[dict[str, object]]:
    """One row per mode, from the case's least disturbed round: the one whose timings of that
    mode have the smallest summed interquartile range relative to their medians."""
    rows = []
    for mode in modes:
        keys = (f"dense/{mode}", f"factorized/{mode}")
        spreads = [sum(t[key].iqr / t[key].median for key in keys) for t, _ in case.rounds]
        chosen = min(range(len(spreads)), key=spreads.__getitem__)
        timings, load = case.rounds[chosen]
        row = _row(case, mode, timings[keys[0]], timings[keys[1]], threads, warmup, load)
        row["round"] = chosen + 1
        row["speedup_by_round"] = [round(t[keys[0]].median / t[keys[1]].median, 3) for t, _ in case.rounds]
        rows.append(row)
    return rows


def benchmark_model(name: str, spec: Spec, model: nn.Module, ratios: Iterable[float], *, repeats: int = 60,
                    warmup: int = 10, threads: int = 1, rounds: int = 1, modes: Sequence[str] = MODES,
                    block: int = BLOCK, log: Callable[[str], None] = lambda _: None) -> list[dict[str, object]]:
    """One row per (ratio, mode): the dense and factorized latency of ``model`` at batch size 1.

    The benchmark's core (``main`` does the same over several models, with the rounds of all
    models interleaved).
    """
    torch.set_num_threads(threads)
    cases = prepare(name, spec, model, ratios, modes=modes, log=log)
    time_cases(cases, repeats=repeats, warmup=warmup, rounds=rounds, block=block, log=log)
    return [row for case in cases for row in rows_of(case, modes, threads, warmup)]


def _bind(model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    return lambda: model(x)


def _check_same(fast: nn.Module, reference: nn.Module, x: torch.Tensor, what: str, tolerance: float = 1e-4) -> None:
    if fast is reference:
        return
    with torch.inference_mode():
        difference = (fast(x) - reference(x)).abs().max().item()
    if difference > tolerance:
        raise AssertionError(f"{what}: the optimized model differs by {difference:.3g} (> {tolerance:g})")


def _row(case: Case, mode: str, dense: Timing, factorized: Timing, threads: int, warmup: int,
         load: tuple[float, float]) -> dict[str, object]:
    name, ratio, macs_ratio, params_ratio = case.name, case.ratio, case.macs_ratio, case.params_ratio
    speedup = dense.median / factorized.median
    return {
        "model": name, "target_ratio": ratio, "mode": mode,
        "params_ratio": round(params_ratio, 3), "macs_ratio": round(macs_ratio, 3),
        "dense_ms": round(dense.median, 4), "factorized_ms": round(factorized.median, 4),
        "speedup": round(speedup, 3),
        "speedup_over_macs": round(speedup / macs_ratio, 3),
        "target_speedup": round(macs_ratio / 2, 3) if ratio >= TARGET_FROM else None,
        "target_met": (speedup >= macs_ratio / 2) if ratio >= TARGET_FROM else None,
        "dense_iqr_ms": round(dense.iqr, 4), "factorized_iqr_ms": round(factorized.iqr, 4),
        "dense_min_ms": round(dense.minimum, 4), "factorized_min_ms": round(factorized.minimum, 4),
        "dense_cpu_ms": round(dense.cpu_median, 4), "factorized_cpu_ms": round(factorized.cpu_median, 4),
        "loadavg": [round(v, 2) for v in load],
        "threads": threads, "repeats": dense.repeats, "warmup": warmup, "batch": 1,
    }


# ------------------------------------------------------------ experiments


def _channels_last(model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
    return lambda: model(x)


def _fx_fold_bn(model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    from torch.fx.experimental import optimization

    fused = optimization.fuse(model)
    return lambda: fused(x)


def _fx_mkldnn(model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    from torch.fx.experimental import optimization

    converted = optimization.optimize_for_inference(copy.deepcopy(model))
    return lambda: converted(x)


def _jit_freeze(model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    with warnings.catch_warnings():  # TorchScript is deprecated: kept for the comparison only
        warnings.simplefilter("ignore")
        frozen = torch.jit.freeze(torch.jit.trace(copy.deepcopy(model), x))
    return lambda: frozen(x)


def _compiled(freezing: bool) -> Callable[[nn.Module, torch.Tensor], Callable[[], object]]:
    def build(model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
        import torch._inductor.config as inductor

        torch._dynamo.reset()
        with inductor.patch(freezing=freezing), torch.no_grad():
            compiled = torch.compile(optimize_for_inference(model, merge=False, lower=False))
            compiled(x)
        return lambda: compiled(x)
    return build


def _no_mkldnn(model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    fast = optimize_for_inference(model)

    def call() -> object:  # torch.backends.mkldnn.flags() would warn on every call
        enabled = torch._C._get_mkldnn_enabled()
        torch._C._set_mkldnn_enabled(False)
        try:
            return fast(x)
        finally:
            torch._C._set_mkldnn_enabled(enabled)
    return call


class StrideFirst(nn.Module):
    """The proposed ``Tucker2Conv2d`` of a strided 1x1 conv (a ResNet shortcut): subsample the
    input first, then run the three convs unstrided. A 1x1 conv reads only the positions its
    stride lands on, so the output is the same, and ``compress`` does stride**2 times fewer MACs.
    (Striding ``compress`` itself would do the same math, but aten sends a strided conv with a
    large batch-1 input to oneDNN's slow NCHW path.) Here as a wrapper, in place of editing
    cstar_dsl/model/factorized.py."""

    def __init__(self, tucker: Tucker2Conv2d) -> None:
        super().__init__()
        self.tucker, self.stride = tucker, tucker.core.stride
        tucker.core.stride = (1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tucker(x[:, :, ::self.stride[0], ::self.stride[1]])


def stride_first(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every Tucker-2 form of a strided 1x1 conv wrapped in ``StrideFirst``."""
    from cstar_dsl.model.inventory import replace_module

    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if not isinstance(module, Tucker2Conv2d):
            continue
        core = module.core
        if core.kernel_size == (1, 1) and core.padding == (0, 0) and core.stride != (1, 1):
            replace_module(model, name, StrideFirst(module))
    return model


def _stride_first(model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    return _bind(stride_first(model), x)


def _inference(*, merge: bool = True, lower: bool = True) -> Callable[[nn.Module, torch.Tensor], Callable[[], object]]:
    def build(model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
        fast = optimize_for_inference(model, merge=merge, lower=lower)
        return lambda: fast(x)
    return build


def _inference_channels_last(model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    return _channels_last(optimize_for_inference(model), x)


EXPERIMENTS: dict[str, tuple[str, Callable[[nn.Module, torch.Tensor], Callable[[], object]]]] = {
    "eager": ("as built / as factorize returns it", lambda m, x: _bind(m, x)),
    "channels_last": ("eager, model and input in channels-last memory format", _channels_last),
    "stride_first": ("eager, Tucker-2 of a strided 1x1 conv with the stride on its first conv", _stride_first),
    "fx_fold_bn": ("torch.fx.experimental.optimization.fuse (conv+BN folding)", _fx_fold_bn),
    "fold_bn": ("optimize_for_inference(merge=False, lower=False)", _inference(merge=False, lower=False)),
    "fold_merge": ("optimize_for_inference(lower=False)", _inference(lower=False)),
    "fold_lower": ("optimize_for_inference(merge=False)", _inference(merge=False)),
    "inference": ("optimize_for_inference(): fold + merge + lower", _inference()),
    "inference_cl": ("optimize_for_inference() + channels-last", _inference_channels_last),
    "no_mkldnn": ("optimize_for_inference() with oneDNN disabled (aten's own kernels only)", _no_mkldnn),
    "fx_mkldnn": ("torch.fx.experimental.optimization.optimize_for_inference (oneDNN layouts)", _fx_mkldnn),
    "jit_freeze": ("torch.jit.trace + torch.jit.freeze (deprecated TorchScript)", _jit_freeze),
    "compile": ("torch.compile (inductor) of the BN-folded model", _compiled(freezing=False)),
    "compile_freezing": ("torch.compile with inductor freezing (oneDNN weight prepacking)", _compiled(freezing=True)),
}


def run_experiments(names: Sequence[str], ratios: Sequence[float], variants: Sequence[str], *, repeats: int,
                    warmup: int, threads: int, rounds: int = 1,
                    log: Callable[[str], None] = print) -> list[dict[str, object]]:
    """Each variant applied to the dense and the factorized model alike, all timed interleaved;
    with several rounds, each variant reports its least disturbed round (as ``rows_of`` does)."""
    torch.set_num_threads(threads)
    rows: list[dict[str, object]] = []
    for name in names:
        spec, model = load(name)
        x = example_input(spec)
        for ratio in ratios:
            ratio_spec = with_budget(spec, ratio)
            plan = cstar_dsl.make_plan(ratio_spec, model)
            factorized = cstar_dsl.factorize(model, plan, ratio_spec).eval()
            calls: dict[str, Callable[[], object]] = {}
            build_s: dict[str, float] = {}
            for variant in variants:
                for kind, source in (("dense", model), ("factorized", factorized)):
                    started = time.perf_counter()
                    try:
                        call = EXPERIMENTS[variant][1](source, x)
                        with torch.inference_mode():
                            difference = (call() - source(x)).abs().max().item()
                        if difference > 1e-4:
                            raise AssertionError(f"output differs by {difference:.3g}")
                    except Exception as error:  # a variant that does not run is a result too
                        log(f"  {name} {ratio:g}x {variant} {kind}: failed: {type(error).__name__}: {error}")
                        continue
                    calls[f"{variant}/{kind}"] = call
                    build_s[f"{variant}/{kind}"] = time.perf_counter() - started
            measured = [measure(calls, repeats=repeats, warmup=warmup) for _ in range(rounds)]
            timings: dict[str, Timing] = {}
            for variant in variants:
                keys = [f"{variant}/dense", f"{variant}/factorized"]
                if all(key in calls for key in keys):
                    best = min(measured, key=lambda t: sum(t[k].iqr / t[k].median for k in keys))  # noqa: B023
                    timings.update({key: best[key] for key in keys})
            eager_dense = timings.get("eager/dense")
            macs_ratio = plan.macs_before / max(1, plan.macs_after)
            for variant in variants:
                dense, fact = timings.get(f"{variant}/dense"), timings.get(f"{variant}/factorized")
                if dense is None or fact is None:
                    continue
                row = {
                    "model": name, "target_ratio": ratio, "variant": variant, "macs_ratio": round(macs_ratio, 3),
                    "dense_ms": round(dense.median, 4), "factorized_ms": round(fact.median, 4),
                    "dense_iqr_ms": round(dense.iqr, 4), "factorized_iqr_ms": round(fact.iqr, 4),
                    "dense_cpu_ms": round(dense.cpu_median, 4), "factorized_cpu_ms": round(fact.cpu_median, 4),
                    "speedup": round(dense.median / fact.median, 3),
                    "speedup_vs_eager_dense": round(eager_dense.median / fact.median, 3) if eager_dense else None,
                    "build_s": round(build_s[f"{variant}/dense"] + build_s[f"{variant}/factorized"], 1),
                    "threads": threads, "repeats": repeats,
                }
                rows.append(row)
                log(f"{name:9s} {ratio:4g}x {variant:17s} dense {dense.median:8.3f} ms  factorized "
                    f"{fact.median:7.3f} ms  speedup {row['speedup']:6.2f}x  (MACs {macs_ratio:5.2f}x)")
    return rows


# --------------------------------------------------------- per-layer view


def layer_breakdown(name: str, ratio: float, *, repeats: int, warmup: int, threads: int,
                    log: Callable[[str], None] = print) -> list[dict[str, object]]:
    """Each factorized conv layer timed alone on its real input: the dense conv against the
    Tucker-2 form's three convs, each with its MACs, to show where the time goes."""
    torch.set_num_threads(threads)
    spec, model = load(name)
    ratio_spec = with_budget(spec, ratio)
    plan = cstar_dsl.make_plan(ratio_spec, model)
    factorized = cstar_dsl.factorize(model, plan, ratio_spec).eval()
    inputs: dict[str, torch.Tensor] = {}
    hooks = [module.register_forward_pre_hook(lambda _m, args, key=key: inputs.__setitem__(key, args[0]))
             for key, module in factorized.named_modules() if isinstance(module, Tucker2Conv2d)]
    with torch.inference_mode():
        factorized(example_input(spec))
    for hook in hooks:
        hook.remove()
    rows = []
    for key, x in inputs.items():
        tucker, dense = factorized.get_submodule(key), model.get_submodule(key)
        assert isinstance(tucker, Tucker2Conv2d) and isinstance(dense, nn.Conv2d)  # what the hooks above chose
        with torch.inference_mode():
            middle = tucker.compress(x)
            inner = tucker.core(middle)
            out = tucker.expand(inner)
        calls = {"dense": lambda d=dense, x=x: d(x), "compress": lambda m=tucker.compress, x=x: m(x),
                 "core": lambda m=tucker.core, x=middle: m(x), "expand": lambda m=tucker.expand, x=inner: m(x)}
        timings = measure(calls, repeats=repeats, warmup=warmup)
        macs = {"dense": _macs(dense, out), "compress": _macs(tucker.compress, middle),
                "core": _macs(tucker.core, inner), "expand": _macs(tucker.expand, out)}
        row: dict[str, object] = {"model": name, "target_ratio": ratio, "layer": key, "input": list(x.shape[1:]),
                                  "ranks": list(tucker.ranks), "threads": threads}
        for part, timing in timings.items():
            row[f"{part}_us"] = round(timing.median * 1e3, 1)
            row[f"{part}_mmacs"] = round(macs[part] / 1e6, 3)
            row[f"{part}_gmacs_per_s"] = round(macs[part] / (timing.median * 1e-3) / 1e9, 1)
        rows.append(row)
        parts = sum(timings[p].median for p in ("compress", "core", "expand")) * 1e3
        tucker_macs = macs["compress"] + macs["core"] + macs["expand"]
        row["layer_speedup"] = round(timings["dense"].median * 1e3 / parts, 2)
        row["layer_macs_ratio"] = round(macs["dense"] / tucker_macs, 2)
        log(f"{key:22s} in {tuple(x.shape[1:])!s:15s} ranks {tucker.ranks!s:10s} dense {row['dense_us']:7.1f} us "
            f"({row['dense_gmacs_per_s']:5.1f} GMAC/s)  compress {row['compress_us']:6.1f}  core {row['core_us']:6.1f}"
            f"  expand {row['expand_us']:6.1f} us  ({tucker_macs / 1e6:5.2f} MMACs): {row['layer_speedup']:5.2f}x "
            f"faster for {row['layer_macs_ratio']:5.2f}x fewer MACs")
    return rows


def _macs(conv: nn.Conv2d, out: torch.Tensor) -> int:
    area = conv.kernel_size[0] * conv.kernel_size[1]
    return conv.in_channels * conv.out_channels * area * out.shape[-2] * out.shape[-1]


# ------------------------------------------------------------------ output


def machine() -> dict[str, object]:
    """The machine that ran the benchmark."""
    return {
        "cpu": cpu_name(), "cores": os.cpu_count(), "platform": platform.platform(),
        "python": platform.python_version(), "torch": torch.__version__,
        "mkldnn": torch.backends.mkldnn.is_available(), "date": datetime.datetime.now().astimezone().isoformat(
            timespec="seconds"),
        "loadavg_at_start": [round(v, 2) for v in os.getloadavg()],
    }


def _line(row: dict[str, object]) -> str:
    met = {True: "yes", False: "NO", None: "-"}[row["target_met"]]  # type: ignore[index]
    return (f"{row['model']:9s} {row['target_ratio']:4g}x {row['mode']:9s} params {row['params_ratio']:6.2f}x  "
            f"MACs {row['macs_ratio']:6.2f}x  dense {row['dense_ms']:8.3f} ms (IQR {row['dense_iqr_ms']:.3f})  "
            f"factorized {row['factorized_ms']:7.3f} ms (IQR {row['factorized_iqr_ms']:.3f})  "
            f"speedup {row['speedup']:6.2f}x  target {met}")


def table(rows: Sequence[dict[str, object]]) -> str:
    """The rows as a Markdown table (the one docs/performance.md shows)."""
    lines = ["| model | target | mode | params | MACs | dense ms (IQR) | factorized ms (IQR) | speedup | "
             "needed | met |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        needed = "-" if r["target_speedup"] is None else f"{r['target_speedup']:.2f}x"
        met = {True: "yes", False: "**no**", None: "-"}[r["target_met"]]  # type: ignore[index]
        lines.append(
            f"| {r['model']} | {r['target_ratio']:g}x | {r['mode']} | {r['params_ratio']:.2f}x | "
            f"{r['macs_ratio']:.2f}x | {r['dense_ms']:.2f} ({r['dense_iqr_ms']:.2f}) | "
            f"{r['factorized_ms']:.2f} ({r['factorized_iqr_ms']:.2f}) | {r['speedup']:.2f}x | {needed} | {met} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 8x only, 5 repetitions, 2 warm-up calls")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), help="default: resnet18 vgg16")
    parser.add_argument("--ratios", nargs="+", type=float, help="default: 2 4 8 16 32 (--quick: 8)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--repeats", type=int, help="timed calls per model (default 60; --quick 5)")
    parser.add_argument("--warmup", type=int, help="untimed calls per model first (default 10; --quick 2)")
    parser.add_argument("--rounds", type=int, help="timing sweeps over all cases; each case reports its least "
                        "disturbed round (default 3; --quick 1)")
    parser.add_argument("--block", type=int, default=BLOCK, help="timed calls of one model in a row, after one "
                        f"untimed call (default {BLOCK}); 0: alternate single calls, caches cold")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--experiments", action="store_true", help="time the optimization variants instead")
    parser.add_argument("--layers", action="store_true", help="time each factorized layer's convs alone instead")
    parser.add_argument("--variants", nargs="+", choices=sorted(EXPERIMENTS), help="experiments to run (default all)")
    parser.add_argument("--output", type=Path, help="where to write the JSON results")
    args = parser.parse_args(argv)

    names = args.models or list(DEFAULT_MODELS)
    ratios = args.ratios or ([8.0] if args.quick else ([8.0, 32.0] if args.experiments or args.layers
                                                       else list(RATIOS)))
    repeats = args.repeats or (5 if args.quick else (20 if args.experiments else 60))
    warmup = args.warmup if args.warmup is not None else (2 if args.quick else 10)
    rounds = args.rounds or (1 if args.quick else 3)
    default_name = ("experiments.json" if args.experiments else "layers.json" if args.layers
                    else "latency-quick.json" if args.quick else "latency.json")
    output = args.output or RESULTS / default_name
    header = machine()
    header.update(threads=args.threads, repeats=repeats, warmup=warmup, rounds=rounds, block=args.block, batch=1,
                  command=" ".join([".venv/bin/python", "benchmarks/latency.py", *(argv or sys.argv[1:])]))
    print(f"# {header['cpu']}, {header['cores']} cores, torch {header['torch']}, {args.threads} thread(s), "
          f"{repeats} repetitions after {warmup} warm-up calls, {rounds} round(s), batch 1; "
          f"load average {header['loadavg_at_start']}", flush=True)
    started = time.perf_counter()

    def log(text: str) -> None:
        print(text, flush=True)

    if args.layers:
        rows = [row for name in names for ratio in ratios
                for row in layer_breakdown(name, ratio, repeats=repeats, warmup=warmup, threads=args.threads, log=log)]
    elif args.experiments:
        variants = args.variants or list(EXPERIMENTS)
        rows = run_experiments(names, ratios, variants, repeats=repeats, warmup=warmup, threads=args.threads,
                               rounds=rounds, log=log)
        header["variants"] = {name: EXPERIMENTS[name][0] for name in variants}
    else:
        torch.set_num_threads(args.threads)
        cases = []
        for name in names:
            spec, model = load(name)
            cases += prepare(name, spec, model, ratios, modes=args.modes, log=log)
        time_cases(cases, repeats=repeats, warmup=warmup, rounds=rounds, block=args.block, log=log)
        rows = [row for case in cases for row in rows_of(case, args.modes, args.threads, warmup)]
        for row in rows:
            log(_line(row))
        print("\n" + table(rows))
    header["seconds"] = round(time.perf_counter() - started, 1)
    header["loadavg_at_end"] = [round(v, 2) for v in os.getloadavg()]
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"machine": header, "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {output} in {header['seconds']} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
