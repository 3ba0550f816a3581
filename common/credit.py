"""OTCA maths: where a trajectory's reward is credited (TCD) and how several objectives are fused (MOCA).

Spec: shared/spec/otca.md (sections 2-4, properties P1-P16) and shared/spec/decisions.md (OTCA defaults).
Notation: B samples in contiguous groups of G (Cond.repeat), K sampler steps, step t maps z_t -> z_{t+1},
z_0 the initial noise, z_K the final latent; M reward objectives.

The per-step advantage that enters the clipped surrogate is separable (otca.md 2.4, 3.5):

    A[i, t] = omega[i, t] * clamp( sum_m c[i, m] * a[i, m], -A_max, A_max )

  * omega (B, K): Trajectory-level Credit Decomposition, a geometric proxy with no reward calls:
        s_t = cos(z_t, z_K),  delta_t = s_{t+1} - s_t,  w_t = max(delta_t, 0) + eps_w,
    normalised per sample to mean one over the trained steps (exact GRPO reduction under uniform credit) or
    to sum one over all K steps (the paper's literal "normalised along time").
  * a (B, M): per-objective group z-scores (common.rl.group_advantages on the (B, M) reward matrix), with an
    objective whose rewards are constant inside a group masked out of that group's fusion.
  * c (B, M): per-sample convex weights, the closed-form minimiser of (c . a)^2 over the simplex (the scalar
    min-norm / MGDA problem, every objective shares the sample's policy direction), mixed with a prior:
    c = (1 - rho) c* + rho prior.

Everything here is computed without gradients (once per rollout, from the behaviour policy).
"""
from __future__ import annotations

import torch

from common.rl import clipped_surrogate, group_advantages, zero_variance_mask

CREDIT_NORMS = ("mean_one", "sum_one")


# ----------------------------------------------------------------------------------------------------------
# TCD: step credit from the cosine progress of the stored trajectory
# ----------------------------------------------------------------------------------------------------------
def cosine_progress(seq: torch.Tensor, final: torch.Tensor | None = None, eps: float = 1e-12) -> torch.Tensor:
    """s[i, j] = cos(vec(seq[i, j]), vec(final[i])) for a stacked sequence of latents.

    seq: (B, J, ...) e.g. the stored states z_0..z_K (J = K + 1); final: (B, ...), default seq[:, -1].
    Returns (B, J) float32 in [-1, 1]. The cosine is over the whole flattened latent (otca.md A19), computed
    in float64 so that s at the final latent is 1 to rounding even for bf16 storage. A zero vector has cosine 0.
    """
    B, J = seq.shape[:2]
    u = seq.reshape(B, J, -1).double()
    f = (seq[:, -1] if final is None else final).reshape(B, 1, -1).double()
    num = (u * f).sum(-1)
    den = u.norm(dim=-1) * f.norm(dim=-1)
    return (num / den.clamp_min(eps)).float()


def progress_sequence(states: torch.Tensor, x0: torch.Tensor | None = None, source: str = "states") -> torch.Tensor:
    """The (B, K + 1, ...) sequence whose cosine progress defines each step's credit.

    states: (B, K + 1, ...) stored z_0..z_K; x0: (B, K, ...) the x0-predictions made at z_0..z_{K-1}.
    source 'states' (default, otca.md A1): z_0..z_K, so step t's progress is cos(z_{t+1}, z_K) - cos(z_t, z_K).
    source 'x0' (the CoCA-style switch): x0_0..x0_{K-1} followed by z_K, so step t's progress is how much the
    clean estimate made after the step (x0_{t+1}, or z_K itself after the last step) moved toward z_K.
    """
    if source == "states":
        return states
    if source == "x0":
        if x0 is None:
            raise ValueError("source='x0' needs the x0-predictions")
        return torch.cat([x0.to(states.dtype), states[:, -1:]], dim=1)
    raise ValueError(f"source must be 'states' or 'x0', got {source!r}")


