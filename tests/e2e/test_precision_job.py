"""Precision levels and the Apex controls in the real job, under mpirun -np 2."""

import hashlib
import json

import pytest
from test_bad_input import assert_usage_error

from helpers import job_args, latest_checkpoint, run_in_process, run_job
from largebatch.events import read_scalars


@pytest.mark.mpi
def test_loss_scaling_skips_overflow_and_lars_is_scale_invariant(engine_checks, engine):
    reports = engine_checks(engine, "loss_scaling")
    assert [
        (r["rank"], r["skipped_steps"], r["lars_scale_invariant"]) for r in sorted(reports, key=lambda r: r["rank"])
    ] == [(0, 1, True), (1, 1, True)], reports


@pytest.mark.mpi
@pytest.mark.parametrize(
    "flags, param_dtype, learns",
    [
        (["--precision", "amp-bf16"], "torch.float32", False),
        # resnet18, which learns on 16-pixel digits in 20 steps (the tests' small MODEL does not)
        (
            ["--precision", "bf16", "--channels-last", "--model", "resnet18", "--base-lr", "0.2"],
            "torch.bfloat16",
            True,
        ),  # rates 0.5 and 1 NaN-ed now and then
        # bf16, channels-last gradients through DDP's buckets, compressed to fp16, two micro-batches a step
        (
            [
                "--precision",
                "bf16",
                "--channels-last",
                "--engine",
                "torch",
                "--fp16-allreduce",
                "--batches-per-allreduce",
                "2",
            ],
            "torch.bfloat16",
            False,
        ),
    ],
)
def test_bf16_trains_end_to_end(digits, tmp_path, flags, param_dtype, learns):
    run_dir = tmp_path / "run"
    run_job(job_args(digits, run_dir, "--epochs", "2", *flags))
    state = latest_checkpoint(run_dir)
    first_conv = next(t for t in state["model"].values() if t.dim() == 4)
    assert str(first_conv.dtype) == param_dtype
    losses = [v for _, v in read_scalars(run_dir)["train/loss"]]
    steps = 20 // (2 if "--batches-per-allreduce" in flags else 1)  # 2 epochs of 10 micro-batches
    assert len(losses) == steps and all(v == v and v < 100 for v in losses)  # finite, every step logged
    assert state["step"] == steps  # with accumulation, optimizer steps are counted, not micro-batches
    if learns:
        assert sum(losses[-4:]) < sum(losses[:4]), "bf16 training did not learn"


@pytest.mark.mpi
def test_deterministic_runs_give_identical_checkpoints(digits, tmp_path, engine):
    digests = []
    for name in ("a", "b"):
        run_dir = tmp_path / name
        run_job(job_args(digits, run_dir, "--epochs", "1", "--deterministic", "--workers", "1", "--engine", engine))
        state = latest_checkpoint(run_dir)
        h = hashlib.sha256()
        for key in sorted(state["model"]):
            h.update(state["model"][key].numpy().tobytes())
        for key in sorted(state["optimizer"]["state"]):
            h.update(state["optimizer"]["state"][key]["momentum_buffer"].numpy().tobytes())
        digests.append(h.hexdigest())
    assert digests[0] == digests[1]


@pytest.mark.mpi
def test_prof_writes_traces_and_stops(digits, tmp_path, engine):
    run_dir = tmp_path / "run"
    timeline = ["--timeline"] if engine == "horovod" else []  # Horovod's own timeline of its collectives
    proc = run_job(job_args(digits, run_dir, "--epochs", "2", "--prof", "3", "--engine", engine, *timeline))
    traces = sorted((run_dir / "profile").glob("rank*.pt.trace.json*"))
    assert [t.name.split(".")[0] for t in traces] == ["rank0", "rank1"]
    assert str(traces[0]) in proc.stdout
    events = json.loads(traces[0].read_text())["traceEvents"]
    assert any("ProfilerStep#" in e.get("name", "") for e in events)
    assert not timeline or (run_dir / "profile" / "horovod_timeline.json").stat().st_size > 0
    assert json.loads((run_dir / "status.json").read_text())["state"] == "profiled"
    assert not list(run_dir.glob("checkpoint-*"))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--opt-level", "O1"], "needs a GPU"),
        (["--opt-level", "O2"], "needs a GPU"),
        (["--precision", "amp"], "needs a GPU"),
        (["--precision", "fp16"], "needs a GPU"),
        (["--sync-bn"], "--sync-bn needs GPUs"),
    ],
)
def test_gpu_only_choices_fail_clearly_on_cpu(digits, tmp_path, flags, message):
    proc = run_in_process(job_args(digits, tmp_path / "run", "--epochs", "1", *flags))
    assert_usage_error(proc, message)
