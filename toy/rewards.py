"""Differentiable toy rewards on 2D points (B, 2) -> (B,) or (B, M), wrapped as common.rewards.FnReward.

Registered in common/rewards.py as toy_linear, toy_quadratic, toy_mode and toy_otca. Every factory takes
**options and ignores keys it does not know (build_reward passes the same options to all factories). Defaults
match the default dataset ring8_rare (toy.datasets): its rare, broad mode 0 sits at (3, 0), and every default
reward points there, away from the bulk of the data.

Linear and quadratic rewards carry `tilt_spec`, the closed form that GaussianMixture.tilt uses for p_T e^{beta r} / Z.
"""
from __future__ import annotations

from typing import Any

import torch

from common.rewards import FnReward
from toy.datasets import DEFAULT_DATASET, get_dataset


def _floats(v) -> torch.Tensor:
    """A vector option as float64: a sequence, a tensor, or a command-line string "1,0" / "1 0"."""
    if isinstance(v, str):
        try:
            v = [float(t) for t in v.replace(",", " ").split()]
        except ValueError:
            raise ValueError(f"expected numbers separated by commas, got {v!r}") from None
    return torch.as_tensor(v, dtype=torch.float64)


def _vec(v, x: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(v, dtype=x.dtype, device=x.device)


def _centres(centres, dataset: str | None) -> torch.Tensor:
    if centres is not None:
        return _floats(centres).reshape(-1, 2).float()
    return get_dataset(dataset or DEFAULT_DATASET).centres.float()


def soft_assign(x: torch.Tensor, centres: torch.Tensor, temperature: float) -> torch.Tensor:
    """Soft nearest-centre assignment: softmax_k(-||x - c_k||^2 / (2 tau^2)), (B, 2) x (P, 2) -> (B, P).

    Equal-weight responsibilities of isotropic modes of std tau; tau -> 0 gives the hard nearest-centre indicator.
    """
    d2 = ((x[:, None, :] - centres.to(x)[None]) ** 2).sum(-1)
    return torch.softmax(-d2 / (2 * temperature ** 2), dim=-1)


def linear_reward(w=(1.0, 0.0), **_: Any) -> FnReward:
    """r(x) = w . x (default w = (1, 0): towards mode 0 of ring8_rare). Tilting a mixture keeps it a mixture."""
    w_t = _floats(w)
    r = FnReward(lambda x: x.float() @ _vec(w_t, x.float()), names="linear", media="points")
    r.tilt_spec = {"kind": "linear", "w": w_t}
    return r


def quadratic_reward(c=(3.0, 0.0), A=None, scale: float = 1.0, **_: Any) -> FnReward:
    """r(x) = -1/2 (x - c)^T A (x - c), A = scale * I by default; c = (3, 0) is mode 0 of ring8_rare."""
    A_t = _floats(A).reshape(2, 2) if A is not None else float(scale) * torch.eye(2, dtype=torch.float64)
    c_t = _floats(c)

    def fn(x):
        d = x.float() - _vec(c_t, x.float())
        return -0.5 * ((d @ _vec(A_t, d)) * d).sum(-1)
    r = FnReward(fn, names="quadratic", media="points")
    r.tilt_spec = {"kind": "quadratic", "A": A_t, "c": c_t}
    return r


def mode_reward(target: int = 0, centres=None, temperature: float = 0.5, dataset: str | None = None,
                **_: Any) -> FnReward:
    """Soft indicator that a point lands in mode `target`: its soft nearest-centre assignment, in [0, 1].
    centres: (P, 2) (default: the mode centres of `dataset`, ring8_rare)."""
    C = _centres(centres, dataset)
    t = int(target)
    return FnReward(lambda x: soft_assign(x.float(), C, temperature)[:, t], names="in_mode", media="points")


def otca_objectives(x: torch.Tensor, centres: torch.Tensor, target: int = 0, temperature: float = 0.5) -> torch.Tensor:
    """The OTCA pair, (B, 2) -> (B, 2) with columns [mode, centre]:
      mode   = soft indicator of landing in mode `target` (in [0, 1]): decided early, at high noise, when the
               trajectory picks its mode;
      centre = -sum_k a_k(x) ||x - c_k||^2 with the soft assignment a (about minus the squared distance to the
               nearest centre): decided late, when the trajectory settles inside its mode.
    They conflict on ring8_rare: the target mode is broad (std 0.5 against 0.2), so samples that land there are
    farther from a centre on average; per sample, the two group advantages often have opposite signs.
    """
    a = soft_assign(x, centres, temperature)
    d2 = ((x[:, None, :] - centres.to(x)[None]) ** 2).sum(-1)
    return torch.stack([a[:, target], -(a * d2).sum(-1)], -1)


def otca_reward(target: int = 0, centres=None, temperature: float = 0.5, dataset: str | None = None,
                **_: Any) -> FnReward:
    """Two objectives named ["mode", "centre"] (see otca_objectives)."""
    C = _centres(centres, dataset)
    t = int(target)
    return FnReward(lambda x: otca_objectives(x.float(), C, t, temperature), names=["mode", "centre"],
                    media="points")
