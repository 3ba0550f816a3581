"""FLUX.2 [klein] through diffusers (Flux2KleinPipeline: Qwen3 text encoder, Flux2 VAE with batch-norm latent
statistics): true CFG for the base (non-distilled) models, none for the step-distilled ones; empirical mu.

Which of the two a network is, is read per network (its pipeline's is_distilled, kept on the transformer as
`step_distilled`), not per backend: RTDMD's generator is the step-distilled klein and its teacher the klein-base
loaded beside it (teacher_pretrained, spec decision 14), so one backend drives one of each. velocity() runs true CFG
with the negative (empty) prompt for a base network at guidance != 1 and never for a distilled one; the Cond carries
the negative prompt's embeddings whenever one of the backend's networks takes true CFG.

Latent layout: PATCHIFIED, (B, 4C, h/2, w/2): the VAE latent (C channels at h x w) with each 2x2 patch moved
into channels and normalised by the VAE's batch-norm running statistics. That is the tensor the pipeline's
`latents=` takes; the transformer sees it as (B, N, 4C) tokens (pack_tokens, a pure reshape), and decode
de-normalises, unpatchifies and runs the VAE. The transformer's timestep is sigma (t / 1000); its position ids
are 4-axis (T, H, W, L) with a batch dimension.
"""
from __future__ import annotations

import torch
from torch import nn

from common.backend import Cond
from common.backends.base import DiffusersBackend, cfg_combine, sigma_batch, to_unit_range
from common.flow import flux2_empirical_mu, make_sigmas


def pack_tokens(z: torch.Tensor) -> torch.Tensor:
    """(B, D, h, w) -> (B, h w, D), row-major tokens."""
    B, D, h, w = z.shape
    return z.reshape(B, D, h * w).permute(0, 2, 1)


