"""FLUX.1 (dev) through diffusers: packed latents, embedded guidance, resolution-dependent (dynamic) shift.

Latent layout: PACKED, (B, N, 4C) with N = (h/2)(w/2) tokens of 2x2 patches of the C-channel VAE latent
(h = H / vae_scale_factor). That is what the transformer takes and what FluxPipeline's `latents=` and
`output_type="latent"` use, so noise and results move between the two unchanged; decode unpacks.

The transformer's timestep is sigma itself (in [0, 1]; the pipeline divides its t in [0, 1000] by 1000);
guidance is an embedded scalar (guidance_embeds=True in FLUX.1-dev), one forward pass, no CFG batch.
"""
from __future__ import annotations

import torch
from torch import nn

from common.backend import Cond
from common.backends.base import DiffusersBackend, cfg_combine, sigma_batch, to_unit_range
from common.flow import flux_mu, make_sigmas


def pack_latents(z: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, (H/2)(W/2), 4C): token (i, j) holds z[:, c, 2i + a, 2j + b] at channel 4c + 2a + b."""
    B, C, H, W = z.shape
    return z.view(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, (H // 2) * (W // 2), C * 4)


def unpack_latents(x: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """Inverse of pack_latents: (B, (H/2)(W/2), 4C) -> (B, C, H, W); H, W are the latent height and width."""
    B, N, D = x.shape
    return x.view(B, H // 2, W // 2, D // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, D // 4, H, W)


def image_ids(h2: int, w2: int, device=None) -> torch.Tensor:
    """RoPE position ids of the packed tokens: (h2 * w2, 3) rows (0, row, col), row-major like pack_latents."""
    ids = torch.zeros(h2, w2, 3, device=device)
    ids[..., 1] = torch.arange(h2, device=device)[:, None]
    ids[..., 2] = torch.arange(w2, device=device)[None, :]
    return ids.reshape(-1, 3)


class FluxBackend(DiffusersBackend):
    """FLUX.1-dev (12B transformer, CLIP-L + T5-XXL, 16-channel VAE). Defaults: 512x512, guidance 3.5.
    Extra option: true_cfg (FluxPipeline's true_cfg_scale with the negative prompt; default 1 = off)."""

    name = "flux"
    media = "image"
    pipeline_class = "FluxPipeline"
    default_pretrained = "black-forest-labs/FLUX.1-dev"
    download_hint = " (gated: accept the licence on its hub page and `huggingface-cli login` first)"
    # attention projections of the dual-stream (image + text) and single-stream blocks
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    block_attrs = ("transformer_blocks", "single_transformer_blocks")
    default_size = (512, 512)
    default_guidance = 3.5
    default_max_seq = 512

    def _setup_defaults(self) -> None:
        # FluxPipeline's true_cfg_scale: optional true CFG on top of the embedded guidance (off by default)
        self.true_cfg = float(self.family_options.pop("true_cfg", 1.0))
        self.uses_true_cfg = self.true_cfg != 1.0
        if self.tiny:
            from common.backends.tiny import TINY_HEIGHT, TINY_MAX_SEQ, TINY_WIDTH
            self.default_size, self.default_max_seq = (TINY_HEIGHT, TINY_WIDTH), TINY_MAX_SEQ

    def guidance_applies(self, net: nn.Module) -> bool:
        """guidance is the embedded scale: ignored by a transformer without a guidance embedding (FLUX.1-schnell);
        the true_cfg option has its own scale."""
        return bool(net.config.guidance_embeds)

    # latent geometry: h, w of the unpacked VAE latent
    @property
    def latent_hw(self) -> tuple[int, int]:
        f = int(self.pipe.vae_scale_factor)
        return 2 * (self.height // (f * 2)), 2 * (self.width // (f * 2))

    def _latent_shape(self):
        h, w = self.latent_hw
        c = self.pipe.transformer.config.in_channels          # = 4 x VAE channels
        return ((h // 2) * (w // 2), c)

    def sigmas(self, K: int, shift: float | None = None, timesteps: list[int] | None = None) -> torch.Tensor:
        """FLUX.1's grid: linspace(1, 1/K, K) (or K raw timesteps / 1000) shifted by exp(mu), mu linear in the token
        count (common.flow.flux_mu with the scheduler's base/max values), then 0. shift overrides with a static one."""
        if shift is not None:
            return make_sigmas(K, shift=shift, timesteps=timesteps).to(self.device)
        c = self.pipe.scheduler.config
        mu = flux_mu(self.latent_shape[0], c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                     c.get("base_shift", 0.5), c.get("max_shift", 1.15))
        return make_sigmas(K, mu=mu, timesteps=timesteps).to(self.device)

    def _encode_batch(self, prompts):
        pe, pooled, _ = self.pipe.encode_prompt(prompt=prompts, prompt_2=None, device=self.device,
                                                max_sequence_length=self.max_sequence_length)
        return {"prompt_embeds": pe, "pooled_prompt_embeds": pooled}

    def velocity(self, net: nn.Module, x: torch.Tensor, sigma, cond: Cond, guidance: float | None = None):
        """v = transformer(x, t = sigma, text, guidance) in float32; x packed (B, N, 4C).

        guidance is the embedded scale (one pass). With the true_cfg option (FluxPipeline's true_cfg_scale),
        v = v_u + true_cfg (v_c - v_u) on top, from one batched pass over [negative; positive]."""
        g = self.guidance if guidance is None else float(guidance)
        B = x.shape[0]
        dt = self._net_dtype(net)
        s = sigma_batch(sigma, B, x.device)
        h, w = self.latent_hw
        pe, pooled = cond["prompt_embeds"], cond["pooled_prompt_embeds"]
        cfg = self.uses_true_cfg
        if cfg:
            x, s = torch.cat([x, x]), torch.cat([s, s])
            pe = torch.cat([cond["neg_prompt_embeds"], pe])
            pooled = torch.cat([cond["neg_pooled_prompt_embeds"], pooled])
        kw = {}
        if net.config.guidance_embeds:
            kw["guidance"] = torch.full((x.shape[0],), g, device=x.device, dtype=torch.float32)
        out = net(hidden_states=x.to(dt), encoder_hidden_states=pe.to(dt), pooled_projections=pooled.to(dt),
                  timestep=s.to(dt), img_ids=image_ids(h // 2, w // 2, x.device),
                  txt_ids=torch.zeros(pe.shape[1], 3, device=x.device), return_dict=False, **kw)[0].float()
        if not cfg:
            return out
        v_u, v_c = out.chunk(2)
        return cfg_combine(v_u, v_c, self.true_cfg)

    def to_vae_latents(self, x: torch.Tensor) -> torch.Tensor:
        """Packed latents -> the VAE's input: unpack, then z / scaling + shift."""
        cfg = self.pipe.vae.config
        h, w = self.latent_hw
        return unpack_latents(x.float(), h, w) / cfg.scaling_factor + cfg.shift_factor

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, 4C) -> images (B, 3, H, W) in [0, 1], float32, differentiable."""
        return to_unit_range(self._vae_decode(self.to_vae_latents(x)))
