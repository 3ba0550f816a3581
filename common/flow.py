"""Flow-matching maths: schedules, conversions, one sampler step, transition log-probabilities, rollouts.

Conventions (shared/spec/decisions.md): sigma in [0, 1], sigma = 1 is pure noise, sigma = 0 is data;
    x_sigma = (1 - sigma) x0 + sigma eps,   v = eps - x0,
    x0_hat  = x - sigma v,                  eps_hat = x + (1 - sigma) v.
Sampling walks sigma downward on a grid 1 = sigma_0 > sigma_1 > ... > sigma_K = 0; Delta = sigma - sigma' > 0.

Every step function computes in float32 whatever the network's dtype (bf16 overflows in the SDE coefficients,
shared/spec/anchors.md pitfall 3) and returns (next sample, mean, std). A step whose target is sigma' = 0 is
deterministic for every kind: it returns x0_hat with std 0 (the SDE coefficients are singular or pointless there,
and both Flow-GRPO and DanceGRPO skip training it); its log-probability is reported as 0.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

STEP_KINDS = ("euler", "flow_grpo", "dance", "cps")


# ----------------------------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------------------------
def shift_sigmas(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Static shift map sigma = s t / (1 + (s - 1) t), elementwise; monotone, fixes 0 and 1 (SD3, Wan, DanceGRPO)."""
    return shift * t / (shift * t + (1 - t))  # = s t / (1 + (s - 1) t), written so that t = 1 maps to 1 exactly


