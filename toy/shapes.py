"""Procedural shapes: the small-DiT setting's dataset, prompts and ground truth (no downloads).

An image is one shape (circle, square, triangle) of one colour, at one position (left, right, top, bottom,
centre) and of one size (small, large), on a fixed dark background; its prompt names the attributes, e.g.
"a large red circle on the left". A prompt may leave any attribute open ("a red shape", "a circle at the top"):
the dataset then draws it uniformly, so a reward on that attribute can tilt its distribution and the tilt can be
predicted from the teacher's own frequencies (toy/shape_rewards.py).

A video is F frames of a shape moving left/right/up/down (or still) through the middle of the frame:
"a small blue square moving left". Videos are (F, 3, H, W) in [0, 1].

Rendering is a soft signed-distance mask, differentiable in the centre, size and colour, so the same renderer
makes the data and the templates of the shape reward. Shapes of one size have equal AREA whatever their kind,
so the size reward can read the area alone and the shape reward cannot cheat on size.
Coordinates are normalised to [0, 1] with y pointing down (row index), x to the right.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

import torch

# ----- the grammar's attribute values ------------------------------------------------------------------------
SHAPES = ("circle", "square", "triangle")
COLORS = ("red", "green", "blue", "yellow")
POSITIONS = ("left", "right", "top", "bottom", "centre")
SIZES = ("small", "large")
MOTIONS = ("left", "right", "up", "down", "still")
ATTRIBUTES = {"shape": SHAPES, "color": COLORS, "position": POSITIONS, "size": SIZES, "motion": MOTIONS}

# RGB in [0, 1]; pairwise distances >= 0.75 so the nearest-colour classifier has a wide margin.
PALETTE = {"red": (0.90, 0.15, 0.15), "green": (0.15, 0.80, 0.20), "blue": (0.20, 0.30, 0.95),
           "yellow": (0.95, 0.90, 0.15)}
BACKGROUND = (0.12, 0.12, 0.12)
CENTRES = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75),
           "centre": (0.5, 0.5)}
# "radius" r: a circle's radius; squares and triangles get the circle's area pi r^2.
RADII = {"small": 0.12, "large": 0.20}
# Per-frame displacement of a moving shape (normalised units); y points down, so "up" is -y.
MOTION_DIRS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0), "still": (0.0, 0.0)}
SPEED = 0.04
POSITION_PHRASE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
                   "centre": "in the centre"}

# Word-level vocabulary of the grammar. 0 = padding, 1 = BOS (every sequence starts with it, so the null prompt is
# [BOS] and no row is fully masked), 2 = unknown word.
SPECIALS = ("<pad>", "<bos>", "<unk>")
WORDS = ("a", "shape", "on", "the", "at", "in", "moving") + SIZES + COLORS + SHAPES + POSITIONS + \
    ("up", "down", "still")
VOCAB = {w: i for i, w in enumerate(SPECIALS + tuple(dict.fromkeys(WORDS)))}
PAD, BOS, UNK = 0, 1, 2


def tokenize(prompts: Sequence[str], max_len: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Word-level tokens of the grammar. Returns ids (B, L) long and mask (B, L) bool (True = real token).

    L = max_len; each row is [BOS, w1, ..., wn, PAD...]; words outside the vocabulary map to UNK; longer prompts
    are truncated. The empty prompt "" is the null (unconditional) prompt: [BOS] alone.
    """
    ids = torch.full((len(prompts), max_len), PAD, dtype=torch.long)
    for i, p in enumerate(prompts):
        words = re.findall(r"[a-z]+", p.lower())
        row = [BOS] + [VOCAB.get(w, UNK) for w in words]
        row = row[:max_len]
        ids[i, :len(row)] = torch.tensor(row)
    return ids, ids != PAD