def unpack_tokens(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, h w, D) -> (B, D, h, w); inverse of pack_tokens."""
    B, N, D = x.shape
    return x.permute(0, 2, 1).reshape(B, D, h, w)


def unpatchify(z: torch.Tensor) -> torch.Tensor:
    """(B, 4C, h, w) -> (B, C, 2h, 2w): channel 4c + 2a + b of patch (i, j) goes to pixel (2i + a, 2j + b)."""
    B, D, h, w = z.shape
    return z.reshape(B, D // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(B, D // 4, 2 * h, 2 * w)


def latent_ids(B: int, h: int, w: int, device=None) -> torch.Tensor:
    """(B, h w, 4) ids (T=0, row, col, L=0), row-major like pack_tokens."""
    rows = torch.arange(h, device=device).repeat_interleave(w)
    cols = torch.arange(w, device=device).repeat(h)
    z = torch.zeros_like(rows)
    return torch.stack([z, rows, cols, z], dim=1).unsqueeze(0).expand(B, -1, -1)


def text_ids(B: int, L: int, device=None) -> torch.Tensor:
    """(B, L, 4) ids (0, 0, 0, l) of the text tokens."""
    ll = torch.arange(L, device=device)
    z = torch.zeros_like(ll)
    return torch.stack([z, z, z, ll], dim=1).unsqueeze(0).expand(B, -1, -1)


class Flux2Backend(DiffusersBackend):
    """FLUX.2 klein 4B (step-distilled, no CFG) by default; a base klein folder (is_distilled false) uses true CFG
    at guidance 4.0. Extra options: text_encoder_out_layers (Qwen3 hidden-state layers, default (9, 18, 27)),
    distilled (--tiny: a step-distilled tiny generator; the teacher_pretrained twin is always a base model)."""

    name = "flux2"
    media = "image"
    pipeline_class = "Flux2KleinPipeline"
    default_pretrained = "black-forest-labs/FLUX.2-klein-4B"
    # dual-stream attention projections; the single-stream blocks' fused qkv+mlp input and their output
    lora_targets = (r".*(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
                    r"|single_transformer_blocks\.\d+\.attn\.(to_qkv_mlp_proj|to_out))")
    block_attrs = ("transformer_blocks", "single_transformer_blocks")
    default_size = (512, 512)
    default_max_seq = 512

    def _setup_defaults(self) -> None:
        self.text_encoder_out_layers = tuple(self.family_options.pop("text_encoder_out_layers", (9, 18, 27)))
        self._distilled_tiny = bool(self.family_options.pop("distilled", False))
        if self.tiny:
            from common.backends.tiny import FLUX2_TEXT_LAYERS, TINY_HEIGHT, TINY_MAX_SEQ, TINY_WIDTH
            self.default_size, self.default_max_seq = (TINY_HEIGHT, TINY_WIDTH), TINY_MAX_SEQ
            self.text_encoder_out_layers = FLUX2_TEXT_LAYERS

    def _tiny_kwargs(self, twin: bool = False) -> dict:
        return {"distilled": self._distilled_tiny and not twin}

    def _network_of(self, pipe) -> nn.Module:
        net = pipe.transformer
        net.step_distilled = bool(getattr(pipe.config, "is_distilled", False))   # read by takes_true_cfg
        return net

    def _make_network(self) -> nn.Module:
        # step-distilled checkpoints run without CFG; base checkpoints with true CFG at 4.0 (the generator's default)
        net = self._network_of(self.pipe)
        self.distilled = net.step_distilled
        self.uses_true_cfg = not self.distilled
        self.default_guidance = 1.0 if self.distilled else 4.0
        return net

    def __init__(self, **options):
        super().__init__(**options)
        if options.get("guidance") is None:
            self.guidance = self.default_guidance
        if self.teacher_net is not None:      # a base teacher beside a distilled generator: the Cond needs neg_*
            self.uses_true_cfg = self.uses_true_cfg or self.takes_true_cfg(self.teacher_net)

    def takes_true_cfg(self, net: nn.Module) -> bool:
        """True for a base (non-distilled) klein: velocity(net, ..., g != 1) runs true CFG; False for a distilled
        one, which ignores g."""
        return not getattr(net, "step_distilled", self.distilled)

    def guidance_applies(self, net: nn.Module) -> bool:
        return bool(net.config.guidance_embeds) or self.takes_true_cfg(net)

    @property
    def latent_hw(self) -> tuple[int, int]:
        """(h/2, w/2): the patchified latent grid."""
        f = int(self.pipe.vae_scale_factor)
        return self.height // (f * 2), self.width // (f * 2)

    def _latent_shape(self):
        h2, w2 = self.latent_hw
        return (self.pipe.transformer.config.in_channels, h2, w2)

    def sigmas(self, K: int, shift: float | None = None, timesteps: list[int] | None = None) -> torch.Tensor:
        """FLUX.2's grid: linspace(1, 1/K, K) (or K raw timesteps / 1000) shifted by exp(mu),
        mu = flux2_empirical_mu(tokens, K), then 0."""
        if shift is not None:
            return make_sigmas(K, shift=shift, timesteps=timesteps).to(self.device)
        h2, w2 = self.latent_hw
        return make_sigmas(K, mu=flux2_empirical_mu(h2 * w2, K), timesteps=timesteps).to(self.device)

    def _encode_batch(self, prompts):
        pe, _ = self.pipe.encode_prompt(prompt=prompts, device=self.device,
                                        max_sequence_length=self.max_sequence_length,
                                        text_encoder_out_layers=self.text_encoder_out_layers)
        return {"prompt_embeds": pe}

    def velocity(self, net: nn.Module, x: torch.Tensor, sigma, cond: Cond, guidance: float | None = None):
        """v in float32, (B, 4C, h/2, w/2); true CFG batched over [uncond; cond] when guidance != 1 and `net` is
        not distilled (takes_true_cfg)."""
        g = self.guidance if guidance is None else float(guidance)
        B, D, h2, w2 = x.shape
        dt = self._net_dtype(net)
        s = sigma_batch(sigma, B, x.device)
        pe = cond["prompt_embeds"]
        cfg = g != 1.0 and self.takes_true_cfg(net)
        tokens = pack_tokens(x)
        if cfg:
            tokens, s, pe = torch.cat([tokens, tokens]), torch.cat([s, s]), torch.cat([cond["neg_prompt_embeds"], pe])
        n = tokens.shape[0]
        kw = {"guidance": torch.full((n,), g, device=x.device, dtype=torch.float32)} \
            if net.config.guidance_embeds else {"guidance": None}
        out = net(hidden_states=tokens.to(dt), encoder_hidden_states=pe.to(dt), timestep=s.to(dt),
                  img_ids=latent_ids(n, h2, w2, x.device), txt_ids=text_ids(n, pe.shape[1], x.device),
                  return_dict=False, **kw)[0].float()
        out = unpack_tokens(out[:, : h2 * w2], h2, w2)
        if not cfg:
            return out
        v_u, v_c = out.chunk(2)
        return cfg_combine(v_u, v_c, g)

    def to_vae_latents(self, x: torch.Tensor) -> torch.Tensor:
        """De-normalise with the VAE's batch-norm statistics (per patchified channel), then unpatchify."""
        vae = self.pipe.vae
        mean = vae.bn.running_mean.view(1, -1, 1, 1).float().to(x.device)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1).float() + vae.config.batch_norm_eps).to(x.device)
        return unpatchify(x.float() * std + mean)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 4C, h/2, w/2) -> images (B, 3, H, W) in [0, 1], float32, differentiable."""
        return to_unit_range(self._vae_decode(self.to_vae_latents(x)))
