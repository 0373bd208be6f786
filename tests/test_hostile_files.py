"""Hostile paths and files: cstar never destroys, never leaks, never hangs, and never shows a traceback.

Every case builds its hostile fixture in tmp_path at test time (FIFOs, device nodes, symlinks and
loops, read-only files, text where weights belong) and asserts the documented exit code, a cstar
error message, no traceback, no leaked content, and that nothing was replaced or left behind.
Cases that could block on a FIFO if cstar regressed run in a subprocess with a timeout.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from cstar_dsl import files
from cstar_dsl.cli import main
from cstar_dsl.deploy import export as export_module
from cstar_dsl.deploy.export import ExportError
from tests.helpers import DIGITS, RESNET18, ROOT, compile_cli, run_cli, save_model_folder, variant, write_spec

SECRET = "SECRET-LINE-MUST-NOT-LEAK"
UGLY = "model   {\n    classes=10\n}\n"
ROOT_USER = os.geteuid() == 0


def _clean(result: subprocess.CompletedProcess[str]) -> str:
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    assert SECRET not in output, output
    return output


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def _loop(path: Path) -> Path:
    path.symlink_to(path.name)
    return path


def _secret(folder: Path, name: str = "passwd.txt") -> Path:
    path = folder / name
    path.write_text(f"root:x:0:0:{SECRET}:/root:/bin/bash\n")
    return path


def _recipe_with_weights(folder: Path) -> None:
    variant(folder, DIGITS, 'model {\n  weights = "w.pt"\n}\n')


def _only(folder: Path, *names: str) -> None:
    """Nothing but ``names`` in ``folder``: no temporary file was left behind."""
    assert sorted(p.name for p in folder.iterdir()) == sorted(names)


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_model_folder(tmp_path_factory.mktemp("model"), factorized=False)


# ------------------------------------------------------------------ 1. writing: only regular files it owns


@pytest.mark.skipif(not ROOT_USER, reason="making a device node needs root")
def test_export_never_replaces_a_device(model_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    # A private clone of /dev/full (char 1:7): a regression replaces this node, not the machine's.
    device = tmp_path / "full"
    os.mknod(device, stat.S_IFCHR | 0o666, os.makedev(1, 7))
    assert main(["export", str(model_folder), "--format", "safetensors", "--out", str(device)]) == 4
    out = capsys.readouterr().out
    assert "error[export-failed]" in out and "a character device, not a regular file" in out
    assert stat.S_ISCHR(os.lstat(device).st_mode)
    _only(tmp_path, "full")


@pytest.mark.parametrize("target", ["/dev/full", "/dev/null", "/proc/self/status", "/sys/kernel/x"])
def test_paths_under_kernel_file_systems_are_never_written(target: str):
    with pytest.raises(files.FileProblem, match="cannot write"):
        files.writable_target(Path(target))


def test_export_never_replaces_a_fifo(model_folder: Path, tmp_path: Path):
    fifo = _fifo(tmp_path / "model.onnx")
    result = run_cli("export", model_folder, "--format", "safetensors", "--out", fifo)
    assert result.returncode == 4 and "a FIFO (named pipe), not a regular file" in _clean(result)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    _only(tmp_path, "model.onnx")


def test_export_follows_a_symlink_to_a_regular_file(model_folder: Path, tmp_path: Path):
    real = tmp_path / "real.safetensors"
    real.write_bytes(b"old")
    link = tmp_path / "link.safetensors"
    link.symlink_to(real.name)
    assert main(["export", str(model_folder), "--format", "safetensors", "--out", str(link)]) == 0
    assert link.is_symlink() and os.readlink(link) == real.name  # the link stays a link
    assert real.read_bytes() == (model_folder / "model.safetensors").read_bytes()
    _only(tmp_path, "real.safetensors", "link.safetensors")


@pytest.mark.parametrize("kind", ["dangling", "loop", "to-a-fifo"])
def test_export_refuses_a_symlink_that_leads_to_no_regular_file(model_folder: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str], kind: str):
    link = tmp_path / "model.safetensors"
    if kind == "dangling":
        link.symlink_to("elsewhere/missing")
    elif kind == "loop":
        _loop(link)
    else:
        _fifo(tmp_path / "pipe")
        link.symlink_to("pipe")
    assert main(["export", str(model_folder), "--format", "safetensors", "--out", str(link)]) == 4
    out = capsys.readouterr().out
    assert "error[export-failed]" in out and "not a regular file" in out and "Traceback" not in out
    assert link.is_symlink()
    _only(tmp_path, "model.safetensors", *["pipe"] * (kind == "to-a-fifo"))


def test_export_into_a_read_only_file_is_refused_even_for_root(model_folder: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"keep me")
    target.chmod(0o444)
    assert main(["export", str(model_folder), "--format", "safetensors", "--out", str(target)]) == 4
    assert "the file is read-only" in capsys.readouterr().out
    assert target.read_bytes() == b"keep me"
    _only(tmp_path, "model.safetensors")


def test_fmt_leaves_a_read_only_recipe_alone_even_for_root(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    recipe = tmp_path / "r.cstar"
    recipe.write_text(UGLY)
    recipe.chmod(0o444)
    assert main(["fmt", str(recipe)]) == 1
    out = capsys.readouterr().out
    assert "error[unwritable-file]" in out and "read-only" in out and "1 with errors" in out
    assert recipe.read_text() == UGLY and stat.S_IMODE(recipe.stat().st_mode) == 0o444
    _only(tmp_path, "r.cstar")


def test_fmt_formats_through_a_symlink_and_keeps_the_link(tmp_path: Path):
    real = tmp_path / "real.cstar"
    real.write_text(UGLY)
    real.chmod(0o640)
    link = tmp_path / "link.cstar"
    link.symlink_to(real.name)
    assert main(["fmt", str(link)]) == 0
    assert link.is_symlink() and real.read_text() == "model {\n  classes = 10\n}\n"
    assert stat.S_IMODE(real.stat().st_mode) == 0o640  # the replaced file keeps its mode
    _only(tmp_path, "real.cstar", "link.cstar")


def test_fmt_on_a_full_disk_keeps_the_recipe_and_leaves_no_temporary_file(tmp_path: Path, monkeypatch,
                                                                         capsys: pytest.CaptureFixture[str]):
    recipe = tmp_path / "r.cstar"
    recipe.write_text(UGLY)

    def full(descriptor: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files.os, "fsync", full)
    assert main(["fmt", str(recipe)]) == 1
    out = capsys.readouterr().out
    assert "error[unwritable-file]" in out and "No space left on device" in out and "free some disk space" in out
    assert recipe.read_text() == UGLY
    _only(tmp_path, "r.cstar")


def test_a_write_onto_dev_full_fails_cleanly(tmp_path: Path):
    # The save step itself hits a full disk (writing to /dev/full gives ENOSPC).
    def save(temporary: Path) -> None:
        with open("/dev/full", "wb") as full, open(temporary, "wb") as handle:
            handle.write(b"x")
            full.write(b"x" * 65536)
            full.flush()

    with pytest.raises(files.FileProblem, match="No space left on device"):
        files.replace(tmp_path / "out.bin", save)
    _only(tmp_path)


@pytest.mark.parametrize("kind", ["file", "fifo", "read-only", "proc", "under-a-file"])
def test_compile_refuses_an_out_folder_it_may_not_write(tmp_path: Path, kind: str):
    spec = write_spec(tmp_path)
    out = tmp_path / "out"
    expected = {"file": "it is a file, not a folder", "fifo": "it is a FIFO (named pipe), not a folder",
                "read-only": "the folder is read-only", "proc": "under /proc, a kernel file system",
                "under-a-file": "blocker is a file, not a folder"}[kind]
    if kind == "file":
        out.write_text("precious")
    elif kind == "fifo":
        _fifo(out)
    elif kind == "read-only":
        out.mkdir()
        out.chmod(0o555)
    elif kind == "proc":
        out = Path("/proc/cstar-hostile-test/run")
    else:
        (tmp_path / "blocker").write_text("precious")
        out = tmp_path / "blocker" / "run"
    result = run_cli("compile", spec, "--out", out, "--quiet")
    assert result.returncode == 4, result
    output = _clean(result)
    assert "error[run-failed]" in output and expected in output
    if kind in ("file", "under-a-file"):
        assert (tmp_path / ("out" if kind == "file" else "blocker")).read_text() == "precious"
    if kind == "read-only":
        assert list(out.iterdir()) == []


# ------------------------------------------------------------------ 2. reading: a recipe is no file reader


def test_extend_of_a_file_that_is_no_recipe_never_quotes_it(tmp_path: Path):
    secret = _secret(tmp_path)
    recipe = tmp_path / "r.cstar"
    recipe.write_text(f'extend "{secret}"\n')
    for fmt in ("full", "concise", "json"):
        result = run_cli("check", "--format", fmt, recipe, cwd=tmp_path)
        assert result.returncode == 1 and "not-a-recipe" in _clean(result)


def test_extend_through_a_cstar_symlink_to_another_file_is_refused(tmp_path: Path):
    _secret(tmp_path)
    (tmp_path / "base.cstar").symlink_to("passwd.txt")
    (tmp_path / "r.cstar").write_text('extend "base.cstar"\n')
    result = run_cli("check", "r.cstar", cwd=tmp_path)
    assert result.returncode == 1 and "error[not-a-recipe]" in _clean(result)


@pytest.mark.parametrize("named", ["passwd.txt", "link.cstar"])
def test_a_command_line_file_that_is_no_recipe_is_not_quoted(tmp_path: Path, named: str):
    _secret(tmp_path)
    (tmp_path / "link.cstar").symlink_to("passwd.txt")
    for command in ("check", "plan", "compile"):
        result = run_cli(command, named, cwd=tmp_path)
        assert result.returncode == 1 and "error[not-a-recipe]" in _clean(result), (command, result)


def test_extend_of_a_binary_file_is_refused_without_reading_it(tmp_path: Path):
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01" + SECRET.encode() + b"\xff" * 64)
    (tmp_path / "r.cstar").write_text('extend "blob.bin"\n')
    result = run_cli("check", "r.cstar", cwd=tmp_path)
    assert result.returncode == 1 and "error[not-a-recipe]" in _clean(result)


# ------------------------------------------------------------------ 3. no hangs: special files fail at once


@pytest.mark.parametrize("kind", ["fifo", "loop", "device"])
def test_a_special_file_on_the_command_line_is_a_usage_error(tmp_path: Path, kind: str):
    path = tmp_path / "r.cstar"
    {"fifo": _fifo, "loop": _loop, "device": lambda p: p.symlink_to("/dev/zero")}[kind](path)
    for command in (["check"], ["fmt"], ["fmt", "--check"], ["plan"]):
        result = run_cli(*command, path)
        assert result.returncode == 2 and "cstar: error:" in _clean(result), (command, result)


@pytest.mark.parametrize("kind", ["fifo", "loop", "device"])
def test_extend_of_a_special_file_fails_at_once(tmp_path: Path, kind: str):
    base = tmp_path / "base.cstar"
    {"fifo": _fifo, "loop": _loop, "device": lambda p: p.symlink_to("/dev/zero")}[kind](base)
    (tmp_path / "r.cstar").write_text('extend "base.cstar"\n')
    result = run_cli("check", "r.cstar", cwd=tmp_path)
    assert result.returncode == 1 and "error[extend-not-found]" in _clean(result)
    assert {"fifo": "a FIFO", "loop": "a symlink loop", "device": "a character device"}[kind] in result.stdout


@pytest.mark.parametrize("kind", ["fifo", "loop", "folder"])
def test_weights_that_are_a_special_file_fail_at_once(tmp_path: Path, kind: str):
    weights = tmp_path / "w.pt"
    {"fifo": _fifo, "loop": _loop, "folder": Path.mkdir}[kind](weights)
    _recipe_with_weights(tmp_path)
    result = run_cli("plan", "r.cstar", cwd=tmp_path)
    assert result.returncode == 1, result
    assert "error[unreadable-weights]" in _clean(result) and "not a regular file" in result.stdout


@pytest.mark.parametrize("name", ["model.json", "model.safetensors", "report.json"])
def test_eval_and_export_of_a_run_folder_with_a_fifo_fail_at_once(model_folder: Path, tmp_path: Path, name: str):
    run = tmp_path / "run"
    shutil.copytree(model_folder, run)
    (run / "report.json").write_text("{}")
    (run / name).unlink()
    _fifo(run / name)
    result = run_cli("eval", run)
    assert result.returncode == 4 and "error[eval-failed]" in _clean(result)
    if name != "report.json":
        result = run_cli("export", run, "--format", "safetensors", "--out", tmp_path / "x.safetensors")
        assert result.returncode == 4 and "error[export-failed]" in _clean(result)


@pytest.mark.parametrize("folder", ["fifo", "loop"])
def test_eval_of_a_special_run_folder_fails_at_once(tmp_path: Path, folder: str):
    path = {"fifo": _fifo, "loop": _loop}[folder](tmp_path / "run")
    result = run_cli("eval", path)
    assert result.returncode == 4 and "error[eval-failed]" in _clean(result)


def test_a_data_root_that_is_a_fifo_fails_at_once(tmp_path: Path):
    _fifo(tmp_path / "data")
    mnist = 'model {\n  input = [1, 28, 28]\n}\n\ndata {\n  dataset = mnist\n  root = "data"\n}\n'
    spec = variant(tmp_path, write_spec(tmp_path), mnist, "mnist.cstar")
    result = run_cli("compile", spec, "--out", tmp_path / "run", "--quiet")
    assert result.returncode == 1 and "error[data-not-found]" in _clean(result)


@pytest.mark.parametrize("name", ["checkpoint.pt", "lock.json"])
def test_resume_from_a_fifo_checkpoint_or_lock_fails_at_once(tmp_path: Path, name: str):
    spec = write_spec(tmp_path)
    out = tmp_path / "run"
    out.mkdir()
    _fifo(out / "checkpoint.pt")
    if name == "lock.json":
        _fifo(out / "lock.json")
    result = run_cli("compile", spec, "--out", out, "--resume", "--quiet")
    assert result.returncode == 4 and "error[run-failed]" in _clean(result)
    assert stat.S_ISFIFO(os.lstat(out / name).st_mode)


# ------------------------------------------------------------------ 4. export fails on non-finite outputs


def test_export_of_a_model_with_nan_outputs_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "nan"
    folder.mkdir()
    save_model_folder(folder, factorized=False)
    state = load_file(str(folder / "model.safetensors"))
    state = {name: torch.full_like(t, float("nan")) if t.is_floating_point() else t for name, t in state.items()}
    save_file(state, str(folder / "model.safetensors"))
    for fmt in ("torchscript", "onnx"):
        assert main(["export", str(folder), "--format", fmt]) == 4
        out = capsys.readouterr().out
        assert "error[export-failed]" in out and "NaN or infinite" in out, fmt
    assert sorted(p.name for p in folder.iterdir()) == ["model.json", "model.safetensors"]


def test_the_check_refuses_nan_from_the_exported_file_too():
    model = torch.nn.Identity()
    batch = [torch.rand(2, 3)]
    with pytest.raises(ExportError, match="NaN or infinite"):
        export_module._max_abs_diff(model, lambda x: torch.full_like(x, float("nan")), batch, "file")


# ------------------------------------------------------------------ 5. one writer per run folder


def test_a_second_compile_into_a_locked_folder_fails_at_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    spec = write_spec(tmp_path)
    out = tmp_path / "run"
    with files.exclusive(out):
        assert compile_cli(spec, "--out", out) == 4
    output = capsys.readouterr().out
    assert "error[run-failed]" in output and f"another cstar process is writing to {out}" in output
    assert not (out / "model.safetensors").exists()


def test_a_killed_writer_leaves_no_stale_lock(tmp_path: Path):
    code = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from cstar_dsl import files
        with files.exclusive(Path({str(tmp_path / "run")!r})):
            print("locked", flush=True)
            time.sleep(600)
    """)
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        holder.stdout.close()
        with pytest.raises(files.FileProblem, match="another cstar process"), files.exclusive(tmp_path / "run"):
            pass
    finally:
        holder.kill()
        holder.wait(timeout=60)
    with files.exclusive(tmp_path / "run"):  # the kernel dropped the killed process's lock
        pass