# ----- prompts ---------------------------------------------------------------------------------------------
def make_prompt(attrs: dict) -> str:
    """Attributes (None = left open) -> prompt. Keys: shape, color, size, and position (image) or motion (video)."""
    words = ["a"]
    if attrs.get("size"):
        words.append(attrs["size"])
    if attrs.get("color"):
        words.append(attrs["color"])
    words.append(attrs.get("shape") or "shape")
    if attrs.get("motion"):
        words += ["moving", attrs["motion"]]
    elif attrs.get("position"):
        words.append(POSITION_PHRASE[attrs["position"]])
    return " ".join(words)


def parse_prompt(prompt: str, video: bool = False) -> dict:
    """Prompt -> requested attributes {shape, color, size, position | motion}, None where the prompt is silent.

    The inverse of make_prompt on the grammar; words outside it are ignored (so a free-form prompt gives all None).
    """
    words = re.findall(r"[a-z]+", prompt.lower())
    out = {k: None for k in (("shape", "color", "size", "motion") if video else ("shape", "color", "size",
                                                                                "position"))}
    for w in words:
        if w in SHAPES:
            out["shape"] = w
        elif w in COLORS:
            out["color"] = w
        elif w in SIZES:
            out["size"] = w
    if video:
        if "moving" in words:
            i = words.index("moving")
            if i + 1 < len(words) and words[i + 1] in MOTIONS:
                out["motion"] = words[i + 1]
    else:
        for w in words:
            if w in POSITIONS:
                out["position"] = w
    return out


def _keys(video: bool) -> tuple[str, ...]:
    return ("shape", "color", "size", "motion") if video else ("shape", "color", "size", "position")


def heldout(attrs: dict) -> bool:
    """The held-out (eval) combinations: fully specified prompts whose (shape, colour, place) index is 0 mod 7.

    A deterministic ~1/7 of the full combinations; the training prompts never name them in full, so the eval split
    measures composition. The rule uses only the values, not Python's salted hash.
    """
    place = attrs.get("position") or attrs.get("motion")
    if None in (attrs.get("shape"), attrs.get("color"), attrs.get("size"), place):
        return False
    places = MOTIONS if attrs.get("motion") else POSITIONS
    idx = ((SHAPES.index(attrs["shape"]) * len(COLORS) + COLORS.index(attrs["color"])) * len(places)
           + places.index(place)) * len(SIZES) + SIZES.index(attrs["size"])
    return idx % 7 == 0


def all_full_attrs(video: bool = False) -> list[dict]:
    """Every fully specified combination, in a fixed order."""
    places = MOTIONS if video else POSITIONS
    pk = "motion" if video else "position"
    return [{"shape": s, "color": c, pk: p, "size": z} for s in SHAPES for c in COLORS for p in places for z in SIZES]


def split_prompts(split: str, video: bool = False) -> list[str]:
    """Fixed prompt lists. 'train': fully specified non-held-out prompts plus one open prompt per attribute value;
    'eval': the held-out fully specified prompts; 'open': prompts that leave the colour open (the tilt check)."""
    full = all_full_attrs(video)
    if split == "train":
        out = [make_prompt(a) for a in full if not heldout(a)]
        out += [make_prompt({k: v}) for k in _keys(video) for v in ATTRIBUTES[k]]
        return out
    if split == "eval":
        return [make_prompt(a) for a in full if heldout(a)]
    if split == "open":
        pk = "motion" if video else "position"
        return [make_prompt({"shape": s, pk: p}) for s in SHAPES for p in ATTRIBUTES[pk]]
    raise KeyError(f"unknown prompt split {split!r}; choose train, eval or open")


# ----- sampling attributes -----------------------------------------------------------------------------------
@dataclass
class Batch:
    """A batch of the dataset. media: (B, 3, H, W) or (B, F, 3, H, W) in [0, 1]; prompts; attrs: the ground truth
    (every attribute filled, including those the prompt left open); labels: {attribute: (B,) long index}."""
    media: torch.Tensor
    prompts: list[str]
    attrs: list[dict]
    labels: dict[str, torch.Tensor]


