"""A tiny training script written exactly like a method script, for the infrastructure tests (tests/test_infra*.py).

A small MLP with dropout fits a noisy 2D flow-matching target; the data come from torch, numpy and python RNGs so
that every RNG state matters for an exact resume. --nan-at N makes the loss NaN at step N; --interrupt-at N sends
this process SIGINT (Ctrl-C) during step N.

    python tests/_infra_script.py --steps 20 --save-every 5 --out /tmp/r1
    torchrun --standalone --nproc_per_node 2 tests/_infra_script.py --steps 20 --save-every 5 --out /tmp/r2
"""
from __future__ import annotations

import os
import random
import signal
import sys
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common.config import RunConfig, opt, parse_config, user_errors  # noqa: E402
from common.dist import cleanup, init_distributed, reduce_mean, wrap_ddp  # noqa: E402
from common.runs import Run  # noqa: E402
from common.train import EMA, autocast, clip_grad, make_optimizer, seed_everything  # noqa: E402


@dataclass
class Config(RunConfig):
    teacher: str = opt("toy2d", "backend name (only checked here)")
    lr: float = opt(1e-2, "AdamW learning rate")
    batch: int = opt(16, "batch size", min=1)
    hidden: int = opt(32, "hidden width", min=1)
    max_grad_norm: float = opt(1.0, "grad-norm clip (0 = off)", min=0)
    nan_at: int = opt(0, "make the loss NaN at this step (0 = never)", min=0)
    interrupt_at: int = opt(0, "send SIGINT during this step (0 = never)", min=0)


PRESETS = {"toy2d": {"hidden": 32}, "dit": {"hidden": 64, "lr": 5e-3}}


def main(cfg: Config) -> Run:
    torch.set_num_threads(1)
    rank, world, device = init_distributed(cfg.device)
    run = Run(cfg, "infra", device)
    seed_everything(cfg.seed)  # same initial weights on every rank
    net = nn.Sequential(nn.Linear(3, cfg.hidden), nn.SiLU(), nn.Dropout(0.2), nn.Linear(cfg.hidden, 2)).to(device)
    opt_ = make_optimizer(net, lr=cfg.lr, weight_decay=1e-4)
    ema = EMA(net, decay=0.9)
    model = wrap_ddp(net, device)
    seed_everything(cfg.seed + rank)  # each rank its own data
    state = run.resume()
    if state:
        net.load_state_dict(state["net"])
        opt_.load_state_dict(state["opt"])
        ema.load_state_dict(state["ema"])

    def snapshot():
        return {"net": net.state_dict(), "opt": opt_.state_dict(), "ema": ema.state_dict()}

    summary = {}
    with run.interrupt_guard(snapshot):
        for step in range(run.step, cfg.steps):
            # data: x0 on a noisy ring (numpy + python randomness), eps and sigma from torch
            angle = torch.from_numpy(np.random.uniform(0, 2 * np.pi, cfg.batch)).float()
            radius = 1.0 + 0.1 * random.random()
            x0 = torch.stack([angle.cos(), angle.sin()], 1) * radius
            eps, sigma = torch.randn(cfg.batch, 2), torch.rand(cfg.batch, 1)
            x = ((1 - sigma) * x0 + sigma * eps).to(device)
            with autocast(cfg.precision, device):
                v = model(torch.cat([x, sigma.to(device)], 1))
            loss = ((v.float() - (eps - x0).to(device)) ** 2).mean()
            if step + 1 == cfg.nan_at:
                loss = loss * float("nan")
            if step + 1 == cfg.interrupt_at:
                os.kill(os.getpid(), signal.SIGINT)
            run.check_finite(loss=loss)
            opt_.zero_grad()
            loss.backward()
            gn = clip_grad(net, cfg.max_grad_norm)
            opt_.step()
            ema.update()
            run.log(step + 1, loss=loss, grad_norm=gn, per_dim=v.detach().pow(2).mean(0),
                    loss_all_ranks=reduce_mean(loss))
            summary["final_loss"] = loss.item()
            if run.due(step + 1):
                run.save(step + 1, snapshot())
    run.finish(summary, state=snapshot())
    cleanup()
    return run


if __name__ == "__main__":
    with user_errors():
        main(parse_config(Config, presets=PRESETS))