# ------------------------------------------------------------------ 6. no traceback for an ordinary mistake


@pytest.mark.parametrize("change, expected", [
    (lambda d: d["model"].update(arch="torchvision:no_such_net"), "describes a model cstar cannot build"),
    (lambda d: d.update(structure={"kind": "factorized", "ranks": {"features.0": [-3, 2]}}), "positive whole"),
    (lambda d: d.update(structure={"kind": "factorized", "ranks": {"features.0": "x"}}), "positive whole"),
    (lambda d: d.update(structure={"kind": "factorized", "ranks": {"no.such.layer": [2, 2]}}), "no such layer"),
    (lambda d: d.update(structure={"kind": "factorized", "ranks": ["fc"]}), "no `ranks` mapping"),
    (lambda d: d.update(structure={"kind": "quantized"}), "unknown structure kind"),
    (lambda d: d.update(normalize={"mean": "x"}), "`normalize`"),
    (lambda d: d.pop("model"), "cannot build"),
], ids=["unknown-arch", "negative-rank", "rank-not-a-list", "missing-layer", "ranks-not-a-mapping", "unknown-kind",
        "bad-normalize", "no-model"])
def test_a_hostile_model_json_is_an_error_not_a_traceback(model_folder: Path, tmp_path: Path, change, expected: str,
                                                          capsys: pytest.CaptureFixture[str]):
    run = tmp_path / "run"
    shutil.copytree(model_folder, run)
    description = json.loads((run / "model.json").read_text())
    change(description)
    (run / "model.json").write_text(json.dumps(description))
    assert main(["export", str(run), "--format", "torchscript"]) == 4
    out = capsys.readouterr().out
    assert "error[export-failed]" in out and expected in out
    assert main(["eval", str(run)]) == 4
    assert "error[eval-failed]" in capsys.readouterr().out


