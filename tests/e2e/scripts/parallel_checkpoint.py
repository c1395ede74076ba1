"""Under mpirun (any number of ranks): a dense checkpoint, started from by the job's own
factory into a model whose classifier is split along dim 0 and then along dim 1,
gives each rank exactly its slice of the classifier and of its momentum buffers;
reassembling them (the state's gather, as the job saves) gives back the checkpoint bit for
bit. (The checkpoint is read directly: the job resumes training only on the process count
that wrote it, but the re-sharding holds for any.) The job's validation of the sharded model
(ranks in lockstep, loss and top-k across the slices) equals that of the dense model with the
same weights.

    parallel_checkpoint.py CHECKPOINT LOG_DIR [job flags...]
"""

import sys

import torch
from script import emit, start_engine

from largebatch import checkpoint
from largebatch.config import parse_config
from largebatch.data.folder import FolderInput
from largebatch.job import build_state
from largebatch.parallel import shards
from largebatch.train import evaluate

CPU = torch.device("cpu")


def started(engine, flags: list[str], num_classes: int):
    cfg = parse_config(flags)
    state = build_state(cfg, engine, CPU, num_classes, steps_per_epoch=5)
    state.start(checkpoint.load(cfg.run.resume) if engine.is_main else None)
    return cfg, state


def validation(engine, cfg, state) -> dict:
    data = state.classifier.input(FolderInput(cfg, engine.rank, engine.size, CPU), cfg.data.image_size, CPU)
    return evaluate(state, data.val())


def check(engine, dim: int, path: str, log_dir: str, flags: list[str]) -> None:
    saved = torch.load(path, map_location="cpu", weights_only=True)
    num_classes = saved["model"]["fc.weight"].shape[0]
    resume = ["--resume", path]
    cfg, state = started(
        engine,
        flags
        + ["--log-dir", f"{log_dir}/dim{dim}", *resume, "--enable-model-parallel", "--model-parallel-dim", str(dim)],
        num_classes,
    )
    model, optimizer = state.model, state.optimizer
    index = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    for name, shard in shards(model).items():
        start = sum(shard.sizes[: engine.rank])
        expected = saved["model"][name].narrow(shard.axis, start, shard.sizes[engine.rank])
        assert torch.equal(shard.param.detach(), expected), (
            f"dim {dim}: rank {engine.rank} got the wrong slice of {name}"
        )
        buffer = optimizer.state[shard.param]["momentum_buffer"]
        dense_buffer = saved["optimizer"]["state"][index[id(shard.param)]]["momentum_buffer"]
        assert torch.equal(buffer, dense_buffer.narrow(shard.axis, start, shard.sizes[engine.rank])), (
            f"dim {dim}: rank {engine.rank} got the wrong slice of {name}'s momentum"
        )

    model_state, optimizer_state = state.classifier.gather_state(model, optimizer)
    if engine.is_main:
        assert model_state.keys() == saved["model"].keys()
        for key, tensor in saved["model"].items():
            assert torch.equal(model_state[key], tensor), f"dim {dim}: {key} changed in the round trip"
        for i, entry in saved["optimizer"]["state"].items():
            for key, value in entry.items():
                same = (
                    torch.equal(optimizer_state["state"][i][key], value)
                    if torch.is_tensor(value)
                    else optimizer_state["state"][i][key] == value
                )
                assert same, f"dim {dim}: optimizer state {i}/{key} changed in the round trip"

    sharded = validation(engine, cfg, state)
    # The same checkpoint in the dense model, each rank validating its share.
    dense_flags = [f for f in flags if f != "--enable-model-parallel"]
    dense_cfg, dense_state = started(engine, dense_flags + ["--log-dir", f"{log_dir}/dense{dim}", *resume], num_classes)
    dense = validation(engine, dense_cfg, dense_state)
    for key in ("count", "top1", "top5"):
        assert sharded[key] == dense[key], f"dim {dim}: sharded validation {sharded} != dense {dense}"
    assert abs(sharded["loss"] - dense["loss"]) < 1e-5, f"dim {dim}: sharded validation {sharded} != dense {dense}"
    emit(rank=engine.rank, dim=dim, round_trip=True, sharded=sharded, dense=dense)


def main():
    path, log_dir, flags = sys.argv[1], sys.argv[2], sys.argv[3:]
    engine = start_engine()
    for dim in (0, 1):
        check(engine, dim, path, log_dir, flags)


if __name__ == "__main__":
    main()
