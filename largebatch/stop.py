"""Stop requests from the outside: SIGUSR1 (a scheduler's warning before the time limit)
and SIGTERM (preemption, scancel). The handler only records the request; the loop asks
all ranks at its next report and, if any rank was signalled, they all checkpoint and
leave together, so no rank is left waiting in a collective.

The handlers go in before anything slow is imported (see cli.py): a scheduler's warning that
arrives while torch is still loading must not kill the process (USR1's default action)."""
from __future__ import annotations

import signal


class StopRequest:
    def __init__(self):
        self.reason: str | None = None
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.reason = signal.Signals(signum).name

    def agreed(self, dist) -> bool:
        """True on every rank when any rank has been asked to stop (a collective)."""
        import torch  # here, not at the top: the handlers are installed before torch loads

        local = torch.tensor([0.0 if self.reason is None else 1.0])
        if dist.allreduce_max(local, name="stop_request").item() > 0:
            self.reason = self.reason or "a signal to another rank"
            return True
        return False
