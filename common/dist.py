"""Distributed training with torch.distributed only: torchrun's environment, DDP or FSDP2, a gather for GRPO.

    torchrun --standalone --nproc_per_node 2 otca.py --teacher toy2d      # gloo on CPU, nccl on GPU

Every script calls `rank, world, device = init_distributed(cfg.device)` first; without torchrun it returns
(0, 1, device) and nothing else changes, so the same file runs on a laptop. Only rank 0 writes files (Run checks
is_main()). GRPO groups may span ranks: gather the rewards (all_gather_cat) before normalising, then take back
this rank's rows (local_rows). FSDP2 puts `fully_shard` on each block and then on the root (torch's recipe);
full_state_dict gives an ordinary state dict on rank 0 for saving. No engine of our own.
"""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import nn


def is_dist() -> bool:
    """True inside an initialised process group with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0 (or a single process): the one that prints and writes."""
    return rank() == 0


def pick_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda (this process's LOCAL_RANK under torchrun) when available, else cpu; other names as given."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        # modulo the visible GPUs: a launcher that shows each process only its own GPU (SLURM's per-task
        # CUDA_VISIBLE_DEVICES) still sets LOCAL_RANK 0..n-1, and cuda:LOCAL_RANK would not exist there
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % max(1, torch.cuda.device_count()))
    return device


def init_distributed(device: str = "auto", timeout_s: float = 600.0) -> tuple[int, int, torch.device]:
    """Join torchrun's process group when WORLD_SIZE > 1 (gloo on CPU, nccl on GPU). Returns (rank, world, device).

    torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; the default env:// init reads them.
    Without them this is a single process: (0, 1, pick_device(device)).
    """
    dev = pick_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s),
                                device_id=dev if dev.type == "cuda" else None)
    return rank(), world_size(), dev


def cleanup() -> None:
    """Leave the process group (call at the end of main; harmless in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_dist():
        dist.barrier()


def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x from every rank along dim 0, in rank order: (n_r, ...) on rank r -> (sum_r n_r, ...).

    Ranks may hold different n_r (padded to the largest for the collective, then trimmed). No gradient flows
    back (rewards and advantages are data here). Single process: x unchanged.
    """
    if not is_dist():
        return x
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    pad = torch.zeros((max(sizes) - x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded = torch.cat([x.detach(), pad], 0)
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)], 0)


def local_rows(x: torch.Tensor, n_local: int) -> torch.Tensor:
    """This rank's rows of a gathered (world * n_local, ...) tensor (equal shares): the inverse of all_gather_cat."""
    r = rank()
    return x[r * n_local:(r + 1) * n_local]


def strided_rows(n: int) -> list[int]:
    """This rank's share of a set of n rows for evaluation: rows rank, rank + world, ... (every row on one rank;
    shares differ by at most one). Single process: all of them."""
    return list(range(rank(), n, world_size()))


def gather_strided(x: torch.Tensor, n: int) -> torch.Tensor:
    """Every rank's strided_rows(n) results back in the set's order: (n_r, ...) on rank r -> (n, ...) on every rank.
    Single process: x unchanged."""
    if not is_dist():
        return x
    g = all_gather_cat(x)                                        # rank 0's rows, then rank 1's, ...
    order = torch.cat([torch.arange(r, n, world_size()) for r in range(world_size())]).to(g.device)
    return torch.empty_like(g).index_copy_(0, order, g)


def reduce_mean(x: torch.Tensor | float) -> torch.Tensor:
    """Mean of a scalar (or tensor) over ranks, for logging; single process: x as a tensor."""
    t = torch.as_tensor(x, dtype=torch.float32).detach().clone()
    if is_dist():
        t = t.to(_comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t = t / world_size()
    return t.cpu()


def average_gradients(params: Sequence[torch.Tensor], bucket_numel: int = 2 ** 24) -> None:
    """Data parallelism without a DDP wrapper: replace every gradient by its mean over ranks, once per optimizer step
    (between the last backward and clipping). Why no DDP: the backends read attributes off the module they are given
    (net.config), which a wrapper hides; OTCA's ranks may run different numbers of backward passes (DDP's per-backward
    hooks would deadlock); RTDMD trains two adapters of one transformer with two optimizers. A parameter without a
    gradient (its chunk trained nothing on this rank) contributes zeros. The gradients travel in flat buckets of at
    most bucket_numel elements per dtype (default 2^24: 32 MB in bf16, 64 MB in fp32): one collective per bucket
    instead of one per tensor (a LoRA has hundreds), and at most one bucket of extra memory (a full fine-tune of a
    12B model would otherwise copy all its gradients at once); a tensor larger than a bucket is reduced in place.
    Element for element the same sums as one flat buffer. Single process: nothing happens."""
    if not is_dist():
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    n = world_size()
    for grads in by_dtype.values():
        for bucket in _buckets(grads, bucket_numel):
            if len(bucket) == 1 and bucket[0].is_contiguous():    # alone (large): no copy
                dist.all_reduce(bucket[0])
                bucket[0].div_(n)
                continue
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat)
            flat /= n
            offset = 0
            for g in bucket:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()


