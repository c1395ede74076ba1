"""bench/gpu_check.py --smoke: the GPU check's code paths on CPU, so the script cannot rot
before a GPU machine is lent (on one, it is the exact command in docs/gpu.md)."""

from __future__ import annotations

import json
import subprocess
import time

from helpers import PYTHON, ROOT, env


def test_gpu_check_smoke_runs_every_part(tmp_path):
    out = tmp_path / "check"
    t0 = time.monotonic()
    # A generous budget: the default smoke budget (110 s) is sized for an idle machine, and a
    # part left out for time would leave its code path unchecked here.
    proc = subprocess.run(
        [PYTHON, "bench/gpu_check.py", "--smoke", "--out", str(out), "--budget", "400"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env=env(),
    )
    print(f"gpu_check --smoke took {time.monotonic() - t0:.0f} s")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    report = json.loads((out / "gpu_check.json").read_text())
    parts = {(p["part"], p["name"]): p for p in report["parts"]}
    for name in ("bf16 | on | off", "bf16 | on | default", "fp32 | off | off", "amp-bf16 | on | off"):
        row = parts[("train", name)]
        assert row["status"] == "ok", row
        assert row["loss_finite"] and row["images_per_sec"] > 0, row
    # The compiled row computes what the eager one does (aot_eager: same kernels).
    assert parts[("train", "bf16 | on | default")]["loss_last"] == parts[("train", "bf16 | on | off")]["loss_last"]
    for name in ("amp | on | off", "O2 | on | off"):  # fp16 levels: the job's own refusal on CPU
        assert parts[("train", name)]["status"] == "skipped" and "needs a GPU" in parts[("train", name)]["why"]
    assert parts[("optim", "optimizer step")]["status"] == "ok"
    assert parts[("optim", "optimizer step")]["per_tensor_lars_matches_lars"] is True
    folder = parts[("input", "folder input")]
    assert folder["status"] == "ok" and folder["images_per_sec"] > 0 and folder["plain_dataloader_images_per_sec"] > 0
    assert parts[("dali", "DALI pipeline")]["status"] in ("ok", "skipped")
    table = (out / "gpu_check.md").read_text()
    assert "| bf16 | on | default |" in table and "7,950" in table
