"""Command line, `cstar export`: a compiled folder as ONNX, TorchScript, torch.export or safetensors, checked."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from ..lang.render import si
from .output import EXIT_OK, USER_ERRORS, print_error


def run_export(args: argparse.Namespace, console: Console) -> int:
    from ..deploy.export import export

    try:
        exported = export(Path(args.folders[0]), args.format, out=args.out, opset=args.opset)
    except USER_ERRORS as error:
        return print_error(console, error, "full", failed="export-failed")
    check = "" if exported.max_abs_diff is None else (
        f"; checked with {exported.checked_with}: max abs difference {exported.max_abs_diff:.2e} against PyTorch")
    opset = f", opset {exported.opset}" if exported.opset else ""
    console.out(f"wrote {exported.path} ({si(exported.bytes)}B, {exported.format}{opset}){check}")
    return EXIT_OK
