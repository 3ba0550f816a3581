"""The backend interface: what a method script needs from a model family, and nothing more.

A method script (rats.py, otca.py, rtdmd.py) never knows which model it drives. It asks a Backend for
  * initial noise of the latent shape                          noise(n, generator) -> (n, *latent_shape)
  * a batchable condition for prompts or class labels          encode(prompts) -> Cond
  * the velocity v = eps - x0 with guidance inside             velocity(net, x, sigma, cond, guidance)
  * what a reward sees                                         decode(x) -> points (B,2) | images (B,3,H,W) in [0,1]
                                                                             | videos (B,F,3,H,W) in [0,1]
  * the family's default schedule                              sigmas(K) -> (K+1,) from 1 down to exactly 0
  * which parameters train, and frozen or EMA copies           trainable_parameters(net), frozen_copy(net)
  * the reference policy (the base model)                      reference(net) context manager

Conventions (shared/spec/decisions.md): sigma in [0, 1], sigma = 1 is pure noise, x_sigma = (1 - sigma) x0
+ sigma eps, the network predicts v = eps - x0. The velocity is returned in float32 whatever the network's
dtype, so that the sampler maths (common/flow.py) always runs in float32.

`get_backend(name, **options)` maps `--teacher NAME` to a backend. Registered names are imported lazily so
that `--teacher toy2d` never imports diffusers.
"""
from __future__ import annotations

import abc
import collections
import contextlib
import copy
import functools
import importlib
from typing import Any, Iterator, Sequence

import torch
from torch import nn


DEFAULT_PROMPTS = {
    "train": ["a red apple on a wooden table", "a lighthouse at dusk, oil painting", "a corgi wearing sunglasses",
              "a bowl of ramen, studio photo", "a snowy mountain village at night", "an astronaut riding a horse",
              "a watercolor fox in a forest", "a glass teapot with blooming tea"],
    "eval": ["a cat sitting on a windowsill", "a futuristic city skyline at sunset", "a vase of sunflowers",
             "a steam train crossing a bridge"],
}


@contextlib.contextmanager
def calls_as(net: nn.Module, role: str) -> Iterator[None]:
    """Inside the block, calls of `net` count as `role` (its nfe_role, which Backend's call counter and the benchmarks
    read): one module serving another role for a while, e.g. RATS' student with the EMA weights swapped in, or
    RTDMD's generator with its fake-score adapter active. The previous role, or its absence, comes back after."""
    had, old = hasattr(net, "nfe_role"), getattr(net, "nfe_role", None)
    net.nfe_role = role
    try:
        yield
    finally:
        if had:
            net.nfe_role = old
        else:
            del net.nfe_role


class BackendError(RuntimeError):
    """A user-facing backend problem (bad --pretrained path, unsupported option): one line, exit status 2."""


class Cond(dict):
    """A condition: a dict of tensors that all share the batch dimension 0, plus optional non-tensor metadata.

    Tensors whose first dimension is not the batch (for example FLUX's txt_ids (L, 3)) go in `shared`, which
    `repeat` and `select` leave alone. `prompts` keeps the text so that rewards can read it.
    """

    def __init__(self, tensors: dict[str, torch.Tensor] | None = None, prompts: Sequence[str] | None = None,
                 shared: dict[str, Any] | None = None):
        super().__init__(tensors or {})
        self.prompts = list(prompts) if prompts is not None else None
        self.shared = dict(shared or {})

    @property
    def batch_size(self) -> int:
        for v in self.values():
            if isinstance(v, torch.Tensor):
                return v.shape[0]
        return len(self.prompts) if self.prompts is not None else 0

    def _map(self, fn_tensor, fn_list) -> "Cond":
        out = {k: (fn_tensor(v) if isinstance(v, torch.Tensor) else v) for k, v in self.items()}
        prompts = fn_list(self.prompts) if self.prompts is not None else None
        return Cond(out, prompts, self.shared)

    def repeat(self, g: int) -> "Cond":
        """Repeat every sample g times, consecutively: [a, b] -> [a, a, b, b] (GRPO groups are contiguous)."""
        return self._map(lambda t: t.repeat_interleave(g, dim=0), lambda p: [q for q in p for _ in range(g)])

    def select(self, idx: torch.Tensor | slice | Sequence[int]) -> "Cond":
        """Rows idx of every tensor (and of the prompts)."""
        if isinstance(idx, slice):
            return self._map(lambda t: t[idx], lambda p: p[idx])
        idx_t = torch.as_tensor(idx, dtype=torch.long)
        return self._map(lambda t: t[idx_t.to(t.device)], lambda p: [p[i] for i in idx_t.tolist()])

    def to(self, device=None, dtype=None) -> "Cond":
        """Move tensors; floating tensors also take dtype when given."""
        def mv(t):
            return t.to(device=device, dtype=dtype if (dtype is not None and t.is_floating_point()) else None)
        out = self._map(mv, lambda p: p)
        out.shared = {k: (mv(v) if isinstance(v, torch.Tensor) else v) for k, v in self.shared.items()}
        return out

    @staticmethod
    def cat(conds: Sequence["Cond"]) -> "Cond":
        """Concatenate along the batch dimension (e.g. conditional and unconditional halves)."""
        first = conds[0]
        out = {k: torch.cat([c[k] for c in conds], 0) for k, v in first.items() if isinstance(v, torch.Tensor)}
        prompts = None if first.prompts is None else [p for c in conds for p in c.prompts]
        return Cond(out, prompts, first.shared)


