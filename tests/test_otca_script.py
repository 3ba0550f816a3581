"""otca.py end to end: toy runs (summary, logs, ratio exactly 1 on-policy), user errors, tiny flux / wan smoke runs."""
import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import otca  # noqa: E402
from common.config import parse_config  # noqa: E402


def _run(tmp_path, *flags):
    out = str(tmp_path / "run")
    cfg = parse_config(otca.Config, argv=["--out", out, "--device", "cpu", *flags], presets=otca.PRESETS,
                       checks=[otca.checks])
    otca.main(cfg)
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(ln) for ln in f]
    return summary, rows


def test_toy_two_steps_debug_ratio_is_one(tmp_path):
    """Default toy world: summary fields, per-step logs, and (debug mode) the ratio exactly 1 on the first inner
    step even with a random step fraction per sample and two minibatches."""
    summary, rows = _run(tmp_path, "--steps", "2", "--eval-samples", "64", "--debug", "--nfe", "6",
                         "--train-fraction", "0.6", "--minibatches", "2", "--prompts-per-step", "4")
    assert set(summary["rewards_init"]) == {"mode", "centre", "combined"}
    assert set(summary["rewards"]) == {"mode", "centre", "combined"}
    assert len(summary["credit_per_step"]) == 6
    assert summary["credit_per_step"][-1] == 0.0  # the last (deterministic) step is never trained
    assert len(rows) == 2
    r = rows[0]
    for key in ("r_mode", "r_mode_gstd", "r_centre", "r_centre_gstd", "zero_var_groups", "credit", "obj_weights",
                "ratio_min", "ratio_mean", "ratio_max", "clip_frac"):
        assert key in r, key
    # first step, first minibatch: on-policy, so every ratio is exactly 1 wherever a sample trained the step
    assert r["ratio_first_dev"] == 0.0
    assert abs(sum(r["obj_weights"]) - 1) < 1e-5
    # --eval-only on the finished run: base and trained model at two step counts, eval.md/json written
    run_dir = str(tmp_path / "run")
    ev = otca.main(parse_config(otca.Config, argv=["--eval-only", "--ckpt", run_dir, "--eval-nfe", "2,6",
                                                   "--eval-samples", "32", "--device", "cpu"],
                                presets=otca.PRESETS, checks=[otca.checks]))
    assert [(r["model"], r["nfe"]) for r in ev["rows"]] == [("base", 2), ("base", 6), ("otca", 2), ("otca", 6)]
    assert os.path.isfile(os.path.join(run_dir, "eval.md"))


def test_toy_variants_run_and_uniform_ratio(tmp_path):
    """Every baseline path runs: plain GRPO (uniform + static), DanceGRPO's clip-then-sum with KL and the x0 source,
    the flow_grpo SDE with sum-to-one credit, per sample (tcd) and as the batch profile (tcd_batch)."""
    s, rows = _run(tmp_path / "a", "--steps", "1", "--eval-samples", "0", "--credit", "uniform", "--objectives",
                   "static", "--nfe", "4", "--prompts-per-step", "2", "--debug")
    assert rows[0]["credit"][:3] == [1.0, 1.0, 1.0] and s["rewards"] == {}
    _, rows = _run(tmp_path / "b", "--steps", "2", "--eval-samples", "0", "--objectives", "sum", "--beta-kl", "0.1",
                   "--credit-source", "x0", "--nfe", "4", "--prompts-per-step", "2", "--inner-epochs", "2")
    assert rows[1]["kl"] >= 0
    sum_one = ["--steps", "1", "--eval-samples", "0", "--sde", "flow_grpo", "--credit-norm", "sum_one", "--nfe", "4",
               "--prompts-per-step", "2", "--objectives", "combined", "--same-noise"]
    _, rc = _run(tmp_path / "c", *sum_one)
    _, rd = _run(tmp_path / "d", *sum_one, "--credit", "tcd_batch")
    # each row sums to one over all K steps, so the trained steps (all but the last, logged 0) hold at most one (mean
    # one would give about K - 1); tcd_batch's rows are the batch mean of tcd's rows: the same logged step means
    assert rc[0]["credit"][-1] == 0 and 0 < sum(rc[0]["credit"]) <= 1 + 1e-6
    assert rd[0]["credit"] == pytest.approx(rc[0]["credit"], abs=1e-6)


