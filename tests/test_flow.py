"""Property tests of common/flow.py against closed forms and torch.distributions."""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from common.flow import (STEP_KINDS, cps_logprob_surrogate, euler_step, flux2_empirical_mu, flux_mu,
                         gaussian_logprob, make_sigmas, rollout, sde_step, shift_sigmas, transition_logprob,
                         unshift_sigmas, velocity_to_eps, velocity_to_x0, x0_to_velocity, eps_to_velocity)
from gaussian_ref import gaussian_velocity

sigmas_st = st.floats(min_value=1e-3, max_value=1.0)


def _xv(seed, shape=(4, 3, 5)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


# ----- schedules -------------------------------------------------------------------------------------------
@given(st.floats(0.2, 10.0), st.floats(0.0, 1.0), st.floats(0.0, 1.0))
def test_shift_monotone_fixes_ends_and_inverts(shift, a, b):
    t = torch.tensor([min(a, b), max(a, b)], dtype=torch.float64)
    s = shift_sigmas(t, shift)
    assert s[0] <= s[1] + 1e-12                                        # monotone
    assert torch.allclose(unshift_sigmas(s, shift), t, atol=1e-9)     # the stated inverse
    ends = shift_sigmas(torch.tensor([0.0, 1.0], dtype=torch.float64), shift)
    assert ends.tolist() == [0.0, 1.0]                                 # fixes 0 and 1


@given(st.integers(1, 60), st.floats(0.5, 8.0))
def test_make_sigmas_grid(K, shift):
    s = make_sigmas(K, shift=shift)
    assert s.shape == (K + 1,) and s[0] == 1.0 and s[-1] == 0.0     # always K+1 values from 1 to exactly 0
    assert bool((s[1:] < s[:-1]).all())


def test_explicit_timesteps_then_shift_and_flux_mu():
    s = make_sigmas(4, shift=3.0, timesteps=[1000, 750, 500, 250])
    assert torch.allclose(s, torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0]))  # diffusers shifts custom sigmas too
    # FLUX.1 dynamic shift: 512 px = 1024 packed tokens -> e^mu ~ 1.88; the 4-step grid of anchors.md pitfall 15
    assert math.exp(flux_mu(1024)) == pytest.approx(1.876, abs=0.01)
    assert torch.allclose(make_sigmas(4, mu=flux_mu(1024)), torch.tensor([1.0, 0.849, 0.652, 0.385, 0.0]), atol=2e-3)
    assert torch.allclose(make_sigmas(4, mu=flux_mu(4096)), torch.tensor([1.0, 0.904, 0.759, 0.512, 0.0]), atol=2e-3)
    # FLUX.2's empirical mu equals diffusers' own function
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu
    for n, k in [(256, 4), (1024, 28), (4096, 50), (5000, 4)]:
        assert flux2_empirical_mu(n, k) == pytest.approx(compute_empirical_mu(n, k))


def test_make_sigmas_matches_diffusers_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler
    sch = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sch.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25])
    assert torch.allclose(sch.sigmas.float(), make_sigmas(4, shift=3.0), atol=1e-6)


# ----- conversions -----------------------------------------------------------------------------------------
@given(st.integers(0, 10_000), sigmas_st)
def test_conversions_round_trip(seed, sigma):
    x, v = _xv(seed)
    x0, eps = velocity_to_x0(x, v, sigma), velocity_to_eps(x, v, sigma)
    assert torch.allclose(eps - x0, v, atol=1e-5)                          # v = eps - x0
    assert torch.allclose((1 - sigma) * x0 + sigma * eps, x, atol=1e-5)    # and they rebuild x_sigma
    assert torch.allclose(x0_to_velocity(x, x0, sigma), v, atol=1e-3 / sigma)
    if sigma < 0.999:
        assert torch.allclose(eps_to_velocity(x, eps, sigma), v, atol=1e-3 / (1 - sigma))


