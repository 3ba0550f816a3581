"""common/shaping.py (RATS maths) against closed forms and torch references (rats.md section 5)."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from common.flow import make_sigmas, rollout
from common.shaping import (GapNormalizer, match_horizons, rats_loss, reward_gate, shaping_distance,
                            shaping_loss)

taus = st.floats(0.01, 10.0)
# |gap / tau| <= 15 keeps float32's sigmoid strictly inside (0, 1) (it rounds to 1.0 beyond ~17).
ratios = st.floats(-15.0, 15.0)


def ref_sigmoid(z: float) -> float:
    """Independent scalar reference 1 / (1 + e^-z) in float64."""
    return 1.0 / (1.0 + math.exp(-z))


# ---------------------------------------------------------------------------------------------------- gate
@given(tau=taus, z=ratios, base=st.floats(-5, 5))
def test_gate_range_value_and_symmetry(tau, z, base):
    r_s = torch.tensor([base])
    r_t = r_s + z * tau
    w = reward_gate(r_t, r_s, tau=tau)
    assert 0.0 < float(w) < 1.0
    assert float(w) == pytest.approx(ref_sigmoid(float(r_t - r_s) / tau), abs=2e-6)
    w_flip = reward_gate(r_s, r_t, tau=tau)  # w(-d)
    assert float(w + w_flip) == pytest.approx(1.0, abs=2e-6)


@given(tau=taus, r=st.floats(-100, 100))
def test_gate_half_at_tie_exactly(tau, r):
    x = torch.tensor([r, r])
    assert torch.equal(reward_gate(x, x.clone(), tau=tau), torch.full((2,), 0.5))


@given(tau=taus, a=ratios, b=ratios)
def test_gate_monotone_in_gap(tau, a, b):
    lo, hi = sorted([a, b])
    zero = torch.zeros(1)
    w_lo = reward_gate(zero + lo * tau, zero, tau=tau)
    w_hi = reward_gate(zero + hi * tau, zero, tau=tau)
    assert float(w_lo) <= float(w_hi)
    # R_S rising lowers the gate (the student catching up relaxes the teacher).
    assert float(reward_gate(zero, zero + lo * tau, tau=tau)) >= float(reward_gate(zero, zero + hi * tau, tau=tau))


def test_gate_slope_is_w_one_minus_w_over_tau_and_bounded():
    # dw/dd = w (1 - w) / tau <= 1 / (4 tau), checked by central differences of the (detached) gate.
    tau, h = 0.3, 1e-3
    d = torch.linspace(-2, 2, 41, dtype=torch.float64)
    zero = torch.zeros_like(d)
    w = reward_gate(d, zero, tau=tau).double()
    fd = (reward_gate(d + h, zero, tau=tau).double() - reward_gate(d - h, zero, tau=tau).double()) / (2 * h)
    torch.testing.assert_close(fd, w * (1 - w) / tau, atol=2e-3, rtol=0)
    assert float(fd.max()) <= 1 / (4 * tau) + 1e-3


@given(tau=taus, z=ratios, c=st.floats(-10, 10), k=st.floats(0.1, 10))
def test_gate_invariances(tau, z, c, k):
    r_s, r_t = torch.tensor([0.3], dtype=torch.float64), torch.tensor([0.3 + z * tau], dtype=torch.float64)
    w = reward_gate(r_t, r_s, tau=tau)
    assert float(reward_gate(r_t + c, r_s + c, tau=tau)) == pytest.approx(float(w), abs=1e-5)
    # scaling both rewards by k equals replacing tau by tau / k; and dividing by scale equals tau * scale
    assert float(reward_gate(k * r_t, k * r_s, tau=tau * k)) == pytest.approx(float(w), abs=1e-5)
    assert float(reward_gate(r_t, r_s, tau=tau / k, scale=k)) == pytest.approx(float(w), abs=1e-5)


def test_gate_student_ahead_bound_and_temperature_limits():
    tau, eps = 0.05, 0.01
    d = torch.tensor([-tau * math.log((1 - eps) / eps)])
    assert float(reward_gate(d, torch.zeros(1), tau=tau)) <= eps + 1e-6
    gaps = torch.tensor([-0.3, -0.01, 0.0, 0.01, 0.3])
    zero = torch.zeros(5)
    torch.testing.assert_close(reward_gate(gaps, zero, tau=1e-6), torch.tensor([0, 0, 0.5, 1, 1.0]))
    torch.testing.assert_close(reward_gate(gaps, zero, tau=1e6), torch.full((5,), 0.5))


def test_gate_kinds_and_per_sample_permutation():
    r_t, r_s = torch.tensor([1.0, 0.0, 0.5, 0.2]), torch.tensor([0.0, 1.0, 0.5, 0.1])
    assert torch.equal(reward_gate(r_t, r_s, kind="none"), torch.ones(4))
    assert torch.equal(reward_gate(r_t, r_s, kind="off"), torch.zeros(4))
    assert torch.equal(reward_gate(r_t, r_s, kind="hard"), torch.tensor([1.0, 0.0, 0.0, 1.0]))
    perm = torch.tensor([2, 0, 3, 1])
    assert torch.equal(reward_gate(r_t[perm], r_s[perm]), reward_gate(r_t, r_s)[perm])
    with pytest.raises(ValueError):
        reward_gate(r_t, r_s, kind="soft")
    with pytest.raises(ValueError):
        reward_gate(r_t, r_s, tau=0.0)


def test_no_gradient_through_gate():
    # With the detach, dL/dR_S = -lambda_r / B exactly; the leaked term -alpha L w (1 - w) / tau would be large.
    r_s = torch.tensor([0.2, 0.4, 0.6], requires_grad=True)
    r_t = torch.tensor([0.4, 0.4, 0.4])
    w = reward_gate(r_t, r_s, tau=0.05)
    assert not w.requires_grad
    l_shape = torch.tensor([2.0, 3.0, 4.0])
    loss, _, _ = rats_loss(r_s, l_shape, w, lambda_r=1.5, alpha=1.0)
    loss.backward()
    torch.testing.assert_close(r_s.grad, torch.full((3,), -1.5 / 3))
    # rats_loss re-detaches: a gate built with gradients still leaks nothing.
    r_s2 = r_s.detach().clone().requires_grad_(True)
    w_leaky = torch.sigmoid((r_t - r_s2) / 0.05)
    loss2, _, _ = rats_loss(r_s2, l_shape, w_leaky, lambda_r=1.5)
    loss2.backward()
    torch.testing.assert_close(r_s2.grad, torch.full((3,), -1.5 / 3))


def test_gap_normalizer_tracks_std():
    g = torch.Generator().manual_seed(0)
    first = torch.randn(64, generator=g) * 0.2 + 0.05
    norm = GapNormalizer(beta=0.99)
    assert norm.std == 1.0  # before any data the gate sees the raw gap
    assert norm.update(first) == pytest.approx(float(first.std(correction=0)), rel=1e-4)
    for _ in range(400):
        norm.update(torch.randn(64, generator=g) * 0.2 + 0.05)
    assert norm.std == pytest.approx(0.2, rel=0.1)
    clone = GapNormalizer()
    clone.load_state_dict(norm.state_dict())
    assert clone.std == norm.std


# ---------------------------------------------------------------------------------------------------- matching
@given(K=st.integers(1, 12), N=st.integers(1, 60), shift=st.floats(1.0, 8.0))
def test_matching_map_non_decreasing_and_endpoints(K, N, shift):
    j = match_horizons(make_sigmas(N, shift), make_sigmas(K, shift))
    assert j.shape == (K + 1,)
    assert bool((j[1:] >= j[:-1]).all())
    assert int(j[0]) == 0 and int(j[-1]) == N
    # nearest: no teacher level is strictly closer than the chosen one (brute force over all j)
    sT, sS = make_sigmas(N, shift).double(), make_sigmas(K, shift).double()
    for k in range(K + 1):
        best = min(abs(float(sT[i] - sS[k])) for i in range(N + 1))
        assert abs(float(sT[j[k]] - sS[k])) == pytest.approx(best, abs=1e-12)


@given(K=st.integers(1, 10), m=st.integers(1, 6), shift=st.floats(1.0, 8.0))
def test_matching_map_exact_for_multiples(K, m, shift):
    N = K * m
    sT, sS = make_sigmas(N, shift), make_sigmas(K, shift)
    j = match_horizons(sT, sS)
    assert j.tolist() == [k * m for k in range(K + 1)]
    torch.testing.assert_close(sT[j], sS, atol=1e-6, rtol=0)


def test_matching_map_spec_vectors_shift3():
    sT = make_sigmas(50, 3.0)
    assert match_horizons(sT, make_sigmas(5, 3.0)).tolist() == [0, 10, 20, 30, 40, 50]
    assert match_horizons(sT, make_sigmas(3, 3.0)).tolist() == [0, 17, 33, 50]
    assert match_horizons(sT, make_sigmas(8, 3.0)).tolist() == [0, 6, 12, 19, 25, 31, 37, 44, 50]
    torch.testing.assert_close(sT[[17, 33]], torch.tensor([0.8534, 0.6071]), atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------------- distance
@given(seed=st.integers(0, 10_000), lc=st.floats(0, 3), lm=st.floats(0, 3), scale=st.floats(0.1, 10))
def test_shaping_distance_against_torch_reference(seed, lc, lm, scale):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(4, 3, 5, generator=g), torch.randn(4, 3, 5, generator=g)
    ref = lc * (1 - F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1)) + \
        lm * F.mse_loss(a, b, reduction="none").flatten(1).mean(1)
    d = shaping_distance(a, b, lc, lm)
    torch.testing.assert_close(d, ref, atol=1e-5, rtol=1e-5)
    assert bool((d >= -1e-6).all())
    cos_part = shaping_distance(a, b, 1.0, 0.0)
    assert bool((cos_part <= 2 + 1e-6).all())
    torch.testing.assert_close(shaping_distance(scale * a, b, 1.0, 0.0), cos_part, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shaping_distance(a, a.clone(), lc, lm), torch.zeros(4), atol=1e-6, rtol=0)


def test_shaping_distance_detaches_teacher_and_loss_per_horizon():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(2, 3, 4, generator=g, requires_grad=True)        # (B, K, n)
    t = torch.randn(2, 7, 4, generator=g, requires_grad=True)        # (B, N', n)
    index = torch.tensor([0, 3, 6])
    per_sample, per_h = shaping_loss(s, t, index)
    assert per_h.shape == (2, 3)
    for k, jk in enumerate(index.tolist()):
        torch.testing.assert_close(per_h[:, k], shaping_distance(s[:, k], t[:, jk]))
    torch.testing.assert_close(per_sample, per_h.mean(1))
    per_sample.sum().backward()
    assert t.grad is None and s.grad is not None
    # horizon subset and weights: (1/|H|) sum omega_k d_k
    ps2, ph2 = shaping_loss(s.detach(), t.detach(), index, horizons=torch.tensor([1, 2]),
                            weights=torch.tensor([1.0, 3.0]))
    torch.testing.assert_close(ps2, (per_h[:, 1] + 3 * per_h[:, 2]).detach() / 2)


# ---------------------------------------------------------------------------------------------------- loss
def test_loss_limits_and_complementary_mode():
    r_s = torch.tensor([0.1, 0.5, -0.2])
    l_sh = torch.tensor([0.3, 0.0, 1.2])
    one, zero, half = torch.ones(3), torch.zeros(3), torch.full((3,), 0.5)
    L1, _, _ = rats_loss(r_s, l_sh, one, lambda_r=2.0, alpha=0.7)
    assert float(L1) == pytest.approx(float((-2.0 * r_s + 0.7 * l_sh).mean()), abs=1e-6)
    L0, _, _ = rats_loss(r_s, l_sh, zero, lambda_r=2.0, alpha=0.7)
    assert float(L0) == pytest.approx(float((-2.0 * r_s).mean()), abs=1e-6)
    Lh, _, _ = rats_loss(r_s, l_sh, half, lambda_r=0.0, alpha=0.7)
    assert float(Lh) == pytest.approx(float((0.35 * l_sh).mean()), abs=1e-6)
    w = torch.tensor([0.2, 0.9, 0.5])
    Lc, rt, stm = rats_loss(r_s, l_sh, w, mode="complementary")
    torch.testing.assert_close(rt, -(1 - w) * r_s)
    torch.testing.assert_close(stm, w * l_sh)
    with pytest.raises(ValueError):
        rats_loss(r_s, l_sh, w, mode="both")


def test_point_mass_exact_velocity_gives_zero_shaping_for_every_K():
    # Data = point mass m: v(x, sigma) = (x - m) / sigma, straight paths, Euler lands on m for every K; so the
    # K-step and the 50-step x0-predictions agree at every matched horizon (rats.md property 18).
    m = torch.tensor([[1.5, -0.5, 2.0]])
    vel = lambda x, s: (x - m) / s[:, None]
    eps = torch.randn(3, 3, generator=torch.Generator().manual_seed(0))
    sT = make_sigmas(50, 3.0)
    tT = rollout(vel, eps, sT)
    for K in (1, 2, 3, 5, 8):
        sS = make_sigmas(K, 3.0)
        tS = rollout(vel, eps, sS)
        torch.testing.assert_close(tS.final, m.expand(3, 3), atol=1e-5, rtol=0)
        j = match_horizons(sT, sS)[:K]
        ps, _ = shaping_loss(tS.x0, tT.x0, j)
        torch.testing.assert_close(ps, torch.zeros(3), atol=1e-5, rtol=0)
