"""The toy2d backend: 2D points, a small MLP velocity network pretrained by flow matching, and (for Gaussian-mixture
datasets) the exact closed-form velocity as a perfect teacher.

    backend = get_backend("toy2d")                        # ring8_rare, learned teacher, shipped weights
    backend = get_backend("toy2d", dataset="moons", num_classes=2, teacher="learned")
    backend.network      the pretrained VelocityMLP (trainable copy: what a method fine-tunes)
    backend.exact        ExactVelocity (no parameters, same call signature) or None for non-mixture data
    backend.teacher_net  backend.exact when teacher="exact", else backend.network
    backend.mixture      list of GaussianMixture, one per class (None for non-mixture data)
    backend.dataset      the toy.datasets.ToyDataset

Weights: trained once per configuration and cached as safetensors with the configuration in the metadata; a cached
file is reused only when its configuration matches exactly. Look-up order: `weights_dir` if given, else the shipped
toy/weights/ and then the user cache ($TOY2D_CACHE, default ~/.cache/reward-aligned-flows/toy2d), where new
trainings are written. The shipped default weights were made with

    HF_HUB_OFFLINE=1 .venv/bin/python -c "from toy.backend import Toy2DBackend; \\
        Toy2DBackend(weights_dir='toy/weights', retrain=True)"
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from common.backend import Backend, Cond
from toy.datasets import DEFAULT_DATASET, ToyDataset, get_dataset
from toy.mixture import GaussianMixture

WEIGHTS_DIR = Path(__file__).parent / "weights"
TRAIN_VERSION = 1  # bump when the trainer changes, so that stale caches are retrained


def default_cache_dir() -> Path:
    return Path(os.environ.get("TOY2D_CACHE", Path.home() / ".cache" / "reward-aligned-flows" / "toy2d"))


def _sigma_vec(sigma, x: torch.Tensor) -> torch.Tensor:
    """sigma (scalar or (B,)) -> (B,) float32 on x's device."""
    s = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    return s.expand(x.shape[0]) if s.ndim == 0 else s.reshape(x.shape[0])


class VelocityMLP(nn.Module):
    """v(x, sigma, label): a time- (and optionally class-) conditioned MLP. x (B, 2), sigma (B,) or scalar,
    label (B,) long in [0, num_classes] where num_classes is the null label (classifier-free guidance).

    sigma enters as [sigma, sin(pi 2^j sigma), cos(pi 2^j sigma)] for j < n_freq; the class embedding is added
    to the first hidden layer. Output (B, 2) float32.
    """

    def __init__(self, hidden: int = 128, depth: int = 3, num_classes: int = 1, n_freq: int = 6):
        super().__init__()
        self.num_classes, self.n_freq = num_classes, n_freq
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(n_freq, dtype=torch.float32), persistent=False)
        self.inp = nn.Linear(2 + 1 + 2 * n_freq, hidden)
        self.label_emb = nn.Embedding(num_classes + 1, hidden) if num_classes > 1 else None
        self.hidden = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth - 1))
        self.out = nn.Linear(hidden, 2)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor, sigma, label: torch.Tensor | None = None) -> torch.Tensor:
        x = x.float()
        s = _sigma_vec(sigma, x)
        ang = s[:, None] * self.freqs  # (B, n_freq)
        h = self.inp(torch.cat([x, s[:, None], torch.sin(ang), torch.cos(ang)], -1))
        if self.label_emb is not None:
            lab = torch.full((x.shape[0],), self.num_classes, device=x.device, dtype=torch.long) if label is None \
                else label.to(x.device).long()
            h = h + self.label_emb(lab)
        h = self.act(h)
        for layer in self.hidden:
            h = self.act(layer(h))
        return self.out(h)


class ExactVelocity(nn.Module):
    """The closed-form marginal velocity E[eps - x0 | x_sigma] of a per-class Gaussian mixture, with the MLP's call
    signature net(x, sigma, label=None). No parameters. The null label (num_classes) and label=None use the
    unconditional mixture (uniform over classes), so CFG with guidance 1 and the unconditional branch are exact.
    Differentiable in x (metrics take Jacobians through it). Output in x's floating dtype (float32 for float32 x).
    """

    def __init__(self, mixtures: Sequence[GaussianMixture]):
        super().__init__()
        self.mixtures = list(mixtures)
        self.num_classes = len(self.mixtures)
        self.null = GaussianMixture.combine(self.mixtures) if self.num_classes > 1 else self.mixtures[0]

    def _mix(self, c: int) -> GaussianMixture:
        return self.null if c >= self.num_classes else self.mixtures[c]

    def forward(self, x: torch.Tensor, sigma, label: torch.Tensor | None = None) -> torch.Tensor:
        x = x if x.is_floating_point() else x.float()
        s = _sigma_vec(sigma, x).to(torch.float64)
        if label is None:
            return self._mix(self.num_classes).to(x.device).velocity(x, s)
        label = label.to(x.device).long()
        out = torch.zeros_like(x)
        for c in torch.unique(label).tolist():
            idx = (label == c).nonzero(as_tuple=True)[0]
            out = out.index_put((idx,), self._mix(c).to(x.device).velocity(x[idx], s[idx]))
        return out


