"""otca.py's recomputation at --train-fraction < 1 trains rank j of every row in one batched call (each row at its own
j-th trained step, Flow-GRPO's per-sample timestep subsets): n calls per chunk, B x n sample evaluations, and the
losses, gradients and updates of the old loop over steps t = 0..K-2 that forwarded whole chunks and masked the rows
not training t (float32 tolerance: the batches differ)."""
import json
import os
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import otca  # noqa: E402
from common.config import parse_config  # noqa: E402
from common.flow import make_sigmas, transition_logprob  # noqa: E402
from common.runs import load_checkpoint  # noqa: E402

pytestmark = pytest.mark.usefixtures("restore_torch_globals")   # otca.main sets one CPU thread

TIMING = {"time", "step_time", "peak_mem_mb"}


def old_step_order(trained: torch.Tensor) -> torch.Tensor:
    """rank_steps' stand-in for the old loop: pass p is step p for every row (B, K - 1), rows not training it masked
    (otca's loop then skips a chunk only where none of its rows trains p): the per-step masked recomputation."""
    return torch.arange(trained.shape[1] - 1).expand(trained.shape[0], -1)


def _run(out, flags, monkeypatch, old_loop=False):
    """One run: (metrics rows without timings, final state, per-optimizer-step gradients before clipping,
    recomputation calls as (rows, sigma), reference-step calls as rows, the trained masks)."""
    grads, calls, ref_calls, masks = [], [], [], []
    real_clip, real_tl, real_sde, real_mask = otca.clip_grad, otca.transition_logprob, otca.sde_step, otca.trained_mask

    def clip(params, max_norm):
        grads.append([p.grad.clone() for p in params])
        return real_clip(params, max_norm)

    def tl(vf, x, *a, **k):
        calls.append((x.shape[0], torch.as_tensor(a[1]).clone()))   # a = (x_next, sigma, ...)
        return real_tl(vf, x, *a, **k)

    def sde(x, *a, **k):   # otca calls sde_step only for the beta_kl reference (rollouts use common.flow's own)
        ref_calls.append(x.shape[0])
        return real_sde(x, *a, **k)

    def mask(*a, **k):
        masks.append(real_mask(*a, **k))
        return masks[-1]

    monkeypatch.setattr(otca, "clip_grad", clip)
    monkeypatch.setattr(otca, "transition_logprob", tl)
    monkeypatch.setattr(otca, "sde_step", sde)
    monkeypatch.setattr(otca, "trained_mask", mask)
    if old_loop:
        monkeypatch.setattr(otca, "rank_steps", old_step_order)
    cfg = parse_config(otca.Config, argv=["--out", str(out), "--device", "cpu", "--eval-samples", "0", *flags],
                       presets=otca.PRESETS, checks=[otca.checks])
    otca.main(cfg)
    monkeypatch.undo()
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [{k: v for k, v in json.loads(ln).items() if k not in TIMING} for ln in f]
    return rows, load_checkpoint(str(out))["state"], grads, calls, ref_calls, masks


def _close(a, b, rtol=1e-4, atol=1e-7):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], rtol, atol) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_close(x, y, rtol, atol) for x, y in zip(a, b))
    if torch.is_tensor(a):
        return torch.allclose(a.float(), b.float(), rtol=rtol, atol=atol)
    if isinstance(a, float):
        return a == pytest.approx(b, rel=rtol, abs=atol)
    return a == b


TOY = ["--steps", "2", "--nfe", "6", "--group-size", "3", "--prompts-per-step", "2", "--no-reuse-rollout-graph",
       "--train-fraction", "0.6", "--micro-batch", "4"]
# FLUX.1's tiny twin (LoRA; the beta_kl reference is the base with the adapter off), its preset's recomputation:
# n = round(0.6 x 3) = 2 of 3 steps, chunks of 2
FLUX = ["--teacher", "flux", "--tiny", "--steps", "2", "--reward", "hps,clip", "--nfe", "4", "--group-size", "4",
        "--prompts-per-step", "1", "--micro-batch", "2", "--precision", "fp32"]


@pytest.mark.parametrize("base,flags", [
    (TOY, ["--objectives", "moca"]),                                                                 # fused
    (TOY, ["--objectives", "sum", "--beta-kl", "0.1"]),                                              # sum + KL
    (TOY, ["--sde", "flow_grpo", "--beta-kl", "0.05", "--inner-epochs", "2", "--credit", "uniform"]),  # off-policy
    (FLUX, ["--beta-kl", "0.05"]),
], ids=["fused", "sum-kl", "flow_grpo-kl-2epochs", "flux-tiny-kl"])
def test_rank_loop_matches_the_masked_step_loop(tmp_path, monkeypatch, base, flags):
    """Recomputation at fraction 0.6 (toy: n = 3 of 5 steps, chunks of 4 and 2 rows): the rank loop and the old
    masked per-step loop log the same losses, KLs, gradient norms and ratio statistics, accumulate the same
    gradients and reach the same parameters and AdamW moments, to float32 rounding; the old loop forwards more."""
    new = _run(tmp_path / "ranks", [*base, *flags], monkeypatch)
    old = _run(tmp_path / "steps", [*base, *flags], monkeypatch, old_loop=True)
    assert all(torch.equal(a, b) for a, b in zip(new[5], old[5]))          # the same trained steps per sample
    for r_new, r_old in zip(new[0], old[0]):
        assert r_new.keys() == r_old.keys()
        for k in r_new:                     # losses are sums of near-cancelling terms: absolute tolerance too
            assert _close(r_new[k], r_old[k], rtol=1e-4, atol=1e-6), (k, r_new[k], r_old[k])
    assert ("kl" in new[0][0]) == ("--beta-kl" in flags)
    assert len(new[2]) == len(old[2]) == 2 * (2 if "--inner-epochs" in flags else 1)
    for g_new, g_old in zip(new[2], old[2]):   # (the masked loop's KL reference sees other batch sizes: rounding)
        assert _close(g_new, g_old, rtol=1e-4, atol=1e-7)
    # (Adam divides by the gradients' magnitude: the reference's rounding above moves a weight by up to ~5e-5 of it)
    assert _close(new[1]["net"], old[1]["net"], rtol=1e-4, atol=1e-7)
    assert _close(new[1]["opt"], old[1]["opt"], rtol=1e-4, atol=1e-9)
    assert sum(n for n, _ in new[3]) < sum(n for n, _ in old[3])            # the masked rows are gone
    # the KL reference evaluates only the rows that train a pass, in both loops (the masked loop's other rows
    # would be multiplied by 0): B n rows per inner epoch and step
    assert sum(new[4]) == sum(old[4]) == (sum(int(m.sum()) for m in new[5]) * (2 if "--inner-epochs" in flags else 1)
                                          if "--beta-kl" in flags else 0)


