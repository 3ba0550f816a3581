"""Metrics on 2D samples with exact densities where possible.

Deterministic samplers (exact, unbiased):
  euler_logdensity(velocity_fn, sigmas, z=... | x=...)  the density of a K-step Euler sampler by change of
      variables, along its own samples (from noise z) or at arbitrary points x (by inverting every step);
  kl_sampler(student_fn, student_sigmas, target, ...)  KL(q_student || target) = E_q[log q_S - log p_target], with
      target an exact log-density (mixture, tilted mixture) or a teacher velocity + its grid (its Euler density);
  kl_exact_target(x, logq, target)  the same estimate for an exact target from the sampler's x and log q;
  kl_tilted(...)  KL(q || p_T e^{beta r} / Z) and its decomposition KL(q || p_T) - beta E_q[r] + log Z.
Stochastic samplers (no tractable density): kl_histogram, a binned estimate with its error stated.
Sample metrics: mmd (RBF, unbiased), mode_mass, reward_stats. Grid quadrature: grid_points, integrate_on_grid,
kl_quadrature. decision_curve: at which noise level an objective is decided (OTCA's early and late objectives).

velocity_fn(x, sigma) takes x (B, 2) and sigma (B,) and returns (B, 2), like Backend.velocity_fn(net, cond) and
common.flow.rollout. It must act on each sample independently (no batch statistics): the per-sample Jacobian is
read off one backward pass per output coordinate.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_LOG2PI = math.log(2 * math.pi)


def std_normal_logpdf(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) per row: (B, D) -> (B,)."""
    return -0.5 * (z ** 2).sum(-1) - 0.5 * z.shape[-1] * _LOG2PI


# ----------------------------------------------------------------------------------------------------------
# Change of variables for deterministic Euler samplers
# ----------------------------------------------------------------------------------------------------------
def _step_and_jacobian(velocity_fn: VelocityFn, y: torch.Tensor, s: float, s_next: float):
    """The Euler map f(y) = y + (s' - s) v(y, s) and its Jacobian J = I + (s' - s) dv/dy.

    y (B, 2) float64 -> f (B, 2) float64, J (B, 2, 2) with J[b, i, j] = d f_i / d y_j. Samples are independent,
    so d(sum_b f_b,i)/d y gives row i of every sample's Jacobian: two backward passes in all.
    """
    with torch.enable_grad():
        yy = y.detach().requires_grad_(True)
        sig = torch.full((y.shape[0],), float(s), dtype=torch.float32, device=y.device)
        v = velocity_fn(yy, sig).to(torch.float64)
        f = yy + (s_next - s) * v
        rows = [torch.autograd.grad(f[:, i].sum(), yy, retain_graph=i + 1 < f.shape[1])[0]
                for i in range(f.shape[1])]
    return f.detach(), torch.stack(rows, 1)


def _step(velocity_fn: VelocityFn, y: torch.Tensor, s: float, s_next: float) -> torch.Tensor:
    with torch.no_grad():
        sig = torch.full((y.shape[0],), float(s), dtype=torch.float32, device=y.device)
        return y + (s_next - s) * velocity_fn(y, sig).to(torch.float64)


def _logabsdet2(J: torch.Tensor) -> torch.Tensor:
    """log |det J| for (B, 2, 2); -inf where singular (the 1-step exact sampler collapses to a point)."""
    det = J[:, 0, 0] * J[:, 1, 1] - J[:, 0, 1] * J[:, 1, 0]
    return torch.log(det.abs())


