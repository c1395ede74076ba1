"""Memory and step time of the classifier: dense on one process against model-parallel
(split by class, dim 1, and by feature, dim 0) on N processes, same run.

    .venv/bin/python bench/bench_parallel.py [--classes 1000,100000,1000000] [--np 2]
        [--features 2048] [--batch 32] [--steps 3] [--rounds 2] [--merge]

The layer is ResNet-50's classifier (2048 features, ``--classes`` outputs) with its loss, on
a global batch of ``--batch`` feature vectors: forward, backward (down to the features, as in
the real model) and a plain SGD step (no momentum buffer: at 1M classes a dense momentum
buffer alone is 8 GB, which this machine cannot hold beside the weights and their gradient;
momentum would add one more weight-sized buffer per process, split the same way). Dense:
``nn.Linear`` and ``nn.CrossEntropyLoss`` in one process (no Horovod). Sharded:
``ParallelLinear`` built directly in its slice and ``ParallelCrossEntropyLoss``, under
``mpirun -np N``, each process holding ``batch / N`` rows. The processes share the cores
the dense run's threads use (threads per process = cores / N).

Every configuration runs ``--rounds`` times, the layouts taking turns. Per process: peak
resident memory (VmHWM); the part of it that came after start-up ("classifier memory": the
weights, their gradient, the activations); the median step time over the timed steps after
one warm-up step (``--steps`` at 1M classes, up to 20 for fewer classes). For N processes,
the largest over the ranks; the step time reported is the median over the rounds. Ratios
are against the dense run with the same class count, measured in this run. A configuration
that would not fit in the memory available at the time is skipped and says so.
Writes bench/results/parallel.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

GIB = 2**30
MIB = 2**20


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("MemAvailable not in /proc/meminfo")


def estimate_bytes(classes: int, features: int, batch: int, np: int) -> int:
    """What the whole configuration needs, all processes: weight and gradient slices, about
    five logit-sized buffers per process (logits, softmax, gradients, dim 0's partial sums)
    and ~0.7 GiB of start-up per process (torch, MPI, Horovod)."""
    params = (classes * features + classes) * 4
    logits = batch * classes * 4
    return 2 * params + 5 * logits * (1 if np == 1 else 2) + np * int(0.7 * GIB)


# --- one configuration, in its own process(es) ---------------------------------------------


def worker(args) -> None:
    import torch
    from torch import nn

    # Whatever else runs out of memory, let it be this benchmark.
    Path("/proc/self/oom_score_adj").write_text("1000")
    torch.set_num_threads(args.threads)
    if args.layout == "dense":
        dist, rank, size = None, 0, 1
    else:
        from largebatch.engines import init_engine

        dist = init_engine()
        rank, size = dist.rank, dist.size
    g = torch.Generator().manual_seed(rank)
    rows = args.batch // size + (1 if rank < args.batch % size else 0)
    features = torch.randn(rows, args.features, generator=g).requires_grad_()
    labels = torch.randint(0, args.classes, (rows,), generator=g)

    def build(classes: int):
        if dist is None:
            return nn.Linear(args.features, classes), nn.CrossEntropyLoss()
        from largebatch.parallel import ParallelCrossEntropyLoss, ParallelLinear

        return (
            ParallelLinear(args.features, classes, int(args.layout[-1]), dist),
            ParallelCrossEntropyLoss(classes, dist),
        )

    # A step of a tiny copy first, so that start-up holds what any first step allocates
    # (kernel libraries, thread pools, Horovod's fusion buffer, the modules torch.optim
    # imports on first use: ~160 MiB), not the classifier.
    tiny, tiny_loss = build(2 * size)
    tiny_loss(tiny(features), labels % (2 * size)).backward()
    torch.optim.SGD(tiny.parameters(), lr=0.01).step()
    del tiny, tiny_loss
    features.grad = None
    startup = _status_kib("VmRSS") * 1024

    torch.manual_seed(0)
    layer, criterion = build(args.classes)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.01)
    param_bytes = sum(p.numel() * p.element_size() for p in layer.parameters())

    times = []
    for step in range(args.steps + 1):
        if dist is not None:
            dist.barrier()  # every rank starts the step together: the time is the step's, not a wait's
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)  # the gradient is allocated by backward, not copied into
        features.grad = None
        loss = criterion(layer(features), labels)
        loss.backward()
        optimizer.step()
        if step:  # the first step is a warm-up
            times.append(time.perf_counter() - start)
    mine = {
        "rank": rank,
        "peak_rss": _status_kib("VmHWM") * 1024,
        "startup_rss": startup,
        "param_bytes": param_bytes,
        "step_s": statistics.median(times),
        "loss": loss.item(),
    }
    everyone = dist.allgather_object(mine, name="bench") if dist is not None else [mine]
    if rank == 0:
        print("RESULT " + json.dumps(everyone), flush=True)


def run_config(args, layout: str, classes: int) -> dict:
    np = 1 if layout == "dense" else args.np
    threads = max(1, (os.cpu_count() or 1) // np)
    # Small layers step fast, and on a shared machine a few steps are mostly noise.
    steps = min(20, args.steps * max(1, 1_000_000 // classes))
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        "--layout",
        layout,
        "--classes",
        str(classes),
        "--features",
        str(args.features),
        "--batch",
        str(args.batch),
        "--steps",
        str(steps),
        "--threads",
        str(threads),
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    if np > 1:
        mpirun = str(Path(sys.executable).with_name("mpirun"))
        cmd = [mpirun, "-np", str(np), "--oversubscribe", "-x", "OMP_NUM_THREADS", *cmd]
    row = {"classes": classes, "layout": layout, "processes": np, "threads_per_process": threads, "timed_steps": steps}
    need, have = estimate_bytes(classes, args.features, args.batch, np), mem_available()
    if need > 0.96 * have:
        row["skipped"] = f"needs about {need / GIB:.1f} GiB, {have / GIB:.1f} GiB available now"
        return row
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        row["skipped"] = f"failed (exit {proc.returncode}): {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}"
        return row
    ranks = json.loads(lines[-1][len("RESULT ") :])
    row.update(
        {
            "param_mib_per_process": max(r["param_bytes"] for r in ranks) / MIB,
            "peak_rss_mib_per_process": max(r["peak_rss"] for r in ranks) / MIB,
            "classifier_mib_per_process": max(r["peak_rss"] - r["startup_rss"] for r in ranks) / MIB,
            "step_ms": max(r["step_s"] for r in ranks) * 1000,
            "loss": ranks[0]["loss"],
        }
    )
    return row


def table(rows: list[dict]) -> str:
    out = [
        "| classes | classifier | processes | weights / process | peak RSS / process | classifier memory / process "
        "| vs dense | step time | vs dense |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    names = {"dense": "dense", "dim1": "sharded by class (dim 1)", "dim0": "sharded by feature (dim 0)"}
    for row in rows:
        head = f"| {row['classes']:,} | {names[row['layout']]} | {row['processes']} "
        if "skipped" in row:
            out.append(head + f"| skipped: {row['skipped']} | | | | | |")
            continue
        mem_ratio = row.get("classifier_memory_vs_dense")
        time_ratio = row.get("step_time_vs_dense")
        out.append(
            head + f"| {row['param_mib_per_process']:,.0f} MiB | {row['peak_rss_mib_per_process']:,.0f} MiB "
            f"| {row['classifier_mib_per_process']:,.0f} MiB | {f'{mem_ratio:.2f}' if mem_ratio else '-'} "
            f"| {row['step_ms']:,.1f} ms | {f'{time_ratio:.2f}' if time_ratio else '-'} |"
        )
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--classes", default="1000,100000,1000000", help="comma-separated class counts")
    p.add_argument("--np", type=int, default=2, help="processes of the sharded runs")
    p.add_argument("--features", type=int, default=2048, help="input features (ResNet-50: 2048)")
    p.add_argument("--batch", type=int, default=32, help="global batch")
    p.add_argument(
        "--steps",
        type=int,
        default=3,
        help="timed steps after one warm-up step at 1M classes (more, up to 20, for fewer classes)",
    )
    p.add_argument("--rounds", type=int, default=2, help="runs of every configuration; step time: median over them")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "parallel.json")
    p.add_argument(
        "--merge",
        action="store_true",
        help="keep --out's rows of other class counts (this run's replace those of its own)",
    )
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--layout", choices=["dense", "dim1", "dim0"], help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        args.classes = int(args.classes)
        worker(args)
        return 0

    rows = []
    for classes in (int(c) for c in args.classes.split(",")):
        # Rounds alternate the layouts, so that a busy spell of the machine hits all of them.
        runs = {layout: [] for layout in ("dense", "dim1", "dim0")}
        for _ in range(args.rounds):
            for layout in runs:
                runs[layout].append(run_config(args, layout, classes))
                print(json.dumps(runs[layout][-1]), flush=True)
        dense = None
        for layout, results in runs.items():
            done = [r for r in results if "skipped" not in r]
            if not done:
                rows.append(results[-1])
                continue
            row = {
                **max(done, key=lambda r: r["peak_rss_mib_per_process"]),
                "step_ms_rounds": [r["step_ms"] for r in done],
                "step_ms": statistics.median(r["step_ms"] for r in done),
            }
            if layout == "dense":
                dense = row
            elif dense is not None:
                row["classifier_memory_vs_dense"] = (
                    row["classifier_mib_per_process"] / dense["classifier_mib_per_process"]
                )
                row["peak_rss_vs_dense"] = row["peak_rss_mib_per_process"] / dense["peak_rss_mib_per_process"]
                row["step_time_vs_dense"] = row["step_ms"] / dense["step_ms"]
            rows.append(row)

    command = "python bench/bench_parallel.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    for row in rows:
        row["command"] = command
    commands = [command]
    if args.merge and args.out.is_file():
        # Ratios stay within one run: every class count brings its own dense baseline.
        old = json.loads(args.out.read_text())
        mine = {row["classes"] for row in rows}
        rows = sorted(
            [r for r in old["results"] if r["classes"] not in mine] + rows,
            key=lambda r: (r["classes"], ["dense", "dim1", "dim0"].index(r["layout"])),
        )
        commands = [c for c in old.get("commands", [old.get("command")]) if c and c != command] + commands
    report = {
        "commands": commands,
        "machine": {
            "cpus": os.cpu_count(),
            "memory_gib": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / GIB, 1),
            "platform": platform.platform(),
            "gpu": None,
        },
        "settings": {
            "features": args.features,
            "global_batch": args.batch,
            "sharded_processes": args.np,
            "optimizer": "SGD without momentum",
            "timed_steps": "see each row",
            "memory": "VmHWM per process; classifier memory = VmHWM - VmRSS after start-up",
            "step_time": "median over timed steps, slowest rank; then median over rounds",
            "rounds": args.rounds,
        },
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print()
    print(table(rows))
    print(f"\n(written to {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
