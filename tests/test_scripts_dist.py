"""The three scripts data parallel over 2 CPU processes (gloo, spawned inside pytest, as torchrun would start them).

One spawn runs, for each of rats.py, otca.py and rtdmd.py on the toy, a run with checkpoints and then a resume from
one of its middle checkpoints. Checked: both ranks end with the same weights bit for bit (the gradients are averaged
before every update), rtdmd's ranks draw different samples (their own random streams), one run directory written by
rank 0 only, and the resumed 2-rank run logs what the uninterrupted one logged and ends with the same weights (every
rank's random streams are in the checkpoint). rtdmd runs its paper mode (--advantage grpo): each rank's advantages are
its rows of the one computation over both ranks' rewards. Evaluations are sharded: each rank samples half of every
evaluation set, and rats.py's and rtdmd.py's numbers on 2 ranks (the final evaluation; rtdmd's toy evaluations and its
--eval-only table) are those of one process on the same checkpoint, on both ranks.
"""
from __future__ import annotations

import json
import os
import shutil
import socket

import pytest
import torch
import torch.multiprocessing as mp

CASES = {   # script: (flags, the checkpoint step the resume starts from)
    "rats": (["--steps", "4", "--eval-size", "64", "--save-every", "2"], 2),
    "otca": (["--steps", "4", "--eval-samples", "0", "--nfe", "5", "--train-fraction", "0.5", "--prompts-per-step",
              "2", "--save-every", "2"], 2),
    "rtdmd": (["--steps", "4", "--epochs", "2", "--fake-ratio", "2", "--batch", "16", "--groups", "2",
               "--group-size", "4", "--eval-samples", "200", "--save-every", "3", "--advantage", "grpo"], 3),
}
RTDMD_B = 8     # rtdmd's stage-2 samples per rank: --groups x --group-size


class _RewardSpy:
    """A reward that records its outputs on rtdmd's stage-2 rollouts (B rows, no graph: not back-prop, not eval)."""

    def __init__(self, reward, seen: list):
        self._reward, self._seen = reward, seen

    def __getattr__(self, name):
        return getattr(self._reward, name)

    def __call__(self, *a, **k):
        out = self._reward(*a, **k)
        if out.shape[0] == RTDMD_B and not out.requires_grad:
            self._seen.append(out.detach().clone())
        return out


def run_case(name: str, flags: list[str], cut: int, rank: int, tmp: str, out: dict) -> None:
    """One script on this rank: a run with checkpoints, then (rank 0 copies it at step `cut`) a resume."""
    import importlib

    from common import dist
    from common.config import parse_config
    from common.runs import list_checkpoints
    mod = importlib.import_module(name)
    backends, fake_losses = [], []
    real_get = mod.get_backend
    mod.get_backend = lambda *a, **k: backends.append(real_get(*a, **k)) or backends[-1]
    if name == "rtdmd":
        real_loss = mod.ambient_fake_loss
        mod.ambient_fake_loss = lambda *a, **k: fake_losses.append(real_loss(*a, **k)) or fake_losses[-1]
        # this rank's rollout rewards and the advantages its policy gradient used, per epoch (run a only)
        rewards, advantages = [], []
        real_reward, real_surrogate = mod.build_reward, mod.clipped_surrogate
        mod.build_reward = lambda *a, **k: _RewardSpy(real_reward(*a, **k), rewards)
        mod.clipped_surrogate = lambda lp, old, A, *a: advantages.append(A.detach()) or real_surrogate(lp, old, A, *a)
        import common.evaluate as evaluate   # the rows of every evaluation rollout on this rank
        real_rollout, eval_rows = evaluate.rollout, []
        evaluate.rollout = lambda vf, x, *a, **k: eval_rows.append(x.shape[0]) or real_rollout(vf, x, *a, **k)

    def weights():
        return torch.cat([p.detach().flatten() for p in backends[-1].network.parameters() if p.requires_grad])

    def parse(argv):
        return parse_config(mod.Config, argv, presets=mod.PRESETS, checks=[getattr(mod, "checks", lambda c: None)])
    a, c = os.path.join(tmp, name, "a"), os.path.join(tmp, name, "c")
    summary = mod.main(parse([*flags, "--keep", "0", "--device", "cpu", "--out", a]))
    out[f"{name}_a"] = weights()
    if name == "rats":                     # every rank evaluates (its share), so every rank has the final numbers
        out["rats_reward_student"] = torch.tensor(summary.get("reward_student", float("nan")))
    if name == "rtdmd":                    # the same in rtdmd (its toy evaluations before, after stage 1, at the end)
        out["rtdmd_summary"] = {k: v for k, v in summary.items() if isinstance(v, float)}
    if fake_losses:
        out[f"{name}_first_fake_loss"] = fake_losses[0].detach()
        out[f"{name}_rewards"], out[f"{name}_adv"] = torch.stack(rewards), torch.stack(advantages[::2])  # |S| = 2
        mod.build_reward, mod.clipped_surrogate = real_reward, real_surrogate
    if rank == 0:                          # the run as it stood at step `cut`, continued on 2 ranks
        shutil.copytree(a, c)
        for step, path in list_checkpoints(c):
            if step > cut:
                os.remove(path)
    dist.barrier()
    mod.main(parse(["--resume", c]))
    out[f"{name}_c"] = weights()
    if name == "rtdmd":                    # --eval-only on 2 ranks: each samples its share of every model's set
        out["rtdmd_eval_rows"] = mod.main(parse(["--eval-only", "--ckpt", a, "--eval-nfe", "4", "--device", "cpu"]))[
            "rows"]
        out["rtdmd_eval_batches"] = sorted(set(eval_rows))
        evaluate.rollout = real_rollout
    mod.get_backend = real_get


