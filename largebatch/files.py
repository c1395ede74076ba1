"""Atomic file writes and the temporary files they leave when a writer is killed.

    atomic_write(path, write_fn, fsync=True, verify=None, mode_like=None) -> write_fn's result
    create_new(path) -> int                          a descriptor of a new file; never through a link
    clean_stale_temps(directory) -> list[Path]      the temporaries of dead writers, removed
    temp_path(path) -> Path                          where atomic_write writes before the rename

``atomic_write`` hands ``write_fn`` a binary file opened on a temporary name in the same
directory, ``.<name>.tmp-<host>-<pid>``; when it returns, the data is flushed and (with
``fsync``) forced to disk, ``verify(tmp_path)`` runs if given, and the file is renamed over
``path``, and the directory is synced so the rename itself survives a crash. Readers see the
old file or the new one, never a part. On any error the temporary file is removed and the
error propagates.

Run directories sit in group-writable project spaces, so a name in them may be a symbolic
link someone planted. No write here follows one: the temporary is created exclusively with
``O_NOFOLLOW`` (a link or file already at its name is removed first: unlinking a link leaves
its target alone), and the rename replaces a link at ``path`` instead of writing through it.
The new file keeps the permission bits of the file it replaces (a user's ``chmod 600`` of
``status.json`` survives its rewrites), or of ``mode_like`` when there is none (a new
checkpoint takes the previous one's).

A writer killed with SIGKILL (or a node that loses power) leaves its temporary behind. The
host and pid in the name say whose it was, so ``clean_stale_temps`` can remove those of
writers that are no longer alive on this host and leave alone those of another host, which
it cannot check, on a shared file system. Names of the previous checkpoint writer
(``.<name>.tmp<pid>``, no host) are taken to be this host's.
"""

from __future__ import annotations

import os
import re
import socket
import stat
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

# `.NAME.tmp-HOST-PID` (this module) or `.NAME.tmpPID` (checkpoint.py before it used this
# module). Host names may hold dashes and dots; the pid is the last dash-separated field.
_TEMP = re.compile(r"^\..+\.tmp(?:-(?P<host>.+)-|)(?P<pid>\d+)$")


def host() -> str:
    """This machine's host name, as it appears in temporary names and lock files (the full
    name: short names can repeat across the clusters that share a file system)."""
    return socket.gethostname() or "localhost"


def temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{host()}-{os.getpid()}")


def create_new(path: Path, mode: int = 0o666) -> int:
    """A write-only descriptor of a file created at ``path`` now: FileExistsError if anything,
    a symbolic link included, is there already."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)


def _mode_of(*paths: Path | None) -> int | None:
    for p in paths:
        if p is None:
            continue
        try:
            st = os.stat(p, follow_symlinks=False)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):
            return stat.S_IMODE(st.st_mode)
    return None


def atomic_write(
    path: Path,
    write_fn: Callable[..., T],
    fsync: bool = True,
    verify: Callable[[Path], None] | None = None,
    mode_like: Path | None = None,
) -> T:
    path = Path(path)
    tmp = temp_path(path)
    tmp.unlink(missing_ok=True)  # ours by name (host and pid): a leftover, or a planted link
    try:
        fd = create_new(tmp)
        mode = _mode_of(path, mode_like)
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            result = write_fn(f)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        if verify is not None:
            verify(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if fsync:
        _fsync_dir(path.parent)
    return result


def _fsync_dir(directory: Path) -> None:
    # Without this the rename may still be in the page cache when the node dies, and the
    # old file comes back. Some file systems refuse to open or sync directories; the data
    # itself is already on disk then, so that is not worth failing a write over.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def parse_temp_name(name: str) -> tuple[str | None, int] | None:
    """(host, pid) of a temporary name, host None for the old host-less form; None if
    ``name`` is not a temporary name."""
    m = _TEMP.match(name)
    return (m["host"], int(m["pid"])) if m else None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def clean_stale_temps(directory: Path) -> list[Path]:
    """Remove the temporary files in ``directory`` (not below it) whose writer is dead on
    this host; returns what was removed. Temporaries of live processes, and of other hosts,
    are kept."""
    removed: list[Path] = []
    me = host()
    try:
        entries = list(Path(directory).iterdir())
    except FileNotFoundError:
        return removed
    for entry in entries:
        parsed = parse_temp_name(entry.name)
        if parsed is None or not entry.is_file():
            continue
        writer_host, pid = parsed
        if writer_host not in (None, me) or pid_alive(pid):
            continue
        try:
            entry.unlink()
            removed.append(entry)
        except FileNotFoundError:  # removed meanwhile by someone else
            pass
    return removed
