"""What the ADMM phase costs over plain PGD adversarial training, on the same model and data.

Times, on `cstar:mnist-cnn` and the first `--images` MNIST training images, one epoch of plain
PGD-7 adversarial training and one epoch of the ADMM W-step (the same, plus the rho penalty on
every compressed layer), each followed for ADMM by the Z-step (ranks re-chosen by the global
policy on the spectra of W + U, Tucker-2 projection) and the U-step, exactly as `cstar compile`
runs them. The two kinds of epoch alternate (`--rounds` times) so that a change of load on the
machine hits both alike; the medians are reported.

    .venv/bin/python benchmarks/admm_cost.py            # -> benchmarks/results/admm_cost.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Iterable
from pathlib import Path

import torch

from cstar_dsl import build_model, datasets, load_spec
from cstar_dsl.model import inventory, rewrite
from cstar_dsl.model.zoo import Normalized
from cstar_dsl.plan import allocate as planning
from cstar_dsl.train import admm
from cstar_dsl.train.optimize import adversarial_epoch, make_optimizer, training_attack

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "admm_cost.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = load_spec(ROOT / "specs" / "mnist.cstar")
    data = datasets(spec)
    net = build_model(spec)
    model = Normalized(net, data.mean, data.std)
    found = inventory.collect(net, spec.model.input, spec.model.leaf)
    x, y = data.train.tensors
    size = spec.data.batch_size
    batches = [(x[i:i + size], y[i:i + size]) for i in range(0, args.images, size)]
    optimizer = make_optimizer(spec.train.admm, model.parameters())
    attack = training_attack(spec.threat)

    def weights(names: Iterable[str]) -> dict[str, torch.Tensor]:
        return {name: net.get_parameter(f"{name}.weight") for name in names}

    def choose(shifted: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
        layers = inventory.with_weights(found.layers, {k: v.detach() for k, v in shifted.items()})
        return rewrite.planned_ranks(planning.make_plan(spec, layers, found.other_params))

    every = [layer.name for layer in found.layers]
    ranks = choose(weights(every))
    state = admm.admm_start(weights(ranks), ranks)
    plain, joint, zsteps = [], [], []
    for round_ in range(args.rounds):
        generator = torch.Generator().manual_seed(round_)
        plain.append(adversarial_epoch(model, batches, optimizer, attack, phase="pgd-at", epoch=round_,
                                       generator=generator).seconds)

        def penalty(state: admm.AdmmState = state) -> torch.Tensor:
            return admm.penalty(weights(state.ranks), state, 0.1)

        result = adversarial_epoch(model, batches, optimizer, attack, phase="admm", epoch=round_, generator=generator,
                                   extra_loss=penalty)
        started = time.perf_counter()
        current = weights(every)
        ranks = choose({k: w.detach() + state.u[k] if k in state.u else w.detach() for k, w in current.items()})
        u = {k: state.u.get(k, torch.zeros_like(current[k])) for k in ranks}
        state = admm.u_step(weights(ranks), admm.z_step(weights(ranks), admm.AdmmState(state.z, u, state.ranks), ranks))
        zsteps.append(time.perf_counter() - started)
        joint.append(result.seconds)
        print(f"round {round_ + 1}: PGD-AT epoch {plain[-1]:.1f} s, ADMM W-step epoch {joint[-1]:.1f} s, "
              f"Z+U step {zsteps[-1]:.2f} s", flush=True)
    summary = {
        "images": args.images, "batch_size": size, "threads": args.threads, "rounds": args.rounds,
        "pgd_at_epoch_s": statistics.median(plain), "admm_wstep_epoch_s": statistics.median(joint),
        "zu_step_s": statistics.median(zsteps),
        "overhead": (statistics.median(joint) + statistics.median(zsteps)) / statistics.median(plain) - 1,
        "machine": {"processor": platform.processor() or platform.machine(), "torch": torch.__version__},
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    args.output.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"| PGD-AT epoch | ADMM epoch (W-step + Z/U step) | overhead |\n|---|---|---|\n"
          f"| {summary['pgd_at_epoch_s']:.1f} s | {summary['admm_wstep_epoch_s']:.1f} + {summary['zu_step_s']:.2f} s "
          f"| {summary['overhead']:+.1%} |")


if __name__ == "__main__":
    main()
