"""Command-line flags, parsed once into a typed, validated ``Config``.

Each field of a sub-config declares its own flag (``flag(...)``), so the parser is built from
the dataclasses and a field cannot lack a flag or a flag a field; a field that is neither a
flag nor ``derived`` fails at import. The sub-configs group the flags by concern: the input,
the model and its loss, the optimizer, the batch and schedule, numerics, distribution, the run
(its directory, checkpoints, output, seed) and profiling.

Flag names and defaults follow the original Horovod + LARS ImageNet trainer so that its users'
command lines keep working and mean the same training; the other older projects' spellings
(Apex's ImageNet examples, TorchShard) are mapped onto these flags by legacy_flags.py.
Everything that can be checked without touching data or starting an engine is checked here,
so a bad flag fails in every rank at once, before any work.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import config_file, legacy_flags
from .argparsing import Parser, UsageError, non_negative_float, non_negative_int, positive_float, positive_int

if TYPE_CHECKING:
    import torch

    from .precision import Policy

# The smallest --image-size. A ResNet's stem (a stride-2 convolution, then a stride-2
# pooling) divides the size by 4: from 4 pixels down it leaves one pixel per channel, so
# nothing of an image's shape reaches the residual stages, and the run trains, without any
# complaint, to chance. 8 leaves 2x2 and is where images still hold shapes (scikit-learn's
# digits are 8x8). Models that need more (most non-ResNets below 32, ViTs at anything but
# their own size) are refused at start by model.check_input, which tries the size.
MIN_IMAGE_SIZE = 8
ENTRIES = ("folder", "dali")  # pytorch_imagenet_resnet.py, pytorch_imagenet_resnet_dali.py


# --- value types of flags ----------------------------------------------------------------------


def _pair(text: str) -> tuple[float, float]:
    try:
        low, high = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be two numbers LOW,HIGH, got {text!r}") from None
    if not (0 < low <= high and math.isfinite(high)):
        raise argparse.ArgumentTypeError(f"must be finite numbers with 0 < LOW <= HIGH, got {text!r}")
    return low, high


def _epochs_list(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated epochs, got {text!r}") from None
    if list(values) != sorted(values) or not all(0 < v < math.inf for v in values):
        raise argparse.ArgumentTypeError(f"must be increasing positive epochs, got {text!r}")
    return values


_BOOL_WORDS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}


def _bool_word(text: str) -> bool:
    try:
        return _BOOL_WORDS[text.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"takes True or False (or no value), got {text!r}") from None


# --- declaring a field and its flag together ------------------------------------------------------

SWITCH = "switch"  # --flag / --no-flag
VALUE_BOOL = "value_bool"  # --flag, --flag True|False (Apex's spelling), --no-flag


def flag(
    *names: str,
    help: str,
    default: Any = None,
    kind: str | None = None,
    entry: str | None = None,
    **argparse_kwargs: Any,
) -> Any:
    """A Config field with its flag: ``names`` (the first is the canonical one, whose
    destination is the field's name), ``help`` (one line; the default is added once), the
    default, and argparse's other arguments. ``entry``: only that entry script has it."""
    return dataclasses.field(
        metadata={
            "names": names,
            "help": help,
            "default": default,
            "kind": kind,
            "entry": entry,
            "argparse": argparse_kwargs,
        }
    )


def derived(doc: str, saved: bool = True) -> Any:
    """A Config field computed from the flags (not a flag itself); ``saved``: part of
    ``to_dict`` and so of a checkpoint's ``args``."""
    return dataclasses.field(metadata={"derived": doc, "saved": saved})


# --- the sub-configs ----------------------------------------------------------------------------


@dataclass(frozen=True)
class DataConfig:
    """data"""

    train_dir: Path | None = flag(
        "--train-dir", type=Path, entry="folder", help="training images, one folder per class"
    )
    val_dir: Path | None = flag(
        "--val-dir", type=Path, entry="folder", help="validation images, the same class folders"
    )
    synthetic: bool = flag(
        "--synthetic", action="store_true", default=False, help="random tensors instead of a data set"
    )
    synthetic_size: int = flag(
        "--synthetic-size",
        type=positive_int,
        default=1024,
        help="samples per epoch with --synthetic (validation: a quarter of it)",
    )
    num_classes: int | None = flag(
        "--num-classes", type=positive_int, help="classes (default: the number of class folders; 1000 with --synthetic)"
    )
    image_size: int = flag(
        "--image-size",
        type=positive_int,
        default=224,
        help=f"training crop size, at least {MIN_IMAGE_SIZE} (a ResNet's stem divides it by 4); "
        f"a size the --model cannot take is refused at start",
    )
    val_resize: int = flag(  # the flag's None becomes the default in parse_config
        "--val-resize",
        type=positive_int,
        help="validation: resize the shorter side to this, then centre-crop --image-size (default: image-size / 0.875)",
    )
    crop_scale: tuple[float, float] = flag(
        "--crop-scale",
        type=_pair,
        default=(0.08, 1.0),
        metavar="LOW,HIGH",
        help="training crop area, as fractions of the image (random resized crop)",
    )
    crop_ratio: tuple[float, float] = flag(
        "--crop-ratio", type=_pair, default=(3 / 4, 4 / 3), metavar="LOW,HIGH", help="training crop aspect ratios"
    )
    val_batch_size: int = flag(
        "--val-batch-size", type=positive_int, default=32, help="validation images per process per batch"
    )
    workers: int = flag("--workers", "-j", type=non_negative_int, default=4, help="data loader processes per rank")


@dataclass(frozen=True)
class DaliConfig:
    """DALI input (pytorch_imagenet_resnet_dali.py only; ``Config.dali`` is None for the other entry)"""

    data_dir: Path | None = flag(
        "--data-dir",
        type=Path,
        entry="dali",
        help="TFRecord layout: train/, validation/, idx_files/ (or an image folder tree with --data-format folder)",
    )
    data_format: str = flag(
        "--data-format", choices=["tfrecord", "folder"], default="tfrecord", entry="dali", help="what --data-dir holds"
    )
    dali_device: str = flag(
        "--dali-device",
        choices=["gpu", "cpu"],
        default="gpu",
        entry="dali",
        help="gpu: decode and augment on the GPU; cpu: the whole pipeline on CPU",
    )
    dali_threads: int = flag(
        "--dali-threads",
        type=non_negative_int,
        default=0,
        entry="dali",
        help="DALI CPU threads per rank (0: this rank's share of the node's cores, at most 8)",
    )
    dali_prefetch: int = flag(
        "--dali-prefetch", type=positive_int, default=2, entry="dali", help="DALI prefetch queue depth"
    )
    label_offset: str = flag(
        "--label-offset",
        choices=["auto", "0", "1"],
        default="auto",
        entry="dali",
        help="subtract this from TFRecord labels; auto: 1 when labels start at 1",
    )


@dataclass(frozen=True)
class ModelConfig:
    """model and loss"""

    model: str = flag(
        "--model",
        "-a",
        "--arch",
        default="resnet50",
        help="any torchvision classification model, or cifar_resnet8/14/20/32/44/56/110 (He et al.'s "
        "ResNets for small images)",
    )
    pretrained: bool = flag(
        "--pretrained",
        action="store_true",
        default=False,
        help="start from torchvision's trained weights (from the torch hub cache; the classifier "
        "stays fresh when --num-classes differs)",
    )
    # The original trainer's default.
    label_smoothing: float = flag(
        "--label-smoothing", type=non_negative_float, default=0.1, help="label smoothing of the cross-entropy loss"
    )


@dataclass(frozen=True)
class NormConfig:
    """batch norm"""

    sync_bn: bool = flag(
        "--sync-bn", "--sync_bn", kind=SWITCH, default=False, help="batch norm statistics across all ranks (GPUs)"
    )
    zero_init_residual: bool = flag(
        "--zero-init-residual",
        action="store_true",
        default=False,
        help="the last batch norm weight of every residual block starts at 0, each block at the identity "
        "(Goyal et al.; ResNets)",
    )
    ghost_bn: int = flag(
        "--ghost-bn",
        type=non_negative_int,
        default=0,
        metavar="G",
        help="training batch norm statistics over virtual batches of G images within each micro-batch (Hoffer et "
        "al.; 0: off)",
    )
    precise_bn: int = flag(
        "--precise-bn",
        type=non_negative_int,
        default=0,
        metavar="N",
        help="before each validation, re-estimate batch norm statistics over N training images with the current "
        "weights (0: off; the running averages, averaged across ranks)",
    )


@dataclass(frozen=True)
class OptimConfig:
    """optimizer"""

    # The original trainer's defaults: SGD, weight decay on every parameter.
    base_op: str = flag("--base-op", choices=["sgd", "lars", "lamb"], default="sgd", help="the optimizer")
    momentum: float = flag("--momentum", type=non_negative_float, default=0.9, help="momentum (below 1)")
    wd: float = flag("--wd", "--weight-decay", type=non_negative_float, default=5e-5, help="weight decay")
    epsilon: float = flag("--epsilon", type=non_negative_float, default=1e-5, help="LARS/LAMB epsilon")
    lars_eta: float = flag("--lars-eta", type=positive_float, default=0.001, help="LARS trust coefficient")
    trust_clip: float | None = flag(
        "--trust-clip", type=positive_float, help="cap on the LARS/LAMB trust ratio (default: none)"
    )
    nesterov: bool = flag("--nesterov", action="store_true", default=False, help="Nesterov momentum (SGD and LARS)")
    bn_bias_separately: bool = flag(
        "--bn-bias-separately",
        kind=SWITCH,
        default=False,
        help="no weight decay and no trust ratio for normalisation weights and biases",
    )


@dataclass(frozen=True)
class ScheduleConfig:
    """batch and schedule"""

    batch_size: int = flag(
        "--batch-size", "-b", "--b", type=positive_int, default=32, help="training images per process per micro-batch"
    )
    batches_per_allreduce: int = flag(
        "--batches-per-allreduce", type=positive_int, default=1, help="micro-batches accumulated per optimizer step"
    )
    epochs: int = flag("--epochs", type=positive_int, default=90, help="epochs to train")
    base_lr: float = flag(
        "--base-lr", type=positive_float, default=0.0125, help="peak learning rate, before --lr-scaling"
    )
    lr_scaling: str = flag(
        "--lr-scaling",
        choices=["keep", "linear", "sqrt"],
        default="keep",
        help="scale --base-lr by processes x batches-per-allreduce (linear) or its square root",
    )
    lr_schedule: str = flag(
        "--lr-schedule", choices=["poly", "cosine", "step"], default="poly", help="decay after the warmup"
    )
    lr_power: float = flag(  # the flag's None becomes the default in parse_config
        "--lr-power",
        type=positive_float,
        help="poly schedule exponent (default: 2 with --base-op lars, else 1, as in the original trainer)",
    )
    end_lr: float = flag("--end-lr", type=non_negative_float, default=0.0, help="the rate poly and cosine decay to")
    lr_decay_epochs: tuple[float, ...] = flag(
        "--lr-decay-epochs",
        type=_epochs_list,
        default=(30.0, 60.0, 80.0),
        metavar="E1,E2,...",
        help="step schedule: epochs at which the rate drops 10x",
    )
    warmup_epochs: float = flag(
        "--warmup-epochs", type=non_negative_float, default=5.0, help="linear warmup from 0 to the peak rate, in epochs"
    )

    def lr(self, world_size: int) -> float:
        """The peak learning rate after --lr-scaling for this many processes."""
        factor = world_size * self.batches_per_allreduce
        if self.lr_scaling == "linear":
            return self.base_lr * factor
        if self.lr_scaling == "sqrt":
            # sqrt of the batch factor, not sqrt(lr * N) as the original trainer had it
            return self.base_lr * math.sqrt(factor)
        return self.base_lr


@dataclass(frozen=True)
class NumericsConfig:
    """numerics and performance"""

    precision: str | None = flag(
        "--precision",
        choices=["fp32", "amp", "amp-bf16", "fp16", "bf16"],
        help="fp32 (the default); amp: autocast fp16 + loss scaling; amp-bf16; fp16/bf16: the whole model",
    )
    opt_level: str | None = flag(
        "--opt-level",
        choices=["O0", "O1", "O2", "O3"],
        help="Apex's levels: O0 fp32, O1 amp, O2 fp16 model + fp32 master weights, O3 pure fp16",
    )
    # Apex writes --keep-batchnorm-fp32 True; a bare flag and --no-... work too.
    keep_batchnorm_fp32: bool | None = flag(
        "--keep-batchnorm-fp32",
        kind=VALUE_BOOL,
        help="batch norm in fp32 under O2/O3/fp16/bf16 (default: on for O2, off for O3)",
    )
    loss_scale: str | None = flag("--loss-scale", help="'dynamic' or a fixed number (fp16 levels only)")
    channels_last: bool = flag("--channels-last", kind=VALUE_BOOL, default=False, help="NHWC model and inputs")
    deterministic: bool = flag(
        "--deterministic",
        kind=SWITCH,
        default=False,
        help="deterministic algorithms: two runs with the same flags give identical checkpoints",
    )
    compile: str | None = flag(
        "--compile",
        nargs="?",
        const="default",
        metavar="MODE",
        choices=["default", "reduce-overhead", "max-autotune"],
        help="torch.compile the model's training forward pass; MODE: default, "
        "reduce-overhead (CUDA graphs) or max-autotune (default: eager)",
    )
    threads: int | None = flag(
        "--threads",
        type=positive_int,
        metavar="N",
        help="CPU threads per process for PyTorch's operations (default: OMP_NUM_THREADS as "
        "set, even above the core count, where PyTorch alone would cap it)",
    )
    no_cuda: bool = flag(
        "--no-cuda", action="store_true", default=False, help="train on CPU even where a GPU is present"
    )
    policy: Policy = derived(
        "precision.Policy, resolved once from --precision, --opt-level, --keep-batchnorm-fp32 and --loss-scale",
        saved=False,
    )


@dataclass(frozen=True)
class DistConfig:
    """distribution"""

    engine: str = flag(
        "--engine",
        choices=["auto", "horovod", "torch"],
        default="auto",
        help="auto: torch under torchrun, Horovod under mpirun/horovodrun/srun where it imports, else torch",
    )
    fp16_allreduce: bool = flag(
        "--fp16-allreduce", kind=SWITCH, default=False, help="compress gradients to fp16 for allreduce"
    )
    bf16_allreduce: bool = flag(
        "--bf16-allreduce",
        kind=SWITCH,
        default=False,
        help="compress gradients to bf16 for allreduce (fp32's range, fewer digits; torch engine)",
    )
    use_adasum: bool = flag(
        "--use-adasum", kind=SWITCH, default=False, help="Adasum instead of averaging (Horovod engine)"
    )
    gradient_predivide_factor: float = flag(
        "--gradient-predivide-factor",
        type=positive_float,
        default=1.0,
        help="divide gradients by this before the allreduce and by size/this after",
    )
    enable_model_parallel: bool = flag(
        "--enable-model-parallel",
        action="store_true",
        default=False,
        help="split the final linear layer (the classifier) across the processes",
    )
    model_parallel_dim: int = flag(  # the flag's None becomes the default in parse_config
        "--model-parallel-dim",
        type=int,
        choices=[-1, 0, 1],
        help="with --enable-model-parallel: 1 (or -1, TorchShard's last dim) splits "
        "the output classes, 0 the input features (default: 1)",
    )

    @property
    def compression(self) -> torch.dtype | None:
        """The dtype gradients travel in (None: as they are)."""
        import torch  # config stays importable without torch for --help

        return torch.float16 if self.fp16_allreduce else torch.bfloat16 if self.bf16_allreduce else None


@dataclass(frozen=True)
class RunConfig:
    """run directory and output"""

    log_dir: Path = flag(
        "--log-dir",
        type=Path,
        default=Path("./logs"),
        help="the run directory: TensorBoard events, checkpoints, status",
    )
    resume: str = flag(
        "--resume",
        default="auto",
        help="auto: continue from the newest checkpoint in --log-dir; none: start fresh; or a file",
    )
    checkpoint_format: str = flag(
        "--checkpoint-format",
        default="checkpoint-{epoch}.pth.tar",
        help="file name in the run directory; {epoch} and {step} are filled in",
    )
    checkpoint_every: int = flag(
        "--checkpoint-every",
        type=non_negative_int,
        default=0,
        help="also checkpoint every N optimizer steps (0: only at epoch ends)",
    )
    keep_checkpoints: int = flag(
        "--keep-checkpoints", type=positive_int, default=3, help="how many checkpoints to keep"
    )
    evaluate: bool = flag(
        "--evaluate",
        "-e",
        action="store_true",
        default=False,
        help="only validate: the --resume PATH checkpoint, else the newest in --log-dir (or, with "
        "--pretrained and no checkpoint, torchvision's weights); writes nothing",
    )
    seed: int = flag("--seed", type=int, default=42, help="seed of the weights, the data order and the augmentation")
    max_nonfinite_steps: int = flag(
        "--max-nonfinite-steps",
        type=non_negative_int,
        default=0,
        metavar="N",
        help="stop the run (status 'failed', exit 3) once more than N optimizer steps had "
        "an inf or NaN loss; steps that loss scaling skipped do not count",
    )
    print_freq: int = flag(
        "--print-freq", "-p", type=positive_int, default=10, help="optimizer steps between log updates"
    )
    config: str | None = flag(
        "--config",
        metavar="FILE.yaml",
        help="flags from a YAML file (flag names to values; the command line's flags win), e.g. a run's args.yaml",
    )
    print_config: bool = flag(
        "--print-config", action="store_true", default=False, help="print the resolved configuration as YAML and exit"
    )
    progress: str = flag(
        "--progress",
        choices=["auto", "bar", "lines"],
        default="auto",
        help="console progress: a bar on a terminal, lines in a batch log",
    )
    entry: str = derived("the entry script: folder (pytorch_imagenet_resnet.py) or dali (..._dali.py)")


@dataclass(frozen=True)
class ValidationConfig:
    """validation"""

    model_ema: float = flag(
        "--model-ema",
        type=non_negative_float,
        default=0.0,
        metavar="DECAY",
        help="keep an exponential moving average of the weights, validated beside them (val_ema/*); DECAY per 256 "
        "training images, so its horizon in images does not change with the global batch (0: off)",
    )
    model_ema_steps: int = flag(
        "--model-ema-steps",
        type=positive_int,
        default=1,
        metavar="K",
        help="update the average every K optimizer steps (its decay then counts K steps' images)",
    )
    evaluate_ema: bool = flag(
        "--evaluate-ema", action="store_true", default=False, help="with --evaluate: the checkpoint's average"
    )
    eval_every: int = flag(
        "--eval-every", type=positive_int, default=1, metavar="N", help="validate every N epochs, and after the last"
    )
    target_top1: float | None = flag(
        "--target-top1",
        type=positive_float,
        metavar="X",
        help="end the run, with a checkpoint, at the first validation with top-1 of X%% or more (time to accuracy)",
    )


@dataclass(frozen=True)
class ProfileConfig:
    """profiling"""

    prof: int = flag(
        "--prof",
        type=non_negative_int,
        default=0,
        metavar="N",
        help="profile N steps after a warm-up with torch.profiler, then stop",
    )
    timeline: bool = flag(
        "--timeline", kind=SWITCH, default=False, help="with --prof: also write Horovod's timeline of the collectives"
    )


@dataclass(frozen=True)
class Config:
    """The parsed command line, one sub-config per concern."""

    data: DataConfig
    dali: DaliConfig | None
    model: ModelConfig
    norm: NormConfig
    optim: OptimConfig
    schedule: ScheduleConfig
    numerics: NumericsConfig
    dist: DistConfig
    run: RunConfig
    validation: ValidationConfig
    profile: ProfileConfig

    def lr(self, world_size: int) -> float:
        return self.schedule.lr(world_size)

    def to_dict(self) -> dict:
        """Every flag's value (and the saved derived ones), flat and in plain types only, so
        checkpoints load with torch.load(weights_only=True)."""
        out = {}
        for group in _groups(self):
            for f in dataclasses.fields(group):
                if f.metadata.get("saved", True):
                    v = getattr(group, f.name)
                    out[f.name] = str(v) if isinstance(v, Path) else (list(v) if isinstance(v, tuple) else v)
        return out


GROUPS: dict[str, type] = {
    "data": DataConfig,
    "dali": DaliConfig,
    "model": ModelConfig,
    "norm": NormConfig,
    "optim": OptimConfig,
    "schedule": ScheduleConfig,
    "numerics": NumericsConfig,
    "dist": DistConfig,
    "run": RunConfig,
    "validation": ValidationConfig,
    "profile": ProfileConfig,
}


def _groups(cfg: Config) -> list:
    return [g for g in (getattr(cfg, name) for name in GROUPS) if g is not None]


def _check_declarations() -> None:
    """Every field of every group is a flag or derived, and no two declare one name."""
    seen: set[str] = set()
    for cls in GROUPS.values():
        for f in dataclasses.fields(cls):
            if "names" not in f.metadata and "derived" not in f.metadata:
                raise TypeError(f"config.{cls.__name__}.{f.name} is neither a flag(...) nor derived(...)")
            if f.name in seen:
                raise TypeError(f"config: {f.name} is declared twice")
            seen.add(f.name)


_check_declarations()


# --- the parser ------------------------------------------------------------------------------------


class _HelpFormatter(argparse.HelpFormatter):
    """Each flag's help line with its default once: added where the help does not already
    say it, and not for flags without a value to show (None, False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            default is None
            or default is False
            or default == argparse.SUPPRESS
            or "default" in text
            or action.option_strings == []
            or isinstance(action, argparse._StoreTrueAction)
        ):
            return text
        shown = ",".join(f"{x:g}" for x in default) if isinstance(default, tuple) else default
        return f"{text} (default: {shown})"


def build_parser(entry: str) -> argparse.ArgumentParser:
    # allow_abbrev=False: with abbreviations, the LARS trainer's --lr-decay 30 60 80 was taken
    # as our --lr-decay-epochs (one value) and failed; every short spelling is an explicit alias.
    p = Parser(
        prog=f"pytorch_imagenet_resnet{'_dali' if entry == 'dali' else ''}.py",
        description="Large-batch data-parallel ImageNet training with Horovod or torch.distributed.",
        formatter_class=_HelpFormatter,
        allow_abbrev=False,
    )
    for name, cls in GROUPS.items():
        if name == "dali" and entry != "dali":
            continue
        assert cls.__doc__ is not None  # every group's docstring starts with its --help title
        group = p.add_argument_group(cls.__doc__.split(" (")[0])
        for f in dataclasses.fields(cls):
            meta = f.metadata
            if "names" in meta and meta["entry"] in (None, entry):
                _add(group, f.name, meta)
    # torch.distributed.launch passes this; the engine reads LOCAL_RANK from the environment.
    p.add_argument(
        "--local-rank", "--local_rank", dest="ignored_local_rank", type=int, default=None, help=argparse.SUPPRESS
    )
    legacy_flags.add_arguments(p, entry)
    return p


def _add(group, dest: str, meta) -> None:
    names, kwargs = meta["names"], {"dest": dest, "default": meta["default"], "help": meta["help"], **meta["argparse"]}
    if meta["kind"] == SWITCH:
        group.add_argument(*names, action=argparse.BooleanOptionalAction, **kwargs)
    elif meta["kind"] == VALUE_BOOL:
        group.add_argument(*names, nargs="?", const=True, type=_bool_word, metavar="True|False", **kwargs)
        group.add_argument(
            "--no-" + names[0][2:], dest=dest, action="store_false", default=meta["default"], help=argparse.SUPPRESS
        )
    else:
        group.add_argument(*names, **kwargs)


def _given(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The destinations this command line sets explicitly: parsed again with every default
    suppressed (legacy_flags.apply lets explicit flags win over a recipe)."""
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def parse_config(argv: list[str] | None, entry: str = "folder") -> Config:
    """Parse and validate; raises UsageError with a one-line message."""
    if entry not in ENTRIES:
        raise ValueError(f"entry must be one of {ENTRIES}, not {entry!r}")
    argv = sys.argv[1:] if argv is None else list(argv)
    config_path, argv = config_file.split_config(argv)
    parser = build_parser(entry)
    if config_path is not None:
        from_file = config_file.to_arguments(config_path, config_file.load(config_path), parser)
        try:
            parser.parse_args(from_file)  # the file's values alone first: a bad one names the file
        except UsageError as e:
            raise UsageError(f"--config {config_path}: {e}") from None
        argv = from_file + argv
    values = vars(parser.parse_args(argv))
    values["config"] = str(config_path) if config_path is not None else None
    legacy_flags.apply(values, _given(parser, argv), entry)
    values.pop("ignored_local_rank")
    if values["lr_power"] is None:
        values["lr_power"] = 2.0 if values["base_op"] == "lars" else 1.0
    if values["val_resize"] is None:
        values["val_resize"] = max(values["image_size"], round(values["image_size"] / 0.875))
    if values["model_parallel_dim"] is not None and not values["enable_model_parallel"]:
        raise UsageError("--model-parallel-dim applies only with --enable-model-parallel")
    if values["model_parallel_dim"] is None:
        values["model_parallel_dim"] = 1
    from .precision import resolve_policy  # torch: only once the flags have parsed

    try:
        values["policy"] = resolve_policy(
            values["precision"], values["opt_level"], values["keep_batchnorm_fp32"], values["loss_scale"]
        )
    except ValueError as e:
        raise UsageError(str(e)) from None
    values["entry"] = entry
    cfg = _build(values, entry)
    _validate(cfg)
    return cfg


def _build(values: dict, entry: str) -> Config:
    """The sub-configs from the parsed values; a value no field takes is a bug here."""
    groups: dict[str, Any] = {}
    for name, cls in GROUPS.items():
        fields = dataclasses.fields(cls)
        if name == "dali" and entry != "dali":
            groups[name] = None
            for f in fields:
                values.pop(f.name, None)
            continue
        groups[name] = cls(**{f.name: values.pop(f.name, f.metadata.get("default")) for f in fields})
    if values:
        raise TypeError(f"config: parsed values no field takes: {sorted(values)}")
    return Config(**groups)


def _validate(cfg: Config) -> None:
    data, schedule, run = cfg.data, cfg.schedule, cfg.run
    if not data.synthetic:
        if cfg.dali is not None:
            if cfg.dali.data_dir is None:
                raise UsageError("--data-dir is required (or --synthetic)")
        elif data.train_dir is None or data.val_dir is None:
            raise UsageError("--train-dir and --val-dir are required (or --synthetic)")
    if data.synthetic and (data.train_dir or data.val_dir or (cfg.dali and cfg.dali.data_dir)):
        raise UsageError("--synthetic trains on random tensors: drop --train-dir/--val-dir/--data-dir")
    if data.crop_scale[1] > 1:
        raise UsageError(f"--crop-scale upper bound must be at most 1, got {data.crop_scale[1]:g}")
    if data.image_size < MIN_IMAGE_SIZE:
        raise UsageError(
            f"--image-size {data.image_size} is below {MIN_IMAGE_SIZE}: too small to hold an image's "
            f"shape (a ResNet's stem divides it by 4), the run would train to chance"
        )
    if data.val_resize < data.image_size:
        raise UsageError(f"--val-resize {data.val_resize} is smaller than --image-size {data.image_size}")
    if schedule.warmup_epochs >= schedule.epochs and schedule.lr_schedule != "step":
        raise UsageError(f"--warmup-epochs {schedule.warmup_epochs:g} must be less than --epochs {schedule.epochs}")
    if schedule.lr_schedule == "poly" and schedule.end_lr > schedule.base_lr:
        raise UsageError(f"--end-lr {schedule.end_lr:g} is above --base-lr {schedule.base_lr:g}")
    if cfg.dist.fp16_allreduce and cfg.dist.bf16_allreduce:
        raise UsageError("--fp16-allreduce and --bf16-allreduce cannot be combined: pick one")
    if cfg.dist.use_adasum and cfg.dist.gradient_predivide_factor != 1.0:
        raise UsageError("--gradient-predivide-factor cannot be combined with --use-adasum")
    _validate_large_batch(cfg)
    if cfg.optim.momentum >= 1:
        raise UsageError(f"--momentum must be below 1, got {cfg.optim.momentum:g}")
    if cfg.model.label_smoothing >= 1:
        raise UsageError(f"--label-smoothing must be below 1, got {cfg.model.label_smoothing:g}")
    name = run.checkpoint_format.removeprefix("./")
    if "{epoch" not in name or "/" in name or "\\" in name or name.startswith("."):
        raise UsageError(
            f"--checkpoint-format {run.checkpoint_format!r}: must be a file name in the run "
            f"directory containing {{epoch}}, without a path or a leading dot, e.g. checkpoint-{{epoch}}.pth.tar"
        )
    try:
        run.checkpoint_format.format(epoch=0, step=0)
    except (KeyError, IndexError, ValueError) as e:
        raise UsageError(f"--checkpoint-format {run.checkpoint_format!r} is not a valid template ({e})") from None
    if run.resume not in ("auto", "none") and not Path(run.resume).is_file():
        raise UsageError(f"--resume {run.resume}: no such checkpoint file")
    if cfg.profile.timeline and not cfg.profile.prof:
        raise UsageError("--timeline goes with --prof N")
    if cfg.dist.enable_model_parallel:
        if cfg.dist.use_adasum:
            raise UsageError(
                "--use-adasum cannot be combined with --enable-model-parallel "
                "(the sharded classifier needs the backbone's gradients averaged)"
            )
        if cfg.numerics.policy.loss_scale is not None:
            raise UsageError(
                f"--enable-model-parallel does not support loss scaling ({cfg.numerics.policy.name}): "
                f"the ranks would have to agree on overflows in their classifier slices; "
                f"use fp32, amp-bf16 or bf16"
            )
    _validate_model_name(cfg.model.model)


def _validate_large_batch(cfg: Config) -> None:
    norm, optim = cfg.norm, cfg.optim
    if norm.zero_init_residual and cfg.model.pretrained:
        raise UsageError("--zero-init-residual starts from fresh weights: drop it or --pretrained")
    if norm.zero_init_residual and optim.base_op in ("lars", "lamb") and not optim.bn_bias_separately:
        # A zero weight gets LARS's fallback trust ratio of 1: a raw step at the base rate, a
        # thousand times its siblings' (eta 0.001). Apart, it steps as every normalisation weight.
        raise UsageError(
            f"--zero-init-residual with --base-op {optim.base_op} needs --bn-bias-separately: a zero-initialised "
            f"weight gets a trust ratio of 1, a raw step at the base rate"
        )
    if norm.ghost_bn:
        if norm.ghost_bn >= cfg.schedule.batch_size:
            raise UsageError(
                f"--ghost-bn {norm.ghost_bn} is not below --batch-size {cfg.schedule.batch_size}: it would change "
                f"nothing (ghost batches are cut from each micro-batch)"
            )
        if norm.ghost_bn < 2:
            raise UsageError("--ghost-bn G needs G of 2 or more: batch norm cannot normalise one image")
        if norm.sync_bn:
            raise UsageError("--ghost-bn and --sync-bn pull opposite ways (smaller and larger batches): pick one")
    if optim.nesterov:
        if optim.base_op == "lamb":
            raise UsageError("--nesterov: LAMB has no momentum buffer to look ahead with (its moments are Adam's)")
        if optim.momentum == 0:
            raise UsageError("--nesterov needs a --momentum above 0")
    if not cfg.validation.model_ema < 1:
        raise UsageError(f"--model-ema {cfg.validation.model_ema:g} must be below 1 (a decay; 0: off)")
    if cfg.validation.evaluate_ema and not cfg.run.evaluate:
        raise UsageError("--evaluate-ema goes with --evaluate")
    target = cfg.validation.target_top1
    if target is not None and target > 100:
        raise UsageError(f"--target-top1 {target:g} is a top-1 accuracy in percent: at most 100")


def _validate_model_name(name: str) -> None:
    import torchvision.models

    from .small_resnet import NAMES as SMALL_RESNETS

    names = torchvision.models.list_models(module=torchvision.models) + list(SMALL_RESNETS)
    if name not in names:
        close = [n for n in names if n.startswith(name[:4])][:6]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UsageError(f"--model {name!r} is not a torchvision classification model or a cifar_resnet{hint}")
