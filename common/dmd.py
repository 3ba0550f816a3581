"""RTDMD maths (shared/spec/rtdmd.md): ambient DMD, the consistency regulariser, SubGRPO and the hybrid gradient.

Conventions as in common/flow.py: sigma in [0, 1] (1 = noise), x_sigma = (1 - sigma) x0 + sigma eps, v = eps - x0.
In this module `s` is always the level of the generator sample being matched (x_s), `t > s` the renoise level.
Scores carry a subscript in the docstrings (s_fake, s_real); a bare s is a noise level.

Pieces (each a small pure function; the script rtdmd.py composes them):
  ambient kernel      x_t = a x_s + sigma_ts eps2,  a = (1-t)/(1-s),  sigma_ts^2 = t^2 - a^2 s^2        (Sec. 2.2)
  fake-score target   u = -x_s/(1-s) + b eps2,  b = (t + (1-t) s^2/(1-s)^2)/sigma_ts, weight min(1, 10 sigma_ts^2)
  consistency         (h1 - h_a)(h2 - h_a) with two transitions t -> t'' (kernel cps or ddpm)           (Sec. 2.4)
  batched calls       n fixed-input evaluations as one network call on the concatenated batch (cost only)
  DMD loss            g = (y_fake - y_real) / mean|x - y_real|, L = 1/2 mean((x - sg[x - g])^2)           (Sec. 1.2)
  projections         y = CPS(x_t, v, t -> s, eta, shared m);  y_f - y_r = c (v_f - v_r), c < 0          (Sec. 2.5)
  SubGRPO             2 of the 3 stochastic steps per epoch; shared noise at the others, seeded by
                      (sha256(prompt), step, epoch)                                                     (Sec. 3.5)
  advantages          per reward: group mean / global std; weighted sum; re-standardised; clamp 5       (Sec. 3.3)
  stage-2 terms       the CPS rollout in the loss's graph, then the log-probabilities on S and x0_last from it
                      (or, through the whole chain, the |S| + 1 fixed-input evaluations as one batched call)
"""
from __future__ import annotations

import hashlib
import math
import random
from typing import Sequence

import torch

from common.flow import bcast, rollout, sde_step, transition_logprob, velocity_to_x0
from common.rl import group_advantages

CONSISTENCY_KERNELS = ("cps", "ddpm")


# ----------------------------------------------------------------------------------------------------------
# Ambient forward kernel and the fake-score target (Sec. 2.2, 2.3)
# ----------------------------------------------------------------------------------------------------------
def ambient_coeffs(s, t, min_var: float = 1e-12):
    """(a, sigma_ts) for the forward kernel from level s to level t > s; s, t scalars or tensors (broadcast).

    a = (1 - t)/(1 - s), sigma_ts^2 = t^2 - a^2 s^2 (clamped at min_var). Then a (1 - s) = 1 - t and
    a^2 s^2 + sigma_ts^2 = t^2: a forward-noised x_s at level s maps to a forward-noised x_t at level t.
    """
    s = torch.as_tensor(s, dtype=torch.float64) if not torch.is_tensor(s) else s
    t = torch.as_tensor(t, dtype=torch.float64) if not torch.is_tensor(t) else t
    a = (1 - t) / (1 - s)
    sig = (t ** 2 - a ** 2 * s ** 2).clamp_min(min_var).sqrt()
    return a, sig


def ambient_forward(x_s: torch.Tensor, s, t, eps: torch.Tensor) -> torch.Tensor:
    """x_t = a x_s + sigma_ts eps: (B, ...) -> (B, ...); s, t floats or (B,) tensors."""
    a, sig = ambient_coeffs(torch.as_tensor(s, dtype=torch.float32), torch.as_tensor(t, dtype=torch.float32))
    return bcast(a, x_s) * x_s.float() + bcast(sig, x_s) * eps.float()


def ambient_target(x_s: torch.Tensor, s, t, eps: torch.Tensor) -> torch.Tensor:
    """The ambient DSM regression target u = -x_s/(1-s) + b eps, b = (t + (1-t) s^2/(1-s)^2) / sigma_ts; (B, ...).

    E[u | x_t] is the velocity of the law of x_t (the generator's t-marginal), so the minimiser of
    E||v_phi(x_t, t) - u||^2 is the fake score. For s = 0 it is the flow-matching target eps - x0.
    """
    s32, t32 = torch.as_tensor(s, dtype=torch.float32), torch.as_tensor(t, dtype=torch.float32)
    _, sig = ambient_coeffs(s32, t32)
    b = (t32 + (1 - t32) * s32 ** 2 / (1 - s32) ** 2) / sig
    return -x_s.float() / bcast(1 - s32, x_s) + bcast(b, x_s) * eps.float()


