"""What a job asks of the scheduler, checked before anything is written or submitted.

A request that cannot run (zero nodes, a malformed time, a warning longer than the job)
raises UsageError with one line that says what to change.
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from ..argparsing import UsageError
from ..config import parse_config
from ..config_file import load, split_config

# The templates are package data; the entry scripts the jobs run are the checkout's, which
# tools/setup.sh installs editable.
TEMPLATES = Path(__file__).resolve().parent / "templates"
ROOT = Path(__file__).resolve().parents[2]
ENTRIES = {"folder": ROOT / "pytorch_imagenet_resnet.py", "dali": ROOT / "pytorch_imagenet_resnet_dali.py"}
SLURM_MAX_SIGNAL_SECONDS = 65535  # --signal=...@N takes at most 0xffff seconds


@dataclass(frozen=True)
class JobRequest:
    scheduler: str  # slurm | pbs
    nodes: int
    gpus_per_node: int  # 0: a CPU-only job (tests, debugging)
    ranks_per_node: int  # one per GPU
    cpus_per_rank: int | None  # None: the site's default
    time: str  # HH:MM:SS
    time_seconds: int
    warning_seconds: int  # the stop request comes this long before the time limit
    account: str | None
    queue: str | None  # SLURM partition or PBS queue
    job_name: str
    launcher: str  # mpirun | srun (SLURM only)
    template: Path
    modules: tuple[str, ...]
    venv: Path
    entry: str  # folder | dali
    train_args: tuple[str, ...]
    run_dir: Path  # --log-dir, absolute
    workdir: Path  # where relative paths in train_args point from
    chain: int  # jobs submitted one after another (afterany)
    script: Path  # where the rendered script goes

    @property
    def ranks(self) -> int:
        return self.nodes * self.ranks_per_node

    @property
    def continuation(self) -> str:
        """What carries the run on after a stop: the next job of a chain, or (SLURM) the job
        requeueing itself; with one PBS job, a resubmission by hand."""
        if self.chain > 1:
            return "chain"
        return "requeue" if self.scheduler == "slurm" else "none"


def parse_time(text: str) -> int:
    """HH:MM:SS (hours may exceed 24) -> seconds; refuses anything else and zero."""
    match = re.fullmatch(r"(\d+):(\d\d):(\d\d)", text)
    if not match:
        raise UsageError(f"--time {text!r} is not HH:MM:SS (for example 24:00:00)")
    hours, minutes, seconds = map(int, match.groups())
    if minutes > 59 or seconds > 59:
        raise UsageError(f"--time {text!r}: minutes and seconds must be below 60")
    total = hours * 3600 + minutes * 60 + seconds
    if total == 0:
        raise UsageError("--time 00:00:00: a job needs some time to run")
    return total


def _word(flag: str, value: str | None) -> str | None:
    """Scheduler directive values go into the script unquoted: no spaces, quotes or '#'."""
    if value is not None and (not value or re.search(r"[\s'\"#\\]", value)):
        raise UsageError(f"{flag} {value!r}: must be one word without quotes or '#'")
    return value


def build_request(ns, train_args: list[str], cwd: Path) -> JobRequest:
    """Check the scheduler side first (cheap, clear), then the training arguments."""
    if ns.nodes < 1:
        raise UsageError(f"--nodes must be at least 1, got {ns.nodes}")
    if ns.gpus_per_node < 0:
        raise UsageError(f"--gpus-per-node must be 0 or more, got {ns.gpus_per_node}")
    if ns.gpus_per_node == 0:
        if ns.ranks_per_node is None:
            raise UsageError("--gpus-per-node 0 is a CPU-only job: say how many ranks with --ranks-per-node")
        ranks_per_node = ns.ranks_per_node
    else:
        if ns.ranks_per_node not in (None, ns.gpus_per_node):
            raise UsageError(
                f"one rank per GPU: --ranks-per-node {ns.ranks_per_node} differs from "
                f"--gpus-per-node {ns.gpus_per_node} (leave it out)"
            )
        ranks_per_node = ns.gpus_per_node
    if ranks_per_node < 1:
        raise UsageError(f"--ranks-per-node must be at least 1, got {ranks_per_node}")
    if ns.cpus_per_rank is not None and ns.cpus_per_rank < 1:
        raise UsageError(f"--cpus-per-rank must be at least 1, got {ns.cpus_per_rank}")
    time_seconds = parse_time(ns.time)
    if ns.warning < 1:
        raise UsageError(f"--warning must be at least 1 second, got {ns.warning}")
    if ns.warning >= time_seconds:
        raise UsageError(
            f"--warning {ns.warning} s leaves no time to train in --time {ns.time} "
            f"({time_seconds} s); lower --warning or raise --time"
        )
    if ns.scheduler == "slurm" and ns.warning > SLURM_MAX_SIGNAL_SECONDS:
        raise UsageError(f"--warning {ns.warning}: SLURM's --signal takes at most {SLURM_MAX_SIGNAL_SECONDS} s")
    if ns.chain < 1:
        raise UsageError(f"--chain must be at least 1, got {ns.chain}")
    launcher = ns.launcher or ("mpirun" if ns.nodes == 1 or ns.scheduler == "pbs" else "srun")
    if ns.scheduler == "pbs" and launcher != "mpirun":
        raise UsageError(f"--launcher {launcher} is SLURM's; PBS jobs start their ranks with mpirun")
    for module in ns.module:
        _word("--module", module)
    _word("--account", ns.account)
    _word("--partition/--queue", ns.queue)

    template = _template(ns, launcher)
    train_args = _with_engine(_absolute_config(list(train_args), cwd), ns.engine)
    run_dir = _check_training(train_args, ns.entry, cwd)
    job_name = ns.job_name or f"lb-{run_dir.name}"
    _word("--job-name", job_name)
    suffix = "sbatch" if ns.scheduler == "slurm" else "pbs"
    script = Path(os.path.abspath(cwd / ns.script)) if ns.script else run_dir / f"job.{suffix}"
    venv = Path(os.path.abspath(cwd / ns.venv))
    if not (venv / "bin" / "activate").is_file():
        raise UsageError(f"--venv {ns.venv}: no bin/activate there (the environment the job activates)")
    return JobRequest(
        scheduler=ns.scheduler,
        nodes=ns.nodes,
        gpus_per_node=ns.gpus_per_node,
        ranks_per_node=ranks_per_node,
        cpus_per_rank=ns.cpus_per_rank,
        time=ns.time,
        time_seconds=time_seconds,
        warning_seconds=ns.warning,
        account=ns.account,
        queue=ns.queue,
        job_name=job_name,
        launcher=launcher,
        template=template,
        modules=tuple(ns.module),
        venv=venv,
        entry=ns.entry,
        train_args=tuple(train_args),
        run_dir=run_dir,
        workdir=cwd,
        chain=ns.chain,
        script=script,
    )


def _absolute_config(train_args: list[str], cwd: Path) -> list[str]:
    """--config FILE as an absolute path: the job script runs from elsewhere, hours later."""
    config_path, rest = split_config(train_args)
    if config_path is None:
        return train_args
    return ["--config", os.path.abspath(cwd / config_path), *rest]


def _with_engine(train_args: list[str], engine: str) -> list[str]:
    """The training arguments with the job's --engine, said once."""
    given = [
        a.split("=", 1)[1] if "=" in a else (train_args[i + 1] if i + 1 < len(train_args) else "")
        for i, a in enumerate(train_args)
        if a.split("=", 1)[0] == "--engine"
    ]
    if engine == "auto" or given == [engine]:
        return train_args
    if given:
        raise UsageError(f"--engine {engine}, but the training arguments say --engine {given[-1]}")
    return [*train_args, "--engine", engine]


