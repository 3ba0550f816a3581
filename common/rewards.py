"""Rewards behind one multi-objective interface.

A Reward takes decoded media and prompts and returns a (B, M) float32 tensor, one column per named objective
(M = 1 for a single reward). Media: points (B, 2); images (B, 3, H, W) in [0, 1]; videos (B, F, 3, H, W) in [0, 1].
Higher is better. `differentiable` says whether gradients reach the media.

Two scales. `reward(media, prompts)` is the TRAINING scale (what a method optimises: cosine similarities for the
CLIP-family rewards, so that weights such as hps:0.7,clip:1.4 and a gate temperature in reward units mean the same
thing across rewards); `reward.table(media, prompts)` = training scale * `table_scale` is the scale the papers'
tables report (HPS x100, PickScore as the logit, CLIP score x100, ImageReward and aesthetic raw).

The command line names rewards as `--reward hps` or `--reward hps:0.7,clip:1.4`: parse_reward_spec turns that
into (name, weight) pairs and build_reward into a MultiReward whose columns are the named objectives and whose
`combine` is the weighted sum (the static scalarisation every GRPO baseline uses). A name may carry the prefix
`frames:` (`frames:hps:0.5`): the image reward averaged over frames sampled evenly from each video.

Registry entries are "module:factory" strings imported on demand, so the toy never imports open_clip. The real
reward models (HPSv2.1, PickScore, CLIP score, LAION aesthetic, ImageReward, and the CLIP-based video rewards)
live in common/reward_models.py, VideoAlign's VQ / MQ / TA heads in common/videoalign.py; their weights come from
build_reward options (the scripts' --reward-opts k=v,k=v, parse_reward_opts) or environment variables (HPS_CKPT,
PICKSCORE_PATH, CLIP_PATH, AESTHETIC_CKPT, IMAGEREWARD_CKPT, VIDEOALIGN_PATH, ...; see those modules' docstrings), and
every factory takes tiny=True for a tiny random model of the same architecture (offline smoke runs).
"""
from __future__ import annotations

import abc
import importlib
import inspect
from typing import Any, Callable, Sequence

import torch


class RewardError(ValueError):
    """A user-facing reward problem (unknown name, bad weight, missing weights file): one clear line."""


class RewardWeightsMissing(RewardError, FileNotFoundError):
    """A reward's weights file or directory is missing: the message names what to download and where to put it."""


FRAMES_PREFIX = "frames:"


class Reward(abc.ABC):
    """Base class. Subclasses set `names` (objective names), `differentiable`, `media`, and implement score().

    `table_scale` (one float per objective) maps the training scale to the papers' table scale."""

    names: list[str] = ["reward"]
    differentiable: bool = True
    media: str = "any"  # "points" | "image" | "video" | "any"

    @abc.abstractmethod
    def score(self, media: torch.Tensor, prompts: Sequence[str] | None = None) -> torch.Tensor:
        """(B, M) float32 rewards on the training scale."""

    def __call__(self, media: torch.Tensor, prompts: Sequence[str] | None = None) -> torch.Tensor:
        out = self.score(media, prompts)
        return out[:, None] if out.ndim == 1 else out

    @property
    def table_scale(self) -> list[float]:
        return list(getattr(self, "_table_scale", None) or [1.0] * len(self.names))

    @table_scale.setter
    def table_scale(self, value: Sequence[float] | float) -> None:
        v = [float(value)] * len(self.names) if isinstance(value, (int, float)) else [float(x) for x in value]
        self._table_scale = v

    def table(self, media: torch.Tensor, prompts: Sequence[str] | None = None) -> torch.Tensor:
        """(B, M) rewards on the papers' table scale: training scale times table_scale, column by column."""
        r = self(media, prompts)
        return r * torch.tensor(self.table_scale, dtype=r.dtype, device=r.device)

    def to(self, device) -> "Reward":
        for v in vars(self).values():
            if isinstance(v, torch.nn.Module):
                v.to(device)
            elif isinstance(v, Reward):
                v.to(device)
        return self


