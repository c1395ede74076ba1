"""python -m largebatch.jobs render|submit [options] -- <training arguments>
python -m largebatch.jobs start|continue RUN_DIR [options]   (run by the job scripts)

render writes a ready job script into the run directory; submit renders it and submits it
(sbatch or qsub), --chain K times in a row. A request that cannot run is refused with one
line and exit status 2; a submission the scheduler refuses exits 1 with its message.
start and continue are the job scripts' decisions before and after the training, from the
run's status.json; their outputs and exit statuses are in status.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..argparsing import Parser, UsageError
from .render import write
from .request import build_request
from .status import FINISHED, HOW, carry_on, start
from .submit import SubmitError, submit

PROG = "python -m largebatch.jobs"


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog=PROG,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Render and submit SLURM/PBS job scripts for the training job; start and "
        "continue are what those scripts run before and after the training.",
    )
    commands = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    for name, text in (
        ("render", "write the job script into the run directory"),
        ("submit", "render, then submit with sbatch/qsub"),
    ):
        c = commands.add_parser(
            name, help=text, description=text, formatter_class=argparse.ArgumentDefaultsHelpFormatter
        )
        c.add_argument("--scheduler", choices=["slurm", "pbs"], required=True)
        c.add_argument("--nodes", type=int, default=1)
        c.add_argument(
            "--gpus-per-node",
            type=int,
            required=True,
            help="one MPI rank per GPU; 0 for a CPU-only job (with --ranks-per-node)",
        )
        c.add_argument(
            "--ranks-per-node", type=int, default=None, help="only for --gpus-per-node 0; otherwise equal to the GPUs"
        )
        c.add_argument(
            "--cpus-per-rank",
            type=int,
            default=None,
            help="CPU cores per rank, for its data loading workers (default: the site's)",
        )
        c.add_argument("--time", required=True, help="time limit, HH:MM:SS")
        c.add_argument(
            "--warning",
            type=int,
            default=300,
            metavar="SECONDS",
            help="ask the job to checkpoint and stop this long before the time limit",
        )
        c.add_argument("--account", help="account/project to charge")
        c.add_argument("--partition", "--queue", dest="queue", help="SLURM partition or PBS queue")
        c.add_argument("--job-name", help="default: lb-<run directory name>")
        c.add_argument(
            "--launcher",
            choices=["mpirun", "srun"],
            default=None,
            help="SLURM: srun --mpi=pmix or mpirun (default: mpirun on one node, srun on more)",
        )
        c.add_argument(
            "--chain",
            type=int,
            default=1,
            metavar="K",
            help="K jobs, each starting after the one before ends (afterany); "
            "with 1, a SLURM job requeues itself instead",
        )
        c.add_argument(
            "--module",
            action="append",
            default=[],
            metavar="NAME",
            help="`module load NAME` in the job, before the environment (repeatable)",
        )
        c.add_argument("--venv", default=sys.prefix, help="the Python environment the job activates")
        c.add_argument(
            "--engine",
            choices=["auto", "horovod", "torch"],
            default="auto",
            help="the training's --engine (torch: torch.distributed, started by the same "
            "srun/mpirun, no Horovod needed)",
        )
        c.add_argument(
            "--entry",
            choices=["folder", "dali"],
            default="folder",
            help="pytorch_imagenet_resnet.py (folder) or pytorch_imagenet_resnet_dali.py",
        )
        c.add_argument("--template", help="an adapted template (default: largebatch/jobs/templates/<scheduler>/...)")
        c.add_argument("--script", help="where to write the script (default: <run dir>/job.sbatch|job.pbs)")
        if name == "submit":
            c.add_argument(
                "--dry-run",
                action="store_true",
                help="render, and print the submission commands instead of running them",
            )
    c = commands.add_parser(
        "start",
        help="(in a job script) before training: print the run's step; exit 3 if it has finished",
        description=f"Print the step RUN_DIR's status.json is at (0 before the first checkpoint) and exit 0; "
        f"when the run has finished, say so and exit {FINISHED}.",
    )
    c.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    c = commands.add_parser(
        "continue",
        help="(in a job script) after training: requeue, leave it to the chain, or stop",
        description="Carry the run on only if the training stopped in order after progress in this job: "
        "exit 0 when it finished or is carried on (or a SIGTERM stop is left stopped), 1 when it "
        "failed, made no progress, or SLURM refused to requeue.",
    )
    c.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    c.add_argument(
        "--since", type=int, required=True, metavar="STEP", help="the step `start` printed before the training"
    )
    c.add_argument(
        "--how",
        choices=HOW,
        required=True,
        help="requeue: this SLURM job again (scontrol requeue); chain: the next job of a chain; "
        "none: the user resubmits",
    )
    c.add_argument(
        "--warned",
        type=int,
        choices=[0, 1],
        default=1,
        help="1 if the scheduler's warning signal (USR1) reached the job; with --how requeue, "
        "a stop by SIGTERM alone (0: cancelled, preempted) is not requeued (default: 1)",
    )
    c.add_argument("--job-id", help="the job to requeue (with --how requeue)")
    return p


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """Our options before '--', the training job's after it."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1 :]
    return argv, []


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, train_args = split_argv(argv)
    try:
        ns = build_parser().parse_args(ours)
        if ns.command == "start":
            return start(ns.run_dir.absolute())
        if ns.command == "continue":
            if ns.how == "requeue" and not ns.job_id:
                raise UsageError("--how requeue needs --job-id (the job to requeue)")
            return carry_on(ns.run_dir.absolute(), ns.since, ns.how, bool(ns.warned), ns.job_id)
        req = build_request(ns, train_args, Path.cwd())
        script = write(req)
        then = {
            "requeue": "the job requeues itself",
            "chain": f"the next of {req.chain} chained jobs continues",
            "none": "submit it again to continue",
        }[req.continuation]
        print(
            f"wrote {script}: {req.scheduler}, {req.nodes} node(s) x {req.ranks_per_node} rank(s), "
            f"{req.time}; {req.warning_seconds} s before the end the run checkpoints and stops, then {then}"
        )
        if ns.command == "submit":
            submit(req.scheduler, script, req.chain, ns.dry_run)
        return 0
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except SubmitError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
