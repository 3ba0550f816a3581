"""Configuration: a dataclass of defaults at the top of each script, flags on the command line, presets per backend.

Every method script opens with its hyper-parameters as a dataclass, so the defaults are readable in one place,
and ends with a four-line main. The whole contract, as a method script uses it:

    from dataclasses import dataclass
    from typing import Literal
    from common.config import RunConfig, opt, parse_config, die, user_errors
    from common.runs import Run
    from common.train import EMA, make_optimizer, clip_grad, autocast, seed_everything
    from common.dist import init_distributed, all_gather_cat, wrap_ddp

    @dataclass
    class Config(RunConfig):    # RunConfig brings --steps --seed --device --precision --out --resume
                                # --save-every --keep --logger (redeclare one here to change its default)
        teacher: str = opt("toy2d", "backend: toy2d | dit | flux | wan | sd3 | flux2")
        nfe: int = opt(4, "student sampling steps K", min=1)
        nfe_list: list[int] = opt([3, 5, 8], "K values evaluated at the end (comma-separated)", min=1)
        lr: float = opt(1e-4, "AdamW learning rate", min=0)
        reward: str = opt("toy_quadratic", "reward spec, e.g. hps or hps:0.7,clip:1.4")
        prompts: str = opt("", "prompt file, one per line ('' = the backend's built-in list)")
        gate: Literal["sigmoid", "none", "off", "hard"] = opt("sigmoid", "gate kind")
        tiny: bool = opt(False, "tiny random model (offline, CPU)")
        tau: float | None = opt(None, "gate temperature ('none' = running std)")
        max_grad_norm: float = opt(1.0, "grad-norm clip (0 = off)", min=0)

    PRESETS = {"flux": {"nfe": 4, "lr": 3e-4, "precision": "bf16"}, "toy2d": {"steps": 300}}

    def main(cfg: Config):
        rank, world, device = init_distributed(cfg.device)   # (0, 1, device) without torchrun
        run = Run(cfg, "rats", device)           # out dir, config.json, metrics.jsonl, tqdm; only rank 0 writes
        seed_everything(cfg.seed)                # same initial weights on every rank (FSDP2 does not broadcast)
        net = ...                                # e.g. backend.network
        opt_ = make_optimizer(net, lr=cfg.lr, weight_decay=1e-4)
        ema = EMA(net, decay=0.995)
        model = wrap_ddp(net, device)            # forward through `model`; save and load `net`
        seed_everything(cfg.seed + rank)         # each rank draws its own noise
        state = run.resume()                     # {} on a fresh run; else the saved dict, RNG states restored
        if state:
            net.load_state_dict(state["net"]); opt_.load_state_dict(state["opt"]); ema.load_state_dict(state["ema"])
        snapshot = lambda: {"net": net.state_dict(), "opt": opt_.state_dict(), "ema": ema.state_dict()}
        with run.interrupt_guard(snapshot):      # Ctrl-C: checkpoint at the end of the step, exit 130
            for step in range(run.step, cfg.steps):
                with autocast(cfg.precision, device):
                    loss, r = ...                # r: (B,) rewards; GRPO: A = group_advantages(all_gather_cat(r), G)
                run.check_finite(loss=loss)      # NaN/inf: one message, exit 3, last good checkpoint kept
                opt_.zero_grad(); loss.backward(); gn = clip_grad(net, cfg.max_grad_norm)
                opt_.step(); ema.update()
                run.log(step + 1, loss=loss, reward=r.mean(), grad_norm=gn)   # one JSON line, after the update
                if run.due(step + 1):                                         # every --save-every steps
                    run.save(step + 1, snapshot())                            # on every rank (collective)
        run.finish({"reward_eval": ...}, state=snapshot())   # summary.json and the final checkpoint

    if __name__ == "__main__":
        with user_errors():                      # RewardError, BackendError, missing files -> one line, exit 2
            main(parse_config(Config, presets=PRESETS))

Command line (argparse underneath, one flag per field, dashes for underscores):
    python rats.py --teacher flux --nfe 4 --nfe-list 3,5,8 --tiny --no-tiny --tiny false --tau none
Order of precedence: dataclass default < PRESETS[cfg.teacher] < explicit flags. With --resume DIR the saved
DIR/config.json replaces the defaults and the preset (explicit flags still win, e.g. --steps 40 to train longer),
and --out defaults to DIR. With --eval-only --ckpt RUN (a run directory or checkpoint file) the backend and so
the preset are the checkpoint's: --teacher may be left out, and one that differs from the run's is an error; the
other flags keep the order above (the scripts then take the model itself from the checkpoint).

User mistakes (unknown flag, bad value, value below a field's `min`, unknown backend or reward, missing prompts
file, a failed `checks` function) print ONE line "error: ..." on stderr and exit with status 2. Built-in checks:
  teacher  must be in common.backend.REGISTRY;        reward   must parse with common.rewards.parse_reward_spec;
  prompts  '', 'builtin' or an existing file;          opt(..., path=True): '' or an existing path;
  nfe, nfe_* at least 1 and lr, *_lr at least 0 even without an explicit `min` (every element of a list).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal, Sequence

EXIT_USER_ERROR = 2  # the status for every user mistake (argparse's own convention)


def opt(default: Any, help: str, *, min: float | None = None, max: float | None = None,
        path: bool = False) -> Any:
    """A config field with its help string: `nfe: int = opt(4, "student steps", min=1)`.

    min/max bound the value (every element for a list); path=True requires an existing file or folder when the
    value is non-empty. A list default is copied per instance (dataclasses forbid shared mutable defaults).
    """
    meta = {"help": help, "min": min, "max": max, "path": path}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RunConfig:
    """Fields every training script shares (common/runs.py, common/train.py, common/dist.py read them)."""

    steps: int = opt(100, "optimizer steps", min=0)
    seed: int = opt(0, "random seed (one seed makes a CPU run deterministic)")
    device: str = opt("auto", "auto | cpu | cuda | cuda:N (under torchrun: cuda:LOCAL_RANK)")
    precision: Literal["fp32", "bf16"] = opt("fp32", "fp32 | bf16 (autocast where the script asks)")
    out: str = opt("", "run directory ('' = runs/<method>-<teacher>-<time>)")
    resume: str = opt("", "run directory to continue from its latest checkpoint (exact on CPU)")
    save_every: int = opt(0, "checkpoint every N steps (0 = only at the end)", min=0)
    keep: int = opt(3, "checkpoints kept (0 = all)", min=0)
    logger: Literal["none", "tensorboard", "wandb"] = opt("none", "extra logger, skipped if not installed")


# ----- errors ------------------------------------------------------------------------------------------------
def die(msg: str, status: int = EXIT_USER_ERROR) -> typing.NoReturn:
    """Print one line 'error: msg' on stderr and exit (status 2: a user mistake). Never a traceback."""
    line = " ".join(str(msg).split())  # one line, whatever the message held
    print(f"error: {line}", file=sys.stderr, flush=True)
    raise SystemExit(status)


def _user_error_types() -> tuple[type[BaseException], ...]:
    from common.backend import BackendError
    from common.prompts import PromptError
    from common.rewards import RewardError
    return (RewardError, BackendError, PromptError, FileNotFoundError, ConfigError)


class ConfigError(ValueError):
    """A bad configuration found after parsing (raise it anywhere in a script: user_errors turns it into one line)."""


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn the project's user-facing exceptions into one line on stderr and exit status 2.

    Caught: common.rewards.RewardError, common.backend.BackendError, common.prompts.PromptError,
    FileNotFoundError (missing weights or prompt files), ConfigError. Anything else is a bug and keeps its
    traceback.
    """
    try:
        yield
    except _user_error_types() as e:
        if isinstance(e, FileNotFoundError) and e.filename is not None:
            die(f"file not found: {e.filename}")
        die(str(e) or type(e).__name__)


