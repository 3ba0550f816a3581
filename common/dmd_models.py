"""RTDMD's three networks (generator, fake score, teacher = real score) and their layouts on a backend (rtdmd.py).

--fake-copy full holds them as separate modules; --fake-copy adapter (the LoRA presets) as adapters on one
transformer: the fake score a second LoRA adapter beside the generator's, the teacher the base with adapters off
(on FLUX.1-dev 24.2 GB of bf16 weights instead of 72.0 GB, with the same losses and gradients:
tests/test_rtdmd_lora.py). build_models picks the layout; Models says how each network is called.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch

from common.backend import calls_as
from common.config import ConfigError
from common.train import trained_tensors

FAKE_ADAPTER = "fake"     # --fake-copy adapter: the fake score's LoRA adapter on the generator's transformer


@dataclass
class Models:
    """RTDMD's three networks and how each is called. gen is trained; fake (trained) and teacher (frozen) are
    separate modules with --fake-copy full; with --fake-copy adapter they share one module (the generator's, or the
    teacher checkpoint's), where every call of theirs (the fake's backward included) must run inside fake_ctx() /
    teacher_ctx() (nullcontext otherwise). gen_named / fake_named: the trained tensors, keyed by their path in a
    separate copy of the network (the checkpoint keys, the same in both modes). fake_from_gen: the fake starts as
    the generator (the teacher is the generator's own model), so --eval-only can sample the trained generator in the
    fake's place."""
    gen: torch.nn.Module
    fake: torch.nn.Module
    teacher: torch.nn.Module
    fake_ctx: Callable[[], ContextManager]
    teacher_ctx: Callable[[], ContextManager]
    gen_named: dict[str, torch.Tensor]
    fake_named: dict[str, torch.Tensor]
    fake_from_gen: bool = True


def build_models(backend, mode: str) -> Models:
    """The generator (backend.network), the fake score and the teacher (real score).

    The teacher is the generator's own model (--teacher-pretrained '', every preset but flux2), or the checkpoint
    that the backend loaded beside it as backend.teacher_net (backend.teacher_pretrained: FLUX.2's klein-base beside
    the step-distilled klein generator, spec decision 14); the fake starts as the teacher either way (with a copy of
    the generator's starting LoRA adapter, which is zero). Layouts:
      own model, full:        gen; fake = deep copy of gen (trained); teacher = the backend's exact one (toy) or a
                              frozen deep copy of gen: three networks
      own model, adapter:     ONE transformer: gen's, with its adapter (gen), a second adapter (fake), and adapters
                              off (teacher): the frozen copy of the starting generator is its base (its adapter
                              starts at zero), also after --init (the stage-1 adapter is loaded into gen afterwards)
      teacher ckpt, full:     gen; teacher = backend.teacher_net (frozen); fake = deep copy of it, trained (its LoRA
                              adapter, or every weight with --full-finetune): three networks
      teacher ckpt, adapter:  TWO transformers: gen's with its adapter (gen), and the teacher's with the fake's adapter
                              (fake) and adapters off (teacher)
    adapter mode needs a LoRA generator (else ConfigError)."""
    gen = backend.network
    lora = hasattr(backend, "use_adapter") and backend.has_lora(gen)
    if mode == "adapter" and not lora:
        raise ConfigError(f"--fake-copy adapter needs a LoRA backend (flux, wan, sd3, flux2 without full "
                          f"fine-tuning); {backend.name} has none: use --fake-copy full")
    null = contextlib.nullcontext
    if getattr(backend, "teacher_pretrained", None):    # a teacher checkpoint of its own: the fake starts from it
        teacher = backend.teacher_net
        fake = copy.deepcopy(teacher).train() if mode == "full" else teacher
        if lora:
            from common.backends.base import ADAPTER
            backend.add_adapter_copy(fake, ADAPTER, source_net=gen)
        else:
            fake.requires_grad_(True)
        if mode == "full":
            return Models(gen, fake, teacher, null, null, trained_tensors(gen), trained_tensors(fake), False)
        return Models(gen, fake, teacher, lambda: calls_as(fake, "fake"),
                      lambda: _both(backend.reference(teacher), calls_as(teacher, "teacher")), trained_tensors(gen),
                      trained_tensors(fake), False)
    if mode == "full":
        fake = copy.deepcopy(gen).train()
        teacher = getattr(backend, "teacher_net", None)
        teacher = backend.frozen_copy(gen) if teacher is None or teacher is gen else teacher
        return Models(gen, fake, teacher, null, null, trained_tensors(gen), trained_tensors(fake))
    from common.backends.base import ADAPTER
    gen_named = trained_tensors(gen)     # the generator's adapter, before the fake's exists
    backend.add_adapter_copy(gen, FAKE_ADAPTER, source=ADAPTER)
    fake_named = backend.adapter_parameters(gen, FAKE_ADAPTER, key_as=ADAPTER)
    if set(fake_named) != set(gen_named):
        raise RuntimeError("the fake adapter's tensors do not mirror the generator's trained ones")
    return Models(gen, gen, gen, lambda: _both(backend.use_adapter(gen, FAKE_ADAPTER), calls_as(gen, "fake")),
                  lambda: _both(backend.reference(gen), calls_as(gen, "teacher")), gen_named, fake_named)


@contextlib.contextmanager
def _both(first: ContextManager, second: ContextManager):
    """first's block with second inside it (a context factory for Models.fake_ctx / teacher_ctx)."""
    with first, second:
        yield
