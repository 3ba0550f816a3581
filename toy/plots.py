"""Pictures for the toy world (matplotlib, Agg backend: no display needed). Each function draws on a given Axes
(ax=None makes a new figure) and returns the Axes; save_figure writes a PNG. Reused by the method scripts and the
demo:

    plot_samples(x, logp=mixture.log_prob, title=...)       samples over the target's density contours
    plot_density(logp)                                     a log-density as a filled contour map
    plot_trajectories(states (B, K+1, 2), logp=...)        paths across sampler steps
    plot_curves(records, keys, x="step")                   reward / KL curves from a list of metric dicts
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

BOUNDS = (-5.0, 5.0, -5.0, 5.0)


def _ax(ax, size=(4.0, 4.0)):
    if ax is None:
        _, ax = plt.subplots(figsize=size)
    return ax


def _grid_logp(logp: Callable, bounds, n: int):
    from toy.metrics import grid_points
    pts, _, (xs, ys) = grid_points(bounds, n)
    with torch.no_grad():
        lp = logp(pts).to(torch.float64).reshape(n, n)
    return xs.numpy(), ys.numpy(), lp.numpy()


def plot_density(logp: Callable, ax=None, bounds=BOUNDS, n: int = 200, title: str | None = None, filled: bool = True,
                 levels: int = 8, cmap: str = "Blues"):
    """Contours of exp(logp) (filled, or lines) on the box; logp: (N, 2) float64 -> (N,)."""
    ax = _ax(ax)
    xs, ys, lp = _grid_logp(logp, bounds, n)
    p = torch.exp(torch.as_tensor(lp)).numpy()
    if filled:
        ax.contourf(xs, ys, p, levels=levels, cmap=cmap)
    else:
        ax.contour(xs, ys, p, levels=levels, cmap=cmap, linewidths=0.7)
    _finish(ax, bounds, title)
    return ax


def plot_samples(x: torch.Tensor, ax=None, logp: Callable | None = None, bounds=BOUNDS, title: str | None = None,
                 color="C3", s: float = 2.0, alpha: float = 0.4, labels: torch.Tensor | None = None, n_grid: int = 150):
    """Scatter samples x (B, 2) over the density contours of logp (when given); labels (B,) colour by class."""
    ax = _ax(ax)
    if logp is not None:
        plot_density(logp, ax=ax, bounds=bounds, n=n_grid, filled=False)
    x = x.detach().float().cpu()
    # One fixed colour per class (C0, C1, ...), whatever the number of classes present.
    c = [f"C{(int(v) + 3) % 10}" for v in labels.tolist()] if labels is not None else color
    ax.scatter(x[:, 0].numpy(), x[:, 1].numpy(), s=s, alpha=alpha, c=c, linewidths=0)
    _finish(ax, bounds, title)
    return ax


def plot_trajectories(states: torch.Tensor, ax=None, logp: Callable | None = None, bounds=BOUNDS,
                      title: str | None = None, max_paths: int = 64, color="C0"):
    """Paths of a sampler: states (B, K+1, 2) from noise (hollow dot) to sample (filled dot)."""
    ax = _ax(ax)
    if logp is not None:
        plot_density(logp, ax=ax, bounds=bounds, filled=False)
    st = states.detach().float().cpu()[:max_paths]
    for path in st:
        ax.plot(path[:, 0].numpy(), path[:, 1].numpy(), "-", color=color, lw=0.6, alpha=0.6)
    ax.scatter(st[:, 0, 0].numpy(), st[:, 0, 1].numpy(), s=8, facecolors="none", edgecolors="0.4", lw=0.5)
    ax.scatter(st[:, -1, 0].numpy(), st[:, -1, 1].numpy(), s=8, c="C3")
    _finish(ax, bounds, title)
    return ax


def plot_curves(records: Sequence[Mapping], keys: Sequence[str] | str, x: str = "step", ax=None,
                title: str | None = None, labels: Sequence[str] | None = None, logy: bool = False):
    """Curves of metric dicts: one line per key, records[i][x] on the horizontal axis (the index when missing);
    records lacking a key are skipped for that key. Returns the Axes."""
    ax = _ax(ax, (5.0, 3.5))
    keys = [keys] if isinstance(keys, str) else list(keys)
    for i, k in enumerate(keys):
        pts = [(r.get(x, j), r[k]) for j, r in enumerate(records) if k in r and r[k] is not None]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, "-o" if len(pts) < 30 else "-", ms=3, label=labels[i] if labels else k)
    ax.set_xlabel(x)
    if logy:
        ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=9)
    return ax


def _finish(ax, bounds, title):
    ax.set_xlim(bounds[0], bounds[1])
    ax.set_ylim(bounds[2], bounds[3])
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)


def grid_figure(n: int, cols: int = 4, size: float = 3.0):
    """A figure with n square panels on a grid; returns (fig, list of n Axes)."""
    rows = (n + cols - 1) // cols
    cols = min(cols, n)
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows), squeeze=False)
    flat = list(axes.reshape(-1))
    for ax in flat[n:]:
        ax.axis("off")
    return fig, flat[:n]


def save_figure(fig_or_ax, path: str | Path, dpi: int = 110) -> Path:
    """Write a PNG (parent folders created) and close the figure."""
    fig = fig_or_ax.figure if hasattr(fig_or_ax, "figure") and not hasattr(fig_or_ax, "savefig") else fig_or_ax
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
