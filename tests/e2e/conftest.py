from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import STRAIGHT, job_args, results, run_job, run_mpi_script
from largebatch.data.digits import write_digits


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> Path:
    """A real ImageFolder: 400 of scikit-learn's digits as 16-pixel JPEGs (320 train, 80 val)."""
    root = tmp_path_factory.mktemp("digits")
    write_digits(root, size=16, val_fraction=0.2, seed=0, limit=400)
    return root


@pytest.fixture(scope="session")
def digits_odd(tmp_path_factory) -> Path:
    """Validation set of 77 images: not divisible by 2 ranks nor by the batch size."""
    root = tmp_path_factory.mktemp("digits_odd")
    write_digits(root, size=16, val_fraction=77 / 300, seed=1, limit=300)
    return root


@pytest.fixture(params=["horovod", "torch"])
def engine(request) -> str:
    """Tests of behaviour both engines must have take this and run once on each."""
    return request.param


SCRIPTS = Path(__file__).parent / "scripts"

# The helper scripts run under mpirun -np 2 on each engine, all in one job per engine
# (scripts/checks.py): NAME[:ARG], ARG given to the script's check. startup_broadcast's is
# the run directory it writes, added by engine_checks.
ENGINE_CHECKS = (
    "accumulation:lars",
    "accumulation:sgd",
    "compression",
    "loss_scaling",
    "parallel_step:1",
    "parallel_step:0",
    "startup_broadcast",
)


@pytest.fixture(scope="session")
def engine_checks(tmp_path_factory):
    """engine_checks(engine, name, arg=None): what the helper script ``name`` (tests/e2e/scripts)
    reported, run on ``engine`` under mpirun -np 2 with ``arg``. The ENGINE_CHECKS run in one
    job per engine, started at the first request; a test whose check failed or never ran
    (an earlier one failed) fails with the job's output."""
    jobs = {}

    def get(engine: str, name: str, arg: str | None = None) -> list[dict]:
        if engine not in jobs:
            run_dir = tmp_path_factory.mktemp(f"checks_{engine}") / "run"
            specs = [f"{spec}:{run_dir}" if spec == "startup_broadcast" else spec for spec in ENGINE_CHECKS]
            jobs[engine] = run_mpi_script(SCRIPTS / "checks.py", specs, engine=engine, check=False)
        proc = jobs[engine]
        reports = [r for r in results(proc.stdout) if r.get("script") == name and (arg is None or r.get("arg") == arg)]
        failed = [r["failed"] for r in reports if "failed" in r]
        assert reports and not failed, f"{name} {arg or ''} on {engine}: " + (
            "\n".join(failed)
            if failed
            else f"no report (exit {proc.returncode})\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
        return reports

    return get


@dataclass(frozen=True)
class Run:
    """A finished training run that several tests read (never change: copy it first)."""

    run_dir: Path
    flags: tuple  # after job_args(data, run_dir, ...): the same run's flags, to resume or extend it
    stdout: str


@pytest.fixture(scope="session")
def straight_runs(digits, tmp_path_factory):
    """straight_runs(engine): the uninterrupted 2-process run (STRAIGHT, LARS) on that engine,
    trained once per session. What interrupted, resumed, moved and damaged runs must end
    like; the engines' parity test compares the two; the report and the DALI job read one."""
    made: dict[str, Run] = {}

    def get(engine: str) -> Run:
        if engine not in made:
            run_dir = tmp_path_factory.mktemp(f"straight_{engine}") / "run"
            proc = run_job(job_args(digits, run_dir, *STRAIGHT, "--engine", engine))
            made[engine] = Run(run_dir, STRAIGHT, proc.stdout)
        return made[engine]

    return get


@pytest.fixture(scope="session")
def one_process_run(digits, tmp_path_factory) -> Run:
    """A finished plain-python (one process) run: SGD, two epochs. The report compares it
    with a LARS run; test_bad_input checks that other runs never overwrite its checkpoints."""
    run_dir = tmp_path_factory.mktemp("one_process") / "sgd"
    flags = ("--epochs", "2", "--base-op", "sgd", "--base-lr", "0.05")
    proc = run_job(job_args(digits, run_dir, *flags), np=1)
    return Run(run_dir, flags, proc.stdout)
