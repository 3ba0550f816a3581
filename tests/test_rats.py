"""rats.py end to end: identity at K = N, the EMA teacher, inference cost, user errors, tiny real backends."""
import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import rats  # noqa: E402
from common.config import parse_config  # noqa: E402
from common.flow import rollout  # noqa: E402
from common.runs import load_checkpoint  # noqa: E402

TOY = ["--teacher", "toy2d", "--batch-size", "16", "--eval-size", "8", "--eval-batch", "8", "--teacher-nfe", "6"]


pytestmark = pytest.mark.usefixtures("restore_torch_globals")   # tests/conftest.py


def _run(tmp_path, *argv):
    cfg = parse_config(rats.Config, list(TOY) + ["--out", str(tmp_path)] + list(argv), presets=rats.PRESETS)
    return cfg, rats.main(cfg)


def _metrics(path):
    with open(os.path.join(path, "metrics.jsonl")) as fh:
        return [json.loads(ln) for ln in fh if ln.strip()]


def test_identity_at_K_equal_N(tmp_path):
    # K = N, student = teacher (step 1 is computed before any update), same noise: the matched horizons are j(k) = k,
    # the shaping loss is 0, R_S = R_T and the gate is exactly 1/2 for every sample (rats.md property 13).
    _, summary = _run(tmp_path, "--nfe", "6", "--teacher-nfe", "6", "--steps", "1", "--tau", "0.05")
    first = _metrics(tmp_path)[0]
    assert summary["matching_index"] == list(range(7))
    assert first["shape_loss"] == pytest.approx(0.0, abs=1e-6)
    assert first["shape_h"] == pytest.approx([0.0] * 6, abs=1e-6)
    assert first["gap"] == 0.0 and first["r_student"] == first["r_teacher"]
    assert first["gate_mean"] == 0.5 and first["gate_std"] == 0.0
    assert summary["reward_student_init"] == pytest.approx(summary["reward_teacher"], abs=1e-6)


def test_teacher_gets_no_gradient_and_moves_only_by_ema():
    from common.backend import get_backend
    backend = get_backend("toy2d")
    net = backend.network
    base = {n: p.detach().clone() for n, p in net.named_parameters()}
    mu = 0.9
    teacher, ema, params = rats.make_teacher(backend, net, mu)
    opt = torch.optim.SGD(params, lr=0.1)
    assert not {id(p) for p in teacher.parameters()} & {id(p) for g in opt.param_groups for p in g["params"]}
    eps = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        t = rollout(backend.velocity_fn(teacher, None), eps, backend.sigmas(10))
    s = rollout(backend.velocity_fn(net, None), eps, backend.sigmas(2), grad="all")
    ((s.x0[:, -1] - t.x0[:, -1]) ** 2).mean().backward()
    assert all(p.grad is None for p in teacher.parameters())
    opt.step()
    for n, p in teacher.named_parameters():  # the optimizer step leaves the teacher where it was
        assert torch.equal(p, base[n])
    ema.update()
    for n, p in teacher.named_parameters():  # theta_T' = mu theta_T + (1 - mu) theta_S, elementwise
        expect = mu * base[n] + (1 - mu) * dict(net.named_parameters())[n].detach()
        torch.testing.assert_close(p, expect, atol=1e-6, rtol=1e-6)


def test_script_ema_teacher_and_frozen_teacher(tmp_path):
    # End to end: after one step the saved teacher (EMA shadow) is mu * base + (1 - mu) * student.
    from common.backend import get_backend
    base = {n: p.detach().clone() for n, p in get_backend("toy2d").network.named_parameters()}
    _, trained = _run(tmp_path / "ema", "--steps", "1", "--ema-decay", "0.5", "--nfe", "2")
    # --eval-only reloads the student (and its K) from the checkpoint: the same score on the same eval set
    cfg = parse_config(rats.Config, TOY + ["--eval-only", "--ckpt", str(tmp_path / "ema"), "--nfe", "7"])
    again = rats.main(cfg)
    assert cfg.nfe == 2 and again["reward_student"] == pytest.approx(trained["reward_student"], abs=1e-6)
    state = load_checkpoint(str(tmp_path / "ema"))["state"]
    names = list(state["net"])
    for n, shadow in zip(names, state["ema"]["shadow"]):
        torch.testing.assert_close(shadow, 0.5 * base[n] + 0.5 * state["net"][n], atol=1e-6, rtol=1e-6)
        assert not torch.equal(state["net"][n], base[n]) or n.endswith("bias")
    _run(tmp_path / "frozen", "--steps", "2", "--ema-decay", "1.0", "--nfe", "2")
    state = load_checkpoint(str(tmp_path / "frozen"))["state"]
    for n, shadow in zip(state["net"], state["ema"]["shadow"]):
        assert torch.equal(shadow, base[n])


