"""otca.py --reuse-rollout-graph: the rollout's own log-probability graphs replace the recomputation, bitwise; when it
applies; and the device-side statistics (host_sum, ratio_statistics) that replaced the per-step host syncs."""
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
from common.backend import get_backend  # noqa: E402
from common.config import parse_config  # noqa: E402
from common.flow import rollout, transition_logprob  # noqa: E402
from common.runs import load_checkpoint  # noqa: E402

pytestmark = pytest.mark.usefixtures("restore_torch_globals")   # otca.main sets one CPU thread

TIMING = {"time", "step_time", "peak_mem_mb"}


def _run(out, flags, monkeypatch, step_order=False):
    """One toy run; returns (metrics rows without timings, final checkpoint state, recomputation calls).
    step_order: the recomputation loops over the steps t = 0..K-2 with the rows not training t masked (the order of
    the reuse path) instead of over each row's trained steps by rank (tests/test_otca_ranks.py: equal to rounding)."""
    calls = []
    real = otca.transition_logprob
    monkeypatch.setattr(otca, "transition_logprob", lambda *a, **k: calls.append(1) or real(*a, **k))
    if step_order:
        monkeypatch.setattr(otca, "rank_steps", lambda tr: torch.arange(tr.shape[1] - 1).expand(tr.shape[0], -1))
    cfg = parse_config(otca.Config, argv=["--out", str(out), "--device", "cpu", *flags], presets=otca.PRESETS,
                       checks=[otca.checks])
    otca.main(cfg)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [{k: v for k, v in json.loads(ln).items() if k not in TIMING} for ln in f]
    return rows, load_checkpoint(str(out))["state"], len(calls)