def test_rank_loop_calls_n_per_chunk_at_each_rows_own_sigma(tmp_path, monkeypatch):
    """fraction 0.6 of K - 1 = 5 steps: n = 3. B = 6 in chunks of 4 and 2, two inner epochs: per step exactly
    2 x 2 x 3 = 12 recomputation calls (and 12 reference calls) evaluating B x n = 18 samples per epoch; the call
    at (epoch, rank j, chunk) carries each row's sigma of its own j-th trained step."""
    rows, _, _, calls, ref_calls, masks = _run(tmp_path / "r", [*TOY, "--beta-kl", "0.1", "--inner-epochs", "2"],
                                               monkeypatch)
    sigmas = make_sigmas(6, shift=1.0)    # toy2d's grid (no shift)
    assert len(rows) == 2 and len(masks) == 2 and len(calls) == len(ref_calls) == 2 * 12
    assert sum(n for n, _ in calls) == sum(ref_calls) == 2 * 2 * 6 * 3
    expected = []
    for mask in masks:
        steps = otca.rank_steps(mask)
        assert steps.shape == (6, 3)
        for _epoch in range(2):
            for j in range(3):
                for sl in (slice(0, 4), slice(4, 6)):
                    expected.append(sigmas[steps[sl, j]])
    assert len(expected) == len(calls)
    for (n, sigma), want in zip(calls, expected):
        assert n == want.numel() and torch.equal(sigma, want)


@given(st.integers(1, 9), st.integers(2, 12), st.floats(0.05, 1.0), st.integers(0, 2**31 - 1))
def test_rank_steps_lists_each_rows_trained_steps_in_order(B, K, fraction, seed):
    """rank_steps(trained_mask(...)): (B, n) with n = max(1, round(f (K - 1))) (K - 1 at f = 1), each row's
    trained steps ascending, never the last step; at fraction 1 column j is step j for every row."""
    mask = otca.trained_mask(B, K, fraction, torch.Generator().manual_seed(seed))
    steps = otca.rank_steps(mask)
    n = K - 1 if fraction >= 1 else max(1, round(fraction * (K - 1)))
    assert steps.shape == (B, n)
    assert bool((steps[:, 1:] > steps[:, :-1]).all()) and int(steps.max()) < K - 1
    assert torch.equal(torch.zeros_like(mask).scatter_(1, steps, True), mask)
    if fraction >= 1:
        assert torch.equal(steps, torch.arange(K - 1).expand(B, -1))


def test_rank_steps_rejects_unequal_rows():
    with pytest.raises(ValueError, match="different numbers"):
        otca.rank_steps(torch.tensor([[True, True, False], [True, False, False]]))


@pytest.mark.parametrize("kind", ["dance", "flow_grpo"])
def test_transition_logprob_per_row_sigmas_equal_per_step_calls(kind):
    """One call with per-row (sigma, sigma') at different steps, row 0 at sigma = 1 (flow_grpo's sigma_max rule),
    equals per-step calls with scalar sigmas, bitwise (an elementwise velocity: no batch effects)."""
    torch.manual_seed(0)
    sig = make_sigmas(6, shift=3.0)
    t = torch.tensor([0, 3, 1, 4, 0])
    x, x_next = torch.randn(5, 2, 3), torch.randn(5, 2, 3)
    vf = lambda z, s: torch.sin(z) * (1 + s.reshape(-1, 1, 1))    # noqa: E731
    lp, mean, std = transition_logprob(vf, x, x_next, sig[t], sig[t + 1], kind, 0.7, sigma_max=float(sig[1]))
    assert bool(torch.isfinite(lp).all()) and bool((std > 0).all())
    for i in range(5):
        lp_i, mean_i, std_i = transition_logprob(vf, x[i:i + 1], x_next[i:i + 1], sig[t[i]], sig[t[i] + 1], kind,
                                                 0.7, sigma_max=float(sig[1]))
        assert torch.equal(lp[i:i + 1], lp_i) and torch.equal(mean[i:i + 1], mean_i)
        assert torch.equal(std[i:i + 1].reshape(-1), std_i.reshape(-1))