@pytest.mark.parametrize("flags", [["--nfe", "1"], ["--minibatches", "9"], ["--sde", "cps"], ["--rho", "2"],
                                   ["--credit", "oracle"]])
def test_user_error_is_one_line_exit_2(flags, capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(otca.Config, argv=flags, presets=otca.PRESETS, checks=[otca.checks])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.strip().count("\n") == 0


@pytest.mark.slow
@pytest.mark.parametrize("teacher,reward", [("flux", "hps,clip"), ("wan", "temporal_consistency,motion_smoothness"),
                                            ("dit", "dit_color,dit_size")])
def test_tiny_backend_smoke(tmp_path, teacher, reward):
    """Two training steps on the tiny diffusers twins (and the random tiny DiT, whose text encoder has an eval-mode
    fast path) with a two-objective reward; the ratio is exactly 1 on-policy."""
    torch.manual_seed(0)
    summary, rows = _run(tmp_path, "--teacher", teacher, "--tiny", "--steps", "2", "--reward", reward,
                         "--nfe", "3", "--group-size", "2", "--prompts-per-step", "1", "--micro-batch", "0",
                         "--eval-samples", "4", "--precision", "fp32", "--debug")
    assert len(rows) == 2 and len(summary["rewards"]) == 3
    assert rows[0]["ratio_first_dev"] == 0.0 and all(v is None or v == 1.0 for v in rows[0]["ratio_max"])
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)


def _untimed(rows):
    return [{k: v for k, v in r.items() if k not in ("time", "step_time", "peak_mem_mb")} for r in rows]


def test_resume_is_exact(tmp_path):
    """Four steps straight vs two, stop, --resume to four: the same logged rows (prompts and trained steps come from
    the script's own generator, which the checkpoint holds), weights, optimizer state and credit average. A
    train fraction < 1 so that the trained steps are drawn too."""
    from common.runs import load_checkpoint
    flags = ["--eval-samples", "0", "--nfe", "5", "--prompts-per-step", "2", "--train-fraction", "0.5",
             "--save-every", "2", "--keep", "0"]
    sa, ra = _run(tmp_path / "a", "--steps", "4", *flags)
    _run(tmp_path / "b", "--steps", "2", *flags)
    cfg = parse_config(otca.Config, argv=["--resume", str(tmp_path / "b" / "run"), "--steps", "4"],
                       presets=otca.PRESETS, checks=[otca.checks])
    sb = otca.main(cfg)
    with open(tmp_path / "b" / "run" / "metrics.jsonl") as f:
        rb = [json.loads(ln) for ln in f]
    assert len(ra) == len(rb) == 4 and _untimed(ra) == _untimed(rb)
    assert sa["credit_per_step"] == sb["credit_per_step"]
    ca, cb = (load_checkpoint(str(tmp_path / d / "run"))["state"] for d in "ab")
    assert ca["net"].keys() == cb["net"].keys() and all(torch.equal(ca["net"][k], cb["net"][k]) for k in ca["net"])
    assert all(torch.equal(x, y) for x, y in zip(ca["opt"]["state"][0].values(), cb["opt"]["state"][0].values()))


