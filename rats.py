"""RATS: Reward-Aware Trajectory Shaping for few-step flow generators, on every backend.

Paper: R. Li, B. Li, Y. Liang, H. Huang, C. Zhang, X. Li, "Reward-Aware Trajectory Shaping for Few-step Visual
Generation", arXiv 2604.14910 (2026). Spec: shared/spec/rats.md; defaults and ablation flags: shared/spec/decisions.md.

What this script implements (one code path for every backend, through common.backend.Backend):
  * student = the base network, trained, sampled with K = --nfe deterministic Euler steps;
  * teacher = EMA of the student (decay --ema-decay 0.995 after every optimizer step, starting from the base
    weights; 1.0 = frozen), sampled with N = --teacher-nfe 50 Euler steps under no_grad, used in training only
    (N >= K: every student noise level needs a teacher level near it, so N < K is refused);
  * the same prompts and the same initial noise for both rollouts;
  * sigma-aligned horizon matching j(k) = argmin_j |sigma_T[j] - sigma_S[k]| on the shifted grids; the shaping
    distance (1 - cos) + MSE between x0-predictions (or states, --match states), averaged over the K horizons;
  * the reward-aware gate w = sg(sigmoid((R_T - R_S) / tau)) per sample on the shaping loss (--gate
    sigmoid|none|off|hard, --gap-norm running_std, --loss-mode complementary weights the reward by 1 - w);
  * direct reward back-propagation -R(decode(student output)) through the whole K-step rollout
    (--reward-grad-steps k truncates it to the last k steps, DRaFT-K style);
  * inference: the student alone, K network evaluations.
The maths lives in common/shaping.py (tested against closed forms in tests/test_rats_shaping.py).

Simplifications against the paper (whose code is unreleased; see rats.md section 0 for what is reconstructed):
  * one optimizer micro-batch per step by default (the paper: batch 1 x grad-accum 8 per rank; --grad-accum);
  * --reward-grad-steps k runs the first K - k student steps without a graph (common.flow.rollout grad=k), so
    the shaping term at those early horizons is logged but gives no gradient either: the memory-saving mode;
  * --detach-inputs (local shaping) feeds every student network call a detached input: each horizon's shaping
    gradient reaches only its own network evaluation, and the reward gradient reaches every step only through
    the Euler update's identity path (no input-Jacobians of later network calls): cheaper and biased;
  * evaluation: the mean reward on held-out prompts and fixed noise (rats.md's HPS/PickScore/ImageReward tables
    need the real reward models: --reward hps etc. on a GPU).

Launch:
    python rats.py                                                     # toy world, CPU, about a minute
    python rats.py --teacher dit --nfe 3 --steps 200                  # small DiT (toy/weights/dit-tiny), CPU
    python rats.py --teacher flux --nfe 4                              # FLUX.1-dev (preset: LoRA, bf16, checkpointing)
    torchrun --standalone --nproc_per_node 8 rats.py --teacher wan --nfe 5 --reward frames:hps --steps 400
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from typing import Literal

import torch

from common.backend import calls_as, get_backend
from common.config import ConfigError, RunConfig, opt, parse_config, user_errors
from common import dist
from common.evaluate import held_out, held_out_rewards, sample_final, save_samples
from common.flow import rollout
from common.prompts import load_prompts
from common.rewards import RewardError, build_reward, parse_reward_opts
from common.runs import Run, load_checkpoint
from common.shaping import GapNormalizer, match_horizons, rats_loss, reward_gate, shaping_distance, shaping_loss
from common.train import (EMA, autocast, base_dtype, clip_grad, detached, load_trained, make_optimizer, seed_everything,
                          trained_tensors)


# ------------------------------------------------------------------------------------------------------------
# Configuration (defaults: the toy world on CPU; PRESETS per backend; every flag: python rats.py --help)
# ------------------------------------------------------------------------------------------------------------
@dataclass
class Config(RunConfig):
    """RATS: reward-aware trajectory shaping of a K-step student against its N-step EMA teacher."""
    teacher: str = opt("toy2d", "backend: toy2d | dit | flux | wan | sd3 | flux2")
    tiny: bool = opt(False, "tiny random model of the backend (offline smoke runs)")
    pretrained: str = opt("", "hub id or local folder of the base model ('' = the backend's default)")
    preset: str = opt("tiny", "dit only: tiny | mini | small | base")
    reward: str = opt("toy_quadratic", "reward spec, e.g. hps or dit_color:1,dit_position:1")
    reward_opts: str = opt("", "extra reward-factory options k=v,k=v (e.g. hps_ckpt=/w/HPS_v2.1.pt or "
                           "videoalign_frames=8,videoalign_source_fps=16)")
    prompts: str = opt("", "training prompt file, one per line ('' = the backend's built-in list)")
    nfe: int = opt(2, "student steps K", min=1)
    teacher_nfe: int = opt(50, "teacher steps N (at least --nfe)", min=1)
    shift: float | None = opt(None, "schedule shift for both grids (none = the backend's default)")
    guidance: float | None = opt(None, "guidance scale for student and teacher (none = backend default; refused "
                                 "where the model takes none)")
    batch_size: int = opt(256, "samples per micro-batch (per rank)", min=1)
    grad_accum: int = opt(1, "micro-batches per optimizer step", min=1)
    lr: float = opt(1e-3, "AdamW learning rate")
    weight_decay: float = opt(0.0, "AdamW weight decay", min=0)
    max_grad_norm: float = opt(1.0, "gradient-norm clip (0 = off)", min=0)
    ema_decay: float = opt(0.995, "teacher EMA decay mu (1.0 = frozen teacher)", min=0, max=1)
    teacher_copy: Literal["full", "swap"] = opt("full", "EMA teacher storage: full = a frozen copy of the network; "
                                                "swap = only the averaged trained tensors, swapped into the student "
                                                "for the teacher's no-grad calls (saves a model copy: ~24 GB on FLUX)")
    alpha: float = opt(1.0, "shaping weight alpha", min=0)
    lambda_r: float = opt(1.0, "reward weight lambda_r (0 = distillation only)", min=0)
    lambda_cos: float = opt(1.0, "weight of 1 - cos in the shaping distance", min=0)
    lambda_mse: float = opt(1.0, "weight of the MSE in the shaping distance", min=0)
    tau: float = opt(0.05, "gate temperature in reward units (in std units with --gap-norm running_std)")
    gate: Literal["sigmoid", "none", "off", "hard"] = opt("sigmoid", "gate: sigmoid | none (w=1) | off (w=0) | hard")
    gap_norm: Literal["none", "running_std"] = opt("none", "divide the reward gap by its running std")
    loss_mode: Literal["shape_only", "complementary"] = opt("shape_only", "complementary: reward weighted 1 - w")
    match: Literal["x0", "states"] = opt("x0", "compare x0-predictions or states at matched horizons")
    detach_inputs: bool = opt(False, "local shaping: detach the student's network inputs")
    reward_grad_steps: int = opt(0, "reward gradient through the last k student steps (0 = all)", min=0)
    skip_first_horizon: bool = opt(False, "drop horizon k = 0 (sigma = 1) from the shaping loss")
    lora_rank: int = opt(32, "LoRA rank for the diffusers backends", min=0)
    full_finetune: bool = opt(False, "diffusers backends: train all weights instead of LoRA")
    gradient_checkpointing: bool = opt(False, "gradient checkpointing on the transformer blocks")
    eval_size: int = opt(1024, "held-out samples for the evaluation", min=1)
    eval_batch: int = opt(256, "evaluation chunk size", min=1)
    eval_seed: int = opt(1234, "seed of the held-out noise")
    eval_every: int = opt(0, "evaluate the student every N steps (0 = only at the start and the end)", min=0)
    eval_nfe: list[int] = opt([], "extra student budgets evaluated at the end (e.g. 3,5,8,50)")
    eval_only: bool = opt(False, "evaluate --ckpt (its backend and preset, model, --nfe; this command's reward and "
                                        "eval flags)")
    ckpt: str = opt("", "checkpoint for --eval-only", path=True)


PRESETS = {
    "toy2d": {"steps": 200, "nfe": 2, "batch_size": 256, "lr": 1e-3, "tau": 0.5, "reward": "toy_quadratic"},
    "dit": {"steps": 60, "nfe": 3, "batch_size": 16, "lr": 1e-4, "tau": 0.05, "eval_size": 64, "eval_batch": 64,
            "reward": "dit_color:1,dit_shape:1"},
    "flux": {"nfe": 3, "batch_size": 1, "grad_accum": 8, "lr": 1e-4, "reward": "hps", "steps": 400,
             "precision": "bf16", "eval_size": 64, "eval_batch": 4},
    "wan": {"nfe": 5, "batch_size": 1, "grad_accum": 8, "lr": 1e-4, "reward": "frames:hps", "steps": 400,
            "precision": "bf16", "eval_size": 32, "eval_batch": 1},
    "sd3": {"nfe": 4, "batch_size": 1, "grad_accum": 8, "lr": 1e-4, "reward": "hps", "steps": 400,
            "precision": "bf16", "eval_size": 64, "eval_batch": 4},
    "flux2": {"nfe": 4, "batch_size": 1, "grad_accum": 8, "lr": 1e-4, "reward": "hps", "steps": 400,
              "precision": "bf16", "eval_size": 64, "eval_batch": 4},
}
for _family in ("flux", "wan", "sd3", "flux2"):   # LoRA backends: no second transformer for the EMA teacher;
    PRESETS[_family]["teacher_copy"] = "swap"      # the reward gradient crosses K student steps and the decoder:
    PRESETS[_family]["gradient_checkpointing"] = True   # checkpoint both (rats.md 1.9 and A13)


REWARD_OPTS_RESERVED = ("tiny", "device")   # build_reward options the script passes from its own flags


def checks(cfg: Config) -> str | None:
    try:
        parse_reward_opts(cfg.reward_opts, REWARD_OPTS_RESERVED, cfg.reward)
    except RewardError as e:
        return str(e)
    if cfg.tau <= 0:
        return f"--tau must be > 0, got {cfg.tau}"
    if cfg.reward_grad_steps > cfg.nfe:
        return f"--reward-grad-steps {cfg.reward_grad_steps} exceeds --nfe {cfg.nfe}"
    if cfg.teacher_nfe < cfg.nfe and not cfg.eval_only:   # (--eval-only: both come from the checkpoint)
        return (f"--teacher-nfe {cfg.teacher_nfe} is below --nfe {cfg.nfe}: every student noise level is matched to "
                f"the teacher's nearest one (rats.md 1.4), so the teacher's grid must be at least as fine (N >= K)")
    if cfg.eval_only and not cfg.ckpt:
        return "--eval-only needs --ckpt DIR (a run directory or a checkpoint file)"
    if cfg.skip_first_horizon and cfg.nfe == 1:
        return "--skip-first-horizon leaves no horizon with --nfe 1"
    if cfg.skip_first_horizon and cfg.match == "states":   # horizons are the states after each step: none at sigma 1
        return "--skip-first-horizon drops the sigma = 1 horizon of --match x0; --match states has none"
    return None


# ------------------------------------------------------------------------------------------------------------
# Evaluation (the student alone at inference: exactly K network evaluations; common/evaluate.py's shared path)
# ------------------------------------------------------------------------------------------------------------
def eval_set(backend, cfg: Config):
    """(prompts, cond, noise): held-out prompts and fixed noise from a private generator, the same for every
    model evaluated (the training RNG stream is untouched, so resume stays exact)."""
    n_prompts = len(backend.prompts("eval"))
    return held_out(backend, n_per_prompt=max(1, cfg.eval_size // n_prompts), seed=cfg.eval_seed)


def evaluate(backend, net, reward, ev, sigmas, cfg: Config) -> tuple[dict, torch.Tensor]:
    """Mean combined reward and per-objective means of net sampled deterministically on `sigmas` ((K+1,): K
    network evaluations per sample) over the whole eval set; also returns the final latents of this rank's rows.
    Under torchrun every rank samples its share (dist.strided_rows) and the rewards are gathered: all ranks
    evaluate together, none waits in a collective while another samples (a Wan evaluation outlasts NCCL's timeout)."""
    _, cond, noise = ev
    r, lat = held_out_rewards(backend, net, reward, cond, noise, sigmas, cfg.guidance, cfg.eval_batch)   # (n, M)
    scores = {n: float(r[:, m].mean()) for m, n in enumerate(reward.names)}
    means = torch.tensor([scores[n] for n in reward.names])
    # combine() is linear, so the combination of the means is the mean of the combined rewards
    return {"reward": float(reward.combine(means[None])[0]), **{f"reward_{n}": scores[n] for n in reward.names}}, lat


def point_metrics(backend, net, base, sig_S, sig_T, ev, lat, cfg: Config, teacher_lat=None) -> dict:
    """2-D worlds only (decode = the points): KL(student K steps || base teacher N steps), both deterministic,
    densities by change of variables (toy.metrics.kl_sampler), the MMD to the teacher's samples and the spread.
    lat: this rank's rows of the student's samples; teacher_lat: the base teacher's N-step samples of the whole eval
    set when already computed (not sampled again)."""
    from toy.metrics import kl_sampler, mmd
    _, cond, noise = ev
    lat = dist.gather_strided(lat, noise.shape[0])      # this rank's rows -> the whole set (2-D points: small)
    n = min(cfg.eval_size, 512)  # the teacher's density needs N Newton inversions per point: keep it small
    cond = cond.select(slice(0, n))
    kl = kl_sampler(backend.velocity_fn(net, cond), sig_S, backend.velocity_fn(base, cond), n,
                    teacher_sigmas=sig_T, z=noise[:n])
    teacher_x = teacher_lat[:n] if teacher_lat is not None else sample_final(backend, base, cond, noise[:n], sig_T)
    return {"kl_student_teacher": kl["kl"], "kl_stderr": kl["stderr"], "kl_converged": kl["converged"],
            "mmd_student_teacher": mmd(lat[:n].float(), teacher_x.float()),
            "spread": float(lat.float().std(0).mean())}


# ------------------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------------------
def make_teacher(backend, net, decay: float, copy: str = "full"):
    """The EMA teacher: a frozen copy of the student (no gradients, not in any optimizer) whose copies of the
    trained tensors (all weights, or the LoRA ones) are the EMA shadow: theta_T <- mu theta_T + (1 - mu) theta_S.
    copy = "swap": no second network; the EMA keeps its own copies of the trained tensors only, and as_teacher()
    swaps them into the student for the teacher's calls. Returns (teacher, ema, the student's trainable parameters)."""
    params = backend.trainable_parameters(net)
    if copy == "swap":
        return net, EMA(params, decay=decay), params
    teacher = backend.frozen_copy(net)
    name_of = {id(p): n for n, p in net.named_parameters()}
    t_params = dict(teacher.named_parameters())
    names = [name_of[id(p)] for p in params]
    return teacher, EMA(params, decay=decay, shadow=[t_params[n] for n in names]), params


@contextlib.contextmanager
def teacher_weights(net, ema: EMA, swap: bool):
    """The block runs the EMA teacher. With a separate teacher copy nothing changes; with --teacher-copy swap the
    EMA averages are copied into the student's trained tensors (no_grad: no student graph may be alive) and the
    trained values come back afterwards; network calls inside count as the teacher's."""
    if not swap:
        yield
        return
    with torch.no_grad(), ema.swapped(), calls_as(net, "teacher"):
        yield


def build_backend(cfg: Config, device):
    opts = dict(device=device, tiny=cfg.tiny, seed=0, lora_rank=cfg.lora_rank, full_finetune=cfg.full_finetune,
                gradient_checkpointing=cfg.gradient_checkpointing)
    if cfg.pretrained:
        opts["pretrained"] = cfg.pretrained
    if cfg.teacher == "dit":
        opts["preset"] = cfg.preset
    if cfg.guidance is not None:
        opts["guidance"] = cfg.guidance
    if cfg.shift is not None:
        opts["shift"] = cfg.shift
    if device.type == "cuda":   # bf16 weights for a frozen LoRA base only (base_dtype: trained ones stay float32)
        opts.update(base_dtype(cfg.precision, cfg.teacher, cfg.full_finetune))
    return get_backend(cfg.teacher, **opts)


def main(cfg: Config) -> dict:
    torch.set_num_threads(max(1, min(torch.get_num_threads(), int(os.environ.get("RATS_THREADS", "1")))))
    rank, world, device = dist.init_distributed(cfg.device)
    seed_everything(cfg.seed + rank)
    ckpt = load_checkpoint(cfg.ckpt, method="rats", needs=("net",)) if cfg.eval_only else None
    if ckpt is not None:  # the model and the trained budget come from the run; reward and eval flags from here
        for k in ("teacher", "tiny", "pretrained", "preset", "lora_rank", "full_finetune", "shift", "guidance",
                  "nfe", "teacher_nfe"):
            setattr(cfg, k, ckpt["config"].get(k, getattr(cfg, k)))
    backend = build_backend(cfg, device)
    if cfg.guidance not in (None, 1) and not backend.guidance_applies(backend.network):   # never dropped silently
        which = "--tiny" if cfg.tiny else (cfg.pretrained or getattr(backend, "pretrained", None))
        raise ConfigError(f"--guidance {cfg.guidance:g} would be ignored: the {backend.name} model"
                          f"{f' ({which})' if which else ''} takes no guidance (step-distilled, no guidance "
                          f"embedding, or a one-class toy): leave --guidance out, or pass a base checkpoint with "
                          f"--pretrained")
    reward = build_reward(cfg.reward, tiny=cfg.tiny, device=device,
                          **parse_reward_opts(cfg.reward_opts, REWARD_OPTS_RESERVED, cfg.reward)).to(device)
    if not reward.differentiable:
        raise ConfigError(f"--reward {cfg.reward}: RATS back-propagates the reward, this one is not differentiable")
    net = backend.network                                       # the student: the base weights, trained
    net.train()
    teacher, ema, params = make_teacher(backend, net, cfg.ema_decay, cfg.teacher_copy)
    teacher.nfe_role = "teacher"      # Backend counts network calls per role; with --teacher-copy swap the teacher
    net.nfe_role = "student"          # is the student module itself, and teacher_weights() relabels its calls
    as_teacher = lambda: teacher_weights(net, ema, cfg.teacher_copy == "swap")
    # The untouched base for the 2-D density metrics (elsewhere the teacher is scored before the first update).
    base = backend.frozen_copy(net) if backend.media == "points" else None
    opt_ = make_optimizer(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    normalizer = GapNormalizer()
    sig_S = backend.sigmas(cfg.nfe, cfg.shift)                  # (K+1,) shifted, from 1 to 0
    sig_T = backend.sigmas(cfg.teacher_nfe, cfg.shift)          # (N+1,)
    j = match_horizons(sig_T, sig_S).to(device)                 # (K+1,) teacher index of every student level
    if cfg.match == "x0":   # x0-predictions exist at levels 0..K-1 (teacher: 0..N-1)
        index = j[:cfg.nfe].clamp(max=cfg.teacher_nfe - 1)
    else:                   # states after each step: student levels 1..K against teacher levels 0..N
        index = j[1:]
    horizons = torch.arange(1 if cfg.skip_first_horizon else 0, cfg.nfe, device=device)
    train_prompts = load_prompts(cfg.prompts) if cfg.prompts not in ("", "builtin") else backend.prompts("train")
    ev = eval_set(backend, cfg)
    n_ev = ev[2].shape[0]      # eval samples; under torchrun each rank holds the latents of its share

    run = None if cfg.eval_only else Run(cfg, "rats", device=device,
                                         show=["r_student", "r_teacher", "gate_mean", "shape_loss"])
    if cfg.eval_only:
        net.eval()
        with as_teacher():
            ev_T, lat_T = evaluate(backend, teacher, reward, ev, sig_T, cfg)   # before loading: the base teacher
        lat_T0 = dist.gather_strided(lat_T, n_ev)
        load_trained(trained_tensors(net), ckpt["state"]["net"], f"--ckpt {cfg.ckpt}")
        out = {"reward_teacher": ev_T["reward"], **final_eval(backend, net, teacher, base, reward, ev, sig_S, sig_T,
                                                               cfg, lat_T0, as_teacher=as_teacher)}
        out.pop("reward_teacher_ema")  # a fresh teacher copy here: it is the base teacher
        if dist.is_main():             # every rank has the numbers (each evaluated its share); rank 0 prints them
            print(json.dumps(out, indent=2))
        dist.cleanup()
        return out
    summary = {"matching_index": j.tolist(), "sigmas_student": sig_S.tolist()}
    lat_T0 = None  # the base teacher's N-step samples of the whole eval set (the reference of dist_to_teacher)
    state = run.resume(needs=("net", "ema"))
    if state:
        load_trained(trained_tensors(net), state["net"], "--resume")
        opt_.load_state_dict(state["opt"])
        ema.load_state_dict(state["ema"])
        normalizer.load_state_dict(state["gap_norm"])
        summary.update(state["summary"])
        if state.get("lat_T0") is not None:   # the base teacher cannot be sampled again after training
            lat_T0 = state["lat_T0"].to(device)
        else:                                 # (older checkpoints) no reference: no stale value either
            summary.pop("dist_to_teacher", None)
    else:  # before any update: the base teacher at N steps and the untrained student at K steps (every rank)
        net.eval()
        with as_teacher():
            ev_T, lat_T = evaluate(backend, teacher, reward, ev, sig_T, cfg)
        lat_T0 = dist.gather_strided(lat_T, n_ev)   # this rank's rows -> the whole set, on every rank
        summary["reward_teacher"] = ev_T["reward"]
        ev0, lat0 = evaluate(backend, net, reward, ev, sig_S, cfg)
        summary["reward_student_init"] = ev0["reward"]
        summary["dist_to_teacher_init"] = distance_to(lat0, lat_T0)
        if backend.media == "points":
            summary.update({f"{k}_init": v for k, v in
                            point_metrics(backend, net, base, sig_S, sig_T, ev, lat0, cfg, lat_T0).items()})
        net.train()

    def snapshot():
        return {"net": detached(trained_tensors(net)),   # the trained tensors only (LoRA: not the frozen base)
                "opt": opt_.state_dict(), "ema": ema.state_dict(), "gap_norm": normalizer.state_dict(),
                "summary": summary, "lat_T0": lat_T0}

    grad_mode = cfg.reward_grad_steps if cfg.reward_grad_steps > 0 else "all"
    B, A = cfg.batch_size, cfg.grad_accum
    with run.interrupt_guard(snapshot):
        for step in range(run.step, cfg.steps):
            opt_.zero_grad(set_to_none=True)
            logs = []
            for _ in range(A):
                # ---- rollout: same prompts, same noise; teacher N steps (no grad), student K steps (graph) ----
                prompts = [train_prompts[i] for i in torch.randint(len(train_prompts), (B,)).tolist()]
                cond = backend.encode(prompts)
                eps = backend.noise(B)
                with torch.no_grad(), as_teacher(), autocast(cfg.precision, device):
                    traj_T = rollout(backend.velocity_fn(teacher, cond, cfg.guidance), eps, sig_T)
                vf = backend.velocity_fn(net, cond, cfg.guidance)
                if cfg.detach_inputs:
                    vf = detached_inputs(vf)
                with autocast(cfg.precision, device):
                    traj_S = rollout(vf, eps, sig_S, grad=grad_mode)
                # ---- reward: R_T without gradient, R_S differentiable through decode and the rollout ----
                with torch.no_grad(), autocast(cfg.precision, device):
                    r_T = reward.combine(reward(backend.decode(traj_T.final), prompts).float())
                with autocast(cfg.precision, device):
                    r_S_cols = reward(backend.decode(traj_S.final), prompts).float()
                r_S = reward.combine(r_S_cols)
                # ---- credit: the per-sample gate on the shaping loss (stop-gradient) ----
                gap = r_T - r_S.detach()                                           # (B,) teacher minus student
                scale = normalizer.update(dist.all_gather_cat(gap)) if cfg.gap_norm == "running_std" else 1.0
                w = reward_gate(r_T, r_S, tau=cfg.tau, kind=cfg.gate, scale=scale)  # (B,) detached
                # ---- loss: matched-horizon shaping + reward ----
                if cfg.match == "x0":
                    seq_S, seq_T = traj_S.x0, traj_T.x0                            # (B, K, ...), (B, N, ...)
                else:
                    seq_S, seq_T = traj_S.states[:, 1:], traj_T.states             # (B, K, ...), (B, N+1, ...)
                if cfg.detach_inputs:
                    # x0_k = x_k - s_k v_k and x_{k+1} = x_k + (s_{k+1} - s_k) v_k: remove the x_k path too
                    # (same value, no gradient), so horizon k sees only its own network evaluation
                    before = traj_S.states[:, :-1]                                 # (B, K, ...) step inputs
                    seq_S = seq_S - before + before.detach()
                l_shape, per_h = shaping_loss(seq_S, seq_T, index, horizons, lambda_cos=cfg.lambda_cos,
                                              lambda_mse=cfg.lambda_mse)
                loss, r_term, s_term = rats_loss(r_S, l_shape, w, cfg.lambda_r, cfg.alpha, cfg.loss_mode)
                run.check_finite(loss=loss)
                (loss / A).backward()
                logs.append(dict(r_student=r_S.detach().mean(), r_teacher=r_T.mean(), gap=gap.mean(),
                                 gate_mean=w.mean(), gate_std=w.std(correction=0), shape_loss=l_shape.detach().mean(),
                                 shape_h=per_h.detach().mean(0), reward_loss=r_term.detach().mean(),
                                 shape_term=s_term.detach().mean(), loss=loss.detach(),
                                 **{f"r_student_{n}": r_S_cols[:, m].detach().mean()
                                    for m, n in enumerate(reward.names) if len(reward.names) > 1}))
            # ---- update: average over ranks, clip, step, then the EMA teacher (never in the optimizer) ----
            dist.average_gradients(params)   # data parallel: one all-reduce (mean) per optimizer step
            gn = clip_grad(params, cfg.max_grad_norm)
            opt_.step()
            ema.update()
            # ---- log ----
            row = {k: torch.stack([torch.as_tensor(d[k], dtype=torch.float32) for d in logs]).mean(0) for k in logs[0]}
            if cfg.gap_norm == "running_std":
                row["gap_scale"] = scale
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0:   # every rank: each samples its share
                net.eval()
                row["eval_reward_student"] = evaluate(backend, net, reward, ev, sig_S, cfg)[0]["reward"]
                with as_teacher():
                    row["eval_reward_teacher_ema"] = evaluate(backend, teacher, reward, ev, sig_T, cfg)[0]["reward"]
                net.train()
            run.log(step + 1, grad_norm=gn, **row)
            # ---- eval and save ----
            if run.due(step + 1):
                run.save(step + 1, snapshot())
    net.eval()   # every rank evaluates its share of the set; rank 0 writes
    summary.update(final_eval(backend, net, teacher, base, reward, ev, sig_S, sig_T, cfg, lat_T0, run.out, as_teacher))
    run.finish(summary, state=snapshot())
    dist.cleanup()
    return summary


def final_eval(backend, net, teacher, base, reward, ev, sig_S, sig_T, cfg: Config, lat_T0=None,
               save_dir: str | None = None, as_teacher=contextlib.nullcontext) -> dict:
    """reward_student (K steps, after training), reward_teacher_ema (the EMA teacher, N steps), the extra
    budgets --eval-nfe, dist_to_teacher (the shaping distance (1 - cos) + MSE between the student's K-step and
    the base teacher's N-step outputs from the same noise: drift and collapse show here on every backend), and
    on 2-D points the KL / MMD against the base teacher."""
    ev_S, lat = evaluate(backend, net, reward, ev, sig_S, cfg)                 # lat: this rank's rows
    if save_dir and backend.media == "points":   # the demo draws them over the data density (rank 0 writes)
        save_samples(save_dir, lat, backend.target(0) if hasattr(backend, "target") else None, n_total=ev[2].shape[0])
    out = {"reward_student": ev_S["reward"], **{f"{k}_student": v for k, v in ev_S.items() if k != "reward"}}
    if lat_T0 is not None:
        out["dist_to_teacher"] = distance_to(lat, lat_T0)
    with as_teacher():
        out["reward_teacher_ema"] = evaluate(backend, teacher, reward, ev, sig_T, cfg)[0]["reward"]
    for k in cfg.eval_nfe:
        sig_k = backend.sigmas(k, cfg.shift)
        out[f"reward_student_nfe{k}"] = evaluate(backend, net, reward, ev, sig_k, cfg)[0]["reward"]
    if backend.media == "points":
        out.update(point_metrics(backend, net, base, sig_S, sig_T, ev, lat, cfg, lat_T0))
    return out


def distance_to(lat: torch.Tensor, lat_T0: torch.Tensor) -> float:
    """Mean shaping distance (1 - cos + MSE) between this rank's rows of a model's eval samples, lat, and the same
    rows of the base teacher's (lat_T0: the whole set), over every rank's rows."""
    n = lat_T0.shape[0]
    return float(dist.gather_strided(shaping_distance(lat, lat_T0[dist.strided_rows(n)]), n).mean())


def detached_inputs(vf):
    """(x, sigma) -> v with the input detached: --detach-inputs, local instead of trajectory shaping."""
    return lambda x, sigma: vf(x.detach(), sigma)


if __name__ == "__main__":
    with user_errors():
        main(parse_config(Config, presets=PRESETS, checks=[checks]))