def test_inference_costs_exactly_K_network_evaluations():
    from common.backend import get_backend
    from common.rewards import build_reward
    backend = get_backend("toy2d")
    net = backend.network
    teacher = backend.frozen_copy(net)
    calls = {"student": 0, "teacher": 0}
    net.register_forward_hook(lambda *a: calls.__setitem__("student", calls["student"] + 1))
    teacher.register_forward_hook(lambda *a: calls.__setitem__("teacher", calls["teacher"] + 1))
    cfg = rats.Config(eval_size=32, eval_batch=32)
    ev = rats.eval_set(backend, cfg)
    reward = build_reward("toy_quadratic")
    for K in (1, 3, 5):
        calls["student"] = 0
        out, lat = rats.evaluate(backend, net, reward, ev, backend.sigmas(K), cfg)
        assert calls == {"student": K, "teacher": 0} and lat.shape == (32, 2)
        assert out["reward"] == pytest.approx(float(reward(lat).mean()), abs=1e-5)


def test_local_shaping_and_truncated_reward_run(tmp_path):
    # The ablation paths run and log one shaping value per horizon (states: K horizons too).
    _run(tmp_path / "a", "--steps", "2", "--nfe", "3", "--detach-inputs", "--match", "states",
         "--gate", "hard", "--loss-mode", "complementary", "--gap-norm", "running_std", "--tau", "1")
    _run(tmp_path / "b", "--steps", "2", "--nfe", "3", "--reward-grad-steps", "1", "--skip-first-horizon")
    ma, mb = _metrics(tmp_path / "a"), _metrics(tmp_path / "b")
    assert len(ma[-1]["shape_h"]) == 3 and len(mb[-1]["shape_h"]) == 2
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in ma + mb)


@pytest.mark.parametrize("argv, needle", [
    (["--tau", "0"], "--tau must be > 0"),
    (["--nfe", "2", "--reward-grad-steps", "3"], "exceeds --nfe"),
    (["--gate", "soft"], "choose one of"),
    (["--teacher", "nope"], "unknown backend"),
    (["--skip-first-horizon", "--match", "states"], "--match states has none"),
    (["--nfe", "4", "--teacher-nfe", "3"], "--teacher-nfe 3 is below --nfe 4"),
])
def test_user_errors_one_line_exit_2(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(rats.Config, argv, presets=rats.PRESETS, checks=[rats.checks])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1


def test_teacher_steps_at_least_student_steps():
    """N < K would leave student noise levels with no teacher level near them (several share one, and the student's
    x0 at sigma 0.75 is pulled toward the teacher's at sigma 1 with K = 4, N = 2): refused, N = K and N > K are fine,
    and --eval-only (its K and N come from the checkpoint) ignores the flags."""
    def parse(*argv):
        return parse_config(rats.Config, list(argv), presets=rats.PRESETS, checks=[rats.checks])
    sigmas = rats.get_backend("toy2d").sigmas
    assert rats.match_horizons(sigmas(2), sigmas(4)).tolist() == [0, 0, 1, 1, 2]
    assert parse("--nfe", "3", "--teacher-nfe", "3").teacher_nfe == 3 and parse("--nfe", "2", "--teacher-nfe", "3")
    assert parse("--eval-only", "--ckpt", ROOT, "--nfe", "7", "--teacher-nfe", "6").nfe == 7   # (parsing only)


@pytest.mark.slow
@pytest.mark.parametrize("backend, reward", [("flux", "hps"), ("wan", "frames:hps")])
def test_smoke_tiny_real_backends(tmp_path, backend, reward):
    # Two training steps of the same loop on the offline miniatures (in-process: one interpreter, one import).
    argv = ["--teacher", backend, "--tiny", "--steps", "2", "--reward", reward, "--nfe", "2", "--teacher-nfe", "4",
            "--batch-size", "1", "--grad-accum", "1", "--eval-size", "2", "--eval-batch", "2", "--out", str(tmp_path),
            "--device", "cpu"]
    cfg = parse_config(rats.Config, argv, presets=rats.PRESETS, checks=[rats.checks])
    summary = rats.main(cfg)
    on_disk = json.load(open(tmp_path / "summary.json"))
    assert on_disk["status"] == "finished" and on_disk["step"] == 2
    for k in ("reward_teacher", "reward_student_init", "reward_student"):
        assert torch.isfinite(torch.tensor(summary[k]))
    rows = _metrics(tmp_path)
    assert len(rows) == 2 and len(rows[0]["shape_h"]) == 2
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)


