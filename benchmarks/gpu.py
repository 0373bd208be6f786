"""GPU benchmark: one prepared script for a CUDA machine, from a fresh checkout, in under 8 minutes.

    python benchmarks/gpu.py --out benchmarks/results/gpu --data .data/mnist-10k
    python benchmarks/gpu.py --toy --out runs/gpu-toy          # the same steps at toy size, on the CPU

It does three things, each written to gpu.json as soon as it is done, so a run cut short keeps what it measured:

1. `tests`: runs the tests that need a GPU (tests/test_gpu.py and the GPU case of tests/eval/test_robustness.py).
2. `throughput`: PGD-7 adversarial-training images per second for the CIFAR ResNet-18 recipe
   (specs/resnet18.cstar) on CIFAR-format data made on the fly: dense, factorized and channel-pruned at 16x,
   fp32 against bf16 autocast, with and without channels_last.
3. `mnist`: the MNIST benchmark end to end for each `--archs` CNN (default the width-x4 `mnist-cnn-x4`):
   the dense start (benchmarks/mnist_pretrain.py), then every method at 16x and 64x (benchmarks/mnist.py), the
   cells of one CNN in parallel processes on the one GPU. Cells and tables land under `--out`/mnist.

A deadline (`--minutes`) bounds the whole run: a part that would start after it is skipped and says so.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pickle
import platform
import re
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import torch

if TYPE_CHECKING:
    from cstar_dsl.lang.spec import Spec
    from cstar_dsl.train.attacks import Pgd

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
from mnist import Bench  # noqa: E402  (the MNIST benchmark beside this file)

GPU_TESTS = ["tests/test_gpu.py", "tests/eval/test_robustness.py::test_the_attacks_run_on_the_gpu_when_asked"]
MNIST_METHODS = ("dense", "svd-finetune", "cstar", "channel-prune", "channel-prune-global", "channel-prune-taylor",
                 "channel-prune-global-taylor")
STRUCTURES = ("dense", "factorized", "pruned")


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How big each part runs: the real sizes on a GPU, toy ones for the CPU test of this script."""

    cifar_images: int = 4096
    batch: int = 128
    warmup_steps: int = 3
    timed_steps: int = 10
    pretrain_epochs: int = 12
    mnist_train: int | None = None  # None: the real MNIST folder of --data
    mnist_test: int | None = None


REAL, TOY = Sizes(), Sizes(cifar_images=16, batch=4, warmup_steps=1, timed_steps=1, pretrain_epochs=1,
                           mnist_train=64, mnist_test=32)


class Deadline:
    def __init__(self, minutes: float) -> None:
        self.end = time.monotonic() + 60 * minutes

    def left(self) -> float:
        return self.end - time.monotonic()


# ------------------------------------------------------------------------------------------------- tests


def run_tests() -> dict[str, object]:
    """The GPU tests in a fresh interpreter; their counts come from pytest's closing line."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *GPU_TESTS],
                          cwd=ROOT, capture_output=True, text=True, check=False)
    output = done.stdout + done.stderr
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|error|errors)", output)}
    return {"returncode": done.returncode, "counts": counts, "seconds": round(time.perf_counter() - started, 1),
            "tail": output[-3000:]}


# -------------------------------------------------------------------------------------------- throughput


def fake_cifar10(root: Path, images: int) -> None:
    """CIFAR-10 as torchvision's python archive lays it out: five train batches, a test batch, batches.meta."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    per_batch = max(1, images // 5)

    def dump(name: str, count: int) -> None:
        pixels = torch.randint(0, 256, (count, 3072), generator=generator, dtype=torch.uint8).numpy()
        batch = {b"batch_label": name.encode(), b"labels": [i % 10 for i in range(count)], b"data": pixels,
                 b"filenames": [f"{i}.png".encode() for i in range(count)]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))

    for index in range(1, 6):
        dump(f"data_batch_{index}", per_batch)
    dump("test_batch", per_batch)
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)]}))


def cifar_recipe(folder: Path, data_root: Path, device: str) -> Path:
    """specs/resnet18.cstar on the made-up data, with PGD-7 training examples."""
    path = folder / "resnet18-throughput.cstar"
    path.write_text(f'extend "{ROOT / "specs" / "resnet18.cstar"}"\n\ndata {{\n  root = "{data_root}"\n}}\n\n'
                    f"threat {{\n  steps = 7\n}}\n\ntrain {{\n  device = {device}\n}}\n")
    return path


