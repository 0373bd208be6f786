"""cstar_dsl.deploy.latency and `cstar plan --latency`: the timing protocol (warm-up, blocks, cold mode),
the comparison of a dense and a compressed model, and what the command prints. No timing value is
asserted: this machine's load is not the code's."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from torch import nn

import cstar_dsl
from cstar_dsl.cli import main
from cstar_dsl.deploy import latency
from tests.helpers import DIGITS, DOCS

LATENCY_KEYS = {"dense_ms", "compressed_ms", "speedup", "threads", "batch", "cpu", "cores", "form"}
TIMING_KEYS = {"median", "q1", "q3", "minimum", "cpu_median", "repeats"}


pytestmark = pytest.mark.usefixtures("keep_threads")


def _recorder(order: list[str], name: str):
    return lambda: order.append(name)


@pytest.mark.parametrize(("block", "expected"), [
    # warm-up of each; then turns: one untimed call and up to 3 timed ones
    (3, "aa" "bb" "a" "aaa" "b" "bbb" "a" "aa" "b" "bb"),
    (0, "aa" "bb" "ab" "ab" "ab" "ab" "ab"),  # cold: single calls alternating, nothing untimed between
])
def test_measure_takes_turns_in_blocks(block, expected):
    order: list[str] = []
    timings = latency.measure({"a": _recorder(order, "a"), "b": _recorder(order, "b")}, repeats=5, warmup=2,
                              block=block)
    assert "".join(order) == expected
    assert {name: t.repeats for name, t in timings.items()} == {"a": 5, "b": 5}
    for t in timings.values():
        assert 0 <= t.minimum <= t.q1 <= t.median <= t.q3 and t.iqr == t.q3 - t.q1


def test_measure_of_nothing_is_nothing():
    assert latency.measure({}, repeats=3, warmup=1) == {}


def _net(width: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 4)).eval()


def test_compare_latency_times_both_and_leaves_them_and_the_threads_alone():
    torch.manual_seed(0)
    dense, small = _net(16), _net(4)
    before = copy.deepcopy(dense.state_dict())
    torch.set_num_threads(1)
    result = latency.compare_latency(dense, small, torch.randn(3, 3, 8, 8), threads=2, repeats=4, warmup=1)
    assert torch.get_num_threads() == 1
    assert all(torch.equal(value, dense.state_dict()[key]) for key, value in before.items())
    assert not dense.training
    assert result.dense.repeats == result.compressed.repeats == 4
    assert (result.threads, result.batch) == (2, 1) and result.cores >= 1 and result.cpu
    assert result.speedup == pytest.approx(result.dense.median / result.compressed.median)
    data = result.to_dict()
    assert set(data) == LATENCY_KEYS and set(data["dense_ms"]) == TIMING_KEYS
    json.dumps(data)


def _digits(method: str | None = None):
    spec = cstar_dsl.load_spec(DIGITS)
    if method:
        spec = spec.model_copy(update={"compress": spec.compress.model_copy(update={"method": method})})
    return spec


@pytest.mark.parametrize("method", ["cstar", "channel-prune"])
def test_measure_latency_times_the_model_the_plan_makes(method, monkeypatch):
    spec = _digits(method)
    model = cstar_dsl.build_model(spec)
    plan = cstar_dsl.make_plan(spec, model)
    timed = {}

    def fake(dense, compressed, example, **options):
        timed.update(dense=dense, compressed=compressed, example=example, options=options)
        return "comparison"

    monkeypatch.setattr(latency, "compare_latency", fake)
    assert cstar_dsl.measure_latency(spec, model, plan, threads=2) == "comparison"
    assert timed["dense"] is model
    assert tuple(timed["example"].shape) == (1, *spec.model.input)
    assert timed["options"]["threads"] == 2
    weights = sum(m.weight.numel() for m in timed["compressed"].modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert weights <= plan.params_after  # factorized to the plan, or pruned to its parameter count
    assert weights >= plan.params_after * 0.9


def test_plan_latency_prints_what_the_budget_buys_in_time(digits_folder, capsys):
    assert main(["plan", "digits.cstar", "--latency"]) == 0
    out = capsys.readouterr().out
    line = re.search(r"^latency: (\d+\.\d\d) ms -> (\d+\.\d\d) ms, (\d+\.\d\d)x faster \(MACs (\d+\.\d\d)x\); "
                     r"batch 1, 1 thread, .+; medians of 30 calls after optimize_for_inference; "
                     r"measured in \d+\.\d s$", out, re.M)
    assert line, out
    summary = re.search(r"MACs (\d+\.\d\d)x \(conv", out)
    assert line.group(4) == summary.group(1)


def test_plan_latency_in_json(digits_folder, capsys):
    assert main(["plan", "digits.cstar", "--latency", "--threads", "2", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)["latency"]
    assert set(data) == LATENCY_KEYS and data["threads"] == 2 and data["batch"] == 1
    assert data["compressed_ms"]["repeats"] == 30


def test_plan_without_latency_times_nothing(digits_folder, capsys, monkeypatch):
    monkeypatch.setattr(latency, "compare_latency", lambda *a, **k: pytest.fail("timed without --latency"))
    assert main(["plan", "digits.cstar", "--format", "json"]) == 0
    assert "latency" not in json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("threads", ["0", "two"])
def test_plan_threads_must_be_a_positive_number(digits_folder, capsys, threads):
    with pytest.raises(SystemExit) as stop:
        main(["plan", "digits.cstar", "--latency", "--threads", threads])
    assert stop.value.code == 2 and "--threads" in capsys.readouterr().err


def test_docs_plan_md_documents_the_latency_keys():
    text = (DOCS / "plan.md").read_text()
    start = text.index("## Latency")
    section = text[start:text.index("\n## ", start + 1)]
    documented = {name for line in section.splitlines() if line.startswith("| `")
                  for name in re.findall(r"`([a-z_0-9]+)`", line.split("|")[1])}
    assert documented == LATENCY_KEYS | TIMING_KEYS