def _buckets(tensors: Sequence[torch.Tensor], max_numel: int) -> list[list[torch.Tensor]]:
    """Consecutive runs of tensors with at most max_numel elements together (a larger tensor alone)."""
    out: list[list[torch.Tensor]] = []
    size = 0
    for t in tensors:
        if not out or size + t.numel() > max_numel:
            out.append([])
            size = 0
        out[-1].append(t)
        size += t.numel()
    return out


def any_rank(flag: bool) -> bool:
    """True when flag is True on at least one rank (a stop signal every rank must agree on)."""
    if not is_dist():
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable obj, in rank order (small things: RNG states). Single process: [obj]."""
    if not is_dist():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def this_ranks(per_rank: Sequence[Any]) -> Any:
    """This rank's entry of a per-rank list (what gather_objects saved in a checkpoint: RNG states, a script's
    random streams); rank 0's when the list is shorter (resumed on more processes than wrote it)."""
    r = rank()
    return per_rank[r] if r < len(per_rank) else per_rank[0]


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


# ----- wrapping the model ----------------------------------------------------------------------------------
def wrap_ddp(model: nn.Module, device: torch.device | None = None, **kwargs: Any) -> nn.Module:
    """torch DDP (gradients averaged over ranks in backward). Single process: the model unchanged."""
    if not is_dist():
        return model
    ids = [device.index] if device is not None and device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, **kwargs)


def wrap_fsdp2(model: nn.Module, blocks: Sequence[nn.Module] | tuple[type, ...] | type,
               mixed_precision: torch.dtype | None = None) -> nn.Module:
    """Shard parameters with FSDP2 (`fully_shard`): each block first, then the root. Returns the model.

    blocks: the submodules to shard one by one (e.g. [*net.transformer_blocks, *net.single_transformer_blocks])
    or module classes to find inside model. mixed_precision: bf16 compute with fp32 gradient reduction.
    After this, parameters are DTensors; use full_state_dict to save. Single process: the model unchanged.
    Avoid in-place ops on a block's output (FSDP2 warns: they can drop its pre-backward hook).
    """
    if not is_dist():
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    if isinstance(blocks, type) or (isinstance(blocks, tuple) and blocks and isinstance(blocks[0], type)):
        classes = blocks if isinstance(blocks, tuple) else (blocks,)
        # model.modules() lists parents before children; fully_shard goes bottom-up, so reverse; never the root
        blocks = [m for m in reversed(list(model.modules())) if isinstance(m, classes) and m is not model]
    dev_type = "cuda" if next(model.parameters()).is_cuda else "cpu"
    mesh = init_device_mesh(dev_type, (world_size(),))
    kw: dict[str, Any] = {"mesh": mesh}
    if mixed_precision is not None:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=mixed_precision, reduce_dtype=torch.float32)
    for blk in blocks:
        fully_shard(blk, **kw)
    fully_shard(model, **kw)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP (FSDP2 keeps the module itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def full_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> Any:
    """An ordinary (full, CPU) state dict for saving; a collective under FSDP2, so call it on every rank.

    Returns the model's dict, or (model dict, optimizer dict) when optimizer is given. Under FSDP2 the dicts
    are full on rank 0 and empty elsewhere; with DDP or one process they are the plain state_dict()s.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    model = unwrap(model)
    if not is_dist():
        msd = model.state_dict()
        return msd if optimizer is None else (msd, optimizer.state_dict())
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd, osd = get_state_dict(model, optimizer if optimizer is not None else [], options=opts)
    return msd if optimizer is None else (msd, osd)


def load_full_state_dict(model: nn.Module, msd: dict, optimizer: torch.optim.Optimizer | None = None,
                         osd: dict | None = None) -> None:
    """The inverse of full_state_dict, on every rank (each takes its shard of the full dicts it was given)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    model = unwrap(model)
    if not is_dist():
        model.load_state_dict(msd)
        if optimizer is not None and osd is not None:
            optimizer.load_state_dict(osd)
        return
    opts = StateDictOptions(full_state_dict=True)
    set_state_dict(model, optimizer if optimizer is not None else [], model_state_dict=msd,
                   optim_state_dict=osd if optimizer is not None else {}, options=opts)

