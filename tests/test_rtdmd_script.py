"""Smoke runs of rtdmd.py: both stages on the toy and on the tiny sd3, flux and flux2 backends (in-process)."""
import json
import math
import os

import pytest
import torch

import rtdmd
from common.config import parse_config
from toy.evaluate import small_eval_config, toy_eval

def _run(tmp_path, *argv):
    cfg = parse_config(rtdmd.Config, ["--out", str(tmp_path), *argv], presets=rtdmd.PRESETS)
    summary = rtdmd.main(cfg)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    return summary, rows


def test_toy_both_stages_summary(tmp_path):
    s, rows = _run(tmp_path, "--steps", "20", "--epochs", "4", "--eval-samples", "600", "--groups", "4",
                   "--group-size", "4", "--batch", "64")
    for key in ("kl_init_teacher", "kl_student_teacher", "kl_init_tilted", "kl_student_tilted", "reward_student",
                "reward_teacher", "reward_tilted", "kl_estimator"):
        assert key in s
    assert all(math.isfinite(s[k]) for k in ("kl_init_teacher", "kl_student_teacher", "kl_student_tilted"))
    # ring8_rare with r = x_1 and beta = 0.5: E_T[r] = -0.257 (closed form) and the tilt raises it
    assert s["reward_tilted"] > s["reward_teacher"]
    assert {r["stage"] for r in rows} == {1, 2}
    gen_rows = [r for r in rows if "dmd_grad_norm" in r]
    assert len(gen_rows) == 2 and all(r["dmd_grad_norm"] > 0 for r in gen_rows)       # 10:1 TTUR
    st2 = [r for r in rows if r["stage"] == 2]
    assert all(len(r["subgrpo_steps"]) == 2 for r in st2) and all("reward_linear" in r for r in st2)
    # --eval-only on that run: the teacher, the base and the trained generator at two budgets, one table
    out = rtdmd.main(parse_config(rtdmd.Config, ["--eval-only", "--ckpt", str(tmp_path), "--eval-nfe", "2,4"],
                                  presets=rtdmd.PRESETS))
    models = [r["model"] for r in out["rows"]]
    assert models == ["teacher (N=50, Euler)", "base generator (K=2)", "RTDMD (K=2)", "base generator (K=4)",
                      "RTDMD (K=4)"]
    assert all(math.isfinite(r["kl_tilted"]) for r in out["rows"])
    table = json.load(open(tmp_path / "eval.json"))
    assert [r["nfe"] for r in table] == [50, 2, 2, 4, 4] and "| kl_teacher |" in open(tmp_path / "eval.md").read()


def _eval_gen_ema(run_dir, *argv, euler=True):
    """toy_eval of the run's final checkpoint's gen_ema, loaded into a fresh toy generator."""
    from common.backend import get_backend
    from common.rewards import build_reward
    from common.runs import load_checkpoint
    from common.train import load_trained, trained_tensors
    cfg = parse_config(rtdmd.Config, list(argv), presets=rtdmd.PRESETS)
    backend = get_backend("toy2d", seed=cfg.seed, device=torch.device("cpu"), teacher=cfg.toy_teacher)
    reward = build_reward(cfg.reward, device=backend.device)
    load_trained(trained_tensors(backend.network), load_checkpoint(str(run_dir), method="rtdmd")["state"]["gen_ema"],
                 "gen_ema")
    return toy_eval(backend, backend.network, backend.sigmas(4), reward, cfg if euler else small_eval_config(cfg),
                    backend.target(0).tilt(reward.rewards[0], cfg.beta), euler)


def test_stage2_is_evaluated_on_the_ema_that_the_checkpoint_ships(tmp_path):
    """The summary's stage-2 numbers and the stage-2 in-training evals are those of gen_ema (what --init, --eval-only
    and inference load); they were of the raw trained weights, a different model."""
    argv = ["--steps", "4", "--fake-ratio", "2", "--epochs", "5", "--eval-samples", "300", "--groups", "2",
            "--group-size", "4", "--batch", "16"]
    s, rows = _run(tmp_path, *argv)
    ev = _eval_gen_ema(tmp_path, *argv)
    assert {k: s[f"{k}_stage2"] for k in ev} == ev and s["kl_student_tilted"] == ev["kl_hist_tilted"]
    last = _eval_gen_ema(tmp_path, *argv, euler=False)     # the eval logged after the last epoch: the same EMA
    assert rows[-1]["eval_kl_hist_tilted"] == pytest.approx(last["kl_hist_tilted"], rel=1e-6)


