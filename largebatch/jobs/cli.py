"""python -m largebatch.jobs render|submit [options] -- <training arguments>

render writes a ready job script into the run directory; submit renders it and submits it
(sbatch or qsub), --chain K times in a row. A request that cannot run is refused with one
line and exit status 2; a submission the scheduler refuses exits 1 with its message.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..argparsing import Parser, UsageError
from .render import write
from .request import build_request
from .submit import SubmitError, submit

PROG = "python -m largebatch.jobs"


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog=PROG, description="Render and submit SLURM/PBS job scripts for the training job.",
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    commands = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    for name, text in (("render", "write the job script into the run directory"),
                       ("submit", "render, then submit with sbatch/qsub")):
        c = commands.add_parser(name, help=text, description=text,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        c.add_argument("--scheduler", choices=["slurm", "pbs"], required=True)
        c.add_argument("--nodes", type=int, default=1)
        c.add_argument("--gpus-per-node", type=int, required=True,
                       help="one MPI rank per GPU; 0 for a CPU-only job (with --ranks-per-node)")
        c.add_argument("--ranks-per-node", type=int, default=None,
                       help="only for --gpus-per-node 0; otherwise equal to the GPUs")
        c.add_argument("--cpus-per-rank", type=int, default=None,
                       help="CPU cores per rank, for its data loading workers (default: the site's)")
        c.add_argument("--time", required=True, help="time limit, HH:MM:SS")
        c.add_argument("--warning", type=int, default=300, metavar="SECONDS",
                       help="ask the job to checkpoint and stop this long before the time limit")
        c.add_argument("--account", help="account/project to charge")
        c.add_argument("--partition", "--queue", dest="queue", help="SLURM partition or PBS queue")
        c.add_argument("--job-name", help="default: lb-<run directory name>")
        c.add_argument("--launcher", choices=["mpirun", "srun"], default=None,
                       help="SLURM: srun --mpi=pmix or mpirun (default: mpirun on one node, srun on more)")
        c.add_argument("--chain", type=int, default=1, metavar="K",
                       help="K jobs, each starting after the one before ends (afterany); "
                            "with 1, a SLURM job requeues itself instead")
        c.add_argument("--module", action="append", default=[], metavar="NAME",
                       help="`module load NAME` in the job, before the environment (repeatable)")
        c.add_argument("--venv", default=sys.prefix, help="the Python environment the job activates")
        c.add_argument("--entry", choices=["folder", "dali"], default="folder",
                       help="pytorch_imagenet_resnet.py (folder) or pytorch_imagenet_resnet_dali.py")
        c.add_argument("--template", help="an adapted template (default: largebatch/jobs/templates/<scheduler>/...)")
        c.add_argument("--script", help="where to write the script (default: <run dir>/job.sbatch|job.pbs)")
        if name == "submit":
            c.add_argument("--dry-run", action="store_true",
                           help="render, and print the submission commands instead of running them")
    return p


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """Our options before '--', the training job's after it."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, train_args = split_argv(argv)
    try:
        ns = build_parser().parse_args(ours)
        req = build_request(ns, train_args, Path.cwd())
        script = write(req)
        then = {"requeue": "the job requeues itself", "chain": f"the next of {req.chain} chained jobs continues",
                "none": "submit it again to continue"}[req.continuation]
        print(f"wrote {script}: {req.scheduler}, {req.nodes} node(s) x {req.ranks_per_node} rank(s), "
              f"{req.time}; {req.warning_seconds} s before the end the run checkpoints and stops, then {then}")
        if ns.command == "submit":
            submit(req.scheduler, script, req.chain, ns.dry_run)
        return 0
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except SubmitError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
