"""A small pixel-space DiT for the synthetic shapes setting (toy/shapes.py), and its Backend ("--teacher dit").

Model (Peebles & Xie's DiT, written for this repository): patch embedding -> N adaLN-Zero transformer blocks ->
adaLN final layer -> unpatchify. Images (3, H, W) are cut into p x p patches; videos (3, F, H, W) into p x p
patches of every frame (tokens F * H/p * W/p, full attention over space and time). Positions: fixed 2D sin-cos
over the patch grid, plus a learned per-frame embedding for video. The condition c = MLP(sincos(1000 sigma)) +
pooled text features drives every block's shift/scale/gate (the gates and the final layer start at zero, so the
network starts as v = 0). The text encoder is built from the dataset's grammar: word ids (toy/shapes.tokenize,
BOS first; the null prompt is [BOS] alone) -> embedding + learned positions -> a small transformer -> masked mean.

The network predicts the velocity v = eps - x0 at x_sigma = (1 - sigma) x0 + sigma eps (shared/spec/decisions.md).
The latent IS the image: pixels mapped to [-1, 1]; decode = (x + 1) / 2 clamped to [0, 1].

Presets: tiny (CPU tests, < 1M parameters, 64 tokens), mini, small (~30M, one GPU), base (~55M). minRF's
anchors: MNIST dim 64 / 6 layers / 4 heads, CIFAR dim 256 / 10 / 8, Adam 5e-4, logit-normal t.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from common.backend import Backend, BackendError, Cond

PRESETS = {
    "tiny": dict(dim=64, depth=4, heads=4, patch=4, text_dim=64, text_depth=1),
    "mini": dict(dim=128, depth=6, heads=4, patch=2, text_dim=128, text_depth=2),
    "small": dict(dim=384, depth=12, heads=6, patch=2, text_dim=256, text_depth=2),
    "base": dict(dim=512, depth=12, heads=8, patch=2, text_dim=256, text_depth=2),
}


@dataclass
class DiTConfig:
    """Everything needed to rebuild the network; stored as config.json next to the weights."""
    dim: int = 64
    depth: int = 4
    heads: int = 4
    patch: int = 4
    text_dim: int = 64
    text_depth: int = 1
    mlp_ratio: float = 4.0
    channels: int = 3
    resolution: int = 32
    frames: int = 0            # 0 = images; F > 0 = videos of F frames
    vocab_size: int = 27
    max_text_len: int = 12
    preset: str = "tiny"
    extra: dict = field(default_factory=dict)  # training metadata (steps, time, loss), not used by the model

    @classmethod
    def from_preset(cls, preset: str, video: bool = False, resolution: int | None = None,
                    frames: int | None = None) -> "DiTConfig":
        if preset not in PRESETS:
            raise BackendError(f"unknown DiT preset {preset!r}; choose one of {', '.join(PRESETS)}")
        from toy.shapes import VOCAB
        res = resolution or (16 if video else 32)
        return cls(**PRESETS[preset], resolution=res, frames=(frames or 8) if video else 0,
                   vocab_size=len(VOCAB), preset=preset)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        c, r = self.channels, self.resolution
        return (c, self.frames, r, r) if self.frames else (c, r, r)


# ----------------------------------------------------------------------------------------------------------
# Small pure pieces
# ----------------------------------------------------------------------------------------------------------
def timestep_embedding(sigma: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of 1000 sigma: (B,) -> (B, dim), [cos(1000 sigma w_k), sin(1000 sigma w_k)],
    w_k = max_period^(-k / (dim/2)). sigma in [0, 1] is scaled to the usual 0..1000 timestep range so the
    lowest frequency still resolves sigma steps of 1e-3."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=sigma.device, dtype=torch.float32) / half)
    args = 1000.0 * sigma.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_1d(n: int, dim: int) -> torch.Tensor:
    """(n, dim) fixed sin-cos table of positions 0..n-1 (dim even)."""
    pos = torch.arange(n, dtype=torch.float32)[:, None]
    w = torch.exp(-math.log(10000.0) * torch.arange(dim // 2, dtype=torch.float32) / (dim // 2))[None]
    return torch.cat([torch.sin(pos * w), torch.cos(pos * w)], dim=1)


def sincos_2d(h: int, w: int, dim: int) -> torch.Tensor:
    """(h * w, dim) row-major 2D table: half the channels encode the row, half the column."""
    row = sincos_1d(h, dim // 2)[:, None, :].expand(h, w, dim // 2)
    col = sincos_1d(w, dim // 2)[None, :, :].expand(h, w, dim // 2)
    return torch.cat([row, col], dim=-1).reshape(h * w, dim)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x (B, N, D) * (1 + scale) + shift, with shift/scale (B, D) per sample."""
    return x * (1 + scale[:, None]) + shift[:, None]


