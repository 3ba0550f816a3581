"""One evaluation path for the three scripts: same held-out prompts and noise for every model, every reward.

    prompts, cond, noise = held_out(backend, n_per_prompt=8, seed=0)
    rows = evaluate_models(backend, {"teacher": Sampler(teacher, backend.sigmas(50)),
                                     "student": Sampler(student, backend.sigmas(4))}, reward, cond, noise)
    write_table(rows, out_dir, "eval")          # eval.md (paper layout) + eval.json

A row is {"model": name, "nfe": K, <objective>: mean, <objective>_std: std, ...extra metrics}. Scores are on the
training scale; rewards expose `table_scale` (one factor per objective, e.g. HPS x100) used for tables.
Under torchrun evaluate_models and eval_table shard the set: call them on every rank; each samples its rows
(dist.strided_rows: sample_final(shard=True)), the rewards are gathered, every rank gets the whole set's rows
(those one process computes), and rank 0 writes.
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from typing import Callable, ContextManager, Sequence

import torch

from common import dist
from common.flow import rollout


@dataclass
class Sampler:
    """A network plus how to sample it: sigmas (K+1,), step kind and noise level, guidance (None = backend default),
    and context: a factory of the context the network is sampled in (e.g. a LoRA adapter switched on, so that two
    models share one transformer instead of a deep copy each; None = as it is)."""
    net: torch.nn.Module
    sigmas: torch.Tensor
    kind: str = "euler"
    noise_level: float = 0.0
    guidance: float | None = None
    context: Callable[[], ContextManager] | None = None

    @property
    def nfe(self) -> int:
        return len(self.sigmas) - 1


@torch.no_grad()
def sample_final(backend, net, cond, noise: torch.Tensor, sigmas: torch.Tensor, kind: str = "euler",
                 noise_level: float = 0.0, guidance: float | None = None,
                 generator: torch.Generator | None = None, batch_size: int | None = None,
                 shard: bool = False) -> torch.Tensor:
    """Final latents (B, ...) of a rollout from `noise` under no_grad, in chunks of batch_size to bound memory.

    shard (an evaluation under torchrun, on every rank): this rank samples only its rows dist.strided_rows(B) and
    returns them, (B_r, ...), equal to those rows of the one-process result, stochastic steps included: each step
    draws the noise of the whole chunk from generator, as one process does, and keeps this rank's rows (so with
    several chunks, each needs a row of every rank: batch_size >= world). Single process: as without shard."""
    B = noise.shape[0]
    bs = batch_size or B
    world, rank = (dist.world_size(), dist.rank()) if shard else (1, 0)
    if world > 1 and B > bs and bs < world:
        raise ValueError(f"sample_final(shard=True): batch_size {bs} below the {world} ranks")
    outs = []
    for i in range(0, B, bs):
        if world == 1:
            c, x, draw = cond.select(slice(i, i + bs)), noise[i:i + bs], None
        else:   # this rank's rows of the chunk; none only in a last chunk shorter than world (nothing drawn after)
            n = min(bs, B - i)
            rows = list(range((rank - i) % world, n, world))
            if not rows:
                continue
            c, x, draw = cond.select([i + j for j in rows]), noise[i:i + n][rows], (n, rows)
        tr = rollout(backend.velocity_fn(net, c, guidance), x, sigmas, kind, noise_level, generator=generator,
                     draw_rows=draw)
        outs.append(tr.final)
    return torch.cat(outs, 0) if outs else noise[:0]


@torch.no_grad()
def held_out_rewards(backend, net, reward, cond, noise: torch.Tensor, sigmas: torch.Tensor,
                     guidance: float | None = None, batch_size: int | None = None,
                     context: Callable[[], ContextManager] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(r, lat) of deterministic Euler samples on `sigmas` of a fixed held-out set (cond, noise: n rows): r (n, M),
    every row's rewards in the set's order, on the host and on every rank; lat: this rank's final latents, rows
    dist.strided_rows(n) (the whole set in one process). Under torchrun each rank samples its rows and the rewards
    are gathered (a collective: call it on every rank; no rank waits while another samples). context: a factory of
    the context the sampling runs in (e.g. --precision's autocast); decode and reward run outside it."""
    n = noise.shape[0]
    rows = dist.strided_rows(n)
    cond = cond.select(rows)
    with context() if context is not None else contextlib.nullcontext():
        lat = sample_final(backend, net, cond, noise[rows], sigmas, guidance=guidance, batch_size=batch_size)
    r = reward(backend.decode(lat), cond.prompts).float()
    return dist.gather_strided(r, n).cpu(), lat


def held_out(backend, n_per_prompt: int = 8, seed: int = 0, split: str = "eval",
             prompts: Sequence[str] | None = None):
    """The fixed evaluation set: (prompts (B,), cond (B,), noise (B, ...)) with B = len(prompts) * n_per_prompt.
    The noise comes from its own generator, so it is the same for every model and every call."""
    base = list(prompts) if prompts is not None else backend.prompts(split)
    cond = backend.encode(base).repeat(n_per_prompt)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(base) * n_per_prompt, *backend.latent_shape), generator=g).to(backend.device)
    return cond.prompts, cond, noise