def structures(spec: Spec, net: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The dense ResNet-18, and the factorized and the channel-pruned models at the recipe's 16x budget."""
    from cstar_dsl import factorize, make_plan
    from cstar_dsl.model.prune import prune_to_plan

    plan = make_plan(spec, net)
    example = torch.zeros(1, *spec.model.input)
    pruned = prune_to_plan(net, spec, plan, example, allocation=spec.compress.allocation).model
    return {"dense": net, "factorized": factorize(net, plan, spec), "pruned": pruned}


def images_per_second(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], attack: Pgd, *,
                      warmup: int, precision: torch.dtype | None) -> float:
    from cstar_dsl.train.optimize import adversarial_epoch

    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    device = batches[0][0].device
    generator = torch.Generator(device=device).manual_seed(0)
    adversarial_epoch(model, batches[:warmup], optimizer, attack, phase="warmup", epoch=0, generator=generator,
                      precision=precision)
    _synchronize(device)
    started = time.perf_counter()
    adversarial_epoch(model, batches[warmup:], optimizer, attack, phase="timed", epoch=0, generator=generator,
                      precision=precision)
    _synchronize(device)
    return sum(len(y) for _, y in batches[warmup:]) / (time.perf_counter() - started)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_throughput(device: torch.device, sizes: Sizes, scratch: Path) -> list[dict[str, object]]:
    import copy

    from cstar_dsl import build_model, datasets
    from cstar_dsl.lang.validate import load_spec
    from cstar_dsl.model.prune import weight_params
    from cstar_dsl.model.zoo import Normalized
    from cstar_dsl.train.optimize import training_attack

    fake_cifar10(scratch / "cifar10", sizes.cifar_images)
    spec = load_spec(cifar_recipe(scratch, scratch / "cifar10", device.type))
    data = datasets(spec)
    x, y = data.train.tensors
    steps = sizes.warmup_steps + sizes.timed_steps
    picks = torch.arange(steps * sizes.batch) % len(y)
    attack = training_attack(spec.threat)
    rows = []
    for name, net in structures(spec, build_model(spec)).items():
        for channels_last in (False, True):
            layout = torch.channels_last if channels_last else torch.contiguous_format
            batches = [(x[picks[i:i + sizes.batch]].to(device, memory_format=layout),
                        y[picks[i:i + sizes.batch]].to(device)) for i in range(0, len(picks), sizes.batch)]
            for precision in (None, torch.bfloat16):
                # Two calls: torch's types have no overload for a device and a memory format together.
                model = Normalized(copy.deepcopy(net), data.mean, data.std).to(device).to(memory_format=layout)
                rate = images_per_second(model, batches, attack, warmup=sizes.warmup_steps, precision=precision)
                rows.append({"structure": name, "params": weight_params(net), "channels_last": channels_last,
                             "precision": "bf16" if precision else "fp32", "images_per_second": round(rate, 1),
                             "batch": sizes.batch, "attack": f"PGD-{spec.threat.steps}"})
    return rows


def throughput_table(rows: list[dict[str, object]]) -> str:
    lines = ["| structure | params | precision | channels_last | images/s |", "|---|---:|---|---|---:|"]
    lines += [f"| {r['structure']} | {r['params']:,} | {r['precision']} | {'yes' if r['channels_last'] else 'no'} "
              f"| {r['images_per_second']:,.0f} |" for r in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ mnist


def tiny_mnist(root: Path, train: int, test: int) -> Path:
    """Random digits in MNIST's IDX layout (torchvision's MNIST/raw/), for the toy run."""
    folder = root / "MNIST" / "raw"
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    for prefix, count in (("train", train), ("t10k", test)):
        images = torch.randint(0, 256, (count, 28, 28), generator=generator, dtype=torch.uint8)
        labels = (torch.arange(count) % 10).to(torch.uint8)
        (folder / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, count, 28, 28)
                                                              + images.numpy().tobytes())
        (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, count) + labels.numpy().tobytes())
    return root


def run_mnist(arch: str, device: str, data: Path, results: Path, sizes: Sizes, deadline: Deadline,
              workers: int, logs: Path, seeds: list[int], methods: list[str]) -> dict[str, object]:
    """The dense start (unless it is there already), then one process per cell, at most ``workers`` at a time."""
    common = ["--arch", arch, "--device", device, "--data", str(data)]
    started = time.perf_counter()
    outcome: dict[str, object] = {"arch": arch}
    if not Bench(arch, results=results).dense.exists():
        pretrain = _run([sys.executable, str(BENCHMARKS / "mnist_pretrain.py"), *common, "--results", str(results),
                         "--epochs", str(sizes.pretrain_epochs)], logs / f"{arch}-pretrain.log", deadline.left())
        outcome["pretrain"] = pretrain
        if pretrain["returncode"] != 0:
            return outcome
    # One process per cell: cstar's ADMM epochs train the dense model, so its two cells are the longest path.
    pending = [(f"{method}-{ratio}x-seed{seed}",
                [sys.executable, str(BENCHMARKS / "mnist.py"), "run", *common, "--results", str(results),
                 "--methods", method, "--ratios", str(ratio), "--seed", str(seed)])
               for seed in seeds for method in methods for ratio in ((1,) if method == "dense" else (16, 64))
               if not (method == "dense" and seed != seeds[0])]  # dense PGD-AT is the reference, run once
    running: list[tuple[str, subprocess.Popen[bytes], float, BinaryIO]] = []
    cells: dict[str, object] = {}
    while pending or running:
        while pending and len(running) < workers:
            cell, command = pending.pop(0)
            log = (logs / f"{arch}-{cell}.log").open("wb")
            running.append((cell, subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                                   env=_one_thread()), time.perf_counter(), log))
        time.sleep(1)
        for entry in list(running):
            cell, process, since, cell_log = entry
            if process.poll() is None and deadline.left() > 0:
                continue
            if process.poll() is None:
                process.kill()
            cells[cell] = {"returncode": process.wait(), "seconds": round(time.perf_counter() - since, 1)}
            cell_log.close()
            running.remove(entry)
    table = subprocess.run([sys.executable, str(BENCHMARKS / "mnist.py"), "table", "--arch", arch, "--results",
                            str(results)], cwd=ROOT, capture_output=True, text=True, check=False)
    outcome.update(cells=cells, table=table.stdout.strip(), seconds=round(time.perf_counter() - started, 1))
    return outcome


