"""Collect the benchmark results into one Markdown file: bench/results/benchmarks.md.

    .venv/bin/python bench/tables.py

Reads whichever of train.json, optimizer.json, input.json, gpu.json and convergence.json
are in bench/results/, and writes a section per file: the machine it ran on, the command,
the table. Every figure is a ratio against a baseline measured in the same run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine_line(m: dict) -> str:
    parts = [
        f"{m.get('cpu', 'CPU')} ({m.get('cores', m.get('cpus', '?'))} cores), "
        + (f"GPU {m['gpu']}" if m.get("gpu") else "no GPU")
    ]
    versions = [
        f"{name} {m[key]}"
        for name, key in (("torch", "torch"), ("torchvision", "torchvision"), ("Horovod", "horovod"))
        if m.get(key)
    ]
    if versions:
        parts.append(", ".join(versions))
    if m.get("load_average_at_start"):
        end = m.get("load_average_at_end")
        parts.append(
            f"load average {m['load_average_at_start'][0]:.1f} at the start"
            + (f", {end[0]:.1f} at the end" if end else "")
        )
    return "; ".join(parts)


def train_table(r: dict) -> list[str]:
    s = r["settings"]
    torch_engine = "job torch" in r["results"][0]["median_images_per_sec"]  # runs before the torch engine lack it
    lines = [
        f"{s['model']} at {s['image_size']} px, batch {s['batch_per_process']} per process, {s['input']}, "
        f"{s['threads_per_process']} thread(s) per process, {s['measured_steps']} measured steps; "
        f"median of {s['rounds']} interleaved rounds.",
        "",
        "| processes | reference loop, images/s | job (Horovod), images/s | job / reference "
        + ("| job (torch engine), images/s | that / reference " if torch_engine else "")
        + f"| job + checkpoint every {s['job_ckpt_checkpoint_every']} steps | that / reference |",
        "| ---: | ---: | ---: | ---: " + ("| ---: | ---: " if torch_engine else "") + "| ---: | ---: |",
    ]
    for row in r["results"]:
        m = row["median_images_per_sec"]
        torch_cells = f"| {m['job torch']:.1f} | {row['job torch / reference']['median']:.3f} " if torch_engine else ""
        lines.append(
            f"| {row['processes']} | {m['reference']:.1f} | {m['job']:.1f} "
            f"| {row['job / reference']['median']:.3f} {torch_cells}| {m['job + ckpt']:.1f} "
            f"| {row['job + ckpt / reference']['median']:.3f} |"
        )
    return lines


def optimizer_table(r: dict) -> list[str]:
    s = r["settings"]
    lines = [
        f"One optimizer step over {s['model']}'s {s['parameters'] / 1e6:.1f}M parameters ({s['tensors']} tensors) "
        f"on {s['device']}"
        + (f", {s['threads']} thread(s)" if s.get("threads") else "")
        + f"; median of {s['rounds']} interleaved rounds of {s['steps_per_round']} steps.",
        "",
        "| optimizer | ms per step | vs SGD (foreach) |",
        "| --- | ---: | ---: |",
    ]
    lines += [f"| {row['optimizer']} | {row['ms_per_step']:.2f} | {row['vs_sgd']:.2f}x |" for row in r["results"]]
    lines += [
        "",
        f"LARS (lars.py) is {r['lars_speedup_over_per_tensor']:.2f}x as fast as the per-tensor loop "
        f"(same weights after two steps: {'yes' if r['per_tensor_lars_matches_lars'] else 'NO'}).",
    ]
    return lines


def input_table(r: dict) -> list[str]:
    s = r.get("settings", {})
    lines = [
        f"{s.get('train_images', '?')} training JPEGs, batch {s.get('batch', '?')}, {s.get('crop', '?')} px crops, "
        f"{s.get('workers_or_threads', '?')} loader workers / DALI threads; {s.get('rate', '')}.",
        "",
        "| pipeline | images/s | vs torchvision |",
        "| --- | ---: | ---: |",
    ]
    lines += [
        f"| {row['pipeline']} | {row['images_per_s']:.1f} | {row['ratio_vs_torchvision']:.2f}x |"
        for row in r["results"]
    ]
    return lines


def gpu_table(r: dict) -> list[str]:
    s = r["settings"]
    lines = [
        f"{s['model']}, {s['image_size']} px, batch {s['batch']}, channels-last, 1 process; "
        f"median of {s['rounds']} run(s)." + (" SMOKE TEST ON A CPU: the numbers mean nothing." if s["smoke"] else ""),
        "",
        "| precision | input | images/s | arithmetic limit | of the limit | vs NVIDIA A100 AMP (2,470) "
        "| vs MLPerf H100 (7,160) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in r["results"]:
        limit = f"{row['arithmetic_limit']:,}" if row["arithmetic_limit"] else "-"
        share = f"{100 * row['fraction_of_limit']:.1f}%" if row["fraction_of_limit"] else "-"
        lines.append(
            f"| {row['precision']} | {row['input']} | {row['images_per_sec']:,.1f} | {limit} | {share} "
            f"| {row['vs_nvidia_a100_amp']:.2f}x | {row['vs_mlperf_h100']:.2f}x |"
        )
    return lines


def convergence_table(r: dict) -> list[str]:
    confs = r["configurations"]
    lines = [
        f"ResNet-18 on the digits, {r['epochs']} epochs, seeds {', '.join(map(str, r['seeds']))}.",
        "",
        "| configuration | global batch | optimizer, lr, warmup epochs | final val top-1, mean ± std | min - max "
        "| vs small batch |",
        "| --- | ---: | --- | ---: | ---: | ---: |",
    ]
    for g in r["groups"]:
        c = confs[g["label"]]
        lines.append(
            f"| {g['label']} | {c['batch']} | {c['op'].upper()}, {c['lr']:g}, {c['warmup']:g} | "
            f"{g['final_val_top1_mean']:.2f} ± {g['final_val_top1_std']:.2f} | "
            f"{g['final_val_top1_min']:.2f} - {g['final_val_top1_max']:.2f} | {g['gap_to_small_batch']:+.2f} |"
        )
    return lines


SECTIONS = [
    ("train.json", "Training throughput: our job against a minimal Horovod loop", train_table),
    ("optimizer.json", "Optimizer step cost", optimizer_table),
    ("input.json", "Input pipeline: DALI against the torchvision DataLoader", input_table),
    ("gpu.json", "GPU: ResNet-50 images/s by precision and input", gpu_table),
    ("convergence.json", "Convergence: small batch against large batch", convergence_table),
]


def main() -> int:
    out = ["# Benchmark results", "", "Written by `bench/tables.py` from bench/results/*.json.", ""]
    for name, title, render in SECTIONS:
        path = RESULTS / name
        if not path.is_file():
            continue
        result = json.loads(path.read_text())
        out += [f"## {title}", ""]
        if "machine" in result:
            out += [f"Machine: {machine_line(result['machine'])}.  ", f"Command: `{result.get('command', '?')}`", ""]
        try:
            out += render(result)
        except (KeyError, TypeError) as e:  # a results file from another version of its script
            out += [f"(could not read {name}: missing {e})"]
        out.append("")
    text = "\n".join(out)
    (RESULTS / "benchmarks.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
