"""Regenerate the RATS result tables and plots: results/rats_{toy,dit}.{md,json} and results/rats_{toy,dit}_*.png.

    HF_HUB_OFFLINE=1 .venv/bin/python results/rats_sweep.py toy          # K = 2, 4; 6 variants; 3 seeds
    HF_HUB_OFFLINE=1 .venv/bin/python results/rats_sweep.py dit          # K = 3, 5, 8 on the tiny DiT

Every run is `rats.py` itself (called in-process, one after another, one CPU thread); its run directory is kept
under runs/rats_sweep/<setting>/. The table reports mean +- std over seeds of summary.json's fields.
"""
from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import rats  # noqa: E402
from common.config import parse_config  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = {  # name -> flags (on top of the backend's preset)
    "rats (gate)": [],
    "no gate (w = 1)": ["--gate", "none"],
    "reward only (w = 0)": ["--gate", "off"],
    "distillation only (lambda_r = 0)": ["--lambda-r", "0"],
    "frozen teacher (mu = 1)": ["--ema-decay", "1.0"],
    "rats (gate, running-std gap, tau 1)": ["--gap-norm", "running_std", "--tau", "1.0"],
}
ABLATIONS = list(VARIANTS)[:5]
SETTINGS = {
    "toy": {"base": ["--teacher", "toy2d", "--steps", "100", "--batch-size", "128", "--eval-size", "256"],
            "nfe": [2, 4], "seeds": [0, 1, 2],
            "cols": ["reward_student", "kl_student_teacher", "mmd_student_teacher", "spread", "reward_teacher_ema"]},
    # The same toy world with the reward scaled by 0.1 (gaps and reward gradients 10x smaller against tau and
    # the shaping term): the regime where the gate has something to do. Three variants only.
    "toy_weak": {"base": ["--teacher", "toy2d", "--steps", "100", "--batch-size", "128", "--eval-size", "256",
                          "--reward", "toy_quadratic:0.1"],
                 "nfe": [2], "seeds": [0, 1], "variants": ["rats (gate)", "no gate (w = 1)", "reward only (w = 0)"],
                 "cols": ["reward_student", "kl_student_teacher", "mmd_student_teacher", "spread",
                          "reward_teacher_ema"]},
    # DiT: the tiny preset's pretrained teacher (toy.pretrain_dit --preset tiny; pass --pretrained DIR to pick one)
    "dit": {"base": ["--teacher", "dit", "--steps", "20", "--batch-size", "8", "--eval-size", "36",
                     "--eval-batch", "36"], "nfe": [3, 5, 8], "seeds": [0],
            "variants": ABLATIONS,
            # CPU budget: every ablation at K = 3, the main three at K = 5 and 8
            "variants_by_k": {5: ["rats (gate)", "no gate (w = 1)", "reward only (w = 0)"],
                              8: ["rats (gate)", "no gate (w = 1)", "reward only (w = 0)"]},
            "cols": ["reward_student", "reward_dit_color_student", "reward_dit_shape_student", "dist_to_teacher",
                     "reward_teacher_ema"]},
}


def run_all(setting: str, variants: list[str], seeds: list[int], nfes: list[int], extra: list[str]) -> list[dict]:
    spec = SETTINGS[setting]
    rows = []
    for K in nfes:
        for name in spec.get("variants_by_k", {}).get(K, variants):
            per_seed = []
            for seed in seeds:
                out = os.path.join("runs", "rats_sweep", setting, f"K{K}_{_slug(name)}_s{seed}")
                argv = spec["base"] + ["--nfe", str(K), "--seed", str(seed), "--out", out] + VARIANTS[name] + extra
                t0 = time.time()
                cfg = parse_config(rats.Config, argv, presets=rats.PRESETS)
                summ = _finished(out, cfg)  # a finished run with the same config is read back, not rerun
                summ = summ or rats.main(cfg)
                print(f"[sweep] K={K} {name} seed={seed}: reward {summ['reward_student']:.4g} "
                      f"({time.time() - t0:.0f} s)", flush=True)
                per_seed.append({**summ, "run_dir": out})
            rows.append({"K": K, "variant": name, "runs": per_seed})
    return rows


def _finished(out: str, cfg) -> dict | None:
    """summary.json of a finished run in `out` whose config.json equals cfg (else None)."""
    from common.config import to_dict
    try:
        with open(os.path.join(out, "summary.json")) as fh:
            summ = json.load(fh)
        with open(os.path.join(out, "config.json")) as fh:
            same = json.load(fh) == to_dict(cfg)
    except (OSError, ValueError):
        return None
    return summ if same and summ.get("status") == "finished" else None


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")[:40]


def _ms(vals: list[float]) -> str:
    t = torch.tensor([float(v) for v in vals], dtype=torch.float64)
    if len(vals) == 1:
        return f"{float(t[0]):.4g}"
    return f"{float(t.mean()):.4g} ± {float(t.std()):.2g}"