def step_credit(s: torch.Tensor, trained: torch.Tensor, eps_w: float = 1e-3, norm: str = "mean_one") -> torch.Tensor:
    """TCD weights omega (B, K) from the cosine progress s (B, K + 1) and the trained-step mask (B, K).

    delta_t = s_{t+1} - s_t,  w_t = max(delta_t, 0) + eps_w   (truncation keeps credit non-negative: it moves
    magnitude between steps, never flips the sign of a trajectory's advantage, otca.md 2.4)
      'mean_one': omega_t = |S_i| w_t / sum_{t' in S_i} w_t' on the trained steps S_i, 0 elsewhere, so that
                  (1/|S_i|) sum_{t in S_i} omega_t = 1 and equal w's give omega = 1: exactly GRPO.
      'sum_one' : omega_t = w_t / sum_{all t} w_t over all K steps (the paper's literal normalisation; with
                  a loss averaged over steps it lowers the effective learning rate by about |S|).
    A sample with no trained step gets all-zero credit.
    """
    if norm not in CREDIT_NORMS:
        raise ValueError(f"norm must be one of {CREDIT_NORMS}, got {norm!r}")
    delta = s[:, 1:] - s[:, :-1]  # (B, K)
    w = delta.clamp_min(0.0) + eps_w
    mask = trained.to(w.dtype)
    if norm == "sum_one":
        return w / w.sum(1, keepdim=True)
    n = mask.sum(1, keepdim=True)
    return torch.where(n > 0, n * w * mask / (w * mask).sum(1, keepdim=True).clamp_min(1e-30), torch.zeros_like(w))


def batch_mean_credit(omega: torch.Tensor, trained: torch.Tensor, norm: str = "mean_one") -> torch.Tensor:
    """An ablation of TCD: the batch-mean credit profile, the same for every sample, normalised as omega was (norm):
    'mean_one', per sample to mean one over its trained steps; 'sum_one', the plain mean of the rows, which sum to
    one over all K steps (step_credit), so that it sums to one too. (B, K) -> (B, K). Per-sample TCD weights depend
    on the sampled actions (a step that happened to move z toward z_K gets more credit), so they re-weight the
    policy gradient in an action-dependent way; a profile shared by the batch only re-weights the steps, like a
    learning rate per step."""
    if norm not in CREDIT_NORMS:
        raise ValueError(f"norm must be one of {CREDIT_NORMS}, got {norm!r}")
    if norm == "sum_one":   # renormalising to mean one here would scale the sum-one credit up by |S_i|
        return omega.mean(0, keepdim=True).expand_as(omega).contiguous()
    prof = (omega * trained).sum(0, keepdim=True) / trained.sum(0, keepdim=True).clamp_min(1)  # (1, K)
    w = prof.expand_as(omega) * trained
    n = trained.sum(1, keepdim=True)
    return torch.where(n > 0, n * w / w.sum(1, keepdim=True).clamp_min(1e-30), torch.zeros_like(w))


def uniform_credit(trained: torch.Tensor, norm: str = "mean_one") -> torch.Tensor:
    """Plain GRPO's credit: 1 on every trained step ('mean_one'), or 1/K everywhere ('sum_one'). (B, K)."""
    if norm == "sum_one":
        return torch.full(trained.shape, 1.0 / trained.shape[1], device=trained.device)
    return trained.float()


def tcd_credit(states: torch.Tensor, trained: torch.Tensor, x0: torch.Tensor | None = None,
               source: str = "states", eps_w: float = 1e-3, norm: str = "mean_one") -> torch.Tensor:
    """TCD end to end: (B, K + 1, ...) stored states (+ optional (B, K, ...) x0-predictions) -> omega (B, K)."""
    seq = progress_sequence(states, x0, source)
    return step_credit(cosine_progress(seq), trained, eps_w, norm)