# ----- parsing ---------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:  # argparse prints usage + error; we print one line
        die(message)


def _parse_bool(s: str) -> bool:
    v = s.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """`float | None` -> (float, True); `float` -> (float, False)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _converter(tp: Any, name: str) -> Callable[[str], Any]:
    """A str -> value function for one annotated field type (scalar, Literal, list[...], X | None)."""
    tp, optional = _unwrap_optional(tp)
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)

        def conv(s: str) -> Any:
            for c in choices:
                if str(c) == s:
                    return c
            raise argparse.ArgumentTypeError(f"choose one of {', '.join(map(str, choices))} (got {s!r})")
    elif origin in (list, tuple):
        elem = _converter(typing.get_args(tp)[0], name)

        def conv(s: str) -> Any:
            return origin(elem(p.strip()) for p in s.split(",") if p.strip())
    elif tp is bool:
        conv = _parse_bool
    elif tp in (int, float, str):
        def conv(s: str) -> Any:
            try:
                return tp(s)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected {tp.__name__}, got {s!r}") from None
    else:
        raise TypeError(f"config field {name}: unsupported type {tp!r}")
    if optional:
        inner = conv
        conv = lambda s: None if s.strip().lower() == "none" else inner(s)
    return conv


def _bounds(f: dataclasses.Field) -> tuple[float | None, float | None]:
    """A field's (min, max): explicit metadata, else the project's rules for nfe* (>= 1) and lr* (>= 0)."""
    lo, hi = f.metadata.get("min"), f.metadata.get("max")
    if lo is None and (f.name == "nfe" or f.name.startswith("nfe_")):
        lo = 1
    if lo is None and (f.name == "lr" or f.name.startswith("lr_") or f.name.endswith("_lr")):
        lo = 0
    return lo, hi


def _validate(cfg: Any, checks: Sequence[Callable[[Any], str | None]]) -> None:
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        flag = "--" + f.name.replace("_", "-")
        tp, optional = _unwrap_optional(hints[f.name])
        if typing.get_origin(tp) is Literal and not (optional and value is None) \
                and value not in typing.get_args(tp):  # a preset or a saved config bypasses argparse's check
            die(f"{flag}: choose one of {', '.join(map(str, typing.get_args(tp)))} (got {value!r})")
        lo, hi = _bounds(f)
        for v in (value if isinstance(value, (list, tuple)) else [value]):
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                if v != v:  # NaN passes every comparison below, so catch it first
                    die(f"{flag} must be a number, got nan")
                if lo is not None and v < lo:
                    die(f"{flag} must be at least {lo}, got {v}")
                if hi is not None and v > hi:
                    die(f"{flag} must be at most {hi}, got {v}")
        if (f.metadata.get("path") or f.name == "prompts") and value and value != "builtin" \
                and not os.path.exists(value):
            die(f"{flag}: file not found: {value}")
    if hasattr(cfg, "teacher"):
        from common.backend import REGISTRY
        if cfg.teacher not in REGISTRY:
            die(f"--teacher: unknown backend {cfg.teacher!r}; choose one of {', '.join(REGISTRY)}")
    if getattr(cfg, "reward", None):
        from common.rewards import RewardError, parse_reward_spec
        try:
            parse_reward_spec(cfg.reward)
        except RewardError as e:
            die(f"--reward: {e}")
    for check in checks:
        try:
            msg = check(cfg)
        except (ValueError, ConfigError) as e:
            msg = str(e)
        if msg:
            die(msg)


def _glue_values(argv: list[str], value_flags: set[str]) -> list[str]:
    """`--tau -1e-5` -> `--tau=-1e-5`: argparse takes a value that starts with '-' for a flag unless it looks
    like a plain negative number, so '-1e-5' or '-inf' would fail; gluing it to its flag removes the doubt."""
    out, i = [], 0
    while i < len(argv):
        nxt = argv[i + 1] if i + 1 < len(argv) else ""
        if argv[i] in value_flags and nxt.startswith("-") and not nxt.startswith("--"):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def parse_config(cls: type, argv: Sequence[str] | None = None, presets: dict[str, dict[str, Any]] | None = None,
                 checks: Sequence[Callable[[Any], str | None]] = (), preset_key: str = "teacher") -> Any:
    """Build an instance of the dataclass `cls` from defaults, the preset and the command line.

    argv: the arguments (None = sys.argv[1:]). presets: {name: {field: value}}, the entry named by the
    config's `preset_key` field (the backend, --teacher) applied before the explicit flags. checks: functions
    cfg -> error message or None (or raising ValueError) for rules that involve several fields.
    Every user mistake -> one line on stderr, SystemExit(2). Returns the resolved, validated config.
    """
    presets = presets or {}
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    parser = _Parser(description=(cls.__doc__ or "").strip().split("\n")[0] or None,
                     argument_default=argparse.SUPPRESS,  # absent flags stay absent: we know what was explicit
                     allow_abbrev=False,  # --nf is not --nfe: a typo is an error, never a guess
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    value_flags = set()
    for name, f in fields.items():
        flag = "--" + name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        helptext = f"{f.metadata.get('help', '')} (default: {shown})"
        conv = _converter(hints[name], name)
        if _unwrap_optional(hints[name])[0] is bool:
            # --flag, --flag true|false, --no-flag
            parser.add_argument(flag, dest=name, nargs="?", const=True, type=conv, help=helptext)
            parser.add_argument("--no-" + flag[2:], dest=name, action="store_false", help=argparse.SUPPRESS)
        else:
            parser.add_argument(flag, dest=name, type=conv, help=helptext, metavar=name.upper())
            value_flags.add(flag)
    explicit = vars(parser.parse_args(_glue_values(list(sys.argv[1:] if argv is None else argv), value_flags)))

    resume = explicit.get("resume")
    if resume:
        # Continue a run: its saved config is the base; explicit flags (e.g. --steps) still win.
        path = os.path.join(resume, "config.json")
        if not os.path.isfile(path):
            die(f"--resume {resume}: no config.json there (not a run directory)")
        with open(path) as fh:
            saved = json.load(fh)
        values = {k: v for k, v in saved.items() if k in fields}
        values["out"] = resume
    else:
        values = {}
        key = explicit.get(preset_key, fields[preset_key].default if preset_key in fields else None)
        trained = _eval_checkpoint_backend(explicit, preset_key)
        if trained is not None:   # --eval-only --ckpt: the run's backend, and through it its preset
            if preset_key in explicit and explicit[preset_key] != trained:
                flag = "--" + preset_key.replace("_", "-")
                die(f"{flag} {explicit[preset_key]}: --ckpt {explicit['ckpt']} was trained with {flag} {trained}; "
                    f"leave {flag} out (the checkpoint's is used) or give {flag} {trained}")
            key = values[preset_key] = trained
        for k, v in presets.get(key, {}).items():
            if k not in fields:
                die(f"preset {key!r} sets unknown field {k!r}")
            values[k] = v
    values.update(explicit)
    try:
        cfg = cls(**values)
    except TypeError as e:  # a saved config.json from another version, or a required field left out
        die(str(e))
    _validate(cfg, checks)
    return cfg


def _eval_checkpoint_backend(explicit: dict[str, Any], preset_key: str) -> Any:
    """With --eval-only --ckpt PATH (fields eval_only and ckpt): the preset_key value (the backend, --teacher) saved
    in the checkpoint that the script will evaluate; None otherwise, or when PATH holds no readable checkpoint
    (the script then reports it)."""
    if not (explicit.get("eval_only") and explicit.get("ckpt")):
        return None
    from common.runs import checkpoint_config
    return (checkpoint_config(explicit["ckpt"]) or {}).get(preset_key)


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as a JSON-serialisable dict (what config.json and every checkpoint hold)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))
