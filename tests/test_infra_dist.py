"""Two processes with gloo on CPU give the same result as one process with the same global batch (common/dist.py).

One spawn of 2 workers checks, in order: DDP training, FSDP2 training and its full state dict, GRPO rewards
gathered across ranks (a group split between the ranks) then normalised, uneven gathers, gradient averaging, the
rank-0-only checkpoint with every rank's RNG state and the per-rank exact resume, and the NaN stop that every rank
agrees on. The parent computes the single-process references and compares.
"""
from __future__ import annotations

import os
import socket

import torch
import torch.multiprocessing as mp
from torch import nn

from common import dist
from common.rl import group_advantages
from common.train import clip_grad, make_optimizer

GLOBAL_B, STEPS, G = 8, 3, 4


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Sequential(nn.Linear(3, 16), nn.Tanh()), nn.Sequential(nn.Linear(16, 16), nn.Tanh()),
                         nn.Linear(16, 2))


def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(GLOBAL_B, 3, generator=g), torch.randn(GLOBAL_B, 2, generator=g)
    rewards = torch.randn(12, generator=g)  # 3 groups of G = 4; rows 4..7 (group 1) straddle the two ranks
    return x, y, rewards


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, opt=None, steps: int = STEPS) -> tuple:
    """The loss is the mean over the LOCAL batch: DDP's gradient average over equal shares is the global mean.
    The clip (0.5) is active, so the grad norm must also be the global one. Returns (optimizer, grad norms)."""
    opt = opt or make_optimizer(model, lr=0.05, weight_decay=0.1)
    norms = []
    for _ in range(steps):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        norms.append(float(clip_grad(model, 0.5)))
        opt.step()
    return opt, torch.tensor(norms)


