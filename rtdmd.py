"""RTDMD: Reinforcing few-step generators via Reward-Tilted Distribution Matching (Huang et al., arXiv 2605.26108).

A K = 4 step CPS generator (eta = 0.9, raw timesteps [1000, 750, 500, 250] under the backbone's shift) is pulled
toward the reward-tilted teacher p_tilt = p_T e^{beta r} / Z, whose KL splits as
    grad KL(p || p_tilt) = grad KL(p || p_T) - beta grad E_p[r].
Stage 1 (AC-DMD, "cold start"): random-stop CPS rollouts with gradients on the last executed step only; a fake score
trained on the ambient target of the noisy sample x_s (weight min(1, 10 sigma_ts^2)) plus a two-sample consistency
regulariser; the normalised DMD loss through shared-noise projections back to s; 10 fake updates per generator update;
a generator EMA. Stage 2: SubGRPO (2 of the 3 stochastic steps per epoch, group-shared noise at the others), per-reward
advantages, the policy gradient on the chosen steps, and on the deterministic last step the DMD term plus reward
back-propagation (the hybrid estimator); one fake update per epoch. The maths lives in common/dmd.py.
No network input is evaluated twice at the same weights: the stage-2 rollout is the loss's graph (stage2_rollout),
the fixed-input evaluations that the chain cannot share are one batched call (stage2_terms), and the consistency
hop's two samples one fake-score call (benchmarks/harness.py expected_calls counts them).
`--fake-copy adapter` (the flux, wan, sd3, flux2 presets): the fake score is a second LoRA adapter on the generator's
transformer and the teacher its base (adapters off) instead of two deep copies: on FLUX.1-dev (11.9 B parameters,
rank-32 adapters) the three networks hold 24.2 GB instead of 72.0 GB (47.8 GB of bf16 weights fewer, so RTDMD fits
an 80 GB GPU), with the same losses and gradients (tests/test_rtdmd_lora.py). Checkpoints hold the trained tensors
only (on FLUX.1 the adapters: 0.6 GB where the three full state dicts were 72 GB) and the script's random streams.
The teacher is the generator's own model, except with `--teacher-pretrained` (the flux2 preset, spec decision 14): the
step-distilled FLUX.2-klein-4B generator, the teacher and fake from FLUX.2-klein-base-4B (true CFG at --cfg-scale 4
with the empty prompt, decided per network; a scale the teacher would ignore is a one-line error);
common/dmd_models.py's build_models has the layouts (adapter mode: two transformers), --tiny a base twin of other
weights.

Simplifications against the official code (shared/spec/rtdmd.md): data parallel only (under torchrun each rank holds the
networks, draws its own --batch / --groups, and every optimiser step uses the gradients averaged over ranks; no FSDP),
one optimiser step per epoch (no 16 sub-batches x gradient accumulation; the loss is divided by |S| + 1 instead of 48);
the correct per-step EMA (not the per-sub-batch quirk); full fine-tuning or the backend's LoRA, no LoRA merge between
stages (the stage-1 EMA weights are copied into the generator instead); the GenEval reward is not wired. `--advantage
raw --beta B` is our toy mode (not in the paper's code): PG on beta (r - leave-one-out mean) with the exact
log-probability, rescaled by (#stochastic / #trained) steps; the unnormalised KL direction (1 - t)(s_fake - s_real) at
small t ~ U[0.02, 0.1] (KL_t -> KL_0; the fake is fitted on that range with weight 1); and `--dmd-through all` (the toy
preset): the KL gradient re-parameterised through the whole chain. Why: at p = p_tilt, s_p - s_T = beta grad r, so the
pathwise KL gradient equals beta x the pathwise reward gradient along the SAME paths; the hybrid reward estimator (score
function on the stochastic steps + back-prop through the last) is unbiased for the full reward gradient, so only a KL
gradient through every step cancels it. With the code's placement (`--dmd-through last`) the score-function reward term
on the stochastic steps is left uncancelled at p_tilt, and the student goes past the tilted target
(results/rtdmd_toy.md).
On a backend with fewer prompts than groups, groups of one prompt get distinct shared-noise keys ("prompt#g").

    python rtdmd.py                                                  # toy2d, both stages, ~25 s on 2 CPU cores
    python rtdmd.py --teacher sd3 --stage all --pretrained stabilityai/stable-diffusion-3.5-medium --reward pickscore
    python rtdmd.py --teacher flux2 --tiny --steps 2 --epochs 1 --reward clip      # two-model path on tiny twins, CPU
    python rtdmd.py --teacher flux2 --stage 1 --pretrained /models/FLUX.2-klein-4B \
        --teacher-pretrained /models/FLUX.2-klein-base-4B                          # the preset's hub ids, local copies
    torchrun --nproc_per_node 8 rtdmd.py --teacher flux2 --stage 2 --init runs/rtdmd-flux2-stage1
"""
from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass
from typing import Literal

import torch

from common import dist
from common.backend import get_backend
from common.config import ConfigError, RunConfig, opt, parse_config, user_errors
from common.dmd import (ambient_fake_loss, ambient_forward, ambient_target, ambient_weight, consistency_loss, dmd_loss,
                        kl_direction, linear_surrogate, per_reward_advantages, project_pair, raw_advantages,
                        sample_consistency_level, sample_renoise_level, stage2_rollout, stage2_terms, subgrpo_noises,
                        subgrpo_steps)