def sample_attrs(n: int, video: bool = False, p_open: float = 0.3, generator: torch.Generator | None = None,
                 exclude_heldout: bool = True) -> tuple[list[dict], list[dict]]:
    """Draw n (full attributes, prompted attributes) pairs: each attribute uniform, each left open in the prompt
    with probability p_open. Fully specified held-out combinations are redrawn when exclude_heldout."""
    keys = _keys(video)
    full, said = [], []
    while len(full) < n:
        idx = torch.randint(0, 1 << 30, (len(keys),), generator=generator)
        a = {k: ATTRIBUTES[k][int(i) % len(ATTRIBUTES[k])] for k, i in zip(keys, idx)}
        open_ = torch.rand(len(keys), generator=generator) < p_open
        s = {k: (None if o else a[k]) for k, o in zip(keys, open_.tolist())}
        if exclude_heldout and heldout(s):
            continue
        full.append(a)
        said.append(s)
    return full, said


def labels_of(attrs: Sequence[dict], video: bool = False) -> dict[str, torch.Tensor]:
    """{attribute: (B,) long index into ATTRIBUTES[attribute]} for full attribute dicts."""
    return {k: torch.tensor([ATTRIBUTES[k].index(a[k]) for a in attrs], dtype=torch.long) for k in _keys(video)}


# ----- rendering ---------------------------------------------------------------------------------------------
def shape_sdf(kind: str, px: torch.Tensor, py: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor,
              r: torch.Tensor) -> torch.Tensor:
    """Signed distance (negative inside, normalised units) of an upright shape of circle-radius r centred at (cx, cy).

    px, py: pixel-centre coordinates broadcastable against cx, cy, r. Equal area pi r^2 for every kind:
    square half-side h = r sqrt(pi) / 2; equilateral triangle circumradius R = r sqrt(4 pi / (3 sqrt 3)), whose
    edges lie at distance R / 2 from the centroid along the normals (0, 1), (+-sqrt(3)/2, -1/2) (apex up, y down).
    The square and triangle distances are the max of half-plane distances (exact inside, a lower bound outside),
    which is all a one-pixel soft edge needs.
    """
    dx, dy = px - cx, py - cy
    if kind == "circle":
        return torch.sqrt(dx ** 2 + dy ** 2 + 1e-12) - r
    if kind == "square":
        return torch.maximum(dx.abs(), dy.abs()) - r * (math.sqrt(math.pi) / 2)
    if kind == "triangle":
        R = r * math.sqrt(4 * math.pi / (3 * math.sqrt(3)))
        c, s = math.sqrt(3) / 2, 0.5
        d = torch.maximum(torch.maximum(dy, c * dx - s * dy), -c * dx - s * dy)
        return d - R / 2
    raise ValueError(f"unknown shape {kind!r}")