def test_eval_of_a_run_whose_data_folder_is_gone(model_folder: Path, tmp_path: Path):
    from cstar_dsl.lang.validate import check_file

    run = tmp_path / "run"
    shutil.copytree(model_folder, run)
    resolved = check_file(DIGITS).spec.model_dump(mode="json")
    resolved["data"].update(dataset="mnist", root=str(tmp_path / "gone"), download=False)
    report = json.loads((ROOT / "benchmarks" / "results" / "mnist" / "cstar-16x" / "report.json").read_text())
    (run / "report.json").write_text(json.dumps({**report, "resolved": resolved}))
    for fmt in ("table", "json"):
        result = run_cli("eval", run, "--format", fmt)
        assert result.returncode == 4, result
        output = _clean(result)
        if fmt == "json":
            [diagnostic] = json.loads(result.stdout)
            assert diagnostic["code"] == "eval-failed" and "gone" in diagnostic["message"]
        else:
            assert "error[eval-failed]" in output and "gone" in output


def test_ctrl_c_during_eval_sanity_exits_130(model_folder: Path, monkeypatch, capsys: pytest.CaptureFixture[str]):
    from cstar_dsl.eval import robustness

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(robustness, "reevaluate", interrupted)
    assert main(["eval", str(model_folder), "--sanity"]) == 130
    assert "error[eval-interrupted]" in capsys.readouterr().out


