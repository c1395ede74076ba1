"""Run a launcher so that SIGTERM and Ctrl-C stop the training with a checkpoint.

    python -m largebatch.launch [--] LAUNCHER ARGS...
    python -m largebatch.launch mpirun -np 8 python pytorch_imagenet_resnet.py --log-dir runs/x ...

The ranks checkpoint and exit 0 on SIGUSR1 or SIGTERM (stop.py), but the launchers do not
all pass those on:

* ``mpirun`` (Open MPI 5's prterun) answers SIGTERM and SIGINT by killing the ranks within
  half a second, checkpoint or not (no MCA parameter changes that); it forwards SIGUSR1 to
  every rank on every node. ``srun`` forwards SIGUSR1 too.
* ``torchrun`` forwards SIGTERM to its workers, gives them 30 s, then kills them; it exits
  1 with a traceback of its own even when they stopped cleanly. It dies of SIGUSR1.
* ``horovodrun`` dies of SIGUSR1 and of SIGTERM and leaves the ranks running (with its MPI
  controller), or kills them on SIGTERM after a few seconds (Gloo).

So this wrapper starts the launcher in a session of its own (a terminal's Ctrl-C reaches
only the wrapper) and, on SIGTERM, SIGINT or SIGUSR1, asks for a stop in the launcher's own
terms: SIGUSR1 to mpirun, mpiexec, prterun and srun; SIGTERM to torchrun (and
``python -m torch.distributed.run|launch``); for any other launcher (horovodrun, a plain
python), SIGUSR1 to every process of its tree that catches SIGUSR1, which never kills one
(the ranks catch it, as does the mpirun under horovodrun; a stop asked of one rank stops
them all). Then it waits for the launcher and exits with its status, or 0 when the training
stopped cleanly after the signal: ``status.json`` of the ``--log-dir`` in the arguments
(default ``./logs``) was written after the signal and says "stopped" or "finished" (torchrun's
own exit status says nothing about that). When the launcher fails and rank 0 of the job
failed, it exits with rank 0's own status (2 bad input, 3 diverged), which torchrun turns
into 1: each rank writes its status into a directory of the wrapper's own, named by
``LARGEBATCH_EXIT_DIR``, removed when the wrapper ends.

This module imports nothing heavy, so it is in place at once.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROG = "python -m largebatch.launch"
FORWARD_AS_USR1 = {"mpirun", "mpiexec", "prterun", "orterun", "srun"}
TORCHRUN_MODULES = {"torch.distributed.run", "torch.distributed.launch"}
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
EXIT_DIR = "LARGEBATCH_EXIT_DIR"  # cli.report_exit writes rank-N there


def launcher_kind(cmd: list[str]) -> str:
    """ "usr1" (signal the launcher with SIGUSR1), "term" (with SIGTERM: torchrun) or "tree"
    (SIGUSR1 to every process of the launcher's tree that catches it)."""
    name = Path(cmd[0]).name
    if name in FORWARD_AS_USR1:
        return "usr1"
    if name == "torchrun" or (
        name.startswith("python") and len(cmd) > 2 and cmd[1] == "-m" and cmd[2] in TORCHRUN_MODULES
    ):
        return "term"
    return "tree"


def log_dir(cmd: list[str]) -> Path:
    """The training's --log-dir among the launcher's arguments (the last one given), or the
    job's default."""
    found = "./logs"
    for i, arg in enumerate(cmd):
        if arg == "--log-dir" and i + 1 < len(cmd):
            found = cmd[i + 1]
        elif arg.startswith("--log-dir="):
            found = arg.split("=", 1)[1]
    return Path(found)


def catches(pid: int, sig: int) -> bool:
    """Whether the process has a handler for sig (the SigCgt mask of /proc/PID/status)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    except OSError:
        pass
    return False


def tree(pid: int) -> list[int]:
    """pid and its descendants, parents first (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    order, todo = [], [pid]
    while todo:
        p = todo.pop(0)
        order.append(p)
        todo.extend(sorted(children.get(p, [])))
    return order


class Launcher:
    def __init__(self, cmd: list[str]):
        self.cmd, self.kind = cmd, launcher_kind(cmd)
        self.proc: subprocess.Popen | None = None
        self.stop_asked: float | None = None  # time.time() of the first stop request
        self.pending: list[int] = []  # signals that arrived before the launcher started
        self.delivered = False  # "tree": some process caught the request
        self.exits = Path(tempfile.mkdtemp(prefix="largebatch-exit-"))  # the ranks' own statuses

    def start(self) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)
        # A session of its own: a terminal's Ctrl-C (SIGINT to the foreground process group)
        # reaches only this wrapper, which turns it into a stop the launcher understands.
        self.proc = subprocess.Popen(
            self.cmd, start_new_session=True, stdin=subprocess.DEVNULL, env={**os.environ, EXIT_DIR: str(self.exits)}
        )
        for signum in self.pending:
            self._forward(signum)

    def _on_signal(self, signum, frame) -> None:
        if self.proc is None:
            self.pending.append(signum)
        else:
            self._forward(signum)

    def _forward(self, signum: int) -> None:
        assert self.proc is not None  # the signals that came before it are held in self.pending
        first = self.stop_asked is None
        if first:
            self.stop_asked = time.time()
        how = {"usr1": "SIGUSR1", "term": "SIGTERM", "tree": "SIGUSR1 to the processes that catch it"}[self.kind]
        if first:
            print(
                f"{PROG}: {signal.Signals(signum).name}: asking {Path(self.cmd[0]).name} (pid {self.proc.pid}) "
                f"to checkpoint and stop ({how})",
                file=sys.stderr,
                flush=True,
            )
        try:
            if self.kind == "usr1":
                self.proc.send_signal(signal.SIGUSR1)
            elif self.kind == "term":
                self.proc.send_signal(signal.SIGTERM)
            else:
                self._signal_catchers()
        except ProcessLookupError:
            pass  # it ended meanwhile

    def _signal_catchers(self) -> None:
        assert self.proc is not None
        for pid in tree(self.proc.pid):
            if catches(pid, signal.SIGUSR1):
                try:
                    os.kill(pid, signal.SIGUSR1)
                    self.delivered = True
                except ProcessLookupError:
                    pass

    def wait(self) -> int:
        assert self.proc is not None, "start() first"
        while True:
            try:
                code = self.proc.wait(timeout=1)
                break
            except subprocess.TimeoutExpired:
                # "tree": a request that came while no process caught SIGUSR1 yet (the ranks
                # still starting) is sent again until one does.
                if self.kind == "tree" and self.stop_asked is not None and not self.delivered:
                    self._signal_catchers()
        status = -code + 128 if code < 0 else code
        if status != 0 and self.stop_asked is not None and self._stopped_cleanly():
            return 0
        if status != 0:
            return self._rank_0_status() or status
        return status

    def _rank_0_status(self) -> int:
        try:
            return int((self.exits / "rank-0").read_text())
        except (OSError, ValueError):
            return 0

    def close(self) -> None:
        shutil.rmtree(self.exits, ignore_errors=True)

    def _stopped_cleanly(self) -> bool:
        path = log_dir(self.cmd) / "status.json"
        try:
            written = path.stat().st_mtime
            state = json.loads(path.read_text()).get("state")
        except (OSError, ValueError, AttributeError):
            return False
        # Written after the request: a status left by an earlier job of the run says nothing.
        assert self.stop_asked is not None  # asked only after a stop
        return written >= self.stop_asked - 1 and state in ("stopped", "finished")


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--"]:
        args = args[1:]
    if not args or args[0] in ("-h", "--help"):
        print(__doc__.split("\n\n")[0] + "\n\n    " + PROG + " [--] LAUNCHER ARGS...", file=sys.stderr)
        return 0 if args else 2
    launcher = Launcher(args)
    try:
        launcher.start()
        return launcher.wait()
    except OSError as e:
        print(f"{PROG}: error: cannot start {args[0]} ({e.strerror or e})", file=sys.stderr, flush=True)
        return 127 if isinstance(e, FileNotFoundError) else 126
    finally:
        launcher.close()


if __name__ == "__main__":
    sys.exit(main())
