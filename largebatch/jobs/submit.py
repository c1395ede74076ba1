"""Submit a rendered script with sbatch or qsub: one job, or a chain of K jobs where each
waits for the one before it to end, however it ended (afterany)."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

from ..argparsing import UsageError


class SubmitError(RuntimeError):
    """The scheduler refused a submission (its message is in the text)."""


def command(scheduler: str, script: Path, after: str | None) -> list[str]:
    if scheduler == "slurm":
        dependency = [f"--dependency=afterany:{after}"] if after else []
        return ["sbatch", "--parsable", *dependency, str(script)]
    dependency = ["-W", f"depend=afterany:{after}"] if after else []
    return ["qsub", *dependency, str(script)]


def job_id(scheduler: str, stdout: str) -> str:
    """sbatch --parsable prints 'ID' or 'ID;CLUSTER'; qsub prints 'ID.SERVER'."""
    text = stdout.strip().splitlines()[-1] if stdout.strip() else ""
    found = re.fullmatch(r"(\d+)(;\S+)?", text) if scheduler == "slurm" else re.fullmatch(r"\d+(\[\])?\.?\S*", text)
    if not found:
        raise SubmitError(
            f"could not read a job id from {'sbatch' if scheduler == 'slurm' else 'qsub'}'s answer {stdout.strip()!r}"
        )
    return found[1] if scheduler == "slurm" else text


def submit(scheduler: str, script: Path, chain: int, dry_run: bool, say=print) -> list[str]:
    """Submit ``chain`` jobs of ``script``, each depending on the one before; returns their ids.
    With dry_run, says the commands instead of running them."""
    ids: list[str] = []
    if dry_run and chain > 1:
        say("dry run: JOBk stands for the id the scheduler would give job k")
    for link in range(chain):
        cmd = command(scheduler, script, ids[-1] if ids else None)
        if dry_run:
            say(f"would run: {shlex.join(cmd)}")
            ids.append(f"JOB{link + 1}")
            continue
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except FileNotFoundError:
            raise UsageError(
                f"{cmd[0]} is not on PATH: submit from a login node of the cluster, or "
                f"`render` the script and submit it there"
            ) from None
        except subprocess.TimeoutExpired:
            raise SubmitError(
                f"{shlex.join(cmd)} did not answer in 120 s; check the queue before submitting again"
            ) from None
        if proc.returncode != 0:
            done = f" (already submitted: {' '.join(ids)})" if ids else ""
            answer = " / ".join((proc.stderr.strip() or proc.stdout.strip()).splitlines())
            raise SubmitError(f"{shlex.join(cmd)} failed{done}: {answer}")
        ids.append(job_id(scheduler, proc.stdout))
        after = f" after {ids[-2]} ends" if len(ids) > 1 else ""
        say(f"submitted job {ids[-1]}{after}")
    return ids
