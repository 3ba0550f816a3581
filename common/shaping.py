"""RATS maths: the reward-aware gate, sigma-aligned horizon matching, the shaping distance and the total loss.

Reward-Aware Trajectory Shaping (Li et al., arXiv 2604.14910; shared/spec/rats.md). A K-step student and an
N-step EMA teacher start from the same noise eps and prompt c. At every student step k the student's x0-prediction
is pulled toward the teacher's at the matched noise level j(k) = argmin_j |sigma_T[j] - sigma_S[k]|, and that
shaping term is multiplied per sample by the stop-gradient gate w = sigmoid((R_T - R_S) / tau):

    L_i = lambda_r * c_i * (-R_S,i) + alpha * w_i * L_shape,i,      c_i = 1 (default) or 1 - w_i (complementary)
    L_shape,i = (1/|H|) sum_{k in H} [ lambda_cos (1 - cos(a_k, sg b_j(k))) + lambda_mse ||a_k - sg b_j(k)||^2 / n ]

Everything here is a small pure function of tensors (plus one tiny stateful normaliser); rats.py calls them.
Shapes: B = batch, K = student steps, N = teacher steps, n = number of latent elements of one sample.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

GATE_KINDS = ("sigmoid", "none", "off", "hard")
LOSS_MODES = ("shape_only", "complementary")


# ----------------------------------------------------------------------------------------------------------
# The reward-aware gate
# ----------------------------------------------------------------------------------------------------------
def reward_gate(r_teacher: torch.Tensor, r_student: torch.Tensor, tau: float = 0.05, kind: str = "sigmoid",
                scale: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Per-sample shaping weight w (B,), float32, always detached (no gradient reaches the student through it).

    r_teacher, r_student: (B,) rewards (higher is better). Gap d = (R_T - R_S) / scale (scale = 1, or a running
    std of the gap when normalising). Kinds (shared/spec/decisions.md, RATS):
      sigmoid  w = sigmoid(d / tau)  (default; 1/2 at a tie, > 1/2 when the teacher is ahead; = 1 - g_figure)
      none     w = 1                 (no gate: reward + full trajectory distillation)
      off      w = 0                 (reward-only fine-tuning)
      hard     w = 1[R_T > R_S]      (the tau -> 0 limit, with 0 rather than 1/2 at a tie)
    The detach matters: without it dL/dR_S would gain -alpha L_shape w (1 - w) / tau, a second incentive to raise
    R_S only to switch the teacher off (rats.md section 5, property 9).
    """
    if kind not in GATE_KINDS:
        raise ValueError(f"gate kind must be one of {GATE_KINDS}, got {kind!r}")
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    d = (r_teacher.detach().float() - r_student.detach().float()) / torch.as_tensor(scale, dtype=torch.float32,
                                                                                    device=r_teacher.device)
    if kind == "sigmoid":
        w = torch.sigmoid(d / tau)
    elif kind == "none":
        w = torch.ones_like(d)
    elif kind == "off":
        w = torch.zeros_like(d)
    else:
        w = (d > 0).float()
    return w.detach()


@dataclass
class GapNormalizer:
    """Running std of the reward gap d = R_T - R_S, for --gap-norm running_std (then tau ~ 1 is natural).

    Exponential moving averages of the first and second moments of the per-step batch of gaps:
        m1 <- beta m1 + (1 - beta) mean(d),   m2 <- beta m2 + (1 - beta) mean(d^2),   std = sqrt(m2 - m1^2)
    with the usual bias correction (divide by 1 - beta^t) so that the first step already gives the batch std.
    The gap is divided by the std but never centred: centring would move the gate's tie point away from 1/2.
    """

    beta: float = 0.99
    eps: float = 1e-6
    m1: float = 0.0
    m2: float = 0.0
    t: int = 0

    def update(self, gap: torch.Tensor) -> float:
        """Fold in a batch of gaps (B,), return the new std (a float >= eps)."""
        g = gap.detach().float()
        self.t += 1
        self.m1 = self.beta * self.m1 + (1 - self.beta) * float(g.mean())
        self.m2 = self.beta * self.m2 + (1 - self.beta) * float((g ** 2).mean())
        return self.std

    @property
    def std(self) -> float:
        if self.t == 0:
            return 1.0
        c = 1 - self.beta ** self.t
        var = self.m2 / c - (self.m1 / c) ** 2
        return max(math.sqrt(max(var, 0.0)), self.eps)

    def state_dict(self) -> dict:
        return {"beta": self.beta, "eps": self.eps, "m1": self.m1, "m2": self.m2, "t": self.t}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)