def write_tables(setting: str, rows: list[dict], command: str) -> None:
    spec = SETTINGS[setting]
    head = ["K", "variant", "reward_teacher (N=50)", "reward_student_init"] + spec["cols"]
    lines = [f"Command: `{command}`", "",
             f"Mean ± std over seeds {spec['seeds']} (one CPU thread each; "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        runs = r["runs"]
        cells = [str(r["K"]), r["variant"], _ms([x["reward_teacher"] for x in runs]),
                 _ms([x["reward_student_init"] for x in runs])]
        cells += [_ms([x[c] for x in runs]) if all(c in x for x in runs) else "" for c in spec["cols"]]
        lines.append("| " + " | ".join(cells) + " |")
    with open(os.path.join(HERE, f"rats_{setting}.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    with open(os.path.join(HERE, f"rats_{setting}.json"), "w") as fh:
        json.dump({"command": command, "rows": rows}, fh, indent=1)


def _metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [json.loads(ln) for ln in fh if ln.strip()]


def plot(setting: str, rows: list[dict]) -> None:
    """Gate mean (+- its spread across the batch) and R_S / R_T over training, first seed, one panel per K."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    nfes = sorted({r["K"] for r in rows})
    for what in ("gate", "reward"):
        fig, axes = plt.subplots(1, len(nfes), figsize=(5 * len(nfes), 3.6), squeeze=False)
        for ax, K in zip(axes[0], nfes):
            for r in [r for r in rows if r["K"] == K]:
                m = _metrics(r["runs"][0]["run_dir"])
                step = [x["step"] for x in m]
                if what == "gate":
                    mean = torch.tensor([x["gate_mean"] for x in m])
                    sd = torch.tensor([x["gate_std"] for x in m])
                    ax.plot(step, mean, label=r["variant"])
                    ax.fill_between(step, mean - sd, mean + sd, alpha=0.15)
                    ax.set_ylabel("gate w (batch mean ± std)")
                else:
                    line, = ax.plot(step, [x["r_student"] for x in m], label=f"{r['variant']}: R_S")
                    ax.plot(step, [x["r_teacher"] for x in m], ls="--", color=line.get_color(), lw=0.8)
                    ax.set_ylabel("training reward")
            ax.set_title(f"{setting}, K = {K}" + ("" if what == "gate" else
                                                   "\nsolid: student R_S (K steps); dashed: EMA teacher R_T (50)"),
                         fontsize=9)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        axes[0][-1].legend(fontsize=7, loc="best")
        fig.tight_layout()
        fig.savefig(os.path.join(HERE, f"rats_{setting}_{what}.png"), dpi=100)
        plt.close(fig)


if __name__ == "__main__":
    torch.set_num_threads(1)
    setting = sys.argv[1] if len(sys.argv) > 1 else "toy"
    if setting not in SETTINGS:
        print(f"error: setting must be one of {', '.join(SETTINGS)}", file=sys.stderr)
        raise SystemExit(2)
    extra = sys.argv[2:]
    spec = SETTINGS[setting]
    if "--posthoc" in extra:  # re-score every finished run with --eval-only (new metrics), rewrite the table
        extra.remove("--posthoc")
        path = os.path.join(HERE, f"rats_{setting}.json")
        with open(path) as fh:
            saved = json.load(fh)
        for r in saved["rows"]:
            for run in r["runs"]:
                cfg = parse_config(rats.Config, spec["base"] + extra + ["--eval-only", "--ckpt", run["run_dir"]],
                                   presets=rats.PRESETS)
                run.update({k: v for k, v in rats.main(cfg).items() if k not in run or k == "dist_to_teacher"})
        command = saved["command"] + "; then the same with --posthoc (re-scoring the checkpoints)"
        write_tables(setting, saved["rows"], command)
        plot(setting, saved["rows"])
        raise SystemExit(0)
    if "--plots-only" in extra:  # redraw the PNGs from the table's JSON (the run directories must still exist)
        with open(os.path.join(HERE, f"rats_{setting}.json")) as fh:
            plot(setting, json.load(fh)["rows"])
        raise SystemExit(0)
    if "--quick" in extra:  # a check of this driver: one K, one seed, two variants, whatever else extra says
        extra.remove("--quick")
        spec["nfe"], spec["seeds"], variants = spec["nfe"][:1], spec["seeds"][:1], list(VARIANTS)[:2]
    else:
        variants = spec.get("variants", list(VARIANTS))
    rows = run_all(setting, variants, spec["seeds"], spec["nfe"], extra)
    command = "HF_HUB_OFFLINE=1 .venv/bin/python results/rats_sweep.py " + " ".join(sys.argv[1:])
    write_tables(setting, rows, command)
    plot(setting, rows)