def score_summary(reward, media: torch.Tensor, prompts: Sequence[str] | None, table: bool = False,
                  n_total: int | None = None) -> dict:
    """Mean and std of every objective (and of the weighted combination when there are several).
    n_total: media and prompts are this rank's rows (dist.strided_rows(n_total), sample_final(shard=True)) of a
    set of n_total; the rewards of every rank are gathered first (a collective: call it on every rank)."""
    with torch.no_grad():
        r = reward(media, prompts).float()                         # (B, M)
    r = (r if n_total is None else dist.gather_strided(r, n_total)).cpu()
    scales = list(getattr(reward, "table_scale", None) or [1.0] * len(reward.names))  # one factor per objective
    out = {}
    for m, name in enumerate(reward.names):
        col = r[:, m] * (scales[m] if table else 1.0)
        out[name] = float(col.mean())
        out[f"{name}_std"] = float(col.std()) if len(col) > 1 else 0.0
    if len(reward.names) > 1 and hasattr(reward, "combine"):
        comb = reward.combine(r)
        out["combined"] = float(comb.mean())
    return out


def evaluate_models(backend, samplers: dict[str, Sampler], reward, cond, noise: torch.Tensor,
                    extra: Callable[[str, torch.Tensor, torch.Tensor], dict] | None = None,
                    table: bool = False, seed: int = 0, batch_size: int | None = None) -> list[dict]:
    """Sample every model from the same noise and prompts, decode, score. extra(name, latents, media) may add
    metrics (KL and MMD on the toy, attribute frequencies on the small DiT). Returns one row per model.
    Under torchrun (call it on every rank) each rank samples and scores its share of the rows, the rewards are
    gathered, and extra sees the whole set (every rank's latents and media, gathered)."""
    n, rows = noise.shape[0], []
    prompts = cond.select(dist.strided_rows(n)).prompts if dist.is_dist() else cond.prompts   # this rank's rows
    for name, s in samplers.items():
        g = torch.Generator().manual_seed(seed)   # the same stochastic-step noise for every model too
        with s.context() if s.context is not None else contextlib.nullcontext():
            lat = sample_final(backend, s.net, cond, noise, s.sigmas, s.kind, s.noise_level, s.guidance, g, batch_size,
                               shard=True)
        with torch.no_grad():
            media = backend.decode(lat)
        row = {"model": name, "nfe": s.nfe}
        row.update(score_summary(reward, media, prompts, table, n_total=n))
        if extra is not None:
            row.update(extra(name, dist.gather_strided(lat, n), dist.gather_strided(media, n)))
        rows.append(row)
    return rows


def save_samples(out_dir: str, latents: torch.Tensor, target=None, n: int = 4096, name: str = "samples.pt",
                 n_total: int | None = None) -> str:
    """Keep a run's final evaluation samples (2-D points on the toy) with the density they aim at (an object with
    log_prob, e.g. a toy GaussianMixture), so that reports can draw them over the target's contours.
    n_total: latents are this rank's rows (dist.strided_rows(n_total), held_out_rewards) of a set of n_total: they
    are gathered into the set's order first (a collective: call it on every rank) and rank 0 writes."""
    path = os.path.join(out_dir, name)
    if n_total is not None:
        latents = dist.gather_strided(latents, n_total)
        if not dist.is_main():
            return path
    torch.save({"samples": latents.detach().float().cpu()[:n], "target": target}, path)
    return path


def eval_table(backend, samplers: dict[str, Sampler], reward, out_dir: str, header: str = "",
               n_per_prompt: int = 8, seed: int = 0, prompts: Sequence[str] | None = None,
               extra: Callable[[str, torch.Tensor, torch.Tensor], dict] | None = None,
               batch_size: int | None = None) -> list[dict]:
    """The --eval-only path: every sampler on the same held-out prompts and noise, scored on the papers' table
    scales (HPS x100, PickScore logit, ImageReward raw), written to out_dir/eval.md and eval.json (by rank 0)."""
    _, cond, noise = held_out(backend, n_per_prompt, seed, prompts=prompts)
    rows = evaluate_models(backend, samplers, reward, cond, noise, extra=extra, table=True, seed=seed,
                           batch_size=batch_size)
    if dist.is_main():
        write_table(rows, out_dir, "eval", header=header)
    return rows


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    """Rows as a markdown table; columns default to the union of keys in first-seen order."""
    if columns is None:
        columns = []
        for r in rows:
            columns += [k for k in r if k not in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_table(rows: Sequence[dict], out_dir: str, name: str, columns: Sequence[str] | None = None,
                header: str = "") -> tuple[str, str]:
    """Write out_dir/name.md (markdown, with an optional header line such as the command) and out_dir/name.json."""
    os.makedirs(out_dir, exist_ok=True)
    md, js = os.path.join(out_dir, f"{name}.md"), os.path.join(out_dir, f"{name}.json")
    with open(md, "w") as f:
        f.write((header.rstrip() + "\n\n" if header else "") + markdown_table(rows, columns))
    with open(js, "w") as f:
        json.dump(list(rows), f, indent=2)
    return md, js
