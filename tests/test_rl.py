"""Property tests of common/rl.py: group advantages, the clipped surrogate, the same-covariance KL."""
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from common.rl import clipped_surrogate, gaussian_kl_same_std, group_advantages, zero_variance_mask

rewards = st.lists(st.floats(-100, 100, allow_nan=False, width=32), min_size=8, max_size=8)


@given(rewards, st.sampled_from([0, 1]))
def test_group_advantages_standardise_each_group(r, ddof):
    r = torch.tensor(r).reshape(2, 4)
    r[1] += torch.arange(4.0)  # keep group 1 non-constant
    a = group_advantages(r.flatten(), 4, ddof=ddof, eps=0.0).reshape(2, 4)
    for g in range(2):
        if r[g].std() > 1e-3:
            assert a[g].mean().abs() < 1e-4
            assert a[g].std(correction=ddof) == pytest.approx(1.0, abs=1e-3)


@given(rewards, st.floats(0.01, 50), st.floats(-50, 50))
def test_group_advantages_affine_invariant(r, scale, shift):
    r = torch.tensor(r)
    assume(all(float(g.max() - g.min()) > 1e-2 or float(g.max() - g.min()) == 0 for g in r.reshape(2, 4)))
    a = group_advantages(r, 4, eps=0.0)
    b = group_advantages(r * scale + shift, 4, eps=0.0)
    assert torch.allclose(a, b, atol=2e-3)


def test_zero_variance_groups_give_zero_and_no_nan():
    r = torch.tensor([3.0, 3.0, 3.0, 1.0, 2.0, 4.0])
    for std in ("group", "global"):
        for eps in (0.0, 1e-4):
            a = group_advantages(r, 3, std=std, eps=eps)
            assert torch.isfinite(a).all() and torch.equal(a[:3], torch.zeros(3))
    assert zero_variance_mask(r, 3).tolist() == [True] * 3 + [False] * 3


def test_per_objective_z_scores_and_loo_and_global():
    torch.manual_seed(0)
    r = torch.randn(12, 3)
    a = group_advantages(r, 4)
    for m in range(3):  # each column equals the single-objective computation
        assert torch.allclose(a[:, m], group_advantages(r[:, m], 4))
    loo = group_advantages(r[:, 0], 4, baseline="loo", std="none")
    g = r[:4, 0]
    assert loo[0] == pytest.approx(float(g[0] - g[1:].mean()), abs=1e-6)
    glob = group_advantages(r[:, 0], 4, std="global", eps=0.0)
    centred = r[:, 0] - r[:, 0].reshape(3, 4).mean(1).repeat_interleave(4)
    assert torch.allclose(glob, centred / r[:, 0].std(correction=0), atol=1e-5)
    assert group_advantages(r * 100, 4, clamp=5.0).abs().max() <= 5.0
    ids = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1, 2, 2, 2, 2])  # explicit (non-contiguous) group ids
    a_ids = group_advantages(r[:, 0], ids)
    assert torch.allclose(a_ids[[0, 2, 4, 6]], group_advantages(r[[0, 2, 4, 6], 0], 4))


@given(st.floats(-3, 3), st.floats(-0.5, 0.5), st.sampled_from([1e-4, 0.1, 0.2]))
def test_clipped_surrogate_gradient_zero_beyond_clip_on_the_advantage_side(adv, dlogp, clip):
    logp_old = torch.zeros(1)
    logp = torch.tensor([dlogp], requires_grad=True)
    loss, ratio = clipped_surrogate(logp, logp_old, torch.tensor([adv]), clip)
    loss.sum().backward()
    r = float(ratio.detach())
    assume(abs(r - (1 + clip)) > 1e-5 and abs(r - (1 - clip)) > 1e-5)  # float32 rounding right at the clip edge
    beyond = (adv > 0 and r > 1 + clip) or (adv < 0 and r < 1 - clip)
    if beyond:
        assert logp.grad.item() == 0.0
    else:  # inside the clip (or on the other side): the PPO gradient -A * ratio
        assert logp.grad.item() == pytest.approx(-adv * r, rel=1e-5, abs=1e-7)


def test_clipped_surrogate_with_per_step_advantages():
    lp = torch.zeros(2, 3)
    adv = torch.tensor([[1.0, 2.0, 0.0], [-1.0, 0.5, 3.0]])
    loss, ratio = clipped_surrogate(lp, lp, adv, 0.1)
    assert torch.equal(ratio, torch.ones(2, 3)) and torch.equal(loss, -adv)
    loss_b, _ = clipped_surrogate(lp, lp, torch.tensor([1.0, -1.0]), 0.1)   # (B,) broadcast over steps
    assert torch.equal(loss_b, torch.tensor([[-1.0] * 3, [1.0] * 3]))


@given(st.integers(0, 1000), st.floats(0.05, 2.0))
def test_same_std_kl_matches_torch_and_is_zero_iff_equal(seed, std):
    g = torch.Generator().manual_seed(seed)
    mu_p, mu_q = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    Normal = torch.distributions.Normal
    ref = torch.distributions.kl_divergence(Normal(mu_p, std), Normal(mu_q, std))
    assert torch.allclose(gaussian_kl_same_std(mu_p, mu_q, std), ref.mean(1), rtol=1e-4, atol=1e-6)
    assert torch.allclose(gaussian_kl_same_std(mu_p, mu_q, std, reduce="sum"), ref.sum(1), rtol=1e-4, atol=1e-5)
    assert bool((gaussian_kl_same_std(mu_p, mu_q, std) >= 0).all())
    assert torch.equal(gaussian_kl_same_std(mu_p, mu_p, std), torch.zeros(3))
    dt = torch.tensor([0.1, 0.2, 0.3])   # Flow-GRPO's convention: Delta times the true KL
    assert torch.allclose(gaussian_kl_same_std(mu_p, mu_q, std, dt=dt), ref.mean(1) * dt, rtol=1e-4, atol=1e-6)
