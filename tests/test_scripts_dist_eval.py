"""Evaluations of rats.py and otca.py over 2 CPU processes (gloo, spawned inside pytest, as torchrun would start them).

otca.py: each rank samples every other row of the held-out set; the rewards come back in the set's order (they came
in rank order: rank 0's rows, then rank 1's) and the final evaluation's samples.pt holds every rank's samples in the
set's order (it held rank 0's half): both equal a one-process evaluation of the same checkpoint, row for row. The set
has an odd size, so the ranks' shares differ.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

RATS = ["--steps", "1", "--batch-size", "8", "--teacher-nfe", "4", "--eval-size", "16", "--keep", "0"]
OTCA = ["--steps", "2", "--nfe", "4", "--prompts-per-step", "2", "--eval-samples", "63", "--keep", "0"]


def _parse(mod, argv):
    from common.config import parse_config
    return parse_config(mod.Config, argv, presets=mod.PRESETS, checks=[mod.checks])


def _otca_trained(run: str):
    """(cfg, backend with the checkpoint of `run` loaded, reward, the held-out set its evaluations use, sigmas)."""
    import otca
    from common.backend import get_backend
    from common.evaluate import held_out
    from common.rewards import build_reward
    from common.runs import load_checkpoint
    from common.train import load_trained, trained_tensors
    cfg = _parse(otca, [*OTCA, "--device", "cpu"])
    backend = get_backend(cfg.teacher, device=torch.device("cpu"))
    load_trained(trained_tensors(backend.network), load_checkpoint(run)["state"]["net"], run)
    held = held_out(backend, n_per_prompt=cfg.eval_samples // len(backend.prompts("eval")), seed=10_000 + cfg.seed)
    return cfg, backend, build_reward(cfg.reward), held, backend.sigmas(cfg.nfe, shift=cfg.shift)


def otca_eval_rewards(run: str) -> torch.Tensor:
    """The rewards otca.evaluate averages (common.evaluate.held_out_rewards, as otca calls it) of the checkpoint in
    `run` on its held-out set (on every rank under torchrun)."""
    from common.evaluate import held_out_rewards
    from common.train import autocast
    cfg, backend, reward, held, sigmas = _otca_trained(run)
    return held_out_rewards(backend, backend.network, reward, held[1], held[2], sigmas,
                            batch_size=cfg.micro_batch or None,
                            context=lambda: autocast(cfg.precision, backend.device))[0]


def worker(rank: int, world: int, port: int, tmp: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), HF_HUB_OFFLINE="1")
    import otca
    import rats
    from common import dist
    real_cleanup, cleanups = dist.cleanup, []
    dist.cleanup = lambda: cleanups.append(1)   # counted; one process group for every run, left at the end
    out: dict = {}
    run = os.path.join(tmp, "otca")
    out["otca_summary"] = otca.main(_parse(otca, [*OTCA, "--device", "cpu", "--out", run]))
    out["otca_rewards"] = otca_eval_rewards(run)
    rats_run = os.path.join(tmp, "rats")
    rats.main(_parse(rats, [*RATS, "--device", "cpu", "--out", rats_run]))
    out["cleanups_training"] = len(cleanups)
    for name, mod, argv in [("rats", rats, ["--ckpt", rats_run, "--eval-size", "16"]),
                            ("otca", otca, ["--ckpt", run, "--eval-samples", "15", "--eval-nfe", "2,3"])]:
        stdout, before = io.StringIO(), len(cleanups)
        with contextlib.redirect_stdout(stdout):
            out[f"{name}_eval_only"] = mod.main(_parse(mod, ["--eval-only", *argv, "--device", "cpu"]))
        out[f"{name}_eval_only_stdout"] = stdout.getvalue()
        out[f"{name}_eval_only_cleanups"] = len(cleanups) - before
    torch.save(out, os.path.join(tmp, f"rank{rank}.pt"))
    dist.barrier()
    real_cleanup()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.usefixtures("restore_torch_globals")   # the one-process references below run the scripts here
def test_two_rank_evaluations_are_one_process_evaluations(tmp_path):
    mp.start_processes(worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, start_method="spawn", join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    import otca
    run = str(tmp_path / "otca")
    # the rewards of every row in the set's order, on both ranks, as one process finds them
    one = otca_eval_rewards(run)
    assert one.shape == (63, 2)
    torch.testing.assert_close(r0["otca_rewards"], one, rtol=1e-5, atol=1e-6)
    assert torch.equal(r0["otca_rewards"], r1["otca_rewards"])
    assert r0["otca_summary"]["rewards"] == r1["otca_summary"]["rewards"]
    # samples.pt of the 2-rank run: all 63 samples in the set's order, those of one process evaluating the checkpoint
    two = torch.load(os.path.join(run, "samples.pt"), weights_only=False)["samples"]
    ref = tmp_path / "one"
    ref.mkdir()
    cfg, backend, reward, held, sigmas = _otca_trained(run)
    rewards = otca.evaluate(backend, backend.network, reward, held, sigmas, cfg.micro_batch, cfg.precision,
                            backend.device, str(ref))
    assert rewards == pytest.approx(r0["otca_summary"]["rewards"], rel=1e-5, abs=1e-7)
    one_samples = torch.load(ref / "samples.pt", weights_only=False)["samples"]
    assert two.shape == one_samples.shape == (63, 2)
    torch.testing.assert_close(two, one_samples, rtol=1e-5, atol=1e-6)

    # --eval-only: the group left once on every rank (as after training: once per run), rank 0 alone prints
    for r in (r0, r1):
        assert r["cleanups_training"] == 2 and r["rats_eval_only_cleanups"] == r["otca_eval_only_cleanups"] == 1
    assert r0["rats_eval_only"] == r1["rats_eval_only"] and r0["otca_eval_only"] == r1["otca_eval_only"]
    assert json.loads(r0["rats_eval_only_stdout"]) == r0["rats_eval_only"] and r1["rats_eval_only_stdout"] == ""
    assert "| otca | 3 |" in r0["otca_eval_only_stdout"] and r1["otca_eval_only_stdout"] == ""
