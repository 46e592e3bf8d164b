"""Output safety: the one rule for every file hwdiff writes (captures, diffs, sigma files, reports).

1. Before any work: :func:`check_outputs` refuses an output that is the same file as an input
   (resolved paths; symbolic and hard links included), the same as another output of the command,
   an existing directory where a file goes (or a file where a folder goes), or a location this
   process cannot create files in.
2. Writing: every output is written under a temporary name beside its target
   (``.NAME.PID@HOST.partial``), synced to disk and renamed over the target only when complete
   (:func:`temporary`, :func:`commit`, or both at once with :func:`atomic_output`). On any failure,
   and on SIGINT / SIGTERM / SIGHUP (the CLI turns those into :class:`Interrupted`), the temporary
   is removed and an existing target is left exactly as it was.
3. A full disk, a missing permission or a read-only filesystem becomes one :class:`OutputError`
   naming the path and the free space or the permission (:func:`write_error`); an HDF5 file that
   failed is closed without letting HDF5 write into it again (:func:`discard_h5`).
4. Temporaries left by processes that no longer run (a SIGKILL, a power cut) are removed the next
   time hwdiff writes into that folder, with one log line each (:func:`remove_stale`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import signal
import socket
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator

from ..errors import HwdiffError, OutputError

log = logging.getLogger(__name__)

_HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"
_PARTIAL = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)(?:@(?P<host>[A-Za-z0-9_-]+))?\.partial$")
_live: set[Path] = set()  # temporaries of this process not yet committed or removed


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised in the main thread so that every ``finally`` cleans up as for Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_received: list[
    int
] = []  # signals seen by the handler, in case the exception it raised was swallowed


def install_signal_handlers() -> None:
    """Turn SIGINT, SIGTERM and SIGHUP into :class:`Interrupted`. The signal is also remembered:
    Python drops an exception raised while it runs a weakref callback or a ``__del__`` ("Exception
    ignored in ..."), and :func:`check_interrupted` raises it again at the next safe point."""

    def handler(signum: int, frame: Any) -> None:
        _received.append(signum)
        raise Interrupted(signum)

    def unraisable(info: Any, previous: Any = sys.unraisablehook) -> None:
        if not (isinstance(info.exc_value, KeyboardInterrupt) and _received):
            previous(
                info
            )  # (a dropped interrupt is raised again by check_interrupted, not printed)

    _received.clear()
    sys.unraisablehook = unraisable
    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), handler)


def check_interrupted() -> None:
    """Raise :class:`Interrupted` when a signal arrived whose exception did not reach the caller
    (called before an output is committed, so an interrupted run never leaves one)."""
    if _received:
        raise Interrupted(_received[0])


# -- 1. before any work ------------------------------------------------------------------------
def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name one file: the same inode when both exist (hard and symbolic links
    included), else the same fully resolved path."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def check_outputs(
    inputs: Iterable[Any], outputs: Iterable[Any], *, folders: Iterable[Any] = ()
) -> None:
    """Refuse, before any work, outputs that would destroy an input or each other, or cannot be written.

    ``inputs`` and ``outputs`` are file paths or objects with a ``path`` (an open capture); other
    objects and None are skipped. ``folders`` are output directories (a report's).
    """
    inputs = _paths(inputs)
    files = _paths(outputs)
    for folder in (Path(p) for p in folders if p is not None):
        if folder.exists() and not folder.is_dir():
            raise OutputError(
                f"output folder {folder} is an existing file, not a folder; choose another -o"
            )
        _check_creatable(folder)
    for index, path in enumerate(files):
        if path.is_dir():
            raise OutputError(
                f"output {path} is an existing directory; give a file name (e.g. {path / 'out.h5'})"
            )
        for source in inputs:
            if same_file(path, source):
                raise OutputError(
                    f"output {path} is the input {source}: writing it would destroy the input; "
                    "choose another output name"
                )
            if source.is_dir() and _inside(path, source):
                raise OutputError(
                    f"output {path} is inside the input {source} (an input folder: a capture directory "
                    "or a checkpoint; its files are the input); choose an output outside it"
                )
        for other in files[:index]:
            if same_file(path, other):
                raise OutputError(
                    f"two outputs of this command are the same file ({other} and {path}); "
                    "give each its own name"
                )
        _check_creatable(path.parent)