def test_lora_checkpoint_holds_the_adapter_only(tmp_path):
    """On a LoRA backend a checkpoint holds the trained tensors (the adapter), not the frozen base weights that
    the backend rebuilds (FLUX.1: 0.6 GB instead of 24 GB); --eval-only loads it without copying the base."""
    from common.backends.base import ADAPTER, is_adapter_tensor
    from common.runs import load_checkpoint
    _run(tmp_path, "--teacher", "flux", "--tiny", "--steps", "1", "--reward", "hps,clip", "--nfe", "3",
         "--group-size", "2", "--prompts-per-step", "1", "--eval-samples", "0", "--precision", "fp32",
         "--save-every", "1")
    net = load_checkpoint(str(tmp_path / "run"))["state"]["net"]
    assert len(net) == 22 and all(is_adapter_tensor(k, ADAPTER) for k in net)   # tiny FLUX: 11 projections x A, B
    ev = otca.main(parse_config(otca.Config, argv=["--teacher", "flux", "--tiny", "--reward", "hps,clip",
                                                   "--eval-only", "--ckpt", str(tmp_path / "run"), "--eval-nfe", "3",
                                                   "--eval-samples", "2", "--precision", "fp32", "--device", "cpu"],
                                presets=otca.PRESETS, checks=[otca.checks]))
    base, trained = ev["rows"]
    assert (base["model"], trained["model"]) == ("base", "otca") and base["hps"] != trained["hps"]


def test_other_scripts_refuse_an_otca_checkpoint_in_one_line(tmp_path, capsys):
    """rats.py --eval-only, rtdmd.py --eval-only and rtdmd.py --init on an otca.py run: one line, exit 2."""
    import rats
    import rtdmd
    from common.config import user_errors
    _run(tmp_path, "--steps", "1", "--eval-samples", "0", "--save-every", "1")
    run = str(tmp_path / "run")
    for mod, argv in ((rats, ["--eval-only", "--ckpt", run]), (rtdmd, ["--eval-only", "--ckpt", run]),
                      (rtdmd, ["--init", run, "--stage", "2", "--epochs", "0", "--out", str(tmp_path / "x")])):
        with pytest.raises(SystemExit) as e:
            with user_errors():
                mod.main(parse_config(mod.Config, argv=argv, presets=mod.PRESETS))
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and err[-1].startswith("error: ") and "checkpoint of otca.py" in err[-1], err


def test_lora_and_full_finetune_flags_reach_the_backend(tmp_path, monkeypatch):
    """--lora-rank, --gradient-checkpointing and --full-finetune reach the backend: tiny FLUX trains a rank-4
    adapter; with --full-finetune every transformer weight, kept float32 under --precision bf16 (base_dtype), and a
    KL whose reference is then a frozen copy of the base (no adapter to disable)."""
    from common.runs import load_checkpoint
    from common.train import trained_tensors
    seen, real = [], otca.get_backend
    monkeypatch.setattr(otca, "get_backend", lambda name, **o: seen.append(o) or real(name, **o))
    flags = ["--teacher", "flux", "--tiny", "--steps", "1", "--reward", "hps,clip", "--nfe", "3", "--group-size", "2",
             "--prompts-per-step", "1", "--eval-samples", "0", "--save-every", "1"]
    _run(tmp_path / "lora", *flags, "--precision", "fp32", "--lora-rank", "4", "--gradient-checkpointing")
    net = load_checkpoint(str(tmp_path / "lora" / "run"))["state"]["net"]
    assert len(net) == 22 and {min(v.shape) for v in net.values()} == {4}   # lora_A (4, in), lora_B (out, 4)
    assert seen[-1]["gradient_checkpointing"] is True
    _, rows = _run(tmp_path / "full", *flags, "--precision", "bf16", "--full-finetune", "--beta-kl", "0.1")
    net = load_checkpoint(str(tmp_path / "full" / "run"))["state"]["net"]
    full = trained_tensors(real("flux", tiny=True, device="cpu", full_finetune=True).network)
    assert net.keys() == full.keys() and all(v.dtype == torch.float32 for v in net.values())
    assert rows[0]["kl"] >= 0


