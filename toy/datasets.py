"""2D toy datasets, optionally with class labels as a stand-in for prompts (one distribution per class).

Gaussian-mixture datasets carry their exact per-class mixtures (toy.mixture.GaussianMixture), so that every
density, velocity and tilted target is known in closed form; the others (moons, checkerboard, rings) are for
learned teachers only.

Classes: every dataset is built from P "parts" (mixture components, the two moons, the dark checkerboard cells,
the rings); with num_classes = C, class c owns the parts p with p mod C == c. Class priors are uniform, so the
unconditional law of a class-conditional dataset is GaussianMixture.combine(mixtures) (uniform over classes),
which for C = 1 is the dataset itself.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from toy.mixture import GaussianMixture

DEFAULT_DATASET = "ring8_rare"


@dataclass
class ToyDataset:
    """A 2D dataset. `part_sampler(n, parts (n,) long, generator) -> (n, 2)` draws points of the given parts.

    name, num_classes; parts: number of parts P; part_weights (P,) (within a class, parts are drawn in proportion);
    mixture: the whole dataset as one GaussianMixture (None for non-Gaussian data); centres (P, 2): a
    representative point of each part (mode centres for the mixtures; used by mode-mass metrics and rewards).
    """
    name: str
    num_classes: int
    parts: int
    part_weights: torch.Tensor
    part_sampler: Callable
    mixture: GaussianMixture | None = None
    centres: torch.Tensor | None = None
    description: str = ""
    extras: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.num_classes < 1 or self.num_classes > self.parts:
            raise ValueError(f"dataset {self.name!r} has {self.parts} parts: num_classes must be in [1, {self.parts}],"
                             f" got {self.num_classes}")

    @property
    def class_names(self) -> list[str]:
        return [f"class {c}" for c in range(self.num_classes)]

    def class_parts(self, c: int) -> torch.Tensor:
        """Indices of the parts that class c owns (p mod C == c)."""
        return torch.arange(c, self.parts, self.num_classes)

    @property
    def mixtures(self) -> list[GaussianMixture] | None:
        """One GaussianMixture per class (the class's components, renormalised); None for non-Gaussian data."""
        if self.mixture is None:
            return None
        out = []
        for c in range(self.num_classes):
            idx = self.class_parts(c)
            m = self.mixture
            out.append(GaussianMixture(m.weights[idx], m.means[idx], m.covs[idx]))
        return out

    def sample(self, n: int, generator: torch.Generator | None = None, labels: torch.Tensor | None = None):
        """(x (n, 2) float32, labels (n,) long). labels: the classes to draw (uniform over classes when None)."""
        if labels is None:
            labels = torch.randint(0, self.num_classes, (n,), generator=generator)
        labels = torch.as_tensor(labels, dtype=torch.long).cpu()
        parts = torch.empty(n, dtype=torch.long)
        for c in range(self.num_classes):
            sel = (labels == c).nonzero(as_tuple=True)[0]
            if len(sel):
                idx = self.class_parts(c)
                pick = torch.multinomial(self.part_weights[idx].double(), len(sel), replacement=True,
                                         generator=generator)
                parts[sel] = idx[pick]
        return self.part_sampler(n, parts, generator).float(), labels

    def sample_parts(self, n: int, generator: torch.Generator | None = None):
        """(x (n, 2), part index (n,)) from the whole dataset (parts in proportion to part_weights)."""
        parts = torch.multinomial(self.part_weights.double(), n, replacement=True, generator=generator)
        return self.part_sampler(n, parts, generator).float(), parts


# ----- Gaussian mixtures -------------------------------------------------------------------------------------
def mixture_dataset(name: str, mix: GaussianMixture, num_classes: int = 1, description: str = "") -> ToyDataset:
    """A ToyDataset drawing from any GaussianMixture (component k is part k; class c owns k mod C == c)."""
    L = torch.linalg.cholesky(mix.covs)

    def sampler(n, parts, generator):
        z = torch.randn(n, 2, generator=generator, dtype=torch.float64)
        return mix.means[parts] + (L[parts] @ z[..., None])[..., 0]

    return ToyDataset(name, num_classes, mix.num_components, mix.weights.clone(), sampler, mix,
                      mix.means.float().clone(), description)


def ring_mixture(k: int = 8, radius: float = 3.0, std=0.25, weights=None) -> GaussianMixture:
    """k isotropic modes at angles 2 pi j / k on a circle; mode 0 sits at (radius, 0)."""
    ang = torch.arange(k, dtype=torch.float64) * 2 * math.pi / k
    means = radius * torch.stack([torch.cos(ang), torch.sin(ang)], -1)
    return GaussianMixture.isotropic(torch.ones(k) if weights is None else weights, means, std)


def ring8_rare_mixture() -> GaussianMixture:
    """The default: 8 modes on a ring of radius 3. Mode 0 at (3, 0) is rare (weight 0.05) and broad (std 0.5); the
    seven others share the remaining mass with std 0.2. The default rewards (toy.rewards) peak towards mode 0, so the
    reward optimum lies away from the bulk, and landing in mode 0 costs closeness to a centre (the OTCA conflict)."""
    w = torch.full((8,), 0.95 / 7, dtype=torch.float64)
    w[0] = 0.05
    std = torch.full((8,), 0.2, dtype=torch.float64)
    std[0] = 0.5
    return ring_mixture(8, 3.0, std, w)


def blobs4_mixture() -> GaussianMixture:
    """Four anisotropic modes of unequal weight (full covariances exercise the general closed forms)."""
    means = torch.tensor([[-2.0, -1.5], [2.0, -1.0], [0.0, 2.5], [2.5, 2.0]], dtype=torch.float64)
    w = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)

    def cov(sx, sy, rho):
        return [[sx * sx, rho * sx * sy], [rho * sx * sy, sy * sy]]
    covs = torch.tensor([cov(0.6, 0.3, 0.5), cov(0.3, 0.7, -0.6), cov(0.8, 0.25, 0.0), cov(0.3, 0.3, 0.2)],
                        dtype=torch.float64)
    return GaussianMixture(w, means, covs)


