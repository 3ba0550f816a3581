"""The toy's evaluation of a few-step generator against exact targets (rtdmd.py on toy2d).

toy_eval: the reward and the distances of the generator's law to the exact teacher mixture and to the reward-tilted
target p_tilt = p_T e^{beta r} / Z (closed form, toy.mixture), by the binned KL of its CPS(eta) samples and the
exact change-of-variables KL of the same network sampled with eta = 0 (toy.metrics). small_eval_config: the cheaper
setting of the periodic in-training evaluations.
"""
from __future__ import annotations

import copy

import torch

from common import dist
from common.evaluate import sample_final, save_samples
from toy.metrics import euler_logdensity, kl_exact_target, kl_histogram

# the binned KL's grid for RTDMD's toy numbers (training and --eval-only alike, so that they compare): the ring's
# modes sit at radius 3, so [-6, 6]^2 holds all but a negligible tail; 48 x 48 bins of width 0.25
KL_HIST = {"bounds": (-6.0, 6.0, -6.0, 6.0), "bins": 48}


def toy_eval(backend, gen, sigmas, reward, cfg, tilt, euler: bool = True, save_dir: str | None = None) -> dict:
    """Toy only: distances of the generator's law to the exact teacher and to p_tilt.

    The trained generator is stochastic (CPS eta): kl_hist_* are toy/metrics.kl_histogram estimates (binned KL,
    Miller-Madow corrected, +-stderr; a lower bound of the continuous KL up to O(h^2)). kl_euler_* are exact
    change-of-variables KLs of the same network sampled deterministically (eta = 0), a different sampler.
    Under torchrun (on every rank) each rank samples its share (sample_final(shard=True); the Euler densities too),
    gathered before the KLs, which need every sample: each rank gets the one-process numbers.
    cfg: its eval_samples (n) and eta are read; tilt: (p_tilt mixture, log Z) from GaussianMixture.tilt, or None
    (the teacher only); euler: add the kl_euler_* numbers; save_dir: also save the samples there (samples.pt)."""
    mix, n = backend.target(0), cfg.eval_samples
    g = torch.Generator().manual_seed(12345)
    cond = backend.encode(backend.prompts()[:1]).repeat(n)
    # drawn on the CPU (the same held-out set on any device), used on the backend's
    noise = torch.randn(n, *backend.latent_shape, generator=g).to(backend.device)
    x = dist.gather_strided(sample_final(backend, gen, cond, noise, sigmas, "cps", cfg.eta, 1.0, g, shard=True), n)
    with torch.no_grad():
        r = reward.combine(reward(backend.decode(x)))
    if save_dir:   # the final samples with the density they aim at (p_tilt when tilting), for the demo's figure
        save_samples(save_dir, x, tilt[0] if tilt else mix)
    out = {"reward": float(r.mean())}
    if euler:      # the eta = 0 sampler's exact density along its own samples from the first 4096 noises
        m = min(n, 4096)
        rows = dist.strided_rows(m)
        e = euler_logdensity(backend.velocity_fn(gen, cond.select(rows), 1.0), sigmas, z=noise[rows])
        x_e, logq = dist.gather_strided(e.x, m), dist.gather_strided(e.logq, m)
    for name, target in (("teacher", mix), ("tilted", tilt[0] if tilt else None)):
        if target is None:
            continue
        h = kl_histogram(x, target.log_prob, **KL_HIST)
        out[f"kl_hist_{name}"], out[f"kl_hist_{name}_se"] = h["kl"], h["stderr"]
        if euler:
            k = kl_exact_target(x_e, logq, target.log_prob)
            out[f"kl_euler_{name}"], out[f"kl_euler_{name}_se"] = k["kl"], k["stderr"]
    return out


def small_eval_config(cfg):
    """A cheaper copy of the config for the periodic in-training evaluation."""
    c = copy.copy(cfg)
    c.eval_samples = min(cfg.eval_samples, 4000)
    return c
