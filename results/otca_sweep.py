"""Regenerate the OTCA result tables and plots: results/otca_{toy,dit}.{md,json} and results/otca_{toy,dit}.png.

    HF_HUB_OFFLINE=1 .venv/bin/python results/otca_sweep.py toy     # GRPO / TCD / MOCA / OTCA, 3 seeds, toy world
    HF_HUB_OFFLINE=1 .venv/bin/python results/otca_sweep.py dit     # the same on the small DiT (tiny preset, CPU)
    HF_HUB_OFFLINE=1 .venv/bin/python results/otca_sweep.py dit60   # longer DiT runs (60 steps), one seed

Every run is otca.py itself, called in-process one after another on one CPU thread, at equal rollouts (same
steps, prompts per step, group size, sampler steps). Run directories are kept under runs/otca_sweep/<setting>/.
The table reports mean +- std over seeds of summary.json's held-out rewards (Euler sampling from fixed noise).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import otca  # noqa: E402
from common.config import parse_config  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = {  # name -> flags (on top of the backend's preset)
    "GRPO (uniform credit, static sum)": ["--credit", "uniform", "--objectives", "static"],
    "TCD only": ["--credit", "tcd", "--objectives", "static"],
    "MOCA only": ["--credit", "uniform", "--objectives", "moca"],
    "OTCA (TCD + MOCA)": ["--credit", "tcd", "--objectives", "moca"],
}
ABLATIONS = {  # extra rows (toy only): which part of TCD does what, and Flow-GRPO's scalarisation
    "GRPO on the combined raw reward (Flow-GRPO)": ["--credit", "uniform", "--objectives", "combined"],
    "TCD only, credit from x0-predictions": ["--credit", "tcd", "--objectives", "static", "--credit-source", "x0"],
    "TCD only, batch-mean profile": ["--credit", "tcd_batch", "--objectives", "static"],
    "OTCA, batch-mean profile": ["--credit", "tcd_batch", "--objectives", "moca"],
}
SETTINGS = {
    "toy": {"base": ["--teacher", "toy2d"], "seeds": [0, 1, 2]},
    "dit": {"base": ["--teacher", "dit", "--steps", "16", "--eval-samples", "48"], "seeds": [0, 1]},
    "dit60": {"base": ["--teacher", "dit", "--steps", "60", "--eval-samples", "96"], "seeds": [0]},
}


def run_all(setting: str, seeds: list[int], extra: list[str]) -> list[dict]:
    rows = []
    variants = {**VARIANTS, **(ABLATIONS if setting == "toy" else {})}
    for name, flags in variants.items():
        runs = []
        for seed in seeds:
            out = os.path.join("runs", "otca_sweep", setting, f"{_slug(name)}_s{seed}")
            if os.path.isfile(os.path.join(out, "summary.json")) and "--fresh" not in extra:
                print(f"[sweep] {name} seed={seed}: reusing {out} (pass --fresh to rerun)", flush=True)
                runs.append(_load(out))
                continue
            argv = SETTINGS[setting]["base"] + ["--seed", str(seed), "--out", out] + flags + \
                [a for a in extra if a != "--fresh"]
            t0 = time.time()
            with contextlib.redirect_stderr(io.StringIO()):  # the progress bar
                summ = otca.main(parse_config(otca.Config, argv, presets=otca.PRESETS, checks=[otca.checks]))
            with open(os.path.join(out, "metrics.jsonl")) as f:
                metrics = [json.loads(ln) for ln in f]
            print(f"[sweep] {name} seed={seed}: {summ['rewards']} ({time.time() - t0:.0f} s)", flush=True)
            runs.append({"summary": summ, "metrics": metrics, "run_dir": out, "seconds": time.time() - t0})
        rows.append({"variant": name, "flags": flags, "runs": runs})
    return rows


def _load(out: str) -> dict:
    with open(os.path.join(out, "summary.json")) as f:
        summ = json.load(f)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        metrics = [json.loads(ln) for ln in f]
    return {"summary": summ, "metrics": metrics, "run_dir": out, "seconds": summ.get("time", float("nan"))}


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")[:40]


def _ms(vals: list[float]) -> str:
    t = torch.tensor(vals, dtype=torch.float64)
    return f"{t.mean():.4f} ± {t.std(correction=1) if len(vals) > 1 else 0.0:.4f}"


def table(setting: str, rows: list[dict], command: str) -> str:
    objs = rows[0]["runs"][0]["summary"]["objectives"] + ["combined"]
    init = rows[0]["runs"][0]["summary"]["rewards_init"]
    lines = [f"Command: `{command}`", "",
             f"Held-out rewards after training (mean ± std over seeds {SETTINGS[setting]['seeds']}); "
             "before training: " + ", ".join(f"{k} {init[k]:.4f}" for k in objs), "",
             "| variant | " + " | ".join(objs) + " | " + " | ".join(f"Δ {o}" for o in objs) + " |",
             "|---|" + "---|" * (2 * len(objs))]
    for r in rows:
        after = {o: [x["summary"]["rewards"][o] for x in r["runs"]] for o in objs}
        delta = {o: [x["summary"]["rewards"][o] - x["summary"]["rewards_init"][o] for x in r["runs"]] for o in objs}
        lines.append(f"| {r['variant']} | " + " | ".join(_ms(after[o]) for o in objs) + " | "
                     + " | ".join(_ms(delta[o]) for o in objs) + " |")
    K = len(rows[0]["runs"][0]["summary"]["credit_per_step"])
    lines += ["", "Mean step credit omega_t over training (mean over samples, steps and seeds; step 0 = pure noise;",
              "the last step is deterministic and never trained):", "",
              "| variant | " + " | ".join(f"t={t}" for t in range(K)) + " |", "|---|" + "---|" * K]
    for r in rows:
        c = torch.tensor([x["summary"]["credit_per_step"] for x in r["runs"]]).mean(0)
        lines.append(f"| {r['variant']} | " + " | ".join(f"{v:.2f}" for v in c.tolist()) + " |")
    secs = [x["seconds"] for r in rows for x in r["runs"]]
    lines += ["", f"Wall time per run: {min(secs):.0f}-{max(secs):.0f} s on a shared 2-core CPU (contended; one "
              "thread)."]
    return "\n".join(lines) + "\n"


def plot(setting: str, rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    objs = rows[0]["runs"][0]["summary"]["objectives"]
    fig, axes = plt.subplots(1, len(objs) + 1, figsize=(4.2 * (len(objs) + 1), 3.4))
    n_steps = len(rows[0]["runs"][0]["metrics"])
    w = max(1, min(15, n_steps // 5))  # moving-average window over training steps (batch means are noisy)
    for r in rows:
        for ax, o in zip(axes, objs):
            curves = torch.tensor([[m[f"r_{o}"] for m in x["metrics"]] for x in r["runs"]])  # (seeds, steps)
            mean = curves.mean(0)
            k = min(w, mean.numel())
            smooth = torch.nn.functional.avg_pool1d(mean[None, None], k, 1)[0, 0]
            ax.plot(range(k, mean.numel() + 1), smooth, label=r["variant"])
            ax.set_title(f"training reward: {o} (mean of seeds, MA {k})", fontsize=9)
            ax.set_xlabel("step")
        c = torch.tensor([x["summary"]["credit_per_step"] for x in r["runs"]]).mean(0)
        axes[-1].plot(range(len(c)), c, "-o", ms=3, label=r["variant"])
    axes[-1].set_title("mean step credit omega_t (0 = noise)", fontsize=9)
    axes[-1].set_xlabel("sampler step t")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str]) -> None:
    setting = argv[0] if argv else "toy"
    extra = argv[1:]
    torch.set_num_threads(1)
    command = "HF_HUB_OFFLINE=1 .venv/bin/python results/otca_sweep.py " + " ".join([setting] + extra)
    rows = run_all(setting, SETTINGS[setting]["seeds"], extra)
    md = table(setting, rows, command)
    path = os.path.join(HERE, f"otca_{setting}.md")
    kept = ""
    if os.path.isfile(path):  # the hand-written analysis below the table survives a rerun
        with open(path) as f:
            old = f.read()
        kept = old[old.index("\n## Analysis"):] if "\n## Analysis" in old else ""
    with open(path, "w") as f:
        f.write(md + kept)
    with open(os.path.join(HERE, f"otca_{setting}.json"), "w") as f:
        json.dump({"command": command, "rows": [{**r, "runs": [{k: v for k, v in x.items() if k != "metrics"}
                                                               for x in r["runs"]]} for r in rows]}, f, indent=1)
    plot(setting, rows, os.path.join(HERE, f"otca_{setting}.png"))
    print(md)


if __name__ == "__main__":
    main(sys.argv[1:])