@pytest.mark.parametrize("opset", ["99", "26"])
def test_an_opset_out_of_range_leaves_no_library_traceback(model_folder: Path, tmp_path: Path, opset: str):
    result = run_cli("export", model_folder, "--opset", opset, "--out", tmp_path / "m.onnx")
    assert result.returncode == 4 and "error[export-failed]" in _clean(result)
    assert result.stderr == ""
    _only(tmp_path)


def test_a_model_that_cannot_run_at_the_input_size_is_a_plan_error(tmp_path: Path):
    # CIFAR-10's 32x32 images, which inception_v3's stem shrinks to nothing
    variant(tmp_path, RESNET18, 'model {\n  arch = "torchvision:inception_v3"\n  stem = standard\n}\n\n'
                                "compress {\n  keep = []\n}\n")
    result = run_cli("plan", "r.cstar", cwd=tmp_path)
    assert result.returncode == 1, result
    assert "error[input-mismatch]" in _clean(result) and "resnet18.cstar:6:11" in result.stdout


# ------------------------------------------------------------------ 7. wrong answers


@pytest.mark.parametrize("args", [
    ["compile", "specs/digits.cstar", "--resume", "--force"],
    ["compile", "specs/digits.cstar", "--nproc", "0"],
    ["eval", "runs/x", "--samples", "0"],
])
def test_contradictory_or_empty_options_are_usage_errors(args: list[str]):
    result = run_cli(*args)
    assert result.returncode == 2 and "error: " in result.stderr and result.stderr.startswith("usage: cstar")
    _clean(result)