def train_flow_matching(net: nn.Module, dataset: ToyDataset, steps: int = 3000, batch_size: int = 512,
                        lr: float = 2e-3, cond_dropout: float = 0.1, seed: int = 0, log_every: int = 0) -> list[float]:
    """Fit net to dataset by flow matching: minimise E || net(x_sigma, sigma, y) - (eps - x0) ||^2 with
    sigma ~ U[0, 1], x_sigma = (1 - sigma) x0 + sigma eps; labels dropped to the null label with probability
    cond_dropout for class-conditional data (CFG). Adam with cosine decay. Returns the loss of every step."""
    g = torch.Generator().manual_seed(seed)
    dev = next(net.parameters()).device
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=lr * 0.02)
    conditional = dataset.num_classes > 1
    losses = []
    net.train()
    for step in range(steps):
        x0, y = dataset.sample(batch_size, generator=g)
        eps = torch.randn(batch_size, 2, generator=g)
        s = torch.rand(batch_size, generator=g)
        xs = (1 - s[:, None]) * x0 + s[:, None] * eps
        if conditional:
            drop = torch.rand(batch_size, generator=g) < cond_dropout
            y = torch.where(drop, torch.full_like(y, dataset.num_classes), y)
        pred = net(xs.to(dev), s.to(dev), y.to(dev) if conditional else None)
        loss = ((pred - (eps - x0).to(dev)) ** 2).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"  flow matching step {step + 1}/{steps}: loss {sum(losses[-log_every:]) / log_every:.4f}")
    net.eval()
    return losses


