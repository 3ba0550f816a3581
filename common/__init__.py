"""Shared maths and infrastructure for rats.py, otca.py and rtdmd.py.

Maths (small pure functions, each property-tested):
  flow.py        schedules, conversions, Euler / SDE steps, transition log-probabilities, rollouts
  rl.py          GRPO: group advantages, clipped surrogate, same-covariance Gaussian KL
  shaping.py     RATS: reward-aware gate, sigma-aligned horizon matching, shaping distance
  credit.py      OTCA: trajectory credit decomposition (TCD), multi-objective min-norm allocation (MOCA)
  dmd.py         RTDMD: ambient kernel and fake-score target, consistency regulariser, DMD loss, SubGRPO
Models and rewards:
  backend.py     the backend interface every model family implements, and the --teacher registry
  backends/      FLUX.1, Wan 2.1/2.2, SD3/3.5, FLUX.2 adapters on diffusers (LoRA, tiny twins)
  dit.py         the small DiT and its backend
  tokenizers.py  in-memory tokenizers for offline tiny models
  rewards.py     reward interface, --reward parsing; reward_models.py: HPSv2.1, PickScore, CLIP, aesthetic, ImageReward
Infrastructure:
  config.py      dataclass config + flags + presets, user errors -> one line, exit 2
  runs.py        run directories, metrics, atomic checkpoints, exact resume, guards
  train.py       EMA, optimizer, gradient clipping, autocast, seeding
  dist.py        torchrun, DDP, FSDP2, gathers
  evaluate.py    one evaluation path and its tables; prompts.py: prompt sets
"""
