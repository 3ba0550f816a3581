"""Pretrain the small-DiT teacher by flow matching on procedural shapes, then measure its attribute accuracy.

    python -m toy.pretrain_dit --preset tiny --out toy/weights/dit-tiny --steps 3000      # CPU, minutes
    python -m toy.pretrain_dit --preset small --out runs/dit-small --steps 40000 --bf16    # one GPU
    python -m toy.pretrain_dit --preset tiny --video --out toy/weights/dit-tiny-video
    python -m toy.pretrain_dit --out DIR --resume --steps 6000                             # continue a run
    python -m toy.pretrain_dit --out DIR --eval-only                                       # accuracy of DIR

Rectified flow (common.dit.flow_matching_loss: logit-normal sigma, v = eps - x0), AdamW, linear warm-up, prompt
dropout (the empty prompt, p = 0.1) so classifier-free guidance works, EMA of the weights. DIR receives
model.safetensors + config.json (the EMA weights: what the backend loads) and train_state.pt (raw weights,
optimiser, EMA, step, RNG: what --resume reads; not needed to sample). At the end, samples for the held-out eval
prompts are classified from pixels (toy.shape_rewards.classify_attributes) and the per-attribute accuracy is written
to DIR/eval.json, with a grid of samples (one held-out prompt per row) in DIR/samples.png. Fresh batches are
rendered every step, so there is no dataset to download or store.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # a user mistake: one line, exit status 2, no usage dump
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def parse_args(argv=None):
    p = _Parser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny", help="tiny | mini | small | base")
    p.add_argument("--out", required=True, help="checkpoint directory")
    p.add_argument("--video", action="store_true", help="videos of moving shapes instead of images")
    p.add_argument("--steps", type=int, default=3000, help="total optimiser steps")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--ema-decay", type=float, default=0.999, help="EMA decay (warmed up as (1 + n) / (10 + n))")
    p.add_argument("--reset-ema", action="store_true", help="with --resume: restart the EMA from the raw weights")
    p.add_argument("--p-uncond", type=float, default=0.1, help="prompt dropout for CFG")
    p.add_argument("--p-open", type=float, default=0.3, help="probability a prompt leaves an attribute open")
    p.add_argument("--resume", action="store_true", help="continue from DIR/train_state.pt")
    p.add_argument("--eval-only", action="store_true", help="only measure the checkpoint in DIR")
    p.add_argument("--eval-per-prompt", type=int, default=16, help="samples per held-out prompt (0 = no eval)")
    p.add_argument("--eval-nfe", type=int, default=20)
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the blocks")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    a = p.parse_args(argv)
    for k in ("steps", "batch"):
        if getattr(a, k) < 1:
            p.error(f"--{k} must be >= 1")
    if not 0 < a.ema_decay <= 1:
        p.error("--ema-decay must be in (0, 1]")
    return a


@torch.no_grad()
def ema_update(ema: torch.nn.Module, net: torch.nn.Module, decay: float) -> None:
    """ema <- decay ema + (1 - decay) net, parameter by parameter (buffers are fixed tables here)."""
    for e, p in zip(ema.parameters(), net.parameters()):
        e.lerp_(p.detach().to(e.dtype), 1 - decay)


@torch.no_grad()
def evaluate(out_dir: str, per_prompt: int = 16, nfe: int = 20, guidance: float = 2.0, device="cpu",
             seed: int = 0) -> dict:
    """Sample per_prompt times each held-out prompt (Euler, nfe steps, CFG) and classify the attributes.

    Returns {"accuracy": {attribute: fraction}, "per_prompt": {prompt: {attribute: fraction}}, ...}: the fraction
    of samples whose pixel-classified attribute equals the prompt's (toy.shape_rewards.classify_attributes).
    """
    from common.dit import DiTBackend
    from common.flow import rollout
    from toy.shape_rewards import classify_attributes
    from toy.shapes import ATTRIBUTES, parse_prompt
    be = DiTBackend(pretrained=out_dir, device=device, guidance=guidance)
    prompts = be.prompts("eval")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    per, tot, cnt, grid = {}, {}, {}, []
    for p in prompts:
        cond = be.encode([p] * per_prompt)
        x = be.noise(per_prompt, gen)
        media = be.decode(rollout(be.velocity_fn(be.network, cond), x, be.sigmas(nfe)).final)
        if len(grid) < 8:  # first 8 prompts x first 8 samples for the picture (the first frame of a video)
            grid.append((media[:, 0] if media.ndim == 5 else media)[:8].cpu())
        pred = classify_attributes(media)
        want = parse_prompt(p, be.video)
        per[p] = {}
        for k, v in want.items():
            if v is None:
                continue
            acc = (pred[k] == ATTRIBUTES[k].index(v)).float().mean().item()
            per[p][k] = acc
            tot[k] = tot.get(k, 0.0) + acc
            cnt[k] = cnt.get(k, 0) + 1
    acc = {k: tot[k] / cnt[k] for k in tot}
    from torchvision.utils import save_image
    save_image(torch.cat(grid), os.path.join(out_dir, "samples.png"), nrow=min(8, per_prompt), padding=1)
    return {"accuracy": acc, "all_mean": sum(acc.values()) / len(acc), "per_prompt": per,
            "samples_per_prompt": per_prompt, "nfe": nfe, "guidance": guidance, "prompts": len(prompts)}


def train(a) -> None:
    from tqdm import tqdm
    from common.dit import DiT, DiTConfig, flow_matching_loss, load_pretrained, media_to_latent, save_pretrained
    from common.runs import atomic_save
    from toy.shapes import make_batch, tokenize
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    dev = torch.device(a.device)
    state_path = os.path.join(a.out, "train_state.pt")
    if a.resume:
        if not os.path.isfile(state_path):
            raise FileNotFoundError(2, "no train_state.pt to resume from", state_path)
        net = load_pretrained(a.out)  # rebuilds the architecture from config.json; weights replaced below
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        net.load_state_dict(state["net"])
    else:
        net, state = DiT(DiTConfig.from_preset(a.preset, a.video)), None
    net.to(dev).train()
    ema = DiT(net.cfg).to(dev)
    ema.load_state_dict(net.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=a.lr, weight_decay=0.0, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(a.seed)
    step, elapsed = 0, 0.0
    if state is not None:
        opt.load_state_dict(state["opt"])
        ema.load_state_dict(state["net"] if a.reset_ema else state["ema"])
        gen.set_state(state["gen"])
        if state.get("cuda_rng") is not None and dev.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], dev)
        step, elapsed = state["step"], state["elapsed"]
    if a.compile:
        for b in net.blocks:
            b.compile()
    n_params = sum(p.numel() for p in net.parameters())
    print(f"DiT {net.cfg.preset}: {n_params / 1e6:.2f}M parameters, latent {net.cfg.latent_shape}, "
          f"{'video' if a.video else 'image'}, device {dev}, from step {step}", flush=True)

    def snapshot():
        save_pretrained(ema, a.out, steps=step, train_seconds=round(elapsed, 1), batch=a.batch, lr=a.lr,
                        ema_decay=a.ema_decay, p_uncond=a.p_uncond, device=str(dev), threads=a.threads)
        # on a GPU the loss draws sigma and noise from the device's global RNG (on the CPU from gen): saved too, so
        # that --resume continues exactly; written atomically (a kill mid-write keeps the previous state)
        atomic_save({"net": net.state_dict(), "opt": opt.state_dict(), "ema": ema.state_dict(), "gen": gen.get_state(),
                     "cuda_rng": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None,
                     "step": step, "elapsed": elapsed}, state_path)

    bar = tqdm(total=a.steps, initial=step, desc="pretrain", dynamic_ncols=True, file=sys.stdout)
    loss_avg = None
    while step < a.steps:
        t0 = time.time()
        # ----- data: fresh renders; prompt dropout replaces a prompt by "" (the null prompt) -----
        b = make_batch(a.batch, video=a.video, res=net.cfg.resolution, frames=net.cfg.frames or 8,
                       p_open=a.p_open, generator=gen)
        drop = torch.rand(a.batch, generator=gen) < a.p_uncond
        prompts = ["" if d else p for p, d in zip(b.prompts, drop.tolist())]
        ids, mask = tokenize(prompts, net.cfg.max_text_len)
        x0 = media_to_latent(b.media).to(dev)
        # ----- loss and update -----
        for g in opt.param_groups:
            g["lr"] = a.lr * min(1.0, (step + 1) / a.warmup)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=a.bf16):
            loss = flow_matching_loss(net, x0, ids.to(dev), mask.to(dev), gen if dev.type == "cpu" else None)
        if not torch.isfinite(loss):
            print(f"error: non-finite loss at step {step}; last checkpoint kept in {a.out}", file=sys.stderr)
            raise SystemExit(3)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        # EMA warm-up: a constant 0.999 would keep 0.999^n of the random init after n steps (37% at n = 1000)
        ema_update(ema, net, min(a.ema_decay, (1 + step) / (10 + step)))
        step += 1
        elapsed += time.time() - t0
        loss_avg = loss.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{loss_avg:.4f}")
        if step % a.save_every == 0 or step == a.steps:
            snapshot()
    bar.close()
    print(f"trained {step} steps in {elapsed:.0f} s of step time; EMA weights in {a.out}", flush=True)


def main(argv=None) -> None:
    a = parse_args(argv)
    from common.backend import BackendError
    try:
        if not a.eval_only:
            train(a)
        if a.eval_per_prompt > 0:
            torch.set_num_threads(a.threads)
            res = evaluate(a.out, a.eval_per_prompt, a.eval_nfe, a.guidance, a.device, a.seed)
            with open(os.path.join(a.out, "eval.json"), "w") as f:
                json.dump(res, f, indent=1)
            accs = ", ".join(f"{k} {v:.2f}" for k, v in res["accuracy"].items())
            print(f"held-out attribute accuracy ({res['prompts']} prompts x {a.eval_per_prompt}, {a.eval_nfe} "
                  f"Euler steps, CFG {a.guidance}): {accs}", flush=True)
    except (BackendError, FileNotFoundError) as e:
        msg = f"{e.strerror}: {e.filename}" if isinstance(e, FileNotFoundError) and e.filename else str(e)
        print(f"error: {msg}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
