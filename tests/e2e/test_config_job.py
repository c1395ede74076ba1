"""A run's args.yaml, given back with --config, trains the same run again (issue 20, point 1)."""

from __future__ import annotations

import torch
import yaml

from helpers import job_args, latest_checkpoint, run_in_process


def test_args_yaml_of_a_run_trains_it_again(digits, tmp_path):
    first = tmp_path / "first"
    proc = run_in_process(job_args(digits, first, "--epochs", "1", "--seed", "3", "--nesterov"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    saved = yaml.safe_load((first / "args.yaml").read_text())
    assert saved["log-dir"] == str(first) and saved["nesterov"] is True and saved["seed"] == 3

    again = tmp_path / "again"
    proc = run_in_process(["--config", first / "args.yaml", "--log-dir", again])  # the command line wins
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = latest_checkpoint(first), latest_checkpoint(again)
    assert a["step"] == b["step"] > 0
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert yaml.safe_load((again / "args.yaml").read_text()) == {**saved, "log-dir": str(again)}
