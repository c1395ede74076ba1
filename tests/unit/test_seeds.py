"""The older projects' command lines, as their READMEs print them (/work/shared/seeds), parse
into the training they meant there. Lines are copied, only the placeholders for paths and
process counts are filled in; test-only flags are appended, never edited in."""

from __future__ import annotations

import shlex

import pytest
import torch

from largebatch.config import UsageError, parse_config
from largebatch.job import build_scheduler

# --- the Horovod + LARS trainer (004): its README's example, its scripts' flags -------------------

LARS_EXAMPLE = (
    "--batch-size 128 --warmup-epochs 0.3125 --train-dir=/d/ImageNet/train/ --val-dir=/d/ImageNet/val "
    "--base-lr 5.6568542494924 --base-op lars --bn-bias-separately --wd 0.0001 --lr-scaling keep"
)


def flags(cfg):
    """Every field of every sub-config by its flag's name, as parsed (tuples stay tuples)."""
    import dataclasses
    from types import SimpleNamespace

    groups = [getattr(cfg, f.name) for f in dataclasses.fields(cfg)]
    return SimpleNamespace(
        **{f.name: getattr(g, f.name) for g in groups if g is not None for f in dataclasses.fields(g)}
    )


def test_lars_readme_example_means_the_same_training():
    cfg = parse_config(shlex.split(LARS_EXAMPLE))
    o = flags(cfg)
    assert (o.base_op, o.bn_bias_separately, o.batch_size, o.warmup_epochs, o.wd) == ("lars", True, 128, 0.3125, 1e-4)
    assert (o.lr_scaling, o.lr_schedule, o.lr_power, o.end_lr, o.epochs) == ("keep", "poly", 2.0, 0.0, 90)
    assert o.label_smoothing == 0.1  # the original default, which this example relied on
    assert cfg.lr(8) == pytest.approx(5.6568542494924)
    assert (str(cfg.data.train_dir), str(cfg.data.val_dir)) == ("/d/ImageNet/train", "/d/ImageNet/val")


def test_lars_trainer_defaults_and_its_other_flags():
    # --lr-decay with three values (argparse abbreviation used to take it for --lr-decay-epochs),
    # --single-threaded, and the defaults: SGD, label smoothing 0.1, weight decay on every
    # parameter, and the poly power the original used with SGD (1; 2 only with LARS).
    cfg = parse_config(
        [
            "--train-dir",
            "/t",
            "--val-dir",
            "/v",
            "--lr-decay",
            "30",
            "60",
            "80",
            "--single-threaded",
            "--batches-per-allreduce",
            "4",
            "--epsilon",
            "1e-5",
            "--fp16-allreduce",
            "--no-cuda",
            "--seed",
            "3",
            "--log-dir",
            "/tmp/x",
            "--checkpoint-format",
            "checkpoint-{epoch}.pth.tar",
        ]
    )
    o = flags(cfg)
    assert (o.base_op, o.bn_bias_separately, o.label_smoothing, o.lr_power) == ("sgd", False, 0.1, 1.0)
    assert o.lr_decay_epochs == (30.0, 60.0, 80.0) and o.lr_schedule == "poly"  # the original never used it either
    assert cfg.data.workers == 0 and o.batches_per_allreduce == 4 and cfg.dist.fp16_allreduce
    assert (o.base_lr, o.warmup_epochs, o.momentum, o.wd, o.epochs, o.batch_size) == (0.0125, 5.0, 0.9, 5e-5, 90, 32)
    assert parse_config(["--synthetic", "--base-op", "lamb"]).schedule.lr_power == 1.0


def test_lars_dali_script_accepts_its_ignored_dirs():
    cfg = parse_config(
        ["--data-dir", "/recs", "--train-dir", "/a", "--val-dir", "/b", "--lr-decay", "30", "60"], "dali"
    )
    assert cfg.dali.data_dir.as_posix() == "/recs" and cfg.data.train_dir is None
    assert cfg.schedule.lr_decay_epochs == (30.0, 60.0)


# --- NVIDIA Apex's ImageNet examples (001: main_amp.py, 000: main.py --fp16) -----------------------