def test_resumed_inside_stage2_gives_the_uninterrupted_summary(tmp_path):
    """A run resumed inside stage 2 reports the stage-1 numbers of the stage-1 generator (carried in the checkpoint)
    and ends with the uninterrupted run's summary; it used to evaluate its stage-2 weights as *_stage1."""
    import shutil

    from common.runs import list_checkpoints
    a, c = tmp_path / "a", tmp_path / "c"
    argv = ["--steps", "4", "--fake-ratio", "2", "--epochs", "3", "--eval-samples", "300", "--groups", "2",
            "--group-size", "4", "--batch", "16", "--save-every", "5", "--keep", "0"]
    s_a, _ = _run(a, *argv)
    shutil.copytree(a, c)
    for step, path in list_checkpoints(str(c)):
        if step > 5:                  # keep the checkpoint after stage-2 epoch 1 (stage 1: steps 1..4)
            os.remove(path)
    s_c = rtdmd.main(parse_config(rtdmd.Config, ["--resume", str(c)], presets=rtdmd.PRESETS))
    assert "kl_student_teacher" in s_c and s_c == s_a


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sd3", "flux", "flux2"])
def test_tiny_backends_both_stages(tmp_path, backend):
    s, rows = _run(tmp_path, "--teacher", backend, "--tiny", "--steps", "1", "--fake-ratio", "1", "--epochs", "1",
                   "--groups", "1", "--group-size", "2", "--batch", "2", "--device", "cpu", "--precision", "fp32",
                   "--reward", "clip")
    assert [r["stage"] for r in rows] == [1, 2]
    for r in rows:
        for k in ("fake_loss", "consistency", "grad_norm"):
            assert math.isfinite(r[k])
    assert math.isfinite(rows[0]["dmd_grad_norm"]) and rows[1]["subgrpo_steps"] in ([0, 1], [0, 2], [1, 2])
    assert math.isfinite(s["student_clip"])


def test_user_error_is_one_line(tmp_path, capsys):
    from common.config import user_errors
    with pytest.raises(SystemExit) as e:
        with user_errors():
            rtdmd.main(parse_config(rtdmd.Config, ["--sub-steps", "7", "--out", str(tmp_path)], presets=rtdmd.PRESETS))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.strip().count("\n") == 0 and "sub-steps" in err
    with pytest.raises(SystemExit) as e:                         # a bad value: argparse's error, also one line
        parse_config(rtdmd.Config, ["--advantage", "nope"], presets=rtdmd.PRESETS)
    assert e.value.code == 2


def test_flux_preset_turns_the_consistency_off_in_stage_2_only():
    """Spec 2.4 / 5.1 / 3.6: gamma = 0.01 in stage 1 on every backbone; stage 2 off on FLUX.1-dev (the flux preset
    set --gamma 0, which also removed it from stage 1), on on FLUX.2-klein-4B (the flux2 preset's default)."""
    cfg = lambda *a: parse_config(rtdmd.Config, list(a), presets=rtdmd.PRESETS)
    assert (cfg("--teacher", "flux").gamma, cfg("--teacher", "flux").gamma2) == (0.01, 0.0)
    assert (cfg("--teacher", "flux2").gamma, cfg("--teacher", "flux2").gamma2) == (0.01, None)
    assert cfg("--teacher", "flux", "--gamma2", "none").gamma2 is None and cfg("--gamma2", "0.1").gamma2 == 0.1


