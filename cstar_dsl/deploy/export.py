"""Export stage: a compiled model folder -> ONNX, TorchScript or torch.export files, checked against PyTorch."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from .. import files
from ..errors import RunError
from . import artifacts

if TYPE_CHECKING:
    import onnx
    import onnxruntime

FORMATS = ("onnx", "torchscript", "torch.export", "safetensors")
FILENAMES = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt", "torch.export": "model.pt2",
             "safetensors": artifacts.WEIGHTS}
# The temporary file keeps the format's own suffix: torch.export.load refuses other names.
_SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt", "torch.export": ".pt2"}
TOLERANCE = 1e-4
MIN_OPSET = 17
NATIVE_OPSET = 18  # the oldest opset the dynamo exporter has implementations for
INPUT_NAME, OUTPUT_NAME = "images", "logits"
# Tracing at batch 2, not 1, keeps torch.export from specializing the batch dimension to a constant.
_TRACE_BATCH = 2

Check = Callable[[Path], float]


class ExportError(RunError):
    """An export that cannot be made, or whose file does not compute what the PyTorch model does; says what to do."""


@dataclass(frozen=True)
class Exported:
    """One written file and how it was checked against the PyTorch model."""

    format: str
    path: Path
    bytes: int
    max_abs_diff: float | None  # over random images in [0, 1], two batch sizes; None for safetensors
    checked_with: str | None  # the runtime that ran the file, e.g. "onnxruntime 1.32.0"
    seconds: float
    opset: int | None = None  # ONNX only: the opset the file declares, read back from it


def export(folder: str | Path, fmt: str, *, out: str | Path | None = None, opset: int = NATIVE_OPSET,
           check_batch: int = 4, seed: int = 0) -> Exported:
    """Write the compiled model in ``folder`` as ``fmt`` and check that the file computes what PyTorch does.

    The file is written under a temporary name, run on a seeded random batch of ``check_batch``
    images and on a second batch size (the batch dimension is dynamic), and renamed to ``out``
    (default: the format's file in ``folder``; in ``out`` when that is a folder) only when every
    logit is within ``TOLERANCE`` of the PyTorch model's; a failed check leaves any earlier file in
    place. ``safetensors`` is the folder's own weights file, copied to ``out`` when one is given.

    Raises:
        ExportError: an unknown format, an opset below 17 or one the exporter or onnxruntime cannot
            handle, a batch below 1, a missing ONNX package, an exporter failure, a file that cannot
            be written, or one that does not match the PyTorch model.
        artifacts.ArtifactError: ``folder`` holds no loadable compiled model.
    """
    start = time.perf_counter()
    _validate(fmt, opset, check_batch)
    folder = Path(folder)
    model = artifacts.load(folder)
    path = _destination(folder, fmt, out)
    if fmt == "safetensors":
        _copy(folder / artifacts.WEIGHTS, path)
        return Exported(fmt, path, path.stat().st_size, None, None, time.perf_counter() - start)
    shape = _input_shape(folder)
    generator = torch.Generator().manual_seed(seed)
    example = torch.rand((_TRACE_BATCH, *shape), generator=generator)
    batches = [torch.rand((size, *shape), generator=generator) for size in _check_sizes(check_batch)]
    if fmt == "onnx":
        save, check, checked_with = _onnx(model, example, batches, opset)
    elif fmt == "torchscript":
        save, check, checked_with = _torchscript(model, example, batches)
    else:
        save, check, checked_with = _program(model, example, batches)
    diff = _write_checked(path, _SUFFIXES[fmt], save, check)
    # The ONNX check has read the opset back from the file and refused any other.
    written_opset = opset if fmt == "onnx" else None
    return Exported(fmt, path, path.stat().st_size, diff, checked_with, time.perf_counter() - start, written_opset)


def _destination(folder: Path, fmt: str, out: str | Path | None) -> Path:
    if out is None:
        return folder / FILENAMES[fmt]
    out = Path(out)
    return out / FILENAMES[fmt] if out.is_dir() else out


def _validate(fmt: str, opset: int, check_batch: int) -> None:
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if opset < MIN_OPSET:
        raise ExportError(f"ONNX opset {opset} is too old: use {NATIVE_OPSET} (the exporter's own) or at least "
                          f"{MIN_OPSET}")
    if check_batch < 1:
        raise ExportError(f"the check batch must hold at least one image, got {check_batch}")


def _input_shape(folder: Path) -> tuple[int, ...]:
    # ``artifacts.load`` has already read and validated this file.
    description = json.loads((folder / artifacts.DESCRIPTION).read_text())
    return tuple(int(size) for size in description["model"]["input"])


def _check_sizes(check_batch: int) -> tuple[int, int]:
    # A second size proves the batch dimension is dynamic; batch 1 is the one most often specialized away.
    return check_batch, (1 if check_batch > 1 else 2)


def _copy(source: Path, path: Path) -> None:
    if os.path.realpath(path) == os.path.realpath(source):  # Path.resolve raises on a symlink loop
        return
    _write_checked(path, path.suffix, lambda temporary: shutil.copyfile(source, temporary), None)


def _write_checked(path: Path, suffix: str, save: Callable[[Path], object], check: Check | None) -> float | None:
    """Save to a temporary file in ``path``'s folder, check it, then rename it over ``path``."""
    def save_and_check(temporary: Path) -> float | None:
        save(temporary)
        return check(temporary) if check is not None else None

    try:
        return files.replace(path, save_and_check, suffix=suffix)
    except files.FileProblem as problem:
        raise ExportError(f"{problem}; {problem.help}" if problem.help else str(problem)) from None


def _max_abs_diff(model: nn.Module, run: Callable[[torch.Tensor], torch.Tensor], batches: list[torch.Tensor],
                  what: str) -> float:
    """The largest logit difference between ``run`` and ``model`` over ``batches``; raises past ``TOLERANCE``."""
    diff = 0.0
    with torch.no_grad():
        for batch in batches:
            expected = model(batch)
            try:
                got = run(batch)
            except Exception as error:  # each runtime has its own error types; a fixed batch size shows up here
                raise ExportError(f"the {what} fails on a batch of {len(batch)}: {error}") from error
            if not torch.isfinite(expected).all():
                # Two all-NaN outputs "differ by 0": a check against them proves nothing.
                raise ExportError("the PyTorch model itself gives NaN or infinite logits on random images in [0, 1]: "
                                  "its weights are damaged; nothing was exported")
            if got.shape != expected.shape:
                raise ExportError(f"the {what} returns logits of shape {tuple(got.shape)} for a batch of "
                                  f"{len(batch)}, PyTorch {tuple(expected.shape)}: the batch dimension is not dynamic")
            if not torch.isfinite(got).all():
                raise ExportError(f"the {what} gives NaN or infinite logits on a batch of {len(batch)} where PyTorch "
                                  "gives finite ones; the file was not written: export another format")
            diff = max(diff, (got.float() - expected).abs().max().item())
    # ``not <=`` also catches NaN.
    if not diff <= TOLERANCE:
        raise ExportError(f"the {what} differs from the PyTorch model by up to {diff:.3g} (tolerance {TOLERANCE:g}); "
                          "the file was not written: export another format, or report the model's layers")
    return diff


# ---------------------------------------------------------------------- ONNX


def _onnx(model: nn.Module, example: torch.Tensor, batches: list[torch.Tensor],
          opset: int) -> tuple[Callable[[Path], None], Check, str]:
    try:
        import onnx
        import onnxruntime
        import onnxscript  # noqa: F401  (the dynamo exporter's dependency: fail here with the hint, not inside it)
    except ImportError as error:
        raise ExportError(f"ONNX export needs the onnx, onnxscript and onnxruntime packages ({error}): "
                          "pip install onnx onnxscript onnxruntime") from None

    if opset > onnx.defs.onnx_opset_version():
        raise ExportError(f"ONNX opset {opset} does not exist yet: the installed onnx {onnx.__version__} knows opsets "
                          f"up to {onnx.defs.onnx_opset_version()}; use --opset {NATIVE_OPSET}")

    def save(path: Path) -> None:
        onnx.save_model(_onnx_model(model, example, opset), str(path))

    def check(path: Path) -> float:
        written = _read_opset(path)
        if written != opset:
            # The dynamo exporter keeps its own opset, with only a log line, when it cannot convert.
            raise ExportError(f"the ONNX exporter wrote opset {written} when asked for {opset}: "
                              f"use --opset {NATIVE_OPSET}")
        try:
            onnx.checker.check_model(str(path), full_check=True)
        except onnx.checker.ValidationError as error:
            raise ExportError(f"the exported ONNX model is invalid: {error}; use --opset {NATIVE_OPSET} or "
                              "--format torch.export") from None
        try:
            session = _session(path)
        except Exception as error:  # onnxruntime's own exception types (e.g. an opset it does not know)
            raise ExportError(f"onnxruntime {onnxruntime.__version__} cannot load the exported model: {error}; "
                              f"use --opset {NATIVE_OPSET}") from None
        return _max_abs_diff(model, lambda x: torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]),
                             batches, f"ONNX model (onnxruntime {onnxruntime.__version__})")

    return save, check, f"onnxruntime {onnxruntime.__version__}"


