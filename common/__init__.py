"""Shared maths and infrastructure for rats.py, otca.py and rtdmd.py.

flow.py      flow-matching schedules, conversions, Euler/SDE steps, log-probabilities, rollouts
rl.py        GRPO maths: group advantages, clipped surrogate, same-covariance Gaussian KL
backend.py   the backend interface every model family implements, and the --teacher registry
"""
