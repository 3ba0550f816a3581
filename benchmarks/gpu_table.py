"""The markdown table of benchmarks/gpu_suite.sh's results (gpu.jsonl: one JSON line per benchmark script run).

    python -m benchmarks.gpu_table runs/gpu/gpu.jsonl > runs/gpu/gpu.md

Rows: the small DiT's training throughput and MFU (eager, torch.compile); FLUX.1's LoRA step, RATS step and GRPO step
(seconds, peak GB), then the RATS paper's efficiency table for comparison. A failed run is a row with its error.
"""
from __future__ import annotations

import json
import sys

PAPER = [("RATS (paper, FLUX)", 7.57, 67.67), ("SenseFlow (paper, FLUX)", 7.31, 78.87),
         ("DanceGRPO (paper, FLUX)", 212.71, 34.05)]


def peak_gb(r: dict) -> str:
    """Peak memory: CUDA max allocated (and reserved) in GiB on a GPU, the process's peak RSS on a CPU."""
    if "peak_allocated_GiB" in r:
        return f"{r['peak_allocated_GiB']} (reserved {r['peak_reserved_GiB']})"
    return f"{r.get('peak_rss_GiB', '')} (CPU RSS)"


def what(r: dict) -> str:
    b = r.get("benchmark", "?")
    if b == "dit_train_throughput":
        return f"small DiT train step ({r['preset']}, {r['dtype']}{' + bf16 autocast' if r.get('amp') else ''}, " \
               f"batch {r['batch']}, " \
               f"{'torch.compile' if r['compile'] else 'eager'})"
    if b == "flux1_lora_step":
        return f"FLUX.1 LoRA step (r{r['lora_rank']}, {r['height']} px, batch {r['batch']})"
    if b == "flux1_rats_step":
        return f"FLUX.1 RATS step (K {r['nfe']}, N {r['teacher_nfe']}, batch {r['batch']}, teacher {r['teacher_copy']})"
    if b == "flux1_grpo_step":
        return f"FLUX.1 GRPO step of otca.py (K {r['nfe']}, G {r['group_size']}, micro-batch {r['micro_batch']}, " \
               f"fraction {r['train_fraction']})"
    return b


def table(records: list[dict]) -> str:
    lines = ["| benchmark | device | step s (median) | peak GB | samples/s | TFLOP/s | MFU | calls per step |",
             "|---|---|---|---|---|---|---|---|"]
    for r in records:
        if "error" in r:
            lines.append(f"| {r.get('argv', r.get('benchmark'))} | | failed: {r['error']} | | | | | |")
            continue
        calls = " ".join(f"{k}={v:g}" for k, v in r.get("calls_per_step", {}).items())
        lines.append(f"| {what(r)} | {r.get('device_name', '')} | {r['step_s_median']} | {peak_gb(r)} | "
                     f"{r.get('samples_per_s', '')} | {r.get('achieved_tflops', '')} | {r.get('mfu') or ''} | "
                     f"{calls} |")
    if any(r.get("benchmark", "").startswith("flux1_") for r in records):
        for name, s, gb in PAPER:
            lines.append(f"| {name} | (the paper's GPU) | {s} | {gb} | | | | |")
    smoke = any(r.get("tiny") or r.get("preset") == "tiny" for r in records if "error" not in r)
    head = "Smoke run (tiny sizes on a CPU): the code paths, not figures.\n\n" if smoke else ""
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m benchmarks.gpu_table GPU.jsonl", file=sys.stderr)
        sys.exit(2)
    try:
        with open(argv[0]) as f:
            records = [json.loads(line) for line in f if line.strip()]
    except (OSError, json.JSONDecodeError) as e:
        print(f"error: {argv[0]}: {e}", file=sys.stderr)
        sys.exit(2)
    print(table(records), end="")


if __name__ == "__main__":
    main()