class FnReward(Reward):
    """Wrap a function media -> (B,) (or (B, M)) as a Reward: the toy and small-DiT rewards use this."""

    def __init__(self, fn: Callable[..., torch.Tensor], names: Sequence[str] | str = "reward",
                 differentiable: bool = True, media: str = "any", uses_prompts: bool = False,
                 table_scale: Sequence[float] | float | None = None):
        self.fn, self.uses_prompts = fn, uses_prompts
        self.names = [names] if isinstance(names, str) else list(names)
        self.differentiable, self.media = differentiable, media
        if table_scale is not None:
            self.table_scale = table_scale

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
        self.table_scale = [s for r in self.rewards for s in r.table_scale]

    def score(self, media, prompts=None):
        return torch.cat([r(media, prompts) for r in self.rewards], dim=1)

    def combine(self, r: torch.Tensor) -> torch.Tensor:
        """(B, M) -> (B,): the static weighted sum."""
        return r @ self.weights.to(r.device)

    def to(self, device):
        for r in self.rewards:
            r.to(device)
        return self


# ----- video helpers (pure functions) -----------------------------------------------------------------------

def frame_indices(num_frames: int, n: int) -> torch.Tensor:
    """Indices of n frames spread evenly over [0, num_frames - 1], first and last included when n >= 2, the
    middle frame when n = 1, all frames if n <= 0 or n >= num_frames. Deterministic, so that a group's videos
    are scored on the same frames."""
    if n <= 0 or n >= num_frames:
        return torch.arange(num_frames)
    if n == 1:
        return torch.tensor([(num_frames - 1) // 2])
    return torch.linspace(0, num_frames - 1, n).round().long().unique()


def per_frame(score_images: Callable[[torch.Tensor, Sequence[str] | None], torch.Tensor], video: torch.Tensor,
              prompts: Sequence[str] | None, n_frames: int = 4) -> torch.Tensor:
    """Average an image scorer over sampled frames.

    video (B, F, 3, H, W) -> frames idx (K,) -> images (B*K, 3, H, W) with prompts repeated per frame ->
    scores (B*K, M) -> mean over the K frames -> (B, M):  r(v) = (1/K) sum_k r(v[:, idx_k])."""
    b = video.shape[0]
    idx = frame_indices(video.shape[1], n_frames).to(video.device)
    k = idx.numel()
    imgs = video[:, idx].reshape(b * k, *video.shape[2:])  # row b*K + j is video b, sampled frame j
    rep = None if prompts is None else [p for p in prompts for _ in range(k)]
    s = score_images(imgs, rep)
    s = s[:, None] if s.ndim == 1 else s
    return s.reshape(b, k, -1).mean(1)


def motion_smoothness(video: torch.Tensor, max_side: int = 64) -> torch.Tensor:
    """Motion smoothness of videos (B, F, 3, H, W), F >= 3 -> (B,), <= 0, higher is smoother.

    Frames are first area-averaged to at most max_side pixels (so that pixel noise and resolution do not
    dominate), then  s = -(1/(F-2)) sum_t mean_pixels (x_{t+1} - 2 x_t + x_{t-1})^2,  the mean squared second
    difference in time (acceleration). A static video and any video whose pixels change at a constant rate
    score exactly 0 (the maximum); jitter scores below 0."""
    if video.ndim != 5 or video.shape[1] < 3:
        raise RewardError(f"motion_smoothness needs videos (B, F>=3, 3, H, W), got shape {tuple(video.shape)}")
    b, f, c, h, w = video.shape
    x = video.reshape(b * f, c, h, w)
    factor = max(1, -(-max(h, w) // max_side))  # ceil(max(h, w) / max_side)
    if factor > 1:
        x = torch.nn.functional.avg_pool2d(x, factor, ceil_mode=True)
    x = x.reshape(b, f, -1).float()
    acc = x[:, 2:] - 2 * x[:, 1:-1] + x[:, :-2]  # (B, F-2, P): second difference in time
    return -acc.pow(2).mean(dim=(1, 2))


class FramesReward(Reward):
    """An image reward applied to videos (B, F, 3, H, W): the mean over `frames` evenly sampled frames."""

    def __init__(self, inner: Reward, frames: int = 4, names: Sequence[str] | None = None):
        self.inner, self.frames = inner, int(frames)
        self.names = list(names) if names is not None else list(inner.names)
        self.differentiable = inner.differentiable
        self.media = "video"
        self.table_scale = inner.table_scale

    def score(self, media, prompts=None):
        if media.ndim != 5:
            raise RewardError(f"{'/'.join(self.names)} scores videos (B, F, 3, H, W), got shape {tuple(media.shape)}")
        return per_frame(self.inner, media, prompts, self.frames)


def motion_smoothness_reward(max_side: int = 64, **_: Any) -> Reward:
    """Registry factory: motion smoothness (no model, differentiable)."""
    return FnReward(lambda v: motion_smoothness(v, max_side), names="motion_smoothness", media="video")


# name -> "module:factory"; factory(**options) -> Reward. Other modules may add entries with register().
REGISTRY: dict[str, str] = {}
REGISTRY["toy_linear"] = "toy.rewards:linear_reward"
REGISTRY["toy_quadratic"] = "toy.rewards:quadratic_reward"
REGISTRY["toy_mode"] = "toy.rewards:mode_reward"
REGISTRY["toy_otca"] = "toy.rewards:otca_reward"
REGISTRY["dit_color"] = "toy.shape_rewards:color_reward"
REGISTRY["dit_position"] = "toy.shape_rewards:position_reward"
REGISTRY["dit_size"] = "toy.shape_rewards:size_reward"
REGISTRY["dit_shape"] = "toy.shape_rewards:shape_reward"
REGISTRY["dit_sharpness"] = "toy.shape_rewards:sharpness_reward"
REGISTRY["dit_temporal"] = "toy.shape_rewards:temporal_reward"
REGISTRY["dit_smoothness"] = "toy.shape_rewards:smoothness_reward"
REGISTRY["dit_motion"] = "toy.shape_rewards:motion_reward"


def register(name: str, target: str) -> None:
    """Register a reward factory under `name` ("module:function")."""
    REGISTRY[name] = target


# Real image rewards (common/reward_models.py; imports open_clip / transformers only when built)
register("hps", "common.reward_models:hps")
register("pickscore", "common.reward_models:pickscore")
register("clip", "common.reward_models:clip_score")
register("aesthetic", "common.reward_models:aesthetic")
register("imagereward", "common.reward_models:image_reward")
# Video objectives (OTCA's video setting); any image reward also works on videos as frames:<name>
register("temporal_consistency", "common.reward_models:temporal_consistency")
register("motion_smoothness", "common.rewards:motion_smoothness_reward")
register("text_alignment", "common.reward_models:text_alignment")
# VideoAlign's VideoReward on Qwen2-VL (common/videoalign.py): OTCA's video training rewards, VQ / MQ / TA heads
register("videoalign", "common.videoalign:videoalign")          # three objectives VQ, MQ, TA
register("videoalign_vq", "common.videoalign:videoalign_vq")    # one head each (one model shared when built together)
register("videoalign_mq", "common.videoalign:videoalign_mq")
register("videoalign_ta", "common.videoalign:videoalign_ta")


def _known(name: str) -> bool:
    base = name[len(FRAMES_PREFIX):] if name.startswith(FRAMES_PREFIX) else name
    return base in REGISTRY and not base.startswith(FRAMES_PREFIX)


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def parse_reward_spec(spec: str) -> list[tuple[str, float]]:
    """'hps' -> [('hps', 1.0)]; 'hps:0.7,clip:1.4' -> [('hps', 0.7), ('clip', 1.4)];
    'frames:hps:0.5' -> [('frames:hps', 0.5)]. Raises RewardError (one line) on an unknown name or a bad weight."""
    out = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        if _known(part):  # a bare name, possibly with the frames: prefix
            name, w = part, ""
        else:
            name, _, w = part.rpartition(":")
            if not name or not _known(name):
                name = name if name and _is_number(w) else part  # "clipp:2" -> 'clipp'; "frames:nope" -> all
                raise RewardError(f"unknown reward {name!r}; choose from {', '.join(sorted(REGISTRY))} "
                                  f"(or {FRAMES_PREFIX}<image reward> for videos)")
        try:
            weight = float(w) if w else 1.0
        except ValueError:
            raise RewardError(f"bad weight {w!r} for reward {name!r}: expected a number, as in {name}:0.7") from None
        if weight != weight or weight in (float("inf"), float("-inf")):
            raise RewardError(f"bad weight {w!r} for reward {name!r}: expected a finite number")
        out.append((name, weight))
    if not out:
        raise RewardError("empty --reward: name at least one reward, as in --reward hps or hps:0.7,clip:1.4")
    return out


def parse_reward_options(items: Sequence[str] | None) -> dict[str, Any]:
    """Command-line reward options ["hps_ckpt=/w/HPS.pt", "frames=8", "tiny=true"] -> {"hps_ckpt": "/w/HPS.pt",
    "frames": 8, "tiny": True} (ints, floats and true/false converted; other values stay strings), to pass to
    build_reward(spec, **options). Raises RewardError (one line) on an item without "=" or an empty key."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, eq, val = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or not key:
            raise RewardError(f"bad reward option {item!r}: expected key=value, as in hps_ckpt=/path/HPS_v2.1.pt")
        low = val.strip().lower()
        if low in ("true", "false"):
            out[key] = low == "true"
        else:
            for cast in (int, float):
                try:
                    out[key] = cast(val)
                    break
                except ValueError:
                    continue
            else:
                out[key] = val
    return out


def _factory(name: str) -> Callable[..., Reward]:
    module, fn = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), fn)


def reward_option_names(spec: str) -> set[str] | None:
    """The options the factories of `spec` take by name (plus `frames` for a frames:<image reward>), or None when
    one of them takes any option (a **kw that it reads, such as the DiT rewards' color_target; a catch-all **_
    that only ignores the options meant for other factories does not count)."""
    names: set[str] = set()
    for name, _ in parse_reward_spec(spec):
        if name.startswith(FRAMES_PREFIX):
            name = name[len(FRAMES_PREFIX):]
            names.add("frames")
        for p in inspect.signature(_factory(name)).parameters.values():
            if p.kind is inspect.Parameter.VAR_KEYWORD:
                if p.name != "_":
                    return None
            elif p.kind is not inspect.Parameter.VAR_POSITIONAL:
                names.add(p.name)
    return names


def parse_reward_opts(text: str, reserved: Sequence[str] = (), spec: str | None = None) -> dict[str, Any]:
    """The scripts' --reward-opts flag, "k=v,k=v" (e.g. "videoalign_frames=8,videoalign_source_fps=16" or
    "hps_ckpt=/w/HPS_v2.1.pt"), as build_reward options: parse_reward_options of the comma-separated items ('' -> {}).
    reserved: the keys the script passes itself from its own flags (tiny, device). spec: the --reward spec, whose
    factories must take every key (reward_option_names; unchecked when one takes any option), so that a misspelt
    key is not dropped in silence. Raises RewardError (one line naming the flag) on an item without "=", an empty
    key, a reserved key or a key no factory of `spec` takes."""
    try:
        opts = parse_reward_options([item.strip() for item in text.split(",") if item.strip()])
    except RewardError as e:
        raise RewardError(f"--reward-opts {text!r}: {e}") from None
    for key in opts:
        if key in reserved:
            raise RewardError(f"--reward-opts {text!r}: {key} is set from the script's own flags, not here")
    known = reward_option_names(spec) if spec and opts else None
    unknown = sorted(set(opts) - known) if known is not None else []
    if unknown:
        options = ", ".join(sorted(known - set(reserved))) or "none"
        raise RewardError(f"--reward-opts {text!r}: no reward of --reward {spec} takes {unknown[0]!r} (its options: "
                          f"{options})")
    return opts


def _call_factory(name: str, options: dict[str, Any]) -> Reward:
    """Import REGISTRY[name] and call it with the options its signature accepts (all of them if it takes **kw)."""
    factory = _factory(name)
    params = inspect.signature(factory).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        options = {k: v for k, v in options.items() if k in params}
    return factory(**options)


def build_reward(spec: str, **options: Any) -> MultiReward:
    """Parse spec and build every named reward; options are passed to each factory that accepts them.

    Common options: tiny (bool), device, dtype, seed, frames (frames sampled per video); per-model weight
    locations (hps_ckpt, pickscore_path, clip_path, aesthetic_ckpt, imagereward_ckpt, ...: see
    common/reward_models.py). Two names giving the same objective name raise RewardError."""
    rewards, weights = [], []
    for name, weight in parse_reward_spec(spec):
        if name.startswith(FRAMES_PREFIX):
            inner = _call_factory(name[len(FRAMES_PREFIX):], options)
            reward = inner if inner.media == "video" else FramesReward(inner, int(options.get("frames", 4)))
        else:
            reward = _call_factory(name, options)
        rewards.append(reward)
        weights.append(weight)
    names = [n for r in rewards for n in r.names]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise RewardError(f"reward objective {dup[0]!r} named twice in {spec!r}; name each reward once")
    return MultiReward(rewards, weights)
