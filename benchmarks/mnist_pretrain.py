"""The MNIST benchmark's shared start: PGD adversarial training of the dense `cstar:mnist-cnn`.

    python benchmarks/mnist_pretrain.py --epochs 12 --out benchmarks/results/mnist-dense.safetensors
    python benchmarks/mnist_pretrain.py --arch mnist-cnn-x2   # -> benchmarks/results/mnist-x2-dense.safetensors

Every method of benchmarks/mnist.py starts from these weights (the spec's `model.weights`), so the
comparison isolates what each method does after the dense robust training.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from cstar_dsl import build_model, datasets, load_spec
from cstar_dsl.model.zoo import Normalized
from cstar_dsl.train.attacks import Pgd, accuracy
from cstar_dsl.train.optimize import adversarial_epoch, make_optimizer, make_schedule, training_attack

SPEC = Path(__file__).resolve().parent.parent / "specs" / "mnist.cstar"
sys.path.insert(0, str(SPEC.parent.parent / "benchmarks"))
from mnist import BENCH, DATA, Bench  # noqa: E402  (the benchmark's own paths, beside this file)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--arch", default=BENCH.arch, choices=("mnist-cnn", "mnist-cnn-x2", "mnist-cnn-x4"))
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--data", type=Path, default=DATA, help="the MNIST folder (torchvision's IDX layout)")
    parser.add_argument("--results", type=Path, default=BENCH.results, help="where the benchmark's files go")
    parser.add_argument("--out", type=Path, default=None,
                        help="the weights (default: the benchmark's dense start for --arch)")
    args = parser.parse_args(argv)
    bench = Bench(args.arch, args.device, args.data.resolve(), args.results.resolve())
    out = args.out or bench.dense
    spec = load_spec(SPEC)
    # specs/mnist.cstar's training recipe for every width: only the architecture and the data folder change.
    spec = spec.model_copy(update={"model": spec.model.model_copy(update={"arch": f"cstar:{args.arch}"}),
                                   "data": spec.data.model_copy(update={"root": bench.data})})
    device = torch.device(args.device)
    torch.manual_seed(spec.train.seed)
    data = datasets(spec)
    net = build_model(spec)
    model = Normalized(net, data.mean, data.std).to(device)
    phase = spec.train.pretrain.model_copy(update={"epochs": args.epochs})
    optimizer = make_optimizer(phase, model.parameters())
    schedule = make_schedule(phase, optimizer)
    attack = training_attack(spec.threat)
    generator = torch.Generator().manual_seed(spec.train.seed)
    x, y = (t.to(device) for t in data.train.tensors)
    # On the CPU the data order and the attacks' random starts share one stream, as when the committed start was
    # made; a GPU's attacks need a generator of their own device.
    seed = spec.train.seed
    attack_generator = generator if device.type == "cpu" else torch.Generator(device=device).manual_seed(seed)
    size = spec.data.batch_size
    log = []
    for epoch in range(args.epochs):
        order = torch.randperm(len(y), generator=generator).to(device)
        batches = [(x[order[i:i + size]], y[order[i:i + size]]) for i in range(0, len(y), size)]
        result = adversarial_epoch(model, batches, optimizer, attack, phase="pretrain", epoch=epoch,
                                   generator=attack_generator)
        schedule.step()
        log.append(result.__dict__)
        print(f"epoch {epoch}: loss {result.loss:.3f} clean {result.clean:.3f} robust {result.robust:.3f} "
              f"{result.seconds:.0f}s", flush=True)
    tx, ty = (t.to(device) for t in data.test.tensors)
    test = [(tx[i:i + 500], ty[i:i + 500]) for i in range(0, len(ty), 500)]
    clean = accuracy(model, test)
    robust = accuracy(model, test, Pgd(eps=0.3, step=0.025, steps=20), torch.Generator(device=device).manual_seed(0))
    print(f"test clean {clean:.4f} PGD-20 {robust:.4f}", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, str(out))
    out.with_suffix(".json").write_text(json.dumps(
        {"arch": args.arch, "epochs": log, "test": {"clean": clean, "pgd20": robust},
         "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
         "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
         "finished": time.strftime("%Y-%m-%d %H:%M")}, indent=2))


if __name__ == "__main__":
    main()
