"""A run directory: config, per-step metrics, summary, atomic checkpoints, exact resume, NaN and Ctrl-C guards.

    runs/<method>-<teacher>-<YYYYmmdd-HHMMSS>/     (or --out DIR; --resume DIR continues in DIR)
      config.json          the resolved config (also inside every checkpoint)
      metrics.jsonl        one JSON object per logged step: {"step", "time", "step_time", "peak_mem_mb", ...}
                           (peak_mem_mb: on a GPU the peak since the previous row, on the CPU the process's peak RSS)
      summary.json         the final evaluation passed to run.finish(), plus status and step count
      checkpoints/step_00000010.pt   the last --keep of them, each written atomically
      tb/ or wandb/        only with --logger tensorboard|wandb, when the package is installed
      previous-<time>/     an earlier run's files, moved aside when a fresh run (no --resume) reuses the folder

Only rank 0 writes, but call every method on EVERY rank: log (under interrupt_guard), save, check_finite, resume
and finish take part in collectives, and a rank that skips one leaves the others waiting. See common/config.py for
the full worked example of a script.

Resume is exact: a checkpoint holds the script's dict (the trained tensors, optimizer, EMA, the script's own
random streams, ...), the step, the script's name, the config and the RNG states of python, numpy and torch (CPU
and CUDA) of every rank; run.resume() restores the RNG states of this rank and returns the dict, and metrics.jsonl
is cut back to the checkpoint's step so that its lines are the ones an uninterrupted run would have written. A
checkpoint of another script is a one-line error (load_checkpoint's method and needs).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import random
import re
import resource
import signal
import sys
import threading
import time
from typing import Any, Callable, Iterator, NoReturn, Sequence

import numpy as np
import torch

from common import dist
from common.config import die, to_dict

EXIT_NONFINITE = 3    # a NaN / inf stopped the run
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), after the checkpoint is written

_CKPT = re.compile(r"^step_(\d+)\.pt$")


# ----- RNG states as plain tensors and lists (so checkpoints load with torch.load(weights_only=True)) --------
def rng_state() -> dict[str, Any]:
    """Every global RNG state of this process."""
    np_state = np.random.get_state(legacy=False)
    ver, inner, gauss = random.getstate()
    return {
        "python": [ver, list(inner), gauss],
        "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
        # this process's GPU only (each rank saves its own; all visible GPUs' states would not restore where fewer
        # are visible, e.g. an 8-GPU run resumed on 4, or one GPU per process under SLURM)
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }


def set_rng_state(s: dict[str, Any]) -> None:
    """The inverse of rng_state()."""
    ver, inner, gauss = s["python"]
    random.setstate((ver, tuple(inner), gauss))
    n = s["numpy"]
    np.random.set_state({"bit_generator": "MT19937",
                         "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    torch.set_rng_state(s["torch"])
    cuda = s.get("cuda")
    if isinstance(cuda, list):   # checkpoints before 2026-11-21: every visible GPU's state; ours is the current one
        i = torch.cuda.current_device() if torch.cuda.is_available() else -1
        cuda = cuda[i] if 0 <= i < len(cuda) else None
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)


def as_tuples(v):
    """A random.Random.getstate() read back from a checkpoint, as setstate takes it: setstate wants tuples all the
    way down, and a checkpoint may give the state back as lists."""
    return tuple(as_tuples(x) for x in v) if isinstance(v, (list, tuple)) else v


# ----- checkpoint files ------------------------------------------------------------------------------------
def _write_text_atomic(path: str, text: str) -> None:
    """A small text file (config.json, summary.json, metrics.jsonl cut back) written to path.tmp, then renamed over
    path: a reader (another rank parsing config.json under torchrun --resume) never sees it truncated."""
    with open(path + ".tmp", "w") as fh:
        fh.write(text)
    os.replace(path + ".tmp", path)


def atomic_save(obj: Any, path: str) -> None:
    """torch.save to a temporary file in the same folder, fsync, then os.replace: a crash at any moment leaves
    either the old file or the new one, never a torn file (rename is atomic within one filesystem)."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    with contextlib.suppress(OSError):  # make the rename itself durable (not possible on every filesystem)
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """[(step, path)] of a run directory's checkpoints, oldest first."""
    folder = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(folder):
        return []
    found = [(int(m.group(1)), os.path.join(folder, f)) for f in os.listdir(folder) if (m := _CKPT.match(f))]
    return sorted(found)


