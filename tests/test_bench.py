"""benchmarks/harness.py on the toy: the structure of its records and the network-evaluation counts per step against
the methods' formulas (no timing assertions: the machine is shared)."""
from __future__ import annotations

import collections
import json

import pytest
import torch

from benchmarks.harness import cli, expected_calls, measure


pytestmark = pytest.mark.usefixtures("restore_torch_globals")   # tests/conftest.py


def _one(records, phase="train"):
    (r,) = [r for r in records if r["phase"] == phase]
    return r


def _check_common(r, steps):
    assert r["steps"] == steps and len(r["step_times_s"]) == steps
    assert r["nfe_match"], (r["nfe_calls"], r["nfe_expected"])
    assert r["unaccounted_forwards"] == 0          # every forward of the hooked networks went through velocity()
    assert r["step_time_s"] > 0 and r["replay_s"] > 0 and r["overhead_ratio"] > 0
    # the loop ratio also sets the decode / reward / text-encoder replays apart: never above the network-only ratio
    assert r["aux_replay_s"] >= 0 and r["instrument_s"] >= 0
    assert r["loop_overhead_ratio"] <= r["overhead_ratio"]
    assert r["peak_mem_mb"] >= r["rss_before_mb"] > 0
    assert r["samples_per_s"] == pytest.approx(r["samples_per_step"] / r["step_time_s"], rel=1e-2)


def test_rats_counts_k_student_with_grad_and_n_teacher_without(tmp_path):
    K, N, B = 3, 6, 16
    r = _one(measure("rats", ["--steps", "3", "--nfe", str(K), "--teacher-nfe", str(N), "--batch-size", str(B),
                              "--eval-size", "8", "--eval-batch", "8"], replays=1))
    _check_common(r, 3)
    # per step: K student calls with gradients, N teacher calls without, each on the whole batch
    assert r["nfe_calls"] == {"student/grad": K, "teacher/nograd": N}
    assert r["nfe_samples"] == {"student/grad": K * B, "teacher/nograd": N * B}
    assert r["eval_calls"] > 0                      # the evaluations were seen, and kept out of the step counts
    assert r["aux_replay_s"] > 0                    # the reward (with its backward to the samples) was replayed


def test_paired_replays_leave_the_training_run_unchanged(tmp_path):
    # the harness replays every step right after it (RNG states restored): the run's logged values are those of the
    # same run without instruments
    import rats
    from common.config import parse_config
    args = ["--steps", "3", "--nfe", "2", "--teacher-nfe", "5", "--batch-size", "8", "--eval-size", "8",
            "--eval-batch", "8"]
    measure("rats", args, replays=2, out=str(tmp_path / "bench"))
    rats.main(parse_config(rats.Config, argv=[*args, "--out", str(tmp_path / "plain")], presets=rats.PRESETS))
    rows = [[json.loads(ln) for ln in open(tmp_path / d / "metrics.jsonl")] for d in ("bench/run", "plain")]
    keys = ("loss", "r_student", "shape_loss", "grad_norm", "gate_mean")
    assert [[r[k] for k in keys] for r in rows[0]] == [[r[k] for k in keys] for r in rows[1]]


def test_rats_truncated_reward_gradient_moves_calls_to_no_grad():
    r = _one(measure("rats", ["--steps", "2", "--nfe", "3", "--teacher-nfe", "4", "--reward-grad-steps", "1",
                              "--batch-size", "8", "--eval-size", "8", "--eval-batch", "8"], replays=1))
    assert r["nfe_match"]
    assert r["nfe_calls"] == {"student/grad": 1, "student/nograd": 2, "teacher/nograd": 4}


def test_otca_counts_group_rollout_and_recomputation():
    G, P, K = 4, 2, 5
    r = _one(measure("otca", ["--steps", "2", "--nfe", str(K), "--group-size", str(G), "--prompts-per-step", str(P),
                              "--eval-samples", "8", "--no-reuse-rollout-graph"], replays=1))
    _check_common(r, 2)
    # G*P*K rollout sample evaluations without gradients; (K - 1) trained steps recomputed with gradients
    assert r["nfe_samples"] == {"student/nograd": G * P * K, "student/grad": G * P * (K - 1)}
    assert r["nfe_calls"] == {"student/nograd": K, "student/grad": K - 1}


