"""`make demo`: the three methods on the toy world with their baselines, and one report.

    python -m toy.demo --out runs/demo            # about 5 minutes on 2 idle cores
    python -m toy.demo --out runs/demo --quick    # a few steps of each, for the test suite

Every run is the method script itself (rats.main / otca.main / rtdmd.main, called in-process with the flags shown
in the report), so the report shows exactly what `python rats.py ...` would give. It writes
    runs/demo/report.md            the tables (RATS, OTCA, RTDMD) and the figures below, with each run's command
    runs/demo/report.json          the same numbers
    runs/demo/toy/                 the datasets, tilted targets and few-step gaps (python -m toy)
    runs/demo/samples.png          final samples of each method over its target's density contours
    runs/demo/rats_curves.png      R_S and R_T over training, and the gate's mean, for gate / no gate / reward only
    runs/demo/otca_curves.png      per-objective rewards over training (GRPO vs OTCA) and the credit per step
    runs/demo/rtdmd_curves.png     the reward and the KL to the tilted target over stage 2
    runs/<method>-.../             each run's own directory (config.json, metrics.jsonl, summary.json, checkpoints)
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# (method, label, flags): the baselines each paper compares against, at toy scale
RUNS = [
    ("rats", "RATS (sigmoid gate)", []),
    ("rats", "no gate (w = 1)", ["--gate", "none"]),
    ("rats", "reward only (w = 0)", ["--gate", "off"]),
    # the same with the reward x 0.1: the regime where the gate has something to do (results/rats_toy_weak.md)
    ("rats", "RATS (sigmoid gate), reward x 0.1", ["--reward", "toy_quadratic:0.1"]),
    ("rats", "reward only (w = 0), reward x 0.1", ["--gate", "off", "--reward", "toy_quadratic:0.1"]),
    ("otca", "GRPO (uniform credit, static sum)", ["--credit", "uniform", "--objectives", "static"]),
    ("otca", "OTCA (TCD + MOCA)", ["--credit", "tcd", "--objectives", "moca"]),
    ("rtdmd", "RTDMD (AC-DMD, then SubGRPO + BP)", ["--stage", "all"]),
]
QUICK = {"rats": ["--steps", "3", "--eval-size", "64", "--teacher-nfe", "10"],
         "otca": ["--steps", "2"],
         "rtdmd": ["--steps", "2", "--epochs", "2"]}
FULL = {"rats": ["--steps", "100", "--batch-size", "128", "--eval-size", "512"], "otca": ["--steps", "100"],
        "rtdmd": []}


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in s.lower()).strip("-")[:40]


def run_method(method: str, flags: list[str], out: str) -> tuple[dict, float]:
    """Run one script's main in-process; returns (summary, seconds). Its progress bar goes to stderr."""
    import importlib

    from common.config import parse_config
    mod = importlib.import_module(method)
    cfg = parse_config(mod.Config, flags + ["--out", out], presets=mod.PRESETS,
                       checks=[mod.checks] if hasattr(mod, "checks") else ())
    t0 = time.time()
    with contextlib.redirect_stdout(io.StringIO()):      # the resolved config is already in out/config.json
        summary = mod.main(cfg)
    return summary or json.load(open(os.path.join(out, "summary.json"))), time.time() - t0


def read_metrics(out: str) -> list[dict]:
    path = os.path.join(out, "metrics.jsonl")
    return [json.loads(ln) for ln in open(path)] if os.path.isfile(path) else []


def _num(v, nd=4):
    return f"{v:.{nd}g}" if isinstance(v, (int, float)) and v is not None else ("" if v is None else str(v))


def _table(rows: list[dict], cols: list[str]) -> str:
    head = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    return head + "".join("| " + " | ".join(_num(r.get(c)) for c in cols) + " |\n" for r in rows)


def _cmd(method: str, flags: list[str]) -> str:
    return f"python {method}.py " + " ".join(flags)