def worker(rank: int, world: int, port: int, tmp: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    r, w, device = dist.init_distributed("cpu")
    assert (r, w, device.type) == (rank, world, "cpu") and dist.is_main() == (rank == 0)
    x, y, rewards = data()
    share = GLOBAL_B // world
    xs, ys = x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]
    out: dict = {}

    ddp = dist.wrap_ddp(make_model(), device)
    _, out["ddp_norms"] = train(ddp, xs, ys)
    out["ddp"] = {k: v.clone() for k, v in dist.unwrap(ddp).state_dict().items()}

    net = make_model()
    fsdp = dist.wrap_fsdp2(net, [net[0], net[1]])
    opt, out["fsdp_norms"] = train(fsdp, xs, ys)
    out["fsdp"] = dist.full_state_dict(fsdp)  # full on rank 0, {} elsewhere
    # FSDP2 resume: full (model, optimizer) dicts saved by rank 0, loaded by every rank into a fresh sharded model
    msd, osd = dist.full_state_dict(fsdp, opt)
    path = os.path.join(tmp, "fsdp.pt")
    if rank == 0:
        torch.save({"m": msd, "o": osd}, path)
    dist.barrier()
    saved = torch.load(path, weights_only=True)
    fresh = make_model()
    torch.nn.init.zeros_(fresh[2].weight)  # make sure the weights really come from the file
    fresh = dist.wrap_fsdp2(fresh, (nn.Sequential,))  # blocks given by class this time
    fresh_opt = make_optimizer(fresh, lr=0.05, weight_decay=0.1)
    dist.load_full_state_dict(fresh, saved["m"], fresh_opt, saved["o"])
    train(fsdp, xs, ys, opt, steps=2)
    train(fresh, xs, ys, fresh_opt, steps=2)
    out["fsdp_cont"], out["fsdp_resumed"] = dist.full_state_dict(fsdp), dist.full_state_dict(fresh)

    n_local = rewards.numel() // world
    local = rewards[rank * n_local:(rank + 1) * n_local]
    gathered = dist.all_gather_cat(local)
    out["adv_local"] = dist.local_rows(group_advantages(gathered, G), n_local)
    uneven = rewards[:5] if rank == 0 else rewards[5:]  # 5 rows on rank 0, 7 on rank 1
    out["uneven"] = dist.all_gather_cat(uneven)
    out["mean"] = dist.reduce_mean(float(rank))
    out["this_ranks"] = [dist.this_ranks(["r0", "r1"]), dist.this_ranks(["only"])]
    # an eval set of 7 rows shared 4 / 3 by striding, each rank's results back in the set's order on every rank
    rows = dist.strided_rows(7)
    out["strided"] = (rows, dist.gather_strided(rewards[:7][rows] * 2, 7))
    # average_gradients: the mean over ranks of every gradient, across dtypes, a missing one counting as zeros
    ps = [torch.zeros(2, 3, requires_grad=True), torch.zeros(4, dtype=torch.float64, requires_grad=True),
          torch.zeros(5, requires_grad=True)]
    ps[0].grad = torch.arange(6.0).reshape(2, 3) * (rank + 1)
    ps[1].grad = torch.full((4,), 10.0 ** rank, dtype=torch.float64)
    ps[2].grad = torch.ones(5) if rank == 0 else None
    dist.average_gradients(ps)
    out["avg"] = [p.grad for p in ps]
    # in buckets of at most 4 elements: (2, 3) alone and in place, (2,) + (1,) + (1,) flat, a transposed (3, 2) alone
    # but not contiguous (through a copy), (5,) alone; every one the mean over ranks all the same
    shapes = [(2, 3), (2,), (1,), (1,), (3, 2), (5,)]
    bs = [torch.zeros(s, requires_grad=True) for s in shapes]
    for i, b in enumerate(bs):
        b.grad = torch.arange(float(b.numel())).reshape(b.shape) * (rank + 1) + i
    bs[4].grad = bs[4].grad.t().contiguous().t()
    dist.average_gradients(bs, bucket_numel=4)
    out["avg_buckets"] = [b.grad for b in bs]

    # checkpoint: all ranks call save, rank 0 writes, each rank's RNG comes back on resume
    from common.runs import Run, list_checkpoints
    from tests._infra_script import Config
    run_dir = os.path.join(tmp, "run")
    torch.manual_seed(100 + rank)
    run = Run(Config(out=run_dir, steps=1), "dist")
    run.save(1, {"w": torch.ones(2)})
    after_save = torch.rand(3)
    resumed = Run(Config(out=run_dir, resume=run_dir, steps=1), "dist")
    state = resumed.resume()
    out["resume_rng_equal"] = bool(torch.equal(torch.rand(3), after_save)) and torch.equal(state["w"], torch.ones(2))
    out["ckpts"] = [s for s, _ in list_checkpoints(run_dir)]
    out["rng_ranks"] = len(torch.load(list_checkpoints(run_dir)[-1][1], weights_only=True)["rng"])
    out["draw"] = after_save
    # a NaN on rank 1 only: both ranks must stop with status 3 (no rank left waiting in a collective)
    try:
        run.check_finite(loss=torch.tensor(float("nan") if rank == 1 else 1.0))
        out["nan_exit"] = 0
    except SystemExit as e:
        out["nan_exit"] = e.code
    torch.save(out, os.path.join(tmp, f"rank{rank}.pt"))
    dist.barrier()
    dist.cleanup()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_match_one_process(tmp_path):
    mp.start_processes(worker, args=(2, free_port(), str(tmp_path)), nprocs=2, start_method="spawn", join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    x, y, rewards = data()

    ref = make_model()
    ref_opt, ref_norms = train(ref, x, y)  # one process, the whole global batch
    ref_sd = {k: v.clone() for k, v in ref.state_dict().items()}
    for r in range(2):
        assert all(torch.allclose(res[r]["ddp"][k], ref_sd[k], atol=1e-6) for k in ref_sd)
        assert torch.allclose(res[r]["ddp_norms"], ref_norms, atol=1e-5)
        assert torch.allclose(res[r]["fsdp_norms"], ref_norms, atol=1e-5)
    assert set(res[0]["fsdp"]) == set(ref_sd) and res[1]["fsdp"] == {}
    assert all(torch.allclose(res[0]["fsdp"][k], ref_sd[k], atol=1e-6) for k in ref_sd)
    train(ref, x, y, ref_opt, steps=2)
    for k, v in ref.state_dict().items():
        assert torch.allclose(res[0]["fsdp_cont"][k], v, atol=1e-6)
        assert torch.equal(res[0]["fsdp_resumed"][k], res[0]["fsdp_cont"][k])

    adv = group_advantages(rewards, G)
    assert torch.allclose(torch.cat([res[0]["adv_local"], res[1]["adv_local"]]), adv, atol=1e-6)
    assert all(torch.equal(res[r]["uneven"], rewards) for r in range(2))
    assert all(float(res[r]["mean"]) == 0.5 for r in range(2))
    assert [res[r]["this_ranks"] for r in range(2)] == [["r0", "only"], ["r1", "only"]]
    assert [res[r]["strided"][0] for r in range(2)] == [[0, 2, 4, 6], [1, 3, 5]]
    assert all(torch.equal(res[r]["strided"][1], rewards[:7] * 2) for r in range(2))
    for r in range(2):
        g0, g1, g2 = res[r]["avg"]
        assert torch.equal(g0, torch.arange(6.0).reshape(2, 3) * 1.5) and g1.dtype == torch.float64
        assert torch.equal(g1, torch.full((4,), 5.5, dtype=torch.float64)) and torch.equal(g2, torch.full((5,), 0.5))
        for i, (s, g) in enumerate(zip([(2, 3), (2,), (1,), (1,), (3, 2), (5,)], res[r]["avg_buckets"])):
            assert torch.equal(g, torch.arange(float(g.numel())).reshape(s) * 1.5 + i), (i, g)
    assert [[t.numel() for t in b] for b in dist._buckets([torch.zeros(n) for n in (6, 2, 1, 1, 6, 5)], 4)] == \
        [[6], [2, 1, 1], [6], [5]]

    assert all(res[r]["resume_rng_equal"] for r in range(2))
    assert res[0]["ckpts"] == [1] and res[0]["rng_ranks"] == 2
    assert not torch.equal(res[0]["draw"], res[1]["draw"])  # each rank got its own RNG stream back
    assert [res[r]["nan_exit"] for r in range(2)] == [3, 3]


def test_single_process_helpers_are_identity():
    t = torch.arange(6.0)
    net = nn.Linear(2, 2)
    assert dist.init_distributed("cpu")[:2] == (0, 1) and dist.is_main() and not dist.is_dist()
    assert torch.equal(dist.all_gather_cat(t), t) and torch.equal(dist.local_rows(t, 6), t)
    assert dist.wrap_ddp(net) is net and dist.wrap_fsdp2(net, [net]) is net and dist.this_ranks([3, 4]) == 3
    assert dist.full_state_dict(net).keys() == net.state_dict().keys() and dist.any_rank(True)
