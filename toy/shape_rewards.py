"""Attribute rewards for the small-DiT setting, read from pixels with no downloaded model, and the tools to
measure a generator's attribute frequencies and predict their reward-tilted values.

Every score is computed from a soft foreground mask w = sigmoid((|pixel - background| - 0.2) / 0.05), which is
differentiable in the pixels, and from moments (see `moments`): the colour (weighted towards pure interior pixels),
the coverage m_hat of every pixel, the area a = mean(m_hat) and the centroid c = sum(m_hat p) / sum(m_hat). Each
score maps a distance d to a target into (0, 1] by exp(-d^2 / (2 s^2)), so the reward of a right attribute is ~1
and of a wrong one ~0 (the scales s are a fraction of the gap between attribute values). Media: images
(B, 3, H, W) or videos (B, F, 3, H, W) in [0, 1]; every score returns (B,).

Targets come from the prompt (toy.shapes.parse_prompt) unless a target names one value for every sample (the
factories' option color_target="red" etc.: a reward on an attribute the prompt leaves open, the tilt check). When
neither gives a target, the nearest attribute value is used (a purity score: "be clearly some colour").

Registered in common/rewards.py as dit_color, dit_position, dit_size, dit_shape, dit_sharpness, dit_temporal,
dit_smoothness, dit_motion.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from toy.shapes import (ATTRIBUTES, BACKGROUND, CENTRES, COLORS, MOTION_DIRS, MOTIONS, PALETTE, POSITIONS, RADII,
                        SHAPES, SIZES, SPEED, parse_prompt, render_mask)

FG_THRESHOLD, FG_TEMP = 0.2, 0.05


# ----------------------------------------------------------------------------------------------------------
# Pixel statistics
# ----------------------------------------------------------------------------------------------------------
def foreground(images: torch.Tensor) -> torch.Tensor:
    """Soft foreground mask (B, H, W) of images (B, 3, H, W): sigmoid((|x - background| - 0.2) / 0.05).
    The smallest palette-to-background distance is ~0.8, so shapes give w ~ 1 and the background w ~ 0."""
    bg = torch.tensor(BACKGROUND, device=images.device, dtype=images.dtype)[None, :, None, None]
    dist = torch.sqrt(((images - bg) ** 2).sum(1) + 1e-8)
    return torch.sigmoid((dist - FG_THRESHOLD) / FG_TEMP)


def moments(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Area (B,) as a fraction of the image, centroid (B, 2) as normalised (x, y), colour (B, 3), coverage (B, H, W).

    Anti-aliased edges blend the colour with the background (x = bg + m (col - bg), m the coverage), and on a
    small shape at 32 px they hold about as many pixels as the interior, so plain foreground averages are badly
    biased. Two stages: (1) colour = bg + weighted mean of (x - bg) with weights w |x - bg|^4, which favour the
    pure interior pixels; (2) coverage m_hat = w clamp(<x - bg, col - bg> / |col - bg|^2, 0, 1), the renderer's
    own m, whose sum is the shape's area. The centroid is the m_hat-weighted mean position. An empty image (no
    foreground) falls back to the image centre."""
    bg = torch.tensor(BACKGROUND, device=images.device, dtype=images.dtype)[None, :, None, None]
    diff = images - bg  # (B, 3, H, W)
    w = foreground(images)
    B, H, W = w.shape
    u = w * (diff ** 2).sum(1) ** 2  # w |x - bg|^4
    col_off = (diff * u[:, None]).sum((2, 3)) / u.sum((1, 2)).clamp_min(1e-6)[:, None]  # (B, 3) col - bg
    proj = (diff * col_off[:, :, None, None]).sum(1) / (col_off ** 2).sum(1).clamp_min(1e-4)[:, None, None]
    m = w * proj.clamp(0, 1)  # (B, H, W) coverage
    mass = m.sum((1, 2))
    px = (torch.arange(W, device=w.device, dtype=w.dtype) + 0.5) / W
    py = (torch.arange(H, device=w.device, dtype=w.dtype) + 0.5) / H
    eps = 1e-3  # a pseudo-mass at the centre keeps 0/0 away on empty images
    cx = ((m.sum(1) * px).sum(1) + 0.5 * eps) / (mass + eps)
    cy = ((m.sum(2) * py).sum(1) + 0.5 * eps) / (mass + eps)
    return {"area": mass / (H * W), "centroid": torch.stack([cx, cy], 1), "color": bg[:, :, 0, 0] + col_off,
            "mask": m}


