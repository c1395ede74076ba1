"""Under mpirun -np 2 (checks.py startup_broadcast:LOG_DIR): start-up leaves rank 0's weights
exactly as they were and gives every rank the same ones, for a fresh start and for a resumed
checkpoint (weight decay on, the case where Horovod's broadcast_optimizer_state would move the
weights). Built and started by the job's own factory, checkpoint store and reader."""

from pathlib import Path

import torch
from script import emit

from largebatch.config import parse_config
from largebatch.job import build_state, checkpoint_store, resume_checkpoint
from largebatch.model import build_model

CPU = torch.device("cpu")


def build(engine, log_dir):
    # The tests' small model (batch norm, biases, an fc layer, like a ResNet): broadcasting
    # resnet18's 11M weights as Python objects took Horovod 20 s on 2 cores.
    cfg = parse_config(
        [
            "--synthetic",
            "--model",
            "shufflenet_v2_x0_5",
            "--num-classes",
            "10",
            "--base-op",
            "lars",
            "--bn-bias-separately",
            "--label-smoothing",
            "0",
            "--wd",
            "0.01",
            "--epochs",
            "2",
            "--warmup-epochs",
            "1",
            "--log-dir",
            str(log_dir),
        ]
    )
    torch.manual_seed(1234 + engine.rank)  # ranks start from different weights on purpose
    return cfg, build_state(cfg, engine, CPU, num_classes=10, steps_per_epoch=5, model=build_model(cfg.model.model, 10))


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def parameters(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def buffers(model):
    return {k: v.detach().clone() for k, v in model.named_buffers()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def check(engine, log_dir: str):
    log_dir = Path(log_dir)
    # fresh start
    cfg, state = build(engine, log_dir)
    rank0_before = engine.broadcast_object(snapshot(state.model), name="before")
    state.start(resume_checkpoint(cfg, engine))
    assert same(snapshot(state.model), rank0_before), f"rank {engine.rank}: weights after start-up differ from rank 0's"
    assert not state.optimizer.state, "start-up created optimizer state"
    # resume: one step creates momentum buffers, the job's store writes the checkpoint
    images, labels = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    torch.nn.functional.cross_entropy(state.gradients.module(images), labels).backward()
    state.gradients.reduce()
    state.gradients.step()
    state.position.epoch, state.position.step = 1, 5
    checkpoint = state.state_dict()
    if engine.is_main:
        log_dir.mkdir(parents=True, exist_ok=True)
        checkpoint_store(cfg).save(checkpoint, epoch_end=True)
    # Weights are rank 0's; batch norm's running statistics are each rank's own, and a resume
    # at the same world size gives each rank its own back.
    saved = engine.broadcast_object(parameters(state.model), name="saved")
    own_buffers = buffers(state.model)
    engine.barrier()
    cfg, state = build(engine, log_dir)
    state.start(resume_checkpoint(cfg, engine))
    assert (state.position.epoch, state.position.step) == (1, 5), state.position
    assert same(parameters(state.model), saved), f"rank {engine.rank}: resumed weights differ from the checkpoint's"
    assert same(buffers(state.model), own_buffers), f"rank {engine.rank}: resumed BN statistics are not its own"
    assert len(state.optimizer.state) > 0, "momentum buffers were not restored"
    emit(rank=engine.rank, fresh_equal=True, resumed_equal=True)
