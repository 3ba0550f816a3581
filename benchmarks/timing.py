"""What every stand-alone benchmark script shares: device and dtype choice, the timed loop, the JSON report."""
from __future__ import annotations

import json
import resource
import sys
import time
from typing import Callable

import torch


def device_and_dtype(device: str | None, dtype: str | None) -> tuple[torch.device, torch.dtype]:
    """cuda when available (else cpu); bf16 on GPU, fp32 on CPU unless asked. A cuda request without a visible
    device is a user error: one line, exit status 2."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is visible", file=sys.stderr)
        sys.exit(2)
    return dev, {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype or ("bf16" if dev.type == "cuda" else "fp32")]


def time_steps(step: Callable[[], object], warmup: int, steps: int, device: torch.device,
               after_warmup: Callable[[], None] | None = None):
    """Run `warmup` untimed steps, reset the CUDA peak-memory counter (and call after_warmup, e.g. to zero call
    counters), then time `steps` steps (synchronised on a GPU). Returns (per-step seconds, the last step's return
    value, warm-up seconds)."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    sync()
    t_warm = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if after_warmup is not None:
        after_warmup()
    times, out = [], None
    for _ in range(steps):
        t0 = time.perf_counter()
        out = step()
        sync()
        times.append(time.perf_counter() - t0)
    return times, out, t_warm


def median(times: list[float]) -> float:
    return sorted(times)[len(times) // 2]


def report(res: dict, device: torch.device, out: str | None) -> dict:
    """Add peak memory (CUDA allocated and reserved on a GPU; the process's peak RSS on a CPU: Linux ru_maxrss is
    in KiB), print the result as one JSON line and write it to `out` when given."""
    if device.type == "cuda":
        res["peak_allocated_GiB"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        res["peak_reserved_GiB"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 2)
    else:
        res["peak_rss_GiB"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
    line = json.dumps(res)
    print(line)
    if out:
        with open(out, "w") as f:
            f.write(line + "\n")
    return res
