"""rtdmd.py data parallel over 2 CPU processes (gloo, spawned inside pytest, as torchrun would start them).

One spawn runs the toy script twice on both ranks: a run through both stages with checkpoints, then a resume from
its stage-1 checkpoint. Checked: the ranks draw different samples (their own random streams) but end with the same
weights bit for bit (the gradients are averaged before every update), one run directory written by rank 0 only, and
the resumed 2-rank run logs what the uninterrupted one logged, with the same final weights (per-rank streams in the
checkpoint).
"""
from __future__ import annotations

import json
import os
import shutil
import socket

import torch
import torch.multiprocessing as mp

ARGV = ["--steps", "4", "--epochs", "2", "--fake-ratio", "2", "--batch", "16", "--groups", "2", "--group-size", "4",
        "--eval-samples", "200", "--device", "cpu", "--save-every", "3", "--keep", "0"]


def worker(rank: int, world: int, port: int, tmp: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), HF_HUB_OFFLINE="1")
    import rtdmd
    from common import dist
    from common.config import parse_config
    from common.runs import list_checkpoints
    built, fake_losses = [], []
    real_build, real_loss, real_cleanup = rtdmd.build_models, rtdmd.ambient_fake_loss, dist.cleanup
    rtdmd.build_models = lambda *a, **k: built.append(real_build(*a, **k)) or built[-1]
    rtdmd.ambient_fake_loss = lambda *a, **k: fake_losses.append(real_loss(*a, **k)) or fake_losses[-1]
    dist.cleanup = lambda: None            # one process group for both runs; left at the end of the worker

    def weights():
        return torch.cat([p.detach().flatten() for p in built[-1].gen_named.values()])

    out = {}
    a = os.path.join(tmp, "a")
    rtdmd.main(parse_config(rtdmd.Config, [*ARGV, "--out", a], presets=rtdmd.PRESETS))
    out["a"], out["first_fake_loss"] = weights(), fake_losses[0].detach()
    c = os.path.join(tmp, "c")
    if rank == 0:                          # the run as it stood after step 3 (stage 1), continued on 2 ranks
        shutil.copytree(a, c)
        for step, path in list_checkpoints(c):
            if step > 3:
                os.remove(path)
    dist.barrier()
    rtdmd.main(parse_config(rtdmd.Config, ["--resume", c], presets=rtdmd.PRESETS))
    out["c"] = weights()
    torch.save(out, os.path.join(tmp, f"rank{rank}.pt"))
    dist.barrier()
    real_cleanup()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rows(run: str) -> list[dict]:
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in ("time", "step_time", "peak_mem_mb")}
                for line in f]


def test_two_ranks_stay_equal_and_resume_exactly(tmp_path):
    mp.start_processes(worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, start_method="spawn", join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert not torch.equal(r0["first_fake_loss"], r1["first_fake_loss"])     # each rank its own samples
    assert torch.equal(r0["a"], r1["a"]) and torch.equal(r0["c"], r1["c"])    # averaged gradients: equal weights
    assert torch.equal(r0["a"], r0["c"])                                     # the resumed run ends where a did
    a, c = str(tmp_path / "a"), str(tmp_path / "c")
    assert sorted(os.listdir(a)) == ["checkpoints", "config.json", "metrics.jsonl", "samples.pt", "summary.json"]
    rows = _rows(a)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and [r["stage"] for r in rows] == [1] * 4 + [2] * 2
    assert _rows(c) == rows
