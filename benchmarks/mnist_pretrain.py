"""The MNIST benchmark's shared start: PGD adversarial training of the dense `cstar:mnist-cnn`.

    python benchmarks/mnist_pretrain.py --epochs 12 --out benchmarks/results/mnist-dense.safetensors

Every method of benchmarks/mnist.py starts from these weights (the spec's `model.weights`), so the
comparison isolates what each method does after the dense robust training.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from cstar_dsl import build_model, datasets, load_spec
from cstar_dsl.attacks import Pgd, accuracy
from cstar_dsl.models import Normalized
from cstar_dsl.optimize import adversarial_epoch, make_optimizer, make_schedule, training_attack

SPEC = Path(__file__).resolve().parent.parent / "specs" / "mnist.cstar"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/mnist-dense.safetensors"))
    args = parser.parse_args()
    spec = load_spec(SPEC)
    torch.manual_seed(spec.train.seed)
    data = datasets(spec)
    net = build_model(spec)
    model = Normalized(net, data.mean, data.std)
    phase = spec.train.pretrain.model_copy(update={"epochs": args.epochs})
    optimizer = make_optimizer(phase, model.parameters())
    schedule = make_schedule(phase, optimizer)
    attack = training_attack(spec.threat)
    generator = torch.Generator().manual_seed(spec.train.seed)
    x, y = data.train.tensors
    size = spec.data.batch_size
    log = []
    for epoch in range(args.epochs):
        order = torch.randperm(len(y), generator=generator)
        batches = [(x[order[i:i + size]], y[order[i:i + size]]) for i in range(0, len(y), size)]
        result = adversarial_epoch(model, batches, optimizer, attack, phase="pretrain", epoch=epoch,
                                   generator=generator)
        schedule.step()
        log.append(result.__dict__)
        print(f"epoch {epoch}: loss {result.loss:.3f} clean {result.clean:.3f} robust {result.robust:.3f} "
              f"{result.seconds:.0f}s", flush=True)
    tx, ty = data.test.tensors
    test = [(tx[i:i + 500], ty[i:i + 500]) for i in range(0, len(ty), 500)]
    clean = accuracy(model, test)
    robust = accuracy(model, test, Pgd(eps=0.3, step=0.025, steps=20), torch.Generator().manual_seed(0))
    print(f"test clean {clean:.4f} PGD-20 {robust:.4f}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(args.out))
    args.out.with_suffix(".json").write_text(json.dumps(
        {"epochs": log, "test": {"clean": clean, "pgd20": robust},
         "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
         "finished": time.strftime("%Y-%m-%d %H:%M")}, indent=2))


if __name__ == "__main__":
    main()
