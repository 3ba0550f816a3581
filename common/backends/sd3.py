"""Stable Diffusion 3 / 3.5 (medium) through diffusers: true CFG in one batched pass, static shift 3.

Latent layout: the VAE latent itself, (B, C, h, w), h = H / vae_scale_factor (the transformer patchifies).
The transformer's timestep is raw, t = 1000 sigma. CFG batch order is [negative, positive], as the pipeline's.
"""
from __future__ import annotations

import torch
from torch import nn

from common.backend import Cond
from common.backends.base import DiffusersBackend, cfg_combine, sigma_batch, to_unit_range


class SD3Backend(DiffusersBackend):
    """SD3.5-medium by default (stabilityai/stable-diffusion-3-medium-diffusers also loads): 512x512, CFG 4.5."""

    name = "sd3"
    media = "image"
    pipeline_class = "StableDiffusion3Pipeline"
    default_pretrained = "stabilityai/stable-diffusion-3.5-medium"
    download_hint = " (gated: accept the licence on its hub page and `huggingface-cli login` first)"
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    block_attrs = ("transformer_blocks",)
    default_size = (512, 512)
    default_guidance = 4.5
    default_max_seq = 256
    default_shift = 3.0
    uses_true_cfg = True

    def _setup_defaults(self) -> None:
        if self.tiny:
            from common.backends.tiny import TINY_HEIGHT, TINY_MAX_SEQ, TINY_WIDTH
            self.default_size, self.default_max_seq = (TINY_HEIGHT, TINY_WIDTH), TINY_MAX_SEQ

    def size_multiple(self) -> int:
        return int(self.pipe.vae_scale_factor) * int(self.pipe.transformer.config.patch_size)

    def _latent_shape(self):
        f = int(self.pipe.vae_scale_factor)
        return (self.pipe.transformer.config.in_channels, self.height // f, self.width // f)

    def _encode_batch(self, prompts):
        pe, _, pooled, _ = self.pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device=self.device,
                                                   do_classifier_free_guidance=False,
                                                   max_sequence_length=self.max_sequence_length)
        return {"prompt_embeds": pe, "pooled_prompt_embeds": pooled}

    def velocity(self, net: nn.Module, x: torch.Tensor, sigma, cond: Cond, guidance: float | None = None):
        """v = v_u + g (v_c - v_u) from one batched transformer pass over [uncond; cond] (g = 1: cond only)."""
        g = self.guidance if guidance is None else float(guidance)
        B = x.shape[0]
        dt = self._net_dtype(net)
        t = sigma_batch(sigma, B, x.device) * 1000.0
        pe, pooled = cond["prompt_embeds"], cond["pooled_prompt_embeds"]
        cfg = g != 1.0
        if cfg:                                  # stacked (2B, ...): rows 0..B-1 unconditional, B..2B-1 conditional
            x_in, t = torch.cat([x, x]), torch.cat([t, t])
            pe = torch.cat([cond["neg_prompt_embeds"], pe])
            pooled = torch.cat([cond["neg_pooled_prompt_embeds"], pooled])
        else:
            x_in = x
        # t stays float32: in bf16 a raw timestep near 800 would round to a multiple of 4
        out = net(hidden_states=x_in.to(dt), timestep=t, encoder_hidden_states=pe.to(dt),
                  pooled_projections=pooled.to(dt), return_dict=False)[0].float()
        if not cfg:
            return out
        v_u, v_c = out.chunk(2)
        return cfg_combine(v_u, v_c, g)

    def to_vae_latents(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.pipe.vae.config
        return x.float() / cfg.scaling_factor + cfg.shift_factor

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> images (B, 3, H, W) in [0, 1], float32, differentiable."""
        return to_unit_range(self._vae_decode(self.to_vae_latents(x)))