def test_eval_json_reports_errors_as_json(tmp_path: Path):
    result = run_cli("eval", tmp_path, "--format", "json")
    assert result.returncode == 4
    [diagnostic] = json.loads(result.stdout)
    assert diagnostic["code"] == "eval-failed"


@pytest.mark.parametrize("content", [b"hello world\nthis is text\n", b"a,b\n1,2\n", b"xxx\n", b"", b"PK\x03\x04junk",
                                     "pickle"], ids=["text", "csv", "short", "empty", "bad-zip", "pickle"])
def test_weights_that_are_not_weights_get_a_real_message(tmp_path: Path, content: bytes | str):
    weights = tmp_path / "w.pt"
    if content == "pickle":
        torch.save({"a": subprocess.CompletedProcess([], 0)}, weights)  # needs unpickling a class: refused
    else:
        weights.write_bytes(content)
    _recipe_with_weights(tmp_path)
    result = run_cli("plan", "r.cstar", cwd=tmp_path)
    output = _clean(result)
    assert result.returncode == 1 and "error[unreadable-weights]" in output
    for noise in ("weights_only", "list index out of range", "pop from empty list", "KeyError"):
        assert noise not in output
    if content == "pickle":
        assert "never unpickles" in output


def test_a_damaged_checkpoint_hint_names_the_right_flag(tmp_path: Path):
    from cstar_dsl.train import checkpoint

    path = tmp_path / "checkpoint.pt"
    path.write_text("not a checkpoint")
    with pytest.raises(checkpoint.CheckpointError) as raised:
        checkpoint.load(path)
    assert "--force" in (raised.value.help or "") and "weights_only" not in str(raised.value)