def ambient_weight(s, t, clamp: float = 10.0) -> torch.Tensor:
    """min(1, clamp sigma_ts^2): the code's 'move scale out' weighting ((B,) or scalar float32).

    The code multiplies prediction and target by sigma_ts and weights by clamp(1/sigma_ts^2, 0, clamp),
    which is algebraically this weight on the plain MSE; it tames b ~ 1/sigma_ts just above s.
    """
    _, sig = ambient_coeffs(torch.as_tensor(s, dtype=torch.float32), torch.as_tensor(t, dtype=torch.float32))
    return (clamp * sig ** 2).clamp(max=1.0)


def ambient_fake_loss(v_pred: torch.Tensor, u: torch.Tensor, weight) -> torch.Tensor:
    """L_amb = mean_b[ w_b mean_d (v - u)^2 ]: scalar. v_pred, u: (B, ...); weight: (B,) or scalar (1 = plain MSE)."""
    per = ((v_pred.float() - u.float()) ** 2).flatten(1).mean(1)
    return (torch.as_tensor(weight, dtype=torch.float32, device=per.device) * per).mean()


def sample_renoise_level(s: torch.Tensor, generator: torch.Generator | None = None, end: float = 1.0,
                         lo: float = 0.02, hi: float = 0.98, offset: float = 0.01) -> torch.Tensor:
    """t ~ U[s + offset, end] per sample, clamped to [lo, hi], in the code's 1000-step units (integer tau / 1000).

    s: (B,) levels of the matched samples. Returns (B,) float32. Uniform in sigma (no time shift), as the code.
    """
    s = torch.as_tensor(s, dtype=torch.float32)
    u = torch.rand(s.shape, generator=generator, device=generator.device if generator is not None else s.device)
    lo_tau, hi_tau = 1000 * s.to(u.device) + 1000 * offset, torch.full_like(u, 1000 * end)
    tau = torch.floor(lo_tau + u * (hi_tau - lo_tau).clamp_min(0)).clamp(1000 * lo, 1000 * hi)
    return (tau / 1000).to(s.device)


