"""One run per run directory: a lock held for the run's lifetime, gone when the process dies.

    lock = RunLock(run_dir)          # rank 0, after the directory exists
    lock.acquire()                   # RunDirInUse (a UsageError, exit 2) if another run holds it
    ...                              # or: with RunLock(run_dir): ...
    lock.release()                   # also done by the kernel when the process exits

The lock is a POSIX record lock (``fcntl.lockf``) on ``<run_dir>/.lock``. The kernel drops
it when the holder exits for any reason, SIGKILL included, so there is nothing stale to
clean up. POSIX locks, unlike ``flock``, are what NFS (v3 through lockd, v4 natively),
Lustre (mounted with ``-o flock``) and GPFS honour across hosts; on NFS a dead client's
lock is released when its lease expires (about 90 s). Mounts that lock per host only
(Lustre ``localflock``, NFS ``local_lock=all``) cannot be told apart from here. Where the
file system cannot lock at all (ENOLCK, EOPNOTSUPP, ENOSYS: Lustre without ``flock``),
``acquire`` prints one warning and goes on unlocked: refusing to train would be worse than
the risk it warns about.

The file holds JSON ``{"host", "pid", "started"}`` of the holder, so a second run can say
who holds the directory::

    --log-dir runs/x is in use by a run on host n01, pid 4242, started 2024-05-01T10:00:00+00:00

The file is never deleted: removing it while a second process has it open would let two
processes lock two different files of the same name.

POSIX locks belong to the process, not the file descriptor, and closing *any* descriptor of
the file drops them. So the holder must not open the lock file again, and a second
``RunLock`` on the same directory in the same process (which the kernel would grant) is
refused here by a per-process registry.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from .argparsing import UsageError
from .files import host

LOCK_NAME = ".lock"
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS}
_HELD: dict[str, RunLock] = {}  # realpath of the run directory -> its lock, in this process


class RunDirInUse(UsageError):
    """Another run holds the run directory; one line naming it."""


class RunLock:
    def __init__(self, run_dir: Path, warn: Callable[[str], None] | None = None):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.warn = warn or (lambda line: print(line, file=sys.stderr, flush=True))
        self.held = False
        self.info: dict | None = None  # what the lock file says while this process holds it
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        key = os.path.realpath(self.run_dir)
        if key in _HELD:
            raise RunDirInUse(self._in_use(_HELD[key].info))
        try:
            # Never through a link: a planted `.lock -> somewhere` would have the run truncate
            # and rewrite its target.
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise UsageError(
                    f"--log-dir {self.run_dir}: its lock file {self.path} is a symbolic link; "
                    f"remove the link (the run never writes through one)"
                ) from None
            raise UsageError(
                f"--log-dir {self.run_dir}: cannot create its lock file {self.path} ({e.strerror or e})"
            ) from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise RunDirInUse(self._in_use(read_holder(self.path))) from None
            if e.errno in _UNSUPPORTED:
                self.warn(
                    f"warning: cannot lock --log-dir {self.run_dir} ({e.strerror}): its file system does "
                    f"not support locks, so nothing stops a second run from using it at the same time"
                )
                return self
            raise UsageError(f"--log-dir {self.run_dir}: cannot lock {self.path} ({e.strerror or e})") from None
        self.info = {
            "host": host(),
            "pid": os.getpid(),
            "started": datetime.now().astimezone().isoformat(timespec="seconds"),
        }
        # Written through the locked descriptor: reopening the file would drop the lock.
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(self.info) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd, self.held = fd, True
        _HELD[key] = self
        return self

    def release(self) -> None:
        if not self.held:
            return
        assert self._fd is not None  # held: locked through it
        _HELD.pop(os.path.realpath(self.run_dir), None)
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd, self.held = None, False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def _in_use(self, info: dict | None) -> str:
        if not info:
            return f"--log-dir {self.run_dir} is in use by another run (its lock file {self.path} names no holder)"
        return (
            f"--log-dir {self.run_dir} is in use by a run on host {info.get('host', '?')}, "
            f"pid {info.get('pid', '?')}, started {info.get('started', '?')}"
        )


def read_holder(path: Path) -> dict | None:
    """The holder's JSON from a lock file, or None. Only for processes that do not hold it."""
    try:
        info = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None  # unreadable, or caught between the holder's truncate and write
    return info if isinstance(info, dict) else None