def test_stage2_weight_decay_spares_biases_and_norms(tmp_path, monkeypatch):
    """--weight-decay2 goes to the generator's matrices only: common.train.make_optimizer's no-decay group (biases,
    normalisation scales) stays at 0 in stage 2 (it was set on every group)."""
    made = []
    real = rtdmd.make_optimizer
    monkeypatch.setattr(rtdmd, "make_optimizer", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    _run(tmp_path, "--steps", "2", "--epochs", "1", "--eval-samples", "100", "--groups", "1", "--group-size", "4",
         "--batch", "8", "--weight-decay2", "0.01")
    groups = made[1].param_groups                                  # opt_fake, then opt_gen
    assert {g["params"][0].ndim >= 2: g["weight_decay"] for g in groups} == {True: 0.01, False: 0.0}
    assert all(g["lr"] == 1e-4 for g in groups)                     # --lr2 (toy preset) on both


@pytest.mark.parametrize("stage", ["1", "all"])
def test_init_is_for_stage_2_only(tmp_path, stage, capsys):
    """--init with --stage 1 or all is a one-line error (it ran: the stage-1 EMA was made before the loaded
    weights, and stage 1 trained on from them)."""
    with pytest.raises(SystemExit) as e:
        parse_config(rtdmd.Config, ["--init", str(tmp_path), "--stage", stage], presets=rtdmd.PRESETS,
                     checks=[rtdmd.checks])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.strip().count("\n") == 0 and "--init" in err and "--stage 2" in err
    assert rtdmd.checks(parse_config(rtdmd.Config, ["--init", str(tmp_path), "--stage", "2"],
                                     presets=rtdmd.PRESETS)) is None


@pytest.mark.parametrize("ts", ["1000,1200,500", "1000", "1000,750,0", "1500,750"])
def test_timesteps_must_fall_within_the_schedule(ts, capsys):
    """Rising, single, zero-ending or > 1000 raw timesteps are one-line errors at parse time (they used to run)."""
    with pytest.raises(SystemExit) as e:
        parse_config(rtdmd.Config, ["--timesteps", ts], presets=rtdmd.PRESETS, checks=[rtdmd.checks])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.strip().count("\n") == 0 and "--timesteps must fall" in err
    assert rtdmd.checks(parse_config(rtdmd.Config, ["--timesteps", "1000,600,300"], presets=rtdmd.PRESETS)) is None


@pytest.mark.parametrize("family", ["flux", "flux2", "sd3"])
def test_timesteps_take_the_family_shift(family):
    """Raw --timesteps off the uniform grid get the family's shift rule at that K: on FLUX.1 / FLUX.2 the dynamic
    exp(mu) (a static backend.shift, the scheduler config's 3, was applied). The default timesteps: the family's
    own 4-step grid, bit for bit."""
    from common.backend import get_backend
    from common.flow import shift_sigmas
    be = get_backend(family, tiny=True)
    assert torch.equal(be.sigmas(4, timesteps=[1000, 750, 500, 250]), be.sigmas(4))
    d = float(be.sigmas(3)[1])                      # the uniform 3-step grid at t = 2/3: the family's shift at K = 3
    s = d * (1 / 3) / ((2 / 3) * (1 - d))
    torch.testing.assert_close(be.sigmas(3, timesteps=[1000, 600, 300]),
                               torch.tensor([*shift_sigmas(torch.tensor([1.0, 0.6, 0.3]), s), 0.0]))


def test_timesteps_grid_in_training_and_eval_only(tmp_path, monkeypatch):
    """rtdmd trains on backend.sigmas(K, timesteps=--timesteps), and --eval-only evaluates at K = len(--timesteps)
    on that grid (it used the uniform one), at other K on the family's uniform grid."""
    from toy.backend import Toy2DBackend
    seen, real = [], Toy2DBackend.sigmas
    monkeypatch.setattr(Toy2DBackend, "sigmas", lambda self, K, shift=None, timesteps=None:
                        seen.append((K, timesteps and list(timesteps))) or real(self, K, shift, timesteps))
    ts = ["--timesteps", "1000,600,300"]
    _run(tmp_path, *ts, "--steps", "1", "--epochs", "0", "--eval-samples", "100", "--batch", "8")
    assert seen == [(3, [1000, 600, 300])]
    seen.clear()
    rtdmd.main(parse_config(rtdmd.Config, ["--eval-only", "--ckpt", str(tmp_path), *ts, "--eval-nfe", "3,2"],
                            presets=rtdmd.PRESETS))
    assert seen[1:] == [(50, None), (3, [1000, 600, 300]), (2, None)]    # (main's training grid first)


@pytest.mark.usefixtures("restore_torch_globals")
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_precision_sets_autocast_on_the_training_calls(tmp_path, monkeypatch, precision):
    """--precision bf16 runs the training step's network calls under bf16 autocast (the flag used to be read
    nowhere); fp32 none of them. The evaluations run outside it either way."""
    from toy.backend import Toy2DBackend
    seen = []
    real = Toy2DBackend.velocity

    def spy(self, net, *a, **k):
        seen.append(torch.is_autocast_enabled("cpu"))
        return real(self, net, *a, **k)
    monkeypatch.setattr(Toy2DBackend, "velocity", spy)
    rtdmd.main(parse_config(rtdmd.Config, ["--steps", "2", "--epochs", "1", "--eval-samples", "100", "--precision",
                                           precision, "--out", str(tmp_path)], presets=rtdmd.PRESETS))
    assert any(seen) == (precision == "bf16") and not all(seen)


@pytest.mark.usefixtures("restore_torch_globals")
def test_eval_only_leaves_the_process_group(tmp_path):
    """--eval-only cleans up like a training run (dist.cleanup at the end of main): under torchrun the process group
    is left, not leaked. A one-process gloo group stands in for torchrun's."""
    import torch.distributed as tdist
    tdist.init_process_group("gloo", store=tdist.HashStore(), rank=0, world_size=1)
    try:
        out = rtdmd.main(parse_config(rtdmd.Config, ["--eval-only", "--eval-nfe", "2", "--device", "cpu", "--out",
                                                     str(tmp_path)], presets=rtdmd.PRESETS))
        assert [r["model"] for r in out["rows"]] == ["teacher (N=50, Euler)", "base generator (K=2)"]
        assert not tdist.is_initialized()
    finally:
        if tdist.is_initialized():
            tdist.destroy_process_group()