# ----------------------------------------------------------------------------------------------------------
# Horizon matching
# ----------------------------------------------------------------------------------------------------------
def match_horizons(sigmas_teacher: torch.Tensor, sigmas_student: torch.Tensor) -> torch.Tensor:
    """j(k) = argmin_j |sigma_T[j] - sigma_S[k]| for every entry of sigmas_student: (len(sigmas_student),) long.

    sigmas_teacher: (N+1,), sigmas_student: (K+1,) (or any subset of student levels), both the *shifted* grids,
    decreasing from 1 to 0. Ties go to the smaller index (argmin's first hit). Computed in float64 so the
    float32 grids' rounding cannot flip a near-tie. With one shared shifted linspace and N a multiple of K the
    match is exact, j(k) = k N / K; shift 3, K = 3, N = 50 gives [0, 17, 33, 50].
    """
    t = sigmas_teacher.detach().double().flatten()
    s = sigmas_student.detach().double().flatten().to(t.device)
    return (t[None, :] - s[:, None]).abs().argmin(dim=1)


# ----------------------------------------------------------------------------------------------------------
# Shaping distance and loss
# ----------------------------------------------------------------------------------------------------------
def shaping_distance(a: torch.Tensor, b: torch.Tensor, lambda_cos: float = 1.0, lambda_mse: float = 1.0,
                     eps: float = 1e-8, detach_target: bool = True) -> torch.Tensor:
    """d = lambda_cos (1 - cos(a, b)) + lambda_mse ||a - b||^2 / n per sample: (B,) float32.

    a: student tensor (B, ...); b: teacher tensor of the same shape (detached: the teacher is a target only).
    Each sample is flattened to a vector of n elements; cos = <a, b> / max(|a| |b|, eps), in float32 (bf16
    dot products of 10^5-element latents lose the 1 - cos signal entirely).
    """
    b = b.detach() if detach_target else b
    return _row_distance(a.float().flatten(1), b.float().flatten(1), lambda_cos, lambda_mse, eps)


def _row_distance(a: torch.Tensor, b: torch.Tensor, lambda_cos: float, lambda_mse: float, eps: float = 1e-8):
    """shaping_distance on the last dimension: a, b (..., n) float32 -> (...)."""
    dot = (a * b).sum(-1)
    norms = a.norm(dim=-1) * b.norm(dim=-1)
    cos = dot / norms.clamp_min(eps)
    mse = ((a - b) ** 2).mean(-1)
    return lambda_cos * (1 - cos) + lambda_mse * mse


def shaping_loss(student: torch.Tensor, teacher: torch.Tensor, index: torch.Tensor,
                 horizons: torch.Tensor | None = None, weights: torch.Tensor | None = None,
                 lambda_cos: float = 1.0, lambda_mse: float = 1.0):
    """Multi-horizon shaping loss. Returns (per_sample (B,), per_horizon (B, |H|)).

    student: (B, K, ...) the student's sequence (x0-predictions x0^S_k, or states);
    teacher: (B, N', ...) the teacher's sequence on the same footing (detached inside);
    index:   (K,) long, the matched teacher position of every student position (match_horizons);
    horizons: (|H|,) long subset of student positions (default all K);
    weights: (|H|,) omega_k (default 1). per_sample = (1/|H|) sum_k omega_k d_k, d_k = shaping_distance of
    student[:, k] and teacher[:, index[k]]. All horizons at once by index_select: no host read of the indices
    (on a GPU a .tolist() per step would wait for the device).
    """
    K = student.shape[1]
    h = torch.arange(K, device=student.device) if horizons is None else horizons.to(student.device).long()
    j = index.to(teacher.device).long().index_select(0, h.to(index.device))
    a = student.index_select(1, h).float().flatten(2)                         # (B, |H|, n)
    b = teacher.detach().index_select(1, j.to(teacher.device)).float().flatten(2)   # (B, |H|, n) matched
    d = _row_distance(a, b.to(a.device), lambda_cos, lambda_mse)              # (B, |H|)
    w = torch.ones(h.shape[0], device=d.device) if weights is None else weights.to(d.device).float()
    return (d * w).mean(1), d


def rats_loss(r_student: torch.Tensor, l_shape: torch.Tensor, w: torch.Tensor, lambda_r: float = 1.0,
              alpha: float = 1.0, mode: str = "shape_only"):
    """Total RATS loss, averaged over the batch. Returns (loss scalar, reward_term (B,), shape_term (B,)).

    r_student: (B,) differentiable student reward R_S; l_shape: (B,) per-sample shaping loss; w: (B,) gate.
      shape_only     L_i = lambda_r (-R_S,i) + alpha sg(w_i) L_shape,i                (rats.md 1.7, default)
      complementary  L_i = lambda_r (1 - sg(w_i)) (-R_S,i) + alpha sg(w_i) L_shape,i  (ambiguity A3)
    The gate is detached again here, so a caller that forgot cannot leak a gradient through it.
    """
    if mode not in LOSS_MODES:
        raise ValueError(f"loss mode must be one of {LOSS_MODES}, got {mode!r}")
    w = w.detach().float()
    c = torch.ones_like(w) if mode == "shape_only" else 1 - w
    reward_term = lambda_r * c * (-r_student.float())
    shape_term = alpha * w * l_shape.float()
    return (reward_term + shape_term).mean(), reward_term, shape_term