def _template(ns, launcher: str) -> Path:
    if ns.template:
        path = Path(ns.template)
        if not path.is_file():
            raise UsageError(f"--template {ns.template}: no such file")
        return path
    kind = "single-node" if ns.nodes == 1 and launcher == "mpirun" else "multi-node"
    return TEMPLATES / ns.scheduler / f"{kind}.{'sbatch' if ns.scheduler == 'slurm' else 'pbs'}"


def _check_training(train_args: list[str], entry: str, cwd: Path) -> Path:
    """The training job's own parser checks its arguments now, not hours later in the queue.
    Returns the run directory, absolute."""
    if not train_args:
        raise UsageError("no training arguments: put them after '--', e.g. -- --train-dir T --val-dir V --log-dir RUN")
    flags = {a.split("=", 1)[0] for a in train_args if a.startswith("--")}
    config_path, _ = split_config(list(train_args))
    from_file = load(config_path) if config_path is not None else {}
    if {str(k).lstrip("-").replace("_", "-") for k in from_file} & {"log-dir"}:
        flags.add("--log-dir")
    if "--log-dir" not in flags:
        raise UsageError(
            "the training arguments need --log-dir RUN_DIR: the job keeps its checkpoints, "
            "TensorBoard events and status there, and continues from them"
        )
    try:
        cfg = parse_config(list(train_args), entry)
    except UsageError as e:
        raise UsageError(f"training arguments: {e}") from None
    if cfg.run.resume != "auto":
        raise UsageError(
            f"training arguments: --resume {cfg.run.resume}: job scripts always continue with "
            f"--resume auto (a fresh run needs a new --log-dir)"
        )
    run_dir = Path(os.path.abspath(cwd / cfg.run.log_dir))
    if re.search(r"[\s'\"#\\%]", str(run_dir)):
        raise UsageError(
            f"--log-dir {shlex.quote(str(run_dir))}: scheduler directives cannot take a path "
            f"with spaces, quotes, '#' or '%'; choose another run directory"
        )
    return run_dir
