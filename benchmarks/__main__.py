"""`python -m benchmarks --out DIR [--quick] [--only rats,otca] [--no-targets]` (what `make bench` runs).

Every case is one process (`python -m benchmarks.harness METHOD --json F -- FLAGS`), so that the peak resident set
size belongs to that case alone. Writes to DIR:
  records.json      every case's raw record (benchmarks/harness.py: measure)
  per_step.md/json  time, network evaluations, samples/s, peak memory and overhead ratio per method and backend
  scaling.md/json   step time against K, the teacher's N (RATS), the group size G (OTCA) and the resolution
  targets.md/json   wall time of each script's default toy run (the issue's 1 / 1 / 2 minute targets)
  machine.json      CPU, cores, load average before and after, torch version
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from common.evaluate import write_table  # noqa: E402

TINY_REWARD = {"rats": {"flux": "hps", "wan": "frames:hps", "sd3": "hps", "flux2": "hps"},
               "otca": {"flux": "hps,clip", "wan": "temporal_consistency,motion_smoothness", "sd3": "hps,clip",
                        "flux2": "hps,clip"},
               "rtdmd": {"flux": "hps", "wan": "clip", "sd3": "hps", "flux2": "hps"}}
TINY_BACKENDS = ("flux", "wan", "sd3", "flux2")


def method_flags(method: str, backend: str, quick: bool) -> list[str]:
    """Short runs of each script (a handful of steps): enough for a median step time, small evaluations."""
    n = 4 if quick else 8
    if method == "rats":
        if backend == "toy2d":
            return ["--steps", str(n), "--eval-size", "64"]
        if backend == "dit":
            return ["--teacher", "dit", "--tiny", "--steps", str(n // 2 + 1), "--batch-size", "4",
                    "--teacher-nfe", "20", "--eval-size", "4", "--eval-batch", "4", "--device", "cpu"]
        return ["--teacher", backend, "--tiny", "--steps", str(n), "--reward", TINY_REWARD[method][backend],
                "--nfe", "2", "--teacher-nfe", "8", "--batch-size", "1", "--grad-accum", "1", "--eval-size", "2",
                "--eval-batch", "2", "--precision", "fp32", "--device", "cpu"]   # CPU: bf16 autocast only adds casts
    if method == "otca":
        if backend == "toy2d":
            return ["--steps", str(n), "--eval-samples", "64"]
        if backend == "dit":
            return ["--teacher", "dit", "--tiny", "--steps", str(n // 2 + 1), "--group-size", "4",
                    "--prompts-per-step", "1", "--eval-samples", "4", "--device", "cpu"]
        return ["--teacher", backend, "--tiny", "--steps", str(n // 2 + 1), "--reward", TINY_REWARD[method][backend],
                "--nfe", "4", "--group-size", "2", "--prompts-per-step", "1", "--micro-batch", "0",
                "--eval-samples", "4", "--precision", "fp32", "--device", "cpu"]
    if backend == "toy2d":   # rtdmd
        return ["--steps", str(5 * n), "--epochs", str(n // 2 + 1), "--eval-samples", "200"]
    if backend == "dit":
        return ["--teacher", "dit", "--tiny", "--steps", str(n), "--epochs", "3", "--batch", "4", "--groups", "1",
                "--group-size", "4", "--fake-ratio", "2", "--device", "cpu"]
    return ["--teacher", backend, "--tiny", "--steps", str(2 * n), "--epochs", "3", "--batch", "1", "--groups", "1",
            "--group-size", "2", "--fake-ratio", "2", "--reward", TINY_REWARD[method][backend], "--device", "cpu",
            "--precision", "fp32"]   # (the presets' bf16 autocast only adds casts on a CPU)


def scaling_cases(quick: bool) -> list[tuple[str, str, str, list[str], dict]]:
    """(sweep, value, method, flags, backend options): step time against one knob, the rest fixed."""
    out = []
    steps = "4" if quick else "10"
    for K in ([1, 4] if quick else [1, 2, 4, 8]):        # RATS student steps (N = 50)
        out.append(("rats K (toy, N=50)", str(K), "rats", ["--steps", steps, "--nfe", str(K), "--eval-size", "64"], {}))
    for N in ([10, 50] if quick else [10, 25, 50, 100]):   # RATS teacher steps (K = 2)
        out.append(("rats N (toy, K=2)", str(N), "rats",
                    ["--steps", steps, "--teacher-nfe", str(N), "--eval-size", "64"], {}))
    for B in ([256, 2048] if quick else [64, 256, 1024, 4096]):   # RATS batch: the loop's per-op cost amortised
        out.append(("rats B (toy, K=2, N=50)", str(B), "rats",
                    ["--steps", steps, "--batch-size", str(B), "--eval-size", "64"], {}))
    for G in ([2, 8] if quick else [2, 4, 8, 16]):           # OTCA group size (8 prompts, K = 10)
        out.append(("otca G (toy, 8 prompts, K=10)", str(G), "otca",
                    ["--steps", steps, "--group-size", str(G), "--eval-samples", "64"], {}))
    for K in ([4, 10] if quick else [4, 10, 20]):            # OTCA rollout length
        out.append(("otca K (toy, G=8)", str(K), "otca", ["--steps", steps, "--nfe", str(K), "--eval-samples", "64"],
                    {}))
    for res in ([16, 32] if quick else [16, 32, 64]):        # RATS on the random tiny DiT (latent res x res)
        out.append(("rats resolution (dit tiny, K=3, N=20, B=4)", str(res), "rats",
                    method_flags("rats", "dit", True), {"resolution": res}))
    if not quick:
        for px in (32, 64, 128):                              # OTCA on tiny FLUX (pixels; latent = px / 2)
            out.append(("otca resolution (tiny flux, px)", str(px), "otca", method_flags("otca", "flux", True),
                        {"height": px, "width": px}))
    return out


HEADER = ("Contended timings: 2 shared CPU cores, 1 torch thread per case; see machine.json. "
          "Re-run on an idle machine: `python -m benchmarks --out runs/bench`.")


def run_case(method: str, flags: list[str], opts: dict, tmp: str, tag: str, timeout: int = 600) -> list[dict]:
    path = os.path.join(tmp, f"{tag}.json")
    cmd = [sys.executable, "-m", "benchmarks.harness", method, "--json", path,
           "--backend-options", json.dumps(opts), "--", *flags]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0 or not os.path.exists(path):
        err = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
        print(f"  FAILED {tag}: {err}", flush=True)
        return [{"method": method, "argv": " ".join(flags), "error": err}]
    recs = json.load(open(path))
    print(f"  {tag}: {time.perf_counter() - t0:.1f} s", flush=True)
    return recs


def fmt_nfe(d: dict) -> str:
    return " ".join(f"{k}={v:g}" for k, v in d.items())


def per_step_row(backend: str, r: dict) -> dict:
    if "error" in r:
        return {"method": r["method"], "backend": backend, "phase": "", "step_s": None, "error": r["error"]}
    return {"method": r["method"], "backend": backend, "phase": r["phase"], "step_s": r["step_time_s"],
            "samples_per_s": r["samples_per_s"], "calls_per_step": fmt_nfe(r["nfe_calls"]),
            "sample_evals_per_step": fmt_nfe(r["nfe_samples"]), "nfe_match": r["nfe_match"],
            "unaccounted": r["unaccounted_forwards"], "peak_mem_mb": r["peak_mem_mb"],
            "overhead_ratio": r["overhead_ratio"], "loop_overhead_ratio": r.get("loop_overhead_ratio")}


def toy_targets(out: str) -> list[dict]:
    """Each script's default toy run, timed end to end (a fresh process each; evaluation included): wall time, and
    the child's CPU time (user + sys), which is what the wall time would be on an idle core. A script over its target
    is run again with OMP_NUM_THREADS=1, to tell intra-op thread contention from its own cost."""
    import resource
    rows = []
    limits = {"rats": 60, "otca": 60, "rtdmd": 120}

    def timed(m: str, env: dict, tag: str) -> dict:
        load = os.getloadavg()[0]
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, f"{m}.py", "--out", os.path.join(out, f"target-{m}{tag}")], cwd=ROOT,
                           env={**os.environ, "HF_HUB_OFFLINE": "1", **env}, capture_output=True, text=True,
                           timeout=1800)
        dt = time.perf_counter() - t0
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
        row = {"script": f"{' '.join(f'{k}={v}' for k, v in env.items())} python {m}.py".strip(),
               "wall_s": round(dt, 1), "cpu_s": round(cpu, 1), "target_s": limits[m], "within": dt <= limits[m],
               "rc": p.returncode, "load_avg_before": round(load, 1), "load_avg_after": round(os.getloadavg()[0], 1)}
        print(f"  target {row['script']}: {dt:.1f} s wall, {cpu:.1f} s CPU (target {limits[m]} s, load {load:.1f})",
              flush=True)
        return row

    for m in limits:
        row = timed(m, {}, "")
        rows.append(row)
        if not row["within"]:
            rows.append(timed(m, {"OMP_NUM_THREADS": "1"}, "-omp1"))
    return rows


def machine() -> dict:
    import torch
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "load_avg": [round(x, 1) for x in os.getloadavg()],
            "torch": torch.__version__, "python": platform.python_version(), "threads_per_case": 1,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="cost per training step, network evaluations, memory and scaling")
    p.add_argument("--out", default="runs/bench", help="output directory")
    p.add_argument("--quick", action="store_true", help="fewer steps and sweep points (toy + tiny flux only)")
    p.add_argument("--only", default="rats,otca,rtdmd", help="methods to measure, comma separated")
    p.add_argument("--no-targets", action="store_true", help="skip the full default toy runs")
    p.add_argument("--no-scaling", action="store_true", help="skip the scaling sweeps")
    p.add_argument("--targets-only", action="store_true", help="only the default toy runs (targets.md)")
    a = p.parse_args(argv)
    methods = [m.strip() for m in a.only.split(",") if m.strip()]
    bad = [m for m in methods if m not in ("rats", "otca", "rtdmd")]
    if bad:
        print(f"error: --only: unknown method {bad[0]!r} (rats, otca, rtdmd)", file=sys.stderr)
        return 2
    os.makedirs(a.out, exist_ok=True)
    tmp = os.path.join(a.out, "cases")
    os.makedirs(tmp, exist_ok=True)
    info = {"before": machine()}
    if a.targets_only:
        write_table(toy_targets(a.out), a.out, "targets", header=HEADER)
        info["after"] = machine()
        with open(os.path.join(a.out, "machine-targets.json"), "w") as fh:
            json.dump(info, fh, indent=2)
        return 0
    backends = ["toy2d", "flux"] if a.quick else ["toy2d", "dit", *TINY_BACKENDS]
    records, rows = [], []
    print("per method and backend", flush=True)
    for m in methods:
        for b in backends:
            recs = run_case(m, method_flags(m, b, a.quick), {}, tmp, f"{m}-{b}")
            for r in recs:
                r["backend"] = b
                rows.append(per_step_row(b, r))
            records += recs
    header = HEADER
    write_table(rows, a.out, "per_step", header=header)
    if not a.no_scaling:
        print("scaling", flush=True)
        srows, base = [], {}
        for sweep, value, m, flags, opts in scaling_cases(a.quick):
            if m not in methods:
                continue
            recs = run_case(m, flags, opts, tmp, f"scale-{m}-{sweep.split()[1]}-{value}")
            r = recs[0]
            r["sweep"], r["value"] = sweep, value
            records.append(r)
            t = r.get("step_time_s")
            base.setdefault(sweep, t)
            srows.append({"sweep": sweep, "value": value, "step_s": t,
                          "relative": round(t / base[sweep], 2) if t and base[sweep] else None,
                          "calls_per_step": fmt_nfe(r.get("nfe_calls", {})),
                          "sample_evals_per_step": fmt_nfe(r.get("nfe_samples", {})),
                          "overhead_ratio": r.get("overhead_ratio"),
                          "loop_overhead_ratio": r.get("loop_overhead_ratio"), "peak_mem_mb": r.get("peak_mem_mb")})
        write_table(srows, a.out, "scaling", header=header)
    if not a.no_targets and not a.quick:
        print("toy targets (default runs of each script)", flush=True)
        write_table(toy_targets(a.out), a.out, "targets", header=header)
    info["after"] = machine()
    with open(os.path.join(a.out, "records.json"), "w") as fh:
        json.dump(records, fh, indent=2)
    with open(os.path.join(a.out, "machine.json"), "w") as fh:
        json.dump(info, fh, indent=2)
    print(f"wrote {a.out}/per_step.md, scaling.md, records.json", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