def test_resume_is_exact(tmp_path):
    # Two steps straight vs one step, stop, --resume for the second: the same student, teacher and logged row.
    _, summ_a = _run(tmp_path / "a", "--steps", "2", "--nfe", "2")
    _run(tmp_path / "b", "--steps", "1", "--nfe", "2")
    cfg = parse_config(rats.Config, ["--resume", str(tmp_path / "b"), "--steps", "2"], presets=rats.PRESETS)
    summ_b = rats.main(cfg)
    # the summary too: dist_to_teacher needs the base teacher's samples, which the checkpoint carries (before, the
    # resumed run reported the first run's value)
    assert summ_a == summ_b and "dist_to_teacher" in summ_b
    sa, sb = load_checkpoint(str(tmp_path / "a"))["state"], load_checkpoint(str(tmp_path / "b"))["state"]
    for n in sa["net"]:
        assert torch.equal(sa["net"][n], sb["net"][n])
    for x, y in zip(sa["ema"]["shadow"], sb["ema"]["shadow"]):
        assert torch.equal(x, y)
    ra, rb = _metrics(tmp_path / "a")[-1], _metrics(tmp_path / "b")[-1]
    assert ra["step"] == rb["step"] == 2 and ra["loss"] == rb["loss"] and ra["gate_mean"] == rb["gate_mean"]


def test_swapped_ema_teacher_reproduces_the_teacher_copy(tmp_path):
    # --teacher-copy swap keeps only the averaged tensors and swaps them into the student for the teacher's calls:
    # the same EMA arithmetic on the same values, so the run is identical to the one with a separate teacher copy
    argv = ["--steps", "4", "--ema-decay", "0.5", "--eval-every", "2"]
    _, full = _run(tmp_path / "full", *argv)
    _, swap = _run(tmp_path / "swap", *argv, "--teacher-copy", "swap")
    drop = {"time", "step_time", "peak_mem_mb"}
    m_full, m_swap = _metrics(tmp_path / "full"), _metrics(tmp_path / "swap")
    assert [{k: v for k, v in r.items() if k not in drop} for r in m_full] == \
        [{k: v for k, v in r.items() if k not in drop} for r in m_swap]
    for key in ("reward_teacher", "reward_student_init", "reward_student", "reward_teacher_ema"):
        assert full[key] == swap[key], key
    # the trained weights and the EMA shadow saved by both runs agree too
    a, b = load_checkpoint(str(tmp_path / "full"))["state"], load_checkpoint(str(tmp_path / "swap"))["state"]
    assert all(torch.equal(a["net"][k], b["net"][k]) for k in a["net"])
    assert all(torch.equal(x, y) for x, y in zip(a["ema"]["shadow"], b["ema"]["shadow"]))


def _main_error(capsys, argv):
    """rats.main under user_errors: (exit status, the stderr lines that are errors, stderr)."""
    from common.config import user_errors
    with pytest.raises(SystemExit) as e:
        with user_errors():
            rats.main(parse_config(rats.Config, argv, presets=rats.PRESETS, checks=[rats.checks]))
    err = capsys.readouterr().err
    return e.value.code, [ln for ln in err.splitlines() if ln.startswith("error:")], err


def test_a_guidance_the_model_would_ignore_is_one_line(tmp_path, capsys, monkeypatch):
    """--guidance on a model that takes none was dropped without a word (backend.guidance_applies): refused in one
    line, exit 2, on the one-class toy and on a step-distilled FLUX.2 klein (no CFG, no guidance embedding)."""
    code, lines, err = _main_error(capsys, [*TOY, "--guidance", "3", "--out", str(tmp_path / "a")])
    assert code == 2 and lines == ["error: --guidance 3 would be ignored: the toy2d model takes no guidance "
                                   "(step-distilled, no guidance embedding, or a one-class toy): leave --guidance "
                                   "out, or pass a base checkpoint with --pretrained"] and err.count("\n") == 1
    real = rats.get_backend
    monkeypatch.setattr(rats, "get_backend", lambda *a, **k: real(*a, distilled=True, **k))   # as klein-4B is
    code, lines, err = _main_error(capsys, ["--teacher", "flux2", "--tiny", "--guidance", "4", "--device", "cpu",
                                            "--out", str(tmp_path / "b")])
    assert code == 2 and len(lines) == 1 and err.rstrip().endswith(lines[0])
    assert lines[0].startswith("error: --guidance 4 would be ignored: the flux2 model (--tiny) takes no guidance")
    monkeypatch.undo()
    _run(tmp_path / "c", "--guidance", "1", "--steps", "1")      # guidance 1 (none) is accepted
