"""Training throughput and model FLOPs utilisation (MFU) of the in-repo small DiT (common/dit.py).

One step = the flow-matching loss on random latents (x_sigma = (1 - sigma) x0 + sigma eps, target v = eps - x0,
sigma ~ U(0, 1)), one conditional pass (guidance 1), backward, AdamW step: the pretraining step that toy.pretrain_dit
runs, without the data pipeline. FLOPs per step are counted, not estimated: torch.utils.flop_counter.FlopCounterMode
over one eager step (matmuls and attention, forward and backward), which is independent of the dtype and of
torch.compile. MFU = FLOPs per step / median step time / the device's peak dense bf16 FLOP/s (--peak-tflops; by
default looked up from the GPU's name: H100/H200 989, A100 312; none on a CPU, where MFU is not reported).

GPU:  python benchmarks/dit_throughput.py --preset small --dtype bf16 [--compile]     (bf16 weights)
      python benchmarks/dit_throughput.py --preset small --dtype fp32 --amp           (fp32 weights, bf16 autocast:
                                                                                        what rats/otca/rtdmd train)
CPU smoke run:  python benchmarks/dit_throughput.py --preset tiny --batch 4 --steps 2 --device cpu
Prints one JSON line (and writes it to --out when given).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.timing import device_and_dtype, median, report, time_steps  # noqa: E402

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small", choices=["tiny", "mini", "small", "base"])
    p.add_argument("--resolution", type=int, default=None, help="latent resolution (default: the preset's, 32)")
    p.add_argument("--video", action="store_true", help="the video DiT (frames x res x res latents)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--dtype", default=None, choices=["bf16", "fp32"], help="default bf16 on GPU, fp32 on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    p.add_argument("--amp", action="store_true", help="bf16 autocast around the forward (with --dtype fp32: the "
                   "scripts' mixed precision, float32 weights)")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps (compilation happens here)")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: by GPU name)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default=None, help="also write the JSON result here")
    return p.parse_args(argv)


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given is not None:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def main(argv=None) -> dict:
    a = parse(argv)
    if a.steps < 1 or a.batch < 1 or a.warmup < 0:
        print("error: --steps and --batch must be >= 1, --warmup >= 0", file=sys.stderr)
        sys.exit(2)
    device, dtype = device_and_dtype(a.device, a.dtype)
    if a.threads:
        torch.set_num_threads(a.threads)
    from common.dit import DiT, DiTBackend, DiTConfig
    torch.manual_seed(0)
    # a random-init DiT of the requested preset (DiTBackend's tiny=True path builds only the tiny preset)
    backend = DiTBackend(preset="tiny", tiny=True, video=a.video, device=device, dtype=dtype,
                         resolution=a.resolution, guidance=1.0)
    net = DiT(DiTConfig.from_preset(a.preset, a.video, a.resolution)).to(device=device, dtype=dtype)
    backend.network, backend.cfg, backend.latent_shape = net, net.cfg, net.cfg.latent_shape
    net.train()
    n_params = sum(p.numel() for p in net.parameters())
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    prompts = (backend.prompts("train") * a.batch)[:a.batch]
    cond = backend.encode(prompts)
    g = torch.Generator(device="cpu").manual_seed(1)
    x0 = torch.randn((a.batch, *net.cfg.latent_shape), generator=g).to(device)
    eps = torch.randn((a.batch, *net.cfg.latent_shape), generator=g).to(device)

    def step():
        sigma = torch.rand(a.batch, generator=g).to(device)
        s = sigma.view(-1, *[1] * (x0.ndim - 1))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=a.amp):
            v = backend.velocity(net, (1 - s) * x0 + s * eps, sigma, cond, 1.0)
        loss = ((v.float() - (eps - x0)) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc:   # eager, before compilation: the model's FLOPs, not the kernels'
        step()
    flops = fc.get_total_flops()
    if a.compile:
        for b in net.blocks:
            b.compile()
    times, loss, t_warm = time_steps(step, a.warmup, a.steps, device)
    t_med = median(times)
    # the looked-up peak is bf16's: an fp32 run's MFU only against a --peak-tflops the user gives (TF32, FP32)
    peak = peak_tflops(device, a.peak_tflops) if dtype == torch.bfloat16 or a.amp or a.peak_tflops else None
    res = dict(benchmark="dit_train_throughput", preset=a.preset, video=a.video, resolution=net.cfg.resolution,
               device=str(device), device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               dtype=str(dtype).removeprefix("torch."), amp=a.amp, compile=a.compile, batch=a.batch, params=n_params,
               flops_per_step=flops, step_s_median=round(t_med, 5), step_s_all=[round(t, 5) for t in times],
               samples_per_s=round(a.batch / t_med, 2), achieved_tflops=round(flops / t_med / 1e12, 4),
               peak_tflops=peak, mfu=round(flops / t_med / (peak * 1e12), 4) if peak else None,
               warmup_s=round(t_warm, 2), loss=round(float(loss.detach()), 5), torch=torch.__version__)
    return report(res, device, a.out)


if __name__ == "__main__":
    main()
