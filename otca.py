"""OTCA: GRPO for flow-matching generators with objective-aware trajectory credit assignment.

Paper: "Learning to Credit the Right Steps: Objective-aware Process Optimization for Visual Generation",
R. Li, K. Hao, Y. Liang, H. Huang, C. Zhang, Y. Gu, X. Li, arXiv 2604.19234 (Apr 2026).

What this script implements (one code path for every backend; the maths lives in common/credit.py):
  * the Flow-GRPO / DanceGRPO loop: SDE rollouts in groups of G samples per prompt (contiguous, Cond.repeat) with
    the log-probability of every transition stored under no_grad; M reward objectives on the final samples;
    advantages; then, for rank j = 0..n-1 of the n trained steps in turn, each sample's own j-th trained step
    t_i(j) recomputed under the current network in one batched call per chunk (per-row states and sigmas, so a
    --train-fraction below 1 saves its share of the training calls), the PPO clipped surrogate, and backward (only
    one graph is alive at a time); one optimizer step per minibatch.
  * --reuse-rollout-graph (on in the toy2d and dit presets): with one inner epoch and one minibatch the only
    recomputation would evaluate the network at the rollout's own weights on the rollout's own inputs, so the
    rollout itself keeps the graphs of its K - 1 stochastic steps (inputs detached: log pi(z_{t+1} | z_t) with z_t
    fixed, the policy-gradient graph) and the loss uses its log-probabilities: K network calls per chunk instead
    of 2K - 1, bitwise the same losses, gradients and updates (tests/test_otca_reuse.py). The price is memory: the
    graphs of all K - 1 steps are alive after the rollout (each freed by its backward), so flux / wan / sd3 / flux2
    keep recomputation, which holds one step and chunk at a time.
    With --inner-epochs or --minibatches above 1 the option falls back to recomputation (the later passes are
    off-policy and need it anyway).
  * TCD (trajectory-level credit decomposition): per-sample step credit from the cosine progress of the stored
    trajectory, s_t = cos(z_t, z_K), w_t = max(s_{t+1} - s_t, 0) + eps_w, mean one over the trained steps.
  * MOCA (multi-objective credit allocation): per-objective group z-scores, objectives with zero variance in a
    group masked, the per-sample closed-form min-norm convex weights, mixed with a prior (rho = 0.2), fused, then
    clamped to +-5, then multiplied by the step credit: A[i, t] = omega[i, t] * A_bar[i]; one clipped surrogate.
Baselines and ablations are flags (shared/spec/decisions.md, OTCA):
  --credit uniform --objectives static        plain GRPO on the static weighted sum of per-objective z-scores
  --credit tcd     --objectives static        TCD only
  --credit uniform --objectives moca          MOCA only
  --credit tcd     --objectives moca          OTCA (the default)
  --credit tcd_batch                          ablation: the batch-mean TCD profile (no action-dependent credit)
  --objectives sum                            DanceGRPO: the weighted sum of per-objective clipped losses
  --objectives combined                       Flow-GRPO: one z-score of the weighted sum of the raw rewards
  --credit-source x0 | --credit-norm sum_one | --sde flow_grpo | --beta-kl 0.004 | --train-fraction 0.6
  --prior reward                              the --reward weights as the prior (default uniform)

What it simplifies, and why:
  * The paper's method section could not be read (shared/spec/otca.md section 0); TCD's and MOCA's constants and
    normalisations are the reconstructions of that spec (eps_w = 1e-3, rho = 0.2, uniform prior, mean-one credit).
  * The credit and the objective weights are computed once per rollout from the behaviour policy (no gradient).
  * Trains backend.trainable_parameters (LoRA on the diffusers families, or every weight with --full-finetune;
    every weight on toy2d and the DiT). Data parallel by averaging gradients over ranks once per optimizer step
    (no DDP wrapper, no FSDP here). No EMA.
  * Guidance is the backend's default everywhere (rollouts, recomputation, evaluation): CFG 2 on the DiT, FLUX.1's
    embedded guidance; there is no separate unguided training policy.
  * Evaluation: deterministic Euler sampling of the held-out prompts from fixed held-out noise, before and after.

Launch:
  python otca.py                                                      # toy world, CPU, about a minute
  python otca.py --teacher flux --reward hps:1,clip:1 --steps 200     # one GPU (use --tiny for an offline smoke run)
  torchrun --nproc-per-node 8 otca.py --teacher wan --steps 300      # VideoAlign VQ/MQ/TA (VIDEOALIGN_PATH)
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Literal

import torch

from common import dist
from common.backend import get_backend
from common.config import ConfigError, RunConfig, opt, parse_config, user_errors
from common.credit import (batch_mean_credit, fused_clipped_loss, moca_fuse, objective_advantages,
                           per_objective_clipped_loss, step_advantages, tcd_credit, uniform_credit)
from common.evaluate import held_out, held_out_rewards, markdown_table, save_samples, write_table
from common.flow import Trajectory, rollout, sde_step, transition_logprob
from common.prompts import load_prompts
from common.rewards import RewardError, build_reward, parse_reward_opts
from common.rl import clip_fraction, gaussian_kl_same_std, group_advantages
from common.runs import Run, load_checkpoint
from common.train import (autocast, base_dtype, clip_grad, detached, load_trained, make_optimizer, seed_everything,
                          trained_tensors)


# ------------------------------------------------------------------------------------------------------------
# Config: toy-friendly defaults, one preset per backend
# ------------------------------------------------------------------------------------------------------------
@dataclass
class Config(RunConfig):
    """OTCA-GRPO: group rollouts, objective-aware step credit, clipped surrogate."""

    teacher: str = opt("toy2d", "backend: toy2d | dit | flux | wan | sd3 | flux2")
    tiny: bool = opt(False, "tiny random model of the backend (offline, CPU smoke runs)")
    pretrained: str = opt("", "hub id or local directory of the base model ('' = the backend's default)")
    reward: str = opt("toy_otca", "reward spec: name[:weight],... (M objectives = the reward's columns)")
    reward_opts: str = opt("", "extra reward-factory options k=v,k=v (e.g. hps_ckpt=/w/HPS_v2.1.pt or "
                           "videoalign_frames=8,videoalign_source_fps=16)")
    prompts: str = opt("", "prompt file (.txt/.json/.jsonl/.csv; '' or builtin = the backend's train list)")
    lora_rank: int = opt(32, "LoRA rank for the diffusers backends", min=0)
    full_finetune: bool = opt(False, "diffusers backends: train all weights instead of LoRA")
    gradient_checkpointing: bool = opt(False, "gradient checkpointing on the transformer blocks")
    # --- rollouts
    nfe: int = opt(10, "sampler steps K of a rollout")
    shift: float | None = opt(None, "schedule shift (none = the backend's default)")
    sde: Literal["dance", "flow_grpo"] = opt("dance", "SDE of the rollouts: dance (constant eta) | flow_grpo (a)")
    noise_level: float | None = opt(None, "eta (dance) or a (flow_grpo); none = 0.3 | 0.7", min=0)
    group_size: int = opt(8, "G samples per prompt (a group)", min=2)
    prompts_per_step: int = opt(8, "prompts (groups) per rollout batch on each rank", min=1)
    same_noise: bool = opt(False, "share the initial noise inside a group (DanceGRPO init_same_noise)")
    micro_batch: int = opt(0, "samples per forward pass, rollout and training alike (0 = all)", min=0)
    reuse_rollout_graph: bool = opt(False, "with 1 inner epoch and 1 minibatch: the rollout keeps its step graphs and "
                                    "the loss uses its log-probs (no recomputation; all K - 1 graphs in memory)")
    # --- credit and objectives
    credit: Literal["tcd", "tcd_batch", "uniform"] = opt(
        "tcd", "step credit: tcd (OTCA, per sample) | tcd_batch (ablation: batch-mean TCD profile) | uniform (GRPO)")
    credit_source: Literal["states", "x0"] = opt("states", "TCD progress of the states z_t or of the x0-predictions")
    credit_norm: Literal["mean_one", "sum_one"] = opt("mean_one", "credit normalisation per sample")
    eps_w: float = opt(1e-3, "TCD floor added to the truncated progress", min=0)
    objectives: Literal["moca", "static", "sum", "combined"] = opt(
        "moca", "moca (min-norm + prior) | static (prior-weighted sum of z-scores, rho = 1) | sum (per-objective "
        "clipped losses, DanceGRPO) | combined (z-score of the --reward weighted sum of raw rewards, Flow-GRPO)")
    rho: float = opt(0.2, "MOCA mixing weight of the prior", min=0, max=1)
    prior: Literal["uniform", "reward"] = opt("uniform", "MOCA prior: uniform | the --reward weights")
    adv_clamp: float = opt(5.0, "clamp of the fused sample advantage", min=0)
    std_ddof: int = opt(1, "group std: 1 unbiased (DanceGRPO) | 0 population (Flow-GRPO)", min=0, max=1)
    # --- training steps and loss
    train_fraction: float = opt(1.0, "fraction of the K-1 non-final steps trained; < 1: a random subset per sample",
                                min=0, max=1)
    clip: float = opt(1e-4, "PPO clip range", min=0)
    beta_kl: float = opt(0.0, "weight of the exact same-covariance Gaussian KL to the reference (base) policy (no "
                         "dt factor: Flow-GRPO's beta 0.04 corresponds to about 0.004, anchors.md c.5)", min=0)
    inner_epochs: int = opt(1, "passes over each rollout batch", min=1)
    minibatches: int = opt(1, "optimizer steps per pass (the batch is split by groups)", min=1)
    lr: float = opt(3e-4, "AdamW learning rate")
    weight_decay: float = opt(0.0, "AdamW weight decay", min=0)
    max_grad_norm: float = opt(1.0, "gradient-norm clip (0 = none)", min=0)
    # --- evaluation and checks
    eval_samples: int = opt(1024, "held-out samples per evaluation (split over the eval prompts)", min=0)
    eval_every: int = opt(0, "evaluate every N steps (0 = only before and after)", min=0)
    debug: bool = opt(False, "assert the importance ratio is exactly 1 on the first inner step")
    eval_only: bool = opt(False, "no training: evaluate --ckpt (a run directory or checkpoint file; its backend and "
                          "preset, model, shift and seed; this command's reward and eval flags) at --eval-nfe")
    ckpt: str = opt("", "with --eval-only: the trained run to evaluate ('' = the base model)")
    eval_nfe: list[int] = opt([3, 5, 8, 50], "with --eval-only: Euler step counts to evaluate")


# reuse_rollout_graph only where the graphs of all K - 1 steps of a rollout batch fit in memory (the toy and the
# small DiT); the diffusers backends recompute one step and chunk at a time, which bounds the activations.
# The diffusers presets train a LoRA (r 32): lr 3e-4, the LoRA value of otca.md 5.1 and Flow-GRPO (1.10); DanceGRPO's
# 1e-5 is for full fine-tuning, so pass --lr 1e-5 with --full-finetune.
PRESETS = {
    "toy2d": {"steps": 200, "nfe": 10, "group_size": 8, "prompts_per_step": 8, "lr": 3e-4, "clip": 1e-3,
              "eval_samples": 2048, "reuse_rollout_graph": True},
    "dit": {"steps": 40, "nfe": 8, "group_size": 6, "prompts_per_step": 4, "lr": 1e-4, "reward": "dit_color,dit_size",
            "eval_samples": 64, "clip": 1e-3, "reuse_rollout_graph": True},
    "flux": {"nfe": 16, "shift": 3.0, "group_size": 12, "prompts_per_step": 1, "lr": 3e-4, "precision": "bf16",
             "reward": "hps,clip", "train_fraction": 0.6, "eval_samples": 64, "micro_batch": 4},
    # clip: the default 1e-4 (decisions.md; DanceGRPO's Wan, otca.md 1.10), not Flow-GRPO's Wan 1e-3 (anchors.md c.5)
    # reward: VideoAlign's three heads VQ, MQ, TA as three MOCA objectives (otca.md A14, the paper's video rewards)
    "wan": {"nfe": 12, "shift": 3.0, "group_size": 12, "prompts_per_step": 1, "lr": 3e-4, "precision": "bf16",
            "reward": "videoalign", "train_fraction": 0.6, "eval_samples": 16,
            "micro_batch": 2},
    # beta_kl 0.004, anchors.md c.5's value with the step size kept: the KL here is the exact Gaussian KL (no dt),
    # while Flow-GRPO's 0.04 weights Delta_t times it (0.04 Delta_t = 0.0014..0.0071 over this grid's 9 trained steps)
    "sd3": {"nfe": 10, "sde": "flow_grpo", "group_size": 24, "prompts_per_step": 1, "lr": 3e-4, "beta_kl": 0.004,
            "precision": "bf16", "reward": "pickscore,clip", "eval_samples": 64, "micro_batch": 8},
    "flux2": {"nfe": 16, "group_size": 12, "prompts_per_step": 1, "lr": 3e-4, "precision": "bf16",
              "reward": "hps,clip", "train_fraction": 0.6, "eval_samples": 64, "micro_batch": 4},
}
for _family in ("flux", "wan", "sd3", "flux2"):   # big models (decisions.md): a micro-batch's step graph through a
    PRESETS[_family]["gradient_checkpointing"] = True   # 12B transformer holds tens of GB of activations otherwise


REWARD_OPTS_RESERVED = ("tiny", "device", "dataset")   # build_reward options the script passes from its own flags


def checks(cfg: Config) -> str | None:
    try:
        parse_reward_opts(cfg.reward_opts, REWARD_OPTS_RESERVED, cfg.reward)
    except RewardError as e:
        return str(e)
    if cfg.nfe < 2:
        return "--nfe must be at least 2: the last step is deterministic and never trained"
    if cfg.minibatches > cfg.prompts_per_step:
        return f"--minibatches {cfg.minibatches} exceeds --prompts-per-step {cfg.prompts_per_step} (split by groups)"
    if cfg.train_fraction * (cfg.nfe - 1) < 1 and cfg.train_fraction < 1:
        return f"--train-fraction {cfg.train_fraction} trains no step of {cfg.nfe - 1}: raise it"
    return None


def batch_layout(n_groups: int, G: int, minibatches: int, micro_batch: int) -> list[list[slice]]:
    """The forward chunks of every minibatch: minibatches are contiguous runs of whole groups, and each is cut into
    forward chunks of micro_batch samples (0 = the whole minibatch). The rollout and the training recomputation use
    exactly these chunks, so a network whose output depends on the batch shape (any batched matmul) still gives an
    importance ratio of exactly 1 on-policy: the training pass forwards whole chunks, each row at its own step."""
    out, start = [], 0
    for gs in torch.arange(n_groups).chunk(minibatches):
        n = len(gs) * G
        size = micro_batch or n
        out.append([slice(i, min(i + size, start + n)) for i in range(start, start + n, size)])
        start += n
    return out


def trained_mask(B: int, K: int, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """(B, K) bool: the steps each sample trains. Never the last (deterministic) step. fraction = 1: steps 0..K-2 in
    order (Flow-GRPO); < 1: an independent random subset of round(fraction (K - 1)) steps per sample (DanceGRPO)."""
    mask = torch.zeros(B, K, dtype=torch.bool)
    if fraction >= 1:
        mask[:, :K - 1] = True
        return mask
    n = max(1, int(round(fraction * (K - 1))))
    idx = torch.rand(B, K - 1, generator=generator).argsort(1)[:, :n]
    return mask.scatter_(1, idx, True)


def rank_steps(trained: torch.Tensor) -> torch.Tensor:
    """(B, n) long: the steps each row trains, ascending; column j holds t_i(j), row i's j-th trained step.

    trained: (B, K) bool with the same number n of steps per row (trained_mask). The recomputation trains rank j of
    every row in one call (Flow-GRPO's per-sample timestep subsets), so each chunk costs n calls, not K - 1 with
    rows masked out. Fraction 1: column j is step j for every row, the plain per-step loop."""
    counts = trained.sum(1)
    if not bool((counts == counts[0]).all()):
        raise ValueError(f"rows train different numbers of steps: {counts.tolist()}")
    return trained.nonzero()[:, 1].reshape(trained.shape[0], -1)   # nonzero is row-major: each row ascending


def finite_or_none(t: torch.Tensor) -> list:
    """A per-step statistic as a JSON list: None where no sample trained that step (instead of NaN)."""
    return [v if math.isfinite(v) else None for v in t.tolist()]


def reuses_rollout_graph(cfg: Config) -> bool:
    """Whether the loss takes its log-probabilities from the rollout's own graph (--reuse-rollout-graph): only with
    one inner epoch and one minibatch, where the one recomputation would repeat the rollout's calls exactly (same
    weights, same inputs); otherwise the option falls back to recomputation."""
    return cfg.reuse_rollout_graph and cfg.inner_epochs == 1 and cfg.minibatches == 1


def rollout_step_graphs(velocity_fn, z: torch.Tensor, sigmas: torch.Tensor, kind: str, eta: float, sigma_max: float,
                        store_means: bool = False) -> tuple[Trajectory, list[tuple[torch.Tensor, torch.Tensor | None]]]:
    """The rollout of --reuse-rollout-graph for one chunk: common.flow.rollout one step at a time, with gradients on
    the K - 1 stochastic steps and every step's input detached, so each step's log pi(z_{t+1} | z_t) has the graph a
    recomputation would build (z_t fixed, through the parameters only) and a graph of its own. The loss then runs
    one backward per trained step and chunk, in the recomputation's order, and the accumulated gradients are bitwise
    those of recomputation; one rollout call would stack the steps' log-probs into one graph, whose backward reaches
    every step at once and sums their gradients in another order (equal only to float rounding).

    z: (n, *latent) initial noise; sigmas: (K+1,) on the host (each call reads its grid without a device sync).
    Returns the trajectory, detached (states (n, K+1, ...), x0 (n, K, ...), stds (n, K), logprobs (n, K)), and
    per step t < K - 1 (log-prob (n,), mean (n, *latent) or None without store_means), both with graphs.
    """
    K, parts = len(sigmas) - 1, []
    for k in range(K):
        parts.append(rollout(velocity_fn, parts[-1].final if parts else z, sigmas[k:k + 2], kind=kind,
                             noise_level=eta, grad="all" if k < K - 1 else "none", detach_inputs=True,
                             store_means=store_means, sigma_max=sigma_max))
    cat = lambda name: torch.cat([getattr(p, name).detach() for p in parts], 1)
    traj = Trajectory(sigmas=sigmas.float(), states=torch.cat([z[:, None], cat("states")[:, 1::2]], 1),
                      x0=cat("x0"), stds=cat("stds"), logprobs=cat("logprobs"), noises=cat("noises"))
    return traj, [(p.logprobs[:, 0], p.means[:, 0] if store_means else None) for p in parts[:-1]]


def host_sum(values: list[torch.Tensor], divisors: list[int] | None = None) -> float:
    """sum_j float(v_j) / d_j over the elements v_j of `values` (device tensors, concatenated in order; d_j = 1 by
    default), accumulated in order in python floats: the value a running `total += float(v) / d` gives, with one
    device -> host copy instead of one sync per term."""
    flat = torch.cat([v.reshape(-1) for v in values]).tolist() if values else []
    return sum(v / d for v, d in zip(flat, divisors)) if divisors is not None else sum(flat, 0.0)


def ratio_statistics(records: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]], K: int, clip: float) -> dict:
    """The logged statistics of one training step's importance ratios, from records (t (n,) long on the host: each
    row's denoising step, ratio (n,), trained (n,) bool, on_policy) kept on the device until here: one device -> host
    copy, not a sync per step and chunk. Per denoising step t over the rows that trained it (scattered by each row's
    own t): min, max, mean (None where none did); the clip fraction over every trained row; the largest |ratio - 1|
    over the first inner step's rows (exactly 0 on-policy)."""
    ts = torch.cat([t for t, _, _, _ in records])
    first = torch.cat([torch.full((r.numel(),), on) for _, r, _, on in records])
    r, m = torch.stack([torch.cat([r for _, r, _, _ in records]),
                        torch.cat([m for _, _, m, _ in records]).float()]).cpu()
    keep = m.bool()
    r, ts, first = r[keep], ts[keep], first[keep]
    nan = torch.full((K,), float("nan"))
    lo = nan.scatter_reduce(0, ts, r, "amin", include_self=False)   # untouched steps keep NaN -> None
    hi = nan.scatter_reduce(0, ts, r, "amax", include_self=False)
    mean = torch.zeros(K).index_add_(0, ts, r) / torch.bincount(ts, minlength=K)
    first_dev = float((r[first] - 1).abs().max()) if bool(first.any()) else 0.0
    return {"clip_frac": float(clip_fraction(r, clip)), "ratio_min": finite_or_none(lo[:K - 1]),
            "ratio_max": finite_or_none(hi[:K - 1]), "ratio_mean": finite_or_none(mean[:K - 1]),
            "ratio_first_dev": first_dev}