def _run(command: list[str], log: Path, timeout: float) -> dict[str, object]:
    started = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=max(1.0, timeout),
                              env=_one_thread(), check=False)
        code, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as expired:
        # The output caught before a timeout is bytes even with text=True.
        caught = expired.stdout.decode(errors="replace") if isinstance(expired.stdout, bytes) else expired.stdout
        code, output = -9, f"timed out after {timeout:.0f} s\n{caught or ''}"
    log.write_text(output)
    return {"returncode": code, "seconds": round(time.perf_counter() - started, 1), "tail": output[-1500:]}


def _one_thread() -> dict[str, str]:
    # Each cell process drives the GPU; a CPU thread each keeps the cells from fighting over the cores.
    return {**os.environ, "OMP_NUM_THREADS": "1"}


# ------------------------------------------------------------------------------------------------- main


def machine(device: torch.device) -> dict[str, object]:
    found: dict[str, object] = {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                                "torch": torch.__version__, "python": platform.python_version(),
                                "device": device.type, "date": time.strftime("%Y-%m-%d")}
    if device.type == "cuda":
        found.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                     tf32_convolutions=torch.backends.cudnn.allow_tf32)
    return found


def run_part(part: str, args: argparse.Namespace, device: torch.device, sizes: Sizes, deadline: Deadline,
             data: Path, scratch: Path) -> object:
    if part == "tests":
        return run_tests()
    if part == "throughput":
        rows = run_throughput(device, sizes, scratch)
        print(throughput_table(rows), flush=True)
        return {"rows": rows, "table": throughput_table(rows)}
    logs = args.out / "logs"
    # The CNNs run side by side: their cells share the one GPU, filling each other's idle time.
    with ThreadPoolExecutor(max_workers=len(args.archs)) as pool:
        return list(pool.map(lambda arch: run_mnist(arch, device.type, data, args.out / "mnist", sizes, deadline,
                                                    args.workers, logs, args.seeds, args.methods), args.archs))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=BENCHMARKS / "results" / "gpu", help="where gpu.json goes")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "mnist-10k",
                        help="the MNIST folder (torchvision's IDX layout); unused with --toy")
    parser.add_argument("--parts", nargs="*", default=["tests", "throughput", "mnist"],
                        choices=("tests", "throughput", "mnist"))
    parser.add_argument("--archs", nargs="*", default=["mnist-cnn-x4"],
                        choices=("mnist-cnn", "mnist-cnn-x2", "mnist-cnn-x4"))
    parser.add_argument("--methods", nargs="*", default=list(MNIST_METHODS), choices=MNIST_METHODS)
    parser.add_argument("--seeds", type=int, nargs="*", default=[0], help="the compression's seeds")
    parser.add_argument("--batch", type=int, default=None, help="the throughput batch (default 128)")
    parser.add_argument("--workers", type=int, default=2 * len(MNIST_METHODS) - 1,
                        help="cell processes at a time, for each CNN")
    parser.add_argument("--minutes", type=float, default=7.5, help="the deadline of the whole run")
    parser.add_argument("--toy", action="store_true", help="toy sizes on the CPU: a test of this script")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.toy else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device is visible; use --toy to try the script on the CPU")
    sizes, deadline = (TOY if args.toy else REAL), Deadline(args.minutes)
    if args.batch is not None:
        sizes = dataclasses.replace(sizes, batch=args.batch)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "logs").mkdir(exist_ok=True)
    skipped: list[str] = []
    report: dict[str, object] = {"machine": machine(device), "toy": args.toy, "skipped": skipped}

    def save() -> None:
        (args.out / "gpu.json").write_text(json.dumps(report, indent=2) + "\n")

    with tempfile.TemporaryDirectory() as scratch:
        data = tiny_mnist(Path(scratch) / "mnist", sizes.mnist_train or 0, sizes.mnist_test or 0) if args.toy \
            else args.data.resolve()
        for part in args.parts:
            if deadline.left() <= 0:
                skipped.append(part)
                continue
            started = time.perf_counter()
            try:
                report[part] = run_part(part, args, device, sizes, deadline, data, Path(scratch))
            except Exception:  # one failed part must not cost the others their device time
                report[part] = {"error": traceback.format_exc()}
            print(f"{part}: {time.perf_counter() - started:.0f} s", flush=True)
            save()
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