def pixel_grid(res: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-centre coordinates (res, res) each: px[i, j] = (j + 0.5) / res, py[i, j] = (i + 0.5) / res."""
    u = (torch.arange(res, device=device, dtype=torch.float32) + 0.5) / res
    return u[None, :].expand(res, res), u[:, None].expand(res, res)


def render_mask(kinds: Sequence[str], cx: torch.Tensor, cy: torch.Tensor, r: torch.Tensor, res: int,
                softness: float = 0.6) -> torch.Tensor:
    """Soft coverage masks (B, res, res) in [0, 1]: sigmoid(-sdf * res / softness), about one pixel of anti-aliasing.

    kinds: B shape names; cx, cy, r: (B,) float tensors (differentiable)."""
    px, py = pixel_grid(res, cx.device)
    cx, cy, r = (t[:, None, None] for t in (cx, cy, r))  # (B, 1, 1) against the (res, res) grid
    d = torch.zeros(len(kinds), res, res, device=cx.device, dtype=cx.dtype)
    for k in set(kinds):  # one vectorised SDF per kind present, selected per sample
        sel = torch.tensor([q == k for q in kinds], device=cx.device)[:, None, None]
        d = torch.where(sel, shape_sdf(k, px, py, cx, cy, r), d)
    return torch.sigmoid(-d * res / softness)


def composite(mask: torch.Tensor, rgb: torch.Tensor) -> torch.Tensor:
    """Image = background (1 - m) + colour m. mask (B, H, W), rgb (B, 3) -> (B, 3, H, W) in [0, 1]."""
    bg = torch.tensor(BACKGROUND, device=mask.device, dtype=mask.dtype)[None, :, None, None]
    m = mask[:, None]
    return bg * (1 - m) + rgb[:, :, None, None] * m


def render(attrs: Sequence[dict], res: int = 32, frames: int = 8, generator: torch.Generator | None = None,
           jitter: bool = True) -> torch.Tensor:
    """Render full attribute dicts: images (B, 3, res, res), or videos (B, F, 3, res, res) when they carry 'motion'.

    jitter: small random offsets of the centre (+-0.03) and the radius (+-6%) so a prompt has many images.
    A video's centre path is c_t = start + SPEED dir (t - (F - 1) / 2), start near the image centre.
    """
    B = len(attrs)
    video = "motion" in attrs[0]
    jx = (torch.rand(B, generator=generator) * 2 - 1) * 0.03 if jitter else torch.zeros(B)
    jy = (torch.rand(B, generator=generator) * 2 - 1) * 0.03 if jitter else torch.zeros(B)
    jr = 1 + ((torch.rand(B, generator=generator) * 2 - 1) * 0.06 if jitter else torch.zeros(B))
    r = torch.tensor([RADII[a["size"]] for a in attrs]) * jr
    rgb = torch.tensor([PALETTE[a["color"]] for a in attrs])
    kinds = [a["shape"] for a in attrs]
    if not video:
        c = torch.tensor([CENTRES[a["position"]] for a in attrs])
        return composite(render_mask(kinds, c[:, 0] + jx, c[:, 1] + jy, r, res), rgb)
    d = torch.tensor([MOTION_DIRS[a["motion"]] for a in attrs])  # (B, 2)
    out = []
    for t in range(frames):
        off = SPEED * (t - (frames - 1) / 2)
        cx, cy = 0.5 + jx + off * d[:, 0], 0.5 + jy + off * d[:, 1]
        out.append(composite(render_mask(kinds, cx, cy, r, res), rgb))
    return torch.stack(out, 1)  # (B, F, 3, H, W)


def make_batch(n: int, video: bool = False, res: int | None = None, frames: int = 8, p_open: float = 0.3,
               generator: torch.Generator | None = None, exclude_heldout: bool = True) -> Batch:
    """n samples of the training distribution: media, prompts, full attributes, labels. res default 32 (image)
    or 16 (video, to keep the tiny CPU preset cheap)."""
    res = res or (16 if video else 32)
    full, said = sample_attrs(n, video, p_open, generator, exclude_heldout)
    media = render(full, res, frames, generator)
    return Batch(media, [make_prompt(s) for s in said], full, labels_of(full, video))


def batch_for_prompts(prompts: Sequence[str], video: bool = False, res: int | None = None, frames: int = 8,
                      generator: torch.Generator | None = None) -> Batch:
    """Ground-truth samples for given prompts: open attributes drawn uniformly (the data distribution given the
    prompt). The reference any generator is compared with."""
    res = res or (16 if video else 32)
    full = []
    for p in prompts:
        want = parse_prompt(p, video)
        a = {}
        for k, v in want.items():
            vals = ATTRIBUTES[k]
            a[k] = v if v is not None else vals[int(torch.randint(len(vals), (1,), generator=generator))]
        full.append(a)
    return Batch(render(full, res, frames, generator), list(prompts), full, labels_of(full, video))
