"""Config files (issue 20, point 1): --config FILE.yaml, the args.yaml a run writes, and
--print-config; in the job renderer too."""

from __future__ import annotations

import dataclasses
import io
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import yaml

from largebatch import cli
from largebatch.config import UsageError, parse_config
from largebatch.config_file import dump, write_args

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_keys_are_flag_names_and_the_command_line_wins(tmp_path):
    recipe = write(
        tmp_path,
        "model: resnet18\nbase-op: lars\nbn_bias_separately: true\nbatch-size: 64\n"
        "lr-decay-epochs: [30, 60, 80]\ncrop-scale: [0.35, 1]\nlabel-smoothing: 0\n",
    )
    cfg = parse_config(["--synthetic", "--config", str(recipe), "--batch-size", "32"])
    assert (cfg.model.model, cfg.optim.base_op, cfg.optim.bn_bias_separately) == ("resnet18", "lars", True)
    assert cfg.schedule.batch_size == 32  # the command line's
    assert cfg.schedule.lr_decay_epochs == (30.0, 60.0, 80.0) and cfg.data.crop_scale == (0.35, 1.0)
    assert cfg.model.label_smoothing == 0.0
    assert cfg.run.config == str(recipe)
    off = parse_config(["--synthetic", "--config", str(recipe), "--no-bn-bias-separately"])
    assert not off.optim.bn_bias_separately


@pytest.mark.parametrize(
    "text, message",
    [
        ("batchsize: 64\n", "'batchsize' is not a flag of this job (did you mean batch-size?)"),
        ("batch-size: -3\n", "argument --batch-size/-b/--b: must be a positive integer"),
        ("synthetic: 3\n", "'synthetic' is a switch: true or false, not 3"),
        ("- model\n", "must be a mapping of flag names to values, not a list"),
        ("model: [unclosed\n", "not valid YAML"),
    ],
)
def test_a_bad_key_or_value_is_one_line_naming_the_file(tmp_path, text, message):
    recipe = write(tmp_path, text)
    with pytest.raises(UsageError) as err:
        parse_config(["--synthetic", "--config", str(recipe)])
    assert str(err.value).startswith(f"--config {recipe}: ") and message in str(err.value), str(err.value)
    assert "\n" not in str(err.value)


def test_a_missing_file_is_one_line(tmp_path):
    with pytest.raises(UsageError, match=r"--config .*nowhere.yaml: No such file"):
        parse_config(["--synthetic", "--config", str(tmp_path / "nowhere.yaml")])


def flat(cfg) -> dict:
    """Every field of the config but the file it came from."""
    out = cfg.to_dict()
    out.pop("config")
    return out


@pytest.mark.parametrize(
    "argv",
    [
        [
            "--synthetic",
            "--model",
            "resnet18",
            "--base-op",
            "lars",
            "--bn-bias-separately",
            "--lr-schedule",
            "step",
            "--lr-decay-epochs",
            "3,6",
            "--epochs",
            "9",
            "--crop-ratio",
            "0.5,2",
            "--precision",
            "bf16",
            "--keep-batchnorm-fp32",
            "False",
        ],
        [
            "--synthetic",
            "--enable-model-parallel",
            "--model-parallel-dim",
            "0",
            "--precise-bn",
            "64",
            "--nesterov",
            "--model-ema",
            "0.999",
            "--target-top1",
            "75.9",
            "--threads",
            "3",
        ],
    ],
)
def test_args_yaml_runs_the_same_run_again(tmp_path, argv):
    cfg = parse_config(argv)
    write_args(tmp_path, cfg.to_dict())
    again = parse_config(["--config", str(tmp_path / "args.yaml")])
    assert flat(again) == flat(cfg)
    assert dataclasses.asdict(again.schedule) == dataclasses.asdict(cfg.schedule)


def test_print_config_prints_the_resolved_configuration_and_exits(tmp_path):
    out = io.StringIO()
    with redirect_stdout(out):
        code = cli.main("folder", ["--synthetic", "--model", "resnet18", "--print-config", "--log-dir", str(tmp_path)])
    assert code == 0
    printed = yaml.safe_load(out.getvalue())
    assert printed["model"] == "resnet18" and printed["lr-power"] == 1.0 and "print-config" not in printed
    assert not list(tmp_path.iterdir())  # printing touches no run directory
    assert dump(parse_config(["--synthetic", "--model", "resnet18", "--log-dir", str(tmp_path)]).to_dict()) == (
        out.getvalue()
    )


def test_the_renderer_takes_a_config_and_makes_its_path_absolute(tmp_path, monkeypatch, capsys):
    from largebatch.jobs.cli import main

    recipe = write(tmp_path, "train-dir: /data/train\nval-dir: /data/val\nlog-dir: runs/r50\nmodel: resnet18\n")
    monkeypatch.chdir(tmp_path)
    code = main(["render", "--scheduler", "slurm", "--gpus-per-node", "4", "--time", "24:00:00", "--",
                 "--config", "recipe.yaml"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    script = (tmp_path / "runs" / "r50" / "job.sbatch").read_text()
    assert f"--config {recipe}" in script