class Toy2DBackend(Backend):
    """Backend "toy2d" (see the module docstring). Options (all optional):
    dataset (ring8_rare), teacher ("learned" | "exact"), num_classes (1), device, seed (0), hidden (128),
    depth (3), train_steps (4000), batch_size (1024), lr (3e-3), cond_dropout (0.1), guidance (1.0),
    weights_dir (None), retrain (False), verbose (False). Unknown options are ignored, so that method scripts can
    pass the same options to every backend.
    """

    name = "toy2d"
    media = "points"
    latent_shape = (2,)
    guidance = 1.0
    shift = 1.0

    def __init__(self, dataset: str = DEFAULT_DATASET, teacher: str = "learned", num_classes: int = 1,
                 device: str | torch.device = "cpu", seed: int = 0, hidden: int = 128, depth: int = 3,
                 train_steps: int = 4000, batch_size: int = 1024, lr: float = 3e-3, cond_dropout: float = 0.1,
                 guidance: float = 1.0, weights_dir: str | Path | None = None, retrain: bool = False,
                 verbose: bool = False, dtype: torch.dtype = torch.float32, **_: Any):
        super().__init__(device=device, dtype=torch.float32)
        if teacher not in ("learned", "exact"):
            raise ValueError(f"toy2d teacher must be 'learned' or 'exact', got {teacher!r}")
        self.dataset = get_dataset(dataset, num_classes)
        self.num_classes = self.dataset.num_classes
        self.guidance = float(guidance)
        self.mixture = self.dataset.mixtures
        if teacher == "exact" and self.mixture is None:
            raise ValueError(f"teacher='exact' needs a Gaussian-mixture dataset; {dataset!r} is not one")
        self.exact = ExactVelocity(self.mixture).to(self.device) if self.mixture is not None else None
        self.config = {"dataset": self.dataset.name, "num_classes": self.num_classes, "hidden": int(hidden),
                       "depth": int(depth), "train_steps": int(train_steps), "batch_size": int(batch_size),
                       "lr": float(lr), "cond_dropout": float(cond_dropout) if self.num_classes > 1 else 0.0,
                       "seed": int(seed), "version": TRAIN_VERSION}
        self.network = VelocityMLP(hidden, depth, self.num_classes)
        self.weights_path, self.trained_now = self._load_or_train(weights_dir, retrain, verbose)
        self.network.to(self.device).eval()
        self.teacher = teacher
        self.teacher_net = self.exact if teacher == "exact" else self.network

    # ----- weights ------------------------------------------------------------------------------------------
    def _file_name(self) -> str:
        h = hashlib.sha1(json.dumps(self.config, sort_keys=True).encode()).hexdigest()[:10]
        return f"{self.config['dataset']}_c{self.num_classes}_{h}.safetensors"

    def _load_or_train(self, weights_dir, retrain: bool, verbose: bool) -> tuple[Path, bool]:
        from safetensors.torch import load_file, safe_open, save_file
        fname = self._file_name()
        dirs = [Path(weights_dir)] if weights_dir is not None else [WEIGHTS_DIR, default_cache_dir()]
        if not retrain:
            for d in dirs:
                p = d / fname
                if not p.exists():
                    continue
                with safe_open(str(p), framework="pt") as f:
                    meta = json.loads((f.metadata() or {}).get("config", "{}"))
                if meta == self.config:
                    self.network.load_state_dict(load_file(str(p)))
                    return p, False
        t0 = time.time()
        if verbose:
            print(f"toy2d: training the {self.config['dataset']} teacher ({self.config['train_steps']} steps)")
        torch.manual_seed(self.config["seed"])
        self.network = VelocityMLP(self.config["hidden"], self.config["depth"], self.num_classes)
        train_flow_matching(self.network, self.dataset, self.config["train_steps"], self.config["batch_size"],
                            self.config["lr"], self.config["cond_dropout"], self.config["seed"],
                            log_every=500 if verbose else 0)
        out = dirs[-1] if weights_dir is None else dirs[0]
        out.mkdir(parents=True, exist_ok=True)
        p = out / fname
        save_file({k: v.contiguous() for k, v in self.network.state_dict().items()}, str(p),
                  metadata={"config": json.dumps(self.config, sort_keys=True)})
        if verbose:
            print(f"toy2d: trained in {time.time() - t0:.1f} s, saved {p}")
        return p, True

    # ----- the backend interface ---------------------------------------------------------------------------
    def prompts(self, split: str = "train") -> list[str]:
        """The class names "class 0", "class 1", ... (the same for every split; one class when unconditional)."""
        return self.dataset.class_names

    def encode(self, prompts: Sequence[str] | torch.Tensor) -> Cond:
        """Class names ("class k"; "" is the null label of CFG) or integer labels -> Cond({"label": (B,) long})."""
        if torch.is_tensor(prompts) or (len(prompts) and not isinstance(prompts[0], str)):
            labels = torch.as_tensor(prompts, dtype=torch.long).reshape(-1)
            names = [f"class {int(c)}" for c in labels]
        else:
            names = list(prompts)
            labels = torch.tensor([self._label(p) for p in names], dtype=torch.long)
        if bool(((labels < 0) | (labels > self.num_classes)).any()):
            raise ValueError(f"toy2d labels must lie in [0, {self.num_classes - 1}] ({self.num_classes} = null)")
        return Cond({"label": labels.to(self.device)}, names)

    def _label(self, prompt: str) -> int:
        p = prompt.strip()
        if p == "":
            return self.num_classes if self.num_classes > 1 else 0
        head, _, num = p.partition(" ")
        if head == "class" and num.isdigit() and int(num) < self.num_classes:
            return int(num)
        raise ValueError(f"unknown toy2d prompt {prompt!r}; the prompts are {', '.join(self.prompts())}")

    def velocity(self, net: nn.Module, x: torch.Tensor, sigma, cond: Cond | None = None,
                 guidance: float | None = None) -> torch.Tensor:
        """v(x, sigma | label), float32 (B, 2). sigma: scalar or (B,). Class-conditional data with guidance g != 1
        uses CFG v = v_u + g (v_c - v_u) in one batched pass (null label = num_classes); otherwise g is ignored."""
        x = x.to(self.device)
        B = x.shape[0]
        s = _sigma_vec(sigma, x)
        label = cond["label"] if (cond is not None and "label" in cond) else torch.zeros(B, dtype=torch.long)
        label = label.to(self.device).long()
        if label.shape[0] != B:
            raise ValueError(f"condition has batch {label.shape[0]} but x has {B}")
        g = self.guidance if guidance is None else float(guidance)
        if self.num_classes > 1 and g != 1.0:
            null = torch.full_like(label, self.num_classes)
            v = net(torch.cat([x, x]), torch.cat([s, s]), torch.cat([label, null])).float()
            vc, vu = v[:B], v[B:]
            return vu + g * (vc - vu)
        return net(x, s, label if self.num_classes > 1 else None).float()

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """The identity: rewards see the 2D points themselves."""
        return x

    # ----- toy extras ----------------------------------------------------------------------------------------
    def target(self, label: int = 0) -> GaussianMixture:
        """The exact data law of class `label` (a GaussianMixture); ValueError for non-mixture data."""
        if self.mixture is None:
            raise ValueError(f"dataset {self.dataset.name!r} has no closed-form density")
        return self.mixture[label]

    def sample_data(self, n: int, generator: torch.Generator | None = None, labels=None):
        """n data points (and labels) from the dataset."""
        x, y = self.dataset.sample(n, generator=generator, labels=labels)
        return x.to(self.device), y.to(self.device)
