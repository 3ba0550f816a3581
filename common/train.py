"""Small training helpers: seeding, AdamW, grad-norm clipping, EMA, bf16 autocast.

    seed_everything(cfg.seed)                                   # python, numpy, torch (CPU and CUDA)
    opt = make_optimizer(params, lr=1e-4, weight_decay=1e-4)    # AdamW; no decay on biases and norm scales
    norm = clip_grad(params, max_norm=1.0)                      # total grad norm before clipping (a tensor)
    ema = EMA(net, decay=0.995)                                 # or EMA(params, ..., shadow=teacher)
    ema.update()                                                # after every optimizer step
    named = trained_tensors(net)                                # what a checkpoint holds: the trained tensors
    averaged = ema_tensors(named, ema)                          # the same keys with the EMA averages (cloned)
    load_trained(named, ckpt["state"]["net"], "--ckpt run/")     # back in place; a missing one is a one-line error
    with autocast(cfg.precision, device): ...                   # bf16 autocast, or nothing for fp32
"""
from __future__ import annotations

import contextlib
import os
import random
from typing import Iterable, Iterator

import numpy as np
import torch
from torch import nn


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed python's random, numpy's global RNG and torch (every device), so one seed repeats a CPU run bit for bit.

    deterministic=True on a CUDA machine also asks torch for deterministic kernels (warn_only: an op without a
    deterministic version warns instead of failing) and turns off cuDNN autotuning; the cuBLAS workspace variable
    has to be set before the first cuBLAS call, which is why it is set here. CPU kernels are deterministic at a
    fixed thread count already, and torch.use_deterministic_algorithms imports torch._dynamo/_inductor (seconds),
    so a CPU-only machine skips it.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # seeds CUDA too
    if deterministic and torch.cuda.is_available():
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def _same_device(ps: list[torch.Tensor]) -> bool | None:
    """foreach for clip_grad_norm_ when every gradient is a plain tensor on one device (multi-tensor norms);
    None (torch's choice) otherwise, e.g. FSDP2's DTensor shards."""
    return True if all(type(p) is torch.nn.Parameter or type(p) is torch.Tensor for p in ps) and \
        len({p.device for p in ps}) == 1 else None


def _params(params_or_module: nn.Module | Iterable[torch.Tensor]) -> list[torch.Tensor]:
    if isinstance(params_or_module, nn.Module):
        return [p for p in params_or_module.parameters() if p.requires_grad]
    return list(params_or_module)


