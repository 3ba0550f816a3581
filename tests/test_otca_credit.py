"""Property tests of common/credit.py (OTCA maths) against independent references (otca.md section 7)."""
import itertools
import math

import pytest
import torch
from hypothesis import given, strategies as st

from common.credit import (batch_mean_credit, cosine_progress, fused_clipped_loss, min_norm_weights, mix_weights,
                           moca_fuse, objective_advantages, per_objective_clipped_loss, step_advantages, step_credit,
                           tcd_credit, uniform_credit)
from common.flow import make_sigmas, rollout, transition_logprob
from common.rl import clipped_surrogate, group_advantages

floats = st.floats(-3, 3, allow_nan=False, width=32)


def _traj(seed, B=3, K=6, D=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, K + 1, D, generator=g)


def _simplex_grid(M, n=60):
    """Every point of the simplex with coordinates in {0, 1/n, ..., 1}."""
    if M == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    pts = [c for c in itertools.product(range(n + 1), repeat=M - 1) if sum(c) <= n]
    g = torch.tensor(pts, dtype=torch.float64) / n
    return torch.cat([g, 1 - g.sum(1, keepdim=True)], 1)


# ----- TCD --------------------------------------------------------------------------------------------------
@given(seed=st.integers(0, 10_000), norm=st.sampled_from(["mean_one", "sum_one"]),
       frac=st.floats(0.2, 1.0), eps=st.sampled_from([1e-4, 1e-3, 1e-2]))
def test_tcd_nonnegative_and_normalised(seed, norm, frac, eps):
    z = _traj(seed)
    B, K = z.shape[0], z.shape[1] - 1
    g = torch.Generator().manual_seed(seed + 1)
    trained = torch.rand(B, K, generator=g) < frac
    trained[:, 0] = True
    w = tcd_credit(z, trained, eps_w=eps, norm=norm)
    assert (w >= 0).all()
    if norm == "sum_one":
        torch.testing.assert_close(w.sum(1), torch.ones(B))
        assert (w > 0).all()
    else:
        n = trained.sum(1).float()
        torch.testing.assert_close((w * trained).sum(1) / n, torch.ones(B))
        assert (w[~trained] == 0).all()
        # P2: the floor eps contributes |S| eps / sum(w_hat) at least
        s = cosine_progress(z)
        w_hat = (s[:, 1:] - s[:, :-1]).clamp_min(0) + eps
        floor = n * eps / (w_hat * trained).sum(1)
        assert (w[trained] >= (floor[:, None].expand_as(w)[trained] - 1e-6)).all()


@given(seed=st.integers(0, 10_000), alpha=st.floats(1e-3, 1e3))
def test_tcd_invariant_to_scaling_and_rotation(seed, alpha):
    z = _traj(seed).double()
    trained = torch.ones(z.shape[0], z.shape[1] - 1, dtype=torch.bool)
    q, _ = torch.linalg.qr(torch.randn(z.shape[-1], z.shape[-1], generator=torch.Generator().manual_seed(seed),
                                       dtype=torch.float64))
    w = tcd_credit(z, trained)
    torch.testing.assert_close(tcd_credit(alpha * z, trained), w, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tcd_credit(z @ q.T, trained), w, atol=1e-5, rtol=1e-5)


def test_cosine_progress_reference_and_telescoping():
    """s matches torch.nn.functional.cosine_similarity, s_K = 1, and sum max(delta, 0) telescopes (P3)."""
    z = _traj(3, B=4, K=5, D=7)
    s = cosine_progress(z)
    ref = torch.nn.functional.cosine_similarity(z, z[:, -1:].expand_as(z), dim=-1)
    torch.testing.assert_close(s, ref)
    torch.testing.assert_close(s[:, -1], torch.ones(4))
    # a monotone path (straight line from z_0 to z_K) has delta >= 0 everywhere
    z0, zK = z[:, 0], z[:, -1]
    line = torch.stack([z0 + (zK - z0) * k / 5 for k in range(6)], 1)
    sl = cosine_progress(line)
    d = sl[:, 1:] - sl[:, :-1]
    assert (d >= -1e-6).all()
    torch.testing.assert_close(d.clamp_min(0).sum(1), 1 - sl[:, 0], atol=1e-6, rtol=0)


