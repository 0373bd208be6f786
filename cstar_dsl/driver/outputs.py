"""Compile driver, outputs: the run report (report.json) and the artifacts written into the out folder."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

from .. import __version__, files
from ..deploy.artifacts import model_description, save_model
from ..deploy.latency import LatencyComparison
from ..eval.evaluation import Evaluation
from ..lang.spec import RequirementSpec, Spec
from ..plan.plans import LayerPlan
from ..report import document as report
from ..run_report import (
    REPORT_SCHEMA,
    Accuracy,
    Compression,
    DataInfo,
    Export,
    Latency,
    LayerReport,
    Machine,
    Requirement,
    RunReport,
    Threat,
    Timings,
)
from ..train import checkpoint
from ..train.data import dataset_size
from .state import CompileError, CompileOptions, Context, Run

__all__ = ["OUTPUTS", "REPORT_SCHEMA", "build_report", "recipe_folder", "spec_identity", "write_model", "write_report"]
OUTPUTS = ("model.safetensors", "model.json", "report.json", "report.md", "curves.png", "ranks.png", "spec.cstar",
           checkpoint.LOCK)


def spec_identity(spec: Spec, recipe_folder: Path) -> str:
    """What the recipe means, as canonical JSON: its paths relative to ``recipe_folder``, as a
    recipe writes them. The spec holds absolute paths; hashed as they are, a run folder moved or
    copied with its recipe (another checkout, another machine) could not be resumed.
    """
    return json.dumps(recipe_meaning(spec, recipe_folder), sort_keys=True, separators=(",", ":"))


def recipe_meaning(spec: Spec, recipe_folder: Path) -> dict[str, Any]:
    """The spec as plain data, its paths (weights, data root) relative to ``recipe_folder`` as a recipe writes
    them: what a run means wherever its checkout sits, so no machine path reaches the lock or the report."""
    meaning = spec.model_dump(mode="json")
    for block, key in (("model", "weights"), ("data", "root")):
        if meaning[block].get(key) is not None:
            meaning[block][key] = Path(os.path.relpath(meaning[block][key], recipe_folder)).as_posix()
    return meaning


def recipe_folder(options: CompileOptions) -> Path:
    return Path(options.spec_name).resolve().parent


def build_report(context: Context, run: Run, result: Evaluation, seconds: float,
                 latency: LatencyComparison | None, exports: tuple[Export, ...] = ()) -> RunReport:
    """The report of the run, what report.json holds (schema ``REPORT_SCHEMA``)."""
    spec, plan = context.spec, run.plan
    assert plan is not None
    return RunReport(
        spec=context.options.spec_name,
        spec_sha256=checkpoint.sha256_text(spec_identity(spec, recipe_folder(context.options))),
        method=spec.compress.method,
        structure_choice=run.choice,
        compression=Compression(budget=plan.budget, metric=spec.compress.budget.metric,
                                target_ratio=getattr(spec.compress.budget, "ratio", None),
                                params_dense=plan.params_before, params_compressed=plan.params_after,
                                ratio=plan.params_before / max(1, plan.params_after), macs_dense=plan.macs_before,
                                macs_compressed=plan.macs_after, other_params=plan.other_params),
        accuracy=Accuracy(clean=result.clean, robust=result.robust),
        latency=None if latency is None else Latency.model_validate(latency.to_dict()),
        attacks=result.attacks,
        threat=Threat.model_validate(spec.threat.model_dump()),
        requirements=tuple(_requirement(requirement, result) for requirement in spec.evaluate.requirements),
        layers=tuple(_layer(layer) for layer in plan.layers),
        history=tuple(run.history),
        timings=Timings(total_seconds=seconds, phases=run.phase_seconds, evaluate_seconds=result.seconds),
        data=DataInfo(name=context.data.name, train_size=dataset_size(context.data.train), test_size=result.samples),
        machine=Machine(device=str(context.device), processor=platform.processor() or platform.machine(),
                        threads=torch.get_num_threads(), python=platform.python_version(), torch=torch.__version__,
                        cstar=__version__),
        seed=spec.train.seed,
        warnings=(*context.options.warnings, *plan.warnings),
        resolved=recipe_meaning(spec, recipe_folder(context.options)),
        recipe_folder=Path(os.path.relpath(recipe_folder(context.options), context.options.out.resolve())).as_posix(),
        exports=exports,
    )


def _requirement(requirement: RequirementSpec, result: Evaluation) -> Requirement:
    """A `require` line against what was measured: `robust` is held to the worst attack."""
    value = result.clean if requirement.metric == "clean" else result.worst_robust
    floor = requirement.value
    met = value is not None and (value >= floor if requirement.op == ">=" else value > floor)
    return Requirement(metric=requirement.metric, op=requirement.op, value=floor, measured=value, met=met)


def _layer(layer: LayerPlan) -> LayerReport:
    return LayerReport(name=layer.name, type=layer.type_name, shape=layer.shape, rule=layer.rule, method=layer.method,
                       ranks=layer.ranks, reason=layer.reason, params_before=layer.params_before,
                       params_after=layer.params_after, macs_before=layer.macs_before, macs_after=layer.macs_after,
                       energy_kept=layer.energy_kept, shape_after=layer.shape_after)


def write_model(context: Context, run: Run) -> tuple[Export, ...]:
    """The model files and the recipe's exports, each checked against PyTorch; what the report lists."""
    assert run.model is not None and run.plan is not None
    description = model_description(context.spec.model, context.spec.compress.method, run.structure,
                                     context.data.mean, context.data.std)
    description["plan"] = run.plan.to_dict()
    save_model(context.options.out, run.model, description)
    return _export(context)


def write_report(context: Context, built: RunReport, lock: dict[str, Any]) -> None:
    """The report and its plots, the recipe and the lock; the checkpoint removed last."""
    out = context.options.out
    files.write_text(out / "report.json", built.to_json())
    files.write_text(out / "report.md", report.markdown(built))
    # savefig picks the format from the name, so the temporary file keeps ".png".
    files.replace(out / "curves.png", lambda path: report.plot_curves(built.history, path, test=built.accuracy),
                  suffix=".png")
    files.replace(out / "ranks.png", lambda path: report.plot_ranks(built.layers, path), suffix=".png")
    files.write_text(out / "spec.cstar", context.options.spec_text)
    files.write_text(out / checkpoint.LOCK, json.dumps(lock, indent=2) + "\n")
    # The checkpoint goes last: until every artifact is on disk, --resume can still finish the run.
    files.remove(out / checkpoint.CHECKPOINT)


def _export(context: Context) -> tuple[Export, ...]:
    """The recipe's `export` formats, each checked against PyTorch (see ``cstar_dsl.export``)."""
    from ..deploy.export import ExportError, export

    written: list[Export] = []
    for fmt in context.spec.export.formats:
        try:
            exported = export(context.options.out, fmt, opset=context.spec.export.opset)
        except ExportError as error:
            raise CompileError(f"the model is compiled and saved, but exporting it as {fmt} failed: {error}",
                               help=f"`cstar export {context.options.out} --format {fmt}` retries just the export; "
                                    "or drop the format from the recipe's `export` block") from None
        written.append(Export(format=fmt, file=exported.path.name, bytes=exported.bytes,
                              max_abs_diff=exported.max_abs_diff, checked_with=exported.checked_with))
    return tuple(written)
