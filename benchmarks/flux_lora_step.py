"""Peak memory and time of one LoRA training step of the full-size FLUX.1-dev transformer (random weights).

What it measures: the FLUX.1-dev transformer architecture (19 dual-stream + 38 single-stream blocks, 24 heads
x 128, 11.9 B parameters) built with random weights directly in bf16 on the device, a LoRA adapter on the
attention projections (the FluxBackend targets, rank 32 by default) with gradient checkpointing, at 512x512
pixels (1,024 packed image tokens + 512 T5 tokens); one step = forward, flow-matching MSE loss, backward, AdamW
step on the LoRA parameters. Warm-up steps are excluded; the reported time is the median of the timed steps.
Nothing is downloaded: no weights are needed to measure memory and time.

GPU (needs ~30 GB):  python benchmarks/flux_lora_step.py
CPU smoke run:       python benchmarks/flux_lora_step.py --tiny --device cpu
Prints one JSON line (and writes it to --out when given).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.timing import device_and_dtype, median, report, time_steps  # noqa: E402

# FLUX.1-dev's transformer/config.json values (black-forest-labs/FLUX.1-dev)
FLUX1_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                 num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                 axes_dims_rope=(16, 56, 56))
VAE_FACTOR = 8                       # FLUX.1's VAE: 8x spatial compression, then 2x2 packing


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="the tiny random FLUX config (CPU smoke run)")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--height", type=int, default=None, help="pixels (default 512; 32 with --tiny)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--text-len", type=int, default=None, help="T5 tokens (default 512; 16 with --tiny)")
    p.add_argument("--lora-rank", type=int, default=32)
    p.add_argument("--no-checkpointing", action="store_true", help="disable gradient checkpointing")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp32"], help="default bf16 on GPU, fp32 on CPU")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="timed steps")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (CPU runs)")
    p.add_argument("--out", default=None, help="also write the JSON result here")
    return p.parse_args(argv)


def build(cfg: dict, device: torch.device, dtype: torch.dtype):
    """The transformer created directly on `device` in `dtype` (no fp32 copy of 12 B parameters anywhere)."""
    from diffusers import FluxTransformer2DModel
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            return FluxTransformer2DModel(**cfg)
    finally:
        torch.set_default_dtype(old)


def flux_setup(a):
    """The transformer config and sizes a run asks for: (config, height, width, text tokens, VAE factor); checks the
    size (one line, exit 2), sets --threads and seeds the weights' initialisation."""
    from common.backends.tiny import FLUX_TRANSFORMER
    cfg = FLUX_TRANSFORMER if a.tiny else FLUX1_DEV
    H, W = a.height or (32 if a.tiny else 512), a.width or (32 if a.tiny else 512)
    L = a.text_len or (16 if a.tiny else 512)
    vae_factor = 2 if a.tiny else VAE_FACTOR
    if H % (2 * vae_factor) or W % (2 * vae_factor):
        print(f"error: height and width must be multiples of {2 * vae_factor}", file=sys.stderr)
        sys.exit(2)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    return cfg, H, W, L, vae_factor


def build_lora(cfg: dict, device, dtype, rank: int, adapters=("default",), checkpointing: bool = True):
    """build() plus LoRA adapters on FluxBackend's targets, float32 on a bf16 base as FluxBackend does, with
    gradient checkpointing; only the first adapter trains. Returns (net, the base's parameter count, its LoRA
    parameters)."""
    from peft import LoraConfig

    from common.backends.flux import FluxBackend
    net = build(cfg, device, dtype)
    n_params = sum(p.numel() for p in net.parameters())
    net.requires_grad_(False)
    for name in adapters:
        net.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                   target_modules=list(FluxBackend.lora_targets)), adapter_name=name)
    net.set_adapter(adapters[0])
    for n, p in net.named_parameters():
        if "lora_" in n:
            p.data = p.data.float()
    lora = [p for n, p in net.named_parameters() if "lora_" in n and f".{adapters[0]}." in n]
    for p in lora:
        p.requires_grad_(True)
    if checkpointing:
        net.enable_gradient_checkpointing()
    return net.train(), n_params, lora


def main(argv=None) -> dict:
    a = parse(argv)
    from common.backends.flux import image_ids
    if a.steps < 1 or a.batch < 1:
        print("error: --steps and --batch must be >= 1", file=sys.stderr)
        sys.exit(2)
    device, dtype = device_and_dtype(a.device, a.dtype)
    cfg, H, W, L, vae_factor = flux_setup(a)
    t_build = time.perf_counter()
    net, n_params, lora = build_lora(cfg, device, dtype, a.lora_rank, checkpointing=not a.no_checkpointing)
    opt = torch.optim.AdamW(lora, lr=1e-4)
    t_build = time.perf_counter() - t_build

    h2, w2 = H // vae_factor // 2, W // vae_factor // 2
    N, D = h2 * w2, cfg["in_channels"]
    g = torch.Generator(device="cpu").manual_seed(1)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device)

    x0, eps = rnd(a.batch, N, D), rnd(a.batch, N, D)
    txt = rnd(a.batch, L, cfg["joint_attention_dim"]).to(dtype)
    pooled = rnd(a.batch, cfg["pooled_projection_dim"]).to(dtype)
    ids, txt_ids = image_ids(h2, w2, device), torch.zeros(L, 3, device=device)

    def step():
        sigma = torch.rand(a.batch, generator=g).to(device)
        xt = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * eps
        v = net(hidden_states=xt.to(dtype), encoder_hidden_states=txt, pooled_projections=pooled,
                timestep=sigma.to(dtype), img_ids=ids, txt_ids=txt_ids,
                guidance=torch.full((a.batch,), 3.5, device=device), return_dict=False)[0]
        loss = ((v.float() - (eps - x0)) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    times, loss, _ = time_steps(step, a.warmup, a.steps, device)
    res = dict(benchmark="flux1_lora_step", tiny=a.tiny, device=str(device),
               device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               dtype=str(dtype).removeprefix("torch."), height=H, width=W, batch=a.batch, image_tokens=N,
               text_tokens=L, lora_rank=a.lora_rank, gradient_checkpointing=not a.no_checkpointing,
               params=n_params, lora_params=sum(p.numel() for p in lora), build_s=round(t_build, 2),
               step_s_median=round(median(times), 4), step_s_all=[round(t, 4) for t in times],
               loss=round(loss, 5), torch=torch.__version__)
    return report(res, device, a.out)


if __name__ == "__main__":
    main()