@pytest.mark.parametrize("teacher", ["flux", "wan", "flux2", "sd3"])
def test_diffusers_presets_lr_and_clip(teacher):
    """The diffusers presets train a LoRA: lr 3e-4 (otca.md 5.1: 1e-5 is the full fine-tuning value); clip 1e-4."""
    cfg = parse_config(otca.Config, argv=["--teacher", teacher], presets=otca.PRESETS, checks=[otca.checks])
    assert cfg.lr == 3e-4 and not cfg.full_finetune and cfg.lora_rank == 32
    assert cfg.clip == 1e-4        # decisions.md and otca.md 1.10 (the wan preset had 1e-3, no reason recorded)


@pytest.mark.parametrize("script", ["otca", "rats", "rtdmd"])
def test_big_presets_turn_gradient_checkpointing_on(script):
    """decisions.md (gradient checkpointing on big models), rats.md 1.9 (the student transformer and the decoder),
    rtdmd.md 4.3: every script's diffusers presets checkpoint; the toy and the small DiT do not need it."""
    import importlib
    mod = importlib.import_module(script)
    on = {t: parse_config(mod.Config, argv=["--teacher", t], presets=mod.PRESETS).gradient_checkpointing
          for t in ("toy2d", "dit", "flux", "wan", "sd3", "flux2")}
    assert on == {"toy2d": False, "dit": False, "flux": True, "wan": True, "sd3": True, "flux2": True}


def test_sd3_kl_weight_is_on_the_exact_kl_scale():
    """otca.py adds the exact Gaussian KL (common.rl.gaussian_kl_same_std without dt); Flow-GRPO's KL, for which its
    beta 0.04 was tuned, is Delta_t times it (anchors.md c.5). The sd3 preset's beta must be on the exact KL's scale:
    within a factor 1.5 of 0.04 times the mean step size of the trained steps (K = 10, shift 3: 0.0033), not 0.04
    (5.6 to 28 times Flow-GRPO's weight per step)."""
    from common.backends.sd3 import SD3Backend
    from common.flow import make_sigmas
    from common.rl import gaussian_kl_same_std
    cfg = parse_config(otca.Config, argv=["--teacher", "sd3"], presets=otca.PRESETS, checks=[otca.checks])
    sig = make_sigmas(cfg.nfe, shift=cfg.shift or SD3Backend.default_shift)
    delta = (sig[:-1] - sig[1:])[:cfg.nfe - 1]                     # the trained steps: all but the last
    mu_p, mu_q, std = torch.randn(cfg.nfe - 1, 16), torch.randn(cfg.nfe - 1, 16), 0.3
    exact, flow_grpo = gaussian_kl_same_std(mu_p, mu_q, std), gaussian_kl_same_std(mu_p, mu_q, std, dt=delta)
    assert torch.allclose(flow_grpo, delta * exact)
    assert 1 / 1.5 < cfg.beta_kl / (0.04 * float(delta.mean())) < 1.5


def test_eval_only_takes_the_model_and_grid_from_the_checkpoint(tmp_path):
    """--eval-only --ckpt at the trained nfe reproduces the training summary's final rewards exactly, with a non-default
    --shift and --seed given only at training: the schedule's shift and the held-out set's seed come from the run's
    config (the command's defaults had given another sigma grid and other held-out noise)."""
    summary, _ = _run(tmp_path, "--steps", "2", "--nfe", "6", "--shift", "3", "--seed", "1", "--eval-samples", "64",
                      "--prompts-per-step", "2")
    ev = otca.main(parse_config(otca.Config, argv=["--eval-only", "--ckpt", str(tmp_path / "run"), "--eval-nfe", "6",
                                                   "--eval-samples", "64", "--device", "cpu"],
                                presets=otca.PRESETS, checks=[otca.checks]))
    base, trained = ev["rows"]
    assert {k: trained[k] for k in summary["rewards"]} == summary["rewards"]
    assert {k: base[k] for k in summary["rewards_init"]} == summary["rewards_init"]
