"""Build everything a run needs from its Config, then hand it to the training loop.

The order matters and is the one place where it is spelled out: the engine, the device,
the run directory, the input, the training state (model, optimizer with the engine's
gradient averaging, schedule, precision), then either the checkpoint's state or rank 0's
fresh weights, then the loop.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import torch

import lamb
import lars
import schedulers

from . import batchnorm, checkpoint, config_file
from .argparsing import UsageError
from .config import Config
from .data import Input
from .ema import model_ema
from .engines import Engine, choose, init_engine, launcher_rank
from .files import atomic_write, clean_stale_temps, create_new
from .logs import Board, Console
from .model import build_model, check_input
from .parallel import build_classifier
from .precision import Precision
from .profiling import StepProfiler
from .runlock import RunLock
from .state import Position, TrainState
from .stop import StopRequest
from .train import Hooks, evaluate, train

DIVERGED = 3  # exit status of a run stopped by non-finite losses (2: bad input, 1: other failures)
# The loop's results that fail the run (status.json "failed"), with their exit statuses.
EXIT_STATUS = {"diverged": DIVERGED, "unreadable": 2}


def run(cfg: Config, stop: StopRequest | None = None) -> int:
    stop = stop or StopRequest()
    configure_threads(cfg.numerics.threads)
    engine = start_engine(cfg)
    try:
        return run_with_engine(engine, cfg, stop)
    finally:
        engine.close()


def run_with_engine(engine: Engine, cfg: Config, stop: StopRequest) -> int:
    device = pick_device(cfg, engine)
    if cfg.run.evaluate:
        return run_evaluation(cfg, engine, device)
    lock = prepare_run_dir(cfg.run.log_dir, engine)  # held until the run ends (or the process dies)
    data = build_input(cfg, engine, device)
    console = Console(engine.is_main, cfg.run.progress)
    console.config(
        {**cfg.to_dict(), "num_classes": data.num_classes, "lr (scaled)": cfg.lr(engine.size)},
        world=f"{engine.size} process(es), {engine.name} engine, device {device}, global batch "
        f"{cfg.schedule.batch_size * cfg.schedule.batches_per_allreduce * engine.size}",
    )

    state = state_for(cfg, engine, device, data)
    data = state.classifier.input(data, cfg.data.image_size, device)
    torch.manual_seed(cfg.run.seed + engine.rank)  # ranks differ from here on (dropout, say); a resume restores it
    state.start(resume_checkpoint(cfg, engine))
    if state.reached is not None:
        console.print(
            f"{cfg.run.log_dir} reached --target-top1 at epoch {state.reached['epoch']} (top1 "
            f"{state.reached['top1']:.2f}); nothing to do (a new run needs a new --log-dir)"
        )
        return 0
    if state.position.epoch >= cfg.schedule.epochs:
        console.print(
            f"{cfg.run.log_dir} already finished its {cfg.schedule.epochs} epochs; nothing to do "
            f"(a new run needs a new --log-dir)"
        )
        return 0

    if engine.is_main:  # once the run is sure to train: a refused or finished one writes nothing
        config_file.write_args(cfg.run.log_dir, cfg.to_dict())  # --config RUN/args.yaml trains it again
    step = state.position.step
    board = Board(cfg.run.log_dir, engine.is_main, purge_step=step + 1 if step else None)
    profiler = StepProfiler(
        cfg.profile.prof,
        out_dir=cfg.run.log_dir / "profile",
        rank=engine.rank,
        device=device,
        engine=engine,
        timeline=cfg.profile.timeline,
    )
    result = train(state, data, cfg, Hooks(console, board, stop, profiler, CheckpointSaver(cfg, board)))
    if result == "profiled":
        console.print(f"profiled {cfg.profile.prof} steps; trace: {', '.join(map(str, profiler.trace_files()))}")
    if engine.is_main:
        # After a divergence, the checkpoint to go back to: the newest finite one.
        write_status(
            cfg.run.log_dir,
            "failed" if result in EXIT_STATUS else "finished" if result == "target" else result,
            state.position,
            checkpoint_store(cfg).latest(finite_only=result == "diverged"),
            reached=state.reached,
        )
        console.print(
            f"{result}: run directory {cfg.run.log_dir} (TensorBoard: tensorboard --logdir {cfg.run.log_dir})"
        )
    board.close()
    if lock is not None:
        lock.release()
    if data.bad_files:
        print(f"warning: rank {engine.rank} skipped {len(data.bad_files)} unreadable image(s)", flush=True)
    return EXIT_STATUS.get(result, 0)


def run_evaluation(cfg: Config, engine: Engine, device: torch.device) -> int:
    """--evaluate: validate one set of weights over every validation image exactly once (on
    any number of processes) and print loss, top-1 and top-5. The weights: --resume PATH, else
    the newest checkpoint in --log-dir, else (with --pretrained) torchvision's. It takes no run
    lock and writes nothing, so it may look at a run that is still training."""
    data = build_input(cfg, engine, device)
    console = Console(engine.is_main, cfg.run.progress)
    found = on_rank_0(engine, lambda: weights_to_evaluate(cfg, data.num_classes), name="evaluate_check")
    state = state_for(cfg, engine, device, data)
    # Only the weights: the optimizer and schedule of the flags given need not match the run's.
    path, ckpt = found if found else (None, None)
    weights = state.classifier.scatter_state(
        {"model": ckpt["model"], "optimizer": {"state": {}, "param_groups": []}} if ckpt else None,
        state.model,
        state.optimizer,
    )
    if weights is None:
        state.start(None)  # rank 0's (pretrained) weights on every rank
        source = f"torchvision's pretrained {cfg.model.model}"
    else:
        state.model.load_state_dict(weights["model"])
        which = "the weights' average of " if cfg.validation.evaluate_ema else ""
        named = f"{which}{path} (epoch {ckpt['epoch']}, step {ckpt['step']})" if path and ckpt else None
        source = str(engine.broadcast_object(named, name="evaluate_source"))
    val = evaluate(state, state.classifier.input(data, cfg.data.image_size, device).val())
    console.print(
        f"evaluated {source} on {engine.size} process(es): val loss {val['loss']:.4f} "
        f"top1 {val['top1']:.2f} top5 {val['top5']:.2f} ({val['count']} images)"
    )
    return 0


def weights_to_evaluate(cfg: Config, num_classes: int) -> tuple[Path, dict] | None:
    """Rank 0: the checkpoint --evaluate validates, or None for --pretrained weights."""
    found: tuple[Path, dict] | None
    if cfg.run.resume not in ("auto", "none"):
        path = Path(cfg.run.resume)
        found = path, checkpoint.load(path)
    else:
        found = (
            checkpoint_store(cfg, read_only=True).load_newest(finite_only=True)
            if cfg.run.resume == "auto" and cfg.run.log_dir.is_dir()
            else None
        )
    if found is None:
        if cfg.model.pretrained:
            return None
        raise UsageError(
            f"--evaluate: no checkpoint in --log-dir {cfg.run.log_dir}; give --resume PATH "
            f"(or --pretrained for torchvision's weights)"
        )
    path, state = found
    saved = state.get("args", {})
    for key, now in (("model", cfg.model.model), ("num_classes", num_classes)):
        if saved.get(key) is not None and saved[key] != now:
            raise UsageError(
                f"--evaluate: {path} holds a {key.replace('_', ' ')} {saved[key]} model, this command line builds {now}"
            )
    if cfg.validation.evaluate_ema:
        if state.get("ema") is None:
            raise UsageError(f"--evaluate-ema: {path} holds no average of the weights (its run had no --model-ema)")
        state["model"] = state["ema"]  # the average is what gets validated
    return found


def initial_model(cfg: Config, engine: Engine, num_classes: int) -> torch.nn.Module | None:
    """With --pretrained, the model with torchvision's weights (every rank reads them, and a
    problem on any rank stops all of them); else None: build_state builds it fresh."""
    if not cfg.model.pretrained:
        return None
    torch.manual_seed(cfg.run.seed)  # a classifier that does not fit the weights starts as a fresh one would
    return on_every_rank(
        engine, lambda: build_model(cfg.model.model, num_classes, pretrained=True), name="pretrained_check"
    )


def state_for(cfg: Config, engine: Engine, device: torch.device, data: Input) -> TrainState:
    """The training state a run (or --evaluate) starts from, for this input: seeded, with
    --pretrained weights when asked, its schedule counted in this input's steps."""
    configure_determinism(cfg.numerics.deterministic, cfg.run.seed + engine.rank)
    steps_per_epoch = max(1, data.batches_per_epoch // cfg.schedule.batches_per_allreduce)
    return build_state(
        cfg, engine, device, data.num_classes, steps_per_epoch, model=initial_model(cfg, engine, data.num_classes)
    )


def build_state(
    cfg: Config,
    engine: Engine,
    device: torch.device,
    num_classes: int,
    steps_per_epoch: int,
    model: torch.nn.Module | None = None,
) -> TrainState:
    """The model (``model``, or ``cfg.model.model`` built fresh), its classifier split or not,
    precision, the optimizer with the engine's gradient averaging, and the schedule. Every
    rank builds the same initial weights (same seed); ``TrainState.start`` then makes them
    rank 0's or the checkpoint's."""
    classifier = build_classifier(
        engine, num_classes, cfg.model.label_smoothing, cfg.dist.enable_model_parallel, cfg.dist.model_parallel_dim
    )
    if model is None:
        torch.manual_seed(cfg.run.seed)
        model = build_model(cfg.model.model, num_classes, zero_init_residual=cfg.norm.zero_init_residual)
        check_input(
            model,
            cfg.model.model,
            cfg.data.image_size,
            cfg.schedule.batch_size,
            shared_bn=cfg.norm.sync_bn and engine.size > 1,
        )
    model = classifier.convert(model)  # before .to(device): the dense layer never reaches the GPU
    if cfg.norm.sync_bn:
        model = engine.sync_batchnorm(model)
    if cfg.norm.ghost_bn:
        model = batchnorm.convert_ghost_batchnorm(model, cfg.norm.ghost_bn)
    precision = Precision(device, cfg.numerics.policy, cfg.numerics.channels_last)
    model = precision.prepare(model.to(device))
    gradients = engine.gradients(
        build_optimizer(cfg, model, cfg.lr(engine.size)),
        model,
        micro_batches=cfg.schedule.batches_per_allreduce,
        compression=cfg.dist.compression,
        adasum=cfg.dist.use_adasum,
        predivide=cfg.dist.gradient_predivide_factor,
        exclude=classifier.owned(model),
    )
    optimizer = gradients.optimizer
    classifier.attach(optimizer, model)
    if cfg.numerics.compile:
        compile_forward(gradients, cfg.numerics.compile)
    global_batch = cfg.schedule.batch_size * cfg.schedule.batches_per_allreduce * engine.size
    average = model_ema(model, cfg.validation.model_ema, cfg.validation.model_ema_steps, global_batch, precision)
    return TrainState(
        engine,
        model,
        optimizer,
        build_scheduler(cfg, optimizer, steps_per_epoch),
        precision,
        classifier,
        gradients,
        args=cfg.to_dict(),
        ema=average,
    )


def compile_forward(gradients, mode: str) -> None:
    """--compile: the training forward pass runs through ``torch.compile`` of what the
    engine wraps the model in (DDP, or the model itself under Horovod), so the engine's
    hooks and ``no_sync`` still apply (the compiled module hands attribute look-ups to the
    one it wraps). ``TrainState.model`` stays the plain module: checkpoints and state dicts
    carry no ``_orig_mod.`` prefixes, validation runs eagerly, and a run may resume with or
    without --compile. O2's cast weights reach the compiled module by parameter identity
    (``Precision.forward``), which compiling does not change.

    ``LARGEBATCH_COMPILE_BACKEND`` (default inductor) picks another backend; the CPU tests
    use ``aot_eager`` (the same graph capture and autograd, no code generation), since
    Inductor's C++ builds take minutes on a 2-core machine."""
    backend = os.environ.get("LARGEBATCH_COMPILE_BACKEND", "inductor")
    # The modes are Inductor's.
    gradients.module = torch.compile(gradients.module, backend=backend, mode=mode if backend == "inductor" else None)


class CheckpointSaver:
    """The loop's save hook, ``saver(state, epoch_end)``: every rank contributes to the
    checkpoint, rank 0 writes it and the status, and every rank learns whether that worked
    (a failed write stops them all, with one line)."""

    def __init__(self, cfg: Config, board: Board):
        self.store, self.log_dir, self.board = checkpoint_store(cfg), cfg.run.log_dir, board

    def __call__(self, state: TrainState, epoch_end: bool) -> None:
        checkpoint_dict, problem = state.state_dict(), ""
        if checkpoint_dict is not None:
            try:
                path = self.store.save(checkpoint_dict, epoch_end)
                write_status(self.log_dir, "running", state.position, path)
                self.board.flush()
            except checkpoint.CheckpointWriteError as e:
                problem = str(e)
            except OSError as e:
                problem = f"cannot write to {self.log_dir}: {e.strerror or e}"
        problem = state.engine.broadcast_object(problem, name="save_check")
        if problem:
            raise checkpoint.CheckpointWriteError(None, problem)


def resume_checkpoint(cfg: Config, engine: Engine) -> dict | None:
    """The checkpoint this run continues from, read by rank 0 (None: start fresh; None on the
    other ranks); a problem stops every rank."""
    return on_rank_0(engine, lambda: checkpoint_to_resume(cfg, engine.size), name="resume_check")


def start_engine(cfg: Config) -> Engine:
    name, note = choose(cfg.dist.engine)
    if note and launcher_rank() == 0:
        print(note, flush=True)
    engine = init_engine(name, timeline=cfg.profile.timeline, use_gpu=not cfg.numerics.no_cuda)
    for flag, feature, wanted in (
        ("--use-adasum", "adasum", cfg.dist.use_adasum),
        ("--timeline", "timeline", cfg.profile.timeline),
        ("--bf16-allreduce", "bf16_allreduce", cfg.dist.bf16_allreduce),
    ):
        if wanted and feature not in engine.features:
            other = "torch" if engine.name == "horovod" else "Horovod"
            engine.close()
            raise UsageError(f"{flag} needs the {other} engine (this run uses the {engine.name} engine)")
    return engine


def pick_device(cfg: Config, engine: Engine) -> torch.device:
    if cfg.numerics.no_cuda or not torch.cuda.is_available():
        policy = cfg.numerics.policy
        if policy.needs_gpu:
            why = "--no-cuda was given" if cfg.numerics.no_cuda else "no CUDA GPU is visible"
            raise UsageError(
                f"{policy.name} computes in fp16, which needs a GPU, but {why}; on CPU use --precision amp-bf16 or bf16"
            )
        if cfg.norm.sync_bn:
            raise UsageError("--sync-bn needs GPUs (both engines' SyncBatchNorm runs on CUDA tensors only)")
        return torch.device("cpu")
    torch.cuda.set_device(engine.local_rank % torch.cuda.device_count())
    return torch.device("cuda", torch.cuda.current_device())


def configure_threads(threads: int | None) -> None:
    """--threads N, else OMP_NUM_THREADS as the user set it. PyTorch caps OMP_NUM_THREADS at the
    number of cores, but ranks that share cores keep them busier with more threads than cores
    between them: Horovod's ImageNet example sets 4 per rank (what that is worth an epoch:
    docs/benchmarks.md)."""
    if threads is None:
        value = os.environ.get("OMP_NUM_THREADS", "")
        threads = int(value) if value.isdigit() and int(value) > 0 else None
    if threads is not None and threads != torch.get_num_threads():
        torch.set_num_threads(threads)


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


def prepare_run_dir(log_dir: Path, engine: Engine) -> RunLock | None:
    """On rank 0: create the run directory, prove it writable, hold it for this run (a lock
    a second run is refused by) and remove temporary files of killed writers. Every rank
    learns of a problem. Returns rank 0's lock (None elsewhere), held until the process ends."""

    def claim() -> RunLock:
        try:
            log_dir.mkdir(parents=True, exist_ok=True)
            probe = log_dir / f".write-test-{os.getpid()}"
            probe.unlink(missing_ok=True)  # a leftover of the same pid, or a planted link: never written through
            os.close(create_new(probe))
            probe.unlink()
        except OSError as e:
            raise UsageError(f"--log-dir {log_dir} is not writable ({e.strerror or e})") from None
        lock = RunLock(log_dir).acquire()
        for stale in clean_stale_temps(log_dir):
            print(f"removed {stale.name}, left by a killed writer", flush=True)
        return lock

    return on_rank_0(engine, claim, name="run_dir_check")


def build_input(cfg: Config, engine: Engine, device: torch.device) -> Input:
    """Every rank opens the data; a problem found by any rank stops all of them."""

    def open_input():
        if cfg.data.synthetic:
            from .data.synthetic import SyntheticInput

            return SyntheticInput(cfg, engine.rank, engine.size, device)
        if cfg.run.entry == "dali":
            from .data.dali import DaliInput

            return DaliInput(cfg, engine.rank, engine.size, device)
        from .data.folder import FolderInput

        return FolderInput(cfg, engine.rank, engine.size, device)

    return on_every_rank(engine, open_input, name="data_check")


def on_rank_0(engine: Engine, work, name: str):
    """``work()`` on rank 0 (None elsewhere); its UsageError stops every rank with the same
    line, so no rank is left waiting in a collective."""
    result, problem = None, ""
    if engine.is_main:
        try:
            result = work()
        except UsageError as e:
            problem = str(e)
    problem = engine.broadcast_object(problem, name=name)
    if problem:
        raise UsageError(problem)
    return result


def on_every_rank(engine: Engine, work, name: str):
    """``work()`` on every rank; a UsageError on any of them stops all of them, with the
    first rank's line."""
    result, problem = None, ""
    try:
        result = work()
    except UsageError as e:
        problem = str(e)
    problems = [p for p in engine.allgather_object(problem, name=name) if p]
    if problems:
        raise UsageError(problems[0])
    return result


def build_optimizer(cfg: Config, model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    if cfg.optim.base_op == "lars":
        return lars.create_optimizer_lars(
            model,
            lr=lr,
            momentum=cfg.optim.momentum,
            weight_decay=cfg.optim.wd,
            bn_bias_separately=cfg.optim.bn_bias_separately,
            epsilon=cfg.optim.epsilon,
            eta=cfg.optim.lars_eta,
            trust_clip=cfg.optim.trust_clip,
            nesterov=cfg.optim.nesterov,
        )
    if cfg.optim.base_op == "lamb":
        return lamb.create_optimizer_lamb(
            model,
            lr=lr,
            weight_decay=cfg.optim.wd,
            bn_bias_separately=cfg.optim.bn_bias_separately,
            epsilon=cfg.optim.epsilon,
            trust_clip=cfg.optim.trust_clip,
        )
    groups = lars.param_groups(model, cfg.optim.wd, cfg.optim.bn_bias_separately)
    return torch.optim.SGD(
        groups, lr=lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.wd, nesterov=cfg.optim.nesterov
    )


def build_scheduler(cfg: Config, optimizer, steps_per_epoch: int):
    warmup = round(cfg.schedule.warmup_epochs * steps_per_epoch)
    total = cfg.schedule.epochs * steps_per_epoch
    if cfg.schedule.lr_schedule == "poly":
        return schedulers.PolynomialWarmup(
            optimizer, decay_steps=total, warmup_steps=warmup, end_lr=cfg.schedule.end_lr, power=cfg.schedule.lr_power
        )
    if cfg.schedule.lr_schedule == "cosine":
        return schedulers.CosineWarmup(optimizer, decay_steps=total, warmup_steps=warmup, end_lr=cfg.schedule.end_lr)
    milestones = [math.ceil(e * steps_per_epoch) for e in cfg.schedule.lr_decay_epochs]
    return schedulers.MultiStepWarmup(optimizer, milestones=milestones, gamma=0.1, warmup_steps=warmup)


def checkpoint_store(cfg: Config, read_only: bool = False) -> checkpoint.CheckpointStore:
    return checkpoint.CheckpointStore(
        cfg.run.log_dir, cfg.run.checkpoint_format, cfg.run.keep_checkpoints, read_only=read_only
    )


def checkpoint_to_resume(cfg: Config, world_size: int) -> dict | None:
    """Rank 0: the checkpoint --resume names (auto: the newest usable one in --log-dir), read
    and checked to belong to this run; None to start fresh."""
    store = checkpoint_store(cfg)
    if cfg.run.resume == "none":
        held = store.latest()
        if held is not None:
            raise UsageError(
                f"--log-dir {cfg.run.log_dir} already holds checkpoints ({held.name}); "
                f"use --resume auto to continue that run, or a new --log-dir"
            )
        return None
    if cfg.run.resume == "auto":
        # Skips damaged and non-finite files (one warning each): a run that diverged goes
        # back to its newest finite checkpoint, not into the same divergence.
        found = store.load_newest(finite_only=True)
        if found is None:
            refuse_restart(cfg.run.log_dir)
            return None
        path, state = found
    else:
        path = Path(cfg.run.resume)
        state = checkpoint.load(path)
    checkpoint.check_same_run(state, cfg, path)
    if state["epoch"] < cfg.schedule.epochs and not state.get("reached"):  # a finished run says so on any count
        checkpoint.check_world_size(state, world_size, path)
    ignored = checkpoint.ignored_changes(state, cfg)
    if ignored:
        print(ignored, file=sys.stderr, flush=True)
    print(f"resuming from {path} (epoch {state['epoch']}, step {state['step']})", flush=True)
    return state


def refuse_restart(log_dir: Path) -> None:
    """A run directory whose status says the run got somewhere is never silently trained
    again from step 0, over what is left of it."""
    from .jobs.status import run_state

    state, step = run_state(log_dir)
    if step > 0:
        raise UsageError(
            f"--log-dir {log_dir}: status.json says the run reached step {step} ({state}), but none of "
            f"its checkpoints is there; restore them, pass --resume PATH, or use a new --log-dir"
        )


def write_status(log_dir: Path, state: str, pos: Position, latest: Path | None, reached: dict | None = None) -> None:
    """status.json tells job scripts whether to requeue: 'finished' ends a chain (a run that
    reached --target-top1 says so in ``target``)."""
    status = {"state": state, "epoch": pos.epoch, "step": pos.step, "checkpoint": str(latest) if latest else None}
    if reached is not None:
        status["target"] = reached
    atomic_write(log_dir / "status.json", lambda f: f.write((json.dumps(status) + "\n").encode()))