from common.dmd_models import Models, build_models
from common.flow import rollout
from common.prompts import load_prompts
from common.rewards import RewardError, build_reward, parse_reward_opts
from common.rl import clip_fraction, clipped_surrogate
from common.runs import Run, as_tuples, checkpoint_config
from common.train import (EMA, autocast, clip_grad, detached, ema_tensors, load_trained, make_optimizer,
                          seed_everything, set_hyperparameters)
from toy.evaluate import small_eval_config, toy_eval


@dataclass
class Config(RunConfig):
    """RTDMD: AC-DMD cold start (stage 1), then the reward-tilted hybrid policy gradient (stage 2)."""
    teacher: str = opt("toy2d", "backend: toy2d | dit | flux | wan | sd3 | flux2")
    stage: Literal["1", "2", "all"] = opt("all", "1 = AC-DMD, 2 = RTDMD fine-tune, all = both")
    tiny: bool = opt(False, "tiny random model (offline, CPU)")
    pretrained: str = opt("", "hub id or local diffusers directory ('' = the backend's default)")
    teacher_pretrained: str = opt("", "teacher (real score) and fake score init: hub id or local diffusers directory "
                                      "of the same family and size ('' = the generator's own model; flux2 preset: "
                                      "FLUX.2-klein-base-4B, with a klein-9B generator pass klein-base-9B)")
    toy_teacher: str = opt("", "toy2d only: exact (the mixture velocity) or learned (the net) teacher")
    timesteps: list[int] = opt([1000, 750, 500, 250], "generator raw timesteps (then the backbone's shift)")
    eta: float = opt(0.9, "CPS noise level eta (0 = Euler, 1 = DMD2 re-noise)", min=0, max=1)
    cfg_scale: float = opt(1.0, "teacher (real score) CFG scale; the fake score never uses CFG", min=0)
    fake_copy: Literal["full", "adapter"] = opt("full", "fake score and teacher: full = two copies of the network; "
                                                "adapter = a 2nd LoRA adapter + the base (LoRA backends only)")
    lora_rank: int = opt(32, "LoRA rank of the generator's and the fake score's adapters (diffusers backends)", min=1)
    lora_alpha: float = opt(64.0, "LoRA alpha: the adapters' scale is alpha / rank (spec 4.3: rank 32, alpha 64)",
                            min=0)
    gradient_checkpointing: bool = opt(False, "gradient checkpointing on the transformer blocks (diffusers presets)")
    # ----- stage 1: AC-DMD (steps = fake-score iterations) -----
    batch: int = opt(256, "stage-1 batch", min=1)
    dmd: Literal["ac", "plain"] = opt("ac", "ac = ambient (match x_s at s); plain = DMD2 (match x0_hat at s = 0)")
    fake_ratio: int = opt(10, "fake-score updates per generator update (TTUR)", min=1)
    lr: float = opt(1e-3, "generator learning rate", min=0)
    fake_lr: float = opt(1e-3, "fake-score learning rate", min=0)
    gamma: float = opt(0.01, "consistency weight (0 = off); stage 2 too unless --gamma2", min=0)
    kernel: Literal["cps", "ddpm"] = opt("cps", "consistency transition: cps (official code) or ddpm (martingale)")
    cons_offset: int = opt(200, "max consistency hop in 1000-step units", min=1)
    ema_decay: float = opt(0.99, "generator EMA decay (every iteration)", min=0, max=1)
    max_grad_norm: float = opt(1.0, "grad-norm clip", min=0)
    # ----- stage 2: RTDMD -----
    epochs: int = opt(300, "stage-2 epochs (one generator update each)", min=0)
    init: str = opt("", "stage 2 only: a stage-1 run directory whose final EMA generator and fake score to load")
    reward: str = opt("toy_linear", "reward spec, e.g. toy_linear or clip:1,pickscore:1,hps:1")
    reward_opts: str = opt("", "extra reward-factory options k=v,k=v (e.g. color_target=red on the small DiT)")
    prompt_split: str = opt("train", "the backend's built-in prompt list (dit: train | eval | open)")
    prompts: str = opt("", "training prompt file (.txt/.json/.jsonl/.csv; '' = the built-in --prompt-split list)")
    groups: int = opt(16, "groups (prompts) per epoch", min=1)
    group_size: int = opt(16, "samples per group (K-repeat)", min=2)
    sub_steps: int = opt(2, "SubGRPO: stochastic steps trained per epoch (= #stochastic: full GRPO)", min=1)
    advantage: Literal["grpo", "raw"] = opt("grpo", "grpo = per-reward standardised; raw = beta (r - loo mean)")
    beta: float = opt(1.0, "tilt strength for --advantage raw (target p_T e^{beta r})", min=0)
    logprob: Literal["auto", "surrogate", "exact"] = opt("auto", "auto = surrogate (grpo) / exact (raw)")
    clip_range: float = opt(1e-5, "PPO clip range", min=0)
    adv_clip: float = opt(5.0, "advantage clamp", min=0)
    w_dm: float = opt(1e-3, "grpo mode: weight of the last-step DMD term", min=0)
    w_bp: float = opt(1e-4, "grpo mode: weight of the back-prop hinge relu(margin - R)", min=0)
    bp_margin: float = opt(3.0, "back-prop hinge margin", min=0)
    bp: bool = opt(True, "reward back-propagation through the deterministic last step")
    dmd_through: Literal["last", "all"] = opt("last", "stage-2 DMD gradient: last step only (code) or whole chain")
    raw_t_max: float = opt(0.1, "raw mode: DMD renoise t ~ U[0.02, raw_t_max] (KL_t -> KL_0 as t -> 0)", min=0.03)
    fake_updates2: int = opt(1, "stage-2 fake-score updates per epoch", min=1)
    gamma2: float | None = opt(None, "stage-2 consistency weight (none = --gamma; the paper: 0 on FLUX.1-dev, "
                                     "FLUX.2-9B)", min=0)
    lr2: float = opt(3e-6, "stage-2 generator learning rate", min=0)
    weight_decay2: float = opt(1e-4, "stage-2 generator weight decay", min=0)
    # ----- evaluation -----
    eval_samples: int = opt(20000, "toy: samples for the KL estimates", min=100)
    eval_only: bool = opt(False, "no training: evaluate --ckpt (a run directory or checkpoint; its backend and "
                          "preset, model, --seed, --timesteps, --eta; this command's reward) at --eval-nfe")
    ckpt: str = opt("", "with --eval-only: the trained run to evaluate ('' = the base model only)", path=True)
    eval_nfe: list[int] = opt([4], "with --eval-only: generator step counts (CPS eta, last step deterministic; "
                                   "at len(--timesteps) steps, on --timesteps)")
    eval_per_prompt: int = opt(8, "with --eval-only: held-out samples per eval prompt", min=1)


