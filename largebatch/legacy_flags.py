"""The older projects' spellings, mapped onto our own flags in one place.

Users of the projects largebatch replaces paste their own command lines. Every spelling
that is not simply another name of one of our flags (those are aliases in config.py's
parser: ``-a/--arch``, ``-b/--b``, ``-j``, ``-p``, ``--weight-decay``, ``--sync_bn``, ...)
is added here, under a ``seed_`` destination, and ``apply`` turns it into our own flags'
values before the typed Config is built. Nothing past config.py knows these spellings.

* The Horovod + LARS trainer: ``--lr-decay 30 60 80`` (several values; its scripts parsed it
  and never used it, so it sets the step schedule's epochs, which the default poly schedule
  ignores just the same), ``--single-threaded`` (no loader processes).
* NVIDIA Apex's ImageNet examples (``main_amp.py``, ``main.py``): the positional data root
  holding ``train/`` and ``val/``, which also selects Apex's recipe (below); ``--lr``, the rate
  per 256 images scaled by the global batch; ``--start-epoch``; the fp16 example's ``--fp16``,
  ``--static-loss-scale`` and ``--dynamic-loss-scale``.
* TorchShard: ``--model-parallel-dim -1`` (the last dimension, i.e. 1).

A combination that contradicts our own flags is refused with one line (UsageError).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .argparsing import UsageError, positive_float

# What Apex's main_amp.py trains when its command line names only a data root: resnet18,
# 256 images per process, SGD (momentum 0.9, weight decay 1e-4 on every parameter, no label
# smoothing) at 0.1 per 256 images of global batch, linear warmup over 5 epochs, then x0.1
# at epochs 30, 60 and 80, for 90 epochs, validating with the training batch size. Applied
# only to flags the command line does not give (appended flags of ours win).
APEX_RECIPE = {
    "model": "resnet18",
    "batch_size": 256,
    "epochs": 90,
    "momentum": 0.9,
    "wd": 1e-4,
    "base_op": "sgd",
    "bn_bias_separately": False,
    "label_smoothing": 0.0,
    "lr_schedule": "step",
    "lr_decay_epochs": (30.0, 60.0, 80.0),
    "warmup_epochs": 5.0,
    "workers": 4,
    "print_freq": 10,
}
APEX_LR = 0.1  # main_amp.py's default --lr, per 256 images


def add_arguments(p: argparse.ArgumentParser, entry: str) -> None:
    g = p.add_argument_group("spellings of the projects largebatch replaces (see docs/coming-from.md)")
    if entry != "dali":
        g.add_argument(
            "seed_data",
            nargs="?",
            default=None,
            metavar="DATA",
            help="Apex's data root holding train/ and val/ (instead of --train-dir/--val-dir); "
            "it also selects Apex's recipe: resnet18, batch 256, SGD, --lr 0.1 per 256 images, "
            "5 warmup epochs, x0.1 at 30/60/80, weight decay 1e-4",
        )
    else:
        # The LARS trainer's DALI script had these too and ignored them: it reads --data-dir.
        g.add_argument(
            "--train-dir",
            "--val-dir",
            dest="seed_ignored_dirs",
            action="append",
            default=None,
            help="accepted and ignored, as by the original trainer's DALI script",
        )
    g.add_argument(
        "--lr",
        "--learning-rate",
        dest="seed_lr",
        type=positive_float,
        default=None,
        metavar="LR",
        help="Apex's rate per 256 images: sets --base-lr LR x batch-size / 256 and --lr-scaling linear",
    )
    g.add_argument(
        "--start-epoch",
        dest="seed_start_epoch",
        type=int,
        default=None,
        metavar="N",
        help="Apex's; only 0 (a run continues where its checkpoint ends: --resume)",
    )
    g.add_argument(
        "--lr-decay",
        dest="seed_lr_decay",
        nargs="+",
        type=int,
        default=None,
        metavar="EPOCH",
        help="the LARS trainer's spelling of --lr-decay-epochs (used by --lr-schedule step)",
    )
    g.add_argument(
        "--single-threaded",
        dest="seed_single_threaded",
        action="store_true",
        help="the LARS trainer's: load data in the training process (--workers 0)",
    )
    g.add_argument(
        "--fp16",
        dest="seed_fp16",
        action="store_true",
        help="Apex main.py's fp16 model with fp32 master weights and batch norm: --opt-level O2 "
        "with a static loss scale (1 unless --static-loss-scale/--dynamic-loss-scale)",
    )
    g.add_argument(
        "--static-loss-scale",
        dest="seed_static_loss_scale",
        type=positive_float,
        default=None,
        metavar="N",
        help="with --fp16: this fixed loss scale",
    )
    g.add_argument(
        "--dynamic-loss-scale",
        dest="seed_dynamic_loss_scale",
        action="store_true",
        help="with --fp16: a dynamic loss scale",
    )


def apply(v: dict, given: set[str], entry: str) -> None:
    """Map the seed spellings in ``v`` (parsed values) onto our own flags, in place.
    ``given``: the destinations the command line set explicitly."""

    def refuse(message: str):
        raise UsageError(message)

    # --- the Horovod + LARS trainer
    if v.pop("seed_ignored_dirs", None) is not None:
        v["train_dir"] = v["val_dir"] = None
    decay = v.pop("seed_lr_decay")
    if decay is not None:
        if "lr_decay_epochs" in given:
            refuse("give --lr-decay or --lr-decay-epochs, not both")
        if list(decay) != sorted(decay) or any(e <= 0 for e in decay):
            refuse(f"--lr-decay must be increasing positive epochs, got {' '.join(map(str, decay))}")
        v["lr_decay_epochs"] = tuple(float(e) for e in decay)
    if v.pop("seed_single_threaded"):
        if "workers" in given and v["workers"] != 0:
            refuse(f"--single-threaded means --workers 0, not --workers {v['workers']}")
        v["workers"] = 0

    # --- Apex: the data root and its recipe
    root = v.pop("seed_data", None)
    lr = v.pop("seed_lr")
    if root is not None:
        if given & {"train_dir", "val_dir"}:
            refuse(f"give the data root {root} or --train-dir/--val-dir, not both")
        if v["synthetic"]:
            refuse(f"--synthetic trains on random tensors: drop the data root {root}")
        v["train_dir"], v["val_dir"] = Path(root) / "train", Path(root) / "val"
        for dest, value in APEX_RECIPE.items():
            if dest not in given:
                v[dest] = value
        if "val_batch_size" not in given:
            v["val_batch_size"] = v["batch_size"]
        if lr is None and not given & {"base_lr", "lr_scaling"}:
            lr = APEX_LR
    if lr is not None:
        if given & {"base_lr", "lr_scaling"}:
            refuse(
                "--lr is Apex's rate per 256 images (it sets --base-lr and --lr-scaling linear): "
                "give --lr or --base-lr/--lr-scaling, not both"
            )
        # Apex: lr x (batch per process x processes) / 256. --lr-scaling linear multiplies by
        # processes x batches-per-allreduce, so the global batch of an accumulating run counts too.
        v["base_lr"], v["lr_scaling"] = lr * v["batch_size"] / 256, "linear"
    start = v.pop("seed_start_epoch")
    if start not in (None, 0):
        refuse(
            f"--start-epoch {start}: a run starts where its checkpoint ends; continue it with "
            f"--resume PATH (or --resume auto and its --log-dir)"
        )

    # --- Apex's fp16 example (main.py --fp16): fp16 model, fp32 masters and batch norm, static scale 1
    static, dynamic = v.pop("seed_static_loss_scale"), v.pop("seed_dynamic_loss_scale")
    if v.pop("seed_fp16"):
        if v["precision"] or v["opt_level"]:
            refuse(
                "--fp16 is --opt-level O2 with a static loss scale: give --fp16 or --precision/--opt-level, not both"
            )
        if "loss_scale" in given:
            refuse("with --fp16 give --static-loss-scale N or --dynamic-loss-scale, not --loss-scale")
        v["opt_level"] = "O2"
        v["loss_scale"] = "dynamic" if dynamic else repr(static if static is not None else 1.0)
    elif static is not None or dynamic:
        refuse("--static-loss-scale/--dynamic-loss-scale go with --fp16 (otherwise: --loss-scale N|dynamic)")

    # --- TorchShard: -1 is the last dimension of the weight, the output classes
    if v["model_parallel_dim"] == -1:
        v["model_parallel_dim"] = 1