def worker(rank: int, world: int, port: int, tmp: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), HF_HUB_OFFLINE="1")
    from common import dist
    real_cleanup = dist.cleanup
    dist.cleanup = lambda: None            # one process group for every run; left at the end of the worker
    out: dict = {}
    for name, (flags, cut) in CASES.items():
        run_case(name, flags, cut, rank, tmp, out)
    out["sharded_cps"] = dist.gather_strided(_cps_samples(shard=True), 11)
    torch.save(out, os.path.join(tmp, f"rank{rank}.pt"))
    dist.barrier()
    real_cleanup()


def _cps_samples(shard: bool) -> torch.Tensor:
    """common.evaluate.sample_final of 11 toy points, stochastic CPS steps from one generator, in chunks of 4."""
    from common.backend import get_backend
    from common.evaluate import sample_final
    backend = get_backend("toy2d", device=torch.device("cpu"))
    noise = torch.randn(11, 2, generator=torch.Generator().manual_seed(3))
    cond = backend.encode(backend.prompts()[:1]).repeat(11)
    return sample_final(backend, backend.network, cond, noise, backend.sigmas(4), "cps", 0.9, 1.0,
                        torch.Generator().manual_seed(7), batch_size=4, shard=shard)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rows(run) -> list[dict]:
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in ("time", "step_time", "peak_mem_mb")}
                for line in f]