def _solve2(J: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """J^{-1} r for (B, 2, 2), (B, 2) by the adjugate; returns (solution, ok) with ok False where det ~ 0."""
    a, b, c, d = J[:, 0, 0], J[:, 0, 1], J[:, 1, 0], J[:, 1, 1]
    det = a * d - b * c
    ok = det.abs() > 1e-12
    det = torch.where(ok, det, torch.ones_like(det))
    sol = torch.stack([d * r[:, 0] - b * r[:, 1], -c * r[:, 0] + a * r[:, 1]], -1) / det[:, None]
    return torch.where(ok[:, None], sol, torch.zeros_like(sol)), ok


def invert_euler_step(velocity_fn: VelocityFn, target: torch.Tensor, s: float, s_next: float,
                      iters: int = 50, tol: float = 1e-6, halvings: int = 10):
    """Solve y + (s' - s) v(y, s) = target for y by damped Newton in 2D.

    target (B, 2) float64 -> (y (B, 2), residual norm (B,), J (B, 2, 2) at y). Start: one fixed-point step
    y = target - (s' - s) v(target, s). Each Newton step y -= t J^{-1}(f(y) - target) halves t until the residual
    drops (per sample). For the exact mixture velocity every non-final Euler map is the gradient of a strictly
    convex function (y s'/s + (1 - s'/s) E[x0 | y] with E[x0 | y] itself a convex potential's gradient), so the
    root is unique and Newton converges; for a learned network uniqueness is not guaranteed (check `residual`).
    """
    y = target - (_step(velocity_fn, target, s, s_next) - target)
    scale = 1 + target.norm(dim=-1)
    for _ in range(iters):
        f, J = _step_and_jacobian(velocity_fn, y, s, s_next)
        r = f - target
        rn = r.norm(dim=-1)
        active = rn > tol * scale
        if not bool(active.any()):
            break
        du, ok = _solve2(J, r)
        t = torch.ones_like(rn)
        moved = torch.zeros_like(active)
        for _ in range(halvings):
            trial = y - t[:, None] * du
            rn_trial = (_step(velocity_fn, trial, s, s_next) - target).norm(dim=-1)
            better = (rn_trial < rn) & active & ok & ~moved
            y = torch.where(better[:, None], trial, y)
            moved = moved | better
            if bool((moved | ~active | ~ok).all()):
                break
            t = torch.where(moved, t, t / 2)
        if not bool((moved & active).any()):
            break  # no sample improves any more: stuck at a tolerance floor or at a singular Jacobian
    f, J = _step_and_jacobian(velocity_fn, y, s, s_next)
    return y, (f - target).norm(dim=-1), J


@dataclass
class EulerDensity:
    """Result of euler_logdensity. x (B, 2) the sampler's outputs; z (B, 2) the noise they come from;
    logq (B,) log-density of the sampler's law at x; residual (B,) the inversion residual (0 on the forward path);
    converged (B,) bool; path (B, K+1, 2) the states from z to x (when asked)."""
    x: torch.Tensor
    z: torch.Tensor
    logq: torch.Tensor
    residual: torch.Tensor
    converged: torch.Tensor
    path: torch.Tensor | None = None


def euler_logdensity(velocity_fn: VelocityFn, sigmas: torch.Tensor | Sequence[float], *, z: torch.Tensor | None = None,
                     x: torch.Tensor | None = None, tol: float = 1e-5, iters: int = 50,
                     return_path: bool = False) -> EulerDensity:
    """Exact log-density of the deterministic Euler sampler x_{k+1} = x_k + (sigma_{k+1} - sigma_k) v(x_k, sigma_k),
    x_0 = z ~ N(0, I), over the grid sigmas (K+1,), by change of variables:

        log q(x_K) = log N(z; 0, I) - sum_k log |det J_k(x_k)|,   J_k = I + (sigma_{k+1} - sigma_k) dv/dx (x_k).

    Give exactly one of
      z (B, 2): run forward from the noise (the sampler's own samples: exact, no inversion);
      x (B, 2): any points; every step is inverted by damped Newton (invert_euler_step), from the last step back to
                z, so that e.g. the N-step teacher sampler's density is evaluated at a student's samples.
    All maths in float64 (the velocity may compute in float32; then log q is accurate to about 1e-5).
    `converged` marks inversions whose residual is below tol * (1 + |x|); forward results are always converged.
    A singular step (the 1-step sampler of the exact velocity maps every z to E[x0]) gives log q = +inf.
    """
    sig = [float(s) for s in torch.as_tensor(sigmas, dtype=torch.float64).tolist()]
    if (z is None) == (x is None):
        raise ValueError("give exactly one of z (forward from noise) or x (invert at points)")
    K = len(sig) - 1
    if z is not None:
        y = z.detach().to(torch.float64)
        logdet = torch.zeros(y.shape[0], dtype=torch.float64, device=y.device)
        path = [y]
        for k in range(K):
            y, J = _step_and_jacobian(velocity_fn, y, sig[k], sig[k + 1])
            logdet = logdet + _logabsdet2(J)
            path.append(y)
        z64 = z.detach().to(torch.float64)
        zeros = torch.zeros_like(logdet)
        return EulerDensity(y, z64, std_normal_logpdf(z64) - logdet, zeros, torch.ones_like(logdet, dtype=torch.bool),
                            torch.stack(path, 1) if return_path else None)
    y = x.detach().to(torch.float64)
    xs = y
    logdet = torch.zeros(y.shape[0], dtype=torch.float64, device=y.device)
    res = torch.zeros_like(logdet)
    conv = torch.ones_like(logdet, dtype=torch.bool)
    path = [y]
    for k in reversed(range(K)):
        target = y
        # Newton runs to the precision floor (quadratic convergence makes that cheap): few-step maps contract
        # strongly, so an x-space residual of tol would still leave an error of tol / |det J| in z.
        y, r, J = invert_euler_step(velocity_fn, target, sig[k], sig[k + 1], iters=iters, tol=1e-12)
        logdet = logdet + _logabsdet2(J)
        res = torch.maximum(res, r)
        conv = conv & (r <= tol * (1 + target.norm(dim=-1)))
        path.append(y)
    return EulerDensity(xs, y, std_normal_logpdf(y) - logdet, res, conv,
                        torch.stack(path[::-1], 1) if return_path else None)


def _mean_se(d: torch.Tensor) -> tuple[float, float]:
    n = d.numel()
    if not bool(torch.isfinite(d).all()):
        return float("inf") if bool((d == float("inf")).any()) else float("nan"), float("nan")
    return float(d.mean()), float(d.std() / math.sqrt(max(n, 1)))


def kl_sampler(student_fn: VelocityFn, student_sigmas, target: Callable | VelocityFn, n: int = 4096, *,
               teacher_sigmas=None, z: torch.Tensor | None = None, generator: torch.Generator | None = None,
               tol: float = 1e-5, device="cpu") -> dict:
    """KL(q_S || q_T) = E_{x ~ q_S}[log q_S(x) - log q_T(x)] for a deterministic K-step Euler student.

    log q_S is exact along the student's own samples (forward change of variables), so the Monte Carlo mean is
    unbiased; its standard error is reported. The target is either
      an exact log-density target(x (B, 2)) -> (B,)  (teacher_sigmas=None): a mixture's or tilted mixture's log_prob;
      a teacher velocity function with teacher_sigmas (N+1,): the density of the teacher's N-step Euler sampler,
        evaluated at the student's samples by inverting each teacher step (euler_logdensity(x=...)).
    z: the noise (n, 2) (drawn from generator otherwise). Returns {"kl", "stderr", "n", "converged" (fraction of
    teacher inversions that converged; the mean is over those), "x" (n, 2) float32, "logq" (n,)}. A student that
    collapses to a point (1 exact step) gives kl = inf.
    """
    if z is None:
        z = torch.randn(n, 2, generator=generator, dtype=torch.float32,
                        device=generator.device if generator is not None else device).to(device)
    fwd = euler_logdensity(student_fn, student_sigmas, z=z)
    if not bool(torch.isfinite(fwd.logq).all()):
        return {"kl": float("inf"), "stderr": float("nan"), "n": int(z.shape[0]), "converged": 1.0,
                "x": fwd.x.float(), "logq": fwd.logq}
    if teacher_sigmas is None:
        logp = target(fwd.x).to(torch.float64)
        ok = torch.ones_like(logp, dtype=torch.bool)
    else:
        inv = euler_logdensity(target, teacher_sigmas, x=fwd.x, tol=tol)
        logp, ok = inv.logq, inv.converged
    d = (fwd.logq - logp)[ok]
    kl, se = _mean_se(d)
    return {"kl": kl, "stderr": se, "n": int(d.numel()), "converged": float(ok.float().mean()),
            "x": fwd.x.float(), "logq": fwd.logq}


def kl_exact_target(x: torch.Tensor, logq: torch.Tensor, target_logp: Callable) -> dict:
    """kl_sampler's estimate for an exact target from its parts: samples x (n, 2) of a deterministic sampler with
    their exact log q (n,) (euler_logdensity(z=...)'s x and logq, e.g. gathered from the processes that computed
    their shares) and an exact log-density target_logp. Returns {"kl", "stderr"} (kl = inf where log q is not)."""
    if not bool(torch.isfinite(logq).all()):
        return {"kl": float("inf"), "stderr": float("nan")}
    kl, se = _mean_se(logq - target_logp(x).to(torch.float64))
    return {"kl": kl, "stderr": se}


def kl_tilted(student_fn: VelocityFn, sigmas, teacher_logp: Callable, reward_fn: Callable, beta: float,
              log_z: float, n: int = 4096, *, z: torch.Tensor | None = None,
              generator: torch.Generator | None = None, device="cpu") -> dict:
    """KL(q || p_tilt) with p_tilt = p_T e^{beta r} / Z, and its decomposition on the same student samples:

        KL(q || p_tilt) = KL(q || p_T) - beta E_q[r] + log Z.

    teacher_logp: exact log p_T (e.g. mixture.log_prob); reward_fn: (B, 2) -> (B,) or (B, 1); log_z: log Z
    (e.g. from GaussianMixture.tilt). Returns {"kl_tilt", "kl_teacher", "reward_mean", "log_z", "stderr", "n"}.
    """
    if z is None:
        z = torch.randn(n, 2, generator=generator, dtype=torch.float32,
                        device=generator.device if generator is not None else device).to(device)
    fwd = euler_logdensity(student_fn, sigmas, z=z)
    logq = fwd.logq
    logp = teacher_logp(fwd.x).to(torch.float64)
    with torch.no_grad():
        r = reward_fn(fwd.x.float()).reshape(-1).to(torch.float64)
    d_teacher = logq - logp
    d_tilt = d_teacher - beta * r + log_z
    kl_tilt, se = _mean_se(d_tilt)
    kl_t, _ = _mean_se(d_teacher)
    return {"kl_tilt": kl_tilt, "kl_teacher": kl_t, "reward_mean": float(r.mean()), "log_z": float(log_z),
            "stderr": se, "n": int(z.shape[0])}


# ----------------------------------------------------------------------------------------------------------
# Grid quadrature and the binned KL for stochastic samplers
# ----------------------------------------------------------------------------------------------------------
def grid_points(bounds=(-5.0, 5.0, -5.0, 5.0), n: int = 200, dtype=torch.float64):
    """Cell centres of an n x n grid on [x0, x1] x [y0, y1]: (points (n*n, 2), cell area, (xs (n,), ys (n,))).
    Row-major: points[i * n + j] = (xs[j], ys[i]), so values.reshape(n, n) is indexed [y, x] (matplotlib's order)."""
    x0, x1, y0, y1 = bounds
    hx, hy = (x1 - x0) / n, (y1 - y0) / n
    xs = x0 + hx * (torch.arange(n, dtype=dtype) + 0.5)
    ys = y0 + hy * (torch.arange(n, dtype=dtype) + 0.5)
    Y, X = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([X.reshape(-1), Y.reshape(-1)], -1), hx * hy, (xs, ys)


def integrate_on_grid(logp: Callable, bounds=(-5.0, 5.0, -5.0, 5.0), n: int = 200) -> float:
    """Midpoint rule for the mass int exp(logp(x)) dx over the box (error O(h^2) for smooth densities)."""
    pts, area, _ = grid_points(bounds, n)
    return float(torch.exp(logp(pts).to(torch.float64)).sum() * area)


def kl_quadrature(logp: Callable, logq: Callable, bounds=(-6.0, 6.0, -6.0, 6.0), n: int = 400) -> float:
    """KL(p || q) = int p (log p - log q) dx by the midpoint rule on the box (p's mass outside is ignored)."""
    pts, area, _ = grid_points(bounds, n)
    lp, lq = logp(pts).to(torch.float64), logq(pts).to(torch.float64)
    p = torch.exp(lp)
    integrand = torch.where(p > 0, p * (lp - lq), torch.zeros_like(p))
    return float(integrand.sum() * area)


def kl_histogram(samples: torch.Tensor, target_logp: Callable, bounds=(-5.0, 5.0, -5.0, 5.0), bins: int = 60,
                 subgrid: int = 4) -> dict:
    """Binned estimate of KL(q || p) from samples of q (e.g. a stochastic sampler) against an exact density p.

    Cells: bins x bins on the box. q_i = n_i / n (histogram), p_i = the target's cell mass (midpoint rule on a
    subgrid x subgrid grid inside each cell). Estimate: sum_{n_i > 0} q_i log(q_i / p_i) - (M - 1) / (2 n), with
    M the number of non-empty cells (Miller-Madow: the plug-in entropy is biased low by (M - 1) / (2 n); the cross
    term sum q_i log p_i is unbiased).

    Error, stated: (1) the estimate targets the KL between the binned laws, which is <= the continuous KL
    (data processing); for smooth densities the gap is O(h^2) in the cell width h, and it hides structure finer
    than a cell. (2) Sampling: standard error sqrt((sum_i q_i L_i^2 - KL^2) / n), L_i = log(q_i / p_i) (delta
    method; returned as "stderr"), plus a residual bias O(M / n^2) after the correction, and a bias that grows when
    many cells hold only a few samples (keep n >> M). (3) Samples outside the box are dropped ("outside" reports
    their fraction) and so is the target's mass outside ("target_outside").
    Returns {"kl", "stderr", "outside", "target_outside", "cells_used", "n"}.
    """
    x = samples.detach().to(torch.float64).cpu()
    n = x.shape[0]
    x0, x1, y0, y1 = bounds
    ix = torch.floor((x[:, 0] - x0) / (x1 - x0) * bins).long()
    iy = torch.floor((x[:, 1] - y0) / (y1 - y0) * bins).long()
    inside = (ix >= 0) & (ix < bins) & (iy >= 0) & (iy < bins)
    counts = torch.bincount(iy[inside] * bins + ix[inside], minlength=bins * bins).to(torch.float64)
    pts, area, _ = grid_points(bounds, bins * subgrid)
    dens = torch.exp(target_logp(pts).to(torch.float64)) * area
    # Sum the fine cells into coarse ones: fine grid index [y, x] -> coarse [y // subgrid, x // subgrid].
    p = dens.reshape(bins, subgrid, bins, subgrid).sum((1, 3)).reshape(-1)
    q = counts / n
    nz = q > 0
    L = torch.log(q[nz]) - torch.log(p[nz].clamp_min(1e-300))
    M = int(nz.sum())
    kl_plugin = float((q[nz] * L).sum())
    var = float((q[nz] * L ** 2).sum()) - kl_plugin ** 2
    return {"kl": kl_plugin - (M - 1) / (2 * n), "stderr": math.sqrt(max(var, 0.0) / n),
            "outside": float(1 - inside.double().mean()), "target_outside": float(1 - p.sum()),
            "cells_used": M, "n": n}


# ----------------------------------------------------------------------------------------------------------
# When is an objective decided?
# ----------------------------------------------------------------------------------------------------------
def decision_curve(mixture, objective_fn: Callable, sigmas, n: int = 2000, m: int = 32,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """R^2(sigma) = Var(E[f(x0) | x_sigma]) / Var(f(x0)): the share of an objective's variance already fixed at noise
    level sigma on the forward path x_sigma = (1 - sigma) x0 + sigma eps, x0 ~ mixture. 1 means decided (the noisy
    state determines the outcome), 0 means undecided. OTCA's toy pair: "mode" reaches 1 at high sigma (decided early),
    "centre" only near sigma = 0 (decided late).

    objective_fn: (N, 2) float32 -> (N,) or (N, M). sigmas: levels to evaluate. Estimator: n outer draws of x_sigma,
    m exact posterior draws x0 | x_sigma each (GaussianMixture.posterior_sample); the between-group variance is
    corrected for the inner noise (minus the mean within-group variance / m), so it is unbiased for the numerator.
    Standard error about sqrt(2 / n) in R^2 units. Returns (len(sigmas), M) float64.
    """
    g = generator
    x0 = mixture.sample(n, generator=g).double()
    with torch.no_grad():
        f0 = objective_fn(x0.float()).reshape(n, -1).to(torch.float64)
    var_f = f0.var(0)
    out = []
    for s in torch.as_tensor(sigmas, dtype=torch.float64).tolist():
        eps = torch.randn(n, 2, generator=g, dtype=torch.float64)
        xs = (1 - s) * x0 + s * eps
        post = mixture.posterior_sample(xs, s, m, generator=g)  # (n, m, 2)
        with torch.no_grad():
            f = objective_fn(post.reshape(-1, 2).float()).reshape(n, m, -1).to(torch.float64)
        between = f.mean(1).var(0) - f.var(1).mean(0) / m
        out.append(between / var_f)
    return torch.stack(out).clamp(min=0.0)


# ----------------------------------------------------------------------------------------------------------
# Sample metrics
# ----------------------------------------------------------------------------------------------------------
def mmd(x: torch.Tensor, y: torch.Tensor, bandwidths: Sequence[float] = (0.25, 0.5, 1.0, 2.0)) -> float:
    """Unbiased MMD^2 between samples x (n, D) and y (m, D) with the kernel k = mean_h exp(-|a - b|^2 / (2 h^2)):

        MMD^2_u = sum_{i != j} k(x_i, x_j) / (n(n-1)) + sum_{i != j} k(y_i, y_j) / (m(m-1)) - 2 mean_{i,j} k(x_i, y_j).

    Unbiased, so it can be slightly negative when the laws agree. Memory O((n + m)^2): keep n, m <= ~5000.
    """
    x, y = x.detach().to(torch.float64), y.detach().to(torch.float64)
    n, m = x.shape[0], y.shape[0]
    if n < 2 or m < 2:
        raise ValueError("mmd needs at least 2 samples on each side")

    def k(a, b):
        d2 = torch.cdist(a, b) ** 2
        return sum(torch.exp(-d2 / (2 * h * h)) for h in bandwidths) / len(bandwidths)
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    return float((kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1)) + (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
                 - 2 * kxy.mean())


def mode_mass(x: torch.Tensor, centres: torch.Tensor, radius: float | None = None) -> torch.Tensor:
    """Fraction of samples per mode by nearest centre: (P + 1,) float64; the last entry is the fraction farther than
    `radius` from every centre (off-mode; those are not counted in any mode). radius None: every point counts."""
    x = x.detach().to(torch.float64)
    d = torch.cdist(x, centres.to(x))  # (B, P)
    dmin, idx = d.min(-1)
    off = dmin > radius if radius is not None else torch.zeros_like(dmin, dtype=torch.bool)
    counts = torch.bincount(idx[~off], minlength=centres.shape[0]).to(torch.float64)
    return torch.cat([counts, off.sum().reshape(1).to(torch.float64)]) / x.shape[0]


def reward_stats(r: torch.Tensor, quantiles: Sequence[float] = (0.05, 0.25, 0.5, 0.75, 0.95)) -> dict:
    """{"mean", "std", "q05", "q25", ...} of a reward vector (B,) (or the first column of (B, M))."""
    r = r.detach().to(torch.float64).reshape(r.shape[0], -1)[:, 0]
    out = {"mean": float(r.mean()), "std": float(r.std()) if r.numel() > 1 else 0.0}
    qs = torch.quantile(r, torch.tensor(list(quantiles), dtype=torch.float64))
    for q, v in zip(quantiles, qs.tolist()):
        out[f"q{round(100 * q):02d}"] = v
    return out