# ----- one step --------------------------------------------------------------------------------------------
@given(st.integers(0, 10_000), st.floats(0.05, 1.0), st.floats(0.0, 0.95), st.sampled_from(STEP_KINDS))
def test_noise_level_zero_is_euler(seed, sigma, frac, kind):
    x, v = _xv(seed)
    sn = sigma * frac
    nxt, mean, std = sde_step(x, v, sigma, sn, kind, noise_level=0.0)
    assert torch.allclose(nxt, euler_step(x, v, sigma, sn), atol=1e-6)
    assert float(torch.as_tensor(std).abs().max()) == 0.0


@given(st.integers(0, 10_000), st.floats(0.05, 1.0), st.floats(0.0, 0.95))
def test_cps_eta_one_renoises_x0(seed, sigma, frac):
    x, v = _xv(seed)
    sn = sigma * frac
    z = torch.randn_like(x)
    nxt, _, _ = sde_step(x, v, sigma, sn, "cps", noise_level=1.0, noise=z)
    assert torch.allclose(nxt, (1 - sn) * velocity_to_x0(x, v, sigma) + sn * z, atol=1e-5)


@given(st.integers(0, 10_000), st.floats(0.05, 1.0), st.sampled_from(STEP_KINDS), st.floats(0.0, 1.0))
def test_step_to_zero_is_deterministic_x0(seed, sigma, kind, level):
    x, v = _xv(seed)
    a, _, std_a = sde_step(x, v, sigma, 0.0, kind, level, generator=torch.Generator().manual_seed(1))
    b, _, _ = sde_step(x, v, sigma, 0.0, kind, level, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and float(torch.as_tensor(std_a).max()) == 0.0
    assert torch.allclose(a, velocity_to_x0(x, v, sigma), atol=1e-6)


def test_flow_grpo_first_step_std_is_a():
    # at sigma = 1 the denominator 1 - sigma uses 1 - sigma_1 (Flow-GRPO's rule): std = a sqrt(Delta/(1-sigma_1)) = a
    x, v = _xv(0)
    s = make_sigmas(4, shift=3.0)
    _, _, std = sde_step(x, v, s[0], s[1], "flow_grpo", 0.7, sigma_max=float(s[1]))
    assert torch.allclose(torch.as_tensor(std), torch.tensor(0.7), atol=1e-6)


# ----- log-probabilities -----------------------------------------------------------------------------------
@given(st.integers(0, 10_000), st.floats(0.01, 3.0))
def test_logprob_equals_torch_normal(seed, std):
    x, mean = _xv(seed)
    ref = torch.distributions.Normal(mean, std).log_prob(x)
    assert torch.allclose(gaussian_logprob(x, mean, std), ref.mean(dim=(1, 2)), atol=1e-5)
    assert torch.allclose(gaussian_logprob(x, mean, std, reduce="sum"), ref.sum(dim=(1, 2)), atol=1e-3)
    # maximal at the mean
    assert bool((gaussian_logprob(mean, mean, std) >= gaussian_logprob(x, mean, std)).all())
    assert torch.allclose(cps_logprob_surrogate(x, mean), -((x - mean) ** 2).mean(dim=(1, 2)))


@pytest.mark.parametrize("kind,level", [("flow_grpo", 0.7), ("dance", 0.3), ("cps", 0.8)])
def test_recomputed_transition_has_ratio_one(kind, level):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    vf = lambda x, s: net(torch.cat([x, s[:, None]], 1))
    sig = make_sigmas(6, shift=3.0)
    with torch.no_grad():
        tr = rollout(vf, torch.randn(5, 3), sig, kind, level, generator=torch.Generator().manual_seed(3))
    for k in range(tr.num_steps - 1):  # the last step (to 0) is deterministic
        lp, _, _ = transition_logprob(vf, tr.states[:, k], tr.states[:, k + 1], sig[k], sig[k + 1], kind, level,
                                      sigma_max=float(sig[1]))
        assert torch.equal(torch.exp(lp - tr.logprobs[:, k]), torch.ones(5))  # exactly 1 on-policy
        lp.sum().backward()                                                  # and the gradient reaches the net
    assert net[0].weight.grad is not None and net[0].weight.grad.abs().sum() > 0


# ----- rollouts --------------------------------------------------------------------------------------------
def test_rollout_record_shapes_grad_modes_and_shared_noise():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.tensor(0.5))
    vf = lambda x, s: w * x
    sig = make_sigmas(4)
    x = torch.randn(3, 2, 2)
    tr = rollout(vf, x, sig, "dance", 0.3, grad="all")
    assert tr.states.shape == (3, 5, 2, 2) and tr.x0.shape == (3, 4, 2, 2) and tr.logprobs.shape == (3, 4)
    assert tr.final.requires_grad
    last = rollout(vf, x, sig, "cps", 0.9, grad="last", stop=1)
    assert last.num_steps == 2 and last.final.requires_grad
    # only the last executed step carries a graph: the state before it has no path to the parameter
    assert torch.autograd.grad(last.states[:, 1].sum(), w, allow_unused=True, retain_graph=True)[0] == 0
    assert torch.autograd.grad(last.final.sum(), w)[0] != 0
    none = rollout(vf, x, sig, "dance", 0.3)
    assert not none.final.requires_grad
    z = torch.randn(1, 4, 2, 2).expand(3, 4, 2, 2)           # one draw shared by the whole group
    a = rollout(vf, x[:1].expand(3, 2, 2), sig, "dance", 0.3, noises=z)
    assert torch.allclose(a.states[0], a.states[1]) and torch.allclose(a.states[1], a.states[2])
    with pytest.raises(ValueError):
        rollout(vf, x, sig, "bogus", 0.3)