# the four diffusers families (spec 4.3): bf16 autocast on a bf16 frozen base, LoRA r 32 / alpha 64 on the generator
# and the fake score (the fake a second adapter on the teacher's transformer), gradient checkpointing on
DIFFUSERS = {"reward": "clip:1,pickscore:1,hps:1", "steps": 15000, "epochs": 1000, "precision": "bf16",
             "fake_copy": "adapter", "gradient_checkpointing": True}
PRESETS = {
    "toy2d": {"toy_teacher": "exact", "dmd_through": "all", "steps": 1500, "epochs": 300, "lr": 2e-4, "fake_lr": 1e-3,
              "advantage": "raw", "beta": 0.5,
              "lr2": 1e-4, "weight_decay2": 0.0, "fake_updates2": 5},
    # dit: the paper's mode (per-reward advantages). The raw-beta tilt check (results/rtdmd_dit.py) passes
    # --advantage raw --beta 2 --dmd-through all itself: at image dimension that mode collapses (results/rtdmd_dit.md)
    "dit": {"steps": 300, "epochs": 60, "batch": 32, "lr": 1e-4, "fake_lr": 3e-4, "groups": 4, "group_size": 8,
            "reward": "dit_color", "reward_opts": "color_target=red", "prompt_split": "open",
            "lr2": 3e-5, "weight_decay2": 0.0, "cfg_scale": 2.0},
    "sd3": {"batch": 9, "lr": 3e-5, "fake_lr": 3e-5, "cfg_scale": 4.5, "groups": 2, "group_size": 24, **DIFFUSERS},
    # flux2 (spec decision 14): the generator starts from the step-distilled klein-4B (the backend's default), the
    # teacher and the fake from klein-base-4B, whose true CFG 4.0 with the empty prompt is the teacher's guidance
    "flux2": {"batch": 6, "lr": 1e-6, "fake_lr": 1e-6, "cfg_scale": 4.0, "groups": 4, "group_size": 24, **DIFFUSERS,
              "teacher_pretrained": "black-forest-labs/FLUX.2-klein-base-4B"},
    "flux": {"batch": 3, "lr": 1e-6, "fake_lr": 1e-6, "cfg_scale": 3.5, "groups": 2, "group_size": 24, "gamma2": 0.0,
             **DIFFUSERS},
    "wan": {"batch": 2, "lr": 1e-6, "fake_lr": 1e-6, "cfg_scale": 5.0, "groups": 2, "group_size": 8, **DIFFUSERS,
            "reward": "clip"},
}


def checks(cfg: Config) -> str | None:
    """Flag combinations that opt()'s per-flag bounds cannot see (None: fine)."""
    try:
        parse_reward_opts(cfg.reward_opts, ("tiny", "device"), cfg.reward)   # tiny, device: main passes them
    except RewardError as e:
        return str(e)
    ts = list(cfg.timesteps)
    if len(ts) < 2 or not all(a > b for a, b in zip(ts, ts[1:])) or ts[0] > 1000 or ts[-1] <= 0:
        return (f"--timesteps must fall strictly from at most 1000 to above 0, at least two of them (the last step "
                f"is deterministic), got {','.join(map(str, ts))}")
    if cfg.sub_steps > len(ts) - 1:
        return f"--sub-steps {cfg.sub_steps} exceeds the {len(ts) - 1} stochastic steps of --timesteps"
    if cfg.init and cfg.stage != "2":   # stage 1 would start from (and its EMA from) before the loaded weights
        return f"--init loads a stage-1 run to start stage 2 from: use it with --stage 2 (got --stage {cfg.stage})"
    if cfg.teacher_pretrained and cfg.teacher in ("toy2d", "dit"):
        return (f"--teacher-pretrained loads a diffusers checkpoint (flux, wan, sd3, flux2); the {cfg.teacher} "
                f"teacher is the generator's own model: pass --teacher-pretrained ''")
    sizes = [_size_tag(cfg.pretrained), _size_tag(cfg.teacher_pretrained)]   # before loading 4B + 9B for nothing
    if None not in sizes and sizes[0] != sizes[1]:
        return (f"--pretrained {cfg.pretrained} ({sizes[0]}) and --teacher-pretrained {cfg.teacher_pretrained} "
                f"({sizes[1]}) differ in size: pass the base checkpoint of the generator's size as the teacher "
                f"(klein-9B: black-forest-labs/FLUX.2-klein-base-9B)")
    return None


