"""Stop requests from the outside: SIGUSR1 (a scheduler's warning before the time limit),
SIGTERM (preemption, scancel), SIGINT (Ctrl-C, or torchrun passing one on; a second SIGINT
interrupts at once), and the launcher's exit (``watch_parent``). The handler only records the
request; the loop asks all ranks at its next report and, if any rank was asked, they all
checkpoint and leave together, so no rank is left waiting in a collective.

The handlers go in before anything slow is imported (see cli.py): a scheduler's warning that
arrives while torch is still loading must not kill the process (USR1's default action)."""

from __future__ import annotations

import os
import signal
import threading
import time

# Set in a rank's environment by the launchers that start ranks as their children.
LAUNCHER_VARS = ("TORCHELASTIC_RUN_ID", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID")


class StopRequest:
    def __init__(self) -> None:
        self.reason: str | None = None
        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.reason is not None:
            raise KeyboardInterrupt  # asked twice: the user does not want to wait for the checkpoint
        self.reason = signal.Signals(signum).name

    def watch_parent(self, interval: float = 1.0) -> None:
        """Under a launcher, ask for a stop when it is gone: a rank whose launcher died (a
        bare torchrun killed by SIGUSR1, say) would otherwise train on, unsupervised, to the
        end. The parent is checked every ``interval`` seconds by a daemon thread."""
        if not any(var in os.environ for var in LAUNCHER_VARS):
            return
        parent = os.getppid()

        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(interval)
            self.reason = self.reason or f"the exit of its launcher (pid {parent})"

        threading.Thread(target=watch, name="largebatch-parent-watch", daemon=True).start()

    def agreed(self, dist) -> bool:
        """True on every rank when any rank has been asked to stop (a collective)."""
        import torch  # here, not at the top: the handlers are installed before torch loads

        local = torch.tensor([0.0 if self.reason is None else 1.0])
        if dist.allreduce_max(local, name="stop_request").item() > 0:
            self.reason = self.reason or "a signal to another rank"
            return True
        return False
