"""MNIST benchmark: dense PGD-AT, cstar, svd-finetune and channel-prune at 16x, 64x and 256x.

Every method starts from the same adversarially trained dense model (benchmarks/mnist_pretrain.py)
and gets the same number of epochs after it; every number comes from `cstar compile` itself
(the API behind the CLI), evaluated with PGD-20 (eps 0.3, step 0.025) on the 2,000 test images.

    python benchmarks/mnist_pretrain.py                      # the shared dense start (~15 min)
    python benchmarks/mnist.py run --ratios 16 64 256        # one cell per (method, ratio)
    python benchmarks/mnist.py table                         # -> benchmarks/results/mnist.json, mnist.md, mnist.png

Cells are written one file each (benchmarks/results/mnist/), so runs can be split across
processes and machines and a killed run redoes only its unfinished cell.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CELLS = RESULTS / "mnist"
DENSE = RESULTS / "mnist-dense.safetensors"
METHODS = ("cstar", "svd-finetune", "channel-prune")
ADMM_EPOCHS, FINETUNE_EPOCHS = 4, 3  # cstar: 4 ADMM + 3 fine-tuning; the baselines: 7 fine-tuning


@dataclass(frozen=True)
class Setting:
    """The knobs a cell may turn away from the benchmark's defaults: the ones the issue asks about
    when cstar loses (rho schedule, Z/U interval, rank floor and policy, fine-tuning lr)."""

    admm_epochs: int = ADMM_EPOCHS
    finetune_lr: float = 0.01
    rho: float = 0.25
    rho_max: float = 2.0
    interval: str = "1 epoch"
    policy: str = "global"
    min_rank: int | None = None  # None: 2, or 1 at 256x, where a floor of 2 cannot reach the budget
    random_start: bool = False  # a diagnostic: the compressed structure trained from random weights
    # The planner keeps the classifier (the model's output layer) dense, as channel-prune never prunes
    # its outputs: at rank 2 its 10 logits would span a plane. None: kept where the budget allows it
    # (not at 256x, where the largest reachable ratio is then 145x).
    keep_classifier: bool | None = None

    def cuts_classifier(self, method: str, ratio: int) -> bool:
        if method == "channel-prune":
            return False  # the pruner never prunes the classifier's outputs
        return not self.keep_classifier if self.keep_classifier is not None else ratio >= 256

    def floor(self, ratio: int) -> int:
        return self.min_rank if self.min_rank is not None else (1 if ratio >= 256 else 2)

    def changes(self, method: str) -> list[tuple[str, str]]:
        """(cell-name part, table words) for each setting that differs from the default and applies."""
        default, found = Setting(), []
        if method == "cstar":
            if self.admm_epochs != default.admm_epochs:
                found.append((f"admm{self.admm_epochs}", ""))  # the schedule's own words say it
            if (self.rho, self.rho_max) != (default.rho, default.rho_max):
                found.append((f"rho{self.rho:g}-{self.rho_max:g}", f"rho {self.rho:g} to {self.rho_max:g}"))
            if self.interval != default.interval:
                found.append((f"every{self.interval.split()[0]}", f"Z/U every {self.interval}"))
        if self.finetune_lr != default.finetune_lr:
            found.append((f"lr{self.finetune_lr:g}", f"at lr {self.finetune_lr:g}"))
        if self.policy != default.policy:
            found.append((re.sub(r"[^a-z0-9.]+", "", self.policy), f"policy {self.policy}"))
        if self.min_rank is not None:
            found.append((f"floor{self.min_rank}", f"rank floor {self.min_rank}"))
        if self.random_start:
            found.append(("random", "from random weights, not the dense start"))
        if self.keep_classifier is not None and method != "channel-prune":
            found.append(("keepfc" if self.keep_classifier else "fclowrank",
                          "classifier dense" if self.keep_classifier else "classifier low-rank"))
        return found


DEFAULT = Setting()


def variant(method: str, ratio: int, setting: Setting = DEFAULT, folder: Path | None = None) -> str:
    """The recipe of one cell: specs/mnist.cstar from the dense start, this method and budget; cstar
    splits the same total epochs into ``setting.admm_epochs`` of ADMM and the rest of fine-tuning.
    Written into ``folder``, its paths are relative to it, so the cell runs from any checkout."""

    def path(target: Path) -> str:
        return os.path.relpath(target, folder) if folder is not None else str(target)

    total = ADMM_EPOCHS + FINETUNE_EPOCHS
    if method == "cstar":
        phases = f"""
  admm {{
    epochs = {setting.admm_epochs}
    lr = 0.01
    schedule = constant  # the W-step must still move W onto Z in the last ADMM epoch
    rho = {setting.rho:g}
    rho_schedule = geometric(factor = 2, max = {setting.rho_max:g})
    interval = {setting.interval}
  }}
  finetune {{
    epochs = {total - setting.admm_epochs}
    lr = {setting.finetune_lr:g}
  }}"""
    else:
        phases = f"""
  finetune {{
    epochs = {total}
    lr = {setting.finetune_lr:g}
  }}"""
    start = "random weights" if setting.random_start else "the shared adversarially trained dense start"
    weights = "" if setting.random_start else f'\n  weights = "{path(DENSE)}"'
    cut = f'\n\n  layer "fc" {{  # the budget may cut the classifier too\n    min_rank = {setting.floor(ratio)}\n  }}' \
        if setting.cuts_classifier(method, ratio) else ""
    return f"""# benchmarks/mnist.py: {method} at {ratio}x from {start}