@given(st.integers(0, 10_000), st.integers(1, 12), st.floats(0.5, 5.0), st.sampled_from(["euler", "cps", "dance"]),
       st.sampled_from([0.0, 0.5]))
def test_rollout_equals_stepping_sde_step_bitwise(seed, K, shift, kind, level):
    # the rollout's short path for deterministic steps must give exactly sde_step's values, and its records
    g = torch.Generator().manual_seed(seed)
    x, noise = torch.randn(5, 3, generator=g), torch.randn(5, K, 3, generator=g)
    vf = lambda z, s: torch.sin(3 * z) * (1 + s[:, None]) - z                  # any smooth field
    sig = make_sigmas(K, shift)
    tr = rollout(vf, x, sig, kind, level, noises=noise, store_means=True)
    cur = x
    for k in range(K):
        s = torch.full((5,), float(sig[k]))
        v = vf(cur, s)
        nxt, mean, std = sde_step(cur, v, s, float(sig[k + 1]), kind, level, noise=noise[:, k])
        stochastic = kind != "euler" and level > 0 and float(sig[k + 1]) > 0
        assert torch.equal(tr.states[:, k + 1], nxt) and torch.equal(tr.means[:, k], mean)
        assert torch.equal(tr.x0[:, k], velocity_to_x0(cur, v, s))
        if not stochastic:
            assert torch.equal(tr.stds[:, k], torch.zeros(5)) and torch.equal(tr.logprobs[:, k], torch.zeros(5))
            assert torch.equal(tr.noises[:, k], torch.zeros(5, 3))
        else:
            assert torch.equal(tr.logprobs[:, k], gaussian_logprob(nxt, mean, std))
        cur = nxt