def _checkpoint_file(path: str) -> str | None:
    """path itself (a checkpoint file), or a run directory's latest checkpoint; None for a directory without one."""
    if not os.path.isdir(path):
        return path
    found = list_checkpoints(path)
    return found[-1][1] if found else None


def load_checkpoint(path: str, map_location: str | torch.device = "cpu", method: str | None = None,
                    needs: Sequence[str] = ()) -> dict[str, Any]:
    """A checkpoint file, or the latest one of a run directory: {"step", "method", "config", "rng", "state"}.

    weights_only=True: a checkpoint holds tensors, numbers, strings, lists and dicts (what state_dict() gives);
    nothing in it can run code when loaded. method ('rats' | 'otca' | 'rtdmd') and needs (keys of its "state") check
    that it is a checkpoint of that script: another script's run is a ConfigError, one line, not a KeyError later
    (checkpoints from before the "method" field are checked by their state keys only).
    """
    from common.config import ConfigError
    file = _checkpoint_file(path)
    if file is None:
        raise FileNotFoundError(2, "no checkpoint in run directory", os.path.join(path, "checkpoints"))
    path = file
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    if method is not None:
        other = ckpt.get("method", method)
        missing = [k for k in needs if k not in ckpt.get("state", {})]
        if other != method or missing:
            made_by = f"{other}.py" if other != method else f"another script (its state lacks {missing[0]!r})"
            raise ConfigError(f"{path} is a checkpoint of {made_by}, not of {method}.py")
    return ckpt


def checkpoint_config(path: str) -> dict[str, Any] | None:
    """The config saved in the checkpoint load_checkpoint(path) would load (a file, or a run directory's latest),
    read without loading its tensors (mmap); None when there is no readable checkpoint there (load_checkpoint then
    says why)."""
    path = _checkpoint_file(path)
    if path is None:
        return None
    try:
        config = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("config")
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, AttributeError):
        return None
    return config if isinstance(config, dict) else None


