"""Files: the one place where cstar checks a path before reading it and writes a file atomically.

Rules (docs/compile.md, "What cstar writes and reads"):

- cstar reads only regular files, and checks with ``os.stat`` before opening, so a FIFO, a device or
  a symlink loop is an error at once, never a hang.
- cstar writes only regular files: it never replaces a device, FIFO, socket or folder, and writes
  nothing under ``/proc``, ``/sys`` or ``/dev``. A symlink is followed when it leads to a regular
  file (the file it leads to is replaced, the link stays); a dangling or looping link is refused.
- A file torch cannot load is described in cstar's words (``load_failure``), never with torch's
  advice to unpickle it.
- A file or folder whose mode has no write bit is read-only to cstar, even when it runs as root.
- Every write goes to a fresh temporary file in the same folder, is fsynced and renamed over the
  target, so a kill or a full disk leaves the previous file whole and no temporary file behind.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import pickle
import stat
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, TypeVar

from .errors import RunError

T = TypeVar("T")

# Kernel file systems: a write there changes the machine, not a file.
_KERNEL_ROOTS = (Path("/proc"), Path("/sys"), Path("/dev"))
_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


class FileProblem(RunError):
    """A path cstar will not read or write, or a write that failed; says why and what to do."""


def kind(path: str | Path) -> str:
    """What ``path`` is, following symlinks, in words: "a file", "a folder", "a FIFO (named pipe)", ...,
    "a symlink loop", "a broken symlink", or "missing"; never opens it.

    >>> kind("/")
    'a folder'
    """
    try:
        mode = os.stat(path).st_mode
    except OSError as error:
        return _missing_kind(path, error)
    if stat.S_ISREG(mode):
        return "a file"
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def _missing_kind(path: str | Path, error: OSError) -> str:
    if error.errno == errno.ELOOP:
        return "a symlink loop"
    if error.errno in (errno.ENOENT, errno.ENOTDIR) and os.path.islink(path):
        return "a broken symlink"
    if error.errno in (errno.ENOENT, errno.ENOTDIR):
        return "missing"
    return f"unreachable ({error.strerror or error})"


def require_file(path: str | Path, what: str = "file") -> None:
    """Refuse, without opening it, a ``path`` that is not a regular file (a FIFO would block the read).

    Raises:
        FileNotFoundError: ``path`` does not exist (callers have their own words for that).
        FileProblem: it is a folder, FIFO, device, socket or symlink loop.
    """
    found = kind(path)
    if found == "a file":
        return
    if found == "missing":
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(path))
    raise FileProblem(f"the {what} {path} is {found}, not a regular file",
                      help="cstar reads only regular files; check the path")


def load_failure(path: Path, error: Exception) -> str:
    """Why ``torch.load(path, weights_only=True)`` failed, in cstar's words.

    Never torch's advice to reload with ``weights_only=False`` (that would run the file's code), and
    never the pickle machinery's errors for a file that is no checkpoint at all ("list index out of range").
    """
    if isinstance(error, pickle.UnpicklingError):
        return ("it holds Python objects other than tensors, which cstar never unpickles (they could run "
                "code); save a state dict: torch.save(model.state_dict(), PATH)")
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError as reading:
        return reading.strerror or str(reading)
    # torch.save writes a zip archive; before torch 1.6, a pickle (protocol 2: 0x80 0x02).
    if not head.startswith((b"PK", b"\x80")):
        return "it is not a torch.save file (neither a zip archive nor a pickle of tensors)"
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"the file is damaged ({first[:200]})"


def require_folder(path: str | Path, what: str = "folder") -> None:
    """Refuse a ``path`` that exists and is not a folder (``missing`` is the caller's to report).

    Raises:
        FileProblem: it is a file, FIFO, device, socket or symlink loop.
    """
    found = kind(path)
    if found not in ("a folder", "missing"):
        raise FileProblem(f"the {what} {path} is {found}, not a folder", help="check the path")


def ensure_folder(folder: Path) -> None:
    """Create ``folder`` (and its parents) for writing, or check that it may be written into.

    Raises:
        FileProblem: it is a file or special file, under /proc, /sys or /dev, read-only, or cannot be made.
    """
    _refuse_kernel(folder)
    found = kind(folder)
    if found == "missing":
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except NotADirectoryError:
            blocker = next(parent for parent in folder.parents if os.path.lexists(parent))
            raise FileProblem(f"cannot write into {folder}: {blocker} is {kind(blocker)}, not a folder",
                              help="choose another --out") from None
        except OSError as error:
            raise _write_problem(folder, error) from None
        return
    if found != "a folder":
        raise FileProblem(f"cannot write into {folder}: it is {found}, not a folder",
                          help="choose another --out, a folder or a path that does not exist yet")
    if not os.stat(folder).st_mode & 0o222:
        raise FileProblem(f"cannot write into {folder}: the folder is read-only",
                          help="choose another --out, or make the folder writable (chmod u+w)")


def writable_target(path: Path) -> Path:
    """The regular file a write to ``path`` replaces: ``path``, or the file its symlink leads to.

    Raises:
        FileProblem: ``path`` is a folder, device, FIFO, socket, a dangling or looping symlink, a
            read-only file, or lies under /proc, /sys or /dev.
    """
    _refuse_kernel(path)
    found = kind(path)
    if found == "missing":
        return path
    if found != "a file":
        raise FileProblem(f"cannot write {path}: it is {found}, not a regular file",
                          help="cstar replaces only regular files; choose another path")
    if not os.stat(path).st_mode & 0o222:
        raise FileProblem(f"cannot write {path}: the file is read-only",
                          help="make it writable (chmod u+w) if it should change, or choose another path")
    target = Path(os.path.realpath(path))
    _refuse_kernel(target)
    return target


def remove(path: Path) -> None:
    """Delete the file ``path`` (a symlink: the link) if it is there; the rules of ``writable_target`` apply.

    Raises:
        FileProblem: it is a folder or special file, read-only, or cannot be deleted.
    """
    if not os.path.lexists(path):
        return
    writable_target(path)
    try:
        path.unlink(missing_ok=True)
    except OSError as error:
        raise _write_problem(path, error) from None


def _refuse_kernel(path: Path) -> None:
    real = Path(os.path.realpath(path))
    if any(real == root or root in real.parents for root in _KERNEL_ROOTS):
        raise FileProblem(f"cannot write {path}: it is under /{real.parts[1]}, a kernel file system, not storage",
                          help="choose a path on a disk")


def replace(path: Path, save: Callable[[Path], T], *, suffix: str = "") -> T:
    """Write ``path`` atomically: ``save`` writes (and may check) a temporary file in the same
    folder, which is then fsynced and renamed over the target. Returns what ``save`` returns.

    The temporary file is created with the umask's permissions (an existing file's mode is kept)
    and always removed on failure; ``suffix`` keeps a format's own extension on it.

    Raises:
        FileProblem: the path may not be written (see ``writable_target``) or the write failed (a full
            disk, say); the previous file is left as it was.
    """
    target = writable_target(path)
    ensure_folder(target.parent)
    temporary = target.parent / f".{target.name}.{uuid.uuid4().hex}.tmp{suffix}"
    try:
        os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666))
        with contextlib.suppress(FileNotFoundError):
            os.chmod(temporary, os.stat(target).st_mode & 0o7777)
        result = save(temporary)
        _fsync(temporary, os.O_RDONLY)
        os.replace(temporary, target)
        _fsync(target.parent, os.O_RDONLY)
    except OSError as error:
        raise _write_problem(path, error) from None
    finally:
        # Cleanup must not hide the error that brought us here.
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
    return result


def write_stream(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """``replace`` with ``write`` given the open temporary file."""
    def save(temporary: Path) -> None:
        with open(temporary, "wb") as handle:
            write(handle)

    replace(path, save)


def write_bytes(path: Path, data: bytes) -> None:
    write_stream(path, lambda handle: handle.write(data))


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def _fsync(path: Path, flags: int) -> None:
    # The rename is durable only once the data, then the folder entry, are on disk.
    try:
        descriptor = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError as error:
        if error.errno in (errno.EIO, errno.ENOSPC, errno.EDQUOT):
            raise
    finally:
        os.close(descriptor)


def _write_problem(path: Path, error: OSError) -> FileProblem:
    reason = error.strerror or str(error)
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return FileProblem(f"cannot write {path}: {reason}",
                           help="free some disk space or choose another --out; nothing already written was lost")
    return FileProblem(f"cannot write {path}: {reason}",
                       help="choose a path in a folder you can write; nothing already written was lost")


@contextlib.contextmanager
def exclusive(folder: Path, name: str = ".cstar.lock") -> Iterator[None]:
    """Hold ``folder``'s writer lock for the block: one cstar process writes a folder at a time.

    The lock is an ``flock`` on ``folder/name``: the kernel drops it when the process ends, however
    it ends, so a killed run leaves no stale lock behind.

    Raises:
        FileProblem: another process holds the lock, or the lock file cannot be made.
    """
    ensure_folder(folder)
    path = writable_target(folder / name)
    try:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    except OSError as error:
        raise _write_problem(path, error) from None
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FileProblem(f"another cstar process is writing to {folder} (it holds {path})",
                              help="wait for it to finish, or choose another --out") from None
        yield
    finally:
        os.close(descriptor)
