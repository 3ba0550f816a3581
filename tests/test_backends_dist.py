"""FSDP2 over 2 CPU processes (gloo, spawned inside pytest) with the FLUX backend's wrap policy gives the same
losses as one process on the whole batch (tiny FLUX.1, LoRA, two SGD steps)."""
import os
import socket

import torch
import pytest
import torch.multiprocessing as mp

GLOBAL_BATCH = 4
PROMPTS = ["a red cube", "a cat", "a blue sky", "a dog"]


def _losses(rank: int = 0, world: int = 1, lora_dir: str | None = None) -> list[float]:
    """Flow-matching loss of this rank's rows before and after each of two SGD steps, averaged over ranks;
    the trained LoRA is saved to lora_dir (every rank calls save_lora: it gathers the FSDP2 shards)."""
    from common import dist as cdist
    from common.backends import FluxBackend
    from common.flow import interpolate
    torch.manual_seed(0)
    be = FluxBackend(tiny=True, lora_rank=4)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():                                      # a non-zero adapter so that both factors get gradients
        for n, p in be.network.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    net = cdist.wrap_fsdp2(be.network, be.fsdp_blocks(be.network))
    opt = torch.optim.SGD(be.trainable_parameters(net), lr=0.5)
    cond = be.encode(PROMPTS)
    x0 = torch.randn(GLOBAL_BATCH, *be.latent_shape, generator=g)
    eps = torch.randn(GLOBAL_BATCH, *be.latent_shape, generator=g)
    sigma = torch.tensor([0.2, 0.5, 0.7, 0.9])
    rows = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)   # this rank's equal share
    out = []
    for step in range(3):
        xt = interpolate(x0[rows], eps[rows], sigma[rows])
        loss = ((be.velocity(net, xt, sigma[rows], cond.select(rows)) - (eps[rows] - x0[rows])) ** 2).mean()
        out.append(float(cdist.reduce_mean(loss.detach())))
        if step < 2:
            opt.zero_grad()
            loss.backward()                                    # FSDP2 averages the gradients over ranks
            opt.step()
    if lora_dir is not None:
        be.save_lora(lora_dir, net)
    return out


def _worker(rank: int, world: int, port: int, queue, lora_dir: str) -> None:
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), HF_HUB_OFFLINE="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        queue.put((rank, _losses(rank, world, lora_dir)))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_fsdp2_two_processes_equal_one(tmp_path):
    from safetensors.torch import load_file
    torch.set_num_threads(1)
    single = _losses(lora_dir=str(tmp_path / "one"))
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.start_processes(_worker, args=(2, _free_port(), queue, str(tmp_path / "two")), nprocs=2,
                       start_method="spawn", join=True)
    got = dict(queue.get(timeout=60) for _ in range(2))
    assert single[0] > single[2]                                # the steps did something
    for r in (0, 1):
        assert abs(got[r][0] - single[0]) < 1e-5 * max(1.0, abs(single[0]))
        for a, b in zip(got[r], single):
            assert abs(a - b) < 1e-4 * max(1.0, abs(b)), (got[r], single)
    # the LoRA trained under FSDP2 (gathered, written by rank 0) equals the one-process LoRA
    one = load_file(str(tmp_path / "one" / "pytorch_lora_weights.safetensors"))
    two = load_file(str(tmp_path / "two" / "pytorch_lora_weights.safetensors"))
    assert one.keys() == two.keys() and len(one) > 0
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=1e-5, rtol=1e-4)