def test_otca_reuse_rollout_graph_has_no_recomputation():
    G, P, K = 4, 2, 5
    r = _one(measure("otca", ["--steps", "2", "--nfe", str(K), "--group-size", str(G), "--prompts-per-step", str(P),
                              "--eval-samples", "8", "--reuse-rollout-graph"], replays=1))
    _check_common(r, 2)
    # the rollout's K - 1 stochastic steps with gradients (the loss's log-probs), the deterministic last one without
    assert r["nfe_samples"] == {"student/nograd": G * P, "student/grad": G * P * (K - 1)}
    assert r["nfe_calls"] == {"student/nograd": 1, "student/grad": K - 1}


def test_rtdmd_counts_per_stage():
    recs = measure("rtdmd", ["--steps", "4", "--fake-ratio", "2", "--epochs", "2", "--batch", "16", "--groups", "2",
                             "--group-size", "4", "--fake-updates2", "1", "--dmd-through", "last",
                             "--eval-samples", "100"],
                   replays=1)
    s1, s2 = _one(recs, "stage1"), _one(recs, "stage2")
    _check_common(s1, 4)
    _check_common(s2, 2)
    # stage 1 (gamma > 0): the fake score's ambient call plus one batched call on the two consistency samples, every
    # iteration; the generator turn (every 2nd) adds one generator call with grad and one teacher and one fake call
    assert s1["nfe_calls"]["fake/grad"] == 2 and s1["nfe_samples"]["fake/grad"] == 16 + 2 * 16
    assert s1["nfe_calls"]["student/grad"] == s1["nfe_calls"]["teacher/nograd"] == 0.5
    # stage 2: the K = 4 rollout calls are the loss's: |S| = 2 SubGRPO steps + the last step with grad, 1 without;
    # one teacher/fake pair
    assert s2["nfe_calls"] == {"fake/grad": 2, "fake/nograd": 1, "student/grad": 3, "student/nograd": 1,
                               "teacher/nograd": 1}


def test_rtdmd_gamma2_turns_the_consistency_off_in_stage_2_only():
    """--gamma2 0 (the flux preset, spec 3.6): stage 1 keeps its consistency call (--gamma 0.01), stage 2's fake
    update has none; the harness's expected counts follow the stage's weight."""
    recs = measure("rtdmd", ["--steps", "2", "--fake-ratio", "2", "--epochs", "1", "--batch", "8", "--groups", "1",
                             "--group-size", "4", "--fake-updates2", "1", "--gamma2", "0", "--eval-samples", "100"],
                   replays=1)
    s1, s2 = _one(recs, "stage1"), _one(recs, "stage2")
    assert s1["nfe_match"] and s2["nfe_match"]
    assert s1["nfe_calls"]["fake/grad"] == 2 and s2["nfe_calls"]["fake/grad"] == 1


def test_rtdmd_dmd_through_all_rollout_in_the_graph_and_one_batched_call():
    recs = measure("rtdmd", ["--steps", "2", "--fake-ratio", "2", "--epochs", "1", "--batch", "8", "--groups", "1",
                             "--group-size", "4", "--gamma", "0", "--dmd-through", "all", "--eval-samples", "100"],
                   replays=1)
    s2 = _one(recs, "stage2")
    assert s2["nfe_match"]
    # the K = 4 rollout calls in the graph (the chain), then one batched call at the fixed inputs of the |S| = 2
    # trained steps and the last step (reward back-propagation): (2 + 1) x B samples, B = 4
    assert s2["nfe_calls"]["student/grad"] == 4 + 1 and "student/nograd" not in s2["nfe_calls"]
    assert s2["nfe_samples"]["student/grad"] == 4 * 4 + 3 * 4


def test_expected_calls_formula_independent_of_the_run():
    cfg = type("C", (), dict(nfe=4, teacher_nfe=20, grad_accum=3, reward_grad_steps=0))()
    assert expected_calls("rats", cfg, {}) == collections.Counter({("student", True): 12, ("teacher", False): 60})
    cfg = type("C", (), dict(nfe=10, inner_epochs=2, beta_kl=0.04))()
    assert expected_calls("otca", cfg, {}, chunks=3) == collections.Counter(
        {("student", False): 30, ("student", True): 54, ("reference", False): 54})
    cfg = type("C", (), dict(nfe=10, inner_epochs=2, beta_kl=0.04, train_fraction=0.6))()   # n = round(5.4) = 5
    assert expected_calls("otca", cfg, {}, chunks=3) == collections.Counter(
        {("student", False): 30, ("student", True): 30, ("reference", False): 30})


