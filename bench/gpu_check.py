"""The GPU check: one command for a bare GPU machine, timed parts, a table however far it got.

    python3 bench/gpu_check.py --out gpu-check [--budget 420] [--compile-mode default]
    python3 bench/gpu_check.py --smoke --out /tmp/smoke   # CPU, tiny sizes, < 2 minutes

On a bare machine without `make setup`, the checkout's root goes on the Python path (the
exact command is in docs/gpu.md).

(--smoke compiles with the aot_eager backend unless LARGEBATCH_COMPILE_BACKEND says otherwise.)

Needs only PyTorch and torchvision (no Horovod, DALI, tensorboardX, launcher or network):
the torch engine with no launcher variables is a one-process group. What it measures goes
through the job's own pieces (``parse_config``, ``job.start_engine``, ``job.pick_device``,
``job.build_state``, ``train.train_step``, ``FolderInput``), so the numbers are the job's.

Parts, in this order (the most wanted first), each timed:

  train    ResNet-50 at 224 px, synthetic input (one fixed batch, so the loss must fall),
           one GPU, batch ``--batch-size``: images/s over the measured steps, peak GPU
           memory, whether every loss was finite and the last below the first, and the
           first (compiling) step's time. Rows: bf16 channels-last eager and compiled, then
           every precision level channels-last (fp32 with PyTorch's TF32 default for cuDNN
           convolutions, amp = O1, amp-bf16, O2, O3 with fp32 batch norm, bf16), then the
           same channels-first, then compiled channels-last for every level.
  input    the torchvision folder path on a generated JPEG folder: the job's FolderInput
           (uint8 batches, CudaPrefetcher on the GPU) against a plain DataLoader with float
           transforms and a synchronous copy, images/s over one epoch each.
  optim    one optimizer step over ResNet-50's parameters on the GPU: SGD (foreach), LARS
           and LAMB (lars.py), and a per-tensor LARS with ``.item()`` host syncs.
  dali     DALI's GPU pipeline (``--dali-device gpu``) on the same folder, only where
           ``nvidia.dali`` imports.

The results are rewritten after every part into ``DIR/gpu_check.json`` and
``DIR/gpu_check.md``. A part starts only when the time left in ``--budget`` covers its
estimate (compiled rows: the slowest compiled row so far), and a part still running when the
budget ends is stopped, so a short lease still leaves a table. Exit status 0 when every part
that ran did, 1 when one failed (its error is in the table).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

# Siblings in bench/ (bench_optimizer, machine) import as top-level modules: `python
# bench/gpu_check.py` puts the script's directory first on the path. largebatch comes from the
# install, or on a bare machine from the checkout's root on the Python path (docs/gpu.md).
from largebatch import job
from largebatch.argparsing import UsageError
from largebatch.config import parse_config
from largebatch.metrics import Meter
from largebatch.train import train_step

ANCHORS = [
    ("NVIDIA DeepLearningExamples, PyTorch ResNet-50 v1.5, 1x A100, AMP", 2470),
    ("MLPerf Training v4.0, ResNet-50 (MXNet, DALI, CUDA graphs), per H200", 7950),
]
GOALS = {"bf16, channels-last, synthetic, eager": 3000, "bf16, channels-last, synthetic, compiled": 5000}
LEVELS = {  # the job's flags for each precision level
    "fp32": ["--precision", "fp32"],
    "amp": ["--precision", "amp"],
    "amp-bf16": ["--precision", "amp-bf16"],
    "O2": ["--opt-level", "O2"],
    "O3 (fp32 BN)": ["--opt-level", "O3", "--keep-batchnorm-fp32"],
    "bf16": ["--precision", "bf16"],
}


class OutOfTime(Exception):
    pass


def _alarm(signum, frame):
    raise OutOfTime()


# --- sizes ------------------------------------------------------------------------------------


def sizes(args) -> dict:
    if args.smoke:
        return dict(
            model="resnet18",
            image_size=32,
            batch=8,
            warmup=1,
            steps=2,
            classes=10,
            folder_images=64,
            folder_batch=16,
            optim_model="resnet18",
            optim_steps=1,
            estimate_train=15,
            estimate_compiled=90,
            estimate_input=30,
            estimate_optim=15,
        )
    return dict(
        model=args.model,
        image_size=224,
        batch=args.batch_size,
        warmup=args.warmup_steps,
        steps=args.steps,
        classes=1000,
        folder_images=args.folder_images,
        folder_batch=128,
        optim_model="resnet50",
        optim_steps=20,
        estimate_train=25,
        estimate_compiled=120,
        estimate_input=60,
        estimate_optim=20,
    )


def train_rows(args) -> list[dict]:
    cl = [(level, True, None) for level in LEVELS]
    first = [("bf16", True, None), ("bf16", True, args.compile_mode)]
    if args.smoke:  # every code path once: eager levels (fp16 ones say they need a GPU), one compiled
        return [
            {"level": lv, "channels_last": c, "compile": m}
            for lv, c, m in [
                *first,
                ("fp32", False, None),
                ("amp-bf16", True, None),
                ("amp", True, None),
                ("O2", True, None),
            ]
        ]
    rest = [x for x in cl if x not in first]
    channels_first = [(level, False, None) for level in LEVELS]
    compiled = [(level, True, args.compile_mode) for level in LEVELS if level != "bf16"]
    return [
        {"level": lv, "channels_last": c, "compile": m}
        for lv, c, m in [*first, *rest, *channels_first, *compiled, ("bf16", False, args.compile_mode)]
    ]


# --- the parts ----------------------------------------------------------------------------------


class Check:
    def __init__(self, args):
        self.args, self.size = args, sizes(args)
        self.start = time.monotonic()
        self.parts: list[dict] = []
        self.engine = None
        self.scratch = Path(tempfile.mkdtemp(prefix="gpu-check-"))
        self.folder: Path | None = None
        self.slowest_compile = 0.0
        self.failed = False

    def left(self) -> float:
        return self.args.budget - (time.monotonic() - self.start)

    def config(self, extra: list[str], entry: str = "folder"):
        s = self.size
        argv = [
            "--model",
            s["model"],
            "--image-size",
            str(s["image_size"]),
            "--batch-size",
            str(s["batch"]),
            "--val-batch-size",
            str(s["batch"]),
            "--engine",
            "torch",
            "--base-op",
            self.args.base_op,
            "--base-lr",
            "0.1",
            "--warmup-epochs",
            "0",
            "--epochs",
            "1",
            "--workers",
            str(self.args.workers),
            "--log-dir",
            str(self.scratch / "run"),
            "--progress",
            "lines",
            *(["--no-cuda"] if self.args.cpu else []),
            *extra,
        ]
        return parse_config(argv, entry)

    def ensure_engine(self, cfg):
        if self.engine is None:
            self.engine = job.start_engine(cfg)
        return self.engine

    def run_part(self, kind: str, name: str, estimate: float, fn) -> None:
        record = {"part": kind, "name": name}
        left = self.left()
        if left < estimate:
            record.update(status="not run", why=f"budget: {left:.0f} s left, the part needs about {estimate:.0f} s")
            self.parts.append(record)
            self.write()
            return
        print(f"gpu_check: {kind} {name} ({left:.0f} s of the budget left)", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, max(left, 1.0))
        try:
            record.update(status="ok", **fn())
        except OutOfTime:
            record.update(status="stopped", why="the budget ran out during this part")
        except UsageError as e:  # the job's own refusals (fp16 levels on CPU, say)
            record.update(status="skipped", why=str(e))
        except Exception as e:  # noqa: BLE001 (the table says what failed, the other parts still run)
            record.update(status="failed", why=f"{type(e).__name__}: {e}".splitlines()[0][:300])
            traceback.print_exc()
            self.failed = True
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            record["seconds"] = round(time.monotonic() - t0, 1)
            self.cleanup()
        print(
            f"gpu_check: {kind} {name}: {record['status']} in {record['seconds']} s "
            f"{ {k: v for k, v in record.items() if k not in ('part', 'name', 'status', 'seconds')} }",
            file=sys.stderr,
            flush=True,
        )
        self.parts.append(record)
        self.write()

    @staticmethod
    def cleanup() -> None:
        torch._dynamo.reset()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # training: the job's state and step ----------------------------------------------------
    def train(self, level: str, channels_last: bool, compile_mode: str | None) -> dict:
        s = self.size
        flags = [
            *LEVELS[level],
            "--synthetic",
            "--synthetic-size",
            str(s["batch"] * 4),
            "--num-classes",
            str(s["classes"]),
            "--channels-last" if channels_last else "--no-channels-last",
        ]
        if compile_mode:
            flags += ["--compile", compile_mode]
        cfg = self.config(flags)
        engine = self.ensure_engine(cfg)
        device = job.pick_device(cfg, engine)  # refuses fp16 levels without a GPU (UsageError)
        job.configure_determinism(False, cfg.run.seed)
        data = job.build_input(cfg, engine, device)
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        state = job.build_state(cfg, engine, device, data.num_classes, steps_per_epoch=10_000)
        state.start(None)
        state.model.train()
        batch = [(data.images[0], data.labels[0])]  # one fixed batch: the loss has to fall
        meter = Meter(device, state.classifier.hits)

        def sync():
            if cuda:
                torch.cuda.synchronize(device)

        t0 = time.perf_counter()
        train_step(state, batch, meter)
        sync()
        first_step = time.perf_counter() - t0
        for _ in range(s["warmup"] - 1):
            train_step(state, batch, meter)
        sync()
        sums = [meter.sums[0].clone()]
        t0 = time.perf_counter()
        for _ in range(s["steps"]):
            train_step(state, batch, meter)
            sums.append(meter.sums[0].clone())  # on the device: no host sync inside the timing
        sync()
        seconds = time.perf_counter() - t0
        totals = torch.stack(sums).cpu().tolist()
        losses = [(b - a) / s["batch"] for a, b in zip(totals, totals[1:])]  # each measured step's loss
        finite = all(abs(x) < float("inf") for x in losses)  # False for inf and NaN
        out = {
            "images_per_sec": round(s["steps"] * s["batch"] / seconds, 1),
            "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if cuda else None,
            "loss_first": round(losses[0], 4) if losses else None,
            "loss_last": round(losses[-1], 4) if losses else None,
            "loss_finite": finite,
            "loss_falls": bool(losses and finite and losses[-1] < losses[0]),
            "first_step_s": round(first_step, 1),
            "skipped_steps": getattr(state.precision, "skipped_steps", 0),
        }
        if compile_mode:
            self.slowest_compile = max(self.slowest_compile, first_step + seconds)
        del state, data, batch, meter
        return out

    # input: FolderInput (prefetcher on a GPU) against a plain DataLoader ---------------------
    def make_folder(self) -> Path:
        if self.folder is None:
            self.folder = make_jpeg_folder(self.scratch / "images", self.size["folder_images"], small=self.args.smoke)
        return self.folder

    def input(self) -> dict:
        from torch.utils.data import DataLoader

        from largebatch.data.folder import FolderInput, _collate, _open, train_transform
        from largebatch.data.sampler import TrainShard

        folder = self.make_folder()
        s = self.size
        cfg = self.config(
            [
                "--train-dir",
                str(folder / "train"),
                "--val-dir",
                str(folder / "val"),
                "--batch-size",
                str(s["folder_batch"]),
            ]
        )
        engine = self.ensure_engine(cfg)
        device = job.pick_device(cfg, engine)
        cuda = device.type == "cuda"

        def consume(batches) -> float:
            n, t0, total = 0, time.perf_counter(), torch.zeros((), device=device)
            for images, labels in batches:
                total += images[:, 0, 0, 0].float().sum()  # touch the batch on the device
                n += labels.numel()
            if cuda:
                torch.cuda.synchronize(device)
            return n / (time.perf_counter() - t0)

        job_input = FolderInput(cfg, 0, 1, device)
        consume(job_input.train(0))  # warm: worker start-up, page cache
        job_rate = consume(job_input.train(1))
        plain_set = _open(cfg.data.train_dir, "--train-dir", train_transform(cfg, uint8=False))
        loader = DataLoader(
            plain_set,
            batch_size=s["folder_batch"],
            drop_last=True,
            collate_fn=_collate,
            sampler=TrainShard(len(plain_set), 0, 1, cfg.run.seed, 1),
            num_workers=cfg.data.workers,
        )
        plain_rate = consume((images.to(device), labels.to(device)) for images, labels, _ in loader)
        return {
            "images": len(job_input.train_set),
            "workers": cfg.data.workers,
            "path": "FolderInput: uint8 + CudaPrefetcher" if cuda else "FolderInput on CPU (no prefetcher)",
            "images_per_sec": round(job_rate, 1),
            "plain_dataloader_images_per_sec": round(plain_rate, 1),
            "vs_plain": round(job_rate / plain_rate, 2),
        }

    def dali(self) -> dict:
        try:
            import nvidia.dali  # noqa: F401
        except ImportError as e:
            raise UsageError(f"nvidia.dali does not import ({e})") from None
        from largebatch.data.dali import DaliInput

        folder = self.make_folder()
        s = self.size
        cfg = self.config(
            [
                "--data-dir",
                str(folder),
                "--data-format",
                "folder",
                "--batch-size",
                str(s["folder_batch"]),
                "--dali-device",
                "gpu" if torch.cuda.is_available() and not self.args.cpu else "cpu",
            ],
            entry="dali",
        )
        engine = self.ensure_engine(cfg)
        device = job.pick_device(cfg, engine)
        data = DaliInput(cfg, 0, 1, device)
        rates = []
        for epoch in range(2):  # the first warms the pipeline
            n, t0 = 0, time.perf_counter()
            for _images, labels in data.train(epoch):
                n += labels.numel()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            rates.append(n / (time.perf_counter() - t0))
        return {"dali_device": cfg.dali.dali_device, "images_per_sec": round(rates[-1], 1)}

    # optimizer step -----------------------------------------------------------------------------
    def optim(self) -> dict:
        import bench_optimizer as bo
        import torchvision

        device = torch.device("cuda" if torch.cuda.is_available() and not self.args.cpu else "cpu")
        torch.manual_seed(0)
        model = torchvision.models.get_model(self.size["optim_model"], weights=None).to(device)
        grads = [torch.randn_like(p) * 0.01 for p in model.parameters()]
        out = {
            "device": str(device),
            "tensors": len(grads),
            "parameters_m": round(sum(g.numel() for g in grads) / 1e6, 1),
        }
        for name in bo.NAMES:
            opt = bo.build(name, bo.replica(model, grads))
            opt.step()  # creates the state (momentum buffers)
            bo.sync(device)
            t0 = time.perf_counter()
            for _ in range(self.size["optim_steps"]):
                opt.step()
            bo.sync(device)
            out[f"{name} ms"] = round(1000 * (time.perf_counter() - t0) / self.size["optim_steps"], 3)
            del opt
        out["per_tensor_lars_matches_lars"] = bo.naive_matches_lars(model, grads)
        return out

    # output -------------------------------------------------------------------------------------
    def report(self) -> dict:
        from machine import describe

        return {
            "command": " ".join(["python bench/gpu_check.py", *self.args.argv]),
            "machine": describe(),
            "budget_s": self.args.budget,
            "elapsed_s": round(time.monotonic() - self.start, 1),
            "settings": {
                **self.size,
                "base_op": self.args.base_op,
                "compile_mode": self.args.compile_mode,
                "smoke": self.args.smoke,
                "engine": "torch, 1 process",
            },
            "anchors": [{"source": s, "images_per_sec": v} for s, v in ANCHORS],
            "goals_h200": GOALS,
            "parts": self.parts,
        }

    def write(self) -> None:
        out = self.args.out
        out.mkdir(parents=True, exist_ok=True)
        rep = self.report()
        (out / "gpu_check.json").write_text(json.dumps(rep, indent=1) + "\n")
        (out / "gpu_check.md").write_text(markdown(rep))


def markdown(rep: dict) -> str:
    m, st = rep["machine"], rep["settings"]
    lines = [
        f"# GPU check: {m.get('gpu') or 'CPU (smoke test: the numbers mean nothing)'}",
        "",
        f"torch {m.get('torch')}, torchvision {m.get('torchvision')}, Python {m.get('python')}, "
        f"{m.get('cores')} cores; {rep['elapsed_s']} s of a {rep['budget_s']} s budget. "
        f"`{rep['command']}`",
        "",
        f"## Training: {st['model']}, {st['image_size']} px, batch {st['batch']}, synthetic, 1 process, "
        f"torch engine, {st['base_op']}; {st['steps']} measured steps after {st['warmup']}",
        "",
        "| precision | channels-last | compile | images/s | peak GiB | loss first → last | finite | falls "
        "| first step s | status |",
        "| --- | --- | --- | ---: | ---: | --- | --- | --- | ---: | --- |",
    ]
    for p in rep["parts"]:
        if p["part"] != "train":
            continue
        level, cl, comp = p["name"].split(" | ")
        if p["status"] == "ok":
            lines.append(
                f"| {level} | {cl} | {comp} | {p['images_per_sec']:,.1f} | {p['peak_memory_gib'] or '-'} "
                f"| {p['loss_first']} → {p['loss_last']} | {'yes' if p['loss_finite'] else 'NO'} "
                f"| {'yes' if p['loss_falls'] else 'NO'} | {p['first_step_s']} | ok |"
            )
        else:
            lines.append(f"| {level} | {cl} | {comp} | - | - | - | - | - | - | {p['status']}: {p.get('why', '')} |")
    lines += [
        "",
        "Published: "
        + "; ".join(f"{s}: {v:,} img/s" for s, v in ANCHORS)
        + ". Goal on one H200: "
        + "; ".join(f"{k} >= {v:,} img/s" for k, v in GOALS.items())
        + ".",
        "",
    ]
    for p in rep["parts"]:
        if p["part"] == "train":
            continue
        lines.append(f"## {p['part']}: {p['name']} ({p['status']}, {p.get('seconds', 0)} s)")
        lines.append("")
        for k, v in p.items():
            if k not in ("part", "name", "status", "seconds"):
                lines.append(f"- {k}: {v}")
        lines.append("")
    return "\n".join(lines) + "\n"


def make_jpeg_folder(root: Path, count: int, classes: int = 10, small: bool = False, seed: int = 0) -> Path:
    """ImageNet-sized JPEGs (shorter side 256-400 px; 40-64 px for --smoke): smooth colour
    fields with noise, written with PIL only (no data set, no network). Returns the root of
    train/ and val/ (val: a tenth, at least one per class)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", count), ("val", max(classes, count // 10))):
        for i in range(n):
            short = int(rng.integers(40, 65) if small else rng.integers(256, 401))
            h, w = (short, int(short * rng.uniform(1.0, 1.5)))[:: 1 if i % 2 else -1]
            y, x = np.mgrid[0:h, 0:w].astype(np.float32)
            base = rng.uniform(0, 255, 3) + 60 * np.sin(x[..., None] / rng.uniform(5, 40) + y[..., None] / 30)
            pixels = np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
            folder = root / split / f"class{i % classes}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=90)
    return root


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json and gpu_check.md")
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds for all parts (default 420; --smoke: 110): no part starts that would not fit",
    )
    p.add_argument("--model", default="resnet50")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--warmup-steps", type=int, default=10, help="steps before the measured ones (cuDNN autotuning)")
    p.add_argument("--steps", type=int, default=30, help="measured steps per training row")
    p.add_argument(
        "--base-op",
        choices=["sgd", "lars", "lamb"],
        default="sgd",
        help="the optimizer of the training rows (sgd, as in the published figures)",
    )
    p.add_argument("--compile-mode", choices=["default", "reduce-overhead", "max-autotune"], default="default")
    p.add_argument("--workers", type=int, default=min(12, os.cpu_count() or 1), help="data loader processes")
    p.add_argument("--folder-images", type=int, default=1024, help="JPEGs in the generated folder")
    p.add_argument("--parts", default="train,optim,input,dali", help="which parts, comma-separated")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="on CPU, tiny sizes (resnet18, 32 px, 3 steps): checks the code paths; numbers mean nothing",
    )
    args = p.parse_args(argv)
    args.argv = argv
    args.cpu = args.smoke or not torch.cuda.is_available()
    if args.budget is None:
        args.budget = 110.0 if args.smoke else 420.0
    if args.cpu and not args.smoke:
        print("gpu_check.py: no CUDA GPU visible; use --smoke for a CPU check of the code paths", file=sys.stderr)
        return 2
    if args.smoke:
        # Inductor's C++ builds take minutes for resnet18 on a small CPU machine; the smoke test
        # checks the seam (Dynamo's capture and AOTAutograd through DDP), not code generation.
        os.environ.setdefault("LARGEBATCH_COMPILE_BACKEND", "aot_eager")
    if args.cpu:
        torch.set_num_threads(min(2, os.cpu_count() or 1))
        args.workers = min(args.workers, 1)
    wanted = set(args.parts.split(","))
    check = Check(args)
    s = check.size
    train = [] if "train" not in wanted else train_rows(args)

    def train_part(row):
        name = f"{row['level']} | {'on' if row['channels_last'] else 'off'} | {row['compile'] or 'off'}"
        estimate = max(s["estimate_compiled"], check.slowest_compile) if row["compile"] else s["estimate_train"]
        check.run_part("train", name, estimate, lambda: check.train(row["level"], row["channels_last"], row["compile"]))

    # The headline pair, the other levels channels-last, the cheap other parts, then the
    # channels-first rows and the other compiled ones (the most expensive: a compile each).
    for row in [r for r in train if r["channels_last"] or args.smoke]:
        if not row["compile"] or row in train[:2]:
            train_part(row)
    if "optim" in wanted:
        check.run_part("optim", "optimizer step", s["estimate_optim"], check.optim)
    if "input" in wanted:
        check.run_part("input", "folder input", s["estimate_input"], check.input)
    if "dali" in wanted:
        check.run_part("dali", "DALI pipeline", s["estimate_input"], check.dali)
    for row in [r for r in train if not r["channels_last"] and not args.smoke and not r["compile"]]:
        train_part(row)
    for row in [r for r in train if r["compile"] and r not in train[:2]]:
        train_part(row)
    check.write()
    print(markdown(check.report()))
    print(f"wrote {args.out / 'gpu_check.json'} and {args.out / 'gpu_check.md'}")
    if check.engine is not None:
        check.engine.close()
    return 1 if check.failed else 0


if __name__ == "__main__":
    sys.exit(main())