def _frames(media: torch.Tensor, prompts: Sequence[str] | None):
    """Flatten videos (B, F, 3, H, W) to frames (B F, 3, H, W) with prompts repeated; images pass through."""
    if media.ndim == 5:
        B, Fr = media.shape[:2]
        ps = None if prompts is None else [p for p in prompts for _ in range(Fr)]
        return media.reshape(B * Fr, *media.shape[2:]), ps, Fr
    return media, prompts, 1


def _per_sample(scores: torch.Tensor, frames: int) -> torch.Tensor:
    """(B F,) frame scores -> (B,) mean per video (identity for images)."""
    return scores.reshape(-1, frames).mean(1)


def _targets(prompts, n: int, attribute: str, target: str | None, video: bool = False) -> list[str | None]:
    if target is not None:
        if target not in ATTRIBUTES[attribute]:
            from common.rewards import RewardError
            raise RewardError(f"unknown {attribute} {target!r}; choose from {', '.join(ATTRIBUTES[attribute])}")
        return [target] * n
    if prompts is None:
        return [None] * n
    return [parse_prompt(p, video).get(attribute) for p in prompts]


def _kernel(d2: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.exp(-d2 / (2 * scale ** 2))


# ----------------------------------------------------------------------------------------------------------
# Scores (B,)
# ----------------------------------------------------------------------------------------------------------
def color_score(media, prompts=None, target: str | None = None, scale: float = 0.2) -> torch.Tensor:
    """exp(-|m - rgb(target)|^2 / (2 s^2)), m the mean foreground colour; palette colours are >= 0.75 apart."""
    x, ps, Fr = _frames(media, prompts)
    m = moments(x)["color"]
    pal = torch.tensor([PALETTE[c] for c in COLORS], device=x.device, dtype=m.dtype)  # (V, 3)
    d2 = ((m[:, None] - pal[None]) ** 2).sum(-1)  # (N, V)
    tg = _targets(ps, x.shape[0], "color", target)
    idx = torch.tensor([COLORS.index(t) if t else -1 for t in tg], device=x.device)
    idx = torch.where(idx < 0, d2.detach().argmin(1), idx)  # open colour: the nearest one
    return _per_sample(_kernel(d2.gather(1, idx[:, None])[:, 0], scale), Fr)


def position_score(media, prompts=None, target: str | None = None, scale: float = 0.08) -> torch.Tensor:
    """exp(-|c - centre(target)|^2 / (2 s^2)), c the foreground centroid; named centres are 0.25 apart.
    For a video the centroid is averaged over frames first (the path's midpoint)."""
    video = media.ndim == 5
    x, _, Fr = _frames(media, None)
    c = moments(x)["centroid"].reshape(-1, Fr, 2).mean(1)  # (B, 2)
    cen = torch.tensor([CENTRES[p] for p in POSITIONS], device=x.device, dtype=c.dtype)
    d2 = ((c[:, None] - cen[None]) ** 2).sum(-1)
    tg = _targets(prompts, c.shape[0], "position", target) if not video else \
        ([target] * c.shape[0] if target else [None] * c.shape[0])
    idx = torch.tensor([POSITIONS.index(t) if t else -1 for t in tg], device=x.device)
    idx = torch.where(idx < 0, d2.detach().argmin(1), idx)
    return _kernel(d2.gather(1, idx[:, None])[:, 0], scale)


def size_score(media, prompts=None, target: str | None = None, scale: float = 0.25) -> torch.Tensor:
    """exp(-(log a - log pi r^2)^2 / (2 s^2)): area on a log scale (small and large differ by log 2.8 ~ 1)."""
    x, ps, Fr = _frames(media, prompts)
    la = torch.log(moments(x)["area"].clamp_min(1e-4))
    ref = torch.log(torch.tensor([math.pi * RADII[s] ** 2 for s in SIZES], device=x.device, dtype=la.dtype))
    d2 = (la[:, None] - ref[None]) ** 2
    tg = _targets(ps, x.shape[0], "size", target)
    idx = torch.tensor([SIZES.index(t) if t else -1 for t in tg], device=x.device)
    idx = torch.where(idx < 0, d2.detach().argmin(1), idx)
    return _per_sample(_kernel(d2.gather(1, idx[:, None])[:, 0], scale), Fr)


def shape_mismatch(images: torch.Tensor) -> torch.Tensor:
    """(B, 3) template mismatch per shape kind: sum (w - T_k)^2 / sum T_k, T_k the soft mask of kind k rendered at
    the measured centroid with the measured area (radius sqrt(a / pi)). The templates' parameters are detached:
    the gradient reaches the pixels through w only."""
    mo = moments(images)
    w, res = mo["mask"], images.shape[-1]
    c = mo["centroid"].detach()
    r = torch.sqrt(mo["area"].detach().clamp_min(1e-4) / math.pi)
    out = []
    for k in SHAPES:
        T = render_mask([k] * images.shape[0], c[:, 0], c[:, 1], r, res)
        out.append(((w - T) ** 2).sum((1, 2)) / T.sum((1, 2)).clamp_min(1.0))
    return torch.stack(out, 1)


def shape_score(media, prompts=None, target: str | None = None, temperature: float = 0.05) -> torch.Tensor:
    """softmax(-mismatch / T)[target]: the template-matching probability of the wanted shape (open: the largest)."""
    x, ps, Fr = _frames(media, prompts)
    p = torch.softmax(-shape_mismatch(x) / temperature, dim=1)
    tg = _targets(ps, x.shape[0], "shape", target)
    idx = torch.tensor([SHAPES.index(t) if t else -1 for t in tg], device=x.device)
    idx = torch.where(idx < 0, p.detach().argmax(1), idx)
    return _per_sample(p.gather(1, idx[:, None])[:, 0], Fr)


def sharpness_score(media, prompts=None) -> torch.Tensor:
    """Aesthetic proxy: sqrt(mean |grad L|^2) + 2 std(L), L the luminance. The gradient energy (not the total
    variation, which blur leaves unchanged on a monotone edge) falls under blur; the std is the global contrast."""
    x, _, Fr = _frames(media, None)
    L = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]  # (N, H, W)
    gx, gy = L[:, :, 1:] - L[:, :, :-1], L[:, 1:] - L[:, :-1]
    energy = (gx ** 2).mean((1, 2)) + (gy ** 2).mean((1, 2))
    return _per_sample(torch.sqrt(energy + 1e-8) + 2 * L.flatten(1).std(1), Fr)