class Backend(abc.ABC):
    """Base class of every model family. Subclasses fill in the marked methods.

    Attributes set by subclasses:
      name         registry name ("toy2d", "dit", "flux", "wan", "sd3", "flux2")
      media        "points" | "image" | "video": what decode returns and what rewards receive
      latent_shape shape of one sample's latent, without the batch dimension
      network      the base network (an nn.Module) that a method trains or copies
      guidance     default guidance scale (1.0 = no CFG); FLUX.1 embeds it instead of running two passes
      shift        default static shift of the schedule (1.0 = none); families with a dynamic shift override sigmas()
      device, dtype  where the network lives and its parameter dtype (bf16 on GPU for the big families)
      splits_rows  True when velocity() may send the rows of one call to different networks (Wan 2.2's experts,
                   by sigma): a row's value then depends on the call's other rows up to float rounding (sub-batches
                   of other sizes), so a recomputation at other row groupings is equal to rounding, not bitwise
    """

    name: str = "base"
    media: str = "points"
    latent_shape: tuple[int, ...] = ()
    guidance: float = 1.0
    shift: float = 1.0
    splits_rows: bool = False

    def __init__(self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        self.device = torch.device(device)
        self.dtype = dtype
        self.network: nn.Module | None = None

    def __init_subclass__(cls, **kw):
        """Wrap every subclass's velocity() with a call counter: nfe[(role, with_grad)] += 1 per network call,
        where role is the network's `nfe_role` attribute (set it to 'student', 'teacher', 'fake', ...). The
        benchmarks read it; the cost is one dict update per call."""
        super().__init_subclass__(**kw)
        if "velocity" in cls.__dict__ and not getattr(cls.__dict__["velocity"], "_counted", False):
            inner = cls.__dict__["velocity"]

            @functools.wraps(inner)
            def counted(self, net, *args, **kwargs):
                counter = self.__dict__.setdefault("nfe", collections.Counter())
                counter[(getattr(net, "nfe_role", type(net).__name__), torch.is_grad_enabled())] += 1
                return inner(self, net, *args, **kwargs)

            counted._counted = True
            cls.velocity = counted

    # ----- to implement -------------------------------------------------------------------------------
    @abc.abstractmethod
    def encode(self, prompts: Sequence[str] | torch.Tensor) -> Cond:
        """Encode prompts (or class labels for the toy) once into a Cond with batch dimension len(prompts)."""

    @abc.abstractmethod
    def velocity(self, net: nn.Module, x: torch.Tensor, sigma: torch.Tensor | float, cond: Cond,
                 guidance: float | None = None) -> torch.Tensor:
        """v(x, sigma | cond), float32, same shape as x. sigma: scalar or (B,). guidance None = self.guidance.

        Classifier-free guidance (where the family uses it): v = v_u + g (v_c - v_u), computed in one batched pass.
        """

    @abc.abstractmethod
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents -> what a reward sees. Differentiable (no torch.no_grad inside): methods back-propagate rewards."""

    # ----- defaults that most families keep -----------------------------------------------------------
    def forwards_per_call(self, net: nn.Module, sigma: torch.Tensor | float) -> int:
        """How many network forwards one velocity(net, x, sigma, ...) call runs: 1 (CFG is one batched pass);
        Wan 2.2 one per expert that the rows' sigmas reach. The benchmark harness checks forwards against it."""
        return 1

    def guidance_applies(self, net: nn.Module) -> bool:
        """Whether velocity(net, ..., guidance=g) acts on g != 1 (CFG or an embedded guidance scale). False where the
        family ignores g for this network (a step-distilled FLUX.2 klein, FLUX.1 without a guidance embedding, the
        toy without classes): a script that was asked for guidance there must say so instead of dropping it."""
        return True

    def prompts(self, split: str = "train") -> list[str]:
        """The built-in prompt list for smoke runs (split 'train' or 'eval'); the toy returns its class names.
        Real prompt files (HPDv2, DrawBench, ...) are loaded by the scripts' --prompts flag instead."""
        return list(DEFAULT_PROMPTS[split])

    def noise(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Initial noise eps ~ N(0, I) of shape (n, *latent_shape), float32, on self.device."""
        g_device = generator.device if generator is not None else self.device
        eps = torch.randn((n, *self.latent_shape), generator=generator, device=g_device, dtype=torch.float32)
        return eps.to(self.device)

    def sigmas(self, K: int, shift: float | None = None, timesteps: list[int] | None = None) -> torch.Tensor:
        """The family's default K-step grid: (K+1,) float32 from 1 down to exactly 0, static shift. timesteps: K
        explicit raw timesteps (e.g. RTDMD's [1000, 750, 500, 250]) in place of the uniform grid, the same shift."""
        from common.flow import make_sigmas
        return make_sigmas(K, shift=self.shift if shift is None else shift, timesteps=timesteps).to(self.device)

    def trainable_parameters(self, net: nn.Module) -> list[nn.Parameter]:
        """Parameters an optimiser updates (all of them, or the LoRA ones for adapter-trained families)."""
        return [p for p in net.parameters() if p.requires_grad]

    def frozen_copy(self, net: nn.Module) -> nn.Module:
        """A deep copy with gradients off, in eval mode: the EMA teacher, the real score, the fake score's start."""
        out = copy.deepcopy(net)
        out.requires_grad_(False)
        return out.eval()

    @contextlib.contextmanager
    def reference(self, net: nn.Module) -> Iterator[nn.Module]:
        """Yield the reference (base) policy. Full fine-tuning keeps an explicit copy (set self.reference_net);
        LoRA families override this to disable the adapter for the duration of the block."""
        ref = getattr(self, "reference_net", None)
        if ref is None:
            raise RuntimeError("no reference policy: call backend.keep_reference(net) before training")
        yield ref

    def keep_reference(self, net: nn.Module) -> None:
        """Make reference(net) available: freeze a copy of the current weights as the reference policy (full
        fine-tuning). LoRA families override it to keep nothing where the adapter can simply be disabled."""
        self.reference_net = self.frozen_copy(net)

    def velocity_fn(self, net: nn.Module, cond: Cond, guidance: float | None = None):
        """Close over (net, cond, guidance): the (x, sigma) -> v callable that common.flow.rollout takes."""
        return lambda x, sigma: self.velocity(net, x, sigma, cond, guidance)

    def tiled_velocity_fn(self, net: nn.Module, cond: Cond, guidance: float | None = None):
        """velocity_fn(net, cond, guidance) that also takes n stacked copies of cond's batch: x (n B, ...) is
        evaluated on the condition repeated n times (Cond.cat, built once per n), so n evaluations at fixed inputs
        can be one network call (common.dmd.batched_velocity). A row count that is not a multiple of B is a
        programming error (ValueError)."""
        B, tiled = cond.batch_size, {1: cond}

        def fn(x, sigma):
            n = x.shape[0] // B
            if n < 1 or n * B != x.shape[0]:
                raise ValueError(f"{x.shape[0]} rows for a condition of batch {B}")
            if n not in tiled:
                tiled[n] = Cond.cat([cond] * n)
            return self.velocity(net, x, sigma, tiled[n], guidance)
        return fn


# ----- registry --------------------------------------------------------------------------------------------
# name -> "module:Class"; imported on demand so that the toy never pays for diffusers' import time.
REGISTRY: dict[str, str] = {
    "toy2d": "toy.backend:Toy2DBackend",
    "dit": "common.dit:DiTBackend",
    "flux": "common.backends:FluxBackend",
    "wan": "common.backends:WanBackend",
    "sd3": "common.backends:SD3Backend",
    "flux2": "common.backends:Flux2Backend",
}


def get_backend(name: str, **options: Any) -> Backend:
    """Build the backend registered as `name` (an unknown name raises KeyError with the known ones)."""
    if name not in REGISTRY:
        raise KeyError(f"unknown backend {name!r}; choose one of {', '.join(REGISTRY)}")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)(**options)