# ----------------------------------------------------------------------------------------------------------
# Transitions: CPS (the generator's sampler) and the DDPM posterior kernel (Sec. 2.4, 2.5, 6 T8/T9)
# ----------------------------------------------------------------------------------------------------------
def cps_transition(x: torch.Tensor, v: torch.Tensor, t, t_next, eta: float, noise: torch.Tensor | None = None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """CPS from level t to t_next < t: (1 - t') x0_hat + t' cos(eta pi/2) eps_hat + t' sin(eta pi/2) n; (B, ...).

    A thin call of common.flow.sde_step(kind='cps'); t_next = 0 returns x0_hat deterministically.
    """
    return sde_step(x, v, t, t_next, kind="cps", noise_level=eta, noise=noise, generator=generator)[0]


def ddpm_transition(x: torch.Tensor, v: torch.Tensor, t, t_next, noise: torch.Tensor) -> torch.Tensor:
    """The Markov (DDPM) posterior q(x_{t'} | x_t, x0 = x0_hat) with plug-in x0_hat = x - t v; (B, ...).

    With a = (1-t)/(1-t') and sig^2 = t^2 - a^2 t'^2 (ambient_coeffs(t', t)):
      mean = a t'^2/t^2 x_t + sig^2 (1 - t')/t^2 x0_hat,   std^2 = t'^2 sig^2 / t^2.
    Under this kernel the optimal denoiser is a martingale (rtdmd.md T9); CPS with eta < 1 is not.
    """
    x, v = x.float(), v.float()
    t_, tn = bcast(t, x), bcast(t_next, x)
    a, sig = ambient_coeffs(tn, t_)
    x0 = velocity_to_x0(x, v, t)
    mean = a * tn ** 2 / t_ ** 2 * x + sig ** 2 * (1 - tn) / t_ ** 2 * x0
    return mean + (tn * sig / t_) * noise.float()


def projection_coefficient(s, t, eta: float):
    """c(s, t, eta) = s cos(eta pi/2)(1 - t) - (1 - s) t: with shared noise y_f - y_r = c (v_f - v_r).

    Negative for every 0 <= s < t <= 1 and eta in [0, 1], so the update direction is s_real - s_fake (DMD).
    """
    return s * math.cos(eta * math.pi / 2) * (1 - t) - (1 - s) * t


# ----------------------------------------------------------------------------------------------------------
# The consistency regulariser (Sec. 2.4)
# ----------------------------------------------------------------------------------------------------------
def consistency_estimate(h_a: torch.Tensor, h1: torch.Tensor, h2: torch.Tensor, two_sample: bool = True):
    """Martingale-defect estimate, scalar: mean[(h1 - h_a)(h2 - h_a)] (two-sample, unbiased for
    ||E[h | x_t] - h_a||^2) or mean[(h1 - h_a)^2] (one-sample; adds tr Var[h | x_t]). NaN/Inf -> 0 as the code."""
    d1 = h1.float() - h_a.float()
    d2 = (h2.float() - h_a.float()) if two_sample else d1
    return torch.nan_to_num(d1 * d2, nan=0.0, posinf=0.0, neginf=0.0).mean()


def batched_velocity(velocity_fn, xs: Sequence[torch.Tensor], sigmas: Sequence) -> list[torch.Tensor]:
    """n velocity evaluations as ONE call of velocity_fn on their concatenation; returns n float32 (B_i, ...).

    xs: n tensors (B_i, ...); sigmas: n levels, each a scalar or (B_i,). velocity_fn(x (sum B_i, ...),
    sigma (sum B_i,)) must condition row by row on the concatenated batch (its condition repeated per block, e.g.
    common.backend.Cond.cat([cond] * n)). Same sample evaluations and values as n separate calls (up to the order
    of sums inside a batched GEMM), one network call instead of n: fewer kernel launches and weight reads.
    """
    sizes = [x.shape[0] for x in xs]
    sig = torch.cat([torch.as_tensor(s, dtype=torch.float32, device=x.device).expand(x.shape[0])
                     for s, x in zip(sigmas, xs)])
    return list(velocity_fn(torch.cat(list(xs), 0), sig).float().split(sizes, 0))


def consistency_loss(velocity_fn, x_t: torch.Tensor, t: torch.Tensor, v_a: torch.Tensor, t_next: torch.Tensor,
                     kernel: str = "cps", eta: float = 0.9, generator: torch.Generator | None = None,
                     two_sample: bool = True, batched: bool = False) -> torch.Tensor:
    """One-hop consistency of the fake model h(x, t) = x - t v_phi(x, t); scalar.

    velocity_fn(x, t (B,)) -> v with gradients; x_t: (B, ...); t, t_next: (B,); v_a = v_phi(x_t, t) with its graph
    (reused from the ambient loss). Two stop-grad transitions x''_i = kernel(x_t, sg[v_a], t -> t''), then
    h_i = h(x''_i, t''); returns consistency_estimate(h_a, h1, h2).
    batched: velocity_fn takes the n = 2 (1 if not two_sample) hop samples concatenated, (n B, ...) rows with the
    condition repeated n times (e.g. Cond.cat([cond, cond])), and is called once (batched_velocity) instead of n
    times. Both draws happen before any network call, so the random stream and the value are the same either way.
    """
    if kernel not in CONSISTENCY_KERNELS:
        raise ValueError(f"consistency kernel must be one of {CONSISTENCY_KERNELS}, got {kernel!r}")
    h_a = velocity_to_x0(x_t.float(), v_a.float(), t)
    with torch.no_grad():
        xs = []
        for _ in range(2 if two_sample else 1):
            n = torch.randn(x_t.shape, generator=generator,
                            device=generator.device if generator is not None else x_t.device).to(x_t.device)
            if kernel == "cps":
                xs.append(cps_transition(x_t, v_a.detach(), t, t_next, eta, noise=n))
            else:
                xs.append(ddpm_transition(x_t, v_a.detach(), t, t_next, n))
    vs = batched_velocity(velocity_fn, xs, [t_next] * len(xs)) if batched else \
        [velocity_fn(xi, t_next).float() for xi in xs]
    hs = [velocity_to_x0(xi, vi, t_next) for xi, vi in zip(xs, vs)]
    return consistency_estimate(h_a, hs[0], hs[-1], two_sample)


# ----------------------------------------------------------------------------------------------------------
# The DMD generator loss (Sec. 1.2, 2.5)
# ----------------------------------------------------------------------------------------------------------
def dmd_direction(x: torch.Tensor, y_fake: torch.Tensor, y_real: torch.Tensor, normalise: bool = True):
    """g = (y_fake - y_real) / mean_per_sample|x - y_real| (float64, NaN -> 0); (B, ...). normalise=False: y_f - y_r."""
    diff = y_fake.double() - y_real.double()
    if normalise:
        norm = (x.detach().double() - y_real.double()).abs().flatten(1).mean(1)
        diff = diff / norm.reshape(-1, *([1] * (x.ndim - 1)))
    return torch.nan_to_num(diff)


def dmd_loss(x: torch.Tensor, y_fake: torch.Tensor, y_real: torch.Tensor, normalise: bool = True):
    """The DMD surrogate L = 1/2 mean((x - sg[x - g])^2) in float64; returns (L, g).

    x: (B, ...) generator output at level s (with graph); y_fake, y_real: projections at s (no graph).
    Value = 1/2 mean(g^2); dL/dx = g / numel(x): descent moves x toward y_real and away from y_fake.
    Zero value and zero gradient when y_fake == y_real.
    """
    g = dmd_direction(x, y_fake, y_real, normalise)
    xd = x.double()
    return 0.5 * ((xd - (xd - g).detach()) ** 2).mean(), g


def project_pair(x_t: torch.Tensor, v_fake: torch.Tensor, v_real: torch.Tensor, t, s, eta: float,
                 noise: torch.Tensor):
    """Shared-noise projections back to level s: y = CPS(x_t, v, t -> s, eta, m) for v_fake and v_real.

    Returns (y_fake, y_real), each (B, ...). With s = 0 both are x0-predictions (plain DMD).
    """
    return (cps_transition(x_t, v_fake, t, s, eta, noise=noise), cps_transition(x_t, v_real, t, s, eta, noise=noise))


def kl_direction(v_fake: torch.Tensor, v_real: torch.Tensor, t) -> torch.Tensor:
    """Unnormalised KL gradient wrt a clean sample x0 through x_t = (1-t) x0 + t eps; (B, ...).

    d KL(p_t || q_t)/d x0 = (1 - t)(s_fake - s_real)(x_t) = -(1 - t)^2 / t (v_fake - v_real), since
    s = -(x + (1 - t) v)/t. Used by the raw-advantage toy mode, where the scale against beta matters.
    """
    tt = bcast(t, v_fake)
    return -(1 - tt) ** 2 / tt * (v_fake.float() - v_real.float())


def linear_surrogate(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """mean_b sum_d x * sg[g]: scalar whose gradient wrt each sample is g / B (per-sample sum over dims)."""
    return (x.float() * g.detach().float()).flatten(1).sum(1).mean()


# ----------------------------------------------------------------------------------------------------------
# SubGRPO (Sec. 3.5) and advantages (Sec. 3.3)
# ----------------------------------------------------------------------------------------------------------
def subgrpo_steps(seed: int, epoch: int, candidates: Sequence[int] = (0, 1, 2), n: int = 2) -> list[int]:
    """The trained stochastic steps of this epoch: sorted(Random(seed + 100000 epoch + 104729).sample(cands, n)).

    Identical on every rank. n >= len(candidates) returns all candidates (full GRPO).
    """
    cands = list(candidates)
    if n >= len(cands):
        return sorted(cands)
    return sorted(random.Random(seed + 100000 * epoch + 104729).sample(cands, n))


def shared_noise_seed(prompt: str, step: int, epoch: int) -> int:
    """(first 4 bytes of sha256(prompt), big-endian) + 10007 step + 100000 epoch, mod 2^31."""
    h = int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:4], "big")
    return (h + 10007 * step + 100000 * epoch) % (2 ** 31)