# (README line after the script name, policy, batch norm in fp32, loss scale)
APEX_LINES = [
    ("-a resnet50 --b 128 --workers 4 --opt-level O0 ./", "O0", True, None),
    ("-a resnet50 --b 224 --workers 4 --opt-level O3 ./", "O3", False, None),
    ("-a resnet50 --b 224 --workers 4 --opt-level O3 --keep-batchnorm-fp32 True ./", "O3", True, None),
    ("-a resnet50 --b 224 --workers 4 --opt-level O1 ./", "O1", True, "dynamic"),
    ("-a resnet50 --b 224 --workers 4 --opt-level O1 --loss-scale 128.0 ./", "O1", True, 128.0),
    # as torch.distributed.launch runs it: the launcher adds --local-rank (old versions: --local_rank)
    ("--local-rank=1 -a resnet50 --b 224 --workers 4 --opt-level O1 ./", "O1", True, "dynamic"),
    ("--local_rank=0 -a resnet50 --b 224 --workers 4 --opt-level O2 ./", "O2", True, "dynamic"),
    ("-a resnet50 --b 224 --workers 4 --opt-level O2 ./", "O2", True, "dynamic"),
    ("-a resnet50 --b 224 --workers 4 --opt-level O2 --loss-scale 128.0 ./", "O2", True, 128.0),
    ("-a resnet50 --fp16 --b 256 --workers 4 ./", "O2", True, 1.0),
    ("-a resnet50 --fp16 --b 256 --static-loss-scale 128.0 --workers 4 ./", "O2", True, 128.0),
    ("-a resnet50 --fp16 --b 256 --dynamic-loss-scale --workers 4 ./", "O2", True, "dynamic"),
]


@pytest.mark.parametrize("line, level, keep_bn, loss_scale", APEX_LINES)
def test_apex_readme_lines(line, level, keep_bn, loss_scale):
    cfg = parse_config(shlex.split(line))
    batch = int(shlex.split(line)[shlex.split(line).index("--b") + 1])
    policy = cfg.numerics.policy
    assert (policy.name, policy.keep_bn_fp32, policy.loss_scale) == (level, keep_bn, loss_scale)
    assert (str(cfg.data.train_dir), str(cfg.data.val_dir)) == ("train", "val")
    o = flags(cfg)
    assert (o.model, o.batch_size, o.val_batch_size, cfg.data.workers) == ("resnet50", batch, batch, 4)
    # main_amp.py's recipe: SGD, 0.1 per 256 images of global batch, 5 warmup epochs, x0.1 at 30/60/80
    assert (o.base_op, o.momentum, o.wd, o.bn_bias_separately, o.label_smoothing) == ("sgd", 0.9, 1e-4, False, 0.0)
    assert (o.lr_schedule, o.lr_decay_epochs, o.warmup_epochs, o.epochs) == ("step", (30.0, 60.0, 80.0), 5.0, 90)
    assert cfg.lr(2) == pytest.approx(0.1 * batch * 2 / 256)


def test_apex_flags_and_appended_test_flags():
    line = (
        "-a resnet18 -b 64 -j 2 --epochs 3 --start-epoch 0 --lr 0.2 --momentum 0.8 --weight-decay 3e-4 -p 5 "
        "--resume auto --deterministic --sync_bn --channels-last False --pretrained -e /data"
    )
    cfg = parse_config(shlex.split(line) + ["--image-size", "16", "--no-cuda"])
    o = flags(cfg)
    assert (o.model, o.batch_size, cfg.data.workers, o.epochs, o.momentum, o.wd) == ("resnet18", 64, 2, 3, 0.8, 3e-4)
    assert cfg.lr(4) == pytest.approx(0.2 * 64 * 4 / 256)
    assert (cfg.run.print_freq, cfg.run.evaluate, o.pretrained) == (5, True, True)
    assert cfg.numerics.deterministic and cfg.norm.sync_bn and not cfg.numerics.channels_last
    assert cfg.data.image_size == 16 and str(cfg.data.train_dir) == "/data/train"
    # Apex's --channels-last True, and our bare flag
    assert parse_config(["--synthetic", "--channels-last", "True"]).numerics.channels_last
    assert parse_config(["--synthetic", "--channels-last"]).numerics.channels_last