def make_optimizer(params: nn.Module | Iterable[nn.Parameter], lr: float, weight_decay: float = 0.0,
                   betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW over the trainable parameters. Weight decay only on tensors with 2+ dims (matrices, convolutions):
    decaying biases and normalisation scales towards 0 only hurts (the nanoGPT / DiT convention).
    foreach=True (torch's default on CUDA, not on CPU): one multi-tensor op per update stage instead of a python loop
    over tensors, the same values bit for bit; a LoRA has hundreds of small tensors."""
    ps = [p for p in _params(params) if p.requires_grad]
    groups = [{"params": [p for p in ps if _decays(p)], "weight_decay": weight_decay},
              {"params": [p for p in ps if not _decays(p)], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, eps=eps, foreach=True)


def _decays(p: torch.Tensor) -> bool:
    """make_optimizer's rule: weight decay on matrices and convolutions (2+ dims), never on biases and norm scales."""
    return p.ndim >= 2


def set_hyperparameters(opt: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    """New lr and weight decay for an optimizer from make_optimizer (e.g. RTDMD's stage 2), its moments kept; the
    decay only on the group that make_optimizer decays."""
    for group in opt.param_groups:
        group["lr"] = lr
        group["weight_decay"] = weight_decay if _decays(group["params"][0]) else 0.0


def clip_grad(params: nn.Module | Iterable[torch.Tensor], max_norm: float | None) -> torch.Tensor:
    """Clip the total L2 norm of the gradients to max_norm (None or <= 0: measure only). Returns the norm
    before clipping, a 0-d tensor (no device sync here: log it, Run.log calls .item() once)."""
    ps = [p for p in _params(params) if p.grad is not None]
    if not ps:
        return torch.zeros(())
    norm = torch.nn.utils.clip_grad_norm_(ps, float("inf") if max_norm is None or max_norm <= 0 else max_norm,
                                          foreach=_same_device(ps))
    # under FSDP2 the gradients are DTensor shards and the norm comes back as a replicated DTensor
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


class EMA:
    """Exponential moving average of parameters: shadow <- decay * shadow + (1 - decay) * param.

    params: a module (its trainable parameters) or a list of tensors. shadow: where the averages live; None
    keeps float32 copies here, or pass a module / parameter list of the same shapes (e.g. the frozen teacher
    of RATS, whose weights ARE the EMA), which saves one copy of the model. decay = 1 freezes the shadow.
    Call update() after every optimizer step. state_dict()/load_state_dict() hold the averages and the count.
    """

    def __init__(self, params: nn.Module | Iterable[torch.Tensor], decay: float = 0.999,
                 shadow: nn.Module | Iterable[torch.Tensor] | None = None):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.params = _params(params)
        self.decay = decay
        if shadow is None:
            self.shadow = [p.detach().float().clone() for p in self.params]
        else:
            self.shadow = list(shadow.parameters()) if isinstance(shadow, nn.Module) else list(shadow)
            if [tuple(s.shape) for s in self.shadow] != [tuple(p.shape) for p in self.params]:
                raise ValueError("EMA shadow parameters do not match the averaged parameters in shape")
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        """One EMA step. lerp_ computes s + (1 - decay)(p - s), the same average in one fused op."""
        self.updates += 1
        if self.decay == 1.0:
            return
        src = [p.detach().to(s.dtype) for s, p in zip(self.shadow, self.params)]
        if _same_device(self.shadow + self.params):
            # one multi-tensor lerp (a LoRA has hundreds of small tensors); the same values as the loop below
            torch._foreach_lerp_(self.shadow, src, 1.0 - self.decay)
        else:
            for s, p in zip(self.shadow, src):
                s.lerp_(p, 1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, target: nn.Module | Iterable[torch.Tensor] | None = None) -> None:
        """Write the averages into target (default: the averaged parameters themselves, e.g. for evaluation)."""
        dst = self.params if target is None else _params_all(target)
        for d, s in zip(dst, self.shadow):
            d.copy_(s.to(d.dtype))

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """Evaluate with the EMA weights inside the block; the trained weights come back afterwards."""
        backup = [p.detach().clone() for p in self.params]
        self.copy_to()
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(self.params, backup):
                    p.copy_(b)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": [s.detach().clone() for s in self.shadow]}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        self.decay, self.updates = state["decay"], state["updates"]
        for s, v in zip(self.shadow, state["shadow"]):
            s.copy_(v)


def trained_tensors(net: nn.Module) -> dict[str, nn.Parameter]:
    """The tensors a run trains (requires_grad), keyed by their path in `net`: what a checkpoint must hold. With a
    LoRA that is the adapter (0.6 GB for FLUX.1 at rank 32), not the frozen 12B base (24 GB in bf16), which the
    backend rebuilds from --pretrained."""
    return {n: p for n, p in net.named_parameters() if p.requires_grad}


def detached(named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """named's tensors detached, for a checkpoint (torch.save writes them; no copy is made here)."""
    return {k: p.detach() for k, p in named.items()}


def ema_tensors(named: dict[str, torch.Tensor], ema: EMA) -> dict[str, torch.Tensor]:
    """The trained tensors (named: key -> parameter, the EMA's parameters) with the EMA averages in their place,
    cloned: a checkpoint's averaged weights (rtdmd.py's gen_ema, what --init and --eval-only load)."""
    with ema.swapped():
        return {k: p.detach().clone() for k, p in named.items()}


@torch.no_grad()
def load_trained(named: dict[str, torch.Tensor], state: dict[str, torch.Tensor], what: str) -> None:
    """Copy a checkpoint's tensors into the trained ones (cast to their device and dtype). Extra keys, such as an
    older checkpoint's full state dict with the frozen base weights, are ignored; a missing key or a shape that
    differs is a ConfigError, one line (a run of another backend, size or LoRA setup), not a traceback."""
    from common.config import ConfigError
    missing = [k for k in named if k not in state]
    if missing:
        raise ConfigError(f"{what}: the checkpoint lacks {len(missing)} of the {len(named)} trained tensors "
                          f"(e.g. {missing[0]}): a run of another backend or LoRA setup?")
    bad = [k for k, p in named.items() if tuple(state[k].shape) != tuple(p.shape)]
    if bad:
        raise ConfigError(f"{what}: {len(bad)} trained tensors differ in shape from this model's (e.g. {bad[0]}: "
                          f"{tuple(state[bad[0]].shape)} vs {tuple(named[bad[0]].shape)}): another model size?")
    for k, p in named.items():
        p.copy_(state[k].to(p.device, p.dtype))


def _params_all(x: nn.Module | Iterable[torch.Tensor]) -> list[torch.Tensor]:
    return list(x.parameters()) if isinstance(x, nn.Module) else list(x)


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """bf16 autocast on the device's type when precision == 'bf16'; a no-op context for 'fp32'."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")


def base_dtype(precision: str, teacher: str, full_finetune: bool = False) -> dict[str, torch.dtype]:
    """get_backend's dtype option for a run: {"dtype": bf16} only when precision is bf16 and the trained tensors sit
    on a frozen base (a LoRA on the diffusers families), else {} (the backend's default). Trained weights (the toy,
    the small DiT, --full-finetune) must stay float32 and compute in bf16 under autocast: an AdamW step of 1e-4
    vanishes in bf16 (every weight with |w| > 0.03 never moves), and so would an EMA's lerp by 1 - decay."""
    if precision == "bf16" and teacher not in ("toy2d", "dit") and not full_finetune:
        return {"dtype": torch.bfloat16}
    return {}
