"""Latency stage: batch-1 CPU latency of a dense and a compressed model, timed in turns on this machine."""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .inference import optimize_for_inference

BLOCK = 10  # timed calls of one model in a row (see measure)


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call of one model over the timed repetitions."""

    median: float
    q1: float
    q3: float
    minimum: float
    cpu_median: float
    repeats: int

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    @classmethod
    def of(cls, wall: Sequence[float], cpu: Sequence[float]) -> Timing:
        """From per-call wall and process CPU times in seconds."""
        ms = [t * 1e3 for t in wall]
        quartiles = statistics.quantiles(ms, n=4) if len(ms) > 1 else [ms[0]] * 3
        return cls(statistics.median(ms), quartiles[0], quartiles[2], min(ms),
                   statistics.median(cpu) * 1e3, len(ms))


def measure(calls: Mapping[str, Callable[[], object]], *, repeats: int, warmup: int,
            block: int = BLOCK) -> dict[str, Timing]:
    """Time each zero-argument call ``repeats`` times after ``warmup`` untimed calls each.

    The calls take turns in blocks: one untimed call, then ``block`` timed ones in a row, then the
    next call's block. A served model runs call after call with its weights in the caches; a
    dense ResNet-18 run in between (45 MB of weights) evicts a factorized one's (2.8 MB at 16x),
    which then pays for reloading them on every call. Blocks keep that realistic while a change
    of load on the machine still hits every model alike. ``block=0`` alternates single calls with
    no untimed call between them: the cold-cache regime.
    """
    wall: dict[str, list[float]] = {name: [] for name in calls}
    cpu: dict[str, list[float]] = {name: [] for name in calls}
    rewarm, block = (1, block) if block > 0 else (0, 1)
    with torch.inference_mode():
        for call in calls.values():
            for _ in range(warmup):
                call()
        for done in range(0, repeats, block):
            for name, call in calls.items():
                for _ in range(rewarm):
                    call()
                for _ in range(min(block, repeats - done)):
                    cpu_start = time.process_time()
                    start = time.perf_counter()
                    call()
                    wall[name].append(time.perf_counter() - start)
                    cpu[name].append(time.process_time() - cpu_start)
    return {name: Timing.of(wall[name], cpu[name]) for name in calls}


@dataclass(frozen=True)
class LatencyComparison:
    """What a plan buys in time: the dense and the compressed model at batch size 1 on this CPU."""

    dense: Timing
    compressed: Timing
    threads: int
    batch: int
    cpu: str
    cores: int

    @property
    def speedup(self) -> float:
        return self.dense.median / self.compressed.median

    def to_dict(self) -> dict[str, object]:
        def timing(t: Timing) -> dict[str, float | int]:
            return {key: round(value, 4) if isinstance(value, float) else value for key, value in asdict(t).items()}

        return {"dense_ms": timing(self.dense), "compressed_ms": timing(self.compressed),
                "speedup": round(self.speedup, 3), "threads": self.threads, "batch": self.batch,
                "cpu": self.cpu, "cores": self.cores, "form": "optimize_for_inference"}


def compare_latency(dense: nn.Module, compressed: nn.Module, example: torch.Tensor, *, threads: int = 1,
                    repeats: int = 30, warmup: int = 5, leaves: Iterable[str] = ()) -> LatencyComparison:
    """Batch-1 latency of ``dense`` and ``compressed`` on the CPU, each in its inference form
    (``optimize_for_inference``: batch norms folded, module calls lowered), timed in turns with
    ``threads`` intra-op threads. Neither model is changed; torch's thread count is restored."""
    example = example[:1].cpu()
    leaves = tuple(leaves)
    fast_dense, fast_compressed = (optimize_for_inference(model, leaves=leaves).cpu() for model in (dense, compressed))
    calls = {"dense": lambda: fast_dense(example), "compressed": lambda: fast_compressed(example)}
    with _threads(threads):
        timings = measure(calls, repeats=repeats, warmup=warmup)
    return LatencyComparison(timings["dense"], timings["compressed"], threads, 1, cpu_name(), os.cpu_count() or 1)


def cpu_name() -> str:
    """The CPU's model name, as /proc/cpuinfo gives it where there is one."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


@contextlib.contextmanager
def _threads(count: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