def test_tcd_monotone_and_uniform_reduction():
    """P4: credit grows with a step's progress; equal progress (or eps -> inf) gives exactly uniform credit."""
    s = torch.tensor([[0.0, 0.1, 0.3, 0.35, 1.0]])
    trained = torch.ones(1, 4, dtype=torch.bool)
    w = step_credit(s, trained)
    assert w[0, 3] > w[0, 1] > w[0, 2] > 0  # deltas 0.65 > 0.2 > 0.05
    s_neg = torch.tensor([[0.5, 0.4, 0.3, 0.2, 1.0]])
    w_neg = step_credit(s_neg, trained)
    assert w_neg[0, 0] == w_neg[0, 1] == w_neg[0, 2]  # every delta <= 0: the same minimal weight
    s_eq = torch.linspace(0, 1, 5)[None]
    torch.testing.assert_close(step_credit(s_eq, trained), torch.ones(1, 4))
    torch.testing.assert_close(step_credit(s, trained, eps_w=1e9), uniform_credit(trained))


def test_x0_source_uses_predictions():
    z = _traj(5, B=2, K=4)
    x0 = torch.randn(2, 4, 5, generator=torch.Generator().manual_seed(9))
    trained = torch.ones(2, 4, dtype=torch.bool)
    w = tcd_credit(z, trained, x0=x0, source="x0")
    seq = torch.cat([x0, z[:, -1:]], 1)
    torch.testing.assert_close(w, step_credit(cosine_progress(seq), trained))


# ----- min-norm weights ---------------------------------------------------------------------------------------
@given(a=st.lists(floats, min_size=1, max_size=3))
def test_min_norm_matches_brute_force_grid(a):
    a_t = torch.tensor([a])
    c, fused = min_norm_weights(a_t)
    M = len(a)
    assert (c >= 0).all()
    torch.testing.assert_close(c.sum(1), torch.ones(1))
    torch.testing.assert_close((c * a_t).sum(1), fused, atol=1e-5, rtol=1e-5)
    grid = _simplex_grid(M)
    best = ((grid @ a_t[0].double()) ** 2).min().item()
    assert fused.item() ** 2 <= best + 1e-6
    lo, hi = min(a), max(a)
    if lo <= 0 <= hi:
        assert fused.item() == 0.0
    else:
        assert math.isclose(fused.item(), math.copysign(min(abs(x) for x in a), lo), rel_tol=1e-6)


@given(a=st.lists(floats, min_size=2, max_size=4), seed=st.integers(0, 1000), lam=st.floats(-4, 4))
def test_min_norm_permutation_and_scale(a, seed, lam):
    a_t = torch.tensor([a])
    perm = torch.randperm(len(a), generator=torch.Generator().manual_seed(seed))
    c, f = min_norm_weights(a_t)
    cp, fp = min_norm_weights(a_t[:, perm])
    torch.testing.assert_close(cp, c[:, perm])
    assert fp.item() == f.item()
    _, fl = min_norm_weights(lam * a_t)
    assert math.isclose(fl.item(), lam * f.item(), rel_tol=1e-5, abs_tol=1e-6)


def test_min_norm_cases():
    c, f = min_norm_weights(torch.tensor([[2.0, 0.5, 1.0], [-2.0, -0.5, -1.0], [1.0, -3.0, 2.0], [0.0, 0.0, 0.0]]))
    torch.testing.assert_close(f, torch.tensor([0.5, -0.5, 0.0, 0.0]))
    torch.testing.assert_close(c[0], torch.tensor([0.0, 1.0, 0.0]))
    torch.testing.assert_close(c[1], torch.tensor([0.0, 1.0, 0.0]))
    torch.testing.assert_close(c[2], torch.tensor([0.0, 0.4, 0.6]))  # tau = 3/5 on the largest
    torch.testing.assert_close(c[3], torch.full((3,), 1 / 3))
    # M = 1: c = 1 and the fused value is the advantage itself
    c1, f1 = min_norm_weights(torch.tensor([[-0.7], [1.3]]))
    assert (c1 == 1).all() and torch.equal(f1, torch.tensor([-0.7, 1.3]))
    # duplicating an objective leaves the min-norm value unchanged
    _, fd = min_norm_weights(torch.tensor([[2.0, 0.5, 0.5, 1.0]]))
    assert fd.item() == 0.5


# ----- mixing, masking, affine invariance -------------------------------------------------------------------------
def test_mixing_endpoints():
    a = torch.tensor([[1.0, -2.0], [0.5, 2.0]])
    f0, _ = moca_fuse(a, rho=0.0)
    torch.testing.assert_close(f0, min_norm_weights(a)[1], atol=1e-6, rtol=0)
    prior = torch.tensor([3.0, 1.0])
    f1, c1 = moca_fuse(a, rho=1.0, prior=prior)
    torch.testing.assert_close(f1, a @ (prior / prior.sum()))
    f2, _ = moca_fuse(a, rho=0.2)
    torch.testing.assert_close(f2, 0.8 * min_norm_weights(a)[1] + 0.2 * a.mean(1))
    big, _ = moca_fuse(torch.tensor([[40.0, 30.0]]), rho=0.2)
    assert big.item() == 5.0  # clamped


