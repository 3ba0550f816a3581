"""Seconds and peak memory of one RATS step and one GRPO (otca.py) step on the full-size FLUX.1 transformer.

The transformer is built with random weights directly in bf16 (benchmarks/flux_lora_step.py: build, FLUX1_DEV; no
download), with the LoRA adapter and gradient checkpointing of FluxBackend, at 512 x 512 px (1,024 packed image
tokens, 512 random T5 tokens: text encoding is outside the step, as in the scripts where prompts are encoded once).
The steps run the project's own maths (common.flow.rollout / transition_logprob, common.shaping, common.rl):

  rats:  N teacher Euler steps under no_grad (the EMA teacher) + K student Euler steps with the graph kept through
         the whole rollout + the matched-horizon shaping loss + a differentiable reward stand-in on the final latent
         + backward + AdamW + the EMA update of the teacher. Teacher: --teacher-copy full (a deep copy of the
         transformer: rats.py --teacher-copy full, +23.8 GB of bf16 weights) or adapter (a second LoRA adapter on
         the shared frozen base, active for the teacher rollout: the memory of rats.py's LoRA presets, whose
         --teacher-copy swap keeps the averaged LoRA tensors and swaps them into the student for those calls).
  grpo:  G samples per prompt in chunks of --micro-batch: the K-step SDE rollout (dance, eta 0.3) under no_grad with
         stored log-probabilities; each sample trains its own random n = max(1, round(f (K - 1))) of the K - 1
         stochastic steps; then for each rank j < n and chunk one call recomputes the log-probability with gradients
         at every row's own j-th trained step (per-row states and sigmas), the clipped surrogate, backward (one
         graph alive at a time), one AdamW step: otca.py's loop (TCD/MOCA weights cost nothing next to the network).
         Calls per step: K x chunks rollout calls without grad, n x chunks with grad (defaults: 48 and 9 x 3 = 27).
Not included (both methods): the VAE decode and the reward model (HPS ViT-H-14: about 2 GB of weights and one
forward/backward per sample) and the text encoders. So these are lower bounds of the scripts' step on FLUX.

The papers' table (RATS, arXiv 2604.14910, per step on FLUX): RATS 7.57 s / 67.67 GB, SenseFlow 7.31 s / 78.87 GB,
DanceGRPO 212.71 s / 34.05 GB.

GPU:   python benchmarks/flux_method_step.py --method rats        (K 3, N 50)
       python benchmarks/flux_method_step.py --method grpo        (K 16, G 12, micro-batch 4, train fraction 0.6)
CPU smoke run:  python benchmarks/flux_method_step.py --method rats --tiny --device cpu
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.timing import device_and_dtype, median, report, time_steps  # noqa: E402

PAPER_TABLE = {"RATS": (7.57, 67.67), "SenseFlow": (7.31, 78.87), "DanceGRPO": (212.71, 34.05)}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", required=True, choices=["rats", "grpo"])
    p.add_argument("--tiny", action="store_true", help="the tiny random FLUX config (CPU smoke run)")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--height", type=int, default=None, help="pixels (default 512; 32 with --tiny)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--text-len", type=int, default=None, help="T5 tokens (default 512; 16 with --tiny)")
    p.add_argument("--lora-rank", type=int, default=32)
    p.add_argument("--no-checkpointing", action="store_true", help="disable gradient checkpointing")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp32"], help="default bf16 on GPU, fp32 on CPU")
    p.add_argument("--nfe", type=int, default=None, help="student / rollout steps K (rats 3, grpo 16)")
    p.add_argument("--teacher-nfe", type=int, default=50, help="rats: teacher steps N")
    p.add_argument("--batch", type=int, default=1, help="rats: samples per step")
    p.add_argument("--teacher-copy", default="full", choices=["full", "adapter"], help="rats: EMA teacher storage")
    p.add_argument("--group-size", type=int, default=12, help="grpo: G")
    p.add_argument("--micro-batch", type=int, default=4, help="grpo: samples per forward")
    p.add_argument("--train-fraction", type=float, default=0.6, help="grpo: fraction of the K-1 steps trained")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=2, help="timed steps")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="also write the JSON result here")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    a = parse(argv)
    from benchmarks.flux_lora_step import build_lora, flux_setup
    from common.backends.flux import image_ids
    from common.flow import flux_mu, make_sigmas, rollout, transition_logprob
    from common.rl import clipped_surrogate
    from common.shaping import match_horizons, shaping_loss
    from otca import rank_steps
    K = a.nfe or (3 if a.method == "rats" else 16)
    if min(a.steps, a.batch, a.group_size, a.micro_batch, K, a.teacher_nfe) < 1 or not 0 < a.train_fraction <= 1:
        print("error: counts must be >= 1 and --train-fraction in (0, 1]", file=sys.stderr)
        sys.exit(2)
    if a.method == "grpo" and K < 2:
        print("error: --nfe must be >= 2 for grpo (the last step is never trained)", file=sys.stderr)
        sys.exit(2)
    device, dtype = device_and_dtype(a.device, a.dtype)
    cfg, H, W, L, vf = flux_setup(a)
    t_build = time.perf_counter()
    adapters = ("default", "ema") if a.method == "rats" and a.teacher_copy == "adapter" else ("default",)
    net, n_params, lora = build_lora(cfg, device, dtype, a.lora_rank, adapters, not a.no_checkpointing)
    opt = torch.optim.AdamW(lora, lr=1e-4)
    teacher, ema_pairs = None, []
    if a.method == "rats":
        if a.teacher_copy == "full":
            teacher = copy.deepcopy(net).requires_grad_(False).eval()
            t_params = dict(teacher.named_parameters())
            ema_pairs = [(t_params[n], p) for n, p in net.named_parameters() if p.requires_grad]
        else:
            named = dict(net.named_parameters())
            ema_pairs = [(named[n.replace(".default.", ".ema.")], p) for n, p in named.items() if p.requires_grad]
            with torch.no_grad():      # the EMA starts from the student's weights
                for t_p, s_p in ema_pairs:
                    t_p.copy_(s_p)
    t_build = time.perf_counter() - t_build

    h2, w2 = H // vf // 2, W // vf // 2
    N_tok, D = h2 * w2, cfg["in_channels"]
    g = torch.Generator(device="cpu").manual_seed(1)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device)

    ids, txt_ids = image_ids(h2, w2, device), torch.zeros(L, 3, device=device)
    txt1, pooled1 = rnd(1, L, cfg["joint_attention_dim"]).to(dtype), rnd(1, cfg["pooled_projection_dim"]).to(dtype)
    reward_dir = rnd(1, N_tok, D) / (N_tok * D) ** 0.5   # the reward stand-in: a fixed linear functional

    def velocity_fn(model):
        def v(x, s):
            B = x.shape[0]
            return model(hidden_states=x.to(dtype), encoder_hidden_states=txt1.expand(B, -1, -1),
                         pooled_projections=pooled1.expand(B, -1), timestep=s.to(dtype), img_ids=ids,
                         txt_ids=txt_ids, guidance=torch.full((B,), 3.5, device=device), return_dict=False)[0]
        return v

    mu = flux_mu(N_tok)
    sig_S = make_sigmas(K, mu=mu).to(device)
    nfe = {"student_grad": 0, "teacher_nograd": 0, "rollout_nograd": 0, "recompute_grad": 0}

    def rats_step():
        sig_T = make_sigmas(a.teacher_nfe, mu=mu).to(device)
        index = match_horizons(sig_T, sig_S)[:K].clamp(max=a.teacher_nfe - 1).to(device)
        eps = rnd(a.batch, N_tok, D)
        with torch.no_grad():
            if teacher is not None:
                traj_T = rollout(velocity_fn(teacher), eps, sig_T)
            else:
                net.set_adapter("ema")
                traj_T = rollout(velocity_fn(net), eps, sig_T)
                net.set_adapter("default")
                for p in lora:         # set_adapter marks only the active adapter trainable: restore
                    p.requires_grad_(True)
        traj_S = rollout(velocity_fn(net), eps, sig_S, grad="all")
        l_shape, _ = shaping_loss(traj_S.x0, traj_T.x0, index)
        r_S = (traj_S.final * reward_dir).flatten(1).sum(1)
        loss = (-r_S + 0.5 * l_shape).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for t_p, s_p in ema_pairs:
                t_p.lerp_(s_p.to(t_p.dtype), 1 - 0.995)
        nfe["student_grad"] += K
        nfe["teacher_nograd"] += a.teacher_nfe
        return float(loss.detach())

    def grpo_step():
        G, mb = a.group_size, min(a.micro_batch, a.group_size)
        chunks = [slice(i, min(i + mb, G)) for i in range(0, G, mb)]
        z0 = rnd(G, N_tok, D)
        with torch.no_grad():
            trajs = [rollout(velocity_fn(net), z0[sl], sig_S, kind="dance", noise_level=0.3) for sl in chunks]
        nfe["rollout_nograd"] += K * len(chunks)
        states = torch.cat([t.states for t in trajs])
        logp_old = torch.cat([t.logprobs for t in trajs])
        r = (states[:, -1] * reward_dir).flatten(1).sum(1)
        adv = ((r - r.mean()) / (r.std() + 1e-6)).clamp(-5, 5)
        n_tr = max(1, int(round(a.train_fraction * (K - 1))))
        trained = torch.zeros(G, K, dtype=torch.bool)
        trained.scatter_(1, torch.rand(G, K - 1, generator=g).argsort(1)[:, :n_tr], True)
        steps = rank_steps(trained).to(device)      # (G, n_tr): each sample's trained steps, ascending
        rows_all, sigma_max = torch.arange(G, device=device), float(sig_S[1])   # host reads once, as otca.py does
        opt.zero_grad(set_to_none=True)
        total = torch.zeros((), device=device)     # on the device: no host sync per call
        for j in range(n_tr):        # rank j: every row at its own j-th trained step, one call per chunk
            for sl in chunks:
                rows, t = rows_all[sl], steps[sl, j]
                lp, _, _ = transition_logprob(velocity_fn(net), states[rows, t], states[rows, t + 1], sig_S[t],
                                              sig_S[t + 1], "dance", 0.3, sigma_max=sigma_max)
                loss_i, _ = clipped_surrogate(lp, logp_old[rows, t], adv[sl], 1e-4)
                loss = loss_i.sum() / (G * n_tr)
                loss.backward()
                total += loss.detach()
                nfe["recompute_grad"] += 1
        opt.step()
        return float(total)

    step = rats_step if a.method == "rats" else grpo_step

    times, loss, _ = time_steps(step, a.warmup, a.steps, device, after_warmup=lambda: nfe.update({k: 0 for k in nfe}))
    res = dict(benchmark=f"flux1_{a.method}_step", tiny=a.tiny, device=str(device),
               device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               dtype=str(dtype).removeprefix("torch."), height=H, width=W, image_tokens=N_tok, text_tokens=L,
               nfe=K, lora_rank=a.lora_rank, gradient_checkpointing=not a.no_checkpointing, params=n_params,
               lora_params=sum(p.numel() for p in lora), build_s=round(t_build, 2),
               step_s_median=round(median(times), 4), step_s_all=[round(t, 4) for t in times],
               calls_per_step={k: v / a.steps for k, v in nfe.items() if v}, loss=round(loss, 6),
               paper_table=PAPER_TABLE, excluded="VAE decode, reward model, text encoders", torch=torch.__version__)
    if a.method == "rats":
        res.update(teacher_nfe=a.teacher_nfe, batch=a.batch, teacher_copy=a.teacher_copy)
    else:
        res.update(group_size=a.group_size, micro_batch=a.micro_batch, train_fraction=a.train_fraction,
                   trained_steps_per_sample=max(1, int(round(a.train_fraction * (K - 1)))))
    return report(res, device, a.out)


if __name__ == "__main__":
    main()