def cfg_combine(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: v = v_u + g (v_c - v_u); g = 1 gives v_c, g = 0 gives v_u."""
    return v_uncond + scale * (v_cond - v_uncond)


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/p * W/p, C p p) or (B, C, F, H, W) -> (B, F * H/p * W/p, C p p), row-major per frame."""
    if x.ndim == 4:
        x = x[:, :, None]
    B, C, Fr, H, W = x.shape
    x = x.reshape(B, C, Fr, H // p, p, W // p, p).permute(0, 2, 3, 5, 1, 4, 6)
    return x.reshape(B, Fr * (H // p) * (W // p), C * p * p)


def unpatchify(t: torch.Tensor, p: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of patchify; shape is one sample's (C, H, W) or (C, F, H, W)."""
    C, (Fr, H, W) = shape[0], (shape[1:] if len(shape) == 4 else (1, *shape[1:]))
    B = t.shape[0]
    x = t.reshape(B, Fr, H // p, W // p, C, p, p).permute(0, 4, 1, 2, 5, 3, 6).reshape(B, C, Fr, H, W)
    return x if len(shape) == 4 else x[:, :, 0]


# ----------------------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------------------
class TextEncoder(nn.Module):
    """Grammar words -> pooled (B, text_dim) features: embedding + learned positions + a small transformer,
    then the mean over real tokens (mask True). Row 0 of every sequence is BOS, so no row is fully masked."""

    def __init__(self, vocab: int, dim: int, depth: int, max_len: int):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(max_len, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, nhead=max(1, dim // 32), dim_feedforward=2 * dim, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False) if depth > 0 else None
        self.norm = nn.LayerNorm(dim)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.tok(ids) + self.pos[: ids.shape[1]]
        if self.layers is not None:
            h = self.layers(h, src_key_padding_mask=~mask)
        m = mask[..., None].to(h.dtype)
        return self.norm((h * m).sum(1) / m.sum(1).clamp_min(1))


class Attention(nn.Module):
    """Multi-head self-attention through F.scaled_dot_product_attention (flash / memory-efficient kernels)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B,h,N,d)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.proj(o.transpose(1, 2).reshape(B, N, D))


class DiTBlock(nn.Module):
    """adaLN-Zero block: x += g1 * Attn(mod(LN x)); x += g2 * MLP(mod(LN x)); (shift, scale, gate) x 2 from c,
    the modulation layer zero-initialised so the block starts as the identity."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        s1, sc1, g1, s2, sc2, g2 = self.ada(c).chunk(6, dim=-1)  # each (B, D)
        x = x + g1[:, None] * self.attn(modulate(self.norm1(x), s1, sc1))
        return x + g2[:, None] * self.mlp(modulate(self.norm2(x), s2, sc2))


class DiT(nn.Module):
    """v_theta(x, sigma, text): x (B, *latent_shape), sigma (B,) in [0, 1], ids/mask (B, L) -> (B, *latent_shape)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        p, D, r = cfg.patch, cfg.dim, cfg.resolution
        if r % p:
            raise BackendError(f"resolution {r} is not a multiple of the patch size {p}")
        self.grad_checkpointing = False
        self.x_embed = nn.Linear(cfg.channels * p * p, D)
        self.register_buffer("pos", sincos_2d(r // p, r // p, D), persistent=False)  # (h w, D)
        self.frame_pos = nn.Parameter(torch.randn(cfg.frames, D) * 0.02) if cfg.frames else None
        self.t_embed = nn.Sequential(nn.Linear(256, D), nn.SiLU(), nn.Linear(D, D))
        self.text = TextEncoder(cfg.vocab_size, cfg.text_dim, cfg.text_depth, cfg.max_text_len)
        self.text_proj = nn.Linear(cfg.text_dim, D)
        self.blocks = nn.ModuleList([DiTBlock(D, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth)])
        self.final_norm = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))
        self.final = nn.Linear(D, cfg.channels * p * p)
        for m in (self.final_ada[1], self.final):  # zero output layer: v = 0 at init (adaLN-Zero)
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def positions(self) -> torch.Tensor:
        """(N, D) token positions: the 2D table, repeated per frame plus the frame embedding for video."""
        if self.frame_pos is None:
            return self.pos
        n = self.pos.shape[0]
        return (self.pos[None] + self.frame_pos[:, None]).reshape(self.cfg.frames * n, -1)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        dt = self.x_embed.weight.dtype  # run in the parameters' dtype (bf16 on GPU); the caller casts back
        h = self.x_embed(patchify(x.to(dt), self.cfg.patch)) + self.positions().to(dt)  # (B, N, D)
        c = self.t_embed(timestep_embedding(sigma, 256).to(dt)) + self.text_proj(self.text(ids, mask))  # (B, D)
        for blk in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(blk, h, c, use_reentrant=False)
            else:
                h = blk(h, c)
        sh, sc = self.final_ada(c).chunk(2, dim=-1)
        out = self.final(modulate(self.final_norm(h), sh, sc))
        return unpatchify(out, self.cfg.patch, self.cfg.latent_shape)


def flow_matching_loss(net: DiT, x0: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Rectified-flow loss E ||v_theta(x_sigma, sigma) - (eps - x0)||^2 with sigma = sigmoid(n), n ~ N(0, 1)
    (logit-normal, SD3 / minRF), x_sigma = (1 - sigma) x0 + sigma eps. x0: (B, *latent) in [-1, 1]."""
    B = x0.shape[0]
    g_dev = generator.device if generator is not None else x0.device
    sigma = torch.sigmoid(torch.randn(B, generator=generator, device=g_dev)).to(x0.device)
    eps = torch.randn(x0.shape, generator=generator, device=g_dev).to(x0.device)
    s = sigma.reshape(-1, *([1] * (x0.ndim - 1)))
    xt = (1 - s) * x0 + s * eps
    return F.mse_loss(net(xt, sigma, ids, mask).float(), eps - x0)


def media_to_latent(media: torch.Tensor) -> torch.Tensor:
    """Dataset media -> latent: images (B, 3, H, W) or videos (B, F, 3, H, W) in [0, 1] -> 2 m - 1, videos as
    (B, 3, F, H, W) (channels first, Wan's layout)."""
    x = media * 2 - 1
    return x.permute(0, 2, 1, 3, 4).contiguous() if x.ndim == 5 else x


def save_pretrained(net: DiT, out_dir: str, dtype: torch.dtype = torch.float32, **extra) -> None:
    """Write out_dir/model.safetensors and out_dir/config.json (the DiTConfig plus `extra` metadata)."""
    from safetensors.torch import save_file
    os.makedirs(out_dir, exist_ok=True)
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in net.state_dict().items()}
    save_file(state, os.path.join(out_dir, "model.safetensors"))
    cfg = asdict(net.cfg)
    cfg["extra"] = {**cfg.get("extra", {}), **extra}
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)


def load_pretrained(path: str, device="cpu", dtype: torch.dtype = torch.float32) -> DiT:
    """Rebuild a DiT from path/config.json and path/model.safetensors. Raises BackendError when missing."""
    from safetensors.torch import load_file
    cfg_path, w_path = os.path.join(path, "config.json"), os.path.join(path, "model.safetensors")
    if not (os.path.isfile(cfg_path) and os.path.isfile(w_path)):
        raise BackendError(f"no DiT checkpoint in {path} (expected config.json and model.safetensors)")
    with open(cfg_path) as f:
        cfg = DiTConfig(**json.load(f))
    net = DiT(cfg)
    net.load_state_dict({k: v.float() for k, v in load_file(w_path).items()})
    return net.to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------------------------------------
# Backend
# ----------------------------------------------------------------------------------------------------------
WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "toy", "weights")


def default_checkpoint(preset: str, video: bool) -> str:
    """Where the shipped (or locally pretrained) teacher of a preset lives: toy/weights/dit-<preset>[-video]."""
    return os.path.join(WEIGHTS_DIR, f"dit-{preset}{'-video' if video else ''}")


def _dtype(d) -> torch.dtype:
    if isinstance(d, torch.dtype):
        return d
    names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    if d not in names:
        raise BackendError(f"unknown dtype {d!r}; choose fp32 or bf16")
    return names[d]


class DiTBackend(Backend):
    """`--teacher dit`: the small DiT on procedural shapes (images, or videos with video=True).

    Options: preset (tiny | mini | small | base), video, pretrained (checkpoint dir; None = toy/weights/dit-<preset>,
    and a clear BackendError naming the pretraining command when that is missing), tiny (random-init tiny preset,
    no checkpoint: smoke tests), guidance (CFG scale, default 2.0), shift (schedule shift, default 1.0), device,
    dtype (fp32 | bf16), compile (torch.compile each block), gradient_checkpointing, resolution/frames (random
    init only), seed (random init). Options other backends take (lora_rank, ...) are accepted and ignored: the DiT
    trains fully.
    """

    name = "dit"

    def __init__(self, preset: str = "tiny", video: bool = False, pretrained: str | None = None, tiny: bool = False,
                 device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.float32,
                 guidance: float | None = 2.0, shift: float = 1.0, compile: bool = False,
                 gradient_checkpointing: bool = False, resolution: int | None = None, frames: int | None = None,
                 seed: int = 0, **unused):
        super().__init__(device, _dtype(dtype))
        self.video = bool(video)
        self.media = "video" if self.video else "image"
        self.guidance = 2.0 if guidance is None else float(guidance)
        self.shift = float(shift)
        if preset not in PRESETS:
            raise BackendError(f"unknown DiT preset {preset!r}; choose one of {', '.join(PRESETS)}")
        if tiny:
            torch.manual_seed(seed)
            net = DiT(DiTConfig.from_preset("tiny", self.video, resolution, frames))
            self.checkpoint = None
        else:
            path = pretrained or default_checkpoint(preset, self.video)
            if not os.path.isfile(os.path.join(path, "model.safetensors")):
                cmd = f"python -m toy.pretrain_dit --preset {preset}{' --video' if self.video else ''} --out {path}"
                raise BackendError(f"no DiT teacher at {path}: train one with `{cmd}` (or pass --tiny for a "
                                   f"random-init smoke run)")
            net = load_pretrained(path)
            self.checkpoint = path
        # a checkpoint knows whether it is a video model: trust it over the flag
        self.video = net.cfg.frames > 0
        self.media = "video" if self.video else "image"
        self.network = net.to(device=self.device, dtype=self.dtype).eval()
        net.grad_checkpointing = bool(gradient_checkpointing)
        if compile:
            for b in net.blocks:
                b.compile()
        self.cfg = net.cfg
        self.latent_shape = net.cfg.latent_shape

    def encode(self, prompts: Sequence[str] | torch.Tensor) -> Cond:
        """Prompts -> Cond{ids (B, L) long, mask (B, L) bool} with the prompt text kept for rewards."""
        from toy.shapes import tokenize
        if torch.is_tensor(prompts):
            raise BackendError("the dit backend takes text prompts, not class labels")
        ids, mask = tokenize(list(prompts), self.cfg.max_text_len)
        return Cond({"ids": ids.to(self.device), "mask": mask.to(self.device)}, prompts=list(prompts))

    def null_cond(self, n: int) -> Cond:
        """The unconditional prompt (the empty string -> [BOS]) for n samples."""
        return self.encode([""] * n)

    def velocity(self, net: nn.Module, x: torch.Tensor, sigma, cond: Cond, guidance: float | None = None):
        """v = v_u + g (v_c - v_u), float32. g == 1: one conditional pass; otherwise ONE batched pass over
        [conditional; unconditional] rows (2B samples), split afterwards."""
        g = self.guidance if guidance is None else float(guidance)
        B = x.shape[0]
        s = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        s = s.expand(B) if s.ndim == 0 else s
        ids, mask = cond["ids"], cond["mask"]
        if g == 1.0:
            return net(x, s, ids, mask).float()
        null = torch.zeros_like(ids)
        null[:, 0] = ids[:, 0]  # [BOS, PAD, ...]: the empty prompt, padded to the same length
        out = net(torch.cat([x, x]), torch.cat([s, s]), torch.cat([ids, null]),
                  torch.cat([mask, null != 0])).float()  # (2B, ...)
        return cfg_combine(out[:B], out[B:], g)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Latent in [-1, 1] -> media in [0, 1]: images (B, 3, H, W), videos (B, F, 3, H, W). A plain clamp
        (differentiable inside the range, zero gradient where a pixel is already saturated)."""
        img = ((x.float() + 1) / 2).clamp(0, 1)
        return img.permute(0, 2, 1, 3, 4) if img.ndim == 5 else img

    def prompts(self, split: str = "train") -> list[str]:
        """The grammar's prompt lists: 'train', 'eval' (held-out combinations), 'open' (colour left open)."""
        from toy.shapes import split_prompts
        try:
            return split_prompts(split, self.video)
        except KeyError as e:
            raise BackendError(str(e.args[0])) from None