model {{
  arch = "cstar:mnist-cnn"
  classes = 10
  input = [1, 28, 28]{weights}
}}

data {{
  dataset = mnist
  root = "{path(ROOT.parent / 'shared' / 'data' / 'mnist-10k')}"
  batch_size = 128
  augment = none
}}

threat {{
  norm = linf
  eps = 0.3
  step = 0.1
  steps = 7
}}

compress {{
  method = {method}
  budget = {ratio}x params
  policy = {setting.policy}
  min_rank = {setting.floor(ratio)}  # 2, or 1 at 256x: with a floor of 2 the largest reachable ratio is 178x{cut}
}}

train {{
  seed = 0
  device = cpu
{phases}
}}

evaluate {{
  attacks = [pgd(steps = 20, step = 0.025)]  # 20 steps can travel 0.5 > eps
}}
"""


def cell_name(method: str, ratio: int, setting: Setting = DEFAULT) -> str:
    return "-".join([method, *(part for part, _ in setting.changes(method)), f"{ratio}x"])


def run_cell(method: str, ratio: int, setting: Setting = DEFAULT) -> dict[str, object]:
    from cstar_dsl.pipeline import CompileOptions, compile_spec
    from cstar_dsl.validate import check_file

    folder = CELLS / cell_name(method, ratio, setting)
    folder.mkdir(parents=True, exist_ok=True)
    spec_path = folder / "spec.cstar"
    spec_path.write_text(variant(method, ratio, setting, folder))
    spec = check_file(spec_path).spec
    started = time.perf_counter()
    compiled = compile_spec(spec, CompileOptions(out=folder / "run", force=True, spec_name=str(spec_path),
                                                 spec_text=spec_path.read_text()))
    report = compiled.report
    history = report["history"]
    return {"method": method, "target_ratio": ratio, "ratio": report["compression"]["ratio"],
            "schedule": schedule(method, setting),
            "params": report["compression"]["params_compressed"], "clean": report["accuracy"]["clean"],
            "robust": next(iter(report["accuracy"]["robust"].values())), "seconds": time.perf_counter() - started,
            "epoch_seconds": {phase: _mean([r["seconds"] for r in history if r["phase"] == phase])
                              for phase in ("admm", "finetune")},
            "zstep_seconds": sum(r.get("zstep_seconds", 0.0) for r in history)}


def schedule(method: str, setting: Setting = DEFAULT) -> str:
    total = ADMM_EPOCHS + FINETUNE_EPOCHS
    words = ", ".join(text for _, text in setting.changes(method) if text)
    base = f"{setting.admm_epochs} ADMM + {total - setting.admm_epochs} fine-tuning" if method == "cstar" \
        else f"{total} fine-tuning"
    return f"{base}, {words}" if words else base


def run_dense() -> dict[str, object]:
    """Dense PGD-AT for the same epochs as the other methods, from the same start."""
    from cstar_dsl import build_model, datasets, load_spec
    from cstar_dsl.evaluation import evaluate
    from cstar_dsl.models import Normalized
    from cstar_dsl.optimize import adversarial_epoch, make_optimizer, make_schedule, training_attack
    from cstar_dsl.prune import weight_params

    folder = CELLS / "dense"
    folder.mkdir(parents=True, exist_ok=True)
    spec_path = folder / "spec.cstar"
    spec_path.write_text(variant("svd-finetune", 16))
    spec = load_spec(spec_path)
    data = datasets(spec)
    net = build_model(spec)
    model = Normalized(net, data.mean, data.std)
    phase = spec.train.finetune
    optimizer, started = make_optimizer(phase, model.parameters()), time.perf_counter()
    lr_schedule, attack = make_schedule(phase, optimizer), training_attack(spec.threat)
    x, y = data.train.tensors
    epoch_seconds = []
    for epoch in range(phase.epochs):
        generator = torch.Generator().manual_seed(epoch)
        order = torch.randperm(len(y), generator=generator)
        batches = [(x[order[i:i + 128]], y[order[i:i + 128]]) for i in range(0, len(y), 128)]
        epoch_seconds.append(adversarial_epoch(model, batches, optimizer, attack, phase="dense", epoch=epoch,
                                               generator=generator).seconds)
        lr_schedule.step()
    result = evaluate(model, data.test, spec.evaluate, spec.threat, seed=0, device=torch.device("cpu"))
    params = weight_params(net)
    return {"method": "dense", "target_ratio": 1, "ratio": 1.0, "schedule": f"{phase.epochs} PGD-AT",
            "params": params, "clean": result.clean,
            "robust": next(iter(result.robust.values())), "seconds": time.perf_counter() - started,
            "epoch_seconds": {"dense": _mean(epoch_seconds)}}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def machine() -> dict[str, object]:
    return {"processor": platform.processor() or platform.machine(), "cores": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}


def table() -> None:
    rows = [json.loads(p.read_text()) for p in sorted(CELLS.glob("*.json"))]
    for row in rows:  # cells written before the schedule was recorded ran the default one
        row.setdefault("schedule", "7 PGD-AT" if row["method"] == "dense" else schedule(row["method"]))
    order = {"dense": 0, **{m: i + 1 for i, m in enumerate(METHODS)}}
    rows.sort(key=lambda r: (r["target_ratio"], order[r["method"]], r["schedule"] != schedule(r["method"])))
    keys = ("method", "target_ratio", "ratio", "params", "clean", "robust", "seconds", "schedule")
    (RESULTS / "mnist.json").write_text(json.dumps([{k: r[k] for k in keys} for r in rows], indent=2) + "\n")
    lines = ["| method | schedule after the dense start | target | achieved ratio | params | clean | PGD-20 robust "
             "| seconds |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['schedule']} | {r['target_ratio']}x | {r['ratio']:.2f}x | {r['params']:,} "
                     f"| {r['clean']:.1%} | {r['robust']:.1%} | {r['seconds']:.0f} |")
    text = "\n".join(lines)
    machines = sorted({json.dumps(r.get("machine", {}), sort_keys=True) for r in rows})
    (RESULTS / "mnist.md").write_text(text + "\n\nmachines: " + "; ".join(machines) + "\n")
    print(text)
    _plot(rows)


def _plot(rows: list[dict[str, object]]) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4), layout="constrained")
    axes = figure.add_subplot()
    for method in METHODS:
        for words in sorted({r["schedule"] for r in rows if r["method"] == method}):
            points = sorted((r["ratio"], r["robust"]) for r in rows
                            if (r["method"], r["schedule"]) == (method, words))
            label = method if words == schedule(method) else f"{method} ({words})"
            axes.plot(*zip(*points, strict=True), marker="o", label=label,
                      linestyle="-" if label == method else "--")
    for r in rows:
        if r["method"] == "dense":
            axes.axhline(r["robust"], color="grey", linestyle="--", label="dense PGD-AT")
    axes.set_xscale("log", base=2)
    axes.set_xlabel("compression ratio (conv + linear weights)")
    axes.set_ylabel("PGD-20 robust accuracy (eps 0.3)")
    axes.set_title("MNIST, mnist-cnn (0.58M params)")
    axes.legend()
    figure.savefig(RESULTS / "mnist.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("run", "table"))
    parser.add_argument("--ratios", type=int, nargs="*", default=[16, 64, 256])
    parser.add_argument("--methods", nargs="*", default=["dense", *METHODS])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 per process runs tiny convs fastest)")
    parser.add_argument("--admm-epochs", type=int, default=DEFAULT.admm_epochs,
                        help="how many of cstar's epochs are ADMM (the rest fine-tune)")
    parser.add_argument("--finetune-lr", type=float, default=DEFAULT.finetune_lr, help="the fine-tuning phase's lr")
    parser.add_argument("--rho", type=float, default=DEFAULT.rho, help="cstar's first ADMM penalty")
    parser.add_argument("--rho-max", type=float, default=DEFAULT.rho_max, help="the cap of rho's doubling")
    parser.add_argument("--interval", default=DEFAULT.interval, help="the Z/U interval, e.g. '16 steps'")
    parser.add_argument("--policy", default=DEFAULT.policy, help="the rank policy, e.g. uniform")
    parser.add_argument("--min-rank", type=int, default=None, help="the rank floor (default 2, or 1 at 256x)")
    parser.add_argument("--classifier", choices=("auto", "dense", "low-rank"), default="auto",
                        help="the low-rank methods' classifier: dense where the budget allows (auto), or always either")
    parser.add_argument("--random-start", action="store_true",
                        help="start from random weights instead of the dense start (a diagnostic of the structure)")
    args = parser.parse_args()
    classifier = {"auto": None, "dense": True, "low-rank": False}[args.classifier]
    setting = Setting(args.admm_epochs, args.finetune_lr, args.rho, args.rho_max, args.interval, args.policy,
                      args.min_rank, args.random_start, classifier)
    if args.action == "table":
        table()
        return
    torch.set_num_threads(args.threads)
    if not DENSE.exists() and not setting.random_start:
        raise SystemExit(f"no dense start at {DENSE}: run benchmarks/mnist_pretrain.py first")
    CELLS.mkdir(parents=True, exist_ok=True)
    for method in args.methods:
        for ratio in ([1] if method == "dense" else args.ratios):
            cell = CELLS / f"{cell_name(method, ratio, setting)}.json"
            if cell.exists():
                continue
            row = run_dense() if method == "dense" else run_cell(method, ratio, setting)
            row["machine"] = machine()
            cell.write_text(json.dumps(row, indent=2) + "\n")
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
