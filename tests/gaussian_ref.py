"""Closed-form reference for Gaussian data x0 ~ N(m, s^2 I): the exact marginal velocity at every sigma.

x_sigma = (1 - sigma) x0 + sigma eps is Gaussian with mean (1 - sigma) m and variance V = (1 - sigma)^2 s^2 + sigma^2;
E[x0 | x] = m + (1 - sigma) s^2 (x - (1 - sigma) m) / V and E[eps | x] = sigma (x - (1 - sigma) m) / V, so
v(x, sigma) = E[eps - x0 | x] is affine in x. Used as a perfect teacher in the flow tests.
"""
import torch


def gaussian_velocity(m: float, s: float):
    def v(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sig = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, *([1] * (x.ndim - 1)))
        xd = x.double()
        var = (1 - sig) ** 2 * s ** 2 + sig ** 2
        centred = xd - (1 - sig) * m
        e_x0 = m + (1 - sig) * s ** 2 * centred / var
        e_eps = sig * centred / var
        return (e_eps - e_x0).float()
    return v