def _to_json(v: Any) -> Any:
    """Metric values -> JSON: 0-d / one-element tensors and numpy scalars -> float, other tensors -> lists."""
    if isinstance(v, torch.Tensor):
        v = v.detach().float().cpu()
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, dict):
        return {k: _to_json(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_to_json(x) for x in v]
    return v


def _nonfinite(v: Any) -> list[str]:
    """Names of the non-finite entries of a number, tensor or (nested) dict of them."""
    if isinstance(v, dict):
        return [f"{k}.{n}" if n else k for k, x in v.items() for n in _nonfinite(x)]
    if isinstance(v, (list, tuple)):
        return [n for x in v for n in _nonfinite(x)]
    if isinstance(v, torch.Tensor):
        return [] if not v.is_floating_point() or bool(torch.isfinite(v.detach()).all()) else [""]
    if isinstance(v, (float, np.floating)):
        return [] if math.isfinite(v) else [""]
    return []


def peak_memory_mb(device: torch.device | str | None = None) -> float:
    """CUDA's max allocated memory on a GPU, else this process's peak resident set size (MiB)."""
    if device is not None and torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux (bytes on macOS)
    return kb / (2**20 if sys.platform == "darwin" else 2**10)


class Run:
    """One training run's directory and bookkeeping (see the module docstring for the layout).

    cfg: the config dataclass (fields out, resume, steps, save_every, keep, logger, teacher are read when present).
    method: 'rats' | 'otca' | 'rtdmd' (names the default directory). device: for peak memory (CUDA's counter
    when it is a GPU). show: the metric names on the tqdm bar (default: the first four logged). total: the
    bar's length when the last logged step is not cfg.steps (e.g. stage-1 steps + stage-2 epochs).
    Attributes: out (the directory), step (steps completed: 0, or the resumed step), main (rank 0).
    """

    def __init__(self, cfg: Any, method: str, device: torch.device | str | None = None,
                 show: list[str] | None = None, total: int | None = None):
        self.cfg, self.method, self.device, self.show = cfg, method, device, show
        self.main = dist.is_main()
        self.step = 0
        self.steps = total if total is not None else getattr(cfg, "steps", None)
        self.keep = getattr(cfg, "keep", 3)
        self.save_every = getattr(cfg, "save_every", 0)
        self._resume_from = getattr(cfg, "resume", "") or ""
        out = getattr(cfg, "out", "") or self._resume_from
        if not out:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            out = os.path.join("runs", f"{method}-{getattr(cfg, 'teacher', 'run')}-{stamp}")
            if dist.is_dist():  # every rank must agree on the name even if their clocks tick apart
                out = dist.gather_objects(out)[0]
        self.out = out
        self.ckpt_dir = os.path.join(out, "checkpoints")
        self._t0 = self._t_last = time.perf_counter()
        self._peak_mb = 0.0   # the run's peak (summary.json); each metrics row has its own interval's on a GPU
        self._stop_requested = False
        self._bar = None
        self._tb = self._wandb = None
        if self.main:
            if not self._resume_from:
                self._set_aside_previous_run()
            os.makedirs(self.ckpt_dir, exist_ok=True)
            for f in os.listdir(self.ckpt_dir):  # temporary files of a process killed mid-write
                if f.startswith(".") and ".tmp" in f:
                    os.remove(os.path.join(self.ckpt_dir, f))
            # atomically: under torchrun --resume every rank reads this file while parsing its flags
            _write_text_atomic(os.path.join(out, "config.json"), json.dumps(to_dict(cfg), indent=2))
            print(f"[{method}] run directory {out}\nconfig " + json.dumps(to_dict(cfg)), flush=True)
            self._open_loggers()
        dist.barrier()  # the directory exists (and holds no stale checkpoint) before any rank looks at it

    def _set_aside_previous_run(self) -> None:
        """A fresh run in a directory that holds an earlier run: move the earlier files to previous-<time>/ so
        that its metrics are not mixed with ours and --resume never picks its checkpoints. Nothing is deleted."""
        names = [n for n in ("config.json", "metrics.jsonl", "summary.json", "checkpoints")
                 if os.path.exists(os.path.join(self.out, n))]
        if not names:
            return
        aside = os.path.join(self.out, "previous-" + time.strftime("%Y%m%d-%H%M%S"))
        while os.path.exists(aside):
            aside += "x"
        os.makedirs(aside)
        for n in names:
            os.replace(os.path.join(self.out, n), os.path.join(aside, n))
        print(f"warning: {self.out} held an earlier run; moved its files to {aside} "
              f"(use --resume {self.out} to continue a run)", file=sys.stderr, flush=True)

    # ----- logging ---------------------------------------------------------------------------------------
    def _open_loggers(self) -> None:
        kind = getattr(self.cfg, "logger", "none")
        try:
            if kind == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(os.path.join(self.out, "tb"))
            elif kind == "wandb":
                import wandb
                self._wandb = wandb.init(project=self.method, dir=self.out, config=to_dict(self.cfg),
                                         name=os.path.basename(os.path.normpath(self.out)))
        except ImportError as e:
            print(f"warning: --logger {kind} asked for but not installed ({e}); logging to metrics.jsonl only",
                  file=sys.stderr, flush=True)

    def log(self, step: int, **metrics: Any) -> dict[str, Any]:
        """Record the metrics of completed step `step` (1-based: call after the update). Tensors become floats
        (lists for vectors, e.g. one value per denoising step). Adds time, step_time, peak_mem_mb. Writes one line
        of metrics.jsonl, updates the bar and the optional logger. If Ctrl-C was pressed inside
        interrupt_guard, this is where the checkpoint is written and the run stops. Returns the logged row."""
        now = time.perf_counter()
        row = {"step": int(step), **{k: _to_json(v) for k, v in metrics.items()},
               "time": now - self._t0, "step_time": now - self._t_last,
               "peak_mem_mb": self._read_peak()}
        self._t_last = now
        self.step = int(step)
        if self.main:
            with open(os.path.join(self.out, "metrics.jsonl"), "a") as fh:
                fh.write(json.dumps(row) + "\n")
            self._update_bar(row)
            scalars = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
            if self._tb is not None:
                for k, v in scalars.items():
                    self._tb.add_scalar(k, v, step)
            if self._wandb is not None:
                self._wandb.log(scalars, step=step)
        if self._guard_state_fn is not None and dist.any_rank(self._stop_requested):
            self._interrupt_exit()
        return row

    def _update_bar(self, row: dict[str, Any]) -> None:
        if self._bar is None:
            from tqdm import tqdm
            self._bar = tqdm(total=self.steps, initial=self.step - 1, desc=self.method, dynamic_ncols=True)
        keys = self.show or [k for k in row if k not in ("step", "time", "step_time", "peak_mem_mb")][:4]
        post = {k: f"{row[k]:.4g}" for k in keys if isinstance(row.get(k), (int, float))}
        self._bar.set_postfix(post, refresh=False)
        self._bar.update(row["step"] - self._bar.n)

    def due(self, step: int) -> bool:
        """True when a checkpoint is due after completed step `step` (every --save-every steps)."""
        return self.save_every > 0 and step % self.save_every == 0

    # ----- checkpoints -----------------------------------------------------------------------------------
    def save(self, step: int, state: dict[str, Any]) -> str | None:
        """Write checkpoints/step_<step>.pt atomically, then keep only the last --keep. Call on every rank: it
        gathers the RNG states of all ranks; rank 0 writes. A state with a NaN/inf tensor is never written:
        the run stops (exit 3) and the previous checkpoint stays the last good one. Returns the path (rank 0)."""
        self.check_finite(state, what="checkpoint state")
        ckpt = {"step": int(step), "method": self.method, "config": to_dict(self.cfg), "world": dist.world_size(),
                "time": time.perf_counter() - self._t0,
                "rng": dist.gather_objects(rng_state()), "state": state}
        self.step = int(step)
        path = None
        if self.main:
            path = os.path.join(self.ckpt_dir, f"step_{int(step):08d}.pt")
            atomic_save(ckpt, path)
            if self.keep > 0:
                for _, old in list_checkpoints(self.out)[:-self.keep]:
                    os.remove(old)
        dist.barrier()
        return path

    def resume(self, needs: Sequence[str] = ()) -> dict[str, Any]:
        """With --resume DIR: load DIR's latest checkpoint, set self.step, restore this rank's RNG states, cut
        metrics.jsonl back to that step, and return the dict given to save(). Without --resume: {}. needs: keys the
        script's state must have (a run of another script is a one-line error). Call it after building models and
        optimizers (building consumes random numbers), right before the loop."""
        if not self._resume_from:
            return {}
        if not list_checkpoints(self._resume_from):
            die(f"--resume {self._resume_from}: no checkpoint there yet (the run stopped before its first save); "
                f"start it again without --resume")
        ckpt = load_checkpoint(self._resume_from, method=self.method, needs=needs)   # another script's run: one line
        self.step = int(ckpt["step"])
        rngs = ckpt["rng"]
        if len(rngs) != dist.world_size() and self.main:
            print(f"warning: the checkpoint was written by {len(rngs)} processes and this run has "
                  f"{dist.world_size()}; training continues, but not bit for bit", file=sys.stderr, flush=True)
        set_rng_state(dist.this_ranks(rngs))
        if self.main:
            self._truncate_metrics(self.step)
            print(f"[{self.method}] resumed from {self._resume_from} at step {self.step}", flush=True)
        self._t_last = time.perf_counter()
        self._t0 = self._t_last - float(ckpt.get("time", 0.0))  # the "time" column goes on from the checkpoint
        return ckpt["state"]

    def _truncate_metrics(self, step: int) -> None:
        path = os.path.join(self.out, "metrics.jsonl")
        if not os.path.exists(path):
            return
        with open(path) as fh:
            keep = [ln for ln in fh if ln.strip() and json.loads(ln).get("step", 0) <= step]
        _write_text_atomic(path, "".join(keep))

    # ----- guards ----------------------------------------------------------------------------------------
    def check_finite(self, value: Any = None, what: str = "loss", **named: Any) -> None:
        """Stop the run if any value is NaN or inf: run.check_finite(loss) or run.check_finite(loss=l, kl=k).

        All ranks agree (one all-reduce), every rank exits with status 3 after one message on stderr naming the
        values and the last good checkpoint, which is left untouched. Call it before backward/step."""
        items = dict(named)
        if value is not None:
            items[what] = value
        bad = _nonfinite(items)
        if not dist.any_rank(bool(bad)):
            return
        found = list_checkpoints(self.out)
        last = found[-1][1] if found else "none written yet"
        names = ", ".join(bad) if bad else "on another rank"
        msg = (f"error: non-finite value at step {self.step + 1} ({names}); stopping. "
               f"Last good checkpoint: {last}")
        self._close()  # the bar first, so that the message is a line of its own
        if self.main:
            print(msg, file=sys.stderr, flush=True)
            self._write_summary({"status": "non-finite", "message": msg}, self.step)
        raise SystemExit(EXIT_NONFINITE)

    _guard_state_fn: Callable[[], dict[str, Any]] | None = None

    @contextlib.contextmanager
    def interrupt_guard(self, state_fn: Callable[[], dict[str, Any]]) -> Iterator[None]:
        """Inside the block, Ctrl-C (SIGINT) asks for a stop: the next run.log() (the end of a step, so the state
        is consistent) writes a checkpoint from state_fn() and exits with status 130. A second Ctrl-C interrupts
        at once, without saving. The previous SIGINT handler is restored on exit."""
        self._guard_state_fn = state_fn
        previous = None

        def handler(signum, frame):
            if self._stop_requested:  # second Ctrl-C: the user really wants out now
                raise KeyboardInterrupt
            self._stop_requested = True
            if self.main:
                print("\ninterrupt: saving a checkpoint at the end of this step (Ctrl-C again to quit now)",
                      file=sys.stderr, flush=True)

        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            self._guard_state_fn = None
            if previous is not None:
                signal.signal(signal.SIGINT, previous)

    def _interrupt_exit(self) -> NoReturn:
        path = self.save(self.step, self._guard_state_fn())
        if self.main:
            print(f"interrupted at step {self.step}; checkpoint {path}; continue with --resume {self.out}",
                  file=sys.stderr, flush=True)
        self._close()
        raise SystemExit(EXIT_INTERRUPTED)

    # ----- the end -----------------------------------------------------------------------------------------
    def finish(self, summary: dict[str, Any] | None = None, state: dict[str, Any] | None = None) -> None:
        """Write summary.json (the final evaluation, plus status and step) and, when state is given, a final
        checkpoint at self.step (skipped if one exists for that step). Call on every rank."""
        if state is not None:
            # rank 0 decides (only its file system view counts): save is a collective, so all ranks must agree
            exists = any(s == self.step for s, _ in list_checkpoints(self.out)) if self.main else False
            if not dist.gather_objects(exists)[0]:
                self.save(self.step, state)
        if self.main:
            self._write_summary({"status": "finished", **(summary or {})}, self.step)
        self._close()

    def _read_peak(self) -> float:
        """Peak memory since the previous read on a GPU (CUDA's counter is reset: a row shows its own step's peak,
        not model loading's or the first evaluation's), the process's peak RSS on the CPU (it cannot be reset); the
        running maximum goes to summary.json."""
        peak = peak_memory_mb(self.device)
        if self.device is not None and torch.device(self.device).type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._peak_mb = max(self._peak_mb, peak)
        return peak

    def _write_summary(self, summary: dict[str, Any], step: int) -> None:
        row = {"method": self.method, "step": step, "time": time.perf_counter() - self._t0,
               "peak_mem_mb": max(self._read_peak(), self._peak_mb), **_to_json(summary)}
        _write_text_atomic(os.path.join(self.out, "summary.json"), json.dumps(row, indent=2))

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