# ----------------------------------------------------------------------------------------------------------
# MOCA: per-objective advantages, min-norm convex weights, mixing, fusion
# ----------------------------------------------------------------------------------------------------------
def objective_advantages(r: torch.Tensor, group_size: int, ddof: int = 1, eps: float = 1e-8,
                         tau_std: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-objective group z-scores and the mask of objectives that carry signal in each group.

    r: (B, M) raw rewards, groups of group_size contiguous samples. a[:, m] = (r_m - mean_G r_m) / (std_G r_m + eps)
    (DanceGRPO's convention by default: unbiased std, eps = 1e-8). An objective whose group std is below tau_std
    (or exactly constant) is masked for that group: valid[i, m] = False and a[i, m] = 0 (otca.md 3.2, A10).
    Returns (a (B, M) float32, valid (B, M) bool).
    """
    r = r.float()
    a = group_advantages(r, group_size, std="group", ddof=ddof, eps=eps)
    B, M = r.shape
    sd = r.reshape(B // group_size, group_size, M).std(dim=1, correction=ddof)  # (n_groups, M)
    flat = (sd < tau_std).repeat_interleave(group_size, 0) | zero_variance_mask(r, group_size)
    a = torch.where(flat, torch.zeros_like(a), a)
    return a, ~flat


def min_norm_weights(a: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form c* = argmin_{c in simplex over the valid objectives} (c . a)^2, per sample.

    a: (B, M) advantages; valid: (B, M) bool (default all). Returns (c (B, M), fused (B,)) with
      all valid a > 0: weight on the smallest (ties split evenly)  -> fused = min a  (> 0)
      all valid a < 0: weight on the largest (ties split evenly)   -> fused = max a  (< 0)
      otherwise (min <= 0 <= max): c_lo = 1 - tau, c_hi = tau, tau = -a_lo / (a_hi - a_lo) (split evenly over
                tied minima / maxima)                               -> fused = 0 exactly
      all valid a equal to 0, or no valid objective: uniform over the valid ones (over all when none).
    So fused = sign(a) min_m |a_m| when the valid entries agree in sign, else 0; it is odd, scale-equivariant and
    permutation-invariant, and ties are split so that c itself permutes with the objectives. Masked entries get 0.
    """
    a = a.float()
    B, M = a.shape
    valid = torch.ones_like(a, dtype=torch.bool) if valid is None else valid.bool()
    none_valid = ~valid.any(1, keepdim=True)
    valid = valid | none_valid  # a sample with nothing valid: uniform weights, fused 0 (its a is 0 by masking)
    inf = torch.tensor(float("inf"), device=a.device)
    lo = torch.where(valid, a, inf).amin(1, keepdim=True)
    hi = torch.where(valid, a, -inf).amax(1, keepdim=True)
    is_lo = valid & (a == lo)
    is_hi = valid & (a == hi)
    n_lo = is_lo.sum(1, keepdim=True).float()
    n_hi = is_hi.sum(1, keepdim=True).float()
    all_pos, all_neg = lo > 0, hi < 0
    span = hi - lo
    tau = torch.where(span > 0, -lo / span.clamp_min(1e-30), torch.zeros_like(span))
    c_mixed = (1 - tau) * is_lo.float() / n_lo + tau * is_hi.float() / n_hi
    c_flat = valid.float() / valid.sum(1, keepdim=True)  # all valid entries equal (here: all zero)
    c = torch.where(all_pos, is_lo.float() / n_lo,
                    torch.where(all_neg, is_hi.float() / n_hi, torch.where(span > 0, c_mixed, c_flat)))
    fused = torch.where(all_pos, lo, torch.where(all_neg, hi, torch.zeros_like(lo)))[:, 0]
    return c, fused


def mix_weights(c_star: torch.Tensor, valid: torch.Tensor, rho: float = 0.2,
                prior: torch.Tensor | None = None) -> torch.Tensor:
    """Exploration mixing c = (1 - rho) c* + rho pi (otca.md 3.4), renormalised to sum exactly one.

    c_star, valid: (B, M); prior: (M,) non-negative (uniform when None), restricted to each sample's valid
    objectives and renormalised, so that a masked objective is exactly as if it had been removed (P9).
    rho = 0: pure min-norm; rho = 1: the static weighted sum pi . a (fused before clipping).
    """
    B, M = c_star.shape
    pi = torch.ones(M, device=c_star.device) if prior is None else torch.as_tensor(prior, dtype=torch.float32,
                                                                                   device=c_star.device)
    v = valid.bool() | ~valid.bool().any(1, keepdim=True)
    p = pi.expand(B, M) * v.float()
    p = torch.where(p.sum(1, keepdim=True) > 0, p, v.float())  # a prior that is 0 on every valid one: uniform
    p = p / p.sum(1, keepdim=True)
    c = (1 - rho) * c_star + rho * p
    return c / c.sum(1, keepdim=True)  # for M = 1 this is exactly 1.0, so the fused advantage is exactly a


def moca_fuse(a: torch.Tensor, valid: torch.Tensor | None = None, rho: float = 0.2,
              prior: torch.Tensor | None = None, clamp: float = 5.0) -> tuple[torch.Tensor, torch.Tensor]:
    """MOCA's sample-level advantage: A_bar = clamp(sum_m c_m a_m, -clamp, clamp) with c from mix_weights.

    a: (B, M) per-objective advantages, valid (B, M). Returns (A_bar (B,), c (B, M)). The clamp bounds the sample
    signal before the step credit multiplies it (otca.md A13: do not clamp again after omega).
    """
    valid = torch.ones_like(a, dtype=torch.bool) if valid is None else valid
    c_star, _ = min_norm_weights(a, valid)
    c = mix_weights(c_star, valid, rho, prior)
    fused = (c * a.float()).sum(1)
    return (fused.clamp(-clamp, clamp) if clamp is not None else fused), c


def static_fuse(a: torch.Tensor, valid: torch.Tensor | None = None, prior: torch.Tensor | None = None,
                clamp: float = 5.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The static weighted sum of per-objective advantages (rho = 1 in moca_fuse): (A_bar (B,), c (B, M))."""
    return moca_fuse(a, valid, rho=1.0, prior=prior, clamp=clamp)


def step_advantages(fused: torch.Tensor, credit: torch.Tensor) -> torch.Tensor:
    """A[i, t] = omega[i, t] * A_bar[i]: (B,) x (B, K) -> (B, K). For (B, M) per-objective advantages (the
    clip-then-sum baseline) -> (B, K, M)."""
    return credit[..., None] * fused[:, None, :] if fused.ndim == 2 else credit * fused[:, None]


# ----------------------------------------------------------------------------------------------------------
# Losses: fuse-then-clip (OTCA) and clip-then-sum (DanceGRPO multi-reward)
# ----------------------------------------------------------------------------------------------------------
def fused_clipped_loss(logp: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor, clip: float):
    """One clipped surrogate on the fused advantage: per sample max(-A rho, -A clip(rho)). (B,) -> ((B,), ratio)."""
    return clipped_surrogate(logp, logp_old, adv, clip)


def per_objective_clipped_loss(logp: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor,
                               weights: torch.Tensor, clip: float):
    """DanceGRPO's multi-reward loss: sum_m lambda_m max(-A_m rho, -A_m clip(rho)), one surrogate per objective.

    logp, logp_old: (B,); adv: (B, M) per-objective advantages (already times the step credit); weights: (M,).
    Returns (loss (B,), ratio (B,)). Equal to fused_clipped_loss on sum_m lambda_m A_m when every A_m has the
    same sign, or when the ratio lies inside [1 - clip, 1 + clip]; different otherwise (otca.md P12).
    """
    w = torch.as_tensor(weights, dtype=torch.float32, device=adv.device)
    loss, ratio = clipped_surrogate(logp[:, None], logp_old[:, None], adv, clip)  # (B, M)
    return (loss * w).sum(1), ratio[:, 0]