def unshift_sigmas(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """Inverse of shift_sigmas: t = sigma / (s - (s - 1) sigma)."""
    return sigma / (shift - (shift - 1) * sigma)


def flux_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
            base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """FLUX.1's resolution-dependent shift exponent mu: linear in the packed image token count.

    The exponential time shift sigma = e^mu t / (e^mu t + 1 - t) equals the static shift with s = e^mu.
    512 px (1024 tokens) gives e^mu ~ 1.88, 1024 px (4096 tokens) e^mu ~ 3.16.
    """
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def flux2_empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """FLUX.2's empirical mu (diffusers' compute_empirical_mu): a fit in the token count and the step count.

    Two linear fits in the sequence length, at 10 and 200 steps, interpolated linearly in the step count;
    above 4300 tokens the 200-step fit is used alone.
    """
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if image_seq_len > 4300:
        return float(a2 * image_seq_len + b2)
    m_200 = a2 * image_seq_len + b2
    m_10 = a1 * image_seq_len + b1
    a = (m_200 - m_10) / 190.0
    b = m_200 - 200.0 * a
    return float(a * num_steps + b)


def make_sigmas(K: int, shift: float = 1.0, mu: float | None = None,
                timesteps: Sequence[float] | None = None, num_train_timesteps: int = 1000) -> torch.Tensor:
    """K+1 sigmas, float32, from sigma_0 = shifted(t_0) down to exactly 0.

    Base grid t: uniform linspace(1, 0, K+1)[:-1], or explicit raw timesteps / num_train_timesteps
    (e.g. RTDMD's [1000, 750, 500, 250]). Then shifted: by exp(mu) when mu is given (FLUX dynamic shift),
    else by the static shift. A 0 is appended: few-step students must end exactly at data.
    """
    if K < 1:
        raise ValueError(f"K must be >= 1, got {K}")
    if timesteps is not None:
        if len(timesteps) != K:
            raise ValueError(f"{len(timesteps)} timesteps given for K = {K}")
        t = torch.tensor([float(x) / num_train_timesteps for x in timesteps], dtype=torch.float64)
    else:
        t = torch.linspace(1.0, 0.0, K + 1, dtype=torch.float64)[:-1]
    s = math.exp(mu) if mu is not None else shift
    sig = shift_sigmas(t, s)
    return torch.cat([sig, torch.zeros(1, dtype=torch.float64)]).float()


# ----------------------------------------------------------------------------------------------------------
# Conversions
# ----------------------------------------------------------------------------------------------------------
def bcast(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """sigma as a float32 tensor broadcastable against x: scalar stays scalar, (B,) becomes (B, 1, ..., 1)."""
    s = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    return s.reshape(-1, *([1] * (x.ndim - 1))) if s.ndim == 1 else s


def velocity_to_x0(x: torch.Tensor, v: torch.Tensor, sigma) -> torch.Tensor:
    """x0_hat = x - sigma v."""
    return x - bcast(sigma, x) * v


def velocity_to_eps(x: torch.Tensor, v: torch.Tensor, sigma) -> torch.Tensor:
    """eps_hat = x + (1 - sigma) v."""
    return x + (1 - bcast(sigma, x)) * v


def x0_to_velocity(x: torch.Tensor, x0: torch.Tensor, sigma) -> torch.Tensor:
    """v = (x - x0) / sigma; undefined at sigma = 0 (clamped to 1e-12 to stay finite)."""
    return (x - x0) / bcast(sigma, x).clamp_min(1e-12)


def eps_to_velocity(x: torch.Tensor, eps: torch.Tensor, sigma) -> torch.Tensor:
    """v = (eps - x) / (1 - sigma); undefined at sigma = 1 (clamped to stay finite)."""
    return (eps - x) / (1 - bcast(sigma, x)).clamp_min(1e-12)


def interpolate(x0: torch.Tensor, eps: torch.Tensor, sigma) -> torch.Tensor:
    """The forward path x_sigma = (1 - sigma) x0 + sigma eps."""
    s = bcast(sigma, x0)
    return (1 - s) * x0 + s * eps


# ----------------------------------------------------------------------------------------------------------
# One step
# ----------------------------------------------------------------------------------------------------------
def euler_step(x: torch.Tensor, v: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    """x' = x + (sigma' - sigma) v, in float32."""
    x, v = x.float(), v.float()
    return x + (bcast(sigma_next, x) - bcast(sigma, x)) * v


def sde_step(x: torch.Tensor, v: torch.Tensor, sigma, sigma_next, kind: str = "euler",
             noise_level: float = 0.0, noise: torch.Tensor | None = None,
             generator: torch.Generator | None = None, sigma_max: float | None = None):
    """One transition x (at sigma) -> x' (at sigma' < sigma). Returns (x', mean, std), all float32.

    x, v: (B, ...); sigma, sigma_next: float or (B,); std has x's broadcast shape ((B, 1, ..) or scalar).
    Kinds (g is the diffusion coefficient, eps_hat = x + (1 - sigma) v, Delta = sigma - sigma'):
      euler      mean = x - Delta v, std = 0
      flow_grpo  g = a sqrt(sigma / (1 - sigma)); at sigma = 1 the denominator uses sigma_max (the grid's
                 second value, Flow-GRPO's rule) so the first step has std exactly a when Delta = 1 - sigma_max
      dance      g = eta (constant)
                 for both: mean = x - Delta v - Delta g^2 / (2 sigma) eps_hat, std = g sqrt(Delta)
                 (Euler-Maruyama of the reverse SDE with the ODE's marginals)
      cps        std = sigma' sin(a pi / 2), mean = (1 - sigma') x0_hat + sqrt(sigma'^2 - std^2) eps_hat
                 (coefficient-preserving, DDIM-like; a = 1 re-noises x0_hat with fresh noise)
    noise_level is a (flow_grpo), eta (dance) or a in [0, 1] (cps). noise: caller-supplied N(0, I) draw of x's
    shape (noise shared inside a GRPO group); otherwise drawn from generator. A step to sigma' = 0 returns
    x0_hat deterministically for every kind.
    """
    if kind not in STEP_KINDS:
        raise ValueError(f"unknown step kind {kind!r}; choose one of {STEP_KINDS}")
    x, v = x.float(), v.float()
    s, sn = bcast(sigma, x), bcast(sigma_next, x)
    delta = s - sn
    zero = torch.zeros((), device=x.device)
    # Decide on the host what python floats allow, so a rollout does not synchronise with the GPU every step.
    sn_host = float(sigma_next) if isinstance(sigma_next, (int, float)) else None
    if kind == "euler" or noise_level == 0.0 or sn_host == 0.0:
        # Euler; at sigma' = 0 this is x0_hat exactly (x - sigma v), the deterministic last step of every kind
        return x - delta * v, x - delta * v, zero
    eps_hat = x + (1 - s) * v
    if kind in ("flow_grpo", "dance"):
        if kind == "flow_grpo":
            if sigma_max is None:
                sigma_max = float(torch.as_tensor(sigma_next).max())  # the next grid value at the first step
            denom = torch.where(s >= 1.0, torch.full_like(s, 1 - sigma_max), 1 - s)
            g = noise_level * torch.sqrt(s / denom)
        else:
            g = torch.full_like(s, noise_level)
        mean = x - delta * v - delta * g ** 2 / (2 * s.clamp_min(1e-12)) * eps_hat
        std = g * torch.sqrt(delta.clamp_min(0))
    else:  # cps
        std = sn * math.sin(noise_level * math.pi / 2)
        x0_hat = x - s * v
        mean = (1 - sn) * x0_hat + torch.sqrt((sn ** 2 - std ** 2).clamp_min(0)) * eps_hat
    if sn_host is None:
        # per-sample sigma' (a tensor): rows that step to sigma' = 0 are deterministic (x0_hat, std 0)
        final = sn <= 0
        mean = torch.where(final, x - s * v, mean)
        std = torch.where(final, zero, std)
    if noise is None:
        g_dev = generator.device if generator is not None else x.device
        noise = torch.randn(x.shape, generator=generator, device=g_dev, dtype=torch.float32).to(x.device)
    return mean + std * noise.float(), mean, std


# ----------------------------------------------------------------------------------------------------------
# Log-probabilities
# ----------------------------------------------------------------------------------------------------------
def _reduce(t: torch.Tensor, reduce: str) -> torch.Tensor:
    dims = tuple(range(1, t.ndim))
    if reduce == "mean":
        return t.mean(dim=dims)
    if reduce == "sum":
        return t.sum(dim=dims)
    raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")


def gaussian_logprob(x_next: torch.Tensor, mean: torch.Tensor, std, reduce: str = "mean",
                     detach_sample: bool = True) -> torch.Tensor:
    """log N(x' ; mean, std^2 I) per sample: (B,).

    Per element: -(x' - mean)^2 / (2 std^2) - log std - 1/2 log(2 pi); then the mean over all non-batch
    dimensions (Flow-GRPO / DanceGRPO convention, so the PPO ratio is (pi/pi_old)^(1/D)) or the sum (exact).
    x' is detached by default: only the mean (through the network) carries the policy gradient.
    Where std == 0 (deterministic steps) the log-probability is defined as 0.
    """
    x_next = x_next.detach().float() if detach_sample else x_next.float()
    mean = mean.float()
    std = torch.as_tensor(std, dtype=torch.float32, device=mean.device).expand_as(mean)
    safe = std.clamp_min(1e-20)
    lp = -((x_next - mean) ** 2) / (2 * safe ** 2) - torch.log(safe) - 0.5 * math.log(2 * math.pi)
    lp = torch.where(std > 0, lp, torch.zeros_like(lp))
    return _reduce(lp, reduce)


def cps_logprob_surrogate(x_next: torch.Tensor, mean: torch.Tensor, reduce: str = "mean",
                          detach_sample: bool = True) -> torch.Tensor:
    """The CPS 'log-probability' of Flow-GRPO's cps mode and RTDMD's code: -(x' - mean)^2, no 1/(2 std^2), no
    constants; (B,). Not a likelihood: the ratio built from it has a clip width that scales with std^2."""
    x_next = x_next.detach().float() if detach_sample else x_next.float()
    return _reduce(-((x_next - mean.float()) ** 2), reduce)


# ----------------------------------------------------------------------------------------------------------
# Rollout
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Trajectory:
    """What a rollout records. K = number of executed steps (stop + 1 when stopped early).

    sigmas   (K+1,)             the grid levels visited: sigmas[k] -> sigmas[k+1] is step k
    states   (B, K+1, ...)      x before and after every step; states[:, 0] is the initial noise
    x0       (B, K, ...)        x0-predictions x - sigma v at every step (float32)
    means    (B, K, ...)        transition means (None unless store_means)
    stds     (B, K)             transition std per sample (0 for deterministic steps)
    logprobs (B, K)             log-probability of each executed transition (0 where deterministic)
    noises   (B, K, ...)        the N(0, I) draws used (zeros where deterministic)
    """
    sigmas: torch.Tensor
    states: torch.Tensor
    x0: torch.Tensor
    stds: torch.Tensor
    logprobs: torch.Tensor
    noises: torch.Tensor
    means: torch.Tensor | None = None
    extras: dict = field(default_factory=dict)

    @property
    def final(self) -> torch.Tensor:
        """The last state: (B, ...)."""
        return self.states[:, -1]

    @property
    def num_steps(self) -> int:
        return self.states.shape[1] - 1


def _f32(v: float) -> float:
    """v rounded to float32, as a python float (host arithmetic that matches float32 tensor arithmetic)."""
    return struct.unpack("f", struct.pack("f", v))[0]


def _grad_steps(grad: str | int, K: int) -> set[int]:
    if grad == "none":
        return set()
    if grad == "all":
        return set(range(K))
    if grad == "last":
        return {K - 1}
    if isinstance(grad, int):
        return set(range(max(0, K - grad), K))
    if isinstance(grad, (set, frozenset, list, tuple)):
        return {int(k) for k in grad}
    raise ValueError(f"grad must be 'none', 'all', 'last', an int or a set of step indices, got {grad!r}")


def rollout(velocity_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
            sigmas: torch.Tensor, kind: str = "euler", noise_level: float = 0.0, grad: str | int = "none",
            stop: int | None = None, noises: torch.Tensor | Sequence[torch.Tensor | None] | None = None,
            generator: torch.Generator | None = None, logprob: str = "gaussian", reduce: str = "mean",
            store_means: bool = False, sigma_max: float | None = None, detach_inputs: bool = False,
            draw_rows: tuple[int, Sequence[int]] | None = None) -> Trajectory:
    """Run velocity_fn(x, sigma) over the grid `sigmas` ((K+1,), from 1 to 0) with one step kind.

    grad:  'none' (no graph), 'all' (every step), 'last' (only the last executed step keeps its graph: RTDMD's
           random-stop rollouts), an int k (the last k executed steps: RATS' truncated reward gradient), or a set
           of step indices (GRPO's trained steps).
    stop:  execute steps 0..stop only (stop < K); the trajectory then has stop + 1 steps.
    noises: (B, K, ...) tensor or a list of per-step tensors/None: caller-supplied draws (e.g. shared in a group).
    logprob: 'gaussian' (exact density) or 'cps' (the surrogate -(x' - mean)^2); reduce: 'mean' or 'sum'.
    detach_inputs: every step's network input is detached, so a step with gradients has its graph through the
           parameters only (the policy-gradient graph of GRPO: log pi(x_{k+1} | x_k) with x_k fixed), not the chain.
    draw_rows: (n, rows): x holds the rows `rows` of a batch of n, and every stochastic step draws the noise of the
           whole batch (n, ...) and keeps those rows: a rank's share of an evaluation set gets the noise that one
           process sampling all n rows would (common.evaluate.sample_final(shard=True)).
    sigma is passed to velocity_fn as a (B,) float32 tensor.
    Deterministic steps (Euler, noise_level 0, or the step to sigma' = 0) take a short path: the update and the
    x0-prediction with host scalars, and one shared zero tensor for their std / log-prob / noise records; the
    values are bitwise those of sde_step (the loop's own cost matters where the network is small).
    """
    K_total = len(sigmas) - 1
    K = K_total if stop is None else stop + 1
    if not 1 <= K <= K_total:
        raise ValueError(f"stop={stop} outside the grid of {K_total} steps")
    grid = [float(v) for v in sigmas.tolist()]        # read the grid once on the host: no per-step GPU sync
    if sigma_max is None and K_total >= 1:
        sigma_max = grid[1]
    with_grad = _grad_steps(grad, K)
    B = x.shape[0]
    states, x0s, stds, lps, used, means = [x], [], [], [], [], []
    zero_b = zero_x = None   # shared records of the deterministic steps, allocated once
    cur = x
    for k in range(K):
        s = torch.full((B,), grid[k], device=x.device, dtype=torch.float32)
        stochastic = kind != "euler" and noise_level > 0 and grid[k + 1] > 0   # known on the host
        nk = None if noises is None else noises[k] if not torch.is_tensor(noises) else noises[:, k]
        with torch.set_grad_enabled(k in with_grad and torch.is_grad_enabled()):
            inp = cur if (k in with_grad and not detach_inputs) else cur.detach()
            v = velocity_fn(inp, s).float()
            xf = inp.float()
            x0 = xf - grid[k] * v                  # x0_hat = x - sigma v (sigma exact in float32)
            if not stochastic:
                # x' = x - Delta v with Delta = sigma - sigma' rounded to float32 as sde_step's tensors do;
                # at sigma' = 0 this is x0_hat itself
                delta = _f32(_f32(grid[k]) - _f32(grid[k + 1]))
                nxt = x0 if grid[k + 1] == 0.0 else xf - delta * v
                if zero_b is None:
                    zero_b, zero_x = torch.zeros(B, device=x.device), torch.zeros_like(nxt)
                states.append(nxt)
                x0s.append(x0)
                stds.append(zero_b)
                lps.append(zero_b)
                used.append(zero_x)
                if store_means:
                    means.append(nxt)
                cur = nxt
                continue
            if nk is None:
                g_dev = generator.device if generator is not None else x.device
                shape = x.shape if draw_rows is None else (draw_rows[0], *x.shape[1:])
                nk = torch.randn(shape, generator=generator, device=g_dev, dtype=torch.float32)
                nk = (nk if draw_rows is None else nk[list(draw_rows[1])]).to(x.device)
            nxt, mean, std = sde_step(inp, v, s, grid[k + 1], kind, noise_level, noise=nk, sigma_max=sigma_max)
            if logprob == "gaussian":
                lp = gaussian_logprob(nxt, mean, std, reduce)
            elif logprob == "cps":
                lp = cps_logprob_surrogate(nxt, mean, reduce)
            else:
                raise ValueError(f"logprob must be 'gaussian' or 'cps', got {logprob!r}")
        std_b = torch.as_tensor(std, dtype=torch.float32, device=x.device)
        std_b = std_b.reshape(B, -1)[:, 0] if std_b.ndim > 0 else std_b.expand(B)
        states.append(nxt)
        x0s.append(x0)
        stds.append(std_b)
        lps.append(lp)
        used.append(nk.float())
        if store_means:
            means.append(mean)
        cur = nxt
    return Trajectory(sigmas=sigmas[:K + 1].float(), states=torch.stack(states, 1), x0=torch.stack(x0s, 1),
                      stds=torch.stack(stds, 1), logprobs=torch.stack(lps, 1), noises=torch.stack(used, 1),
                      means=torch.stack(means, 1) if store_means else None)


def transition_logprob(velocity_fn, x: torch.Tensor, x_next: torch.Tensor, sigma, sigma_next, kind: str,
                       noise_level: float, logprob: str = "gaussian", reduce: str = "mean",
                       sigma_max: float | None = None):
    """Recompute log pi(x_next | x) under the current network (with gradients): the GRPO training-time
    counterpart of the log-probabilities a rollout stored. Returns (logprob (B,), mean, std)."""
    B = x.shape[0]
    s = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).expand(B)
    sn = torch.as_tensor(sigma_next, dtype=torch.float32, device=x.device).expand(B)
    v = velocity_fn(x, s).float()
    _, mean, std = sde_step(x, v, s, sn, kind, noise_level, noise=torch.zeros_like(x, dtype=torch.float32),
                            sigma_max=sigma_max)
    lp = gaussian_logprob(x_next, mean, std, reduce) if logprob == "gaussian" else \
        cps_logprob_surrogate(x_next, mean, reduce)
    return lp, mean, std
