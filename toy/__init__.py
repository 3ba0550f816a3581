"""The toy 2D world: Gaussian mixtures with exact densities, velocities and reward tilts (toy.mixture), datasets
(toy.datasets), toy rewards (toy.rewards), the toy2d backend (toy.backend), metrics with exact sampler densities
(toy.metrics), rtdmd.py's evaluation against the teacher and the tilted target (toy.evaluate) and pictures
(toy.plots). `python -m toy --out DIR` draws the datasets, tilted targets and few-step gaps. Importing the package
imports nothing heavy; import the submodules you need."""