def _size_tag(model: str) -> str | None:
    """'black-forest-labs/FLUX.2-klein-base-9B' -> '9B'; None without a size in the name's last component."""
    m = re.search(r"(?<![\w.])(\d+(?:\.\d+)?B)(?![\w.])", os.path.basename(model.rstrip("/")))
    return m.group(1) if m else None


def eval_only(cfg: Config, backend, models: Models, reward, tilt) -> dict:
    """--eval-only: the teacher (50 Euler steps, CFG), the base generator and the trained one (its EMA weights) at
    every --eval-nfe CPS budget, on the held-out prompts and noise; eval.md/json in --ckpt's run directory (or
    --out). On the toy, the binned KL of each to the teacher and to p_tilt is added. The fake score is not used
    here, so it holds the trained generator: its tensors mirror the generator's (Models.gen_named / fake_named
    share their keys) and in adapter mode it is a second adapter on the same transformer, so the evaluation needs
    no further copy of the model (FLUX.1: 24 GB). With a teacher checkpoint of its own (the fake sits on the
    teacher's model) the trained generator goes into the generator, and the base generator is its adapters-off
    reference (a frozen copy without LoRA). Under torchrun every rank samples its share of the held-out set
    (common.evaluate.eval_table) and rank 0 writes."""
    from common.evaluate import Sampler, eval_table
    from common.runs import load_checkpoint
    dev = backend.device
    for net in (models.gen, models.fake, models.teacher):
        net.eval()      # evaluation (the fake starts in train mode; no network here has dropout)
    samplers = {"teacher (N=50, Euler)": Sampler(models.teacher, backend.sigmas(50), guidance=cfg.cfg_scale,
                                                 context=models.teacher_ctx)}
    base, base_ctx, trained, trained_ctx = models.gen, None, models.fake, models.fake_ctx
    if cfg.ckpt:
        ckpt = load_checkpoint(cfg.ckpt, map_location=dev, method="rtdmd", needs=("gen_ema",))
        if not models.fake_from_gen:
            trained, trained_ctx = models.gen, None
            if backend.has_lora(models.gen):
                base_ctx = lambda: backend.reference(models.gen)
            else:
                base = backend.frozen_copy(models.gen)
        load_trained(models.fake_named if models.fake_from_gen else models.gen_named, ckpt["state"]["gen_ema"],
                     f"--ckpt {cfg.ckpt}")
    for k in cfg.eval_nfe:   # at K = len(--timesteps): the grid RTDMD trained on (--timesteps was ignored here)
        grid = backend.sigmas(k, timesteps=cfg.timesteps if k == len(cfg.timesteps) else None)
        samplers[f"base generator (K={k})"] = Sampler(base, grid, "cps", cfg.eta, 1.0, context=base_ctx)
        if cfg.ckpt:
            samplers[f"RTDMD (K={k})"] = Sampler(trained, grid, "cps", cfg.eta, 1.0, context=trained_ctx)
    extra = None
    if tilt is not None:
        from toy.evaluate import KL_HIST
        from toy.metrics import kl_histogram
        targets = {"teacher": backend.target(0), "tilted": tilt[0]}
        extra = lambda name, lat, media: {f"kl_{t}": kl_histogram(lat, m.log_prob, **KL_HIST)["kl"]
                                          for t, m in targets.items()}
    out = cfg.ckpt if os.path.isdir(cfg.ckpt) else (cfg.out or "runs/rtdmd-eval")
    rows = eval_table(backend, samplers, reward, out, header=f"rtdmd.py --eval-only --ckpt {cfg.ckpt or '(none)'}",
                      n_per_prompt=cfg.eval_per_prompt if tilt is None else max(cfg.eval_per_prompt, 4000),
                      seed=10_000 + cfg.seed, extra=extra)
    if dist.is_main():
        print(f"wrote {os.path.join(out, 'eval.md')}")
    return {"rows": rows}


