"""Checkpoints of a sharded model: the dense layout on disk, slices in memory.

``dense_state`` reassembles every sharded tensor (parameters and the optimizer's
per-parameter tensors: momentum, Adam moments) on rank 0; ``broadcast_checkpoint`` hands
each rank its slice, so a run can resume with any number of processes, with or without
model parallelism.
"""

from __future__ import annotations

import torch
from torch import nn

from .layer import Shard, ShardingError, shards


def _optimizer_index(optimizer) -> dict[int, int]:
    """Parameter id -> its key in ``optimizer.state_dict()['state']`` (torch numbers the
    parameters across the param groups in order)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return {id(p): i for i, p in enumerate(params)}


def _is_slice(value, shard: Shard) -> bool:
    return torch.is_tensor(value) and value.shape == shard.param.shape


def _gather_to_root(tensor: torch.Tensor, shard: Shard, engine, name: str) -> torch.Tensor | None:
    rows = tensor.detach() if shard.axis == 0 else tensor.detach().t()
    whole = engine.gather_to_root(rows.contiguous(), name=name)
    if not engine.is_main:
        return None
    return whole.cpu() if shard.axis == 0 else whole.t().contiguous().cpu()


def _scatter_from_root(whole: torch.Tensor | None, shard: Shard, engine, name: str) -> torch.Tensor:
    if engine.is_main:
        assert whole is not None, "rank 0 passes the dense tensor"
        rows = (whole if shard.axis == 0 else whole.t()).to(shard.param.dtype).contiguous()
    else:
        trailing = shard.param.shape[1:] if shard.axis == 0 else shard.param.t().shape[1:]
        rows = torch.empty((0, *trailing), dtype=shard.param.dtype)
    mine = engine.scatter_from_root(rows, shard.sizes, name=name)
    return mine if shard.axis == 0 else mine.t().contiguous()


def dense_state(model: nn.Module, optimizer, engine) -> tuple[dict | None, dict | None]:
    """The model's and optimizer's state dicts, every sharded tensor reassembled in the dense
    layout: on rank 0; ``(None, None)`` on the others. A collective when the model has
    shards (every rank calls it); for a dense model, rank 0's own state dicts."""
    model_state = model.state_dict() if engine.is_main else None
    optimizer_state = optimizer.state_dict() if engine.is_main else None
    index = _optimizer_index(optimizer)
    for name, shard in shards(model).items():
        whole = _gather_to_root(shard.param, shard, engine, name=f"mp.save.{name}")
        if engine.is_main:
            assert model_state is not None
            model_state[name] = whole
        state = optimizer.state.get(shard.param, {})
        for key in sorted(k for k, v in state.items() if _is_slice(v, shard)):
            whole = _gather_to_root(state[key], shard, engine, name=f"mp.save.{name}.{key}")
            if engine.is_main:
                assert optimizer_state is not None
                i = index[id(shard.param)]
                # A copy: state_dict() shares the per-parameter dicts with the live optimizer.
                optimizer_state["state"][i] = {**optimizer_state["state"][i], key: whole}
    return model_state, optimizer_state


def broadcast_checkpoint(state: dict | None, model: nn.Module, optimizer, engine) -> dict | None:
    """Rank 0's checkpoint (or None) on every rank, each holding only its own slice of every
    sharded tensor, ready for ``load_state_dict``. The dense classifier never goes to the
    other ranks whole: rank 0 takes it out before the broadcast and scatters the slices."""
    sharded = shards(model)
    if not sharded:
        return engine.broadcast_object(state, name="checkpoint")
    index = _optimizer_index(optimizer)
    plan, dense, problem = [], {}, ""
    if engine.is_main and state is not None:
        for name, shard in sharded.items():
            whole = state["model"].get(name)
            if whole is None or tuple(whole.shape) != shard.dense_shape:
                found = "no such entry" if whole is None else f"shape {tuple(whole.shape)}"
                problem = f"the checkpoint's {name} ({found}) does not fit this model's {shard.dense_shape}"
                break
            dense[(name, None)] = state["model"].pop(name)
            plan.append((name, None))
            entry = state["optimizer"]["state"].get(index[id(shard.param)], {})
            dense_keys = [k for k, v in entry.items() if torch.is_tensor(v) and tuple(v.shape) == shard.dense_shape]
            for key in sorted(dense_keys):
                dense[(name, key)] = entry.pop(key)
                plan.append((name, key))
    problem = engine.broadcast_object(problem, name="checkpoint_shards_check")
    if problem:
        raise ShardingError(problem)
    state, plan = engine.broadcast_object((state, plan), name="checkpoint")
    for name, key in plan:
        shard = sharded[name]
        mine = _scatter_from_root(
            dense.pop((name, key), None), shard, engine, name=f"mp.load.{name}" + (f".{key}" if key else "")
        )
        if key is None:
            state["model"][name] = mine
        else:
            state["optimizer"]["state"][index[id(shard.param)]][key] = mine
    return state
