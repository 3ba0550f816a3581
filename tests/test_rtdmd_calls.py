"""RTDMD's network calls without redundancy: the batched / shared evaluations give the values and gradients of the
old sequence of calls (one no-grad rollout, |S| log-prob recomputations, the last step, the chain re-run, one
fake-score call per consistency sample), and the random stream is unchanged."""
import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import rtdmd
from common.config import parse_config
from common.dmd import batched_velocity, consistency_loss
from common.flow import rollout, transition_logprob


class CondNet(torch.nn.Module):
    """v(x, t | c) for a per-row condition c: a condition that is not tiled with x gives a shape error."""

    def __init__(self, d=3):
        super().__init__()
        self.lin = torch.nn.Linear(2 * d + 1, d)

    def forward(self, x, t, c):
        return torch.tanh(self.lin(torch.cat([x, c, t[:, None]], 1)))


def _fns(net, c):
    """(velocity function on c's rows, the same on c tiled n times for n B rows)."""
    B = c.shape[0]
    return (lambda x, t: net(x, t, c)), (lambda x, t: net(x, t, c.repeat(x.shape[0] // B, 1)))


@given(kernel=st.sampled_from(["cps", "ddpm"]), two_sample=st.booleans(), B=st.integers(1, 6),
       seed=st.integers(0, 10_000))
def test_consistency_batched_call_equals_separate_calls(kernel, two_sample, B, seed):
    torch.manual_seed(seed)
    net = CondNet()
    g = torch.Generator().manual_seed(seed)
    x_t, c = torch.randn(B, 3, generator=g), torch.randn(B, 3, generator=g)
    t = 0.3 + 0.6 * torch.rand(B, generator=g)
    t2 = (t - 0.2).clamp_min(0.0)
    one, tiled = _fns(net, c)
    calls = []
    counted = lambda x, s: calls.append(x.shape[0]) or tiled(x, s)
    out = {}
    for batched, fn in ((False, one), (True, counted)):
        net.zero_grad()
        gen = torch.Generator().manual_seed(seed + 1)
        L = consistency_loss(fn, x_t, t, one(x_t, t), t2, kernel, 0.9, gen, two_sample, batched=batched)
        L.backward()
        out[batched] = (L.detach(), [p.grad.clone() for p in net.parameters()], gen.get_state())
    (La, ga, sa), (Lb, gb, sb) = out[False], out[True]
    assert calls == [(2 if two_sample else 1) * B]          # one call on the concatenated hop samples
    assert torch.equal(sa, sb)                                # the same draws
    assert torch.allclose(La, Lb, rtol=1e-5, atol=1e-7)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(ga, gb))


def test_batched_velocity_splits_like_separate_calls():
    net = CondNet()
    g = torch.Generator().manual_seed(0)
    c = torch.randn(4, 3, generator=g)
    one, tiled = _fns(net, c)
    xs = [torch.randn(4, 3, generator=g) for _ in range(3)]
    sig = [torch.tensor(0.75), 0.5, torch.full((4,), 0.25)]          # scalar tensor, float, per-sample (B,)
    vs = batched_velocity(tiled, xs, sig)
    assert [v.shape for v in vs] == [x.shape for x in xs] and all(v.dtype == torch.float32 for v in vs)
    for x, s, v in zip(xs, sig, vs):
        assert torch.allclose(v, one(x, torch.as_tensor(s, dtype=torch.float32).expand(4)), atol=1e-6)


def test_tiled_velocity_fn_tiles_the_condition_and_rejects_other_row_counts():
    from common.backend import get_backend
    backend = get_backend("toy2d", seed=0)
    cond = backend.encode(backend.prompts()[:1] * 4)
    fn = backend.tiled_velocity_fn(backend.network, cond, 1.0)
    x, s = torch.randn(4, 2), torch.full((4,), 0.5)
    ref = backend.velocity(backend.network, x, s, cond, 1.0)
    assert torch.allclose(fn(torch.cat([x, x]), torch.cat([s, s])), torch.cat([ref, ref]), atol=1e-6)
    with pytest.raises(ValueError, match="rows for a condition of batch 4"):
        fn(torch.randn(6, 2), torch.full((6,), 0.5))


# ----- one stage-2 epoch: the new calls against the old sequence, end to end through rtdmd.main ----------------
def _old_rollout(vfn, x, sigmas, noises, S, eta, chain, generator, logprob, reduce):
    """The old code: the whole rollout without gradients."""
    with torch.no_grad():
        return rollout(vfn, x, sigmas, "cps", eta, noises=noises, generator=generator, logprob=logprob, reduce=reduce)


def _old_terms(vfn, tr, sigmas, S, eta, chain, logprob, reduce):
    """The old code: |S| recomputations and the last step, one call each, then (chain) the whole chain re-run."""
    K, B = len(sigmas) - 1, tr.states.shape[0]
    lps = [transition_logprob(vfn, tr.states[:, j], tr.states[:, j + 1], sigmas[j], sigmas[j + 1], "cps", eta,
                              logprob, reduce)[0] for j in S]
    z = tr.states[:, K - 1]
    x0_last = z - sigmas[K - 1] * vfn(z, sigmas[K - 1].expand(B))
    x0 = rollout(vfn, tr.states[:, 0], sigmas, "cps", eta, grad="all", noises=tr.noises).final if chain else x0_last
    return lps, x0_last, x0


def _old_consistency(*args, batched=False, **kw):
    return consistency_loss(*args, **kw)    # one call per hop sample


def _one_epoch(tmp_path, monkeypatch, argv, old: bool):
    """Stage 2 for 2 epochs on the toy: (logged losses, every clip_grad call's gradients (fake updates and generator
    updates, in order), student calls per epoch by grad mode, the generator's final weights)."""
    grads, calls = [], []
    clip = rtdmd.clip_grad

    def capture(params, max_norm):
        params = list(params)
        grads.append([p.grad.clone() for p in params if p.grad is not None])
        return clip(params, max_norm)

    get = rtdmd.get_backend

    def counted_backend(*a, **k):
        b = get(*a, **k)
        inner = b.velocity

        def velocity(net, x, *rest, **kw):
            if net is b.network:
                calls.append((torch.is_grad_enabled(), x.shape[0]))
            return inner(net, x, *rest, **kw)
        b.velocity = velocity
        return b

    monkeypatch.setattr(rtdmd, "clip_grad", capture)
    monkeypatch.setattr(rtdmd, "get_backend", counted_backend)
    if old:
        monkeypatch.setattr(rtdmd, "stage2_rollout", _old_rollout)
        monkeypatch.setattr(rtdmd, "stage2_terms", _old_terms)
        monkeypatch.setattr(rtdmd, "consistency_loss", _old_consistency)
    out = tmp_path / ("old" if old else "new")
    cfg = parse_config(rtdmd.Config, ["--out", str(out), "--stage", "2", "--epochs", "2", "--groups", "2",
                                      "--group-size", "4", "--fake-updates2", "2", "--eval-samples", "100", *argv],
                       presets=rtdmd.PRESETS)
    rtdmd.main(cfg)
    monkeypatch.undo()
    rows = [json.loads(ln) for ln in open(out / "metrics.jsonl")]
    return [r["loss"] for r in rows], grads, calls


@pytest.mark.parametrize("through", ["last", "all"])
@pytest.mark.parametrize("advantage", ["raw", "grpo"])
def test_stage2_epoch_equals_the_old_sequence_of_calls(tmp_path, monkeypatch, restore_torch_globals, through,
                                                       advantage):
    argv = ["--dmd-through", through, "--advantage", advantage]
    loss_new, g_new, calls_new = _one_epoch(tmp_path, monkeypatch, argv, old=False)
    loss_old, g_old, calls_old = _one_epoch(tmp_path, monkeypatch, argv, old=True)
    assert len(g_new) == len(g_old) == 2 * (2 + 1)       # per epoch: 2 fake updates, 1 generator update
    for a, b in zip(g_old, g_new):
        assert len(a) == len(b) and len(a) > 0
        for x, y in zip(a, b):   # float32 reordering in the batched GEMMs: seen <= 5e-7 of the largest entry
            assert float((x - y).abs().max()) <= 1e-5 * float(x.abs().max()) + 1e-9
    assert loss_new == pytest.approx(loss_old, rel=1e-5, abs=1e-9)
    # the student's calls in training (the evaluation's are the same in both, without gradients and 100 rows)
    B, K, S = 8, 4, 2
    train = lambda calls: [c for c in calls if c[1] != 100]
    n_new, n_old = train(calls_new), train(calls_old)
    if through == "all":   # K chain calls + one batched call for the |S| + 1 fixed-input evaluations
        assert n_new == 2 * ([(True, B)] * K + [(True, (S + 1) * B)])
        assert len(n_old) == 2 * (K + S + 1 + K)
    else:                  # the rollout's own calls: the trained steps and the last one with gradients
        assert sorted(n_new) == sorted(2 * ([(False, B)] * (K - S - 1) + [(True, B)] * (S + 1)))
        assert len(n_old) == 2 * (K + S + 1)