def _video_stats(videos: torch.Tensor):
    B, Fr = videos.shape[:2]
    mo = moments(videos.reshape(B * Fr, *videos.shape[2:]))
    return {k: v.reshape(B, Fr, *v.shape[1:]) for k, v in mo.items()}


def temporal_score(videos, prompts=None, scale: float = 0.05) -> torch.Tensor:
    """Appearance consistency: exp(-mean_t |d_{t+1} - d_t|^2 / (2 s^2)), d_t = (mean colour, sqrt area) of frame t.
    Motion does not change d_t, so a clean moving shape scores 1; flicker of colour or size lowers it."""
    st = _video_stats(videos)
    d = torch.cat([st["color"], torch.sqrt(st["area"].clamp_min(1e-6))[..., None]], -1)  # (B, F, 4)
    return _kernel(((d[:, 1:] - d[:, :-1]) ** 2).sum(-1).mean(1), scale)


def smoothness_score(videos, prompts=None, scale: float = 0.02) -> torch.Tensor:
    """Motion smoothness: exp(-mean_t |c_{t+1} - 2 c_t + c_{t-1}|^2 / (2 s^2)), c_t the centroid (the squared
    acceleration; constant-velocity paths score 1, SPEED = 0.04 per frame)."""
    c = _video_stats(videos)["centroid"]  # (B, F, 2)
    acc = c[:, 2:] - 2 * c[:, 1:-1] + c[:, :-2]
    return _kernel((acc ** 2).sum(-1).mean(1), scale)


