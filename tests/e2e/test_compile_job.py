"""--compile end to end: one process, the torch engine, a compiled forward pass through DDP
with channels-last and accumulation, stopped by a signal mid-epoch, resumed compiled, and
compared with an uncompiled run straight through.

The compile backend is ``aot_eager`` (LARGEBATCH_COMPILE_BACKEND): Dynamo's graph capture and
AOTAutograd's forward/backward graphs, as with Inductor, without Inductor's C++ code
generation, which takes about three minutes for resnet18 on a loaded 2-core machine.
Inductor itself is exercised on a tiny model in tests/unit/test_compile.py."""

from __future__ import annotations

import json
import signal
import subprocess
import time

from helpers import PYTHON, ROOT, TRAIN, env, job_args, latest_checkpoint, run_job

COMPILE_ENV = {"LARGEBATCH_COMPILE_BACKEND": "aot_eager"}
FLAGS = [
    "--epochs",
    "2",
    "--seed",
    "5",
    "--engine",
    "torch",
    "--channels-last",
    "--batches-per-allreduce",
    "2",
    "--lr-schedule",
    "step",
    "--checkpoint-every",
    "3",
]


def run_until(args: list, when: str) -> str:
    """Run one plain-python job and send it SIGUSR1 when ``when`` appears in its output; it must
    checkpoint and exit 0."""
    proc = subprocess.Popen(
        [PYTHON, TRAIN, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**env(), **COMPILE_ENV},
        cwd=ROOT,
    )
    output, sent = [], False
    for line in proc.stdout:
        output.append(line)
        if when in line and not sent:
            proc.send_signal(signal.SIGUSR1)
            sent = True
    text = "".join(output)
    assert proc.wait(timeout=600) == 0 and sent, text
    return text


def test_compiled_run_resumes_and_matches_eager(digits, tmp_path):
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    run_job(job_args(digits, eager, *FLAGS), np=1)

    args = job_args(digits, compiled, *FLAGS, "--compile")
    t0 = time.monotonic()
    run_until(args, when="epoch 1/2 step 4/")
    status = json.loads((compiled / "status.json").read_text())
    assert status["state"] == "stopped" and 4 <= status["step"] < 10, status
    resumed = run_job(args, np=1, extra_env=COMPILE_ENV)
    seconds = time.monotonic() - t0
    assert "resuming from" in resumed.stdout

    a, b = latest_checkpoint(eager), latest_checkpoint(compiled)
    assert a["step"] == b["step"] == 20
    assert not [k for k in b["model"] if "_orig_mod" in k or k.startswith("module.")]
    assert a["model"].keys() == b["model"].keys()
    worst = max(
        ((x - b["model"][k]).abs().max() / x.abs().max().clamp(min=1e-12)).item()
        for k, x in a["model"].items()
        if x.is_floating_point()
    )
    print(
        f"compiled run (stopped + resumed) took {seconds:.0f} s; largest relative weight difference "
        f"from the eager run: {worst:.2e}"
    )
    assert worst < 1e-3, worst
