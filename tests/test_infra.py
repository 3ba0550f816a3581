"""Training infrastructure: config parsing and user errors, run directory, atomic checkpoints, exact resume,
NaN and Ctrl-C guards, seeding, EMA / AdamW / clipping / autocast (common/config.py, runs.py, train.py).

Most runs call tests/_infra_script.py's main() in this process (importing torch in a subprocess costs seconds on
the shared CPU); one subprocess checks the real command line end to end.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from common import rewards
from common.backend import BackendError
from common.config import ConfigError, RunConfig, opt, parse_config, to_dict, user_errors
from common.prompts import PromptError
from common.rewards import RewardError
from common.runs import atomic_save, list_checkpoints, load_checkpoint, rng_state, set_rng_state
from common.train import (EMA, autocast, base_dtype, clip_grad, detached, load_trained, make_optimizer, seed_everything,
                          trained_tensors)
from tests import _infra_script as script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Cfg(RunConfig):
    teacher: str = opt("toy2d", "backend")
    nfe: int = opt(4, "student steps")
    nfe_list: list[int] = opt([3, 5, 8], "evaluated step counts")
    lr: float = opt(1e-4, "learning rate")
    tau: float | None = opt(0.05, "gate temperature (none = running std)")
    gate: Literal["sigmoid", "none", "off", "hard"] = opt("sigmoid", "gate kind")
    tiny: bool = opt(False, "tiny model")
    reward: str = opt("", "reward spec")
    prompts: str = opt("", "prompt file")
    name: str = opt("x", "free text")


PRESETS = {"toy2d": {"lr": 1e-2, "nfe": 2}, "dit": {"lr": 3e-3, "nfe": 8, "tiny": True}}


# ----- config --------------------------------------------------------------------------------------------------
def test_flag_forms_and_types():
    cfg = parse_config(Cfg, ["--nfe", "3", "--nfe-list", "1,2,16", "--tau", "none", "--gate", "hard", "--tiny",
                             "--name", "a b", "--save-every", "5"])
    assert (cfg.nfe, cfg.nfe_list, cfg.tau, cfg.gate, cfg.tiny, cfg.name, cfg.save_every) == \
        (3, [1, 2, 16], None, "hard", True, "a b", 5)
    assert parse_config(Cfg, ["--tiny", "false"]).tiny is False
    assert parse_config(Cfg, ["--tiny", "--no-tiny"]).tiny is False
    assert parse_config(Cfg, ["--tiny", "--nfe", "2"]).tiny is True  # a bare bool flag does not eat the next flag
    assert parse_config(Cfg, ["--tau", "0.5"]).tau == 0.5
    assert json.loads(json.dumps(to_dict(cfg))) == to_dict(cfg)
    assert Cfg().nfe_list is not Cfg().nfe_list  # list defaults are not shared between instances


def test_presets_apply_first_and_explicit_flags_win():
    assert (lambda c: (c.lr, c.nfe))(parse_config(Cfg, [], presets=PRESETS)) == (1e-2, 2)  # default teacher's
    c = parse_config(Cfg, ["--teacher", "dit"], presets=PRESETS)
    assert (c.lr, c.nfe, c.tiny) == (3e-3, 8, True)
    c = parse_config(Cfg, ["--nfe", "5", "--teacher", "dit", "--no-tiny"], presets=PRESETS)
    assert (c.lr, c.nfe, c.tiny) == (3e-3, 5, False)
    assert parse_config(Cfg, ["--teacher", "flux"], presets=PRESETS).lr == 1e-4  # no preset: the defaults


@given(nfe=st.integers(1, 1000), lst=st.lists(st.integers(1, 99), min_size=1, max_size=5),
       lr=st.floats(0, 10, allow_nan=False), tiny=st.booleans(), tau=st.none() | st.floats(-5, 5),
       gate=st.sampled_from(["sigmoid", "none", "off", "hard"]))
def test_flags_round_trip(nfe, lst, lr, tiny, tau, gate):
    argv = ["--nfe", str(nfe), "--nfe-list", ",".join(map(str, lst)), "--lr", repr(lr),
            "--tiny", str(tiny).lower(), "--tau", "none" if tau is None else repr(tau), "--gate", gate]
    c = parse_config(Cfg, argv)
    assert (c.nfe, c.nfe_list, c.lr, c.tiny, c.tau, c.gate) == (nfe, lst, lr, tiny, tau, gate)


@pytest.fixture
def toy_reward(monkeypatch):
    monkeypatch.setitem(rewards.REGISTRY, "toy_test", "tests.test_infra:Cfg")  # registered, never built here


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    return err[0]


@pytest.mark.parametrize("argv, needle", [
    (["--bogus", "1"], "unrecognized"),
    (["--nfe", "0"], "--nfe must be at least 1"),
    (["--nfe", "two"], "expected int"),
    (["--nfe-list", "3,0"], "--nfe-list must be at least 1"),
    (["--lr", "-1e-4"], "--lr must be at least 0"),
    (["--lr", "nan"], "--lr must be a number"),
    (["--teacher", "sdxl"], "unknown backend 'sdxl'"),
    (["--reward", "nosuch"], "unknown reward 'nosuch'"),
    (["--reward", "toy_test:heavy"], "bad weight"),
    (["--prompts", "/nonexistent/prompts.txt"], "file not found"),
    (["--gate", "soft"], "choose one of"),
    (["--tiny", "maybe"], "expected true or false"),
    (["--keep", "-1"], "--keep must be at least 0"),
    (["--resume", "/nonexistent/run"], "no config.json"),
])
def test_user_mistakes_give_one_line_and_status_2(argv, needle, capsys, toy_reward):
    with pytest.raises(SystemExit) as e:
        parse_config(Cfg, argv)
    assert e.value.code == 2
    assert needle in _one_error_line(capsys)


def test_known_reward_and_existing_prompts_file_pass(tmp_path, toy_reward):
    p = tmp_path / "prompts.txt"
    p.write_text("a cat\n")
    assert parse_config(Cfg, ["--reward", "toy_test:0.5", "--prompts", str(p)]).prompts == str(p)
    assert parse_config(Cfg, ["--prompts", "builtin"]).prompts == "builtin"


def test_checks_and_preset_typos(capsys):
    def same_parity(c):
        return None if c.nfe % 2 == 0 else f"--nfe must be even, got {c.nfe}"

    def raising(c):
        raise ValueError("bad combination")

    assert parse_config(Cfg, ["--nfe", "4"], checks=[same_parity]).nfe == 4
    for checks, argv, needle in [([same_parity], ["--nfe", "3"], "even"), ([raising], [], "bad combination")]:
        with pytest.raises(SystemExit) as e:
            parse_config(Cfg, argv, checks=checks)
        assert e.value.code == 2 and needle in _one_error_line(capsys)
    with pytest.raises(SystemExit):
        parse_config(Cfg, [], presets={"toy2d": {"nfee": 3}})
    assert "unknown field 'nfee'" in _one_error_line(capsys)
    with pytest.raises(SystemExit):
        parse_config(Cfg, [], presets={"toy2d": {"gate": "soft"}})
    assert "--gate: choose one of" in _one_error_line(capsys)


@pytest.mark.parametrize("exc", [RewardError("unknown reward 'q'"), BackendError("no weights at /w"),
                                 FileNotFoundError(2, "No such file", "/w/model.safetensors"),
                                 ConfigError("bad\nmulti-line message"), PromptError("x.csv: no prompt column")])
def test_user_errors_turn_project_exceptions_into_one_line(exc, capsys):
    with pytest.raises(SystemExit) as e, user_errors():
        raise exc
    assert e.value.code == 2
    _one_error_line(capsys)


def test_user_errors_keep_tracebacks_of_bugs():
    with pytest.raises(ZeroDivisionError), user_errors():
        raise ZeroDivisionError("a bug, not a user mistake")


def test_command_line_end_to_end(tmp_path):
    """The real script: a bad flag gives status 2 and one line; --help works; a good run writes the layout."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT}
    cmd = [sys.executable, os.path.join(ROOT, "tests", "_infra_script.py")]
    bad = subprocess.run(cmd + ["--nfe", "4"], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == ["error: unrecognized arguments: --nfe 4"]


def test_help_lists_every_field_with_its_default(capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(Cfg, ["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert all(f"--{f}" in text for f in ["nfe-list", "save-every", "tiny", "resume", "logger"])
    assert "(default: 3,5,8)" in text


# ----- runs: directory, checkpoints, resume, guards -------------------------------------------------------
def run_script(argv):
    """script.main(argv) in this process; returns (exit status, Run or None)."""
    try:
        return 0, script.main(parse_config(script.Config, argv, presets=script.PRESETS))
    except SystemExit as e:
        return e.code, None


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def same_numbers(a, b):
    """Bitwise equality of every logged training number (time and memory excluded)."""
    keys = ("step", "loss", "grad_norm", "per_dim")
    return [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b]


def test_run_directory_layout(tmp_path):
    out = str(tmp_path / "r")
    code, run = run_script(["--steps", "6", "--save-every", "2", "--keep", "2", "--out", out])
    assert code == 0 and run.out == out
    assert sorted(os.listdir(out)) == ["checkpoints", "config.json", "metrics.jsonl", "summary.json"]
    assert json.load(open(os.path.join(out, "config.json")))["steps"] == 6
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert all(r["peak_mem_mb"] > 0 and r["step_time"] >= 0 and len(r["per_dim"]) == 2 for r in rows)
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["status"] == "finished" and summary["step"] == 6 and summary["final_loss"] == rows[-1]["loss"]
    assert [s for s, _ in list_checkpoints(out)] == [4, 6]  # keep 2
    ck = load_checkpoint(out)
    assert ck["step"] == 6 and ck["config"]["out"] == out and set(ck["state"]) == {"net", "opt", "ema"}


def test_fresh_run_in_a_used_directory_sets_the_old_run_aside(tmp_path, capsys):
    out = str(tmp_path / "r")
    assert run_script(["--steps", "4", "--save-every", "2", "--out", out])[0] == 0
    assert run_script(["--steps", "2", "--out", out, "--seed", "1"])[0] == 0
    assert [r["step"] for r in metrics(out)] == [1, 2] and [s for s, _ in list_checkpoints(out)] == [2]
    (aside,) = [d for d in os.listdir(out) if d.startswith("previous-")]
    assert [s for s, _ in list_checkpoints(os.path.join(out, aside))] == [2, 4]
    assert "moved its files" in capsys.readouterr().err


def test_resume_without_a_checkpoint_and_missing_logger_packages(tmp_path, capsys):
    out = str(tmp_path / "r")
    assert run_script(["--steps", "0", "--out", out])[0] == 0  # config.json, no checkpoint (0 steps, no state)
    for f in os.listdir(os.path.join(out, "checkpoints")):
        os.remove(os.path.join(out, "checkpoints", f))
    capsys.readouterr()
    assert run_script(["--resume", out])[0] == 2
    assert "no checkpoint there yet" in _one_error_line(capsys)
    import importlib.util
    for kind, pkg in [("tensorboard", "tensorboard"), ("wandb", "wandb")]:
        if importlib.util.find_spec(pkg) is None:  # asked for, not installed: one warning, the run goes on
            assert run_script(["--steps", "1", "--logger", kind, "--out", str(tmp_path / kind)])[0] == 0
            assert f"--logger {kind} asked for but not installed" in capsys.readouterr().err


def test_default_run_directory_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, run = run_script(["--steps", "1"])
    assert code == 0 and os.path.dirname(run.out) == "runs" and os.path.basename(run.out).startswith("infra-toy2d-")


def test_atomic_checkpoint_survives_a_crash_mid_write(tmp_path, monkeypatch):
    path = str(tmp_path / "step_00000001.pt")
    atomic_save({"w": torch.arange(5.0)}, path)
    real_save = torch.save

    def crashing_save(obj, fh):  # writes half a file, then the process "dies"
        real_save(obj, fh)
        fh.truncate(fh.tell() // 2)
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(OSError):
        atomic_save({"w": torch.zeros(5)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(5.0))
    assert os.listdir(tmp_path) == ["step_00000001.pt"]  # no temporary file left behind


def test_a_checkpoint_of_another_script_is_a_one_line_error(tmp_path):
    """Checkpoints name their script: loading one for another script (--resume, --ckpt, --init) is a ConfigError
    naming both, as is one whose state lacks a key the script needs (checkpoints older than the name)."""
    out = str(tmp_path / "run")
    assert run_script(["--steps", "2", "--save-every", "1", "--out", out])[0] == 0
    ckpt = load_checkpoint(out, method="infra", needs=("net", "ema"))
    assert ckpt["method"] == "infra" and ckpt["step"] == 2
    with pytest.raises(ConfigError, match=r"checkpoint of infra\.py, not of otca\.py"):
        load_checkpoint(out, method="otca")
    del ckpt["method"]                                # a checkpoint written before the field existed
    torch.save(ckpt, os.path.join(out, "checkpoints", "step_00000003.pt"))
    assert load_checkpoint(out, method="otca", needs=("net",))["step"] == 2      # its keys fit: accepted
    with pytest.raises(ConfigError, match=r"another script \(its state lacks 'gen'\), not of rtdmd\.py"):
        load_checkpoint(out, method="rtdmd", needs=("gen",))


def test_config_json_is_never_seen_truncated(tmp_path, monkeypatch):
    """Under torchrun --resume every rank parses DIR/config.json while rank 0's Run rewrites it: the rewrite is
    atomic, so a reader in the middle of it still finds the complete old file (it used to find an empty one)."""
    import common.runs as runs_mod
    out = str(tmp_path / "run")
    assert run_script(["--steps", "1", "--save-every", "1", "--out", out])[0] == 0
    seen = []

    def opener(path, mode="r", *args, **kw):     # another rank reading the file once it is opened for writing
        fh = open(path, mode, *args, **kw)
        if "w" in mode and str(path).endswith(("config.json", "config.json.tmp")):
            with open(os.path.join(out, "config.json")) as other:
                seen.append(json.load(other)["steps"])
        return fh
    monkeypatch.setattr(runs_mod, "open", opener, raising=False)
    assert run_script(["--resume", out, "--steps", "2"])[0] == 0
    assert seen == [1]
    with open(os.path.join(out, "config.json")) as fh:
        assert json.load(fh)["steps"] == 2


def test_exact_resume_bitwise(tmp_path):
    """20 steps in one go == 10 steps, then --resume to 20: same metrics and same final weights, bit for bit."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert run_script(["--steps", "20", "--save-every", "5", "--out", a])[0] == 0
    assert run_script(["--steps", "10", "--save-every", "5", "--out", b])[0] == 0
    code, run = run_script(["--resume", b, "--steps", "20"])
    assert code == 0 and run.out == b
    assert same_numbers(metrics(a), metrics(b)) and len(metrics(b)) == 20
    wa, wb = load_checkpoint(a)["state"], load_checkpoint(b)["state"]
    assert all(torch.equal(wa["net"][k], wb["net"][k]) for k in wa["net"])
    assert all(torch.equal(x, y) for x, y in zip(wa["ema"]["shadow"], wb["ema"]["shadow"]))


def test_nan_guard_keeps_last_good_checkpoint_then_resume_is_exact(tmp_path, capsys):
    ref, out = str(tmp_path / "ref"), str(tmp_path / "nan")
    assert run_script(["--steps", "16", "--save-every", "5", "--out", ref])[0] == 0
    capsys.readouterr()
    code, _ = run_script(["--steps", "16", "--save-every", "5", "--nan-at", "13", "--out", out])
    assert code == 3
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "non-finite" in err and "step 13" in err and "loss" in err and "step_00000010.pt" in err
    assert [s for s, _ in list_checkpoints(out)] == [5, 10]  # nothing written after the NaN
    assert json.load(open(os.path.join(out, "summary.json")))["status"] == "non-finite"
    assert len(metrics(out)) == 12
    # a crash after step 12: resuming cuts metrics.jsonl back to step 10 and replays 11.. exactly
    assert run_script(["--resume", out, "--nan-at", "0"])[0] == 0
    assert same_numbers(metrics(ref), metrics(out))


def test_nan_in_checkpoint_state_is_never_written(tmp_path):
    from common.runs import Run
    cfg = script.Config(out=str(tmp_path / "r"), steps=3)
    run = Run(cfg, "infra")
    run.save(1, {"w": torch.ones(3)})
    with pytest.raises(SystemExit) as e:
        run.save(2, {"w": torch.tensor([1.0, float("inf"), 0.0])})
    assert e.value.code == 3
    assert [s for s, _ in list_checkpoints(cfg.out)] == [1]
    assert torch.equal(load_checkpoint(cfg.out)["state"]["w"], torch.ones(3))


def test_peak_memory_per_row_on_a_gpu(tmp_path, monkeypatch):
    """On a GPU each metrics row shows the peak since the previous row (CUDA's counter reset after each read), so
    a step's row is not model loading's or the first evaluation's; summary.json keeps the run's maximum. CUDA's
    counters are faked here (tests never need a GPU)."""
    from common.runs import Run
    counter = {"bytes": 0}
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: counter["bytes"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: counter.update(bytes=0))
    run = Run(script.Config(out=str(tmp_path / "r"), steps=2), "infra", device=torch.device("cuda"))
    counter["bytes"] = 3 * 2**20          # loading + the first evaluation + step 1
    run.log(1, loss=1.0)
    counter["bytes"] = 2**20              # step 2 alone
    run.log(2, loss=1.0)
    run.finish({})
    with open(tmp_path / "r" / "summary.json") as f:
        assert json.load(f)["peak_mem_mb"] == 3.0
    assert [r["peak_mem_mb"] for r in metrics(str(tmp_path / "r"))] == [3.0, 1.0]


def test_ctrl_c_saves_then_resume_is_exact(tmp_path, capsys):
    ref, out = str(tmp_path / "ref"), str(tmp_path / "int")
    assert run_script(["--steps", "12", "--out", ref])[0] == 0
    code, _ = run_script(["--steps", "12", "--interrupt-at", "7", "--out", out])
    assert code == 130
    assert [s for s, _ in list_checkpoints(out)] == [7]
    assert "--resume" in capsys.readouterr().err
    assert run_script(["--resume", out, "--interrupt-at", "0"])[0] == 0
    assert same_numbers(metrics(ref), metrics(out))


def test_one_seed_one_run(tmp_path):
    runs = {}
    for name, seed in [("a", 3), ("b", 3), ("c", 4)]:
        assert run_script(["--steps", "5", "--seed", str(seed), "--out", str(tmp_path / name)])[0] == 0
        runs[name] = metrics(str(tmp_path / name))
    assert same_numbers(runs["a"], runs["b"]) and not same_numbers(runs["a"], runs["c"])


def test_rng_state_round_trip():
    seed_everything(1)
    s = rng_state()
    first = (random.random(), np.random.rand(3).tolist(), np.random.normal(), torch.rand(3).tolist())
    set_rng_state(s)
    assert (random.random(), np.random.rand(3).tolist(), np.random.normal(), torch.rand(3).tolist()) == first
    # the CUDA entry is this process's GPU only (None without one); older checkpoints hold a list per visible GPU,
    # restored by the current device's index when there is one, else skipped (not an IndexError on fewer GPUs)
    assert s["cuda"] is None or isinstance(s["cuda"], torch.Tensor)
    if not torch.cuda.is_available():
        for old in ([], [torch.zeros(16, dtype=torch.uint8)] * 9):
            set_rng_state({**s, "cuda": old})
            assert torch.rand(3).tolist() == first[3]


# ----- train helpers ----------------------------------------------------------------------------------------
@given(decay=st.floats(0.0, 1.0), n=st.integers(1, 20), p=st.floats(-3, 3), s0=st.floats(-3, 3))
def test_ema_matches_closed_form(decay, n, p, s0):
    """Constant parameter p, shadow starting at s0: after n updates s_n = p + decay^n (s0 - p)."""
    w = nn.Parameter(torch.full((2, 2), s0, dtype=torch.float64))
    ema = EMA([w], decay=decay)
    with torch.no_grad():
        w.fill_(p)
    for _ in range(n):
        ema.update()
    expected = p + decay ** n * (s0 - p)
    assert torch.allclose(ema.shadow[0].double(), torch.full((2, 2), expected, dtype=torch.float64), atol=1e-5)


def test_ema_into_a_teacher_module_and_state_dict():
    torch.manual_seed(0)
    student = nn.Linear(3, 2)
    teacher = nn.Linear(3, 2).requires_grad_(False)
    teacher.load_state_dict(student.state_dict())
    ema = EMA(student, decay=0.5, shadow=teacher)
    with torch.no_grad():
        student.weight.add_(1.0)
    ema.update()
    assert torch.allclose(teacher.weight, student.weight - 0.5)  # halfway
    other = EMA(nn.Linear(3, 2), decay=0.9)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 1 and torch.equal(other.shadow[0], teacher.weight.float())
    with ema.swapped():
        assert torch.equal(student.weight, teacher.weight)
    assert torch.allclose(student.weight, teacher.weight + 0.5)
    with pytest.raises(ValueError):
        EMA(student, decay=0.5, shadow=nn.Linear(4, 2))


def test_ema_decay_one_is_frozen():
    net = nn.Linear(2, 2)
    ema = EMA(net, decay=1.0)
    before = [s.clone() for s in ema.shadow]
    with torch.no_grad():
        net.weight.mul_(3)
    ema.update()
    assert all(torch.equal(a, b) for a, b in zip(before, ema.shadow))


def test_multi_tensor_ema_and_clip_equal_the_per_tensor_loops_bitwise():
    # EMA.update and clip_grad use torch's multi-tensor kernels: the same values as a python loop over tensors
    torch.manual_seed(0)
    ps = [nn.Parameter(torch.randn(s)) for s in [(16, 16), (16,), (3, 3, 3), (1,)] * 3]
    shadow = [p.detach() + torch.randn_like(p) for p in ps]
    ref = [s.clone() for s in shadow]
    EMA(ps, 0.97, shadow=shadow).update()
    for r, p in zip(ref, ps):
        r.lerp_(p.detach(), 1 - 0.97)
    assert all(torch.equal(a, b) for a, b in zip(shadow, ref))
    grads = [torch.randn_like(p) * 5 for p in ps]
    qs = [nn.Parameter(p.detach().clone()) for p in ps]
    for p, q, g in zip(ps, qs, grads):
        p.grad, q.grad = g.clone(), g.clone()
    n = clip_grad(ps, 1.0)
    n_ref = torch.nn.utils.clip_grad_norm_(qs, 1.0, foreach=False)
    assert torch.equal(n, n_ref) and all(torch.equal(p.grad, q.grad) for p, q in zip(ps, qs))


def test_make_optimizer_equals_adamw_with_decay_on_matrices_only():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    b = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    b.load_state_dict(a.state_dict())
    opt_a = make_optimizer(a, lr=0.1, weight_decay=0.5, betas=(0.8, 0.9), eps=1e-6)
    decay = [b[0].weight]
    opt_b = torch.optim.AdamW([{"params": decay, "weight_decay": 0.5},
                               {"params": [b[0].bias, b[1].weight, b[1].bias], "weight_decay": 0.0}],
                              lr=0.1, betas=(0.8, 0.9), eps=1e-6)
    x = torch.randn(8, 4)
    for net, opt_ in [(a, opt_a), (b, opt_b)]:
        for _ in range(3):
            opt_.zero_grad()
            net(x).pow(2).sum().backward()
            opt_.step()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_trained_tensors_round_trip_and_wrong_checkpoints_are_one_line_errors():
    """A checkpoint holds the trained tensors only (a frozen part is left out) and loads back cast to the model's
    dtype; an older full state dict (extra keys) loads too; a missing tensor or another shape is a ConfigError."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    net[0].requires_grad_(False)                       # the frozen base
    named = trained_tensors(net)
    assert list(named) == ["1.weight", "1.bias"]
    saved = {k: v.clone().double() for k, v in detached(named).items()}
    with torch.no_grad():
        net[1].weight.zero_()
    load_trained(named, {**saved, "0.weight": torch.ones(4, 3)}, "--resume")
    assert torch.equal(net[1].weight, saved["1.weight"].float()) and net[1].weight.dtype == torch.float32
    assert not torch.equal(net[0].weight, torch.ones(4, 3))          # extra keys are not loaded
    with pytest.raises(ConfigError, match="lacks 1 of the 2 trained tensors"):
        load_trained(named, {"1.weight": saved["1.weight"]}, "--ckpt x")
    with pytest.raises(ConfigError, match=r"differ in shape .*1.weight"):
        load_trained(named, {**saved, "1.weight": torch.zeros(2, 5)}, "--ckpt x")


@given(scale=st.floats(0.01, 100), max_norm=st.floats(0.0, 10))
def test_clip_grad_returns_the_norm_and_clips(scale, max_norm):
    g = [torch.tensor([3.0, 4.0]) * scale, torch.tensor([12.0]) * scale]  # total norm 13 * scale
    ps = [torch.zeros_like(x, requires_grad=True) for x in g]
    for p, x in zip(ps, g):
        p.grad = x.clone()
    norm = clip_grad(ps, max_norm)
    assert torch.isclose(norm, torch.tensor(13.0 * scale), rtol=1e-5)
    after = torch.cat([p.grad for p in ps]).norm()
    expected = min(13.0 * scale, max_norm) if max_norm > 0 else 13.0 * scale
    assert torch.isclose(after, torch.tensor(expected), rtol=1e-4, atol=1e-6)


def test_autocast():
    x, w = torch.randn(4, 4), torch.randn(4, 4)
    with autocast("bf16", "cpu"):
        assert (x @ w).dtype == torch.bfloat16
    with autocast("fp32", torch.device("cpu")):
        assert (x @ w).dtype == torch.float32
    with pytest.raises(ValueError):
        autocast("fp16", "cpu")


def test_a_script_can_change_a_shared_default():
    @dataclass
    class Longer(RunConfig):
        steps: int = opt(300, "optimizer steps", min=0)

    assert parse_config(Longer, []).steps == 300 and parse_config(Longer, ["--steps", "7"]).steps == 7
    assert [f for f in Longer.__dataclass_fields__][:2] == ["steps", "seed"]


def test_bf16_weights_only_for_a_frozen_lora_base():
    """A trained weight in bf16 does not move under AdamW steps of 1e-4 (the reason base_dtype keeps it float32)."""
    w = torch.full((1000,), 0.05, dtype=torch.bfloat16)
    assert torch.equal(w - 1e-4, w) and not torch.equal(w.float() - 1e-4, w.float())
    assert base_dtype("bf16", "flux") == {"dtype": torch.bfloat16} == base_dtype("bf16", "wan")
    assert base_dtype("bf16", "flux", full_finetune=True) == {} == base_dtype("bf16", "dit")
    assert base_dtype("fp32", "sd3") == {} == base_dtype("bf16", "toy2d")


def test_rats_loads_bf16_weights_only_under_a_lora(monkeypatch):
    """rats.build_backend on a CUDA device: bf16 for the LoRA presets' frozen base, float32 for the DiT and
    --full-finetune (they are trained, and the DiT's EMA teacher is their average)."""
    import rats
    seen = {}
    monkeypatch.setattr(rats, "get_backend", lambda name, **o: seen.update(o))
    for flags, bf16 in ((["--teacher", "flux"], True), (["--teacher", "flux", "--full-finetune"], False),
                        (["--teacher", "dit", "--precision", "bf16"], False),
                        (["--teacher", "flux", "--precision", "fp32"], False)):
        seen.clear()
        rats.build_backend(parse_config(rats.Config, flags, presets=rats.PRESETS), torch.device("cuda"))
        assert (seen.get("dtype") == torch.bfloat16) == bf16, flags