@given(seed=st.integers(0, 10_000), scale=st.floats(0.05, 20), shift=st.floats(-50, 50), m=st.integers(0, 2))
def test_affine_change_of_one_reward_leaves_advantages(seed, scale, shift, m):
    G = 6
    r = torch.randn(3 * G, 3, generator=torch.Generator().manual_seed(seed))
    r2 = r.clone()
    r2[:, m] = scale * r[:, m] + shift
    a, v = objective_advantages(r, G)
    a2, v2 = objective_advantages(r2, G)
    # float32 stores scale * r + shift to about ulp(shift), i.e. a relative error ~ 2^-23 |shift| / scale of the
    # standardised value: the tolerance follows that conditioning (a large shift on a small scale loses digits)
    tol = 1e-4 + 8 * 2.0 ** -23 * (abs(shift) + 3 * scale) / scale
    torch.testing.assert_close(a2, a, atol=tol, rtol=1e-4)
    assert torch.equal(v, v2)
    f, c = moca_fuse(a, v)
    f2, c2 = moca_fuse(a2, v2)
    torch.testing.assert_close(f2, f, atol=tol, rtol=1e-4)


def test_zero_variance_objective_is_masked():
    G = 4
    g = torch.Generator().manual_seed(0)
    r = torch.randn(2 * G, 2, generator=g)
    r[:G, 1] = 0.7  # objective 1 is constant in group 0
    a, valid = objective_advantages(r, G)
    assert (~valid[:G, 1]).all() and valid[G:].all() and valid[:G, 0].all()
    assert (a[:G, 1] == 0).all()
    f, c = moca_fuse(a, valid)
    # masked == removed: group 0 behaves exactly as the single-objective problem
    f_single, _ = moca_fuse(a[:G, :1], valid[:G, :1])
    torch.testing.assert_close(f[:G], f_single)
    assert (c[:G, 1] == 0).all()
    # without the mask the pure min-norm fusion collapses to 0 on that group (the failure mode masking prevents)
    _, f_unmasked = min_norm_weights(a[:G])
    assert (f_unmasked == 0).all()
    # a whole batch of constant rewards gives zero advantages, never NaN
    fz, _ = moca_fuse(*objective_advantages(torch.ones(G, 2), G))
    assert torch.equal(fz, torch.zeros(G))


def test_prior_restricted_to_valid():
    c = mix_weights(torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[True, True, False]]), rho=0.5,
                    prior=torch.tensor([1.0, 1.0, 2.0]))
    torch.testing.assert_close(c, torch.tensor([[0.75, 0.25, 0.0]]))


# ----- losses -------------------------------------------------------------------------------------------------
def test_fuse_then_clip_vs_clip_then_sum():
    logp_old = torch.zeros(3)
    w = torch.tensor([1.0, 1.0])
    # same signs, ratio outside the clip: equal
    a_same = torch.tensor([[1.0, 2.0], [-1.0, -0.5], [0.3, 0.0]])
    logp = torch.log(torch.tensor([1.5, 0.5, 1.5]))
    l1, _ = per_objective_clipped_loss(logp, logp_old, a_same, w, 0.2)
    l2, _ = fused_clipped_loss(logp, logp_old, a_same @ w, 0.2)
    torch.testing.assert_close(l1, l2)
    # mixed signs, ratio inside the clip (on-policy rho = 1): equal
    a_mix = torch.tensor([[1.0, -1.0], [2.0, -0.5], [-3.0, 1.0]])
    l1, _ = per_objective_clipped_loss(torch.zeros(3), logp_old, a_mix, w, 0.2)
    l2, _ = fused_clipped_loss(torch.zeros(3), logp_old, a_mix @ w, 0.2)
    torch.testing.assert_close(l1, l2)
    # mixed signs and rho = 1.5: they differ (P12)
    l1, _ = per_objective_clipped_loss(torch.log(torch.tensor([1.5])), torch.zeros(1), torch.tensor([[1.0, -1.0]]),
                                       w, 0.2)
    l2, _ = fused_clipped_loss(torch.log(torch.tensor([1.5])), torch.zeros(1), torch.tensor([0.0]), 0.2)
    assert l2.item() == 0.0 and l1.item() == pytest.approx(-1.2 + 1.5)