def motion_velocity(videos: torch.Tensor) -> torch.Tensor:
    """Mean centroid velocity per frame (B, 2): (c_last - c_first) / (F - 1)."""
    c = _video_stats(videos)["centroid"]
    return (c[:, -1] - c[:, 0]) / max(1, c.shape[1] - 1)


def motion_score(videos, prompts=None, target: str | None = None, scale: float = 0.012) -> torch.Tensor:
    """exp(-|v - SPEED dir(target)|^2 / (2 s^2)), v the mean centroid velocity (the prompt's motion)."""
    v = motion_velocity(videos)
    ref = torch.tensor([MOTION_DIRS[m] for m in MOTIONS], device=v.device, dtype=v.dtype) * SPEED
    d2 = ((v[:, None] - ref[None]) ** 2).sum(-1)
    tg = _targets(prompts, v.shape[0], "motion", target, video=True)
    idx = torch.tensor([MOTIONS.index(t) if t else -1 for t in tg], device=v.device)
    idx = torch.where(idx < 0, d2.detach().argmin(1), idx)
    return _kernel(d2.gather(1, idx[:, None])[:, 0], scale)


# ----------------------------------------------------------------------------------------------------------
# Reward factories (common/rewards.py REGISTRY): factory(**options) -> Reward; unknown options are ignored
# ----------------------------------------------------------------------------------------------------------
def _factory(fn, name: str, media: str, attribute: str | None):
    """A registry factory for score fn. Its one option is `<attribute>_target` (e.g. color_target="red"): the value
    every sample is scored against, whatever the prompt says. Other options (device, shared flags) are ignored."""
    def make(**options):
        from common.rewards import FnReward, RewardError
        kw = {}
        tgt = options.get(f"{attribute}_target") if attribute else None
        if tgt is not None:
            if tgt not in ATTRIBUTES[attribute]:
                raise RewardError(f"unknown {attribute}_target {tgt!r} for reward {name}; choose from "
                                  f"{', '.join(ATTRIBUTES[attribute])}")
            kw["target"] = tgt
        return FnReward(lambda m, p=None: fn(m, p, **kw), names=name, differentiable=True, media=media,
                        uses_prompts=True)
    make.__doc__ = f"Registry factory of {name} ({fn.__name__})" + \
        (f"; option {attribute}_target." if attribute else "; no options.")
    return make


color_reward = _factory(color_score, "dit_color", "any", "color")
position_reward = _factory(position_score, "dit_position", "any", "position")
size_reward = _factory(size_score, "dit_size", "any", "size")
shape_reward = _factory(shape_score, "dit_shape", "any", "shape")
sharpness_reward = _factory(sharpness_score, "dit_sharpness", "any", None)
temporal_reward = _factory(temporal_score, "dit_temporal", "video", None)
smoothness_reward = _factory(smoothness_score, "dit_smoothness", "video", None)
motion_reward = _factory(motion_score, "dit_motion", "video", "motion")


