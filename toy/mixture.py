"""2D Gaussian mixtures with everything in closed form: density, sampling, the flow-matching marginals, the exact
marginal velocity E[eps - x0 | x_sigma] and posterior mean E[x0 | x_sigma] at every sigma in [0, 1], and reward
tilting p_T(x) exp(beta r(x)) / Z for linear and quadratic rewards (weights, means, covariances and log Z).

Conventions (shared/spec/decisions.md): x_sigma = (1 - sigma) x0 + sigma eps, eps ~ N(0, I), v = eps - x0.
All closed forms run in float64 internally (2x2 inversions near sigma = 0 lose digits in float32) and return the
input's dtype. Shapes: B points, K components, D = 2.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

_LOG2PI = math.log(2 * math.pi)


def _as64(t, device=None) -> torch.Tensor:
    return torch.as_tensor(t, dtype=torch.float64, device=device)


def inv_logdet(C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(C^{-1}, log det C) for a stack (..., D, D) of symmetric positive definite matrices.

    D = 2 uses the adjugate, C^{-1} = [[d, -b], [-c, a]] / (ad - bc): the batched LAPACK calls cost far more than
    the arithmetic for the toy's (B, K, 2, 2) stacks. Other D use linalg.inv / slogdet.
    """
    if C.shape[-1] == 2:
        a, b, c, d = C[..., 0, 0], C[..., 0, 1], C[..., 1, 0], C[..., 1, 1]
        det = a * d - b * c
        inv = torch.stack([torch.stack([d, -b], -1), torch.stack([-c, a], -1)], -2) / det[..., None, None]
        return inv, torch.log(det)
    return torch.linalg.inv(C), torch.linalg.slogdet(C)[1]


