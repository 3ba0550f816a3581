"""Instrumented runs of rats.py / otca.py / rtdmd.py: time, network evaluations and memory per training step.

One measurement = one call of a script's main(cfg) with the config its own parser builds from `argv`, while:
  * common.backend.get_backend is wrapped (in common.backend and in the script's namespace) so that the backend
    object is captured, its velocity() is wrapped per instance (every network call recorded: role, grad mode,
    batch size, inputs) and a forward hook is put on its network (and its teacher_net: the toy's exact teacher, a
    teacher checkpoint loaded beside the generator) so that network forwards that do not go through velocity()
    would show up as a mismatch (`unaccounted_forwards`);
  * common.runs.Run.log is wrapped to mark the step boundaries (every script calls run.log once per training step);
  * the script's evaluation functions are wrapped so that their network calls and their time are set apart
    (an evaluation inside a step, e.g. --eval-every or RTDMD's periodic toy KL, is not training cost).

Definitions (also in benchmarks/README.md):
  step time       metrics.jsonl's step_time (time between consecutive run.log calls) minus the time spent inside
                  the wrapped evaluation functions during that step and minus the instruments' own recording time
                  (cloning each call's inputs for the replay); the first step (which also pays for the
                  initial evaluation and lazy initialisation) is excluded from the medians.
  NFE per step    network calls per (role, with_grad) between two run.log calls, evaluation excluded. A "call" is one
                  velocity() call on a batch; "sample evaluations" weight each call by its batch size.
  roles           the network's nfe_role attribute when the script sets one (RATS: student/teacher); otherwise the
                  backend's base network is "student" (the trained generator), a network with trainable parameters is
                  "fake" (RTDMD's fake score) and a frozen one is "teacher".
  overhead ratio  step time / replay time, where the replay re-issues the same step's recorded network calls (same
                  networks, inputs, sigmas, conditions, grad and autocast mode; inputs requiring grad where they did)
                  back to back and runs one backward (cotangent ones) for each call made with gradients. Each step is
                  replayed right after it ran (before the next step; paired, so that both see the same state of a
                  shared machine; RNG states restored, replay time not counted in the next step), the fastest of
                  `replays` repeats kept; the ratio is the median, over the last `replay_steps` steps of the phase,
                  of each step's time over its own replay.
                  It is what the loop around the network costs: rollout arithmetic, rewards, losses, optimizer, EMA,
                  logging. A ratio near 1 means the step is all network.
  loop overhead   step time / (replay time + the step's prompt encodings, decodes and reward calls replayed, with
                  their backward where they ran with gradients): the cost of the loop alone, every network of the step
                  (text encoders, VAE decoder, reward models) set apart.
  peak memory     peak resident set size of the process (ru_maxrss) on CPU, CUDA max_memory_allocated on a GPU, read
                  from metrics.jsonl; meaningful per case only when each case runs in its own process (the CLI does).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import importlib
import json
import os
import statistics
import sys
import tempfile
import time
import types
from dataclasses import dataclass, field
from typing import Any

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

METHODS = ("rats", "otca", "rtdmd")
# Functions of each script whose network calls and time are evaluation, not training.
EVAL_FUNCTIONS = {"rats": ("evaluate", "point_metrics", "final_eval"), "otca": ("evaluate",),
                  "rtdmd": ("toy_eval",)}


@dataclass
class Call:
    """One recorded velocity() call. x, sigma: detached CPU-side copies kept only for the replay."""
    role: str
    grad: bool
    batch: int
    step: int                 # index of the training step it belongs to (1-based), 0 = before step 1
    eval: bool
    net: Any = None
    x: torch.Tensor | None = None
    x_requires_grad: bool = False
    sigma: Any = None
    cond: Any = None
    guidance: Any = None
    autocast: tuple | None = None   # (device type, dtype) when the call ran under autocast: replayed under it too
    forwards: int = 1               # network forwards the call should run (backend.forwards_per_call: Wan 2.2's
                                    # experts, one each for the rows they take)


def _autocast_state(x) -> tuple | None:
    dev = x.device.type if isinstance(x, torch.Tensor) else "cpu"
    return (dev, torch.get_autocast_dtype(dev)) if torch.is_autocast_enabled(dev) else None


def _autocast(state: tuple | None):
    return torch.autocast(state[0], dtype=state[1]) if state else contextlib.nullcontext()


@dataclass
class Recorder:
    backend: Any = None
    step: int = 0
    eval_depth: int = 0
    ref_depth: int = 0        # inside backend.reference(): LoRA families yield the same module, adapter disabled
    eval_time: collections.Counter = field(default_factory=collections.Counter)   # step -> seconds in eval
    forwards: collections.Counter = field(default_factory=collections.Counter)    # step -> network forwards
    forwards_eval: collections.Counter = field(default_factory=collections.Counter)
    keep_inputs: bool = True
    backend_options: dict = field(default_factory=dict)
    decode_time: collections.Counter = field(default_factory=collections.Counter)  # step -> s in decode (training)
    reward_time: collections.Counter = field(default_factory=collections.Counter)  # step -> s in reward forwards
    # step -> [(fn, args, grad, input requires grad)]: the decode and reward forwards of training, for their replay
    aux_calls: collections.defaultdict = field(default_factory=lambda: collections.defaultdict(list))
    # step -> seconds the instruments themselves spent recording (cloning inputs for the replay): not the loop's cost
    instr_time: collections.Counter = field(default_factory=collections.Counter)
    # paired replays: right after each step, before the next one, so that the step and its replay see the same
    # machine (a neighbour's burst slows both); step -> fastest replay of its network calls / of its other networks
    paired: bool = True
    replays: int = 3
    step_calls: collections.defaultdict = field(default_factory=lambda: collections.defaultdict(list))  # step ->
    # every velocity() call recorded in it (evaluation calls included, marked Call.eval)
    net_replay: dict = field(default_factory=dict)
    aux_replay: dict = field(default_factory=dict)
    replay_time: collections.Counter = field(default_factory=collections.Counter)  # step -> s of paired replays in it
    replaying: bool = False   # the forward hook does not count the replay's forwards

    def replay_step(self, s: int) -> None:
        """Replay step s's recorded calls now (fastest of `replays`), then drop their inputs. The global RNG states
        are put back, so the run continues exactly as it would have; the replay's own time is charged to the
        instruments (subtracted from the next step's time)."""
        calls = [c for c in self.step_calls.get(s, []) if not c.eval and c.x is not None]
        if not calls or self.backend is None:
            return
        t0 = time.perf_counter()
        rng = torch.get_rng_state(), (torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
        self.replaying = True
        try:
            self.net_replay[s] = min(replay_seconds(self.backend, calls) for _ in range(max(1, self.replays)))
            if self.aux_calls.get(s):
                self.aux_replay[s] = min(replay_aux_seconds(self.aux_calls[s]) for _ in range(max(1, self.replays)))
        finally:
            self.replaying = False
        torch.set_rng_state(rng[0])
        if rng[1] is not None:
            torch.cuda.set_rng_state_all(rng[1])
        for c in calls:            # the inputs were kept for this replay only
            c.x = c.sigma = c.cond = None
        self.aux_calls.pop(s, None)
        self.replay_time[s + 1] += time.perf_counter() - t0     # inside the next step's step_time: taken out

    def keep_aux(self, fn, args: tuple, grad: bool) -> None:
        """Record a decode / reward call (tensors cloned) so that the replay can re-run it with its backward."""
        if self.keep_inputs and self.eval_depth == 0:
            t0 = time.perf_counter()
            first = args[0]
            args = tuple(list(a) if isinstance(a, (list, tuple)) else a for a in args)  # prompts: a private copy
            req = bool(grad and isinstance(first, torch.Tensor) and first.requires_grad)
            self.aux_calls[self.step + 1].append((fn, tuple(_clone(a) for a in args), grad, req,
                                                  _autocast_state(first)))
            self.instr_time[self.step + 1] += time.perf_counter() - t0

    def role(self, net) -> str:
        explicit = getattr(net, "nfe_role", None)
        if self.ref_depth > 0 and explicit in (None, "student"):   # a role set inside reference() wins (RTDMD's
            return "reference"                                       # teacher with --fake-copy adapter)
        b = self.backend
        if explicit is not None and net is not getattr(b, "network", None):
            return str(explicit)
        if net is getattr(b, "network", None):
            return str(explicit or "student")
        if net is getattr(b, "reference_net", None):
            return "reference"
        if any(p.requires_grad for p in net.parameters()):
            return "fake"
        return "teacher"


def _clone(v):
    if isinstance(v, torch.Tensor):
        return v.detach().clone()
    return v


def _instrument_backend(backend, rec: Recorder) -> None:
    """Wrap this backend instance's velocity() (the class one, already NFE-counted, stays underneath) and hook the
    forward of its networks."""
    rec.backend = backend
    inner = type(backend).velocity   # the counted class method: backend.nfe keeps working

    def velocity(self, net, x, sigma, cond=None, guidance=None, *args, **kwargs):
        t0 = time.perf_counter()
        grad = torch.is_grad_enabled()
        c = Call(role=rec.role(net), grad=grad, batch=int(x.shape[0]), step=rec.step + 1, eval=rec.eval_depth > 0,
                 forwards=backend.forwards_per_call(net, sigma))
        if rec.keep_inputs and not c.eval:
            c.net, c.x, c.x_requires_grad = net, _clone(x), bool(x.requires_grad and grad)
            c.sigma, c.cond, c.guidance = _clone(sigma), cond, guidance
            c.autocast = _autocast_state(x)
        rec.step_calls[c.step].append(c)
        if not c.eval:
            rec.instr_time[c.step] += time.perf_counter() - t0
        return inner(self, net, x, sigma, cond, guidance, *args, **kwargs)

    backend.velocity = types.MethodType(velocity, backend)
    inner_decode = backend.decode   # bound; decode's backward (reward gradients) stays inside the step's backward

    def decode(x, *args, **kwargs):
        rec.keep_aux(inner_decode, (x, *args), torch.is_grad_enabled())
        t0 = time.perf_counter()
        try:
            return inner_decode(x, *args, **kwargs)
        finally:
            if rec.eval_depth == 0:
                rec.decode_time[rec.step + 1] += time.perf_counter() - t0

    backend.decode = decode
    inner_encode = backend.encode

    def encode(prompts, *args, **kwargs):
        rec.keep_aux(inner_encode, (prompts, *args), torch.is_grad_enabled())
        return inner_encode(prompts, *args, **kwargs)

    if backend.media != "points":   # text encoders are networks; the toy's encode is a label lookup (loop cost)
        backend.encode = encode
    inner_reference = backend.reference

    @contextlib.contextmanager
    def reference(net):
        rec.ref_depth += 1
        try:
            with inner_reference(net) as ref:
                yield ref
        finally:
            rec.ref_depth -= 1

    backend.reference = reference

    def hook(module, inputs, output):
        if rec.replaying:
            return
        (rec.forwards_eval if rec.eval_depth > 0 else rec.forwards)[rec.step + 1] += 1

    seen = set()
    for net in (getattr(backend, "network", None), getattr(backend, "teacher_net", None),
                getattr(backend, "exact", None)):
        if isinstance(net, torch.nn.Module) and id(net) not in seen:
            seen.add(id(net))
            # deepcopies of the network (EMA teacher, fake score) inherit the hook: every forward is counted; a
            # container of experts (Wan 2.2) is never called itself, its experts are
            for m in getattr(net, "experts", None) or [net]:
                m.register_forward_hook(hook)


def _time_module(reward, rec: Recorder) -> None:
    """Time every training-time reward evaluation per step: the instance's score() is wrapped (Reward.__call__
    calls self.score; the forward only, its backward is part of the step's backward)."""
    inner = getattr(reward, "score", None)
    if inner is None:
        return

    def score(*a, **k):
        rec.keep_aux(inner, a, torch.is_grad_enabled())
        t0 = time.perf_counter()
        try:
            return inner(*a, **k)
        finally:
            if rec.eval_depth == 0:
                rec.reward_time[rec.step + 1] += time.perf_counter() - t0

    reward.score = score


@contextlib.contextmanager
def instrumented(method: str, rec: Recorder):
    """Patch get_backend, Run.log and the script's evaluation functions for the duration of the block."""
    import common.backend as cb
    import common.runs as cr
    mod = importlib.import_module(method)
    saved = []

    def patch(obj, name, value):
        saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    orig_get = cb.get_backend

    def get_backend(name, **options):
        options.update(rec.backend_options)
        b = orig_get(name, **options)
        _instrument_backend(b, rec)
        return b

    patch(cb, "get_backend", get_backend)
    import common.rewards as crw
    orig_build = crw.build_reward

    def build_reward(*a, **k):
        reward = orig_build(*a, **k)
        _time_module(reward, rec)
        return reward

    patch(crw, "build_reward", build_reward)
    if hasattr(mod, "build_reward"):
        patch(mod, "build_reward", build_reward)
    if hasattr(mod, "get_backend"):
        patch(mod, "get_backend", get_backend)
    orig_log = cr.Run.log

    def log(self, step, **metrics):
        out = orig_log(self, step, **metrics)
        rec.step += 1
        if rec.paired:
            rec.replay_step(rec.step)
        return out

    patch(cr.Run, "log", log)
    for fname in EVAL_FUNCTIONS[method]:
        fn = getattr(mod, fname)

        def wrapped(*a, __fn=fn, **k):
            rec.eval_depth += 1
            t0 = time.perf_counter()
            try:
                return __fn(*a, **k)
            finally:
                rec.eval_depth -= 1
                if rec.eval_depth == 0:
                    rec.eval_time[rec.step + 1] += time.perf_counter() - t0
        patch(mod, fname, wrapped)
    try:
        yield mod
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)


# ------------------------------------------------------------------------------------------------------------
# Expected network calls per step (the formulas the README states; checked against the counts)
# ------------------------------------------------------------------------------------------------------------
def expected_calls(method: str, cfg, row: dict, chunks: int = 1) -> collections.Counter:
    """{(role, with_grad): calls} that the method's algorithm needs for the training step logged as `row`.

    RATS:  per micro-batch K student calls with grad (the first K - k without with --reward-grad-steps k) and N
           teacher calls without; x grad_accum.
    OTCA:  K rollout calls per forward chunk without grad; n recomputations with grad per chunk and inner epoch, each
           row at its own j-th trained step (n = K - 1 at train_fraction 1, else max(1, round(train_fraction (K - 1)))).
           With --reuse-rollout-graph (1 inner epoch, 1 minibatch): K rollout calls per chunk, the K - 1 stochastic
           ones with grad and the last without, and no recomputation.
    RTDMD: stage 1: k_fake generator calls without grad (random stop), 1 fake call with grad (+1 with --gamma > 0:
           the two consistency hop samples in one batched call); on a generator turn also k_gen - 1 generator calls
           without grad, 1 with grad, 1 teacher and 1 fake call without grad. Stage 2: the K rollout calls are the
           loss's own: with --dmd-through last the |S| trained SubGRPO steps and the deterministic last step with
           grad (inputs detached), the K - |S| - 1 others without; with --dmd-through all all K with grad (the chain)
           plus 1 batched call with grad at the fixed inputs of those |S| + 1 steps ((|S| + 1) B samples);
           fake_updates2 x (1 + [gamma2 > 0]) fake calls with grad (--gamma2, or --gamma when not given), 1 teacher
           and 1 fake call without grad.
    """
    e = collections.Counter()
    if method == "rats":
        K, N, A = cfg.nfe, cfg.teacher_nfe, cfg.grad_accum
        kg = cfg.reward_grad_steps or K
        e[("student", True)] += A * kg
        if K - kg:
            e[("student", False)] += A * (K - kg)
        e[("teacher", False)] += A * N
    elif method == "otca":
        K = cfg.nfe
        # otca.reuses_rollout_graph: the rollout's stochastic steps keep their graphs, nothing is recomputed
        reuse = getattr(cfg, "reuse_rollout_graph", False) and cfg.inner_epochs == 1 and cfg.minibatches == 1
        f = getattr(cfg, "train_fraction", 1.0)
        n = K - 1 if f >= 1 or reuse else max(1, int(round(f * (K - 1))))   # trained steps per sample
        if reuse:
            e[("student", True)] += chunks * (K - 1)
            e[("student", False)] += chunks
        else:
            e[("student", False)] += chunks * K
            e[("student", True)] += cfg.inner_epochs * chunks * n
        if cfg.beta_kl > 0:
            e[("reference", False)] += cfg.inner_epochs * chunks * n
    elif method == "rtdmd":
        # common.dmd.consistency_loss: its two samples in one batched call; in stage 2 at weight --gamma2 if given
        gamma = cfg.gamma if row.get("stage") == 1 or getattr(cfg, "gamma2", None) is None else cfg.gamma2
        cons = 1 if gamma > 0 else 0
        if row.get("stage") == 1:
            e[("student", False)] += int(row["k_fake"])
            e[("fake", True)] += 1 + cons
            if "k_gen" in row:
                e[("student", False)] += int(row["k_gen"]) - 1
                e[("student", True)] += 1
                e[("teacher", False)] += 1
                e[("fake", False)] += 1
        else:
            K, S = len(cfg.timesteps), cfg.sub_steps
            e[("fake", True)] += cfg.fake_updates2 * (1 + cons)
            if cfg.dmd_through == "all":
                # the rollout in the graph (the DMD sample through the chain), then one batched call at the fixed
                # inputs of the trained SubGRPO steps and the deterministic last step (policy gradient, back-prop)
                e[("student", True)] += K + 1
            else:
                # the rollout alone: the trained steps and the last step with grad (inputs detached), others without
                e[("student", True)] += S + 1
                e[("student", False)] += K - S - 1
            e[("teacher", False)] += 1
            e[("fake", False)] += 1
    return collections.Counter({k: v for k, v in e.items() if v})


def samples_per_step(method: str, cfg, row: dict) -> int:
    """Training samples generated per step: RATS B x grad_accum (student samples; the teacher's are paired with
    them), OTCA G x prompts_per_step, RTDMD stage 1 the batch (twice on a generator turn), stage 2 groups x G."""
    if method == "rats":
        return cfg.batch_size * cfg.grad_accum
    if method == "otca":
        return cfg.group_size * cfg.prompts_per_step
    if row.get("stage") == 1:
        return cfg.batch * (2 if "k_gen" in row else 1)
    return cfg.groups * cfg.group_size


# ------------------------------------------------------------------------------------------------------------
# Replay: the same network calls alone
# ------------------------------------------------------------------------------------------------------------
def replay_seconds(backend, calls: list[Call]) -> float:
    """Time to re-issue `calls` (one training step's network calls) back to back, with one backward per grad call.

    The class velocity() is used directly (the instance wrapper would record again); gradients that the replay
    accumulates in the parameters are cleared afterwards (outside the timed region)."""
    velocity = type(backend).velocity
    nets = {id(c.net): c.net for c in calls}
    t0 = time.perf_counter()
    for c in calls:
        with torch.set_grad_enabled(c.grad), _autocast(c.autocast):
            x = c.x.clone()
            if c.x_requires_grad:
                x.requires_grad_(True)
            v = velocity(backend, c.net, x, c.sigma, c.cond, c.guidance)
            if c.grad and v.requires_grad:
                v.backward(torch.ones_like(v))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    for net in nets.values():
        for p in net.parameters():
            p.grad = None
    return dt


def replay_aux_seconds(aux: list) -> float:
    """Time to re-run one step's prompt encodings, decodes and reward forwards (recorded by Recorder.keep_aux), each
    followed by its backward (cotangent ones) when it ran with gradients and its input required them (RATS, RTDMD's
    reward back-propagation): the other networks of the step, which the loop itself does not own."""
    t0 = time.perf_counter()
    for fn, args, grad, req, ac in aux:
        with torch.set_grad_enabled(grad), _autocast(ac):
            a = [x.clone() if isinstance(x, torch.Tensor) else x for x in args]
            if req:
                a[0].requires_grad_(True)
            out = fn(*a)
            if req and isinstance(out, torch.Tensor) and out.requires_grad:
                out.backward(torch.ones_like(out))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------------------
# One measurement
# ------------------------------------------------------------------------------------------------------------
def _phase(method: str, row: dict) -> str:
    return f"stage{row['stage']}" if method == "rtdmd" and "stage" in row else "train"


def measure(method: str, argv: list[str], backend_options: dict | None = None, replays: int = 3,
            replay_steps: int = 5, threads: int = 1, out: str | None = None, paired: bool = True) -> dict:
    """Run `method`'s main on `argv` (its own flags; --out is set to a temporary directory unless `out`) under the
    instruments, and return one record per phase (RTDMD: stage1 / stage2; the others: train):

    {method, argv, phase, steps, step_time_s (median over steps 2..), step_times_s, nfe_calls {role/grad: calls per
    step, mean}, nfe_samples {role/grad: sample evaluations per step, mean}, nfe_expected (same keys, mean of the
    formula), nfe_match (every step's counts equal the formula), unaccounted_forwards, eval_calls,
    samples_per_s, peak_mem_mb, rss_before_mb, replay_s, overhead_ratio, wall_s}."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    from common.config import parse_config
    from common.runs import peak_memory_mb
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(threads)
    rec = Recorder(replays=replays, paired=paired)
    rec.backend_options = dict(backend_options or {})
    tmp = None
    if out is None:
        tmp = tempfile.TemporaryDirectory(prefix=f"bench-{method}-")
        out = tmp.name
    rss0 = peak_memory_mb()
    saved_threads = os.environ.get("RATS_THREADS")
    os.environ["RATS_THREADS"] = str(threads)
    grad_state = torch.is_grad_enabled()
    try:
        with instrumented(method, rec) as mod:
            cfg = parse_config(mod.Config, argv=[*argv, "--out", os.path.join(out, "run")], presets=mod.PRESETS,
                               checks=[mod.checks] if hasattr(mod, "checks") else ())
            t0 = time.perf_counter()
            mod.main(cfg)
            wall = time.perf_counter() - t0
            with open(os.path.join(out, "run", "metrics.jsonl")) as fh:
                rows = [json.loads(ln) for ln in fh if ln.strip()]
            records = _summarise(method, argv, cfg, rows, rec, replays, replay_steps, wall, rss0)
    finally:
        torch.set_grad_enabled(grad_state)
        if saved_threads is None:
            os.environ.pop("RATS_THREADS", None)
        else:
            os.environ["RATS_THREADS"] = saved_threads
        if tmp is not None:
            tmp.cleanup()
    for r in records:
        r["peak_mem_mb_final"] = round(peak_memory_mb(), 1)
    return records


def _key(k) -> str:
    return f"{k[0]}/{'grad' if k[1] else 'nograd'}"


def _summarise(method, argv, cfg, rows, rec: Recorder, replays, replay_steps, wall, rss0) -> list[dict]:
    by_step = rec.step_calls    # step -> its recorded calls
    otca_chunks = 1
    if method == "otca":
        mb = cfg.micro_batch or cfg.group_size * cfg.prompts_per_step
        per_mb = [len(g) * cfg.group_size for g in torch.arange(cfg.prompts_per_step).chunk(cfg.minibatches)]
        otca_chunks = sum(-(-n // min(mb, n)) for n in per_mb)
    phases = collections.OrderedDict()
    for row in rows:
        phases.setdefault(_phase(method, row), []).append(row)
    out = []
    for phase, prow in phases.items():
        steps = [int(r["step"]) for r in prow]
        calls_n, samples_n, expect_n = collections.Counter(), collections.Counter(), collections.Counter()
        match, times, eval_calls, unacc = True, [], 0, 0
        for r in prow:
            s = int(r["step"])
            train = [c for c in by_step.get(s, []) if not c.eval]
            eval_calls += sum(1 for c in by_step.get(s, []) if c.eval)
            got = collections.Counter((c.role, c.grad) for c in train)
            exp = expected_calls(method, cfg, r, otca_chunks)
            match &= got == exp
            for c in train:
                calls_n[_key((c.role, c.grad))] += 1
                samples_n[_key((c.role, c.grad))] += c.batch
            for k, v in exp.items():
                expect_n[_key(k)] += v
            unacc += rec.forwards[s] - sum(c.forwards for c in train)
            times.append(float(r["step_time"]) - rec.eval_time.get(s, 0.0) - rec.instr_time.get(s, 0.0)
                         - rec.replay_time.get(s, 0.0))
        n = len(prow)
        timed = times[1:] if n > 1 else times
        t_step = statistics.median(timed)
        # replay the last `replay_steps` steps of the phase (the warm ones), compare with the same steps' times
        rep_steps = [int(r["step"]) for r in prow][-replay_steps:]
        if phase == "train" or len(prow) < 2:
            rep_steps = [s for s in rep_steps if s != steps[0]] or rep_steps
        rep_total, dr_total, aux_total = 0.0, 0.0, 0.0
        r_net, r_dr, r_loop = [], [], []   # per replayed step: its time over its replays (median over steps below)
        backend = rec.backend
        for s in rep_steps:
            if s in rec.net_replay:     # replayed right after the step (paired)
                net_s, aux_s = rec.net_replay[s], rec.aux_replay.get(s, 0.0)
            else:                       # paired replays off: replay now, after the run
                calls = [c for c in by_step.get(s, []) if not c.eval]
                if not calls or calls[0].x is None:
                    continue
                net_s = min(replay_seconds(backend, calls) for _ in range(max(1, replays)))
                aux_s = min(replay_aux_seconds(rec.aux_calls[s]) for _ in range(max(1, replays))) \
                    if rec.aux_calls.get(s) else 0.0
            t_s = times[steps.index(s)]
            dr_s = rec.decode_time.get(s, 0.0) + rec.reward_time.get(s, 0.0)
            rep_total, dr_total, aux_total = rep_total + net_s, dr_total + dr_s, aux_total + aux_s
            if net_s > 0:
                r_net.append(t_s / net_s)
                r_dr.append(t_s / (net_s + dr_s))
                r_loop.append(t_s / (net_s + aux_s))
        spp = statistics.mean(samples_per_step(method, cfg, r) for r in prow)
        out.append({
            "method": method, "argv": " ".join(argv), "phase": phase, "steps": n,
            "step_time_s": round(t_step, 5), "step_times_s": [round(t, 5) for t in times],
            "nfe_calls": {k: round(v / n, 3) for k, v in sorted(calls_n.items())},
            "nfe_samples": {k: round(v / n, 1) for k, v in sorted(samples_n.items())},
            "nfe_expected": {k: round(v / n, 3) for k, v in sorted(expect_n.items())},
            "nfe_match": bool(match), "unaccounted_forwards": int(unacc), "eval_calls": eval_calls,
            "samples_per_step": spp, "samples_per_s": round(spp / t_step, 2) if t_step > 0 else None,
            "peak_mem_mb": round(max(float(r["peak_mem_mb"]) for r in prow), 1), "rss_before_mb": round(rss0, 1),
            "replay_s": round(rep_total / max(1, len(rep_steps)), 5),
            # median over the replayed steps of (step time / its replay): one step slowed by a neighbour's job
            # does not move it
            "overhead_ratio": round(statistics.median(r_net), 3) if r_net else None,
            # the decoder's and the reward models' forwards (their backward is not separable): how much of the
            # overhead is other networks rather than the loop's own arithmetic
            "decode_reward_fwd_s": round(dr_total / max(1, len(rep_steps)), 5),
            "overhead_ratio_incl_decode_reward": round(statistics.median(r_dr), 3) if r_dr else None,
            # every network of the step replayed with its backward: generator / teacher / fake calls, and the
            # decoder and reward models; what is left is the loop's own cost (arithmetic, losses, optimizer, EMA, log)
            "aux_replay_s": round(aux_total / max(1, len(rep_steps)), 5),
            "loop_overhead_ratio": round(statistics.median(r_loop), 3) if r_loop else None,
            "instrument_s": round(statistics.median(rec.instr_time.get(s, 0.0) for s in steps), 5),
            "replayed_steps": rep_steps, "wall_s": round(wall, 2), "threads": torch.get_num_threads(),
            "backend_options": rec.backend_options,
        })
    return out


# ------------------------------------------------------------------------------------------------------------
# Command line: one case per process (peak RSS is per process)
# ------------------------------------------------------------------------------------------------------------
def cli(argv=None) -> int:
    p = argparse.ArgumentParser(description="one instrumented run: python -m benchmarks.harness METHOD --json F "
                                            "[--backend-options JSON] -- SCRIPT FLAGS")
    p.add_argument("method", choices=METHODS)
    p.add_argument("--json", required=True, help="write the records (a JSON list) here")
    p.add_argument("--backend-options", default="{}", help="extra get_backend options, e.g. '{\"height\": 64}'")
    p.add_argument("--replays", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)   # everything after -- goes to the script untouched
    a = p.parse_args(argv[:cut])
    args = argv[cut + 1:]
    try:
        opts = json.loads(a.backend_options)
    except json.JSONDecodeError as e:
        print(f"error: --backend-options is not JSON: {e}", file=sys.stderr)
        return 2
    from common.config import user_errors
    with user_errors():
        records = measure(a.method, args, backend_options=opts, replays=a.replays, threads=a.threads)
    with open(a.json, "w") as fh:
        json.dump(records, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