def _inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` (existing or not) lies within ``folder``, links resolved."""
    try:
        Path(os.path.realpath(path)).relative_to(os.path.realpath(folder))
    except ValueError:
        return False
    return True


def _paths(items: Iterable[Any]) -> list[Path]:
    found = []
    for item in items:
        item = getattr(item, "path", item)
        if isinstance(item, (str, os.PathLike)):
            found.append(Path(item))
    return found


def _check_creatable(folder: Path) -> None:
    """``folder``, or its nearest existing ancestor, must be a directory this process can write in."""
    probe = Path(folder)
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise OutputError(f"cannot create {folder}: {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        why = (
            "read-only filesystem" if _read_only(probe) else f"no write permission ({_mode(probe)})"
        )
        raise OutputError(f"cannot write into {probe}: {why}")


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def _mode(path: Path) -> str:
    try:
        info = path.stat()
    except OSError:
        return "unknown mode"
    return (
        f"mode {info.st_mode & 0o777:o}, owner uid {info.st_uid}, this process uid {os.geteuid()}"
    )


# -- 2. writing -------------------------------------------------------------------------------
def temporary(target: str | os.PathLike) -> Path:
    """A fresh temporary path beside ``target`` (created by the caller); stale ones there are removed first."""
    target = Path(target)
    folder = target.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(exc, target) from exc
    remove_stale(folder)
    temp = folder / f".{target.name or 'output'}.{os.getpid()}@{_HOST}.partial"
    discard(temp)
    _live.add(temp)
    return temp


def commit(temp: Path, target: str | os.PathLike) -> Path:
    """Sync ``temp`` to disk and rename it onto ``target`` (atomic on one filesystem)."""
    target = Path(target)
    check_interrupted()
    try:
        _fsync(temp)
        os.replace(temp, target)
        _fsync(target.parent, directory=True)
    except OSError as exc:
        raise write_error(exc, target) from exc
    _live.discard(temp)
    return target


def commit_dir(temp: Path, target: str | os.PathLike) -> Path:
    """Rename a finished temporary folder onto ``target`` (a multi-rank capture). An existing
    ``target`` (the caller checked it is a folder it may replace) is first renamed aside under a
    temporary name and removed only after the new folder is in place."""
    target = Path(target)
    old = None
    try:
        _fsync(temp, directory=True)
        if target.exists():
            old = target.parent / f".{target.name}.old.{os.getpid()}@{_HOST}.partial"
            discard(old)
            _live.add(old)
            os.replace(target, old)
        os.replace(temp, target)
        _fsync(target.parent, directory=True)
    except OSError as exc:
        if old is not None and old.exists() and not target.exists():
            os.replace(old, target)  # put the earlier folder back
        raise write_error(exc, target) from exc
    _live.discard(temp)
    if old is not None:
        discard(old)
    return target


def discard(temp: Path) -> None:
    """Remove a temporary file or folder of this process (never anything else)."""
    with contextlib.suppress(FileNotFoundError):
        if temp.is_dir() and not temp.is_symlink():
            shutil.rmtree(temp, ignore_errors=True)
        else:
            temp.unlink()
    _live.discard(temp)


@contextlib.contextmanager
def atomic_output(target: str | os.PathLike) -> Iterator[Path]:
    """``with atomic_output(path) as temp:`` write ``temp``; it becomes ``path`` only if the block succeeds."""
    temp = temporary(target)
    try:
        try:
            yield temp
        except OSError as exc:
            raise write_error(exc, target) from exc
        commit(temp, target)
    finally:
        discard(temp)


def write_text(target: str | os.PathLike, text: str) -> Path:
    """Write a text file atomically (see :func:`atomic_output`)."""
    with atomic_output(target) as temp:
        temp.write_text(text, encoding="utf-8")
    return Path(target)


def _fsync(path: Path, *, directory: bool = False) -> None:
    if directory and os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        if not directory or exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def cleanup_all() -> None:
    """Remove every temporary this process still holds (called by the CLI on the way out)."""
    for temp in list(_live):
        discard(temp)


# -- 3. failures ------------------------------------------------------------------------------
_ERRNO = re.compile(r"errno = (\d+)")


def write_error(exc: BaseException, target: str | os.PathLike) -> HwdiffError:
    """One clear :class:`OutputError` for an OSError (or h5py's) met while writing ``target``;
    an :class:`HwdiffError` is returned as it is."""
    if isinstance(exc, HwdiffError):
        return exc
    target = Path(target)
    code = getattr(exc, "errno", None)
    found = _ERRNO.search(str(exc))
    if found and code not in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS):
        code = int(found.group(1))
    if code in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(exc):
        return OutputError(
            f"no space left on the device writing {target} ({_free(target)}); nothing was written "
            "and any earlier file of that name is unchanged"
        )
    if code == errno.EROFS:
        return OutputError(f"cannot write {target}: read-only filesystem")
    if code in (errno.EACCES, errno.EPERM):
        return OutputError(
            f"cannot write {target}: permission denied in {target.parent} ({_mode(target.parent)})"
        )
    reason = getattr(exc, "strerror", None) or (str(exc).splitlines() or [type(exc).__name__])[0]
    return OutputError(f"cannot write {target}: {reason}")


def _free(target: Path) -> str:
    probe = target.parent
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    try:
        usage = shutil.disk_usage(probe)
    except OSError:
        return "free space unknown"
    return f"{usage.free / 2**20:.1f} MiB free of {usage.total / 2**20:.1f} MiB on that filesystem"


def open_h5(temp: Path) -> Any:
    """A new HDF5 file for writing at ``temp``, set up so that a write error is raised by the write
    that met it: no chunk cache (whole chunks are written directly; a cache would hold them back
    and meet the error while a dataset is garbage-collected, where it cannot be raised)."""
    import h5py

    return h5py.File(temp, "w", libver=("v110", "v110"), rdcc_nbytes=0)


def discard_h5(handle: Any, temp: Path) -> None:
    """Close an HDF5 file that failed and remove it, without HDF5 writing into a full disk again.

    Truncating the file first frees its space, so the metadata HDF5 flushes on close fits; any
    error of that close is moot (the file is deleted) and is not let out as a second fault.
    """
    with contextlib.suppress(OSError):
        os.truncate(temp, 0)
    with contextlib.suppress(Exception):
        handle.close()
    discard(temp)


# -- 4. leftovers -----------------------------------------------------------------------------
def remove_stale(folder: Path) -> list[Path]:
    """Remove temporaries in ``folder`` left by processes of this host that no longer run."""
    removed: list[Path] = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _PARTIAL.match(entry.name)
        if not match or match.group("host") not in (None, _HOST):
            continue
        pid = int(match.group("pid"))
        if pid == os.getpid() or _alive(pid):
            continue
        try:
            size = entry.stat().st_size
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        except OSError:
            continue
        log.warning(
            "removed %s (%.1f MiB), left by process %d that is no longer running",
            entry,
            size / 2**20,
            pid,
        )
        removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
