"""benchmarks/latency.py keeps working: its core produces well-formed rows on a tiny model, and the
command line writes its JSON. No timing is asserted: this machine's load is not the code's."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import ROOT

pytestmark = pytest.mark.usefixtures("keep_threads")
ROW_KEYS = {"model", "target_ratio", "params_ratio", "macs_ratio", "dense_ms", "factorized_ms", "speedup", "threads",
            "mode", "target_speedup", "target_met", "dense_iqr_ms", "factorized_iqr_ms", "repeats", "warmup"}


def _benchmark(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


@pytest.fixture(scope="module")
def latency():
    yield from _benchmark("latency")


def test_core_rows_are_well_formed(latency):
    spec, model = latency.load("digits")
    rows = latency.benchmark_model("digits", spec, model, [8.0], repeats=2, warmup=1)
    assert [(r["target_ratio"], r["mode"]) for r in rows] == [(8.0, mode) for mode in latency.MODES]
    assert latency.MODES == ("eager", "inference", "torchscript", "onnxruntime")
    for row in rows:
        assert ROW_KEYS <= row.keys()
        assert row["model"] == "digits" and row["threads"] == 1 and row["repeats"] == 2 and row["warmup"] == 1
        assert row["params_ratio"] == pytest.approx(8.0, rel=0.05)
        assert row["macs_ratio"] > 1
        for key in ("dense_ms", "factorized_ms", "speedup", "dense_iqr_ms", "factorized_iqr_ms"):
            assert isinstance(row[key], float) and math.isfinite(row[key]) and row[key] >= 0
        assert row["speedup"] == pytest.approx(row["dense_ms"] / row["factorized_ms"], rel=0.01)
        assert row["target_speedup"] == pytest.approx(row["macs_ratio"] / 2, rel=0.01)
        assert row["target_met"] == (row["speedup"] >= row["target_speedup"])
    json.dumps(rows)  # the rows go to JSON as they are
    assert "| digits | 8x | eager |" in latency.table(rows)


def test_command_line_writes_results(latency, tmp_path):
    output = tmp_path / "latency.json"
    code = latency.main(["--quick", "--models", "digits", "--ratios", "4", "--repeats", "2", "--rounds", "1",
                         "--output", str(output)])
    assert code == 0
    results = json.loads(output.read_text())
    machine = results["machine"]
    assert {"cpu", "cores", "torch", "date", "threads"} <= machine.keys()
    assert machine["torch"] == torch.__version__ and machine["threads"] == 1
    assert [row["target_met"] for row in results["rows"]] == [None] * len(latency.MODES)  # the target starts at 8x


@pytest.fixture(scope="module")
def mnist_benchmark():
    yield from _benchmark("mnist")


@pytest.mark.parametrize("method", ["cstar", "svd-finetune", "channel-prune"])
@pytest.mark.parametrize("ratio", [16, 64, 256])
def test_every_mnist_benchmark_cell_is_a_valid_recipe_with_the_same_epochs(mnist_benchmark, tmp_path, method, ratio):
    from cstar_dsl.lang.validate import check_file

    path = tmp_path / "cell.cstar"
    path.write_text(mnist_benchmark.variant(method, ratio))
    checked = check_file(path)
    spec = checked.spec
    assert not [w for w in checked.warnings if w.is_error]
    assert (spec.compress.method, spec.compress.budget.ratio) == (method, ratio)
    epochs = sum(phase.epochs for phase in (spec.train.pretrain, spec.train.admm, spec.train.finetune) if phase)
    assert epochs == mnist_benchmark.ADMM_EPOCHS + mnist_benchmark.FINETUNE_EPOCHS  # the same budget for every method
    assert spec.model.weights == mnist_benchmark.DENSE  # the same adversarially trained start


@pytest.mark.parametrize("method", ["cstar", "svd-finetune"])
def test_mnist_benchmark_settings_change_only_what_they_name(mnist_benchmark, tmp_path, method):
    from cstar_dsl.lang.validate import check_file

    setting = mnist_benchmark.Setting(rho=0.05, rho_max=0.4, interval="16 steps", policy="uniform", min_rank=4)
    spec = check_file(_written(tmp_path / "cell.cstar", mnist_benchmark.variant(method, 64, setting))).spec
    default = check_file(_written(tmp_path / "default.cstar", mnist_benchmark.variant(method, 64))).spec
    assert (spec.compress.policy.kind, spec.compress.min_rank) == ("uniform", 4)
    assert spec.train.finetune == default.train.finetune
    if method == "cstar":
        assert (spec.train.admm.rho, spec.train.admm.rho_schedule.max) == (0.05, 0.4)
        assert (spec.train.admm.interval.every, spec.train.admm.interval.unit) == (16, "step")
        assert spec.train.admm.epochs == default.train.admm.epochs
    name = mnist_benchmark.cell_name(method, 64, setting)
    assert name != mnist_benchmark.cell_name(method, 64)  # a variant never overwrites the default cell
    assert name.startswith(method) and name.endswith("-64x")
    assert "policy uniform" in mnist_benchmark.schedule(method, setting)


def _written(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_mnist_benchmark_random_start_drops_only_the_weights(mnist_benchmark, tmp_path):
    from cstar_dsl.lang.validate import check_file

    setting = mnist_benchmark.Setting(random_start=True)
    random = check_file(_written(tmp_path / "random.cstar", mnist_benchmark.variant("svd-finetune", 16, setting))).spec
    dense = check_file(_written(tmp_path / "dense.cstar", mnist_benchmark.variant("svd-finetune", 16))).spec
    assert random.model.weights is None and dense.model.weights == mnist_benchmark.DENSE
    assert random.model_copy(update={"model": dense.model}) == dense
    assert mnist_benchmark.cell_name("svd-finetune", 16, setting) == "svd-finetune-random-16x"


@pytest.mark.parametrize(("method", "ratio", "cut"), [("cstar", 16, False), ("svd-finetune", 64, False),
                                                      ("cstar", 256, True), ("channel-prune", 256, False)])
def test_mnist_benchmark_keeps_the_classifier_where_the_budget_allows(mnist_benchmark, tmp_path, method, ratio, cut):
    from cstar_dsl.lang.validate import check_file

    def cuts_classifier(spec) -> bool:
        return any(rule.selector.pattern == "fc" for rule in spec.compress.layers)

    spec = check_file(_written(tmp_path / "cell.cstar", mnist_benchmark.variant(method, ratio))).spec
    assert cuts_classifier(spec) == cut
    low_rank = mnist_benchmark.Setting(keep_classifier=False)
    spec = check_file(_written(tmp_path / "low.cstar", mnist_benchmark.variant(method, ratio, low_rank))).spec
    assert cuts_classifier(spec) == (method != "channel-prune")


def test_a_cell_recipe_written_in_its_folder_uses_relative_paths(mnist_benchmark, tmp_path):
    from cstar_dsl.lang.validate import check_file

    folder = tmp_path / "cell"
    folder.mkdir()
    text = mnist_benchmark.variant("cstar", 16, folder=folder)
    assert '"/' not in text  # no absolute path
    spec = check_file(_written(folder / "spec.cstar", text)).spec
    assert spec.model.weights == mnist_benchmark.DENSE
    assert spec.data.root == mnist_benchmark.ROOT.parent / "shared" / "data" / "mnist-10k"


@pytest.fixture(scope="module")
def gpu_benchmark():
    yield from _benchmark("gpu")


def test_the_gpu_script_runs_every_part_at_toy_size_on_the_cpu(gpu_benchmark, tmp_path):
    """The GPU's minutes are few: the prepared script must not fail there for a reason the CPU could have shown."""
    code = gpu_benchmark.main(["--toy", "--out", str(tmp_path), "--archs", "mnist-cnn", "--methods", "dense",
                               "cstar", "channel-prune-global", "--workers", "2", "--minutes", "20"])
    assert code == 0
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert report["toy"] and report["skipped"] == [] and report["machine"]["device"] == "cpu"
    assert report["tests"]["returncode"] == 0 and report["tests"]["counts"].get("failed", 0) == 0
    rows = report["throughput"]["rows"]
    assert {(r["structure"], r["precision"], r["channels_last"]) for r in rows} == {
        (s, p, c) for s in ("dense", "factorized", "pruned") for p in ("fp32", "bf16") for c in (False, True)}
    assert all(r["images_per_second"] > 0 and r["attack"] == "PGD-7" for r in rows)
    params = {r["structure"]: r["params"] for r in rows}
    assert params["factorized"] <= params["dense"] / 15 and params["pruned"] <= params["dense"] / 15  # 16x
    (mnist,) = report["mnist"]
    assert mnist["pretrain"]["returncode"] == 0
    assert {cell: result["returncode"] for cell, result in mnist["cells"].items()} == {
        "dense-1x-seed0": 0, "cstar-16x-seed0": 0, "cstar-64x-seed0": 0, "channel-prune-global-16x-seed0": 0,
        "channel-prune-global-64x-seed0": 0}
    table = json.loads((tmp_path / "mnist" / "mnist.json").read_text())
    assert {(r["method"], r["target_ratio"]) for r in table} == {
        ("dense", 1), ("cstar", 16), ("cstar", 64), ("channel-prune-global", 16), ("channel-prune-global", 64)}
    for row in table:
        assert row["ratio"] == pytest.approx(row["target_ratio"], rel=0.1)
        assert 0 <= row["robust"] <= row["clean"] <= 1
    cells = tmp_path / "mnist" / "mnist"
    cell_recipe = (cells / "cstar-16x" / "spec.cstar").read_text()
    assert '"/' not in cell_recipe and "allocation" not in cell_recipe
    assert "allocation = global" in (cells / "channel-prune-global-64x" / "spec.cstar").read_text()
    # one recipe a cell: the cell's folder is the run folder, so the compile's copy is the recipe itself
    assert sorted(path.name for path in (cells / "cstar-16x").rglob("spec.cstar")) == ["spec.cstar"]
    assert (cells / "cstar-16x" / "report.json").is_file() and (cells / "cstar-16x" / "model.json").is_file()
