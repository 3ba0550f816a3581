"""Wan 2.1 (T2V 1.3B / 14B) and the Wan 2.2 two-expert layout through diffusers: video latents, true CFG.

Latent layout: the video VAE latent, (B, C, f, h, w) with f = (F - 1) / 4 + 1 and h = H / 8 (the transformer
patchifies 1x2x2). The transformer's timestep is raw, t = 1000 sigma. CFG runs as one batched pass over
[negative; positive] (the pipeline runs two passes: equal to float tolerance).

Wan 2.2 (A14B) has two experts: `transformer` denoises the high-noise part (t >= boundary_ratio x 1000, i.e.
sigma >= boundary_ratio), `transformer_2` the rest, each with its own guidance scale. The backend's network is
then a TwoExperts module holding both (LoRA on both, both trained); velocity routes every sample by its sigma.
"""
from __future__ import annotations

import torch
from torch import nn

from common.backend import Cond
from common.backends.base import BackendError, DiffusersBackend, cfg_combine, sigma_batch, to_unit_range


class TwoExperts(nn.Module):
    """Wan 2.2's pair: experts[0] for sigma >= boundary (high noise), experts[1] below it."""

    def __init__(self, high: nn.Module, low: nn.Module, boundary: float):
        super().__init__()
        self.experts = nn.ModuleList([high, low])
        self.boundary = float(boundary)

    @property
    def config(self):
        return self.experts[0].config

    def high_noise(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) bool: the rows at raw timestep t = 1000 sigma that go to the high-noise expert (the pipeline
        compares t with boundary_ratio x 1000)."""
        return t >= self.boundary * 1000.0


class WanBackend(DiffusersBackend):
    """Wan2.1-T2V-1.3B by default; a Wan2.2 folder (transformer_2 + boundary_ratio) gives the two-expert mode.
    Defaults: 480x832, 81 frames, CFG 5.0 (guidance_2 = the low-noise expert's scale, default = guidance).
    Extra option: two_experts (tiny only: build the Wan2.2 miniature)."""

    name = "wan"
    media = "video"
    pipeline_class = "WanPipeline"
    default_pretrained = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0")      # self- and cross-attention of every block
    block_attrs = ("blocks",)
    default_size = (480, 832)
    default_frames = 81
    default_guidance = 5.0
    default_max_seq = 512
    default_shift = 5.0
    uses_true_cfg = True

    def _setup_defaults(self) -> None:
        g2 = self.family_options.pop("guidance_2", None)
        self.two_experts_tiny = bool(self.family_options.pop("two_experts", False))
        self._guidance_2 = None if g2 is None else float(g2)
        if self.tiny:
            from common.backends.tiny import TINY_FRAMES, TINY_HEIGHT, TINY_MAX_SEQ, TINY_WIDTH
            self.default_size, self.default_max_seq = (TINY_HEIGHT, TINY_WIDTH), TINY_MAX_SEQ
            self.default_frames = TINY_FRAMES

    def _tiny_kwargs(self, twin: bool = False) -> dict:
        return {"two_experts": self.two_experts_tiny}

    @property
    def guidance_2(self) -> float:
        return self.guidance if self._guidance_2 is None else self._guidance_2

    def _network_of(self, pipe) -> nn.Module:
        if getattr(pipe.config, "expand_timesteps", False):
            raise BackendError("wan: per-token timesteps (Wan2.2 TI2V, expand_timesteps) are not supported; "
                               "use a T2V checkpoint")
        t2 = getattr(pipe, "transformer_2", None)
        ratio = getattr(pipe.config, "boundary_ratio", None)
        if t2 is not None and ratio is not None:
            return TwoExperts(pipe.transformer, t2, ratio)
        return pipe.transformer

    def size_multiple(self) -> int:
        return int(self.pipe.vae_scale_factor_spatial) * int(self.pipe.transformer.config.patch_size[1])

    def _check_size(self) -> None:
        super()._check_size()
        ft = int(self.pipe.vae_scale_factor_temporal)
        if (self.num_frames - 1) % ft:
            raise BackendError(f"wan: num_frames must be {ft}k + 1 (got {self.num_frames})")

    def _latent_shape(self):
        ft, fs = int(self.pipe.vae_scale_factor_temporal), int(self.pipe.vae_scale_factor_spatial)
        c = self.pipe.transformer.config.in_channels
        return (c, (self.num_frames - 1) // ft + 1, self.height // fs, self.width // fs)

    def _encode_batch(self, prompts):
        pe, _ = self.pipe.encode_prompt(prompt=prompts, do_classifier_free_guidance=False,
                                        max_sequence_length=self.max_sequence_length, device=self.device)
        return {"prompt_embeds": pe}

    def _expert_velocity(self, model: nn.Module, x, t, cond: Cond, g: float) -> torch.Tensor:
        """One expert, true CFG batched over [uncond; cond]; x (b, C, f, h, w), t (b,) raw timesteps."""
        dt = self._net_dtype(model)
        pe = cond["prompt_embeds"]
        cfg = g != 1.0
        if cfg:
            x, t, pe = torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond["neg_prompt_embeds"], pe])
        # t stays float32 (as the pipeline passes it): in bf16 a raw timestep near 800 rounds to a multiple of 4
        out = model(hidden_states=x.to(dt), timestep=t, encoder_hidden_states=pe.to(dt),
                    return_dict=False)[0].float()
        if not cfg:
            return out
        v_u, v_c = out.chunk(2)
        return cfg_combine(v_u, v_c, g)

    @property
    def splits_rows(self) -> bool:
        """Wan 2.2: a call whose rows straddle the boundary runs each expert on its own rows (smaller batches)."""
        return isinstance(self.network, TwoExperts)

    def forwards_per_call(self, net: nn.Module, sigma) -> int:
        if not isinstance(net, TwoExperts):
            return 1
        high = net.high_noise(torch.as_tensor(sigma, dtype=torch.float32).reshape(-1) * 1000.0)
        return 2 if bool(high.any()) and not bool(high.all()) else 1

    def velocity(self, net: nn.Module, x: torch.Tensor, sigma, cond: Cond, guidance: float | None = None):
        """v in float32, (B, C, f, h, w). Two experts: each sample goes to the expert of its sigma, the
        high-noise one at guidance, the low-noise one at guidance_2 (a passed guidance sets both)."""
        g = self.guidance if guidance is None else float(guidance)
        B = x.shape[0]
        s = sigma_batch(sigma, B, x.device)
        t = s * 1000.0
        if not isinstance(net, TwoExperts):
            return self._expert_velocity(net, x, t, cond, g)
        g2 = self.guidance_2 if guidance is None else g
        high = net.high_noise(t)
        if bool(high.all()):
            return self._expert_velocity(net.experts[0], x, t, cond, g)
        if not bool(high.any()):
            return self._expert_velocity(net.experts[1], x, t, cond, g2)
        v = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        for mask, model, gg in ((high, net.experts[0], g), (~high, net.experts[1], g2)):
            idx = mask.nonzero().squeeze(1)
            v = v.index_put((idx,), self._expert_velocity(model, x[idx], t[idx], cond.select(idx), gg))
        return v

    def to_vae_latents(self, x: torch.Tensor) -> torch.Tensor:
        """z = x * std + mean per latent channel (the VAE's latents_mean / latents_std)."""
        cfg = self.pipe.vae.config
        shape = (1, cfg.z_dim, 1, 1, 1)
        mean = torch.tensor(cfg.latents_mean, dtype=torch.float32, device=x.device).view(shape)
        std = torch.tensor(cfg.latents_std, dtype=torch.float32, device=x.device).view(shape)
        return x.float() * std + mean

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, f, h, w) -> videos (B, F, 3, H, W) in [0, 1], float32, differentiable."""
        video = self._vae_decode(self.to_vae_latents(x))          # (B, 3, F, H, W) in [-1, 1]
        return to_unit_range(video).permute(0, 2, 1, 3, 4)