@given(seed=st.integers(0, 1000))
def test_credit_scaling_commutes_with_clip(seed):
    """P6: for omega > 0, min(rho w A, clip(rho) w A) = w min(rho A, clip(rho) A)."""
    g = torch.Generator().manual_seed(seed)
    logp = 0.3 * torch.randn(8, generator=g)
    A = torch.randn(8, generator=g)
    w = torch.rand(8, generator=g) * 3 + 1e-3
    l1, _ = clipped_surrogate(logp, torch.zeros(8), w * A, 0.1)
    l2, _ = clipped_surrogate(logp, torch.zeros(8), A, 0.1)
    torch.testing.assert_close(l1, w * l2)


def test_uniform_credit_single_objective_is_plain_grpo():
    """P1: M = 1 and uniform credit reproduce plain GRPO's loss and gradients exactly (bitwise), on a policy."""
    torch.manual_seed(0)
    G, n_groups, K, D = 4, 2, 5, 3
    B = G * n_groups
    net = torch.nn.Sequential(torch.nn.Linear(D + 1, 16), torch.nn.Tanh(), torch.nn.Linear(16, D))
    vf = lambda x, s: net(torch.cat([x, s[:, None]], 1))
    sig = make_sigmas(K, shift=3.0)
    with torch.no_grad():
        traj = rollout(vf, torch.randn(B, D), sig, kind="dance", noise_level=0.7,
                       generator=torch.Generator().manual_seed(1))
    r = traj.final.pow(2).sum(1, keepdim=True)  # (B, 1)
    trained = torch.ones(B, K, dtype=torch.bool)
    trained[:, -1] = False

    def loss_and_grads(adv_fn):
        net.zero_grad()
        total = 0.0
        A = adv_fn()
        for t in range(K - 1):
            x, xn = traj.states[:, t], traj.states[:, t + 1]
            lp, _, _ = transition_logprob(vf, x, xn, sig[t], sig[t + 1], "dance", 0.7)
            loss, ratio = clipped_surrogate(lp, traj.logprobs[:, t], A[:, t] if A.ndim == 2 else A, 1e-4)
            loss = loss.mean() / (K - 1)
            loss.backward()
            total += loss.item()
            assert torch.equal(ratio, torch.ones(B))  # on-policy: exactly 1
        return total, [p.grad.clone() for p in net.parameters()]

    grpo = lambda: group_advantages(r[:, 0], G, std="group", ddof=1, eps=1e-8, clamp=5.0)

    def otca():
        a, valid = objective_advantages(r, G)
        fused, c = moca_fuse(a, valid, rho=0.2)
        assert (c == 1).all()
        return step_advantages(fused, uniform_credit(trained))

    l_ref, g_ref = loss_and_grads(grpo)
    l_otca, g_otca = loss_and_grads(otca)
    assert l_ref == l_otca
    for a_, b_ in zip(g_ref, g_otca):
        assert torch.equal(a_, b_)
    assert any(g.abs().sum() > 0 for g in g_ref)


@given(seed=st.integers(0, 10_000), norm=st.sampled_from(["mean_one", "sum_one"]), frac=st.floats(0.2, 1.0))
def test_batch_mean_credit_shared_profile_keeps_the_norm(seed, norm, frac):
    """--credit tcd_batch honours --credit-norm: one profile for the batch (equal rows wherever the trained steps are
    equal), non-negative, each row summing to one over all K steps (sum_one, as tcd_credit) or with mean one over its
    trained steps and 0 elsewhere (mean_one)."""
    z = _traj(seed, B=4, K=6)
    B, K = 4, 6
    g = torch.Generator().manual_seed(seed + 1)
    trained = torch.rand(B, K, generator=g) < frac
    trained[:, 0], trained[:, -1] = True, False                  # the last (deterministic) step is never trained
    w = batch_mean_credit(tcd_credit(z, trained, norm=norm), trained, norm=norm)
    assert w.shape == (B, K) and (w >= 0).all()
    if norm == "sum_one":
        assert torch.equal(w, w[:1].expand_as(w))
        torch.testing.assert_close(w.sum(1), torch.ones(B))
    else:
        torch.testing.assert_close((w * trained).sum(1) / trained.sum(1), torch.ones(B))
        assert (w[~trained] == 0).all()
        full = torch.ones(B, K, dtype=torch.bool)
        full[:, -1] = False
        wf = batch_mean_credit(tcd_credit(z, full), full)
        assert torch.equal(wf, wf[:1].expand_as(wf))
