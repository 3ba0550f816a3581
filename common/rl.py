"""GRPO maths for flow models: group-relative advantages, the PPO clipped surrogate, the same-covariance KL.

Groups are contiguous: a batch of B = n_groups * G samples holds G samples of prompt 0, then G of prompt 1, ...
(Cond.repeat builds exactly that). In distributed runs, rewards are gathered across ranks before calling these.
"""
from __future__ import annotations

import torch


def _group_ids(B: int, groups: int | torch.Tensor, device) -> torch.Tensor:
    if isinstance(groups, int):
        if B % groups:
            raise ValueError(f"batch {B} is not a multiple of the group size {groups}")
        return torch.arange(B, device=device) // groups
    return torch.as_tensor(groups, device=device).long()


def group_advantages(r: torch.Tensor, groups: int | torch.Tensor, std: str = "group", ddof: int = 0,
                     eps: float = 1e-4, clamp: float | None = None, baseline: str = "mean") -> torch.Tensor:
    """Group-relative advantages A = (r - baseline) / (std + eps).

    r: (B,) one reward, or (B, M) M objectives z-scored independently (per-objective z-scores).
    groups: the group size G (contiguous groups) or a (B,) tensor of group ids.
    std: 'group' (each group's own std, DanceGRPO / Flow-GRPO per-prompt) or 'global' (the std of all B rewards
         of that objective, Flow-GRPO's global_std) or 'none' (no division: raw centred rewards).
    ddof: 0 population std (numpy, Flow-GRPO), 1 unbiased (torch default, DanceGRPO).
    baseline: 'mean' (group mean, including the sample) or 'loo' (leave-one-out mean of the other G-1).
    A group whose rewards are all equal gets A = 0 exactly (never NaN), whatever eps.
    Returns the same shape as r, float32.
    """
    squeeze = r.ndim == 1
    r = (r[:, None] if squeeze else r).float()
    B, M = r.shape
    gid = _group_ids(B, groups, r.device)
    n_groups = int(gid.max()) + 1
    count = torch.zeros(n_groups, 1, device=r.device).index_add_(0, gid, torch.ones(B, 1, device=r.device))
    total = torch.zeros(n_groups, M, device=r.device).index_add_(0, gid, r)
    mean = total / count
    if baseline == "mean":
        base = mean[gid]
    elif baseline == "loo":
        base = (total[gid] - r) / (count[gid] - 1).clamp_min(1)
    else:
        raise ValueError(f"baseline must be 'mean' or 'loo', got {baseline!r}")
    centred = r - base
    dev = r - mean[gid]
    if std == "group":
        var = torch.zeros(n_groups, M, device=r.device).index_add_(0, gid, dev ** 2) / (count - ddof).clamp_min(1)
        sd = var.sqrt()[gid]
    elif std == "global":
        sd = r.std(dim=0, correction=ddof, keepdim=True).expand(B, M)
    elif std == "none":
        sd = None
    else:
        raise ValueError(f"std must be 'group', 'global' or 'none', got {std!r}")
    group_flat = zero_variance_mask(r, gid)
    adv = centred / (sd + eps) if std != "none" else centred
    adv = torch.where(group_flat, torch.zeros_like(adv), adv)
    if clamp is not None:
        adv = adv.clamp(-clamp, clamp)
    return adv[:, 0] if squeeze else adv


def zero_variance_mask(r: torch.Tensor, groups: int | torch.Tensor) -> torch.Tensor:
    """(B,) or (B, M) bool: True where the sample's group has all-equal rewards for that objective."""
    squeeze = r.ndim == 1
    r2 = (r[:, None] if squeeze else r).float()
    gid = _group_ids(r2.shape[0], groups, r2.device)
    n, M = int(gid.max()) + 1, r2.shape[1]
    count = torch.zeros(n, 1, device=r2.device).index_add_(0, gid, torch.ones(r2.shape[0], 1, device=r2.device))
    mean = torch.zeros(n, M, device=r2.device).index_add_(0, gid, r2) / count
    spread = torch.zeros(n, M, device=r2.device).index_add_(0, gid, (r2 - mean[gid]).abs())
    flat = (spread == 0)[gid]
    return flat[:, 0] if squeeze else flat


def clipped_surrogate(logp: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor, clip: float):
    """PPO clipped surrogate, per element: max(-A rho, -A clip(rho, 1 - c, 1 + c)), rho = exp(logp - logp_old).

    logp, logp_old: (B,) or (B, K); adv broadcastable to them: (B,) one advantage per trajectory, or (B, K)
    per-step advantages (step credit plugs in here). Returns (loss (same shape), ratio). Reduce with .mean().
    Beyond the clip on the advantage's side (rho > 1 + c with A > 0, rho < 1 - c with A < 0) the gradient is 0.
    """
    if adv.ndim < logp.ndim:
        adv = adv.reshape(*adv.shape, *([1] * (logp.ndim - adv.ndim)))
    ratio = torch.exp(logp - logp_old.detach())
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    return torch.maximum(unclipped, clipped), ratio


def clip_fraction(ratio: torch.Tensor, clip: float) -> torch.Tensor:
    """Fraction of elements whose ratio lies outside [1 - c, 1 + c] (a diagnostic)."""
    return ((ratio - 1.0).abs() > clip).float().mean()


def gaussian_kl_same_std(mu_p: torch.Tensor, mu_q: torch.Tensor, std, dt=None, reduce: str = "mean"):
    """KL(N(mu_p, std^2 I) || N(mu_q, std^2 I)) per sample: (B,).

    Per element ||mu_p - mu_q||^2 / (2 std^2), then mean (or sum) over non-batch dimensions.
    With dt = Delta (the step size), returns Delta times that: Flow-GRPO's code divides by 2 g^2 instead of
    2 g^2 Delta (shared/spec/anchors.md c.5), which up-weights large steps; pass dt to reproduce it.
    """
    d = (mu_p.float() - mu_q.float()) ** 2 / (2 * torch.as_tensor(std, dtype=torch.float32) ** 2)
    dims = tuple(range(1, d.ndim))
    kl = d.mean(dims) if reduce == "mean" else d.sum(dims)
    if dt is not None:
        kl = kl * torch.as_tensor(dt, dtype=torch.float32, device=kl.device).reshape(-1)
    return kl