def _equal_states(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal_states(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal_states(x, y) for x, y in zip(a, b))
    return torch.equal(a, b) if torch.is_tensor(a) else a == b


@pytest.mark.parametrize("flags", [
    ["--objectives", "moca", "--train-fraction", "0.6"],                                    # fused surrogate
    ["--objectives", "sum", "--train-fraction", "0.6", "--beta-kl", "0.1"],                 # clip-then-sum + KL
    ["--sde", "flow_grpo", "--beta-kl", "0.05", "--micro-batch", "4", "--credit", "uniform"],   # chunks of 4 and 2
], ids=["fused", "sum-kl", "flow_grpo-chunks-kl"])
def test_reuse_matches_recomputation_bitwise(tmp_path, monkeypatch, flags):
    """From the same seed, two training steps with the rollout's graphs and with recomputation: the same logged
    losses, KL, ratio statistics and gradient norms, the same optimizer state (AdamW's moments are functions of the
    gradients: after step 1, exp_avg = 0.1 g) and the same updated parameters, bitwise: each step's graph is the
    recomputation's, and the backwards run in the same order (at fraction 0.6 the recomputation in the step order of
    the reuse path; at fraction 1 the rank loop is that order). The reuse run never recomputes."""
    common = ["--steps", "2", "--nfe", "5", "--group-size", "3", "--prompts-per-step", "2", "--eval-samples", "0",
              "--debug", *flags]
    rows_r, state_r, calls_r = _run(tmp_path / "reuse", [*common, "--reuse-rollout-graph"], monkeypatch)
    rows_o, state_o, calls_o = _run(tmp_path / "recompute", [*common, "--no-reuse-rollout-graph"], monkeypatch,
                                    step_order="--train-fraction" in flags)
    assert calls_r == 0 and calls_o > 0
    assert rows_r == rows_o
    assert rows_r[0]["ratio_first_dev"] == 0.0
    assert ("kl" in rows_r[0]) == ("--beta-kl" in flags)
    assert _equal_states(state_r["opt"], state_o["opt"])
    assert _equal_states(state_r["net"], state_o["net"])


@pytest.mark.parametrize("kind,store_means", [("dance", False), ("flow_grpo", True)])
def test_rollout_step_graphs_are_the_rollout_and_the_recomputation(kind, store_means):
    """rollout_step_graphs records bitwise what one no-grad rollout records from the same noise, and each step's
    (log-prob, mean) graph gives bitwise the values and the parameter gradients of transition_logprob."""
    torch.manual_seed(0)
    backend = get_backend("toy2d", device=torch.device("cpu"))
    net, K, n = backend.network, 5, 6
    params = backend.trainable_parameters(net)
    sigmas = backend.sigmas(K)
    vf = backend.velocity_fn(net, backend.encode(backend.prompts("train")[:1]).repeat(n))
    z = backend.noise(n)
    torch.manual_seed(1)
    with torch.no_grad():
        ref = rollout(vf, z, sigmas, kind=kind, noise_level=0.5)
    torch.manual_seed(1)
    traj, graphs = otca.rollout_step_graphs(vf, z, sigmas, kind, 0.5, float(sigmas[1]), store_means=store_means)
    for name in ("states", "x0", "stds", "logprobs", "noises"):
        assert torch.equal(getattr(traj, name), getattr(ref, name)), name
        assert not getattr(traj, name).requires_grad
    assert len(graphs) == K - 1
    w = torch.linspace(0.5, 2.0, n)
    for t, (lp, mean) in enumerate(graphs):
        lp_re, mean_re, _ = transition_logprob(vf, ref.states[:, t], ref.states[:, t + 1], sigmas[t], sigmas[t + 1],
                                               kind, 0.5, sigma_max=float(sigmas[1]))
        assert torch.equal(lp.detach(), lp_re.detach())
        assert mean is None if not store_means else torch.equal(mean.detach(), mean_re.detach())
        g_reuse = torch.autograd.grad((w * lp).sum(), params)
        g_re = torch.autograd.grad((w * lp_re).sum(), params)
        assert all(torch.equal(a, b) for a, b in zip(g_reuse, g_re)), t


def test_reuse_applies_only_to_one_epoch_and_one_minibatch_and_per_preset():
    def cfg(*flags):
        return parse_config(otca.Config, argv=list(flags), presets=otca.PRESETS, checks=[otca.checks])
    assert otca.reuses_rollout_graph(cfg())                                      # toy2d preset: on
    assert otca.reuses_rollout_graph(cfg("--teacher", "dit"))
    assert not otca.reuses_rollout_graph(cfg("--no-reuse-rollout-graph"))
    assert not otca.reuses_rollout_graph(cfg("--inner-epochs", "2"))            # later passes are off-policy
    assert not otca.reuses_rollout_graph(cfg("--minibatches", "2"))
    for teacher in ("flux", "wan", "sd3", "flux2"):                              # memory: recompute step by step
        assert not otca.reuses_rollout_graph(cfg("--teacher", teacher))


@given(st.lists(st.tuples(st.floats(-1e3, 1e3, width=32), st.integers(1, 50)), min_size=1, max_size=20))
def test_host_sum_is_the_running_float_sum(pairs):
    """host_sum over device scalars = the old `total += float(v) / n` per term, exactly (one copy, same order)."""
    values = [torch.tensor(v) for v, _ in pairs]
    total = 0.0
    for v, d in zip(values, [d for _, d in pairs]):
        total += float(v) / d
    assert otca.host_sum(values, [d for _, d in pairs]) == total
    running = 0.0
    for v in values:
        running += float(v)
    assert otca.host_sum([torch.stack(values)]) == running     # one (n,) tensor: its elements in order


def test_ratio_statistics_over_trained_rows_only():
    """Per step: min / max / mean over the rows that trained it (masked rows ignored, None where no row did), each
    row counted at its own step (a rank record mixes steps); the clip fraction over every trained row; the
    on-policy deviation from the first inner step's records only."""
    T, F = True, False
    records = [(torch.tensor([0, 0, 0]), torch.tensor([1.0, 1.5, 0.5]), torch.tensor([T, T, F]), True),
               (torch.tensor([0, 0]), torch.tensor([0.9, 7.0]), torch.tensor([T, F]), False),
               (torch.tensor([2, 0]), torch.tensor([1.0, 9.0]), torch.tensor([T, F]), False),   # rows at steps 2, 0
               (torch.tensor([2]), torch.tensor([1.2]), torch.tensor([T]), False)]
    s = otca.ratio_statistics(records, K=4, clip=0.15)
    assert s["ratio_min"][1] is s["ratio_max"][1] is s["ratio_mean"][1] is None      # nobody trained step 1
    assert len(s["ratio_min"]) == 3                                                  # K - 1: never the last step
    assert (s["ratio_min"][0], s["ratio_max"][0]) == pytest.approx((0.9, 1.5))      # 0.5 and 7.0 are masked
    assert (s["ratio_min"][2], s["ratio_max"][2]) == pytest.approx((1.0, 1.2))
    assert s["ratio_mean"][0] == pytest.approx((1.0 + 1.5 + 0.9) / 3) and s["ratio_mean"][2] == pytest.approx(1.1)
    assert s["ratio_first_dev"] == pytest.approx(0.5)   # the first inner step's record only (0.9 is off-policy)
    assert s["clip_frac"] == pytest.approx(2 / 5)      # 1.5 and 1.2 lie outside [0.85, 1.15] of 5 trained rows
