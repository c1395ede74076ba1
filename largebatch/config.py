"""Command-line flags, parsed once into a typed, validated ``Config``.

Flag names and defaults follow the original Horovod + LARS ImageNet trainer so that its users'
command lines keep working and mean the same training; the other older projects' spellings
(Apex's ImageNet examples, TorchShard) are mapped onto these flags by seeds.py. Everything that can be checked without touching data or starting
Horovod is checked here, so a bad flag fails in every rank at once, before any work.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from . import seeds
from .argparsing import Parser, UsageError


# The smallest --image-size. A ResNet's stem (a stride-2 convolution, then a stride-2
# pooling) divides the size by 4: from 4 pixels down it leaves one pixel per channel, so
# nothing of an image's shape reaches the residual stages, and the run trains, without any
# complaint, to chance. 8 leaves 2x2 and is where images still hold shapes (scikit-learn's
# digits are 8x8). Models that need more (most non-ResNets below 32, ViTs at anything but
# their own size) are refused at start by model.check_input, which tries the size.
MIN_IMAGE_SIZE = 8


@dataclass(frozen=True)
class DataConfig:
    train_dir: Path | None
    val_dir: Path | None
    synthetic: bool
    synthetic_size: int
    num_classes: int | None
    image_size: int
    val_resize: int
    crop_scale: tuple[float, float]
    crop_ratio: tuple[float, float]
    workers: int


@dataclass(frozen=True)
class DaliConfig:
    """Only for pytorch_imagenet_resnet_dali.py; ``Config.dali`` is None for the other entry."""
    data_dir: Path | None
    data_format: str
    dali_device: str
    dali_threads: int
    dali_prefetch: int
    label_offset: str


@dataclass(frozen=True)
class OptimConfig:
    model: str
    batch_size: int
    val_batch_size: int
    batches_per_allreduce: int
    epochs: int
    base_lr: float
    lr_scaling: str
    lr_schedule: str
    lr_power: float
    end_lr: float
    lr_decay_epochs: tuple[float, ...]
    warmup_epochs: float
    momentum: float
    wd: float
    epsilon: float
    lars_eta: float
    trust_clip: float | None
    label_smoothing: float
    base_op: str
    pretrained: bool
    bn_bias_separately: bool
    max_nonfinite_steps: int

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
    precision: str | None
    opt_level: str | None
    keep_batchnorm_fp32: bool | None
    loss_scale: str | None
    channels_last: bool
    sync_bn: bool
    deterministic: bool
    prof: int
    timeline: bool
    compile: str | None  # torch.compile mode of the forward pass (None: eager)
    threads: int | None  # intra-op CPU threads per process (None: OMP_NUM_THREADS, else PyTorch's default)
    policy: object  # precision.Policy, resolved once from the four flags above (precision.py)


@dataclass(frozen=True)
class DistConfig:
    engine: str
    fp16_allreduce: bool
    bf16_allreduce: bool
    use_adasum: bool
    gradient_predivide_factor: float
    no_cuda: bool
    seed: int
    enable_model_parallel: bool
    model_parallel_dim: int

    @property
    def compression(self):
        """The dtype gradients travel in (None: as they are)."""
        import torch  # config stays importable without torch for --help

        return torch.float16 if self.fp16_allreduce else torch.bfloat16 if self.bf16_allreduce else None


@dataclass(frozen=True)
class OutputConfig:
    log_dir: Path
    checkpoint_format: str
    checkpoint_every: int
    keep_checkpoints: int
    resume: str
    print_freq: int
    progress: str
    evaluate: bool


@dataclass(frozen=True)
class Config:
    """The parsed command line, one sub-config per group of flags."""
    data: DataConfig
    dali: DaliConfig | None
    optim: OptimConfig
    numerics: NumericsConfig
    dist: DistConfig
    output: OutputConfig

    def lr(self, world_size: int) -> float:
        return self.optim.lr(world_size)

    def to_dict(self) -> dict:
        """Every flag's value, flat and in plain types only, so checkpoints load with
        torch.load(weights_only=True)."""
        out = {}
        for group in (self.data, self.dali, self.optim, self.numerics, self.dist, self.output):
            for f in dataclasses.fields(group) if group is not None else ():
                v = getattr(group, f.name)
                if f.name != "policy":
                    out[f.name] = str(v) if isinstance(v, Path) else (list(v) if isinstance(v, tuple) else v)
        return out


GROUPS = {"data": DataConfig, "dali": DaliConfig, "optim": OptimConfig, "numerics": NumericsConfig,
          "dist": DistConfig, "output": OutputConfig}


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = _non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


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


def build_parser(entry: str) -> argparse.ArgumentParser:
    # allow_abbrev=False: with abbreviations, the LARS trainer's --lr-decay 30 60 80 was taken
    # as our --lr-decay-epochs (one value) and failed; every short spelling is an explicit alias.
    p = Parser(prog=f"pytorch_imagenet_resnet{'_dali' if entry == 'dali' else ''}.py",
                description="Large-batch data-parallel ImageNet training with Horovod or torch.distributed.",
                formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    bool_flag = argparse.BooleanOptionalAction

    d = p.add_argument_group("data")
    if entry == "dali":
        d.add_argument("--data-dir", type=Path, help="TFRecord layout: train/, validation/, idx_files/ "
                       "(or an image folder tree with --data-format folder)")
        d.add_argument("--data-format", choices=["tfrecord", "folder"], default="tfrecord")
        d.add_argument("--dali-device", choices=["gpu", "cpu"], default="gpu",
                       help="gpu: decode and augment on the GPU; cpu: the whole pipeline on CPU")
        d.add_argument("--dali-threads", type=_non_negative_int, default=0,
                       help="DALI CPU threads per rank (0: this rank's share of the node's cores, at most 8)")
        d.add_argument("--dali-prefetch", type=_positive_int, default=2, help="DALI prefetch queue depth")
        d.add_argument("--label-offset", choices=["auto", "0", "1"], default="auto",
                       help="subtract this from TFRecord labels; auto: 1 when labels start at 1")
    else:
        d.add_argument("--train-dir", type=Path, help="training images, one folder per class")
        d.add_argument("--val-dir", type=Path, help="validation images, the same class folders")
    d.add_argument("--synthetic", action="store_true", help="random tensors instead of a data set")
    d.add_argument("--synthetic-size", type=_positive_int, default=1024,
                   help="samples per epoch with --synthetic (validation: a quarter of it)")
    d.add_argument("--num-classes", type=_positive_int, default=None,
                   help="default: the number of class folders (1000 with --synthetic)")
    d.add_argument("--image-size", type=_positive_int, default=224,
                   help=f"training crop size, at least {MIN_IMAGE_SIZE} (a ResNet's stem divides it by 4); a size the "
                        f"--model cannot take is refused at start")
    d.add_argument("--val-resize", type=_positive_int, default=None,
                   help="validation: resize the shorter side to this, then centre-crop "
                        "--image-size (default: image-size / 0.875)")
    d.add_argument("--crop-scale", type=_pair, default=(0.08, 1.0),
                   help="training crop area, as fractions of the image (random resized crop)")
    d.add_argument("--crop-ratio", type=_pair, default=(3 / 4, 4 / 3), help="training crop aspect ratios")
    d.add_argument("--workers", "-j", type=_non_negative_int, default=4, help="data loader processes per rank")

    o = p.add_argument_group("model and optimisation")
    o.add_argument("--model", "-a", "--arch", default="resnet50",
                   help="any torchvision classification model, or cifar_resnet8/14/20/32/44/56/110 (He et al.'s "
                        "ResNets for small images)")
    o.add_argument("--pretrained", action="store_true",
                   help="start from torchvision's trained weights (from the torch hub cache; the classifier "
                        "stays fresh when --num-classes differs)")
    o.add_argument("--batch-size", "-b", "--b", type=_positive_int, default=32, help="training batch per process per micro-batch")
    o.add_argument("--val-batch-size", type=_positive_int, default=32)
    o.add_argument("--batches-per-allreduce", type=_positive_int, default=1,
                   help="micro-batches accumulated per optimizer step")
    o.add_argument("--epochs", type=_positive_int, default=90)
    o.add_argument("--base-lr", type=_positive_float, default=0.0125)
    o.add_argument("--lr-scaling", choices=["keep", "linear", "sqrt"], default="keep",
                   help="scale --base-lr by processes x batches-per-allreduce (linear) or its square root")
    o.add_argument("--lr-schedule", choices=["poly", "cosine", "step"], default="poly")
    o.add_argument("--lr-power", type=_positive_float, default=None,
                   help="poly schedule exponent (default: 2 with --base-op lars, else 1, as in the original trainer)")
    o.add_argument("--end-lr", type=_non_negative_float, default=0.0)
    o.add_argument("--lr-decay-epochs", type=_epochs_list, default=(30.0, 60.0, 80.0),
                   help="step schedule: epochs at which the rate drops 10x")
    o.add_argument("--warmup-epochs", type=_non_negative_float, default=5.0)
    o.add_argument("--momentum", type=_non_negative_float, default=0.9)
    o.add_argument("--wd", "--weight-decay", type=_non_negative_float, default=5e-5, help="weight decay")
    o.add_argument("--epsilon", type=_non_negative_float, default=1e-5, help="LARS/LAMB epsilon")
    o.add_argument("--lars-eta", type=_positive_float, default=0.001, help="LARS trust coefficient")
    o.add_argument("--trust-clip", type=_positive_float, default=None, help="cap on the LARS/LAMB trust ratio")
    # The original trainer's defaults: label smoothing 0.1, SGD, weight decay on every parameter.
    o.add_argument("--label-smoothing", type=_non_negative_float, default=0.1)
    o.add_argument("--base-op", choices=["sgd", "lars", "lamb"], default="sgd")
    o.add_argument("--bn-bias-separately", action=bool_flag, default=False,
                   help="no weight decay and no trust ratio for normalisation weights and biases")
    o.add_argument("--max-nonfinite-steps", type=_non_negative_int, default=0, metavar="N",
                   help="stop the run (status 'failed', exit 3) once more than N optimizer steps had an inf or "
                        "NaN loss; steps that loss scaling skipped do not count")

    n = p.add_argument_group("numerics and performance")
    n.add_argument("--precision", choices=["fp32", "amp", "amp-bf16", "fp16", "bf16"], default=None,
                   help="fp32; amp: autocast fp16 + loss scaling; amp-bf16; fp16/bf16: the whole model "
                        "(default fp32)")
    n.add_argument("--opt-level", choices=["O0", "O1", "O2", "O3"], default=None,
                   help="Apex's levels: O0 fp32, O1 amp, O2 fp16 model + fp32 master weights, O3 pure fp16")
    # Apex writes --keep-batchnorm-fp32 True; a bare flag and --no-... work too.
    _value_bool(n, "--keep-batchnorm-fp32", None,
                "batch norm in fp32 under O2/O3/fp16/bf16 (default: on for O2, off for O3)")
    n.add_argument("--loss-scale", default=None, help="'dynamic' or a fixed number (fp16 levels only)")
    _value_bool(n, "--channels-last", False, "NHWC model and inputs")
    n.add_argument("--sync-bn", "--sync_bn", action=bool_flag, default=False, help="batch norm statistics across all ranks")
    n.add_argument("--deterministic", action=bool_flag, default=False,
                   help="deterministic algorithms: two runs with the same flags give identical checkpoints")
    n.add_argument("--prof", type=_non_negative_int, default=0, metavar="N",
                   help="profile N steps after a warm-up with torch.profiler, then stop")
    n.add_argument("--timeline", action=bool_flag, default=False,
                   help="with --prof: also write Horovod's timeline of the collectives")
    n.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                   choices=["default", "reduce-overhead", "max-autotune"],
                   help="torch.compile the model's training forward pass; MODE: default, reduce-overhead "
                        "(CUDA graphs) or max-autotune (checkpoints stay plain state dicts)")
    n.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                   help="CPU threads per process for PyTorch's operations (default: OMP_NUM_THREADS as set, "
                        "even above the core count, where PyTorch alone would cap it; else PyTorch's default)")

    h = p.add_argument_group("distribution")
    h.add_argument("--engine", choices=["auto", "horovod", "torch"], default="auto",
                   help="auto: torch under torchrun, Horovod under mpirun/horovodrun/srun where it imports, "
                        "else torch")
    h.add_argument("--fp16-allreduce", action=bool_flag, default=False, help="compress gradients to fp16 for allreduce")
    h.add_argument("--bf16-allreduce", action=bool_flag, default=False,
                   help="compress gradients to bf16 for allreduce (fp32's range, fewer digits; torch engine)")
    h.add_argument("--use-adasum", action=bool_flag, default=False, help="Adasum instead of averaging")
    h.add_argument("--gradient-predivide-factor", type=_positive_float, default=1.0,
                   help="divide gradients by this before the allreduce and by size/this after")
    # torch.distributed.launch passes this; the engine reads LOCAL_RANK from the environment.
    h.add_argument("--local-rank", "--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    h.add_argument("--no-cuda", action="store_true", help="train on CPU even where a GPU is present")
    h.add_argument("--seed", type=int, default=42)
    h.add_argument("--enable-model-parallel", action="store_true",
                   help="split the final linear layer (the classifier) across the processes")
    h.add_argument("--model-parallel-dim", type=int, choices=[-1, 0, 1], default=None,
                   help="with --enable-model-parallel: 1 (or -1, TorchShard's last dim) splits the output classes, "
                        "0 the input features (default 1)")

    r = p.add_argument_group("output")
    r.add_argument("--log-dir", type=Path, default=Path("./logs"),
                   help="the run directory: TensorBoard events, checkpoints, status")
    r.add_argument("--checkpoint-format", default="checkpoint-{epoch}.pth.tar",
                   help="file name in the run directory; {epoch} and {step} are filled in")
    r.add_argument("--checkpoint-every", type=_non_negative_int, default=0,
                   help="also checkpoint every N optimizer steps (0: only at epoch ends)")
    r.add_argument("--keep-checkpoints", type=_positive_int, default=3, help="how many checkpoints to keep")
    r.add_argument("--resume", default="auto",
                   help="auto: continue from the newest checkpoint in --log-dir; none: start fresh; or a file")
    r.add_argument("--print-freq", "-p", type=_positive_int, default=10, help="optimizer steps between log updates")
    r.add_argument("--progress", choices=["auto", "bar", "lines"], default="auto",
                   help="console progress: a bar on a terminal, lines in a batch log")
    r.add_argument("--evaluate", "-e", action="store_true",
                   help="only validate: the --resume PATH checkpoint, else the newest in --log-dir (or, with "
                        "--pretrained and no checkpoint, torchvision's weights); writes nothing")
    seeds.add_arguments(p, entry)
    return p


_BOOL_WORDS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}


def _bool_word(text: str) -> bool:
    try:
        return _BOOL_WORDS[text.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"takes True or False (or no value), got {text!r}") from None


def _value_bool(group, flag: str, default, help: str) -> None:
    """``--flag``, ``--flag True|False`` (Apex's spelling, parsed as a real boolean: Apex's
    ``type=bool`` made ``False`` true) and ``--no-flag``."""
    dest = flag.lstrip("-").replace("-", "_")
    group.add_argument(flag, dest=dest, nargs="?", const=True, type=_bool_word, default=default,
                       metavar="True|False", help=help)
    group.add_argument("--no-" + flag[2:], dest=dest, action="store_false", default=default, help=argparse.SUPPRESS)


def _given(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The destinations this command line sets explicitly: parsed again with every default
    suppressed (seeds.apply lets explicit flags win over a seed's recipe)."""
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def parse_config(argv: list[str] | None, entry: str = "folder") -> Config:
    """Parse and validate; raises UsageError with a one-line message."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(entry)
    values = vars(parser.parse_args(argv))
    seeds.apply(values, _given(parser, argv), entry)
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
        values["policy"] = resolve_policy(values["precision"], values["opt_level"], values["keep_batchnorm_fp32"],
                                          values["loss_scale"])
    except ValueError as e:
        raise UsageError(str(e)) from None
    groups = {}
    for name, cls in GROUPS.items():
        fields = [f.name for f in dataclasses.fields(cls)]
        if name == "dali" and entry != "dali":
            groups[name] = None
        else:
            groups[name] = cls(**{f: values.get(f) for f in fields})
    cfg = Config(**groups)
    _validate(cfg, entry)
    return cfg


def _validate(cfg: Config, entry: str) -> None:
    if not cfg.data.synthetic:
        if entry == "dali":
            if cfg.dali.data_dir is None:
                raise UsageError("--data-dir is required (or --synthetic)")
        elif cfg.data.train_dir is None or cfg.data.val_dir is None:
            raise UsageError("--train-dir and --val-dir are required (or --synthetic)")
    if cfg.data.synthetic and (cfg.data.train_dir or cfg.data.val_dir or (cfg.dali and cfg.dali.data_dir)):
        raise UsageError("--synthetic trains on random tensors: drop --train-dir/--val-dir/--data-dir")
    if cfg.data.crop_scale[1] > 1:
        raise UsageError(f"--crop-scale upper bound must be at most 1, got {cfg.data.crop_scale[1]:g}")
    if cfg.data.image_size < MIN_IMAGE_SIZE:
        raise UsageError(f"--image-size {cfg.data.image_size} is below {MIN_IMAGE_SIZE}: too small to hold an image's "
                         f"shape (a ResNet's stem divides it by 4), the run would train to chance")
    if cfg.data.val_resize < cfg.data.image_size:
        raise UsageError(f"--val-resize {cfg.data.val_resize} is smaller than --image-size {cfg.data.image_size}")
    if cfg.optim.warmup_epochs >= cfg.optim.epochs and cfg.optim.lr_schedule != "step":
        raise UsageError(f"--warmup-epochs {cfg.optim.warmup_epochs:g} must be less than --epochs {cfg.optim.epochs}")
    if cfg.optim.lr_schedule == "poly" and cfg.optim.end_lr > cfg.optim.base_lr:
        raise UsageError(f"--end-lr {cfg.optim.end_lr:g} is above --base-lr {cfg.optim.base_lr:g}")
    if cfg.dist.fp16_allreduce and cfg.dist.bf16_allreduce:
        raise UsageError("--fp16-allreduce and --bf16-allreduce cannot be combined: pick one")
    if cfg.dist.use_adasum and cfg.dist.gradient_predivide_factor != 1.0:
        raise UsageError("--gradient-predivide-factor cannot be combined with --use-adasum")
    if cfg.optim.momentum >= 1:
        raise UsageError(f"--momentum must be below 1, got {cfg.optim.momentum:g}")
    if cfg.optim.label_smoothing >= 1:
        raise UsageError(f"--label-smoothing must be below 1, got {cfg.optim.label_smoothing:g}")
    name = cfg.output.checkpoint_format.removeprefix("./")
    if "{epoch" not in name or "/" in name or "\\" in name or name.startswith("."):
        raise UsageError(f"--checkpoint-format {cfg.output.checkpoint_format!r}: must be a file name in the run "
                         f"directory containing {{epoch}}, without a path or a leading dot, e.g. checkpoint-{{epoch}}.pth.tar")
    try:
        cfg.output.checkpoint_format.format(epoch=0, step=0)
    except (KeyError, IndexError, ValueError) as e:
        raise UsageError(f"--checkpoint-format {cfg.output.checkpoint_format!r} is not a valid template ({e})") from None
    if cfg.output.resume not in ("auto", "none") and not Path(cfg.output.resume).is_file():
        raise UsageError(f"--resume {cfg.output.resume}: no such checkpoint file")
    if cfg.numerics.timeline and not cfg.numerics.prof:
        raise UsageError("--timeline goes with --prof N")
    if cfg.dist.enable_model_parallel:
        if cfg.dist.use_adasum:
            raise UsageError("--use-adasum cannot be combined with --enable-model-parallel "
                             "(the sharded classifier needs the backbone's gradients averaged)")
        if cfg.numerics.policy.loss_scale is not None:
            raise UsageError(f"--enable-model-parallel does not support loss scaling ({cfg.numerics.policy.name}): "
                             f"the ranks would have to agree on overflows in their classifier slices; "
                             f"use fp32, amp-bf16 or bf16")
    _validate_model_name(cfg.optim.model)


def _validate_model_name(name: str) -> None:
    import torchvision.models

    from .small_resnet import NAMES as SMALL_RESNETS

    names = torchvision.models.list_models(module=torchvision.models) + list(SMALL_RESNETS)
    if name not in names:
        close = [n for n in names if n.startswith(name[:4])][:6]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UsageError(f"--model {name!r} is not a torchvision classification model or a cifar_resnet{hint}")
