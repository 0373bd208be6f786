"""Compile driver, outputs: the report dict (report.json) and the artifacts written into the out folder."""

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
from ..lang.spec import Spec
from ..report import document as report
from ..train import checkpoint
from ..train.data import dataset_size
from .state import CompileError, CompileOptions, Context, Run

REPORT_SCHEMA = "cstar.report/1"
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
                 latency: LatencyComparison | None) -> dict[str, Any]:
    """The report of the run, as report.json holds it (schema ``REPORT_SCHEMA``)."""
    spec = context.spec
    assert run.plan is not None
    totals = run.plan["totals"]
    measured = {"clean": result.clean, "robust": result.worst_robust}
    requirements = []
    for requirement in spec.evaluate.requirements:
        value = measured[requirement.metric]
        floor = requirement.value
        met = value is not None and (value >= floor if requirement.op == ">=" else value > floor)
        requirements.append({"metric": requirement.metric, "op": requirement.op, "value": requirement.value,
                             "measured": value, "met": met})
    target = spec.compress.budget
    return {
        "schema": REPORT_SCHEMA,
        "spec": context.options.spec_name,
        "spec_sha256": checkpoint.sha256_text(spec_identity(spec, recipe_folder(context.options))),
        "method": spec.compress.method,
        "structure_choice": run.choice.to_dict() if run.choice else None,
        "compression": {"budget": run.plan.get("budget"), "metric": target.metric,
                        "target_ratio": getattr(target, "ratio", None),
                        "params_dense": totals["params_before"], "params_compressed": totals["params_after"],
                        "ratio": totals["params_before"] / max(1, totals["params_after"]),
                        "macs_dense": totals["macs_before"], "macs_compressed": totals["macs_after"],
                        "other_params": totals["other_params"]},
        "accuracy": {"clean": result.clean, "robust": result.robust},
        "latency": None if latency is None else latency.to_dict(),
        "attacks": result.attacks,
        "threat": spec.threat.model_dump(mode="json"),
        "requirements": requirements,
        "layers": [{("type" if key == "type_name" else key): value for key, value in layer.items()}
                   for layer in run.plan["layers"]],
        "history": run.history,
        "timings": {"total_seconds": seconds, "phases": run.phase_seconds, "evaluate_seconds": result.seconds},
        "data": {"name": context.data.name, "train_size": dataset_size(context.data.train),
                 "test_size": result.samples},
        "machine": {"device": str(context.device), "processor": platform.processor() or platform.machine(),
                    "threads": torch.get_num_threads(), "python": platform.python_version(),
                    "torch": torch.__version__, "cstar": __version__},
        "seed": spec.train.seed,
        "warnings": [*context.options.warnings, *run.plan.get("warnings", [])],
        "resolved": recipe_meaning(spec, recipe_folder(context.options)),
    }


def write_artifacts(context: Context, run: Run, built: dict[str, Any], lock: dict[str, Any]) -> None:
    """The model files, the exports, the report and its plots, the recipe and the lock; the checkpoint removed last."""
    out = context.options.out
    assert run.model is not None
    description = model_description(context.spec.model, context.spec.compress.method, run.structure,
                                     context.data.mean, context.data.std)
    description["plan"] = run.plan
    save_model(out, run.model, description)
    built["exports"] = _export(context)
    files.write_text(out / "report.json", json.dumps(built, indent=2) + "\n")
    files.write_text(out / "report.md", report.markdown(built))
    # savefig picks the format from the name, so the temporary file keeps ".png".
    files.replace(out / "curves.png", lambda path: report.plot_curves(built["history"], path, test=built["accuracy"]),
                  suffix=".png")
    files.replace(out / "ranks.png", lambda path: report.plot_ranks(built["layers"], path), suffix=".png")
    files.write_text(out / "spec.cstar", context.options.spec_text)
    files.write_text(out / checkpoint.LOCK, json.dumps(lock, indent=2) + "\n")
    # The checkpoint goes last: until every artifact is on disk, --resume can still finish the run.
    files.remove(out / checkpoint.CHECKPOINT)


def _export(context: Context) -> list[dict[str, Any]]:
    """The recipe's `export` formats, each checked against PyTorch (see ``cstar_dsl.export``)."""
    from ..deploy.export import ExportError, export

    written = []
    for fmt in context.spec.export.formats:
        try:
            exported = export(context.options.out, fmt, opset=context.spec.export.opset)
        except ExportError as error:
            raise CompileError(f"the model is compiled and saved, but exporting it as {fmt} failed: {error}",
                               help=f"`cstar export {context.options.out} --format {fmt}` retries just the export; "
                                    "or drop the format from the recipe's `export` block") from None
        written.append({"format": fmt, "file": exported.path.name, "bytes": exported.bytes,
                        "max_abs_diff": exported.max_abs_diff, "checked_with": exported.checked_with})
    return written