def test_rollout_detached_inputs_give_the_policy_gradient_graph():
    # grad as a set of steps with detach_inputs: d/dw sum_k log pi(x_k+1 | x_k) with every x_k held fixed,
    # which is the sum of transition_logprob's gradients at the recorded states
    torch.manual_seed(1)
    w = torch.nn.Parameter(torch.tensor(0.7))
    vf = lambda x, s: w * x + s[:, None]
    sig, x = make_sigmas(5), torch.randn(4, 3)
    steps = {0, 2, 3}
    tr = rollout(vf, x, sig, "flow_grpo", 0.7, grad=steps, detach_inputs=True)
    g_fused = torch.autograd.grad(tr.logprobs.sum(), w)[0]
    g_ref = torch.zeros(())
    for k in sorted(steps):
        lp, _, _ = transition_logprob(vf, tr.states[:, k].detach(), tr.states[:, k + 1].detach(), sig[k], sig[k + 1],
                                      "flow_grpo", 0.7, sigma_max=float(sig[1]))
        g_ref = g_ref + torch.autograd.grad(lp.sum(), w)[0]
    assert torch.allclose(g_fused, g_ref, rtol=1e-5, atol=1e-6)
    # a step outside the set has no graph; with detached inputs the log-prob of step 3 does not see steps 0..2
    tr = rollout(vf, x, sig, "flow_grpo", 0.7, grad=steps, detach_inputs=True)
    assert torch.autograd.grad(tr.logprobs[:, 1].sum(), w, allow_unused=True, retain_graph=True)[0] in (None, 0)
    assert torch.autograd.grad(tr.states[:, 3].sum(), w, retain_graph=True)[0] != 0       # step 2's own call
    fixed = torch.autograd.grad(tr.states[:, 4].sum(), w, retain_graph=True)[0]
    chain = rollout(vf, x, sig, "flow_grpo", 0.7, grad="all", noises=tr.noises)
    assert not torch.allclose(torch.autograd.grad(chain.states[:, 4].sum(), w)[0], fixed)  # the chain adds paths


def _final_std(kind, level, K, n=40_000, m=1.5, s=0.5):
    g = torch.Generator().manual_seed(0)
    tr = rollout(gaussian_velocity(m, s), torch.randn(n, 1, generator=g), make_sigmas(K), kind, level, generator=g)
    return float(tr.final.mean()), float(tr.final.std())


def test_euler_on_gaussian_data_reproduces_moments_and_falls_short_at_four_steps():
    mean, std = _final_std("euler", 0.0, 200)
    assert mean == pytest.approx(1.5, abs=0.02) and std == pytest.approx(0.5, abs=0.01)
    mean4, std4 = _final_std("euler", 0.0, 4)
    assert mean4 == pytest.approx(1.5, abs=0.02)
    assert 0.30 < std4 < 0.38        # 4 Euler steps shrink the spread: 0.34 instead of 0.50 (README figure)


@pytest.mark.slow
@pytest.mark.parametrize("kind,level", [("flow_grpo", 0.7), ("dance", 0.3)])
def test_sde_kinds_preserve_the_marginal_with_many_steps(kind, level):
    mean, std = _final_std(kind, level, 400)
    assert mean == pytest.approx(1.5, abs=0.02) and std == pytest.approx(0.5, abs=0.015)


@pytest.mark.slow
def test_cps_with_fixed_eta_does_not_reach_the_marginal():
    # anchors.md c.6: CPS with a fixed a keeps re-noising by O(sigma') per step and converges to a narrower law
    _, std = _final_std("cps", 0.8, 400)
    assert 0.35 < std < 0.45


# ----- numerics at the edges -------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", STEP_KINDS)
def test_no_nan_at_grid_edges(dtype, kind):
    x, v = (t.to(dtype) for t in _xv(1))
    for s, sn in [(1.0, 0.999), (1.0, 0.0), (0.001, 0.0), (1e-6, 0.0), (0.5, 0.5 - 1e-7)]:
        nxt, mean, std = sde_step(x, v, s, sn, kind, 0.7, sigma_max=0.999)
        lp = gaussian_logprob(nxt, mean, std)
        for t in (nxt, mean, torch.as_tensor(std), lp):
            assert torch.isfinite(t).all(), (kind, s, sn)
        assert nxt.dtype == torch.float32
