"""--prof N: skip the first steps (loader start-up, allocator warm-up), record N steps
with torch.profiler, write the trace, and tell the loop to stop.

The trace (`<log-dir>/profile/rank<R>.*.pt.trace.json`) opens in TensorBoard's profiler
plugin or in Perfetto (ui.perfetto.dev). On a GPU each step is also an NVTX range, for
Nsight Systems. With --timeline, Horovod's timeline of the same steps is written beside it.
"""

from __future__ import annotations

from pathlib import Path

import torch

WAIT, WARMUP = 2, 2


class StepProfiler:
    def __init__(
        self, steps: int, *, out_dir: Path, rank: int, device: torch.device, engine=None, timeline: bool = False
    ):
        self.steps, self.out_dir, self.rank, self.device = steps, out_dir, rank, device
        self.engine, self.timeline = engine, timeline
        self.count = 0
        self.profiler = None
        if steps:
            out_dir.mkdir(parents=True, exist_ok=True)  # Horovod's timeline opens its file here early
            activities = [torch.profiler.ProfilerActivity.CPU]
            if device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(
                activities=activities,
                schedule=torch.profiler.schedule(wait=WAIT, warmup=WARMUP, active=steps, repeat=1),
                on_trace_ready=torch.profiler.tensorboard_trace_handler(str(out_dir), worker_name=f"rank{rank}"),
            )
            self.profiler.start()
            self._nvtx_push()

    def step(self) -> bool:
        """Call after every optimizer step; True once the N recorded steps are written."""
        if self.profiler is None:
            return False
        self.count += 1
        if self.device.type == "cuda":
            torch.cuda.nvtx.range_pop()
        if self.timeline and self.count == WAIT + WARMUP:
            self.engine.start_timeline(str(self.out_dir / "horovod_timeline.json"))
        self.profiler.step()
        if self.count == WAIT + WARMUP + self.steps:
            self.profiler.stop()
            if self.timeline:
                self.engine.stop_timeline()
            return True
        self._nvtx_push()
        return False

    def _nvtx_push(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.nvtx.range_push(f"step {self.count}")

    def trace_files(self) -> list[Path]:
        return sorted(self.out_dir.glob(f"rank{self.rank}.*.pt.trace.json*"))