def test_cli_writes_json_and_rejects_bad_options(tmp_path, capsys):
    assert cli(["rats", "--json", str(tmp_path / "x.json"), "--backend-options", "{bad"]) == 2
    assert "not JSON" in capsys.readouterr().err
    out = tmp_path / "r.json"
    assert cli(["otca", "--json", str(out), "--replays", "1", "--", "--steps", "2", "--nfe", "3", "--group-size",
                "2", "--prompts-per-step", "2", "--eval-samples", "4"]) == 0
    (r,) = json.load(open(out))
    assert r["method"] == "otca" and r["nfe_match"] and r["argv"].startswith("--steps 2")


def test_suite_rejects_unknown_method(capsys):
    from benchmarks.__main__ import main
    assert main(["--only", "ratz", "--out", "unused"]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0


def test_dit_throughput_counts_flops_and_reports_mfu_only_with_a_peak():
    from benchmarks.dit_throughput import main
    r = main(["--preset", "tiny", "--resolution", "16", "--batch", "2", "--warmup", "0", "--steps", "1",
              "--device", "cpu", "--threads", "1", "--peak-tflops", "1"])
    assert r["flops_per_step"] > 0 and r["dtype"] == "float32" and not r["compile"]
    assert r["mfu"] == pytest.approx(r["flops_per_step"] / r["step_s_median"] / 1e12, rel=0.02, abs=1e-4)
    assert main(["--preset", "tiny", "--resolution", "16", "--batch", "2", "--warmup", "0", "--steps", "1",
                 "--device", "cpu", "--threads", "1"])["mfu"] is None
    # --amp: float32 weights under bf16 autocast (the scripts' mixed precision); the same model FLOPs are counted
    amp = main(["--preset", "tiny", "--resolution", "16", "--batch", "2", "--warmup", "0", "--steps", "1",
                "--device", "cpu", "--threads", "1", "--amp"])
    assert amp["amp"] and amp["dtype"] == "float32" and amp["flops_per_step"] == r["flops_per_step"]


@pytest.mark.slow
def test_flux_method_step_tiny_counts_calls():
    from benchmarks.flux_method_step import main
    r = main(["--method", "grpo", "--tiny", "--device", "cpu", "--nfe", "3", "--group-size", "4", "--micro-batch", "2",
              "--train-fraction", "1", "--warmup", "0", "--steps", "1", "--threads", "1"])
    # 2 chunks x K rollout calls; every non-final step of every chunk recomputed (train fraction 1)
    assert r["calls_per_step"] == {"rollout_nograd": 6, "recompute_grad": 4}
    # train fraction 0.6 of K - 1 = 3 steps: n = 2 per sample, one call per rank and chunk (no masked rows)
    r = main(["--method", "grpo", "--tiny", "--device", "cpu", "--nfe", "4", "--group-size", "4", "--micro-batch", "2",
              "--train-fraction", "0.6", "--warmup", "0", "--steps", "1", "--threads", "1"])
    assert r["calls_per_step"] == {"rollout_nograd": 8, "recompute_grad": 4} and r["trained_steps_per_sample"] == 2
    r = main(["--method", "rats", "--tiny", "--device", "cpu", "--teacher-nfe", "4", "--teacher-copy", "adapter",
              "--warmup", "0", "--steps", "1", "--threads", "1"])
    assert r["calls_per_step"] == {"student_grad": 3, "teacher_nograd": 4}


def test_gpu_suite_glue_with_a_stub_interpreter(tmp_path):
    """benchmarks/gpu_suite.sh without a GPU and without running the benchmarks: a stub interpreter answers each
    script with a record (the GRPO one fails), so the test checks the commands the suite issues, that a failed
    benchmark becomes an error row instead of stopping the others, and the table (the paper's rows included)."""
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    stub = tmp_path / "py"
    stub.write_text(f"""#!/usr/bin/env bash
if [ "$1" = "-m" ]; then exec {sys.executable} "$@"; fi
echo "$*" >> {tmp_path}/calls
out="${{@: -1}}"
case "$*" in
  *grpo*) echo "out of memory" >&2; exit 1 ;;
  *dit_throughput*) echo '{{"benchmark": "dit_train_throughput", "preset": "small", "dtype": "bfloat16", "batch": 64,
    "compile": false, "device_name": "GPU", "step_s_median": 0.1, "samples_per_s": 640, "achieved_tflops": 300,
    "mfu": 0.3, "peak_allocated_GiB": 9, "peak_reserved_GiB": 10}}' | tr -d '\\n' > "$out" ;;
  *) echo '{{"benchmark": "flux1_rats_step", "nfe": 3, "teacher_nfe": 50, "batch": 1, "teacher_copy": "full",
    "device_name": "GPU", "step_s_median": 7.0, "calls_per_step": {{"student_grad": 3}}, "peak_allocated_GiB": 60,
    "peak_reserved_GiB": 61}}' | tr -d '\\n' > "$out" ;;
esac
""")
    stub.chmod(0o755)
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PY": str(stub)}
    p = subprocess.run(["bash", "benchmarks/gpu_suite.sh", "dit", "amp", "flux"], cwd=root, env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert [c.split(" --out")[0] for c in calls] == [
        "benchmarks/dit_throughput.py --preset small --dtype bf16",
        "benchmarks/dit_throughput.py --preset small --dtype bf16 --compile",
        "benchmarks/dit_throughput.py --preset small --dtype fp32 --amp",
        "benchmarks/flux_lora_step.py",
        "benchmarks/flux_method_step.py --method rats",
        "benchmarks/flux_method_step.py --method rats --teacher-copy adapter",
        "benchmarks/flux_method_step.py --method grpo"]
    records = [json.loads(line) for line in (out / "gpu.jsonl").read_text().splitlines()]
    assert len(records) == 7 and "exit status 1" in records[-1]["error"]
    md = (out / "gpu.md").read_text()
    assert "| small DiT train step (small, bfloat16, batch 64, eager) | GPU | 0.1 | 9 (reserved 10) |" in md
    assert "failed: exit status 1" in md and "| RATS (paper, FLUX) | (the paper's GPU) | 7.57 | 67.67 |" in md
    assert "out of memory" in (out / "gpu_log.txt").read_text()
    bad = subprocess.run(["bash", "benchmarks/gpu_suite.sh", "bogus"], cwd=root, env=env, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0


def test_wan22_two_experts_rank_calls_accounted_and_on_policy(monkeypatch):
    """OTCA on tiny Wan 2.2 (two experts split by sigma) at train fraction 0.6: a rank-j recomputation call holds
    rows at different steps, some on each side of the boundary, so velocity() runs both experts in one call. The
    harness counts one forward per expert reached (no unaccounted forward), and --debug's on-policy check holds (to
    float rounding there: the experts see sub-batches the rollout did not have)."""
    from common.backends.wan import WanBackend
    splits = []
    real = WanBackend.forwards_per_call

    def spy(self, net, sigma):
        n = real(self, net, sigma)
        splits.append(n)
        return n
    monkeypatch.setattr(WanBackend, "forwards_per_call", spy)
    r = _one(measure("otca", ["--teacher", "wan", "--tiny", "--steps", "2", "--train-fraction", "0.6", "--nfe", "6",
                              "--group-size", "4", "--prompts-per-step", "1", "--micro-batch", "2", "--reward",
                              "temporal_consistency,motion_smoothness", "--eval-samples", "0", "--precision", "fp32",
                              "--device", "cpu", "--debug"], backend_options={"two_experts": True}, replays=1))
    assert r["nfe_match"] and r["unaccounted_forwards"] == 0
    assert 2 in splits and 1 in splits            # some calls ran both experts, the others one
    be = WanBackend(tiny=True, two_experts=True)
    b = be.network.boundary
    assert be.splits_rows and not WanBackend(tiny=True).splits_rows
    assert be.forwards_per_call(be.network, torch.tensor([b + 0.05, b - 0.05])) == 2
    assert be.forwards_per_call(be.network, b + 0.01) == 1 and be.forwards_per_call(be.network.experts[0], 0.1) == 1