def _onnx_model(model: nn.Module, example: torch.Tensor, opset: int) -> onnx.ModelProto:
    """The ONNX ModelProto of ``model`` at ``opset``, with a dynamic batch dimension."""
    # Opset 17 goes to the legacy TorchScript-based exporter, not to the dynamo exporter: the latter
    # only implements 18 and up, and its down-conversion fails on every CNN here (ReduceMean's axes,
    # from global pooling, are not constant before folding), logs a traceback and silently keeps 18;
    # converting the folded model with onnx's converter instead leaves ReduceMean-18 attributes in a
    # ReduceMean-13 node, which the checker rejects. The legacy exporter writes a valid opset-17 graph
    # that keeps the factorized convs; the file gets the same checker, onnxruntime and PyTorch checks
    # as any other, so its deprecation costs nothing in correctness. Should a later torch remove it,
    # the ExportError below tells the user to ask for 18.
    try:
        # verbose=False should keep the exporters off stdout; the redirect makes sure, as only the CLI may print.
        with contextlib.redirect_stdout(io.StringIO()), _library_logs_silenced():
            if opset < NATIVE_OPSET:
                return _legacy_onnx_model(model, example, opset)
            program = torch.onnx.export(model, (example,), dynamo=True, opset_version=opset, verbose=False,
                                        input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                        dynamic_shapes=({0: torch.export.Dim("batch")},))
    except Exception as error:  # the exporters raise many types; the CLI needs one with a hint
        hint = "try --format torch.export" if opset == NATIVE_OPSET else f"use --opset {NATIVE_OPSET}"
        raise ExportError(f"the ONNX exporter failed at opset {opset}: {error}; {hint}") from error
    assert program is not None  # the dynamo exporter always returns its program
    return program.model_proto


