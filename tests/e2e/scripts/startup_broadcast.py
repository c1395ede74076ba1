"""Under mpirun -np 2: start-up leaves rank 0's weights exactly as they were and gives
every rank the same ones, for a fresh start and for a resumed checkpoint (weight decay on,
the case where Horovod's broadcast_optimizer_state moves the weights)."""
import sys
from pathlib import Path

import torch

from largebatch.config import parse_config
from largebatch.dist import Dist
from largebatch.job import build_optimizer, build_scheduler, restore
from largebatch.model import build_model
from largebatch.precision import Precision


def build(dist, log_dir):
    cfg = parse_config(["--synthetic", "--model", "resnet18", "--num-classes", "10", "--base-op", "lars",
                        "--wd", "0.01", "--epochs", "2", "--warmup-epochs", "1", "--log-dir", str(log_dir)])
    torch.manual_seed(1234 + dist.rank)  # ranks start from different weights on purpose
    model = build_model(cfg.model, 10)
    optimizer = dist.distributed_optimizer(build_optimizer(cfg, model, 0.1), model, backward_passes_per_step=1,
                                           fp16_allreduce=False, adasum=False, predivide=1.0)
    return cfg, model, optimizer, build_scheduler(cfg, optimizer, steps_per_epoch=5)


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def main():
    dist = Dist.init()
    log_dir = Path(sys.argv[1])
    # fresh start
    cfg, model, optimizer, scheduler = build(dist, log_dir)
    rank0_before = dist.broadcast_object(snapshot(model), name="before")
    restore(cfg, dist, model, optimizer, scheduler, Precision(torch.device("cpu")))
    assert same(snapshot(model), rank0_before), f"rank {dist.rank}: weights after start-up differ from rank 0's"
    assert not optimizer.state, "start-up created optimizer state"
    # resume: rank 0 writes a checkpoint with momentum buffers, then every rank restores it
    images, labels = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    torch.nn.functional.cross_entropy(model(images), labels).backward()
    optimizer.step()
    if dist.is_main:
        log_dir.mkdir(parents=True, exist_ok=True)
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "scaler": {}, "epoch": 1, "step": 5, "epoch_step": 0, "rng": [], "world_size": 2,
                 "args": cfg.to_dict(), "version": 1}
        torch.save(state, log_dir / "checkpoint-1.pth.tar")
        (log_dir / "checkpoints.json").write_text('{"files": ["checkpoint-1.pth.tar"]}')
    saved = dist.broadcast_object(snapshot(model), name="saved")
    dist.barrier()
    cfg, model, optimizer, scheduler = build(dist, log_dir)
    pos = restore(cfg, dist, model, optimizer, scheduler, Precision(torch.device("cpu")))
    assert (pos.epoch, pos.step) == (1, 5), pos
    assert same(snapshot(model), saved), f"rank {dist.rank}: resumed weights differ from the checkpoint's"
    assert len(optimizer.state) > 0, "momentum buffers were not restored"
    print(f"rank {dist.rank}: start-up and resume left the weights unchanged", flush=True)


if __name__ == "__main__":
    main()