def rats_section(results) -> tuple[str, list[dict]]:
    rows = []
    for label, _flags, out, summ, secs in results:
        K = json.load(open(os.path.join(out, "config.json"))).get("nfe", "")
        rows.append({"variant": label, "K": K, "reward_teacher (N=50)": summ.get("reward_teacher"),
                     "reward_student_init": summ.get("reward_student_init"),
                     "reward_student": summ.get("reward_student"), "kl_student_teacher": summ.get("kl_student_teacher"),
                     "mmd_student_teacher": summ.get("mmd_student_teacher"), "spread": summ.get("spread"),
                     "seconds": secs})
    cols = ["variant", "K", "reward_teacher (N=50)", "reward_student_init", "reward_student", "kl_student_teacher",
            "mmd_student_teacher", "spread", "seconds"]
    text = ("## RATS: a few-step student, its EMA teacher, and the gate\n\n"
            "Reward `toy_quadratic` (optimum at the rare mode), learned teacher, K-step Euler student; the claim "
            "to check: the gated student beats the teacher's reward without the collapse of reward-only training. "
            "Collapse shows as `spread` (mean per-coordinate std of the samples; the data: about 2) falling to 0 and "
            "the MMD to the teacher's samples rising to 1. At the full reward strength the student overtakes the "
            "teacher within a few steps and the gate closes, so RATS behaves like reward-only training; with the "
            "reward x 0.1 the gate stays open and keeps the spread.\n\n" + _table(rows, cols))
    return text, rows


def otca_section(results) -> tuple[str, list[dict]]:
    rows, credit_rows = [], []
    for label, _flags, _out, summ, secs in results:
        objs = summ.get("objectives", [])
        row = {"variant": label, "seconds": secs}
        for o in objs:
            row[f"{o} before"] = summ.get("rewards_init", {}).get(o)
            row[f"{o} after"] = summ.get("rewards", {}).get(o)
        rows.append(row)
        credit = summ.get("credit_per_step") or []
        credit_rows.append({"variant": label, **{f"t={t}": c for t, c in enumerate(credit)}})
    cols = ["variant"] + [k for k in rows[0] if k not in ("variant", "seconds")] + ["seconds"] if rows else []
    ccols = ["variant"] + [k for k in credit_rows[0] if k != "variant"] if credit_rows else []
    text = ("## OTCA: credit over steps and objectives\n\n"
            "Reward `toy_otca`: two conflicting objectives, `mode` (decided early, at high noise) and `centre` "
            "(decided late). Held-out rewards before and after, at equal rollouts:\n\n" + _table(rows, cols) +
            "\nMean step credit over training (step 0 = pure noise; the last, deterministic step is not trained):\n\n"
            + _table(credit_rows, ccols))
    return text, rows + credit_rows


def rtdmd_section(results) -> tuple[str, list[dict]]:
    keys = ["kl_init_teacher", "kl_student_teacher", "kl_init_tilted", "kl_student_tilted", "reward_teacher",
            "reward_student", "reward_tilted"]
    rows = [{"variant": label, **{k: summ.get(k) for k in keys}, "seconds": secs}
            for label, flags, out, summ, secs in results]
    est = next((s.get("kl_estimator") for _, _, _, s, _ in results if s.get("kl_estimator")), None)
    text = ("## RTDMD: onto the reward-tilted teacher, not past it\n\n"
            "Exact mixture teacher, linear reward of known tilt (`--advantage raw --beta B`): the target is "
            "p_tilt = p_T exp(beta r) / Z, whose mean reward `reward_tilted` is known in closed form. Stage 1 "
            "should lower the KL to the teacher; stage 2 the KL to p_tilt, with reward_student near reward_tilted."
            + (f" KL estimator: {est}." if est else "") + "\n\n" + _table(rows, ["variant"] + keys + ["seconds"]))
    return text, rows


