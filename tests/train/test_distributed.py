"""`cstar compile --nproc 2`: two gloo processes on the CPU give what one process gives with the same
global batch, and a killed distributed run resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from cstar_dsl.train import checkpoint
from cstar_dsl.train.distributed import World, from_environment, share

# PGD without a random start and no augmentation: with one process or two, every example and every
# step is the same, so only the order of floating-point sums differs (DDP averages two half-batch
# means). Uniform ranks do not depend on the spectra, so the structure cannot differ either.
SPEC = """
model {
  arch = "cstar:mlp"
  classes = 10
  input = [1, 8, 8]
}

data {
  dataset = digits
  batch_size = 128
  augment = none
}

threat {
  norm = linf
  eps = 0.1
  step = 0.05
  steps = 2
  random_start = false
}

compress {
  method = cstar
  budget = 4x params
  policy = uniform
  keep = ["fc3"]
}

train {
  seed = 0
  device = cpu
  pretrain {
    epochs = 1
    lr = 0.05
  }
  admm {
    epochs = 4
    lr = 0.01
    rho = 0.01
    rho_schedule = geometric(factor = 2, max = 1)
    interval = 4 steps
  }
  finetune {
    epochs = 1
    lr = 0.01
  }
}

evaluate {
  attacks = [fgsm]
}
"""
# Same weights up to float32 summation order, amplified by ~80 SGD steps and ADMM updates with rho up to 1
# (measured: 1.4e-4; the weights are of order 0.1).
WEIGHT_TOLERANCE = 1e-3


def compile_run(spec: Path, out: Path, *extra: str, log: Path) -> subprocess.Popen:
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    with log.open("wb") as output:
        return subprocess.Popen([sys.executable, "-m", "cstar_dsl", "compile", str(spec), "--out", str(out), "--quiet",
                                 *extra], stdout=output, stderr=subprocess.STDOUT, env=environment,
                                start_new_session=True)


def finished(process: subprocess.Popen, log: Path) -> str:
    assert process.wait(timeout=600) == 0, log.read_text()
    return log.read_text()


def test_the_world_comes_from_torchrun_environment():
    assert from_environment({}) == World()
    assert from_environment({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}) == World(1, 2, 1)
    batch = torch.arange(7)
    shares = [share(batch, World(rank, 2)) for rank in range(2)]
    assert sorted(torch.cat(shares).tolist()) == list(range(7))


def test_two_processes_match_one_and_resume(tmp_path):
    spec = tmp_path / "ddp.cstar"
    spec.write_text(SPEC)
    single = compile_run(spec, tmp_path / "single", log=tmp_path / "single.log")
    pair = compile_run(spec, tmp_path / "pair", "--nproc", "2", log=tmp_path / "pair.log")
    finished(single, tmp_path / "single.log")
    output = finished(pair, tmp_path / "pair.log")
    assert output.count("admm epoch 1:") == 1  # only rank 0 prints

    one = load_file(str(tmp_path / "single" / "model.safetensors"))
    two = load_file(str(tmp_path / "pair" / "model.safetensors"))
    assert one.keys() == two.keys()
    worst = max(float((one[k] - two[k]).abs().max()) for k in one)
    assert worst <= WEIGHT_TOLERANCE, worst
    reports = [json.loads((tmp_path / run / "report.json").read_text()) for run in ("single", "pair")]
    assert reports[0]["data"]["test_size"] == reports[1]["data"]["test_size"] == 359  # gathered from both ranks
    assert abs(reports[0]["accuracy"]["clean"] - reports[1]["accuracy"]["clean"]) <= 1 / 359
    losses = [[row["loss"] for row in report["history"]] for report in reports]
    assert all(abs(a - b) <= 1e-3 for a, b in zip(*losses, strict=True)), losses

    # Stop the distributed run in its ADMM phase as a scheduler would (SIGTERM to torchrun, which stops
    # every rank at once), resume it with two processes, and it ends where the uninterrupted run ended.
    killed = compile_run(spec, tmp_path / "killed", "--nproc", "2", log=tmp_path / "killed.log")
    path = tmp_path / "killed" / checkpoint.CHECKPOINT
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and killed.poll() is None:
        try:
            state = checkpoint.load(path) if path.exists() else {}
        except checkpoint.CheckpointError:
            state = {}
        if state.get("phase_index") == 1 and state.get("next_epoch", 0) >= 1:
            break
        time.sleep(0.05)
    assert killed.poll() is None, "the run finished before it could be killed"
    killed.send_signal(signal.SIGTERM)
    killed.wait()
    assert not (tmp_path / "killed" / "model.safetensors").exists()
    resumed = compile_run(spec, tmp_path / "killed", "--nproc", "2", "--resume", log=tmp_path / "resumed.log")
    assert "resuming at epoch" in finished(resumed, tmp_path / "resumed.log")
    again = load_file(str(tmp_path / "killed" / "model.safetensors"))
    assert max(float((two[k] - again[k]).abs().max()) for k in two) == 0.0
