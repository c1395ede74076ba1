"""`python -m largebatch.report` on real runs: a 2-process LARS job and a 1-process SGD job
on the digits (the session's shared runs, conftest.py), plotted together, with a summary
that matches their event files."""

from __future__ import annotations

import shutil
import statistics
import subprocess
from pathlib import Path

import pytest

from helpers import PYTHON, ROOT, env
from largebatch import report as report_module
from largebatch.events import read_scalars

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def report(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, "-m", "largebatch.report", *map(str, args)],
        capture_output=True,
        text=True,
        env=env(),
        cwd=ROOT,
        timeout=300,
    )


@pytest.fixture(scope="module")
def runs(straight_runs, one_process_run, tmp_path_factory) -> tuple[Path, Path]:
    """The shared 2-process LARS run (Horovod, 2 epochs) copied to a directory named lars
    (the report writes into a single run's directory), and the shared 1-process SGD run."""
    lars_run = tmp_path_factory.mktemp("report_runs") / "lars"
    shutil.copytree(straight_runs("horovod").run_dir, lars_run)
    assert one_process_run.run_dir.name == "sgd"
    return lars_run, one_process_run.run_dir


def summary_row(text: str, name: str) -> list[str]:
    rows = [line for line in text.splitlines() if line.startswith(f"| {name} ")]
    assert len(rows) == 1, f"no single summary row for {name} in\n{text}"
    return [cell.strip() for cell in rows[0].strip("|").split("|")]


@pytest.mark.mpi  # the runs fixture trains with mpirun -np 2
def test_one_run_plots_and_summary(runs):
    lars_run, _ = runs
    proc = report(lars_run)
    assert proc.returncode == 0, proc.stderr
    out = lars_run / "report"  # the default for a single run
    for name in ("loss", "accuracy", "lr", "throughput", "trust_ratio"):
        assert (out / f"{name}.png").read_bytes()[:8] == PNG_MAGIC, f"{name}.png missing or not a PNG"
    assert not (out / "loss_scale.png").exists(), "an fp32 run has no loss scale to plot"

    scalars = read_scalars(lars_run)
    val = [v for _, v in scalars["val/top1"]]
    cells = summary_row((out / "summary.md").read_text(), "lars")
    state, epochs, steps, best, final, final_top5 = cells[1:7]
    assert (state, int(epochs)) == ("finished", 2)
    assert int(steps) == scalars["val/top1"][-1][0]
    assert best == f"{max(val):.2f} ({val.index(max(val)) + 1})"
    assert final == f"{val[-1]:.2f}" and final_top5 == f"{scalars['val/top5'][-1][1]:.2f}"
    assert float(cells[9]) == pytest.approx(statistics.median(v for _, v in scalars["train/images_per_sec"]), abs=0.06)
    assert proc.stdout.startswith("# Training runs")  # the summary is printed too


@pytest.mark.mpi  # the runs fixture trains with mpirun -np 2
def test_several_runs_share_each_plot(runs, tmp_path):
    lars_run, sgd_run = runs
    assert report(lars_run, "--out", tmp_path / "one").returncode == 0
    proc = report(lars_run, sgd_run, "--out", tmp_path / "two")
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "two" / "summary.md").read_text()
    summary_row(text, "lars")
    summary_row(text, "sgd")
    # The second run is drawn: the accuracy plot of both differs from that of one.
    assert (tmp_path / "two" / "accuracy.png").read_bytes() != (tmp_path / "one" / "accuracy.png").read_bytes()
    # Only the LARS run has trust ratios; the plot exists because of it.
    assert (tmp_path / "two" / "trust_ratio.png").exists()


@pytest.mark.mpi  # the runs fixture trains with mpirun -np 2
def test_runs_with_one_label_are_averaged(runs, tmp_path):
    lars_run, sgd_run = runs
    proc = report(lars_run, sgd_run, "--out", tmp_path, "--labels", "both,both")
    assert proc.returncode == 0, proc.stderr
    finals = [read_scalars(r)["val/top1"][-1][1] for r in runs]
    cells = summary_row((tmp_path / "summary.md").read_text().split("## Runs with the same label")[1], "both")
    assert int(cells[1]) == 2
    assert cells[2] == f"{statistics.fmean(finals):.2f} ± {statistics.stdev(finals):.2f}"
    assert cells[3] == f"{min(finals):.2f} - {max(finals):.2f}"


def test_loss_scale_is_plotted_when_present(tmp_path):
    """Loss scaling needs fp16 (a GPU); the events such a run writes are made here with the
    writer the job uses."""
    from tensorboardX import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "run"))
    for step, scale in enumerate([65536.0, 32768.0, 32768.0], start=1):
        writer.add_scalar("train/loss", 2.0 / step, step)
        writer.add_scalar("train/loss_scale", scale, step)
        writer.add_scalar("train/skipped_steps", float(step > 1), step)
    writer.close()
    proc = report(tmp_path / "run")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "run" / "report" / "loss_scale.png").read_bytes()[:8] == PNG_MAGIC
    assert (tmp_path / "run" / "report" / "loss.png").exists()  # no epoch finished: plotted over steps


@pytest.mark.parametrize(
    "args, message",
    [
        (["/nonexistent/run"], "no such run directory"),
        (["{empty}"], "holds no TensorBoard event files"),
        (["{empty}", "{empty}"], "--out DIR is required"),
        (["{empty}", "--labels", "a,b"], "one non-empty label per run directory"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, message):
    """The command's main in this process (the tests above run it as a process)."""
    (tmp_path / "empty").mkdir()
    code = report_module.main([a.format(empty=tmp_path / "empty") for a in args])
    stderr = capsys.readouterr().err
    assert code == 2
    assert message in stderr and len(stderr.strip().splitlines()) == 1, stderr
