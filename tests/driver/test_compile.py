"""`cstar compile` end to end on a tiny MLP and the bundled digits: artifacts, report, load, resume,
refusals, divergence and requirements, through the CLI as a user runs it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cstar_dsl import files
from cstar_dsl.deploy.artifacts import load
from cstar_dsl.files import FileProblem
from cstar_dsl.lang.validate import load_spec
from cstar_dsl.train import checkpoint
from cstar_dsl.train.data import datasets
from tests.helpers import compile_cli, image_folders, tiny_cifar10, variant, write_spec


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    folder = tmp_path_factory.mktemp("compile")
    spec = write_spec(folder, requirements="  require clean >= 20%")
    out = folder / "run"
    assert compile_cli(spec, "--out", out) == 0
    return spec, out


def test_compile_writes_every_artifact(compiled):
    _, out = compiled
    for name in ("model.safetensors", "model.json", "report.json", "report.md", "curves.png", "ranks.png",
                 "spec.cstar", "lock.json"):
        assert (out / name).stat().st_size > 0, name
    assert not (out / checkpoint.CHECKPOINT).exists()  # a finished run keeps no optimizer state behind


def test_report_json_has_the_documented_fields(compiled):
    spec_path, out = compiled
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "cstar"
    compression = report["compression"]
    assert compression["params_dense"] / compression["params_compressed"] == pytest.approx(compression["ratio"])
    assert 4.0 <= compression["ratio"] <= 4.0 * 1.03  # never short of the budget, within 3%
    assert compression["macs_compressed"] < compression["macs_dense"]
    accuracy = report["accuracy"]
    assert 0.0 <= accuracy["clean"] <= 1.0
    assert set(accuracy["robust"]) == {"pgd(linf, eps=0.1, step=0.05, steps=3, restarts=1)", "fgsm(linf, eps=0.1)"}
    assert all(0.0 <= value <= 1.0 for value in accuracy["robust"].values())
    assert report["attacks"]["fgsm(linf, eps=0.1)"] == {"attack": "fgsm", "norm": "linf", "eps": 0.1}
    assert report["threat"]["eps"] == 0.1 and report["threat"]["steps"] == 2
    assert report["data"] == {"name": "digits", "train_size": 1438, "test_size": 120}
    assert [row["phase"] for row in report["history"]] == ["pretrain", "admm", "admm", "finetune"]
    assert {layer["name"] for layer in report["layers"]} == {"fc1", "fc2", "fc3"}
    assert report["requirements"] == [{"metric": "clean", "op": ">=", "value": 0.2,
                                       "measured": accuracy["clean"], "met": accuracy["clean"] >= 0.2}]
    assert set(report["timings"]) >= {"total_seconds", "phases"}
    latency = report["latency"]
    assert (latency["batch"], latency["threads"], latency["form"]) == (1, 1, "optimize_for_inference")
    assert latency["dense_ms"]["median"] > 0 and latency["compressed_ms"]["median"] > 0
    assert latency["speedup"] == pytest.approx(latency["dense_ms"]["median"] / latency["compressed_ms"]["median"],
                                               rel=1e-2)
    assert (out / "spec.cstar").read_text() == spec_path.read_text()


def test_admm_rows_follow_the_rho_schedule(compiled):
    _, out = compiled
    rows = [row for row in json.loads((out / "report.json").read_text())["history"] if row["phase"] == "admm"]
    # rho starts at 0.01 and doubles after each Z/U update (once per epoch), capped at 0.05
    assert [row["rho"] for row in rows] == pytest.approx([0.02, 0.04])
    assert all(0.0 <= row["residual"] for row in rows)


def test_load_rebuilds_the_compiled_model_without_the_spec(compiled):
    spec_path, out = compiled
    model = load(out)
    description = json.loads((out / "model.json").read_text())
    assert description["structure"]["kind"] == "factorized"
    state = load_file(str(out / "model.safetensors"))
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {k: tuple(v.shape) for k, v in state.items()}
    # the model re-evaluated independently gives the report's clean accuracy on the same test images
    spec = load_spec(spec_path)
    images, labels = datasets(spec).test.tensors
    with torch.no_grad():
        clean = float((model(images[:120]).argmax(1) == labels[:120]).float().mean())
    assert clean == pytest.approx(json.loads((out / "report.json").read_text())["accuracy"]["clean"])


def test_a_second_compile_into_the_same_folder_is_refused(compiled, capsys):
    spec, out = compiled
    assert compile_cli(spec, "--out", out) == 4
    assert "already holds a compiled model" in capsys.readouterr().out
    assert compile_cli(spec, "--out", out, "--resume") == 4
    assert "already finished" in capsys.readouterr().out


def test_locked_refuses_a_changed_environment(compiled, capsys):
    spec, out = compiled
    lock = json.loads((out / "lock.json").read_text())
    lock["versions"]["torch"] = "0.0.1"
    (out / "lock.json").write_text(json.dumps(lock))
    assert compile_cli(spec, "--out", out, "--locked") == 4
    assert "torch changed from 0.0.1" in capsys.readouterr().out


@pytest.mark.parametrize("method", ["svd-finetune", "channel-prune"])
def test_baselines_compile_and_load(tmp_path, method):
    spec = write_spec(tmp_path, method=method, finetune=1, augment="standard")
    assert compile_cli(spec, "--out", tmp_path / "run") == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["method"] == method
    assert report["compression"]["params_compressed"] <= report["compression"]["params_dense"] / 4
    if method == "channel-prune":  # matched to what the factorized model would have, within channel granularity
        assert report["compression"]["ratio"] <= 4.0 * 1.15
    model = load(tmp_path / "run")
    assert model(torch.rand(3, 1, 8, 8)).shape == (3, 10)


def test_channel_prune_ranks_channels_globally_by_their_taylor_scores_on_the_adversarial_loss(tmp_path):
    tiny = write_spec(tmp_path, method="channel-prune", finetune=1)
    taylor = variant(tmp_path, tiny, "compress {\n  allocation = global\n  importance = taylor\n}\n")
    assert compile_cli(taylor, "--out", tmp_path / "run") == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["compression"]["params_compressed"] <= report["compression"]["params_dense"] / 4
    # a kept layer (whole outputs, fewer inputs) keeps the rule that kept it; the layers that lost outputs name
    # how their channels were scored and spread
    rules = {layer["name"]: layer["rule"] for layer in report["layers"] if layer["method"] == "pruned"}
    assert rules.pop("fc3") == 'keep "fc3"' and set(rules.values()) == {"channel-prune (Taylor, global)"}
    assert load(tmp_path / "run")(torch.rand(2, 1, 8, 8)).shape == (2, 10)


def test_unmet_requirement_exits_3_and_still_writes_the_report(tmp_path, capsys):
    spec = write_spec(tmp_path, pretrain=0, admm=1, finetune=0, requirements="  require robust >= 99.9%")
    assert compile_cli(spec, "--out", tmp_path / "run") == 3
    out = capsys.readouterr().out
    assert "NOT MET" in out
    assert re.search(r"latency \(batch 1, CPU\)\s+\S+ ms -> \S+ ms \(\d+\.\d\dx\)", out), out
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["requirements"][0]["met"] is False


def test_a_diverging_loss_stops_with_the_phase_and_epoch_and_keeps_the_checkpoint(tmp_path, capsys):
    spec = write_spec(tmp_path, lr=1e30)
    assert compile_cli(spec, "--out", tmp_path / "run") == 4
    output = capsys.readouterr().out
    assert "the pretrain phase diverged at epoch 0" in output
    assert "lower `train.pretrain.lr`" in output
    state = checkpoint.load(tmp_path / "run" / checkpoint.CHECKPOINT)
    assert (state["phase_index"], state["next_epoch"]) == (0, 0)


def test_a_missing_data_folder_points_at_the_recipe(tmp_path, capsys):
    mnist = f'model {{\n  input = [1, 28, 28]\n}}\n\ndata {{\n  dataset = mnist\n  root = "{tmp_path}/nowhere"\n}}\n'
    spec = variant(tmp_path, write_spec(tmp_path), mnist, name="mnist.cstar")
    assert compile_cli(spec, "--out", tmp_path / "run") == 1
    output = capsys.readouterr().out
    assert "error[data-not-found]" in output and "mnist.cstar:" in output  # the file that set the root


def test_an_unfinished_run_needs_resume_or_force(tmp_path, capsys):
    spec = write_spec(tmp_path, lr=1e30)
    compile_cli(spec, "--out", tmp_path / "run")
    capsys.readouterr()
    assert compile_cli(spec, "--out", tmp_path / "run") == 4
    assert "unfinished run" in capsys.readouterr().out


def test_resume_refuses_a_changed_recipe(tmp_path, capsys):
    spec = variant(tmp_path, write_spec(tmp_path, lr=1e30))
    compile_cli(spec, "--out", tmp_path / "run")
    variant(tmp_path, tmp_path / "tiny.cstar", "compress {\n  budget = 8x params\n}\n")  # the same file, edited
    capsys.readouterr()
    assert compile_cli(spec, "--out", tmp_path / "run", "--resume") == 4
    assert "the recipe changed" in capsys.readouterr().out


def test_a_failed_write_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    target = tmp_path / "checkpoint.pt"
    checkpoint.save(target, {"format": "cstar.checkpoint/1", "epoch": 1})

    def full_disk(handle):
        raise OSError(28, "No space left on device")

    with pytest.raises(FileProblem, match="No space left on device"):
        files.write_stream(target, full_disk)
    assert checkpoint.load(target)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary file left behind


def _cli(*args: str | Path, log: Path) -> subprocess.Popen:
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    with log.open("wb") as output:  # the child keeps its own copy of the descriptor
        return subprocess.Popen([sys.executable, "-m", "cstar_dsl", "compile", *map(str, args), "--quiet"],
                                stdout=output, stderr=subprocess.STDOUT, env=environment)


def test_resume_after_a_kill_ends_with_the_same_weights(tmp_path):
    spec = write_spec(tmp_path, pretrain=1, admm=3, finetune=2, interval="5 steps", augment="standard")
    reference = _cli(spec, "--out", tmp_path / "whole", log=tmp_path / "whole.log")
    victim = _cli(spec, "--out", tmp_path / "killed", log=tmp_path / "killed.log")
    path = tmp_path / "killed" / checkpoint.CHECKPOINT
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # kill in the middle of the ADMM phase
        if path.exists():
            try:
                state = checkpoint.load(path)
            except checkpoint.CheckpointError:
                state = {}
            if state.get("phase_index") == 1 and state.get("next_epoch", 0) >= 1:
                break
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "model.safetensors").exists()
    resumed = _cli(spec, "--out", tmp_path / "killed", "--resume", log=tmp_path / "resumed.log")
    assert resumed.wait(timeout=300) == 0, (tmp_path / "resumed.log").read_text()
    output = (tmp_path / "resumed.log").read_text()
    assert "resuming at epoch" in output
    assert reference.wait(timeout=300) == 0
    whole = load_file(str(tmp_path / "whole" / "model.safetensors"))
    killed = load_file(str(tmp_path / "killed" / "model.safetensors"))
    assert whole.keys() == killed.keys()
    for name in whole:
        assert torch.equal(whole[name], killed[name]), name


def test_compile_trains_on_image_folders_and_cifar_batches(tmp_path):
    """The loaders that are not in memory (ImageNet-style folders) and CIFAR's pickled batches
    both feed a whole compile: data order, per-item augmentation, evaluation and artifacts."""
    image_folders(tmp_path / "folders", {"cat": 6, "dog": 6}, {"cat": 2, "dog": 2})
    tiny_cifar10(tmp_path / "cifar")
    tiny = write_spec(tmp_path, pretrain=1, admm=1, finetune=1, augment="standard")
    for dataset, root, classes, shape in (("imagenet", tmp_path / "folders", 2, "[3, 8, 8]"),
                                          ("cifar10", tmp_path / "cifar", 10, "[3, 32, 32]")):
        spec = variant(tmp_path, tiny, f'model {{\n  classes = {classes}\n  input = {shape}\n}}\n\n'
                       f'data {{\n  dataset = {dataset}\n  root = "{root}"\n  batch_size = 4\n}}\n', f"{dataset}.cstar")
        assert compile_cli(spec, "--out", tmp_path / dataset) == 0, dataset
        report = json.loads((tmp_path / dataset / "report.json").read_text())
        assert report["data"]["name"] == dataset and report["data"]["test_size"] > 0
        assert load(tmp_path / dataset)(torch.rand(2, *json.loads((tmp_path / dataset / "model.json").read_text())
                                                   ["model"]["input"])).shape == (2, classes)


def test_bf16_training_compiles_and_evaluates_in_float32(tmp_path):
    tiny = write_spec(tmp_path, pretrain=1, admm=1, finetune=1)
    spec = variant(tmp_path, tiny, "train {\n  precision = bf16\n}\n")
    assert compile_cli(spec, "--out", tmp_path / "run") == 0
    model = load(tmp_path / "run")
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # autocast never changes the weights
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["resolved"]["train"]["precision"] == "bf16"
    assert all(0 <= value <= 1 for value in report["accuracy"]["robust"].values())
