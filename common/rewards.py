"""Rewards behind one multi-objective interface.

A Reward takes decoded media and prompts and returns a (B, M) float32 tensor, one column per named objective
(M = 1 for a single reward). Media: points (B, 2); images (B, 3, H, W) in [0, 1]; videos (B, F, 3, H, W) in [0, 1].
Higher is better. `differentiable` says whether gradients reach the media.

The command line names rewards as `--reward hps` or `--reward hps:0.7,clip:1.4`: parse_reward_spec turns that
into (name, weight) pairs and build_reward into a MultiReward whose columns are the named objectives and whose
`combine` is the weighted sum (the static scalarisation every GRPO baseline uses).

Registry entries are "module:factory" strings imported on demand, so the toy never imports open_clip.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Sequence

import torch


class RewardError(ValueError):
    """A user-facing reward problem (unknown name, bad weight, missing weights file): one clear line."""


class Reward:
    """Base class. Subclasses set `names` (objective names), `differentiable`, `media`, and implement score()."""

    names: list[str] = ["reward"]
    differentiable: bool = True
    media: str = "any"  # "points" | "image" | "video" | "any"

    def score(self, media: torch.Tensor, prompts: Sequence[str] | None = None) -> torch.Tensor:
        """(B, M) float32 rewards on the training scale."""
        raise NotImplementedError(type(self).__name__)

    def __call__(self, media: torch.Tensor, prompts: Sequence[str] | None = None) -> torch.Tensor:
        out = self.score(media, prompts)
        return out[:, None] if out.ndim == 1 else out

    def to(self, device) -> "Reward":
        for v in vars(self).values():
            if isinstance(v, torch.nn.Module):
                v.to(device)
        return self


class FnReward(Reward):
    """Wrap a function media -> (B,) (or (B, M)) as a Reward: the toy and small-DiT rewards use this."""

    def __init__(self, fn: Callable[..., torch.Tensor], names: Sequence[str] | str = "reward",
                 differentiable: bool = True, media: str = "any", uses_prompts: bool = False):
        self.fn, self.uses_prompts = fn, uses_prompts
        self.names = [names] if isinstance(names, str) else list(names)
        self.differentiable, self.media = differentiable, media

    def score(self, media, prompts=None):
        return (self.fn(media, prompts) if self.uses_prompts else self.fn(media)).float()


class MultiReward(Reward):
    """Several rewards side by side: (B, sum of M_i) with weights per column; combine() is the weighted sum."""

    def __init__(self, rewards: Sequence[Reward], weights: Sequence[float]):
        self.rewards = list(rewards)
        self.names = [n for r in self.rewards for n in r.names]
        w = [wt for r, wt in zip(self.rewards, weights) for _ in r.names]
        self.weights = torch.tensor(w, dtype=torch.float32)
        self.differentiable = all(r.differentiable for r in self.rewards)
        self.media = self.rewards[0].media if len({r.media for r in self.rewards}) == 1 else "any"

    def score(self, media, prompts=None):
        return torch.cat([r(media, prompts) for r in self.rewards], dim=1)

    def combine(self, r: torch.Tensor) -> torch.Tensor:
        """(B, M) -> (B,): the static weighted sum."""
        return r @ self.weights.to(r.device)

    def to(self, device):
        for r in self.rewards:
            r.to(device)
        return self


# name -> "module:factory"; factory(**options) -> Reward. Other modules may add entries with register().
REGISTRY: dict[str, str] = {}


def register(name: str, target: str) -> None:
    """Register a reward factory under `name` ("module:function")."""
    REGISTRY[name] = target


def parse_reward_spec(spec: str) -> list[tuple[str, float]]:
    """'hps' -> [('hps', 1.0)]; 'hps:0.7,clip:1.4' -> [('hps', 0.7), ('clip', 1.4)]. Raises RewardError."""
    out = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        name, _, w = part.partition(":")
        if name not in REGISTRY:
            raise RewardError(f"unknown reward {name!r}; choose from {', '.join(sorted(REGISTRY))}")
        try:
            weight = float(w) if w else 1.0
        except ValueError:
            raise RewardError(f"bad weight {w!r} for reward {name!r}: expected a number, as in {name}:0.7") from None
        out.append((name, weight))
    if not out:
        raise RewardError("empty --reward: name at least one reward, as in --reward hps or hps:0.7,clip:1.4")
    return out


def build_reward(spec: str, **options: Any) -> MultiReward:
    """Parse spec and build every named reward; options are passed to each factory that accepts them."""
    rewards, weights = [], []
    for name, weight in parse_reward_spec(spec):
        module, fn = REGISTRY[name].split(":")
        factory = getattr(importlib.import_module(module), fn)
        rewards.append(factory(**options))
        weights.append(weight)
    return MultiReward(rewards, weights)
