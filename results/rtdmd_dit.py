"""The small-DiT attribute-frequency check for RTDMD: results/rtdmd_dit.{md,json}.

    HF_HUB_OFFLINE=1 .venv/bin/python results/rtdmd_dit.py [--steps 600] [--epochs 150] [--n 512]

rtdmd.py's dit preset (tiny DiT teacher from toy/weights/dit-tiny; colour-open prompts; reward dit_color with
color_target=red; --advantage raw --beta 2; DMD through the chain) runs stage 1, then stage 2 from its checkpoint.
The colour of every sample is read from pixels (toy.shape_rewards.classify_attributes). The target is
p_T(colour) exp(beta r(colour)) / Z, with p_T the teacher's own frequencies (Euler, 20 steps, its CFG) and r(colour)
the reward of ground-truth renders (reward_by_value).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from common.backend import get_backend  # noqa: E402
from common.evaluate import sample_final  # noqa: E402
from common.rewards import build_reward  # noqa: E402
from common.runs import load_checkpoint  # noqa: E402
from toy.shape_rewards import reward_by_value, sample_frequencies, tilted_frequencies  # noqa: E402
from toy.shapes import ATTRIBUTES  # noqa: E402

OUT = os.path.join(ROOT, "runs", "rtdmd_dit")
NOTE = """## Reading (one seed, measured 2026-11-21 on the shared CPU; not tuned)

* Stage 1 keeps the colour frequencies near the teacher's: red 0.18 against 0.19, with no collapse. 600 iterations
  (60 generator updates) is a short cold start.
* Stage 2 does not land on the tilted target in either mode. Every row is the EMA weights (stage 2: decay 0.99), what
  the checkpoints ship; the raw training weights, which this table showed until 2026-11-21, are further along the
  same paths (99.6% red in code mode, 99.8% green in raw beta mode).
  - Code mode (per-reward standardised advantages, normalised DMD x 1e-3, back-prop x 1e-4) goes past it: 76% red
    against the target 60% (reward 0.73 against 0.56). This mode has no beta. The standardised advantages make the
    reward term's strength independent of the reward's scale, and the 1e-3 DMD weight is too weak to hold the tilt.
    On the toy the same placement (DMD on the last step only) also overshoots.
  - Raw beta mode drifts to a wrong colour (63% green, reward 0.10; the raw weights have collapsed to it). On
    3x32x32 pixels the unnormalised KL direction (1 - t)(s_fake - s_real), summed over 3072 dimensions at t <= 0.1,
    reaches losses of +-800 and swamps the policy gradient (about 1e-3). With the fake score trained for one step per
    epoch, that direction is mostly fake-score error, and following it collapses the generator. The calibrated raw
    mode works on the 2-D toy (results/rtdmd_toy.md) but, as implemented, not at image dimension. It would need more
    fake updates per epoch, a larger t range, or a normalised KL direction. None of these was tried in the time
    available.
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--epochs", type=int, default=150)
    ap.add_argument("--n", type=int, default=512)
    a = ap.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    s1, s2 = os.path.join(OUT, "stage1"), os.path.join(OUT, "stage2")
    s2g = os.path.join(OUT, "stage2_grpo")
    for out, args in ((s1, ["--stage", "1", "--steps", str(a.steps)]),
                      (s2, ["--stage", "2", "--init", s1, "--epochs", str(a.epochs), "--advantage", "raw",
                            "--beta", "2.0", "--dmd-through", "all"]),
                      (s2g, ["--stage", "2", "--init", s1, "--epochs", str(a.epochs), "--advantage", "grpo",
                             "--dmd-through", "last"])):
        if not os.path.exists(os.path.join(out, "summary.json")):
            subprocess.run([sys.executable, os.path.join(ROOT, "rtdmd.py"), "--teacher", "dit", "--out", out, *args],
                           cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    torch.set_num_threads(1)
    b = get_backend("dit")
    beta = json.load(open(os.path.join(s2, "config.json")))["beta"]
    reward = build_reward("dit_color", color_target="red")
    prompts = b.prompts("open")
    cond = b.encode([prompts[i % len(prompts)] for i in range(a.n)])
    noise = torch.randn(a.n, *b.latent_shape, generator=torch.Generator().manual_seed(0))
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731

    def freqs(net, sigmas, kind, eta, guidance):
        x = sample_final(b, net, cond, noise, sigmas, kind, eta, guidance, g(), batch_size=128)
        with torch.no_grad():
            media = b.decode(x)
            r = reward(media, cond.prompts)[:, 0]
        return sample_frequencies(media, "color"), float(r.mean())

    teacher = b.frozen_copy(b.network)
    p_t, r_t = freqs(teacher, b.sigmas(20), "euler", 0.0, None)
    r_val = reward_by_value(reward, "color", generator=torch.Generator().manual_seed(2))
    target = tilted_frequencies(p_t, r_val, beta)
    sig4 = b.sigmas(4)
    rows = [{"model": "teacher (20 Euler steps, CFG)", "freq": p_t.tolist(), "reward": r_t}]
    init = b.frozen_copy(b.network)
    f, r = freqs(init, sig4, "cps", 0.9, 1.0)
    rows.append({"model": "init student (teacher weights, 4 CPS steps, no CFG)", "freq": f.tolist(), "reward": r})
    # every row the EMA weights, what each stage ships (--init, --eval-only) and what rtdmd.py's summary reports
    for name, d in (("after stage 1 (AC-DMD, EMA)", s1),
                    ("after stage 2, raw beta mode (unnormalised DMD through the chain, EMA)", s2),
                    ("after stage 2, code mode (grpo advantages, normalised DMD x 1e-3, BP x 1e-4, EMA)", s2g)):
        net = b.frozen_copy(b.network)
        net.load_state_dict(load_checkpoint(d)["state"]["gen_ema"])
        f, r = freqs(net, sig4, "cps", 0.9, 1.0)
        rows.append({"model": name, "freq": f.tolist(), "reward": r})
    exp_target = float((target * r_val.double()).sum())
    rows.append({"model": f"target p_T exp(beta r) / Z, beta = {beta}", "freq": target.tolist(), "reward": exp_target})
    cols = ATTRIBUTES["color"]
    lines = ["# RTDMD on the small DiT: the attribute-frequency check", "",
             f"Command: `HF_HUB_OFFLINE=1 .venv/bin/python results/rtdmd_dit.py --steps {a.steps} --epochs {a.epochs} "
             f"--n {a.n}` (rtdmd.py --teacher dit, its preset plus, in stage 2, the flags below: tiny DiT teacher, "
             "prompts('open') (colour left open), reward "
             f"dit_color with color_target=red, --advantage raw --beta {beta}, DMD through the chain; one seed; "
             f"{a.n} samples per row, colour read from pixels).", "",
             f"r(colour) on ground-truth renders: {', '.join(f'{c} {float(v):.3f}' for c, v in zip(cols, r_val))}. "
             "The target row's reward is sum_a p(a) r(a).", "",
             "| model | " + " | ".join(cols) + " | mean reward |", "|---|" + "---|" * (len(cols) + 1)]
    for row in rows:
        lines.append(f"| {row['model']} | " + " | ".join(f"{v:.3f}" for v in row["freq"]) + f" | {row['reward']:.3f} |")
    lines += ["", NOTE]
    with open(os.path.join(ROOT, "results", "rtdmd_dit.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    with open(os.path.join(ROOT, "results", "rtdmd_dit.json"), "w") as fh:
        json.dump({"colors": cols, "rows": rows, "r_by_colour": r_val.tolist(), "beta": beta}, fh, indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
