"""Flag parsing and validation: the typed config and the LR scaling rules."""

import math

import pytest

from largebatch.config import UsageError, parse_config

BASE = ["--synthetic", "--model", "resnet18", "--epochs", "10", "--base-lr", "0.1"]


@pytest.mark.parametrize(
    "scaling, batches, size, expected",
    [
        ("keep", 4, 8, 0.1),
        ("linear", 1, 8, 0.1 * 8),
        ("linear", 4, 8, 0.1 * 32),
        ("sqrt", 1, 16, 0.1 * 4),
        ("sqrt", 2, 8, 0.1 * 4),  # sqrt(processes x batches), not sqrt(lr x N)
    ],
)
def test_lr_scaling(scaling, batches, size, expected):
    cfg = parse_config(BASE + ["--lr-scaling", scaling, "--batches-per-allreduce", str(batches)])
    assert cfg.lr(size) == pytest.approx(expected)
    assert not math.isclose(parse_config(BASE + ["--lr-scaling", "sqrt"]).lr(16), math.sqrt(0.1 * 16))


def test_original_trainer_command_line_still_parses():
    cfg = parse_config(
        [
            "--batch-size",
            "128",
            "--warmup-epochs",
            "0.3125",
            "--train-dir=/d/train",
            "--val-dir=/d/val",
            "--base-lr",
            "5.6568542494924",
            "--base-op",
            "lars",
            "--bn-bias-separately",
            "--wd",
            "0.0001",
            "--lr-scaling",
            "keep",
            "--fp16-allreduce",
            "--batches-per-allreduce",
            "4",
            "--checkpoint-format",
            "./checkpoint-{epoch}.pth.tar",
            "--epsilon",
            "1e-5",
            "--label-smoothing",
            "0.1",
            "--no-cuda",
            "--seed",
            "3",
            "--model",
            "resnet50",
            "--epochs",
            "90",
        ]
    )
    assert cfg.optim.base_op == "lars" and cfg.optim.bn_bias_separately and cfg.dist.fp16_allreduce
    assert cfg.schedule.batches_per_allreduce == 4 and cfg.schedule.warmup_epochs == 0.3125
    assert cfg.data.val_resize == 256  # 224 / 0.875


def test_boolean_flags_have_negations():
    assert not parse_config(BASE + ["--no-bn-bias-separately"]).optim.bn_bias_separately
    assert not parse_config(BASE + ["--fp16-allreduce", "--no-fp16-allreduce"]).dist.fp16_allreduce


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "resnet18"], "--train-dir and --val-dir are required"),
        (BASE + ["--batch-size", "0"], "positive integer"),
        (BASE + ["--model", "resnet5"], "not a torchvision classification model"),
        (BASE + ["--train-dir", "/x"], "--synthetic trains on random tensors"),
        (BASE + ["--warmup-epochs", "10"], "must be less than --epochs"),
        (BASE + ["--use-adasum", "--gradient-predivide-factor", "2"], "cannot be combined"),
        (BASE + ["--fp16-allreduce", "--bf16-allreduce"], "--fp16-allreduce and --bf16-allreduce cannot be combined"),
        (BASE + ["--checkpoint-format", "ckpt.pt"], "{epoch}"),
        (BASE + ["--checkpoint-format", "ckpt-{epoch}-{oops}.pt"], "not a valid template"),
        (BASE + ["--resume", "/no/such/file.pt"], "no such checkpoint file"),
        (BASE + ["--crop-scale", "0.5"], "LOW,HIGH"),
        (BASE + ["--image-size", "64", "--val-resize", "32"], "smaller than --image-size"),
        (BASE + ["--image-size", "1"], "--image-size 1 is below 8"),
        (BASE + ["--image-size", "7", "--val-resize", "8"], "train to chance"),
        (BASE + ["--momentum", "1.5"], "below 1"),
        (BASE + ["--base-op", "adam"], "invalid choice"),
    ],
)
def test_bad_flags_give_one_line_errors(argv, message):
    with pytest.raises(UsageError) as err:
        parse_config(argv)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_smallest_image_size_is_accepted():
    assert parse_config(BASE + ["--image-size", "8"]).data.image_size == 8


# --- the config is declared once ------------------------------------------------------------------


def test_a_field_that_is_neither_a_flag_nor_derived_fails_at_import(monkeypatch):
    import dataclasses

    from largebatch import config

    @dataclasses.dataclass(frozen=True)
    class Broken:
        """broken"""

        forgotten: int = 0

    monkeypatch.setitem(config.GROUPS, "broken", Broken)
    with pytest.raises(TypeError, match="Broken.forgotten is neither a flag"):
        config._check_declarations()


def test_every_flag_is_a_field_and_every_field_a_flag_or_derived():
    import dataclasses

    from largebatch import config

    for entry in config.ENTRIES:
        parser = config.build_parser(entry)
        dests = {a.dest for a in parser._actions if a.option_strings} - {"help", "ignored_local_rank"}
        fields = {
            f.name
            for cls in config.GROUPS.values()
            for f in dataclasses.fields(cls)
            if "names" in f.metadata and f.metadata["entry"] in (None, entry)
        }
        legacy = {d for d in dests if d.startswith("seed_")}
        assert dests - legacy == fields, entry


@pytest.mark.parametrize("entry", ["folder", "dali"])
def test_help_gives_every_flag_a_line_and_its_default_once(entry):
    import argparse

    from largebatch import config

    parser = config.build_parser(entry)
    text = parser.format_help()
    assert "(default: None)" not in text and "default: False" not in text
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or not action.option_strings:
            continue
        assert action.help, f"{action.option_strings[0]} has no help"
        assert formatter._get_help_string(action).count("(default") <= 1, action.option_strings[0]


def test_the_entry_is_part_of_the_config():
    assert parse_config(["--synthetic"]).run.entry == "folder"
    assert parse_config(["--synthetic"], "dali").run.entry == "dali"
    assert parse_config(["--synthetic"], "dali").to_dict()["entry"] == "dali"
    assert "policy" not in parse_config(["--synthetic"]).to_dict()  # derived, not saved: not a plain type