# ----------------------------------------------------------------------------------------------------------
# Attribute classification and frequencies
# ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def classify_attributes(media: torch.Tensor) -> dict[str, torch.Tensor]:
    """Pixel classifier of every attribute: {attribute: (B,) long index into toy.shapes.ATTRIBUTES[attribute]}.

    colour: nearest palette colour to the mean foreground colour; position: nearest named centre to the centroid;
    size: nearest reference area on a log scale; shape: smallest template mismatch. Videos: statistics averaged
    over frames, and motion: nearest SPEED dir to the mean centroid velocity (no 'position' for videos).
    """
    video = media.ndim == 5
    x, _, Fr = _frames(media, None)
    mo = moments(x)
    col = mo["color"].reshape(-1, Fr, 3).mean(1)
    pal = torch.tensor([PALETTE[c] for c in COLORS], device=x.device)
    la = torch.log(mo["area"].clamp_min(1e-4)).reshape(-1, Fr).mean(1)
    ref = torch.log(torch.tensor([math.pi * RADII[s] ** 2 for s in SIZES], device=x.device))
    out = {"color": ((col[:, None] - pal[None]) ** 2).sum(-1).argmin(1),
           "size": ((la[:, None] - ref[None]) ** 2).argmin(1),
           "shape": shape_mismatch(x).reshape(-1, Fr, len(SHAPES)).mean(1).argmin(1)}
    if video:
        v = motion_velocity(media)
        refm = torch.tensor([MOTION_DIRS[m] for m in MOTIONS], device=x.device) * SPEED
        out["motion"] = ((v[:, None] - refm[None]) ** 2).sum(-1).argmin(1)
    else:
        cen = torch.tensor([CENTRES[p] for p in POSITIONS], device=x.device)
        out["position"] = ((mo["centroid"][:, None] - cen[None]) ** 2).sum(-1).argmin(1)
    return out


def attribute_frequencies(labels: torch.Tensor, attribute: str) -> torch.Tensor:
    """Empirical frequencies (V,) float64 of an attribute's values from (N,) class indices (sums to 1)."""
    V = len(ATTRIBUTES[attribute])
    return torch.bincount(labels.reshape(-1).long().cpu(), minlength=V)[:V].double() / max(1, labels.numel())


def sample_frequencies(media: torch.Tensor, attribute: str) -> torch.Tensor:
    """A generator's attribute frequencies (V,) estimated from its samples by classify_attributes."""
    return attribute_frequencies(classify_attributes(media)[attribute], attribute)


def tilted_frequencies(p_teacher: torch.Tensor, r: torch.Tensor, beta: float) -> torch.Tensor:
    """The reward-tilted distribution of an attribute: p(a) = p_T(a) exp(beta r(a)) / Z, Z = sum p_T exp(beta r).

    p_teacher (V,) the teacher's frequencies, r (V,) the reward of each value. Exact for the marginal of an attribute
    the prompt leaves open when the reward depends on that attribute only. Computed in float64 through
    log-sum-exp (beta r can be large); values with p_T = 0 stay at 0."""
    p = p_teacher.double()
    logits = torch.log(p.clamp_min(1e-300)) + beta * r.double().to(p.device)
    out = torch.softmax(logits, 0)
    return torch.where(p > 0, out, torch.zeros_like(out))


@torch.no_grad()
def reward_by_value(reward, attribute: str, video: bool = False, n: int = 32, prompt: str = "",
                    res: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """r(a) for every value a of `attribute` (V,): the mean reward of n ground-truth renders with that value and the
    other attributes uniform. reward: a common.rewards.Reward or a function (media, prompts) -> (B,)."""
    from toy.shapes import render
    keys = ("shape", "color", "size", "motion") if video else ("shape", "color", "size", "position")
    out = []
    for val in ATTRIBUTES[attribute]:
        attrs = []
        for _ in range(n):
            a = {k: ATTRIBUTES[k][int(torch.randint(len(ATTRIBUTES[k]), (1,), generator=generator))] for k in keys}
            a[attribute] = val
            attrs.append(a)
        media = render(attrs, res or (16 if video else 32), generator=generator)
        r = reward(media, [prompt] * n)
        out.append(r.reshape(n, -1)[:, 0].float().mean())
    return torch.stack(out)
