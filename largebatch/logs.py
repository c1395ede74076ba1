"""What rank 0 shows: the console (configuration, progress, epoch summaries) and
TensorBoard event files (tensorboardX, else ``torch.utils.tensorboard`` where the
``tensorboard`` package is installed, else none). Other ranks get silent stand-ins, so
the loop never asks who it is before it logs."""

from __future__ import annotations

import sys
import time

import torch


class Console:
    def __init__(self, enabled: bool, progress: str):
        self.enabled = enabled
        self.bar_mode = progress == "bar" or (progress == "auto" and sys.stderr.isatty())
        self._bar = None

    def print(self, text: str) -> None:
        if self.enabled:
            if self._bar is not None:
                self._bar.write(text)
            else:
                print(text, flush=True)

    def config(self, cfg_dict: dict, world: str) -> None:
        if self.enabled:
            width = max(map(len, cfg_dict))
            lines = [f"  {k:<{width}} {v}" for k, v in cfg_dict.items()]
            self.print(f"largebatch: {world}\n" + "\n".join(lines))

    def start_epoch(self, epoch: int, epochs: int, steps: int, done: int) -> None:
        self._epoch, self._epochs, self._steps = epoch, epochs, steps
        if self.enabled and self.bar_mode:
            from tqdm import tqdm

            self._bar = tqdm(
                total=steps,
                initial=done,
                desc=f"epoch {epoch + 1}/{epochs}",
                dynamic_ncols=True,
                leave=False,
                file=sys.stderr,
            )

    def progress(self, done: int, stats: dict) -> None:
        if not self.enabled:
            return
        text = (
            f"loss {stats['loss']:.4f} top1 {stats['top1']:.2f} lr {stats['lr']:.4g} "
            f"img/s {stats['images_per_sec']:.1f}"
        )
        if self._bar is not None:
            self._bar.n = done
            self._bar.set_postfix_str(text, refresh=True)
        else:
            print(f"epoch {self._epoch + 1}/{self._epochs} step {done}/{self._steps} {text}", flush=True)

    def end_epoch(self, summary: str) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self.print(summary)

    # --- how the loop's epochs end -----------------------------------------------------------

    def end_of_epoch(self, epoch: int, epochs: int, val: dict | None, notes: dict, ema: dict | None = None) -> None:
        """The epoch's line: its validation (``val``, None on an epoch --eval-every skips), the
        weights' average's (``ema``), and what the statistics before them cost (``notes``:
        --precise-bn's images and seconds)."""
        if val is None:
            line = f"epoch {epoch + 1}/{epochs}: checkpoint written (validated every --eval-every epochs)"
        else:
            line = (
                f"epoch {epoch + 1}/{epochs}: val loss {val['loss']:.4f} top1 {val['top1']:.2f} "
                f"top5 {val['top5']:.2f} ({val['count']} images)"
            )
        if ema is not None:
            line += f"; EMA val loss {ema['loss']:.4f} top1 {ema['top1']:.2f} top5 {ema['top5']:.2f}"
        if "precise_bn/seconds" in notes:
            images, seconds = notes["precise_bn/images"], notes["precise_bn/seconds"]
            line += f"; batch norm re-estimated over {images:.0f} images in {seconds:.1f} s"
        self.end_epoch(line)

    def reached(self, target: float | None, reached: dict) -> None:
        self.print(
            f"reached --target-top1 {target:g}: top1 {reached['top1']:.2f} at epoch {reached['epoch']}, after "
            f"{reached['seconds']:.1f} s of training; checkpoint written"
        )

    def stopped(self, reason: str | None, epoch: int, step: int | None) -> None:
        """A stop request honoured, its checkpoint written: mid-epoch at ``step``, or at the
        epoch's end (``step`` None)."""
        where = f"at epoch {epoch + 1} step {step}" if step is not None else f"at the end of epoch {epoch + 1}"
        self.end_epoch(f"stopped by {reason} {where}; checkpoint written, resume with --resume auto")

    def diverged(self, nonfinite_steps: int, step: int, limit: int) -> None:
        self.end_epoch(
            f"stopped: the loss was not finite in {nonfinite_steps} optimizer step(s) up to step {step} "
            f"(--max-nonfinite-steps {limit}); the run diverged, its last finite checkpoint is kept"
        )

    def starved(self, epoch: int, trained: int, expected: int) -> None:
        self.end_epoch(
            f"stopped: epoch {epoch + 1} trained on {trained} of the {expected} images it read; the rest were "
            f"unreadable (see the warnings): fix or remove them, then --resume auto continues from the last "
            f"checkpoint"
        )


def summary_writer_class():
    """(SummaryWriter class, where it came from), or (None, why there is none): tensorboardX
    (the pinned install), else PyTorch's own writer, which needs the ``tensorboard`` package
    (a bare GPU machine's PyTorch often has that and not tensorboardX)."""
    try:
        from tensorboardX import SummaryWriter

        return SummaryWriter, "tensorboardX"
    except ImportError:
        pass
    try:
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter, "torch.utils.tensorboard"
    except ImportError:
        return None, "neither tensorboardX nor tensorboard is installed"


class Board:
    """TensorBoard scalars and histograms, written by rank 0 only. Without a writer package
    the run goes on without event files, and rank 0 says so once."""

    def __init__(self, log_dir, enabled: bool, purge_step: int | None = None):
        self.writer = None
        self.source = None
        if enabled:
            writer_class, self.source = summary_writer_class()
            if writer_class is None:
                print(
                    f"note: no TensorBoard event files for this run ({self.source}; "
                    f"pip install tensorboardX or tensorboard to get them)",
                    flush=True,
                )
            else:
                # purge_step drops events a resumed run is about to write again
                self.writer = writer_class(str(log_dir), purge_step=purge_step)

    def scalars(self, step: int, values: dict) -> None:
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)

    def trust_ratios(self, step: int, ratios: torch.Tensor | None) -> None:
        if self.writer is None or ratios is None or ratios.numel() == 0:
            return
        r = ratios.detach().float().cpu()
        self.writer.add_histogram("lars/trust_ratio", r.numpy(), step)
        self.scalars(
            step,
            {
                "lars/trust_min": r.min().item(),
                "lars/trust_median": r.median().item(),
                "lars/trust_max": r.max().item(),
            },
        )

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class Throughput:
    """Images per second between two reads."""

    def __init__(self):
        self.t = time.perf_counter()

    def rate(self, images: int) -> float:
        now = time.perf_counter()
        rate = images / max(now - self.t, 1e-9)
        self.t = now
        return rate