def subgrpo_noises(prompts: Sequence[str], shape: Sequence[int], num_steps: int, selected: Sequence[int],
                   stochastic: Sequence[int], epoch: int, device=None) -> list[torch.Tensor | None]:
    """Per-step noise for common.flow.rollout: a list of num_steps entries.

    At stochastic steps not in `selected` every sample of prompt p gets the same draw from a CPU generator seeded
    with shared_noise_seed(p, step, epoch) (shape (B, *shape)); elsewhere None, so the rollout draws fresh noise
    from its own generator in the same order as full GRPO (bit-identical when nothing is shared).
    """
    out: list[torch.Tensor | None] = [None] * num_steps
    for j in stochastic:
        if j in selected:
            continue
        cache: dict[str, torch.Tensor] = {}
        rows = []
        for p in prompts:
            if p not in cache:
                g = torch.Generator().manual_seed(shared_noise_seed(p, j, epoch))
                cache[p] = torch.randn(tuple(shape), generator=g)
            rows.append(cache[p])
        out[j] = torch.stack(rows).to(device)
    return out


def per_reward_advantages(r: torch.Tensor, group_size: int, weights: torch.Tensor | None = None,
                          clamp: float = 5.0, eps: float = 1e-4) -> torch.Tensor:
    """RTDMD's advantages: (B, M) rewards -> (B,).

    A_i = (r_i - group mean) / (global std of r_i + eps) per reward (common.rl.group_advantages, std='global');
    A = sum_i w_i A_i; A <- (A - mean A) / (std A + eps); clamp to [-clamp, clamp].
    """
    r = r[:, None] if r.ndim == 1 else r
    w = torch.ones(r.shape[1]) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
    a = group_advantages(r, group_size, std="global", eps=eps) @ w.to(r.device)
    a = (a - a.mean()) / (a.std(correction=0) + eps)
    return a.clamp(-clamp, clamp)


