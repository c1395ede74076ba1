"""Under mpirun (any number of ranks): a dense checkpoint, loaded by the job's own restore()
into a model whose classifier is split along dim 0 and then along dim 1, gives each rank
exactly its slice of the classifier and of its momentum buffers; reassembling them
(dense_state, as the job saves) gives back the checkpoint bit for bit. The job's validation
of the sharded model (ranks in lockstep, loss and top-k across the slices) equals that of
the dense model with the same weights.

    parallel_checkpoint.py CHECKPOINT LOG_DIR [job flags...]
"""
import sys

import torch

from largebatch.config import parse_config
from largebatch.data.folder import FolderInput
from largebatch.dist import Dist
from largebatch.job import build_criterion, build_optimizer, build_scheduler, restore
from largebatch.model import build_model
from largebatch.parallel import (LockstepInput, convert_parallel_linear, dense_state, share_norms, shards,
                                 sharded_parameter_names)
from largebatch.precision import Precision
from largebatch.train import evaluate

CPU = torch.device("cpu")


def dense_validation(dist, cfg, state: dict) -> dict:
    """Every rank with the same dense weights (batch norm statistics included), each
    evaluating its share: equal to a single-process evaluation."""
    model = build_model(cfg.model, state["model"]["fc.weight"].shape[0])
    model.load_state_dict(state["model"])
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    return evaluate(model, criterion, FolderInput(cfg, dist.rank, dist.size, CPU).val(), Precision(CPU), dist, CPU)


def check(dist, dim: int, path: str, log_dir: str, flags: list[str]) -> None:
    saved = torch.load(path, map_location="cpu", weights_only=True)
    cfg = parse_config(flags + ["--log-dir", f"{log_dir}/dim{dim}", "--resume", path,
                                "--enable-model-parallel", "--model-parallel-dim", str(dim)])
    model = convert_parallel_linear(build_model(cfg.model, saved["model"]["fc.weight"].shape[0]), dim, dist)
    optimizer = dist.distributed_optimizer(build_optimizer(cfg, model, cfg.lr(dist.size)), model,
                                           backward_passes_per_step=1, fp16_allreduce=False, adasum=False,
                                           predivide=1.0, exclude=sharded_parameter_names(model))
    share_norms(optimizer, model, dist)
    restore(cfg, dist, model, optimizer, build_scheduler(cfg, optimizer, steps_per_epoch=5),
            Precision(torch.device("cpu")))

    index = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    for name, shard in shards(model).items():
        start = sum(shard.sizes[:dist.rank])
        expected = saved["model"][name].narrow(shard.axis, start, shard.sizes[dist.rank])
        assert torch.equal(shard.param.detach(), expected), f"dim {dim}: rank {dist.rank} got the wrong slice of {name}"
        buffer = optimizer.state[shard.param]["momentum_buffer"]
        dense_buffer = saved["optimizer"]["state"][index[id(shard.param)]]["momentum_buffer"]
        assert torch.equal(buffer, dense_buffer.narrow(shard.axis, start, shard.sizes[dist.rank])), \
            f"dim {dim}: rank {dist.rank} got the wrong slice of {name}'s momentum"

    model_state, optimizer_state = dense_state(model, optimizer, dist)
    if dist.is_main:
        assert model_state.keys() == saved["model"].keys()
        for key, tensor in saved["model"].items():
            assert torch.equal(model_state[key], tensor), f"dim {dim}: {key} changed in the round trip"
        for i, entry in saved["optimizer"]["state"].items():
            for key, value in entry.items():
                same = torch.equal(optimizer_state["state"][i][key], value) if torch.is_tensor(value) \
                    else optimizer_state["state"][i][key] == value
                assert same, f"dim {dim}: optimizer state {i}/{key} changed in the round trip"
    print(f"rank {dist.rank}: dim {dim}: own slices loaded, dense state reassembled unchanged", flush=True)

    data = LockstepInput(FolderInput(cfg, dist.rank, dist.size, CPU), dist, cfg.image_size, CPU)
    sharded = evaluate(model, build_criterion(cfg, data.num_classes, dist), data.val(), Precision(CPU), dist, CPU)
    dense = dense_validation(dist, cfg, saved)
    for key in ("count", "top1", "top5"):
        assert sharded[key] == dense[key], f"dim {dim}: sharded validation {sharded} != dense {dense}"
    assert abs(sharded["loss"] - dense["loss"]) < 1e-5, f"dim {dim}: sharded validation {sharded} != dense {dense}"
    print(f"rank {dist.rank}: dim {dim}: validation {sharded} equals the dense model's", flush=True)


def main():
    path, log_dir, flags = sys.argv[1], sys.argv[2], sys.argv[3:]
    dist = Dist.init()
    for dim in (0, 1):
        check(dist, dim, path, log_dir, flags)


if __name__ == "__main__":
    main()