@contextlib.contextmanager
def _library_logs_silenced() -> Iterator[None]:
    # onnxscript's version converter logs a whole traceback to stderr (through logging) before it
    # gives up on an opset; the ExportError that follows says what happened, and only the CLI prints.
    loggers = [logging.getLogger(name) for name in ("onnxscript", "torch.onnx")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL + 1)  # inherited by their child loggers, unlike `disabled`
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _legacy_onnx_model(model: nn.Module, example: torch.Tensor, opset: int) -> onnx.ModelProto:
    import onnx

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # Chosen on purpose for opsets below 18 (see _onnx_model), so its deprecation notices are not news.
        warnings.filterwarnings("ignore", message=r"You are using the legacy TorchScript-based ONNX export",
                                category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r"The feature will be removed", category=DeprecationWarning)
        # torch types `f` as a path, but the TorchScript-based exporter writes to a file object as well.
        torch.onnx.export(model, (example,), buffer,  # type: ignore[arg-type]
                          dynamo=False, opset_version=opset, verbose=False,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    return onnx.load_from_string(buffer.getvalue())


def _session(path: Path) -> onnxruntime.InferenceSession:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    # Use as many threads as PyTorch is allowed (OMP_NUM_THREADS), and keep onnxruntime's warnings off stderr.
    options.intra_op_num_threads = torch.get_num_threads()
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _read_opset(path: Path) -> int | None:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return next((entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx")), None)


# --------------------------------------------------------------- TorchScript


@contextlib.contextmanager
def _jit_deprecation_silenced() -> Iterator[None]:
    # torch.jit.trace/save/load raise a FutureWarning on every call (TorchScript is deprecated), yet
    # the format is what C++ and mobile runtimes still load; the user asked for it, so the warning
    # only adds noise (and fails pytest's filterwarnings=error). Other warnings, such as a
    # TracerWarning about data-dependent control flow, still come through.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)
        yield


def _torchscript(model: nn.Module, example: torch.Tensor,
                 batches: list[torch.Tensor]) -> tuple[Callable[[Path], None], Check, str]:
    # Traced, not scripted: torch.jit.script cannot read the fx GraphModule's generated code.
    def save(path: Path) -> None:
        with _jit_deprecation_silenced(), torch.no_grad():
            traced = torch.jit.trace(model, (example,))
            torch.jit.save(traced, str(path))

    def check(path: Path) -> float:
        with _jit_deprecation_silenced():
            loaded = torch.jit.load(str(path), map_location="cpu")
        return _max_abs_diff(model, loaded, batches, "TorchScript model")

    return save, check, f"torch {torch.__version__}"


# -------------------------------------------------------------- torch.export


def _program(model: nn.Module, example: torch.Tensor,
             batches: list[torch.Tensor]) -> tuple[Callable[[Path], None], Check, str]:
    def save(path: Path) -> None:
        try:
            program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
        except Exception as error:  # torch.export raises many types; the CLI needs one with a hint
            raise ExportError(f"torch.export failed: {error}; try --format torchscript") from error
        torch.export.save(program, path)

    def check(path: Path) -> float:
        return _max_abs_diff(model, torch.export.load(path).module(), batches, "torch.export program")

    return save, check, f"torch {torch.__version__}"
