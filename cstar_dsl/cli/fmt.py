"""Command line, `cstar fmt`: recipes rewritten in the canonical format, or checked or diffed against it (no torch)."""

from __future__ import annotations

import argparse
import difflib
from pathlib import Path

from rich.console import Console

from .. import files
from ..lang.errors import CStarError, Diagnostic
from ..lang.render import plural
from .output import EXIT_INVALID, EXIT_OK, print_diagnostics


def run_fmt(args: argparse.Namespace, console: Console) -> int:
    changed, failed = [], []
    diagnostics: list[Diagnostic] = []
    for name in args.files:
        path = Path(name)
        try:
            original, formatted = _formatted(path, name)
        except CStarError as error:
            failed.append(name)
            diagnostics += error.diagnostics
            continue
        if formatted.encode("utf-8") == original:
            continue
        changed.append(name)
        if args.diff:
            console.out("".join(difflib.unified_diff(
                original.decode("utf-8").splitlines(keepends=True), formatted.splitlines(keepends=True),
                fromfile=name, tofile=name)), end="")
        elif not args.check:
            try:
                files.write_text(path, formatted)
            except files.FileProblem as problem:
                changed.remove(name)
                failed.append(name)
                diagnostics.append(Diagnostic("unwritable-file", str(problem), help=problem.help))
    print_diagnostics(console, diagnostics, args.format)
    dry = args.check or args.diff
    for name in changed:
        console.out(f"{'would reformat' if dry else 'reformatted'} {name}")
    unchanged = len(args.files) - len(changed) - len(failed)
    verb = "would be reformatted" if dry else "reformatted"
    console.out(f"{plural(len(changed), 'file')} {verb}, {unchanged} left unchanged"
                + (f", {len(failed)} with errors" if failed else ""))
    if failed or ((args.check or args.diff) and changed):
        return EXIT_INVALID
    return EXIT_OK


def _formatted(path: Path, name: str) -> tuple[bytes, str]:
    """The recipe's bytes and its canonical text.

    Raises:
        CStarError: the file cannot be read (``unreadable-file``), or a syntax error.
    """
    from ..lang.fmt import format_text

    try:
        original = path.read_bytes()
    except OSError as error:
        raise CStarError([Diagnostic("unreadable-file", f"cannot read {name}: {error.strerror or error}")]) from None
    return original, format_text(original, name)