# ----- non-Gaussian data ---------------------------------------------------------------------------------------
def _moons(num_classes):
    def sampler(n, parts, generator):
        t = torch.rand(n, generator=generator, dtype=torch.float64) * math.pi
        up = torch.stack([torch.cos(t), torch.sin(t)], -1)
        down = torch.stack([1 - torch.cos(t), 0.5 - torch.sin(t)], -1)
        x = torch.where((parts == 0)[:, None], up, down)
        x = (x - torch.tensor([0.5, 0.25], dtype=torch.float64)) * 2.0  # centre and scale to about [-3, 3]
        return x + 0.1 * torch.randn(n, 2, generator=generator, dtype=torch.float64)
    centres = (torch.tensor([[0.0, 0.8], [1.0, -0.3]]) - torch.tensor([0.5, 0.25])) * 2.0
    return ToyDataset("moons", num_classes, 2, torch.ones(2), sampler, None, centres, "two interleaved half circles")


def _checkerboard(num_classes):
    # A 4 x 4 board on [-4, 4]^2; the 8 dark cells are the parts.
    cells = torch.tensor([(i, j) for i in range(4) for j in range(4) if (i + j) % 2 == 0], dtype=torch.float64)

    def sampler(n, parts, generator):
        u = torch.rand(n, 2, generator=generator, dtype=torch.float64)
        return (cells[parts] + u) * 2.0 - 4.0
    centres = ((cells + 0.5) * 2.0 - 4.0).float()
    return ToyDataset("checkerboard", num_classes, 8, torch.ones(8), sampler, None, centres,
                      "uniform on the 8 dark cells of a 4 x 4 board on [-4, 4]^2")


def _rings(num_classes):
    radii = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)

    def sampler(n, parts, generator):
        t = torch.rand(n, generator=generator, dtype=torch.float64) * 2 * math.pi
        r = radii[parts] + 0.08 * torch.randn(n, generator=generator, dtype=torch.float64)
        return torch.stack([r * torch.cos(t), r * torch.sin(t)], -1)
    centres = torch.stack([radii, torch.zeros(3, dtype=torch.float64)], -1).float()
    # Mass proportional to circumference, so that the density along each ring is the same.
    return ToyDataset("rings", num_classes, 3, radii.clone(), sampler, None, centres, "three concentric rings")


DATASETS = {
    "ring8_rare": lambda C: mixture_dataset("ring8_rare", ring8_rare_mixture(), C,
                                             "8 modes on a ring, mode 0 rare (5%) and broad"),
    "ring8": lambda C: mixture_dataset("ring8", ring_mixture(8, 3.0, 0.25), C, "8 equal modes on a ring"),
    "blobs4": lambda C: mixture_dataset("blobs4", blobs4_mixture(), C, "4 anisotropic modes of unequal weight"),
    "moons": _moons,
    "checkerboard": _checkerboard,
    "rings": _rings,
}


def get_dataset(name: str = DEFAULT_DATASET, num_classes: int = 1) -> ToyDataset:
    """Build a dataset by name (ValueError naming the choices for an unknown one)."""
    if name not in DATASETS:
        raise ValueError(f"unknown toy dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[name](int(num_classes))