@torch.no_grad()
def evaluate(backend, net, reward, held, sigmas, micro_batch, precision, device, save_dir=None):
    """Mean reward per objective (and combined) over the held-out set (common.evaluate.held_out_rewards: eval
    prompts x fixed noise, deterministic Euler; a collective under torchrun: call it on every rank): {name: float}.
    save_dir (points only): the samples of the whole set, in its order, to save_dir/samples.pt (rank 0 writes)."""
    r, lat = held_out_rewards(backend, net, reward, held[1], held[2], sigmas, batch_size=micro_batch or None,
                              context=lambda: autocast(precision, device))   # r: (n, M), every row, the set's order
    if save_dir and backend.media == "points":   # the demo draws them over the data density (rank 0 writes)
        save_samples(save_dir, lat, backend.target(0) if hasattr(backend, "target") else None,
                     n_total=held[2].shape[0])
    out = {n: float(r[:, m].mean()) for m, n in enumerate(reward.names)}
    out["combined"] = float(reward.combine(r).mean())
    return out


def eval_only(cfg: Config, backend, net, reward, device, ckpt: dict | None) -> dict:
    """--eval-only: held-out rewards of the base model and of --ckpt (loaded by main) at every --eval-nfe;
    eval.md/json in the run directory (--ckpt's, or --out). Returns {"rows": [...]}."""
    n_per = max(1, cfg.eval_samples // len(backend.prompts("eval")))
    held = held_out(backend, n_per_prompt=n_per, seed=10_000 + cfg.seed)  # the same set training evaluates on
    named = trained_tensors(net)       # with LoRA the adapter only: the frozen base is never copied
    models = {"base": {k: p.detach().clone() for k, p in named.items()}}
    if ckpt is not None:
        models["otca"] = ckpt["state"]["net"]
    rows = []
    for name, weights in models.items():
        load_trained(named, weights, f"--ckpt {cfg.ckpt}")
        for K in cfg.eval_nfe:
            sig = backend.sigmas(K, shift=cfg.shift).to(device)
            rows.append({"model": name, "nfe": K,
                         **evaluate(backend, net, reward, held, sig, cfg.micro_batch, cfg.precision, device)})
    out = cfg.out or (cfg.ckpt if os.path.isdir(cfg.ckpt) else os.path.dirname(cfg.ckpt)) or "runs/otca-eval"
    if dist.is_main():
        write_table(rows, out, "eval", header=f"otca.py --eval-only --ckpt {cfg.ckpt or '(none)'}")
        print(markdown_table(rows))
    return {"rows": rows}


def main(cfg: Config) -> dict:
    rank, world, device = dist.init_distributed(cfg.device)
    ckpt = load_checkpoint(cfg.ckpt, map_location=device, method="otca", needs=("net",)) \
        if cfg.eval_only and cfg.ckpt else None
    if ckpt is not None:  # as rats.py: the model, its sigma grid (shift) and its held-out set (seed) come from the
        # run, the reward and the eval flags from this command (sde and noise level do not matter: Euler sampling)
        for k in ("teacher", "tiny", "pretrained", "lora_rank", "full_finetune", "shift", "seed"):
            setattr(cfg, k, ckpt["config"].get(k, getattr(cfg, k)))
    seed_everything(cfg.seed + rank)
    if device.type == "cpu":
        torch.set_num_threads(1)   # small networks are latency-bound: extra intra-op threads only spin (309 s -> 18 s)
    # toy2d and the DiT accept the LoRA options and ignore them (they train every weight); the DiT honours
    # gradient checkpointing. The base model does not depend on --seed.
    backend = get_backend(cfg.teacher, device=device, tiny=cfg.tiny, lora_rank=cfg.lora_rank,
                          full_finetune=cfg.full_finetune, gradient_checkpointing=cfg.gradient_checkpointing,
                          **({"pretrained": cfg.pretrained} if cfg.pretrained else {}),
                          **base_dtype(cfg.precision, cfg.teacher, cfg.full_finetune))  # bf16: frozen LoRA base only
    reward = build_reward(cfg.reward, tiny=cfg.tiny, device=device, dataset=getattr(backend, "dataset", None)
                          and backend.dataset.name,
                          **parse_reward_opts(cfg.reward_opts, REWARD_OPTS_RESERVED, cfg.reward)).to(device)
    M = len(reward.names)
    net = backend.network
    # Rollout and recomputation both in train mode: the ratio must be exactly 1 on-policy, and eval mode under no_grad
    # takes fused inference fast paths (nn.TransformerEncoderLayer's, in the small DiT's text encoder) that the
    # recomputation with gradients does not. Every backbone here has dropout 0, so train mode changes nothing else.
    net.train()
    params = backend.trainable_parameters(net)
    if not params:
        raise ConfigError(f"backend {cfg.teacher} exposes no trainable parameters")
    if cfg.beta_kl > 0:
        backend.keep_reference(net)  # full fine-tuning: a frozen copy of the base (with a LoRA nothing is kept)
    opt_ = make_optimizer(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.eval_only:
        out = eval_only(cfg, backend, net, reward, device, ckpt)
        dist.cleanup()
        return out
    run = Run(cfg, "otca", device=device, show=["reward", "clip_frac", "loss"])
    train_prompts = load_prompts(cfg.prompts) if cfg.prompts not in ("", "builtin") else backend.prompts("train")
    eval_prompts = backend.prompts("eval")
    K = cfg.nfe
    sigmas = backend.sigmas(K, shift=cfg.shift).to(device)
    sigmas_host = sigmas.cpu()     # the rollouts' grid: common.flow.rollout reads it on the host (no device sync)
    sigma_max = float(sigmas[1])   # flow_grpo's first-step denominator, read once (not a device sync per call)
    reuse = reuses_rollout_graph(cfg)
    eta = cfg.noise_level if cfg.noise_level is not None else (0.3 if cfg.sde == "dance" else 0.7)
    G, n_groups = cfg.group_size, cfg.prompts_per_step
    B = G * n_groups
    layout = batch_layout(n_groups, G, cfg.minibatches, cfg.micro_batch)  # forward chunks per minibatch
    prior = reward.weights.to(device) if cfg.prior == "reward" else None
    lam = (reward.weights if cfg.prior == "reward" else torch.ones(M)).to(device)
    lam = lam / lam.sum()  # clip-then-sum coefficients (DanceGRPO's vq_coef, mq_coef), summing to one
    # held-out prompts and noise (their own generator): the same set before and after, and for every variant
    n_per = max(1, cfg.eval_samples // len(eval_prompts))
    held = held_out(backend, n_per_prompt=n_per, seed=10_000 + cfg.seed) if cfg.eval_samples else None
    ev = lambda: evaluate(backend, net, reward, held, sigmas, cfg.micro_batch, cfg.precision, device) if held else {}
    # the prompts and trained steps of every step come from g_steps (the global RNG, which run.resume restores,
    # draws the noise); checkpoints hold it, the trained tensors only (with LoRA: the adapter, 0.6 GB on FLUX.1,
    # not the frozen 24 GB base) and the credit average: a resumed run continues exactly
    g_steps = torch.Generator().manual_seed(cfg.seed * 1000 + rank + 1)
    credit_sum, credit_n = torch.zeros(K, device=device), 0
    named = trained_tensors(net)
    state = run.resume(needs=("net", "opt"))
    if state:
        load_trained(named, state["net"], "--resume")
        opt_.load_state_dict(state["opt"])
        rewards_init = state["rewards_init"]
        if "g_steps" in state:    # (older checkpoints: the stream restarts from the seed)
            g_steps.set_state(dist.this_ranks(state["g_steps"]))     # one state per rank
            credit_sum, credit_n = state["credit_sum"].to(device), state["credit_n"]
    else:
        rewards_init = ev()
    snapshot = lambda: {"net": detached(named), "opt": opt_.state_dict(), "rewards_init": rewards_init,
                        "g_steps": dist.gather_objects(g_steps.get_state()), "credit_sum": credit_sum.clone(),
                        "credit_n": credit_n}

    with run.interrupt_guard(snapshot):
        for step in range(run.step, cfg.steps):
            # ===================================== rollout =====================================================
            # n_groups prompts on this rank, each repeated G times consecutively; log-probs stored, without graphs,
            # or (reuse) with the graphs of the K - 1 stochastic steps, each through the parameters only.
            pidx = torch.randint(len(train_prompts), (n_groups,), generator=g_steps)
            cond = backend.encode([train_prompts[i] for i in pidx]).repeat(G)
            z0 = backend.noise(n_groups if cfg.same_noise else B)
            z0 = z0.repeat_interleave(G, 0) if cfg.same_noise else z0
            trajs, graphs = [], []   # graphs (reuse only): per chunk, per step t < K - 1, (log-prob, mean)
            with torch.set_grad_enabled(reuse), autocast(cfg.precision, device):
                for sl in [sl for mb in layout for sl in mb]:
                    vf = backend.velocity_fn(net, cond.select(sl))
                    if reuse:
                        traj, g = rollout_step_graphs(vf, z0[sl], sigmas_host, cfg.sde, eta, sigma_max,
                                                      store_means=cfg.beta_kl > 0)
                        graphs.append(g)
                    else:
                        traj = rollout(vf, z0[sl], sigmas_host, kind=cfg.sde, noise_level=eta)
                    trajs.append(traj)
            states = torch.cat([t.states.detach() for t in trajs])           # (B, K+1, *latent)
            x0s = torch.cat([t.x0.detach() for t in trajs])                  # (B, K, *latent)
            logp_old = torch.cat([t.logprobs.detach() for t in trajs])       # (B, K), mean over latent dims
            # ===================================== reward ======================================================
            with torch.no_grad():
                r_local = reward(backend.decode(states[:, -1]).float(), cond.prompts).float()  # (B, M)
            r_all = dist.all_gather_cat(r_local)  # every rank's groups, so that the statistics match one process
            # ===================================== advantage and credit ========================================
            a_all, valid_all = objective_advantages(r_all, G, ddof=cfg.std_ddof)          # (world B, M) each
            if cfg.objectives == "moca":
                fused_all, c_all = moca_fuse(a_all, valid_all, rho=cfg.rho, prior=prior, clamp=cfg.adv_clamp)
            else:  # static: the prior-weighted sum (rho = 1); sum: per-objective losses, weights lam
                fused_all, c_all = moca_fuse(a_all, valid_all, rho=1.0, prior=prior, clamp=cfg.adv_clamp)
            if cfg.objectives == "combined":  # one scalar reward, then one z-score: Flow-GRPO's multi-reward
                fused_all = group_advantages(reward.combine(r_all), G, ddof=cfg.std_ddof, eps=1e-8,
                                             clamp=cfg.adv_clamp)
            fused = dist.local_rows(fused_all, B)                                         # (B,)
            a_obj = dist.local_rows(a_all, B).clamp(-cfg.adv_clamp, cfg.adv_clamp)        # (B, M)
            trained_cpu = trained_mask(B, K, cfg.train_fraction, g_steps)    # (B, K); the host copy decides skips
            trained = trained_cpu.to(device)
            if cfg.credit in ("tcd", "tcd_batch"):
                omega = tcd_credit(states, trained, x0=x0s, source=cfg.credit_source, eps_w=cfg.eps_w,
                                   norm=cfg.credit_norm)                                  # (B, K)
                omega = batch_mean_credit(omega, trained, cfg.credit_norm) if cfg.credit == "tcd_batch" else omega
            else:
                omega = uniform_credit(trained, cfg.credit_norm)
            adv = step_advantages(fused, omega)                                           # (B, K)
            adv_obj = step_advantages(a_obj, omega)                                       # (B, K, M)
            n_trained = trained.sum(1).clamp_min(1).float()                               # |S_i|
            credit = (omega * trained).sum(0) / trained.sum(0).clamp_min(1)               # (K,) mean over samples
            credit_sum += credit
            credit_n += 1
            # ===================================== loss and update ============================================
            # Passes p, one batched call and one backward per pass and chunk. Recomputation: pass p trains every
            # row's own p-th trained step t_i(p) (per-row states and sigmas), n passes, no row evaluated for nothing.
            # Reuse: pass p is step t = p, whose graph the rollout kept for every row; rows not training it are masked
            # out of the loss. Per (i, t): log pi(z_{t+1} | z_t) under the current network, the clipped surrogate,
            # weight 1 / (n_rows |S_i|): J = mean_i mean_{t in S_i} over the n_rows samples of the minibatch.
            # Backward at once, pass by pass in both paths (so at fraction 1 their gradients are bitwise equal).
            # Losses, KLs and ratios stay on the device: one host sync per optimizer step.
            steps = torch.arange(K - 1).expand(B, -1) if reuse else rank_steps(trained_cpu)   # (B, passes): t_i(p)
            on_cpu = trained_cpu.gather(1, steps)    # (B, passes): row i trains pass p (recomputation: always)
            steps_dev, on, rows_all = steps.to(device), on_cpu.to(device), torch.arange(B, device=device)
            losses, kls, kl_rows, ratios = [], [], [], []   # ratios: (t per row, ratio, trained rows, on-policy)
            for epoch in range(cfg.inner_epochs):
                for mb_i, mb in enumerate(layout):
                    n_rows = mb[-1].stop - mb[0].start
                    first_inner = epoch == 0 and mb_i == 0
                    opt_.zero_grad(set_to_none=True)
                    mb_losses = []
                    for p in range(steps.shape[1]):
                        for c, sl in enumerate(mb):
                            if not on_cpu[sl, p].any():                  # reuse: no row of this chunk trains step p
                                continue
                            rows, t, m_t, c_sl = rows_all[sl], steps_dev[sl, p], on[sl, p], cond.select(sl)
                            x_t, s_t, s_next = states[rows, t], sigmas[t], sigmas[t + 1]     # (n, *latent), (n,)
                            if reuse:  # one minibatch: chunk c is trajs[c]; std shaped like the latent, for the KL
                                lp, mean = graphs[c][p]
                                std = trajs[c].stds[:, p].reshape(-1, *[1] * (states.ndim - 2))
                            else:
                                with autocast(cfg.precision, device):
                                    lp, mean, std = transition_logprob(
                                        backend.velocity_fn(net, c_sl), x_t, states[rows, t + 1], s_t, s_next,
                                        cfg.sde, eta, sigma_max=sigma_max)
                            if cfg.objectives == "sum":
                                loss_i, ratio = per_objective_clipped_loss(lp, logp_old[rows, t], adv_obj[rows, t],
                                                                           lam, cfg.clip)
                            else:
                                loss_i, ratio = fused_clipped_loss(lp, logp_old[rows, t], adv[rows, t], cfg.clip)
                            if cfg.beta_kl > 0:
                                # the reference only at the rows that train this pass (reuse at a train fraction
                                # < 1 masks the others out; recomputation trains every row): no evaluation is wasted
                                x_r, s_r, sn_r, mean_r, std_r, c_r = x_t, s_t, s_next, mean, std, c_sl
                                part = not bool(on_cpu[sl, p].all())
                                if part:
                                    ri = on_cpu[sl, p].nonzero().squeeze(1).to(device)   # (rows trained,)
                                    x_r, s_r, sn_r, mean_r, std_r = (v.index_select(0, ri) for v in
                                                                     (x_t, s_t, s_next, mean, std))
                                    c_r = c_sl.select(ri)
                                with torch.no_grad(), backend.reference(net) as ref, autocast(cfg.precision, device):
                                    v_ref = backend.velocity(ref, x_r, s_r, c_r)
                                    _, mean_ref, _ = sde_step(x_r, v_ref, s_r, sn_r, cfg.sde, eta,
                                                              noise=torch.zeros_like(v_ref), sigma_max=sigma_max)
                                # the exact KL ||dmu||^2 / (2 g^2 Delta), no dt: beta about Flow-GRPO's / 10 (PRESETS)
                                kl = gaussian_kl_same_std(mean_r, mean_ref, std_r)                # (rows trained,)
                                kl = torch.zeros_like(m_t, dtype=kl.dtype).index_copy(0, ri, kl) if part else kl
                                loss_i = loss_i + cfg.beta_kl * kl
                                kls.append((m_t * kl.detach() / n_trained[sl]).sum())
                                kl_rows.append(n_rows)
                            if cfg.debug and first_inner:  # on-policy: the ratio must be exactly 1 (anchors.md
                                # pitfall 5); the only per-step sync, debug only. Wan 2.2 splits a call's rows
                                # between its experts (sub-batches the rollout did not have): 1 to float rounding
                                rd = ratio.detach().float()[m_t]
                                tol = 1e-6 if backend.splits_rows else 0.0
                                assert bool(((rd - 1).abs() <= tol).all()), \
                                    f"ratio != 1 on-policy, steps {steps[sl, p].tolist()}: {(rd - 1).tolist()}"
                            ratios.append((steps[sl, p], ratio.detach().float(), m_t, first_inner))
                            loss = (m_t * loss_i / n_trained[sl]).sum() / n_rows  # this minibatch's J, pass p
                            loss.backward()   # frees this pass's graph (recomputation: the only one alive)
                            mb_losses.append(loss.detach())
                    mb_loss = torch.stack(mb_losses)                                  # (passes x chunks,)
                    run.check_finite(loss=mb_loss)  # before the update; the one host sync of an optimizer step
                    losses.append(mb_loss)
                    dist.average_gradients(params)  # data parallel: the mean over ranks of each rank's J
                    grad_norm = clip_grad(params, cfg.max_grad_norm)
                    opt_.step()
            # ===================================== log =========================================================
            # the device statistics reach the host here, once per training step
            n_updates = cfg.inner_epochs * cfg.minibatches
            r_groups = r_all.reshape(-1, G, M)
            zero_var = (~valid_all).reshape(-1, G, M)[:, 0]                               # (groups, M)
            metrics = {"reward": float(reward.combine(r_all).mean()), "loss": host_sum(losses) / n_updates,
                       "grad_norm": grad_norm, "zero_var_groups": float(zero_var.any(1).float().mean()),
                       "credit": credit, "obj_weights": c_all.mean(0), "adv_abs": fused.abs().mean(),
                       **ratio_statistics(ratios, K, cfg.clip)}
            for m, name in enumerate(reward.names):
                metrics[f"r_{name}"] = float(r_groups[..., m].mean())
                metrics[f"r_{name}_gstd"] = float(r_groups[..., m].std(1, correction=cfg.std_ddof).mean())
                metrics[f"zero_var_{name}"] = float(zero_var[:, m].float().mean())
            if cfg.beta_kl > 0:
                metrics["kl"] = host_sum(kls, kl_rows) / n_updates
            # ===================================== eval and save ===============================================
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
                metrics.update({f"eval_{k}": v for k, v in ev().items()})
            run.log(step + 1, **metrics)
            if run.due(step + 1):
                run.save(step + 1, snapshot())

    rewards = evaluate(backend, net, reward, held, sigmas, cfg.micro_batch, cfg.precision, device, run.out) \
        if held else {}
    summary = {"rewards_init": rewards_init, "rewards": rewards, "objectives": reward.names,
               "credit_per_step": (credit_sum / max(credit_n, 1)).tolist(),
               "eval": {"sampler": "euler", "nfe": K, "samples": n_per * len(eval_prompts) if held else 0,
                        "prompts": eval_prompts}}
    if dist.is_main():
        print("rewards before", rewards_init, "\nrewards after ", rewards)
    run.finish(summary, snapshot())
    dist.cleanup()
    return summary


if __name__ == "__main__":
    with user_errors():
        main(parse_config(Config, presets=PRESETS, checks=[checks]))
