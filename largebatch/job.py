"""Build everything a run needs from its Config, then hand it to the training loop.

The order matters and is the one place where it is spelled out: distribution, device,
run directory, data, model, optimizer (wrapped by Horovod), schedule, then either the
checkpoint's state or rank 0's fresh weights, then the loop.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

import lars
import schedulers

from . import checkpoint
from .config import Config, UsageError
from .dist import Dist
from .logs import Board, Console
from .model import build_model
from .parallel import (LockstepInput, ParallelCrossEntropyLoss, broadcast_checkpoint, convert_parallel_linear,
                       dense_state, share_norms, sharded_parameter_names)
from .precision import Precision
from .profiling import StepProfiler
from .stop import StopRequest
from .train import Position, train


def run(cfg: Config, entry: str, stop: StopRequest | None = None) -> int:
    stop = stop or StopRequest()
    dist = Dist.init(timeline=cfg.timeline)
    device = pick_device(cfg, dist)
    prepare_run_dir(cfg.log_dir, dist)
    data = build_input(cfg, entry, dist, device)
    if cfg.enable_model_parallel:  # the sharded classifier is a collective: no rank may skip a batch
        data = LockstepInput(data, dist, cfg.image_size, device)
    console = Console(dist.is_main, cfg.progress)
    console.config({**cfg.to_dict(), "num_classes": data.num_classes, "lr (scaled)": cfg.lr(dist.size)},
                   world=f"{dist.size} process(es), device {device}, global batch "
                         f"{cfg.batch_size * cfg.batches_per_allreduce * dist.size}")

    configure_determinism(cfg.deterministic, cfg.seed + dist.rank)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank, before the broadcast
    model = build_model(cfg.model, data.num_classes)
    if cfg.enable_model_parallel:  # before .to(device): the dense layer never reaches the GPU
        convert_parallel_linear(model, cfg.model_parallel_dim, dist)
    if cfg.sync_bn:
        model = dist.sync_batchnorm(model)
    precision = Precision(device, cfg.precision_policy(), cfg.channels_last)
    model = precision.prepare(model.to(device))
    optimizer = dist.distributed_optimizer(
        build_optimizer(cfg, model, cfg.lr(dist.size)), model,
        backward_passes_per_step=cfg.batches_per_allreduce, fp16_allreduce=cfg.fp16_allreduce,
        adasum=cfg.use_adasum, predivide=cfg.gradient_predivide_factor, exclude=sharded_parameter_names(model))
    share_norms(optimizer, model, dist)
    steps_per_epoch = data.batches_per_epoch // cfg.batches_per_allreduce
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch)

    start = restore(cfg, dist, model, optimizer, scheduler, precision)
    torch.manual_seed(cfg.seed + dist.rank)  # ranks differ from here on (dropout, say)
    if start.epoch >= cfg.epochs:
        console.print(f"{cfg.log_dir} already finished its {cfg.epochs} epochs; nothing to do "
                      f"(a new run needs a new --log-dir)")
        return 0

    board = Board(cfg.log_dir, dist.is_main, purge_step=start.step + 1 if start.step else None)

    def save(pos: Position, epoch_end: bool) -> None:
        # Collectives, every rank: what differs by rank and an exact resume needs (the RNG,
        # and batch norm's running statistics between epoch-end averagings).
        rng = dist.allgather_object(torch.get_rng_state(), name="rng")
        buffers = dist.allgather_object({k: v.cpu() for k, v in model.named_buffers() if v.is_floating_point()},
                                        name="buffers")
        model_state, optimizer_state = dense_state(model, optimizer, dist)  # collective when sharded
        if dist.is_main:
            state = {"model": model_state, "optimizer": optimizer_state,
                     "scheduler": scheduler.state_dict(), "scaler": precision.state_dict(),
                     "epoch": pos.epoch, "step": pos.step, "epoch_step": pos.epoch_step, "rng": rng,
                     "rank_buffers": buffers,
                     "world_size": dist.size, "args": cfg.to_dict(), "version": checkpoint.VERSION}
            path = checkpoints(cfg).save(state, epoch_end)
            write_status(cfg.log_dir, "running", pos, path)
            board.flush()

    profiler = StepProfiler(cfg.prof, cfg.log_dir / "profile", dist.rank, device, dist, cfg.timeline)
    result, pos = train(cfg, dist, data, model, build_criterion(cfg, data.num_classes, dist),
                        optimizer, scheduler, precision, save, console, board, stop, profiler, start)
    if result == "profiled":
        console.print(f"profiled {cfg.prof} steps; trace: {', '.join(map(str, profiler.trace_files()))}")
    if dist.is_main:
        latest = checkpoints(cfg).latest()
        write_status(cfg.log_dir, result, pos, latest)
        console.print(f"{result}: run directory {cfg.log_dir} (TensorBoard: tensorboard --logdir {cfg.log_dir})")
    board.close()
    if data.bad_files:
        print(f"warning: rank {dist.rank} skipped {len(data.bad_files)} unreadable image(s)", flush=True)
    return 0


def pick_device(cfg: Config, dist: Dist) -> torch.device:
    if cfg.no_cuda or not torch.cuda.is_available():
        policy = cfg.precision_policy()
        if policy.needs_gpu:
            why = "--no-cuda was given" if cfg.no_cuda else "no CUDA GPU is visible"
            raise UsageError(f"{policy.name} computes in fp16, which needs a GPU, but {why}; "
                             f"on CPU use --precision amp-bf16 or bf16")
        if cfg.sync_bn:
            raise UsageError("--sync-bn needs GPUs (Horovod's SyncBatchNorm runs on CUDA tensors only)")
        return torch.device("cpu")
    torch.cuda.set_device(dist.local_rank % torch.cuda.device_count())
    return torch.device("cuda", torch.cuda.current_device())


def configure_determinism(deterministic: bool, seed: int) -> None:
    """--deterministic trades speed for runs that repeat bit for bit; otherwise let cuDNN
    pick the fastest kernels."""
    import random

    import numpy

    random.seed(seed)
    numpy.random.seed(seed % 2**32)
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # required by deterministic cuBLAS
        torch.use_deterministic_algorithms(True)


def prepare_run_dir(log_dir: Path, dist: Dist) -> None:
    """Create the run directory and prove it writable, on rank 0, and tell every rank."""
    problem = ""
    if dist.is_main:
        try:
            log_dir.mkdir(parents=True, exist_ok=True)
            probe = log_dir / f".write-test-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            problem = f"--log-dir {log_dir} is not writable ({e.strerror or e})"
    problem = dist.broadcast_object(problem, name="run_dir_check")
    if problem:
        raise UsageError(problem)


def build_input(cfg: Config, entry: str, dist: Dist, device: torch.device):
    """Every rank opens the data; a problem found by any rank stops all of them."""
    problem, data = "", None
    try:
        if cfg.synthetic:
            from .data.synthetic import SyntheticInput
            data = SyntheticInput(cfg, dist.rank, dist.size, device)
        elif entry == "dali":
            from .data.dali import DaliInput
            data = DaliInput(cfg, dist.rank, dist.size, device)
        else:
            from .data.folder import FolderInput
            data = FolderInput(cfg, dist.rank, dist.size, device)
    except UsageError as e:
        problem = str(e)
    problems = [p for p in dist.allgather_object(problem, name="data_check") if p]
    if problems:
        raise UsageError(problems[0])
    if data.batches_per_epoch < cfg.batches_per_allreduce:
        raise UsageError(f"--batch-size {cfg.batch_size} x --batches-per-allreduce {cfg.batches_per_allreduce} "
                         f"x {dist.size} processes is more than one epoch of data")
    return data


def build_optimizer(cfg: Config, model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    if cfg.base_op == "lars":
        return lars.create_optimizer_lars(model, lr=lr, momentum=cfg.momentum, weight_decay=cfg.wd,
                                          bn_bias_separately=cfg.bn_bias_separately, epsilon=cfg.epsilon,
                                          eta=cfg.lars_eta, trust_clip=cfg.trust_clip)
    if cfg.base_op == "lamb":
        return lars.create_optimizer_lamb(model, lr=lr, weight_decay=cfg.wd, bn_bias_separately=cfg.bn_bias_separately,
                                          epsilon=cfg.epsilon, trust_clip=cfg.trust_clip)
    if cfg.bn_bias_separately:
        decay = [p for p in model.parameters() if p.ndim > 1]
        no_decay = [p for p in model.parameters() if p.ndim <= 1]
        groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
    else:
        groups = [{"params": list(model.parameters())}]
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.wd)


def build_criterion(cfg: Config, num_classes: int, dist: Dist) -> torch.nn.Module:
    if cfg.enable_model_parallel:
        return ParallelCrossEntropyLoss(num_classes, dist, label_smoothing=cfg.label_smoothing)
    return torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)


def build_scheduler(cfg: Config, optimizer, steps_per_epoch: int):
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    total = cfg.epochs * steps_per_epoch
    if cfg.lr_schedule == "poly":
        return schedulers.PolynomialWarmup(optimizer, decay_steps=total, warmup_steps=warmup,
                                           end_lr=cfg.end_lr, power=cfg.lr_power)
    if cfg.lr_schedule == "cosine":
        return schedulers.CosineWarmup(optimizer, decay_steps=total, warmup_steps=warmup, end_lr=cfg.end_lr)
    milestones = [math.ceil(e * steps_per_epoch) for e in cfg.lr_decay_epochs]
    return schedulers.MultiStepWarmup(optimizer, milestones=milestones, gamma=0.1, warmup_steps=warmup)


def checkpoints(cfg: Config) -> checkpoint.Checkpoints:
    return checkpoint.Checkpoints(cfg.log_dir, cfg.checkpoint_format, cfg.keep_checkpoints)


def restore(cfg, dist, model, optimizer, scheduler, precision) -> Position:
    """Rank 0 finds and reads the checkpoint and sends it to every rank; with none, every
    rank takes rank 0's initial weights. Returns where training resumes."""
    state, problem = None, ""
    if dist.is_main:
        try:
            state = find_checkpoint(cfg)
        except UsageError as e:
            problem = str(e)
    problem = dist.broadcast_object(problem, name="resume_check")
    if problem:
        raise UsageError(problem)
    state = broadcast_checkpoint(state, model, optimizer, dist)  # each rank: its slice of a sharded layer
    if state is None:
        dist.broadcast_model(model, exclude=sharded_parameter_names(model))
        return Position()
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    precision.load_state_dict(state.get("scaler"))
    if state.get("world_size") == dist.size and state.get("rng"):
        torch.set_rng_state(state["rng"][dist.rank])
        own = dict(model.named_buffers())
        for name, value in state.get("rank_buffers", [{}] * dist.size)[dist.rank].items():
            own[name].copy_(value)
    return Position(state["epoch"], state["step"], state.get("epoch_step", 0))


def find_checkpoint(cfg: Config) -> dict | None:
    store = checkpoints(cfg)
    if cfg.resume == "none":
        if store.latest() is not None:
            raise UsageError(f"--log-dir {cfg.log_dir} already holds checkpoints ({store.latest().name}); "
                             f"use --resume auto to continue that run, or a new --log-dir")
        return None
    path = store.latest() if cfg.resume == "auto" else Path(cfg.resume)
    if path is None:
        return None
    state = checkpoint.load(path)
    checkpoint.check_same_run(state, cfg, path)
    print(f"resuming from {path} (epoch {state['epoch']}, step {state['step']})", flush=True)
    return state


def write_status(log_dir: Path, state: str, pos: Position, latest: Path | None) -> None:
    """status.json tells job scripts whether to requeue: 'finished' ends a chain."""
    status = {"state": state, "epoch": pos.epoch, "step": pos.step, "checkpoint": str(latest) if latest else None}
    tmp = log_dir / ".status.json.tmp"
    tmp.write_text(json.dumps(status) + "\n")
    os.replace(tmp, log_dir / "status.json")
