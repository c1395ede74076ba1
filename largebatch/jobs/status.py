"""What a job script does before and after the training, decided from the run's status.json:

    python -m largebatch.jobs start RUN_DIR
    python -m largebatch.jobs continue RUN_DIR --since STEP --how requeue|chain|none
                                       [--warned 0|1] [--job-id ID]

The training job writes RUN_DIR/status.json: {"state": "running" | "stopped" | "finished",
"step": N, ...}; no file (or an unreadable one) counts as state "none" at step 0.

start: before the training. Prints the step the run is at on stdout (the script keeps it
to compare after), exit 0; or, when the run has finished, says so on stderr and exits 3,
and the script ends without starting the ranks.

continue: after the training. Says how the training left the run. The run is carried on
only when the training stopped in order *and* moved the run forward in this job (its step
grew past --since), so a run that fails is never resubmitted over and over:
- finished: exit 0.
- no orderly stop after progress: exit 1 (a failure, a crash, a hang until the limit).
- --how requeue (one SLURM job): `scontrol requeue --job-id`, exit 0; exit 1 when SLURM
  refuses. Only after the scheduler's warning (--warned 1): a stop by SIGTERM alone
  (scancel, preemption) is not requeued, exit 0, since cancelling means stop.
- --how chain: the next job of the chain continues, exit 0.
- --how none: says to submit the script again, exit 0.
Everything it says goes to stderr, prefixed "largebatch: ", into the job's log.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

FINISHED = 3  # exit status of `start` for a run with nothing left to do
HOW = ("requeue", "chain", "none")


def say(text: str) -> None:
    print(f"largebatch: {text}", file=sys.stderr, flush=True)


def run_state(run_dir: Path) -> tuple[str, int]:
    """(state, step) from status.json; ("none", 0) before the first checkpoint."""
    try:
        status = json.loads((run_dir / "status.json").read_text())
        return str(status["state"]), int(status["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return "none", 0


def start(run_dir: Path) -> int:
    state, step = run_state(run_dir)
    if state == "finished":
        say(f"{run_dir} has finished training; nothing to do")
        return FINISHED
    print(step, flush=True)
    return 0


def carry_on(run_dir: Path, since: int, how: str, warned: bool, job_id: str | None) -> int:
    state, step = run_state(run_dir)
    say(f"training left {run_dir} {state} at step {step}")
    if state == "finished":
        return 0
    if state != "stopped" or step <= since:
        say("no orderly stop after progress in this job: not continuing (see above)")
        return 1
    if how == "chain":
        say(f"the next job of the chain continues from step {step}")
        return 0
    if how == "none":
        say(f"submit this script again to continue from step {step}")
        return 0
    if not warned:
        say("stopped by SIGTERM (cancelled or preempted): not requeueing")
        return 0
    say(f"requeueing job {job_id} to continue from step {step}")
    try:
        refused = subprocess.run(["scontrol", "requeue", str(job_id)], timeout=120).returncode != 0
    except (OSError, subprocess.TimeoutExpired) as e:
        say(f"could not run scontrol: {e}")
        refused = True
    if refused:
        say("SLURM refused to requeue: submit this script again")
        return 1
    return 0