def gaussian_logpdf(x: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, cov) for every point and component, float64.

    x (B, D); mean (K, D) or (B, K, D); cov (K, D, D) or (B, K, D, D)  ->  (B, K).
    Equation: -1/2 (x - m)^T C^{-1} (x - m) - 1/2 log det C - D/2 log 2 pi; closed-form 2x2 inverse for D = 2,
    a Cholesky factor otherwise.
    """
    x = x.to(torch.float64)
    diff = x[:, None, :] - mean  # (B, K, D)
    if x.shape[-1] == 2:
        P, logdet = inv_logdet(cov)
        maha = ((P @ diff[..., None])[..., 0] * diff).sum(-1)
        return -0.5 * maha - 0.5 * logdet - _LOG2PI
    L = torch.linalg.cholesky(cov)  # (K, D, D) or (B, K, D, D)
    if L.ndim == 3:
        L = L.expand(x.shape[0], *L.shape)
    sol = torch.linalg.solve_triangular(L, diff[..., None], upper=False)[..., 0]  # L^{-1}(x - m): (B, K, D)
    maha = (sol ** 2).sum(-1)
    logdet = 2 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)
    return -0.5 * maha - 0.5 * logdet - 0.5 * x.shape[-1] * _LOG2PI


class GaussianMixture:
    """p(x) = sum_k w_k N(x; mu_k, Sigma_k) in D = 2 (any D works; the toy uses 2).

    weights (K,) positive, normalised on construction; means (K, D); covs (K, D, D) symmetric positive definite,
    or a float / (K,) of isotropic standard deviations via `isotropic`. Parameters are stored in float64.
    """

    def __init__(self, weights, means, covs, device=None):
        w = _as64(weights, device)
        self.weights = w / w.sum()
        self.means = _as64(means, device)
        self.covs = _as64(covs, device)
        K, D = self.means.shape
        if self.weights.shape != (K,) or self.covs.shape != (K, D, D):
            raise ValueError(f"mixture shapes disagree: weights {tuple(self.weights.shape)}, means {(K, D)}, "
                             f"covs {tuple(self.covs.shape)}")
        # Symmetrise once: tilting and marginals keep it exactly symmetric afterwards.
        self.covs = 0.5 * (self.covs + self.covs.transpose(-1, -2))

    # ----- construction -----------------------------------------------------------------------------------
    @classmethod
    def isotropic(cls, weights, means, stds, device=None) -> "GaussianMixture":
        """Components N(mu_k, s_k^2 I); stds: float or (K,)."""
        m = _as64(means, device)
        s = _as64(stds, device).expand(m.shape[0])
        covs = s[:, None, None] ** 2 * torch.eye(m.shape[1], dtype=torch.float64, device=m.device)
        return cls(weights, m, covs, device)

    @classmethod
    def combine(cls, mixtures: Sequence["GaussianMixture"], probs=None) -> "GaussianMixture":
        """The mixture sum_c pi_c p_c (pi uniform by default): the unconditional law of a class-conditional toy."""
        probs = _as64(probs if probs is not None else [1.0] * len(mixtures))
        probs = probs / probs.sum()
        w = torch.cat([p * m.weights.cpu() for p, m in zip(probs, mixtures)])
        return cls(w, torch.cat([m.means.cpu() for m in mixtures]), torch.cat([m.covs.cpu() for m in mixtures]),
                   device=mixtures[0].means.device)

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def to(self, device) -> "GaussianMixture":
        return GaussianMixture(self.weights, self.means, self.covs, device=device)

    def __repr__(self) -> str:
        return f"GaussianMixture(K={self.num_components}, D={self.dim})"

    # ----- density and sampling -----------------------------------------------------------------------------
    def component_logprob(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, K): log w_k + log N(x; mu_k, Sigma_k), float64."""
        return torch.log(self.weights) + gaussian_logpdf(x.to(self.means.device), self.means, self.covs)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x): (B, D) -> (B,), in x's dtype and on x's device (float64 inside, on the mixture's device)."""
        return torch.logsumexp(self.component_logprob(x), dim=-1).to(x.device, x.dtype)

    def responsibilities(self, x: torch.Tensor) -> torch.Tensor:
        """p(k | x): (B, D) -> (B, K), float64."""
        return torch.softmax(self.component_logprob(x), dim=-1)

    def sample(self, n: int, generator: torch.Generator | None = None, return_labels: bool = False):
        """n draws, float32 (n, D) on the mixture's device (and the component index of each when asked)."""
        dev = self.means.device
        g_dev = generator.device if generator is not None else dev
        k = torch.multinomial(self.weights.to(g_dev), n, replacement=True, generator=generator).to(dev)
        z = torch.randn(n, self.dim, generator=generator, device=g_dev, dtype=torch.float64).to(dev)
        L = torch.linalg.cholesky(self.covs)[k]  # (n, D, D)
        x = (self.means[k] + (L @ z[..., None])[..., 0]).float()
        return (x, k) if return_labels else x

    def mean(self) -> torch.Tensor:
        """E[x]: (D,) float64."""
        return self.weights @ self.means

    def cov(self) -> torch.Tensor:
        """Cov[x]: (D, D) float64 (law of total covariance)."""
        m = self.mean()
        d = self.means - m
        return (self.weights[:, None, None] * (self.covs + d[:, :, None] * d[:, None, :])).sum(0)

    # ----- the flow-matching path ---------------------------------------------------------------------------
    def _path_params(self, sigma: torch.Tensor, B: int):
        """Per point and component, the joint Gaussian of (x0, x_sigma) given k, float64.

        sigma (B,). Returns a = 1 - sigma (B,1,1), m = a mu_k (B,K,D), C = a^2 Sigma_k + sigma^2 I (B,K,D,D).
        """
        s = sigma.reshape(B, 1, 1)
        a = 1 - s
        eye = torch.eye(self.dim, dtype=torch.float64, device=self.means.device)
        m = a * self.means[None]
        C = a[..., None] ** 2 * self.covs[None] + s[..., None] ** 2 * eye
        return a, s, m, C

    def _sigma(self, sigma, B: int) -> torch.Tensor:
        s = _as64(sigma, self.means.device)
        if s.ndim == 0:
            s = s.expand(B)
        if s.shape != (B,):
            raise ValueError(f"sigma must be a scalar or ({B},), got {tuple(s.shape)}")
        if bool(((s < 0) | (s > 1)).any()):
            raise ValueError("sigma must lie in [0, 1]")
        return s

    def marginal(self, sigma: float) -> "GaussianMixture":
        """The law of x_sigma = (1 - sigma) x0 + sigma eps: weights w_k, means (1 - sigma) mu_k,
        covariances (1 - sigma)^2 Sigma_k + sigma^2 I."""
        s = float(sigma)
        eye = torch.eye(self.dim, dtype=torch.float64, device=self.means.device)
        return GaussianMixture(self.weights, (1 - s) * self.means, (1 - s) ** 2 * self.covs + s ** 2 * eye,
                               device=self.means.device)

    def marginal_log_prob(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """log p_sigma(x) with sigma scalar or (B,): (B, D) -> (B,), x's dtype."""
        B = x.shape[0]
        s = self._sigma(sigma, B)
        _, _, m, C = self._path_params(s, B)
        return torch.logsumexp(torch.log(self.weights) + gaussian_logpdf(x.to(self.means.device), m, C),
                               -1).to(x.dtype)

    def posterior(self, x: torch.Tensor, sigma) -> tuple[torch.Tensor, torch.Tensor]:
        """E[x0 | x_sigma = x] and E[eps | x_sigma = x], each (B, D) float64; sigma scalar or (B,) in [0, 1].

        Given component k, (x0, x_sigma) is jointly Gaussian with C_k = a^2 Sigma_k + sigma^2 I (a = 1 - sigma):
            E[x0  | x, k] = mu_k + a Sigma_k C_k^{-1} (x - a mu_k)
            E[eps | x, k] = sigma C_k^{-1} (x - a mu_k)
        and p(k | x) is proportional to w_k N(x; a mu_k, C_k). At sigma = 0 this gives E[x0 | x] = x and
        E[eps | x] = 0 (eps independent of x0); at sigma = 1, E[x0 | x] = E[x0] and E[eps | x] = x.
        """
        B = x.shape[0]
        x64 = x.to(device=self.means.device, dtype=torch.float64)
        s = self._sigma(sigma, B)
        a, sb, m, C = self._path_params(s, B)
        diff = x64[:, None, :] - m  # (B, K, D)
        Cinv, logdet = inv_logdet(C)
        Cinv_diff = (Cinv @ diff[..., None])[..., 0]  # C_k^{-1}(x - a mu_k)
        # log w_k + log N(x; a mu_k, C_k), sharing the inverse with the posterior means below
        logr = torch.log(self.weights) - 0.5 * (diff * Cinv_diff).sum(-1) - 0.5 * logdet - 0.5 * self.dim * _LOG2PI
        r = torch.softmax(logr, -1)
        x0_k = self.means[None] + a * (self.covs[None] @ Cinv_diff[..., None])[..., 0]
        eps_k = sb * Cinv_diff
        x0 = (r[..., None] * x0_k).sum(1)
        eps = (r[..., None] * eps_k).sum(1)
        return x0, eps

    def posterior_sample(self, x: torch.Tensor, sigma, m: int, generator: torch.Generator | None = None):
        """m exact draws of x0 ~ p(x0 | x_sigma = x) per point: (B, D) -> (B, m, D) float64.

        The posterior is again a Gaussian mixture: component k with probability p(k | x), then
        x0 ~ N(E[x0 | x, k], Sigma_k - a^2 Sigma_k C_k^{-1} Sigma_k) (a = 1 - sigma, C_k = a^2 Sigma_k + sigma^2 I);
        the covariance vanishes at sigma = 0 (x0 = x) and is Sigma_k at sigma = 1.
        """
        B = x.shape[0]
        x64 = x.to(device=self.means.device, dtype=torch.float64)
        s = self._sigma(sigma, B)
        a, sb, mm, C = self._path_params(s, B)
        diff = x64[:, None, :] - mm
        Cinv, logdet = inv_logdet(C)
        Cinv_diff = (Cinv @ diff[..., None])[..., 0]
        logr = torch.log(self.weights) - 0.5 * (diff * Cinv_diff).sum(-1) - 0.5 * logdet
        g_dev = generator.device if generator is not None else self.means.device
        k = torch.multinomial(torch.softmax(logr, -1).to(g_dev), m, replacement=True,
                              generator=generator).to(self.means.device)  # (B, m)
        S = self.covs[None]  # (1, K, D, D)
        mean_k = self.means[None] + a * (S @ Cinv_diff[..., None])[..., 0]  # (B, K, D)
        cov_k = S - a[..., None] ** 2 * S @ Cinv @ S  # (B, K, D, D)
        cov_k = 0.5 * (cov_k + cov_k.transpose(-1, -2))
        eye = torch.eye(self.dim, dtype=torch.float64, device=self.means.device)
        L = torch.linalg.cholesky(cov_k + 1e-12 * eye)  # jitter: the covariance is exactly 0 at sigma = 0
        bi = torch.arange(B, device=k.device)[:, None].expand(B, m)
        z = torch.randn(B, m, self.dim, generator=generator, device=g_dev, dtype=torch.float64).to(self.means.device)
        return mean_k[bi, k] + (L[bi, k] @ z[..., None])[..., 0]

    def posterior_mean(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """E[x0 | x_sigma = x]: (B, D), x's dtype."""
        return self.posterior(x, sigma)[0].to(x.dtype)

    def velocity(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """The exact marginal velocity v(x, sigma) = E[eps - x0 | x_sigma = x]: (B, D), x's dtype.

        Valid at every sigma in [0, 1] (no division by sigma or 1 - sigma): v = -x at sigma = 0 and
        v = x - E[x0] at sigma = 1. It is the minimiser of the flow-matching loss, hence a perfect teacher.
        """
        x0, eps = self.posterior(x, sigma)
        return (eps - x0).to(x.dtype)

    def score(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """grad_x log p_sigma(x) = -E[eps | x] / sigma (Tweedie), (B, D); sigma must be > 0."""
        _, eps = self.posterior(x, sigma)
        s = self._sigma(sigma, x.shape[0])
        return (-eps / s[:, None]).to(x.dtype)

    # ----- reward tilting ----------------------------------------------------------------------------------
    def tilt_linear(self, w, beta: float) -> tuple["GaussianMixture", float]:
        """p_T(x) exp(beta w.x) / Z for r(x) = w.x. Returns (tilted mixture, log Z).

        Per component (complete the square): N(mu, S) exp(b w.x) = exp(b w.mu + b^2/2 w^T S w) N(mu + b S w, S).
        So covariances stay, means move by b S_k w, weights become w_k exp(b w.mu_k + b^2/2 w^T S_k w) / Z and
        log Z = logsumexp_k(log w_k + b w.mu_k + b^2/2 w^T S_k w).
        """
        w = _as64(w, self.means.device)
        b = float(beta)
        Sw = self.covs @ w  # (K, D)
        logc = torch.log(self.weights) + b * (self.means @ w) + 0.5 * b * b * (Sw @ w)
        logZ = torch.logsumexp(logc, 0)
        return GaussianMixture(torch.exp(logc - logZ), self.means + b * Sw, self.covs, self.means.device), \
            float(logZ)

    def tilt_quadratic(self, A, c, beta: float) -> tuple["GaussianMixture", float]:
        """p_T(x) exp(beta r(x)) / Z for r(x) = -1/2 (x - c)^T A (x - c), A symmetric (PSD, or such that every
        tilted precision stays positive definite). Returns (tilted mixture, log Z).

        Per component: precision P' = S^{-1} + b A, S' = P'^{-1}, mu' = S' (S^{-1} mu + b A c), and
        int N(x; mu, S) exp(b r(x)) dx = sqrt(det S' / det S) exp(-1/2 [mu^T S^{-1} mu + b c^T A c - mu'^T P' mu']).
        """
        A = _as64(A, self.means.device)
        c = _as64(c, self.means.device)
        b = float(beta)
        A = 0.5 * (A + A.T)
        P = torch.linalg.inv(self.covs)  # (K, D, D)
        P2 = P + b * A
        if bool((torch.linalg.eigvalsh(P2) <= 0).any()):
            raise ValueError("the tilted precision S^-1 + beta A is not positive definite: "
                             "the tilt is not normalisable")
        S2 = torch.linalg.inv(P2)
        S2 = 0.5 * (S2 + S2.transpose(-1, -2))
        h = (P @ self.means[..., None])[..., 0] + b * (A @ c)  # S^{-1} mu + b A c: (K, D)
        mu2 = (S2 @ h[..., None])[..., 0]
        quad = (self.means * (P @ self.means[..., None])[..., 0]).sum(-1) + b * (c @ A @ c) - (mu2 * h).sum(-1)
        logdet_ratio = torch.logdet(S2) - torch.logdet(self.covs)
        logc = torch.log(self.weights) + 0.5 * logdet_ratio - 0.5 * quad
        logZ = torch.logsumexp(logc, 0)
        return GaussianMixture(torch.exp(logc - logZ), mu2, S2, self.means.device), float(logZ)

    def tilt(self, reward, beta: float) -> tuple["GaussianMixture", float]:
        """Tilt by a toy reward that carries a closed form: `reward.tilt_spec` (toy.rewards sets it) or a dict
        {"kind": "linear", "w": ...} / {"kind": "quadratic", "A": ..., "c": ...}. Returns (mixture, log Z)."""
        spec = getattr(reward, "tilt_spec", reward)
        if not isinstance(spec, dict) or spec.get("kind") not in ("linear", "quadratic"):
            raise ValueError("closed-form tilting needs a linear or quadratic reward (toy_linear, toy_quadratic)")
        if spec["kind"] == "linear":
            return self.tilt_linear(spec["w"], beta)
        return self.tilt_quadratic(spec["A"], spec["c"], beta)

    # ----- closed-form reward expectations ----------------------------------------------------------------
    def expected_linear(self, w) -> float:
        """E_p[w.x] = sum_k w_k w.mu_k."""
        return float(self.mean() @ _as64(w, self.means.device))

    def expected_quadratic(self, A, c) -> float:
        """E_p[-1/2 (x - c)^T A (x - c)] = -1/2 sum_k w_k [tr(A S_k) + (mu_k - c)^T A (mu_k - c)]."""
        A = _as64(A, self.means.device)
        d = self.means - _as64(c, self.means.device)
        per = torch.einsum("ij,kji->k", A, self.covs) + ((d @ A) * d).sum(-1)
        return float(-0.5 * (self.weights * per).sum())

    def expected_reward(self, reward) -> float:
        """E_p[r] in closed form for a linear or quadratic toy reward (see `tilt`)."""
        spec = getattr(reward, "tilt_spec", reward)
        if spec["kind"] == "linear":
            return self.expected_linear(spec["w"])
        return self.expected_quadratic(spec["A"], spec["c"])


def gaussian_kl(m1, S1, m2, S2) -> float:
    """KL(N(m1, S1) || N(m2, S2)) = 1/2 [tr(S2^-1 S1) + (m2 - m1)^T S2^-1 (m2 - m1) - D + log det S2 - log det S1]."""
    m1, S1, m2, S2 = (_as64(t) for t in (m1, S1, m2, S2))
    P2 = torch.linalg.inv(S2)
    d = m2 - m1
    return float(0.5 * (torch.trace(P2 @ S1) + d @ P2 @ d - m1.shape[0] + torch.logdet(S2) - torch.logdet(S1)))