def main(cfg: Config):
    if cfg.eval_only and cfg.ckpt:   # the run's model and generator grid, as in rats.py and otca.py (parse_config
        trained = checkpoint_config(cfg.ckpt) or {}   # took its backend's preset); reward and eval flags: this command
        for k in ("teacher", "tiny", "pretrained", "teacher_pretrained", "toy_teacher", "seed", "timesteps",
                  "eta", "lora_rank", "lora_alpha"):
            setattr(cfg, k, trained.get(k, getattr(cfg, k)))
    problem = checks(cfg)        # (also at parse time from the command line; here for main(cfg) callers)
    if problem:
        raise ConfigError(problem)
    # one bar over both stages: the log's step runs over stage-1 iterations, then stage-2 epochs
    total = (cfg.steps if cfg.stage in ("1", "all") else 0) + (cfg.epochs if cfg.stage in ("2", "all") else 0)
    # data parallel under torchrun: every rank holds the models, draws its own prompts and noise, and the gradients
    # are averaged once per optimizer step (dist.average_gradients), so the weights stay equal on every rank
    rank, world, device = dist.init_distributed(cfg.device)
    run = None if cfg.eval_only else Run(cfg, "rtdmd", device=device, total=total)
    seed_everything(cfg.seed)      # the same initial weights on every rank
    if device.type == "cpu":
        torch.set_num_threads(1)   # the toy is latency-bound: extra intra-op threads only spin on a shared CPU
    backend = get_backend(cfg.teacher, tiny=cfg.tiny, seed=cfg.seed, device=device,
                          **({"teacher": cfg.toy_teacher} if cfg.toy_teacher else {}),
                          **({"pretrained": cfg.pretrained} if cfg.pretrained else {}),
                          **({"teacher_pretrained": cfg.teacher_pretrained} if cfg.teacher_pretrained else {}),
                          lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                          gradient_checkpointing=cfg.gradient_checkpointing)
    dev = backend.device
    extra = parse_reward_opts(cfg.reward_opts, ("tiny", "device"), cfg.reward)   # typed: 8, 0.5, true
    reward = build_reward(cfg.reward, device=dev, tiny=cfg.tiny, **extra)
    # ----- models: generator (trained), fake score (trained, starts as a copy), teacher = real score (frozen) -----
    models = build_models(backend, cfg.fake_copy)
    if cfg.cfg_scale != 1 and not backend.guidance_applies(models.teacher):   # never dropped without a word
        raise ConfigError(f"--cfg-scale {cfg.cfg_scale:g} would be ignored: the {backend.name} teacher "
                          f"({cfg.teacher_pretrained or getattr(backend, 'pretrained', None) or 'the generator'}) "
                          f"takes no guidance (step-distilled?): pass --cfg-scale 1, or a base checkpoint with "
                          f"--teacher-pretrained")
    gen, fake, teacher, fake_ctx, teacher_ctx = (models.gen, models.fake, models.teacher, models.fake_ctx,
                                                 models.teacher_ctx)
    gen_params, fake_params = list(models.gen_named.values()), list(models.fake_named.values())
    opt_fake = make_optimizer(fake_params, lr=cfg.fake_lr, weight_decay=0.0)
    opt_gen = make_optimizer(gen_params, lr=cfg.lr, weight_decay=0.0)
    ema = EMA(gen_params, decay=cfg.ema_decay)
    # ----- the generator grid: K steps, the last to sigma = 0 deterministic -----
    K = len(cfg.timesteps)
    # under the family's shift rule: FLUX.1 / FLUX.2's dynamic shift too (a static backend.shift was used off the
    # uniform grid); the default [1000, 750, 500, 250] is the family's uniform 4-step grid
    sigmas = backend.sigmas(K, timesteps=cfg.timesteps)
    stochastic = list(range(K - 1))
    prompts_all = load_prompts(cfg.prompts) if cfg.prompts not in ("", "builtin") else backend.prompts(cfg.prompt_split)
    logprob = {"auto": "gaussian" if cfg.advantage == "raw" else "cps", "exact": "gaussian",
               "surrogate": "cps"}[cfg.logprob]
    reduce = "sum" if cfg.advantage == "raw" else "mean"   # raw: the exact log-density of the whole sample
    tilt = None
    is_toy = getattr(backend, "mixture", None) is not None and hasattr(reward.rewards[0], "tilt_spec")
    if is_toy:
        tilt = backend.target(0).tilt(reward.rewards[0], cfg.beta)  # (p_tilt mixture, log Z), closed form
    if cfg.eval_only:
        out = eval_only(cfg, backend, models, reward, tilt)
        dist.cleanup()     # leave torchrun's process group, as a training run does at its end
        return out
    # the script's random streams, one per rank (rank 0's are a single process's): prompts, and every noise
    rng = random.Random(cfg.seed + 7919 * rank)
    gcpu = torch.Generator().manual_seed(cfg.seed + 1 + 7919 * rank)

    def randn(shape):
        return torch.randn(shape, generator=gcpu).to(dev)

    def amp():
        """--precision's autocast, around the network forwards (velocity() returns float32 either way); the
        backward passes run outside it, as torch's AMP recipe has them."""
        return autocast(cfg.precision, dev)

    def batch_cond(n):
        return backend.encode([rng.choice(prompts_all) for _ in range(n)])

    def fake_loss(x_s, s, cond, gamma, t_range=None):
        """Ambient DSM on detached generator samples x_s at levels s (B,), plus gamma x consistency.
        t_range (raw toy mode): t ~ U[t_range] with weight 1, where the KL direction reads the fake score."""
        if t_range is None:
            t = sample_renoise_level(s, gcpu).to(dev)
        else:
            t = t_range[0] + (t_range[1] - t_range[0]) * torch.rand(s.shape, generator=gcpu).to(dev)
        e2 = randn(x_s.shape)
        x_t, u = ambient_forward(x_s, s, t, e2), ambient_target(x_s, s, t, e2)
        w = ambient_weight(s, t) if t_range is None else 1.0
        fn = backend.tiled_velocity_fn(fake, cond, 1.0)
        v = fn(x_t, t)
        l_amb = ambient_fake_loss(v, u, w)
        l_cons = torch.zeros((), device=dev)
        if gamma > 0:   # its two hop samples in one fake-score call on the condition tiled twice
            t2 = sample_consistency_level(t, gcpu, cfg.cons_offset).to(dev)
            l_cons = consistency_loss(fn, x_t, t, v, t2, cfg.kernel, cfg.eta, gcpu, batched=True)
        return l_amb, l_cons

    def fake_step(x_s, s, cond, gamma, t_range=None):
        opt_fake.zero_grad(set_to_none=True)
        with fake_ctx():   # the backward too: gradient checkpointing recomputes under the adapter active then
            with amp():
                l_amb, l_cons = fake_loss(x_s.detach(), s, cond, gamma, t_range)
            (l_amb + gamma * l_cons).backward()
        dist.average_gradients(fake_params)
        clip_grad(fake_params, cfg.max_grad_norm)
        opt_fake.step()
        return l_amb.detach(), l_cons.detach()

    def random_stop_sample(cond, grad):
        """k ~ U{1..K} generator steps (one k per batch); returns (x_s, s (B,), k). plain DMD matches x0_hat at 0."""
        k = rng.randint(1, K)
        with amp():
            tr = rollout(backend.velocity_fn(gen, cond, 1.0), randn((cond.batch_size, *backend.latent_shape)),
                         sigmas, "cps", cfg.eta, grad="last" if grad else "none", stop=k - 1, generator=gcpu)
        if cfg.dmd == "plain":
            return tr.x0[:, -1], torch.zeros(cond.batch_size, device=dev), k
        return tr.final, sigmas[k].expand(cond.batch_size).to(dev), k

    summary = {}
    run_stage1, run_stage2 = cfg.stage in ("1", "all"), cfg.stage in ("2", "all")
    if cfg.init:
        from common.runs import load_checkpoint
        st = load_checkpoint(cfg.init, map_location=dev, method="rtdmd", needs=("gen_ema", "fake"))["state"]
        load_trained(models.gen_named, st["gen_ema"], f"--init {cfg.init}")
        load_trained(models.fake_named, st["fake"], f"--init {cfg.init}")
    if is_toy:
        summary["kl_estimator"] = ("kl_hist_*: toy.metrics.kl_histogram of the CPS(eta) generator (binned, +-se); "
                                   "kl_euler_*: exact change of variables of the same net sampled with eta = 0")
        ev = toy_eval(backend, gen, sigmas, reward, cfg, tilt)
        summary.update({f"{k}_init": v for k, v in ev.items()})
        summary["kl_init_teacher"], summary["kl_init_tilted"] = ev["kl_hist_teacher"], ev["kl_hist_tilted"]
        summary["reward_teacher"] = backend.target(0).expected_reward(reward.rewards[0])
        summary["reward_tilted"], summary["log_z"] = tilt[0].expected_reward(reward.rewards[0]), tilt[1]
    # checkpoints hold the trained tensors only (with LoRA: the adapters, not the frozen base) and the script's
    # own random streams (run.resume restores the global ones): a resumed run continues exactly. eval_stage1: the
    # toy's stage-1 evaluation, which a run resumed inside stage 2 cannot redo (its generator has moved on)
    ev1 = None
    snapshot = lambda: {"gen": detached(models.gen_named), "fake": detached(models.fake_named),
                        "ema": ema.state_dict(), "gen_ema": ema_tensors(models.gen_named, ema),
                        "opt_gen": opt_gen.state_dict(), "opt_fake": opt_fake.state_dict(),
                        "streams": dist.gather_objects({"prompts": rng.getstate(), "noise": gcpu.get_state()}),
                        "eval_stage1": ev1}
    state = run.resume(needs=("gen", "fake"))
    resumed_at = run.step
    if state:
        load_trained(models.gen_named, state["gen"], "--resume")
        load_trained(models.fake_named, state["fake"], "--resume")
        ema.load_state_dict(state["ema"])
        opt_gen.load_state_dict(state["opt_gen"]), opt_fake.load_state_dict(state["opt_fake"])
        if "streams" in state:   # one per rank (older checkpoints: one dict; none: they restart from the seed)
            own = dist.this_ranks(state["streams"] if isinstance(state["streams"], list) else [state["streams"]])
            rng.setstate(as_tuples(own["prompts"])), gcpu.set_state(own["noise"])
    n1 = cfg.steps if run_stage1 else 0

    with run.interrupt_guard(snapshot):
        # ================================ STAGE 1: AC-DMD ================================
        for step in range(run.step, n1):
            # ---- rollout (no grad) + fake-score update: ambient target, weight, consistency ----
            cond = batch_cond(cfg.batch)
            with torch.no_grad():
                x_s, s, k = random_stop_sample(cond, grad=False)
            l_amb, l_cons = fake_step(x_s, s, cond, cfg.gamma)
            logs = {"stage": 1, "fake_loss": l_amb, "consistency": l_cons, "k_fake": k}
            # ---- generator turn every fake_ratio iterations: normalised DMD through shared-noise projections ----
            if (step + 1) % cfg.fake_ratio == 0:
                cond = batch_cond(cfg.batch)
                x_s, s, k = random_stop_sample(cond, grad=True)      # graph on the k-th step only
                t = sample_renoise_level(s, gcpu).to(dev)
                with torch.no_grad(), amp():
                    x_t = ambient_forward(x_s.detach(), s, t, randn(x_s.shape))
                    with teacher_ctx():
                        v_r = backend.velocity(teacher, x_t, t, cond, cfg.cfg_scale)
                    with fake_ctx():
                        v_f = backend.velocity(fake, x_t, t, cond, 1.0)
                    y_f, y_r = project_pair(x_t, v_f, v_r, t, s, cfg.eta, randn(x_s.shape))  # shared noise m
                loss, g = dmd_loss(x_s, y_f, y_r)
                opt_gen.zero_grad(set_to_none=True)
                loss.backward()
                dist.average_gradients(gen_params)
                gn = clip_grad(gen_params, cfg.max_grad_norm)
                opt_gen.step()
                logs.update(dmd_loss=loss.detach(), dmd_grad_norm=g.flatten(1).norm(dim=1).mean(), grad_norm=gn,
                            k_gen=k)
            ema.update()
            run.check_finite(loss=l_amb)
            # ---- log / eval / save ----
            if is_toy and (step + 1) % max(1, n1 // 5) == 0:
                with ema.swapped():
                    logs.update({f"eval_{k_}": v for k_, v in toy_eval(backend, gen, sigmas, reward,
                                                                        small_eval_config(cfg), tilt, False).items()})
            run.log(step + 1, **logs)
            if run.due(step + 1):
                run.save(step + 1, snapshot())
        if run_stage1 and run.step <= n1:
            ema.copy_to()            # stage 2 starts from the stage-1 EMA generator (spec 2.6)
        if is_toy and run_stage1:    # resumed inside stage 2: the checkpoint's (None from older ones: not reported)
            ev1 = state.get("eval_stage1") if resumed_at > n1 else toy_eval(backend, gen, sigmas, reward, cfg, tilt)
            if ev1:
                summary.update({f"{k}_stage1": v for k, v in ev1.items()})
                summary["kl_student_teacher"] = ev1["kl_hist_teacher"]

        # ================================ STAGE 2: RTDMD ================================
        if run_stage2:
            set_hyperparameters(opt_gen, cfg.lr2, cfg.weight_decay2)   # decay on matrices only (make_optimizer)
            ema = EMA(gen_params, decay=cfg.ema_decay)    # a fresh stage-2 EMA (the snapshot saves this one)
            if state and resumed_at > n1:                   # resumed inside stage 2: that EMA, not a fresh one
                ema.load_state_dict(state["ema"])
        gamma2 = cfg.gamma if cfg.gamma2 is None else cfg.gamma2   # spec 3.6: off in stage 2 only on some backbones
        for epoch in range(max(0, run.step - n1), cfg.epochs if run_stage2 else 0):
            # ---- rollout: SubGRPO step choice and group-shared noise at the untrained stochastic steps ----
            S = subgrpo_steps(cfg.seed, epoch, stochastic, cfg.sub_steps)
            base = [rng.choice(prompts_all) for _ in range(cfg.groups)]
            cond = backend.encode(base).repeat(cfg.group_size)
            # group-shared noise keyed by prompt and the group's index over all ranks (rank 0: 0..groups-1)
            keys = [f"{p}#{rank * cfg.groups + i // cfg.group_size}" for i, p in enumerate(cond.prompts)]
            noises = subgrpo_noises(keys, backend.latent_shape, K, S, stochastic, epoch, dev)
            B, chain = cond.batch_size, cfg.dmd_through == "all"
            vfn = backend.tiled_velocity_fn(gen, cond, 1.0)
            # the loss's own evaluations (stage2_rollout): its graph is held through the fake updates below (with
            # --dmd-through all, K steps of activations next to the fake update's)
            with amp():
                tr = stage2_rollout(vfn, randn((B, *backend.latent_shape)), sigmas, noises, S, cfg.eta, chain, gcpu,
                                    logprob, reduce)
            final = tr.final.detach()
            # ---- reward ----
            with torch.no_grad():
                r = reward(backend.decode(final), cond.prompts)          # (B, M)
            # ---- fake-score update(s) on the epoch's final samples (s = 0) ----
            for _ in range(cfg.fake_updates2):   # raw mode: fit the fake where the KL direction reads it
                l_amb, l_cons = fake_step(final, torch.zeros(B, device=dev), cond, gamma2,
                                          (0.02, cfg.raw_t_max) if cfg.advantage == "raw" else None)
            # ---- advantages ----
            r_all = dist.all_gather_cat(r)    # (world B, M): every rank's groups (also the logged reward means)
            if cfg.advantage == "raw":        # group-local (leave-one-out): this rank's groups suffice
                A = raw_advantages(reward.combine(r), cfg.group_size, cfg.beta)
            else:   # the global std and re-standardisation over all ranks' samples (spec 3.3), then this rank's rows
                A = dist.local_rows(per_reward_advantages(r_all, cfg.group_size, reward.weights.to(r.device),
                                                          cfg.adv_clip), B)
            # ---- loss: policy gradient on S, DMD + back-prop on the deterministic last step ----
            with amp():
                lps, x0_last, x0 = stage2_terms(vfn, tr, sigmas, S, cfg.eta, chain, logprob, reduce)
            pg, clipfrac = torch.zeros((), device=dev), []
            for j, lp in zip(S, lps):
                if cfg.advantage == "raw":   # plain score function; x (#stochastic/|S|) keeps E_S unbiased
                    pg = pg - (A * lp).mean() * len(stochastic) / len(S)
                else:
                    # old log-prob: the rollout's (same weights); without the chain lp is that record (ratio 1)
                    l_pg, ratio = clipped_surrogate(lp, tr.logprobs[:, j].detach(), A, cfg.clip_range)
                    pg = pg + l_pg.mean()
                    clipfrac.append(clip_fraction(ratio, cfg.clip_range))
            lo_t, hi_t = (0.02, cfg.raw_t_max) if cfg.advantage == "raw" else (0.02, 0.98)
            t = lo_t + (hi_t - lo_t) * torch.rand(B, generator=gcpu).to(dev)
            with torch.no_grad(), amp():
                x_t = ambient_forward(x0.detach(), 0.0, t, randn(x0.shape))
                with teacher_ctx():
                    v_r = backend.velocity(teacher, x_t, t, cond, cfg.cfg_scale)
                with fake_ctx():
                    v_f = backend.velocity(fake, x_t, t, cond, 1.0)
            if cfg.advantage == "raw":        # unnormalised: grad = (1 - t)(s_fake - s_real), calibrated vs beta
                l_dm = linear_surrogate(x0, kl_direction(v_f, v_r, t))
                l_bp = -cfg.beta * reward.combine(reward(backend.decode(x0_last), cond.prompts)).mean() if cfg.bp \
                    else 0.0
                loss = l_dm + pg + l_bp
            else:
                y_f, y_r = project_pair(x_t, v_f, v_r, t, torch.zeros(B, device=dev), cfg.eta, randn(x0.shape))
                l_dm = dmd_loss(x0, y_f, y_r)[0].float()
                l_bp = torch.relu(cfg.bp_margin - reward.combine(reward(backend.decode(x0_last), cond.prompts))) \
                    .mean() if cfg.bp else 0.0
                loss = (pg + cfg.w_dm * l_dm + cfg.w_bp * l_bp) / (len(S) + 1)
            # ---- update ----
            opt_gen.zero_grad(set_to_none=True)
            loss.backward()
            dist.average_gradients(gen_params)
            gn = clip_grad(gen_params, cfg.max_grad_norm)
            opt_gen.step()
            ema.update()
            run.check_finite(loss=loss)
            # ---- log / eval / save ----
            logs = {"stage": 2, "loss": loss.detach(), "pg": pg.detach(), "dmd": torch.as_tensor(l_dm).detach(),
                    "fake_loss": l_amb, "consistency": l_cons, "grad_norm": gn, "subgrpo_steps": S,
                    "adv_mean": A.mean(), "adv_std": A.std(), "adv_absmax": A.abs().max()}
            logs.update({f"reward_{n}": r_all[:, i].mean() for i, n in enumerate(reward.names)})
            if clipfrac:
                logs["clipfrac"] = torch.stack(clipfrac).mean()
            if is_toy and (epoch + 1) % max(1, cfg.epochs // 5) == 0:
                with ema.swapped():   # the stage-2 EMA, as stage 1 evaluates its own: the weights gen_ema ships
                    logs.update({f"eval_{k_}": v for k_, v in toy_eval(backend, gen, sigmas, reward,
                                                                        small_eval_config(cfg), tilt, False).items()})
            run.log(n1 + epoch + 1, **logs)
            if run.due(n1 + epoch + 1):
                run.save(n1 + epoch + 1, snapshot())

    # ================================ final eval and summary ================================
    # on the EMA weights: the model gen_ema ships (--init, --eval-only, spec 4.5), not the raw stage-2 weights
    # (after stage 1 alone the generator already holds its EMA: ema.copy_to() above)
    with ema.swapped():
        if is_toy and run_stage2:
            ev = toy_eval(backend, gen, sigmas, reward, cfg, tilt, save_dir=run.out if run.main else None)
            summary.update({f"{k}_stage2": v for k, v in ev.items()})
            summary["kl_student_tilted"], summary["reward_student"] = ev["kl_hist_tilted"], ev["reward"]
            summary["kl_student2_teacher"] = ev["kl_hist_teacher"]
        elif not is_toy:   # every rank samples its share of the held-out set; the rewards are gathered
            from common.evaluate import held_out, sample_final, score_summary
            prompts, cond, noise = held_out(backend, n_per_prompt=2, seed=0)
            lat = sample_final(backend, gen, cond, noise, sigmas, "cps", cfg.eta, 1.0,
                               torch.Generator().manual_seed(0), shard=True)
            mine = [prompts[i] for i in dist.strided_rows(len(prompts))]
            scores = score_summary(reward, backend.decode(lat), mine, n_total=len(prompts))
            summary.update({f"student_{k}": v for k, v in scores.items()})
    summary["beta"] = cfg.beta if cfg.advantage == "raw" else None
    run.finish(summary, snapshot())
    dist.cleanup()
    return summary


if __name__ == "__main__":
    with user_errors():
        main(parse_config(Config, presets=PRESETS, checks=[checks]))