@pytest.mark.usefixtures("restore_torch_globals")   # the one-process evaluation below runs rats.main in this process
def test_two_ranks_stay_equal_and_resume_exactly(tmp_path):
    mp.start_processes(worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, start_method="spawn", join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert not torch.equal(r0["rtdmd_first_fake_loss"], r1["rtdmd_first_fake_loss"])   # each rank its own draws
    for name in CASES:
        assert torch.equal(r0[f"{name}_a"], r1[f"{name}_a"]), name      # averaged gradients: equal weights
        assert torch.equal(r0[f"{name}_c"], r1[f"{name}_c"]), name
        assert torch.equal(r0[f"{name}_a"], r0[f"{name}_c"]), name      # the resumed run ends where a did
        a, c = tmp_path / name / "a", tmp_path / name / "c"
        assert not [f for f in os.listdir(a) if f.startswith("previous-")], name   # one writer: rank 0
        rows = _rows(a)
        assert [r["step"] for r in rows] == list(range(1, len(rows) + 1)) and len(rows) >= 4, name
        assert _rows(c) == rows, name
    assert [r["stage"] for r in _rows(tmp_path / "rtdmd" / "a")] == [1] * 4 + [2] * 2
    # rtdmd --advantage grpo: the group means, the global std and the re-standardisation run over both ranks'
    # samples (spec 3.3, as one process with both ranks' groups); each rank's policy gradient gets its own rows.
    # Each rank standardising its own rewards (the old code) gives other advantages.
    from common.dmd import per_reward_advantages
    assert r0["rtdmd_rewards"].shape == (2, RTDMD_B, 1) and r0["rtdmd_adv"].shape == (2, RTDMD_B)
    for e in range(2):
        both = per_reward_advantages(torch.cat([r0["rtdmd_rewards"][e], r1["rtdmd_rewards"][e]]), 4)
        torch.testing.assert_close(torch.cat([r0["rtdmd_adv"][e], r1["rtdmd_adv"][e]]), both)
        per_rank = torch.cat([per_reward_advantages(r["rtdmd_rewards"][e], 4) for r in (r0, r1)])
        assert not torch.allclose(per_rank, both)

    # rats.py evaluates on every rank, each its share of the eval set, the rewards gathered (before, rank 0 sampled
    # the whole set while the other ranks waited in a collective): the 2-rank summary is the set's, as one process
    # evaluating the same checkpoint finds it
    assert torch.equal(r0["rats_reward_student"], r1["rats_reward_student"])
    import rats
    from common.config import parse_config
    with open(tmp_path / "rats" / "a" / "summary.json") as f:
        two = json.load(f)
    one = rats.main(parse_config(rats.Config, ["--eval-only", "--ckpt", str(tmp_path / "rats" / "a"), "--eval-size",
                                               "64", "--device", "cpu"], presets=rats.PRESETS))
    for key in ("reward_student", "dist_to_teacher", "kl_student_teacher", "mmd_student_teacher", "spread"):
        assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-7), key

    # rtdmd.py too: its toy evaluations and --eval-only sample a share of the set on each rank and gather the samples
    # before the KL histograms (before, every rank sampled the whole set): both ranks report the numbers one process
    # finds on the same generator (the run's final gen_ema; the untouched base for *_init)
    assert r0["rtdmd_summary"] == r1["rtdmd_summary"] and r0["rtdmd_eval_rows"] == r1["rtdmd_eval_rows"]
    # each rank sampled half of every set: 200 toy-evaluation samples (--eval-samples), 4000 per --eval-only model
    assert r0["rtdmd_eval_batches"] == r1["rtdmd_eval_batches"] == [100, 2000]
    _compare_rtdmd_with_one_process(tmp_path / "rtdmd" / "a", r0["rtdmd_summary"], r0["rtdmd_eval_rows"])
    # sample_final(shard=True) with several chunks: each stochastic step draws the chunk's noise as one process does
    torch.testing.assert_close(r0["sharded_cps"], _cps_samples(shard=False), rtol=1e-5, atol=1e-6)
    assert torch.equal(r0["sharded_cps"], r1["sharded_cps"])


def _compare_rtdmd_with_one_process(run, two: dict, two_rows: list[dict]) -> None:
    import rtdmd
    from common.backend import get_backend
    from common.config import parse_config
    from common.rewards import build_reward
    from common.runs import load_checkpoint
    from common.train import load_trained, trained_tensors
    cfg = parse_config(rtdmd.Config, [*CASES["rtdmd"][0], "--device", "cpu"], presets=rtdmd.PRESETS)
    backend = get_backend("toy2d", seed=cfg.seed, device=torch.device("cpu"), teacher=cfg.toy_teacher)
    reward = build_reward(cfg.reward, device=backend.device)
    tilt = backend.target(0).tilt(reward.rewards[0], cfg.beta)
    sigmas = backend.sigmas(len(cfg.timesteps), timesteps=cfg.timesteps)
    init = rtdmd.toy_eval(backend, backend.network, sigmas, reward, cfg, tilt)
    load_trained(trained_tensors(backend.network), load_checkpoint(str(run))["state"]["gen_ema"], "gen_ema")
    final = rtdmd.toy_eval(backend, backend.network, sigmas, reward, cfg, tilt)
    assert len(init) == 9 and len(final) == 9         # reward, kl_hist_* and kl_euler_* (+ se) to teacher and tilt
    for k in init:
        assert two[f"{k}_init"] == pytest.approx(init[k], rel=1e-5, abs=1e-7), k
        assert two[f"{k}_stage2"] == pytest.approx(final[k], rel=1e-5, abs=1e-7), k
    one = rtdmd.main(parse_config(rtdmd.Config, ["--eval-only", "--ckpt", str(run), "--eval-nfe", "4", "--device",
                                                 "cpu"], presets=rtdmd.PRESETS))["rows"]
    assert [r["model"] for r in one] == [r["model"] for r in two_rows] == [
        "teacher (N=50, Euler)", "base generator (K=4)", "RTDMD (K=4)"]
    for a, b in zip(two_rows, one):
        assert set(a) == set(b) and "kl_tilted" in a
        for k in a:
            assert a[k] == (b[k] if isinstance(b[k], str) else pytest.approx(b[k], rel=1e-5, abs=1e-7)), k