def test_apex_schedule_is_main_amp_schedule():
    """Our step schedule from an Apex line equals main_amp.py's adjust_learning_rate at every step."""
    cfg = parse_config(shlex.split("-a resnet50 --b 224 --workers 4 --opt-level O0 ./"))
    world, steps_per_epoch = 2, 3
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr(world))
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch)
    for epoch in range(cfg.schedule.epochs):
        for step in range(steps_per_epoch):
            factor = epoch // 30 + (1 if epoch >= 80 else 0)
            expected = 0.1 * 224 * world / 256 * 0.1**factor
            if epoch < 5:
                expected *= (1 + step + epoch * steps_per_epoch) / (5 * steps_per_epoch)
            assert optimizer.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-9), (epoch, step)
            optimizer.step()
            scheduler.step()


def test_our_flags_without_a_data_root_keep_our_meaning():
    cfg = parse_config(["--synthetic", "-a", "resnet18", "-b", "8"])
    assert (cfg.model.model, cfg.schedule.batch_size, cfg.schedule.lr_schedule, cfg.schedule.base_lr) == (
        "resnet18",
        8,
        "poly",
        0.0125,
    )


# --- TorchShard (003) -----------------------------------------------------------------------------


def test_torchshard_last_dim():
    cfg = parse_config(["--synthetic", "--enable-model-parallel", "--model-parallel-dim", "-1"])
    assert cfg.dist.model_parallel_dim == 1


# --- contradictions and mistakes: one line ------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        ("./ --train-dir /t", "give the data root ./ or --train-dir/--val-dir, not both"),
        ("./ --synthetic", "--synthetic trains on random tensors: drop the data root"),
        ("--synthetic --lr 0.1 --base-lr 0.2", "give --lr or --base-lr/--lr-scaling, not both"),
        ("--synthetic --fp16 --opt-level O1", "give --fp16 or --precision/--opt-level, not both"),
        ("--synthetic --fp16 --loss-scale 8", "not --loss-scale"),
        ("--synthetic --static-loss-scale 8", "go with --fp16"),
        ("./ --start-epoch 3", "--start-epoch 3: a run starts where its checkpoint ends"),
        ("--synthetic --single-threaded --workers 2", "--single-threaded means --workers 0"),
        ("--synthetic --lr-decay 30 60 --lr-decay-epochs 10", "not both"),
        ("--synthetic --lr-decay 60 30", "increasing positive epochs"),
        ("--synthetic --lr-dec 30", "unrecognized arguments: --lr-dec"),  # no abbreviations
        ("--synthetic --keep-batchnorm-fp32 maybe --opt-level O2", "takes True or False"),
        ("--synthetic --model-parallel-dim 2 --enable-model-parallel", "invalid choice"),
    ],
)
def test_seed_contradictions_are_one_line(argv, message):
    with pytest.raises(UsageError) as err:
        parse_config(shlex.split(argv))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_pretrained_without_cache_or_network_is_one_line(tmp_path, monkeypatch):
    from largebatch.model import build_model

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")  # a closed port: no download, whatever the network
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    with pytest.raises(UsageError) as err:
        build_model("resnet18", 10, pretrained=True)
    message = str(err.value)
    assert "\n" not in message and "cannot be downloaded" in message
    assert str(tmp_path / "hub" / "checkpoints") in message and "resnet18-" in message


def test_pretrained_from_the_cache(tmp_path, monkeypatch):
    """Cached weights load; a classifier of another size stays fresh (seeded)."""
    from largebatch.model import build_model, pretrained_file

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    _, path = pretrained_file("resnet18")
    path.parent.mkdir(parents=True)
    reference = build_model("resnet18", 1000)
    torch.save(reference.state_dict(), path)
    torch.manual_seed(0)
    model = build_model("resnet18", 10, pretrained=True)
    assert torch.equal(model.conv1.weight, reference.conv1.weight)
    assert model.fc.weight.shape == (10, 512)