def raw_advantages(r: torch.Tensor, group_size: int, beta: float) -> torch.Tensor:
    """The toy's calibrated mode: beta (r - leave-one-out group mean); (B,) from (B,) combined rewards.

    The leave-one-out baseline keeps the score-function estimator unbiased (rtdmd.md T11), so with an exact
    log-probability the policy gradient estimates beta grad E[r] and the target is p_T e^{beta r} / Z.
    """
    return beta * group_advantages(r.float(), group_size, std="none", baseline="loo")


def sample_consistency_level(t: torch.Tensor, generator: torch.Generator | None = None,
                             max_offset: int = 200) -> torch.Tensor:
    """t'' = max(tau - delta, 0) / 1000 with delta ~ U{1..max_offset} per sample (the one-hop target level); (B,)."""
    tau = torch.round(torch.as_tensor(t, dtype=torch.float32) * 1000)
    d = torch.randint(1, max_offset + 1, tau.shape, generator=generator,
                      device=generator.device if generator is not None else tau.device).to(tau.device)
    return (tau - d).clamp_min(0) / 1000


# ----------------------------------------------------------------------------------------------------------
# Stage 2: the rollout and the generator terms of the hybrid loss, no network input evaluated twice
# ----------------------------------------------------------------------------------------------------------
def stage2_rollout(vfn, x, sigmas, noises, S, eta: float, chain: bool, generator, logprob: str, reduce: str):
    """Stage 2's CPS rollout from x (B, ...), in the graph where the loss needs it: common.flow.Trajectory.

    The generator's weights do not change between the rollout and the loss (only the fake score is updated in
    between), so the rollout's own evaluations are the loss's: chain (--dmd-through all): every step with its
    graph through the chain, tr.final is the DMD sample (re-running the chain from the same start and noises would
    evaluate the same K inputs twice). Otherwise only the trained steps S and the deterministic last step keep a
    graph, with their inputs detached (through the weights only): tr.logprobs[:, j] (j in S) is the recomputed
    log pi(x_{j+1} | x_j) of the policy gradient and tr.final is x0_last = z - sigma_{K-1} v(z), z fixed.
    The noise drawn from `generator` is the same in every mode (the draws do not depend on the graph)."""
    K = len(sigmas) - 1
    return rollout(vfn, x, sigmas, "cps", eta, grad="all" if chain else {*S, K - 1}, detach_inputs=not chain,
                   noises=noises, generator=generator, logprob=logprob, reduce=reduce)


def stage2_terms(vfn, tr, sigmas, S, eta: float, chain: bool, logprob: str, reduce: str):
    """The generator terms of the stage-2 loss: ([log pi(x_{j+1} | x_j) (B,) for j in S], x0_last, x0), (B, ...).

    x0_last = z - sigma_{K-1} v(z) with z = x_{K-1} fixed (reward back-propagation; the DMD sample x0 too unless
    chain, where x0 = tr.final through the whole chain). Without chain they are stage2_rollout's own records. With
    chain, the policy gradient and the back-propagation need the network at the rollout's states with the inputs
    FIXED, a gradient path (weights only) distinct from the chain's (through the states): sharing the chain's
    evaluations would need a custom backward, so the |S| + 1 fixed-input evaluations are made again, as ONE batched
    call (vfn must be a Backend.tiled_velocity_fn) whose log-probabilities follow common.flow.transition_logprob."""
    K = len(sigmas) - 1
    if not chain:
        return [tr.logprobs[:, j] for j in S], tr.final, tr.final
    steps = [*S, K - 1]
    xs = [tr.states[:, j].detach() for j in steps]
    vs = batched_velocity(vfn, xs, [sigmas[j] for j in steps])
    # transition_logprob's maths on the velocity already evaluated (its velocity_fn returns v)
    lps = [transition_logprob(lambda *_, v=v: v, x, tr.states[:, j + 1].detach(), sigmas[j], sigmas[j + 1], "cps",
                              eta, logprob, reduce)[0] for j, x, v in zip(S, xs, vs)]
    return lps, xs[-1] - sigmas[K - 1] * vs[-1], tr.final
