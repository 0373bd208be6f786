"""Shared by the stages, the run report's data: ``RunReport``, what report.json holds, built once by the driver.

The report package (report.md, the plots), the CLI's table and ``cstar eval`` read these typed models.
This module imports pydantic only, and no stage: every stage that reads a report imports it without torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
)

# A change of shape gets a new version; readers keep reading the old ones. 2 added `structure_choice` and
# `recipe_folder` (both optional, so a /1 report is a /2 report without them).
Schema = Literal["cstar.report/1", "cstar.report/2"]
REPORT_SCHEMA: Schema = "cstar.report/2"


class ReportError(Exception):
    """A report.json that cannot be read as a run report: not JSON, or not of ``REPORT_SCHEMA``'s shape."""


class _Part(BaseModel):
    """A block of the report: frozen, its keys exactly the documented ones."""

    # json.dumps wrote NaN and Infinity as such; pydantic would write null, which reads back as "not measured".
    model_config = ConfigDict(frozen=True, extra="forbid", ser_json_inf_nan="constants")

    # Keys a report has only in some rows (ADMM columns, a pruned layer's new shape): left out while None,
    # so report.json keeps the shape it always had.
    _optional: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _without_unset_optionals(self, handler: SerializerFunctionWrapHandler) -> Any:
        data = handler(self)
        if isinstance(data, dict):
            for key in self._optional:
                if data.get(key, 0) is None:
                    del data[key]
        return data


class Compression(_Part):
    """Counts over the weights of every Conv2d and Linear layer; biases and norms are ``other_params``."""

    budget: str
    metric: Literal["params", "macs"]
    target_ratio: float | None
    params_dense: int
    params_compressed: int
    ratio: float
    macs_dense: int
    macs_compressed: int
    other_params: int

    @property
    def macs_ratio(self) -> float:
        return self.macs_dense / max(1, self.macs_compressed)


class Accuracy(_Part):
    """Test-set accuracies as fractions in [0, 1]; ``robust`` keyed by the attack's own name."""

    clean: float
    robust: dict[str, float]

    @property
    def worst_robust(self) -> float | None:
        return min(self.robust.values()) if self.robust else None


class Timing(_Part):
    """Milliseconds per batch-1 call of one model."""

    median: float
    q1: float
    q3: float
    minimum: float
    cpu_median: float
    repeats: int


class Latency(_Part):
    """The dense and the compressed model timed in turns on the CPU (the keys of `cstar plan --latency`)."""

    dense_ms: Timing
    compressed_ms: Timing
    speedup: float
    threads: int
    batch: int
    cpu: str
    cores: int
    form: str


class Threat(_Part):
    """The recipe's `threat` block: the attacker trained against."""

    norm: Literal["linf", "l2"]
    eps: float
    step: float
    steps: int
    random_start: bool
    restarts: int


class Requirement(_Part):
    """A `require` line and what the run measured; ``measured`` is None when no attack ran for `robust`."""

    metric: Literal["clean", "robust"]
    op: Literal[">=", ">"]
    value: float
    measured: float | None
    met: bool


class LayerReport(_Part):
    """What happened to one Conv2d or Linear layer, and why (a ``LayerPlan``, or a pruned layer)."""

    _optional = frozenset({"shape_after"})

    name: str
    type: str
    shape: tuple[int, ...]
    rule: str
    method: str  # "svd", "tucker2", "dense" or "pruned"
    ranks: tuple[int, ...] | None
    reason: str
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    energy_kept: float | None
    shape_after: tuple[int, ...] | None = None  # channel-prune only: the layer's shape after pruning


class EpochRow(_Part):
    """One training epoch, on the training set: the robust accuracy is on the PGD examples trained on."""

    _optional = frozenset({"rho", "residual", "zstep_seconds", "params"})

    phase: str
    epoch: int
    loss: float
    clean: float
    robust: float
    seconds: float
    lr: float
    rho: float | None = None  # the ADMM columns, in `admm` epochs only
    residual: float | None = None
    zstep_seconds: float | None = None
    params: int | None = None


class Timings(_Part):
    total_seconds: float
    phases: dict[str, float]
    evaluate_seconds: float


class DataInfo(_Part):
    name: str
    train_size: int
    test_size: int


class Machine(_Part):
    device: str
    processor: str
    threads: int
    python: str
    torch: str
    cstar: str


class Export(_Part):
    """A model file the run wrote, checked against PyTorch (no check for safetensors, the model itself)."""

    format: str
    file: str
    bytes: int
    max_abs_diff: float | None
    checked_with: str | None


class Candidate(_Part):
    """One structure `method = auto` probed: its cost, and its accuracy on the held-out training images (None: its
    probe diverged)."""

    name: str
    params: int
    macs: int
    clean: float | None
    robust: float | None
    seconds: float
    problem: str | None = None  # why it has no score: its probe diverged, or it cannot meet the budget

    _optional = frozenset({"problem"})


class StructureChoice(_Part):
    """Which structure `method = auto` compiled, and every candidate's probe."""

    winner: str
    holdout: int  # training images held out to score the candidates
    epochs: int  # adversarial fine-tuning epochs each candidate got
    seconds: float
    candidates: tuple[Candidate, ...]


class RunReport(_Part):
    """The report of a compile, as report.json holds it (schema ``REPORT_SCHEMA``, docs/compile.md)."""

    model_config = ConfigDict(populate_by_name=True)
    _optional = frozenset({"structure_choice", "recipe_folder"})

    schema_name: Schema = Field(default=REPORT_SCHEMA, alias="schema")
    spec: str
    spec_sha256: str
    method: str
    structure_choice: StructureChoice | None = None  # `method = auto` only
    compression: Compression
    accuracy: Accuracy
    latency: Latency | None = None  # none in reports written before latency was measured
    attacks: dict[str, dict[str, Any]]  # each attack's settings as data, as `Evaluation.attacks` holds them
    threat: Threat
    requirements: tuple[Requirement, ...]
    layers: tuple[LayerReport, ...]
    history: tuple[EpochRow, ...]
    timings: Timings
    data: DataInfo
    machine: Machine
    seed: int
    warnings: tuple[str, ...]
    resolved: dict[str, JsonValue]  # the recipe after `extend`, as `Spec.model_dump(mode="json")`
    # Where `resolved`'s relative paths start: the recipe's folder, relative to the run folder. None in reports
    # written before it was recorded, whose paths are relative to the folder the compile ran in.
    recipe_folder: str | None = None
    exports: tuple[Export, ...] = ()

    @property
    def unmet(self) -> tuple[Requirement, ...]:
        return tuple(requirement for requirement in self.requirements if not requirement.met)

    def to_json(self) -> str:
        """The text of report.json."""
        return self.model_dump_json(indent=2, by_alias=True) + "\n"


def parse_report(text: str | bytes, path: Path) -> RunReport:
    """The run report in ``text`` (read from ``path``, named in the error).

    Raises:
        ReportError: the text is not JSON, or not a report of this schema; the message names the first keys at fault.
    """
    try:
        return RunReport.model_validate_json(text)
    except ValidationError as error:
        raise ReportError(f"{path} is not a cstar run report ({REPORT_SCHEMA}): {_first_problems(error)}") from None


def _first_problems(error: ValidationError, shown: int = 3) -> str:
    problems = [f"{_where(e['loc'])}: {e['msg']}" for e in error.errors()]
    more = f" (and {len(problems) - shown} more)" if len(problems) > shown else ""
    return "; ".join(problems[:shown]) + more


def _where(loc: tuple[int | str, ...]) -> str:
    return f"`{'.'.join(map(str, loc))}`" if loc else "the file"