def plot_curves(out_dir: str, by_method: dict) -> list[str]:
    """Training curves from each run's metrics.jsonl (toy.plots.plot_curves), one PNG per method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from toy.plots import plot_curves as curves, save_figure
    made = []
    if by_method.get("rats"):
        fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
        for label, _, out, _, _ in by_method["rats"]:
            m = read_metrics(out)
            curves(m, ["r_student", "r_teacher"], ax=ax[0], labels=[f"{label}: R_S", f"{label}: R_T"])
            curves(m, "gate_mean", ax=ax[1], labels=[label])
        ax[0].set_title("RATS rewards: student R_S and teacher R_T", fontsize=9)
        ax[1].set(title="gate mean w", ylim=(-0.05, 1.05))
        made.append(str(save_figure(fig, os.path.join(out_dir, "rats_curves.png"))))
    if by_method.get("otca"):
        fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
        for label, _, out, summ, _ in by_method["otca"]:
            objs = summ.get("objectives", [])
            curves(read_metrics(out), [f"r_{o}" for o in objs], ax=ax[0], labels=[f"{label}: {o}" for o in objs])
            credit = summ.get("credit_per_step") or []
            curves([{"t": t, "credit": c} for t, c in enumerate(credit)], "credit", x="t", ax=ax[1], labels=[label])
        ax[0].set_title("OTCA per-objective rewards (training batches)", fontsize=9)
        ax[1].set(title="mean step credit", xlabel="step t (0 = pure noise)")
        made.append(str(save_figure(fig, os.path.join(out_dir, "otca_curves.png"))))
    if by_method.get("rtdmd"):
        fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
        for label, _, out, _, _ in by_method["rtdmd"]:
            m = read_metrics(out)
            curves(m, "eval_reward", ax=ax[0], labels=[label])
            curves(m, "eval_kl_hist_tilted", ax=ax[1], labels=[label])
        reward_tilted = by_method["rtdmd"][0][3].get("reward_tilted")
        if isinstance(reward_tilted, (int, float)):
            ax[0].axhline(reward_tilted, color="k", ls="--", label="E_tilt[r] (closed form)")
            ax[0].legend(fontsize=7)
        ax[0].set_title("RTDMD held-out reward", fontsize=9)
        ax[1].set_title("RTDMD KL to the tilted target (histogram)", fontsize=9)
        made.append(str(save_figure(fig, os.path.join(out_dir, "rtdmd_curves.png"))))
    return made


def plot_samples(out_dir: str, results: list) -> str | None:
    """Final samples (runs that saved samples.pt) over the density contours of their target."""
    import matplotlib
    matplotlib.use("Agg")
    from toy.plots import grid_figure, plot_samples as scatter, save_figure
    items = []
    for method, label, _, out, _, _ in results:
        path = os.path.join(out, "samples.pt")
        if os.path.isfile(path):
            items.append((f"{method}: {label}", torch.load(path, weights_only=False)))
    if not items:
        return None
    fig, axes = grid_figure(len(items), cols=min(4, len(items)))
    for ax, (title, d) in zip(axes, items):
        x = d["samples"] if isinstance(d, dict) else d
        logp = None
        if isinstance(d, dict) and d.get("target") is not None:
            tgt = d["target"]
            logp = tgt.log_prob
        scatter(x[:2000].float(), ax=ax, logp=logp, title=title)
    return str(save_figure(fig, os.path.join(out_dir, "samples.png")))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/demo")
    ap.add_argument("--quick", action="store_true", help="a few steps per run (the test suite's setting)")
    ap.add_argument("--only", default="", help="comma-separated methods to run (default: rats,otca,rtdmd)")
    a = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    os.makedirs(a.out, exist_ok=True)
    only = set(a.only.split(",")) if a.only else {"rats", "otca", "rtdmd"}
    from toy.__main__ import main as toy_pictures
    with contextlib.redirect_stdout(io.StringIO()):
        toy_pictures(["--out", os.path.join(a.out, "toy")] + (["--n", "2000"] if a.quick else []))
    results, by_method = [], {}
    for method, label, flags in RUNS:
        if method not in only:
            continue
        extra = (QUICK if a.quick else FULL)[method]
        full_flags = flags + extra
        out = os.path.join(a.out, f"{method}-{_slug(label)}")
        print(f"[demo] {_cmd(method, full_flags)}", file=sys.stderr, flush=True)
        summ, secs = run_method(method, full_flags, out)
        results.append((method, label, full_flags, out, summ, secs))
        by_method.setdefault(method, []).append((label, full_flags, out, summ, secs))
    sections, numbers = [], {}
    for method, fn in (("rats", rats_section), ("otca", otca_section), ("rtdmd", rtdmd_section)):
        if by_method.get(method):
            text, rows = fn(by_method[method])
            cmds = "\n".join(f"    {_cmd(method, f)} --out {o}" for _, f, o, _, _ in by_method[method])
            sections.append(text + "\nCommands:\n\n" + cmds + "\n")
            numbers[method] = rows
    figs = plot_curves(a.out, by_method)
    sample_fig = plot_samples(a.out, results)
    pictures = ([sample_fig] if sample_fig else []) + figs
    fig_md = "".join(f"![{os.path.basename(p)}]({os.path.basename(p)})\n\n" for p in pictures)
    report = ("# Demo: RATS, OTCA and RTDMD on the toy world\n\n"
              f"`python -m toy.demo --out {a.out}{' --quick' if a.quick else ''}` "
              f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPU cores). "
              "Datasets, tilted targets and few-step gaps: [toy/](toy/).\n\n" + "\n".join(sections) + "\n" + fig_md)
    with open(os.path.join(a.out, "report.md"), "w") as f:
        f.write(report)
    with open(os.path.join(a.out, "report.json"), "w") as f:
        json.dump(numbers, f, indent=2, default=str)
    print(f"[demo] wrote {os.path.join(a.out, 'report.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
