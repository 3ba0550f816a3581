"""RTDMD on a LoRA backend without extra copies of the transformer (--fake-copy adapter): the fake score is a
second adapter on the generator's transformer and the teacher its base (adapters off). Checked on tiny FLUX.1
(float32 on the CPU): the same losses and gradients as separate copies, one copy of the base weights, adapter
switches that give every flag back, checkpoints without base weights and an exact resume."""
import copy
import json
import os
import shutil

import pytest
import torch

import rtdmd
from common.backend import get_backend
from common.backends.base import ADAPTER, adapter_state, is_adapter_tensor
from common.config import parse_config
from common.dmd_models import FAKE_ADAPTER
from common.runs import list_checkpoints, load_checkpoint

TINY = ["--teacher", "flux", "--tiny", "--device", "cpu", "--precision", "fp32", "--reward", "clip",
        "--steps", "1", "--fake-ratio", "1", "--epochs", "2", "--groups", "1", "--group-size", "2", "--batch", "2",
        "--gamma2", "0.01", "--save-every", "1", "--keep", "0"]   # the consistency in stage 2 too (flux preset: 0)


def _run(out, monkeypatch, *argv):
    """rtdmd.main in-process: (metrics rows, the gradients of every clip_grad call in order: per optimizer step,
    the list of its parameters' gradients)."""
    grads = []
    clip = rtdmd.clip_grad

    def capture(params, max_norm):
        params = list(params)
        grads.append([p.grad.clone() for p in params])   # a missing gradient is an error: every tensor trains
        return clip(params, max_norm)

    monkeypatch.setattr(rtdmd, "clip_grad", capture)
    rtdmd.main(parse_config(rtdmd.Config, ["--out", str(out), *argv], presets=rtdmd.PRESETS))
    monkeypatch.undo()
    return [json.loads(line) for line in open(out / "metrics.jsonl")], grads


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same tiny-FLUX run (1 stage-1 step with a generator turn, 2 stage-2 epochs) in both modes."""
    mp = pytest.MonkeyPatch()
    threads, det, grad = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(), torch.is_grad_enabled()
    out = {}
    for mode in ("full", "adapter"):
        d = tmp_path_factory.mktemp(mode)
        out[mode] = (d, *_run(d, mp, *TINY, "--fake-copy", mode))
    torch.set_num_threads(threads)   # the script's process-wide settings, given back to the other test modules
    torch.use_deterministic_algorithms(det)
    torch.set_grad_enabled(grad)
    return out


def _untimed(row):
    """A metrics row without its wall-clock fields."""
    return {k: v for k, v in row.items() if k not in ("time", "step_time", "peak_mem_mb")}


def test_adapter_mode_gives_the_same_losses_and_gradients(runs):
    (_, rows_f, g_f), (_, rows_a, g_a) = runs["full"], runs["adapter"]
    # per step: the fake update then the generator update (stage 1: 1 step, stage 2: 2 epochs)
    assert len(g_f) == len(g_a) == 6
    for a, b in zip(g_f, g_a):
        assert len(a) == len(b) == 22          # tiny FLUX: one adapter, A and B of 11 attention projections
        assert any(float(x.abs().max()) > 0 for x in a)
        for x, y in zip(a, b):
            assert torch.allclose(x, y, rtol=1e-5, atol=1e-7 * float(x.abs().max()) + 1e-12)
    assert [r["stage"] for r in rows_a] == [1, 2, 2]
    for ra, rf in zip(rows_a, rows_f):
        for k in ("fake_loss", "consistency", "dmd_loss", "loss", "pg", "dmd"):
            if k in rf:
                assert ra[k] == pytest.approx(rf[k], rel=1e-5, abs=1e-9), k


def test_adapter_checkpoint_holds_no_base_tensor_and_resume_is_exact(runs, tmp_path, monkeypatch,
                                                                    restore_torch_globals):
    d, rows, _ = runs["adapter"]
    final = load_checkpoint(str(d))["state"]
    for key in ("gen", "fake", "gen_ema"):
        assert len(final[key]) == 22 and all(is_adapter_tensor(k, ADAPTER) for k in final[key]), key
    # the two adapters trained apart (the fake is not the generator), from the same starting values
    assert any(not torch.equal(final["gen"][k], final["fake"][k]) for k in final["gen"])
    # continue from the checkpoint after the first stage-2 epoch (step 2): a fresh process would do the same
    resumed = tmp_path / "resumed"
    shutil.copytree(d, resumed)
    for step, path in list_checkpoints(str(resumed)):
        if step > 2:
            os.remove(path)
    rows_r, _ = _run(resumed, monkeypatch, *TINY, "--fake-copy", "adapter", "--resume", str(resumed))
    again = load_checkpoint(str(resumed))["state"]
    for key in ("gen", "fake", "gen_ema"):
        assert all(torch.equal(final[key][k], again[key][k]) for k in final[key]), key
    assert all(torch.equal(a, b) for a, b in zip(final["ema"]["shadow"], again["ema"]["shadow"]))
    assert [_untimed(r) for r in rows_r] == [_untimed(r) for r in rows]     # the resumed step logs the same


def test_eval_only_without_a_copy_of_the_transformer(runs, tmp_path, monkeypatch, restore_torch_globals):
    """--eval-only of the adapter run: the trained generator is loaded into the fake score's adapter (no deep copy
    of the transformer, FLUX.1: 24 GB), the teacher is the base; the table equals the one of --fake-copy full,
    which evaluates separate copies, on the same checkpoint."""
    d, _, _ = runs["adapter"]
    rows, deepcopy = {}, copy.deepcopy
    for mode in ("full", "adapter"):
        if mode == "adapter":     # no network is deep-copied in adapter mode (tokenizers may be)
            def no_copy(x, *a, **k):
                assert not isinstance(x, torch.nn.Module), f"{type(x).__name__} deep-copied"
                return deepcopy(x, *a, **k)
            monkeypatch.setattr(copy, "deepcopy", no_copy)
        out = rtdmd.main(parse_config(rtdmd.Config, [*TINY, "--fake-copy", mode, "--eval-only", "--ckpt", str(d),
                                                     "--eval-nfe", "2", "--eval-per-prompt", "1",
                                                     "--out", str(tmp_path / mode)], presets=rtdmd.PRESETS))
        monkeypatch.undo()
        rows[mode] = out["rows"]
    assert [r["model"] for r in rows["adapter"]] == ["teacher (N=50, Euler)", "base generator (K=2)", "RTDMD (K=2)"]
    for ra, rf in zip(rows["adapter"], rows["full"]):
        assert ra.keys() == rf.keys()
        for k, v in rf.items():
            assert ra[k] == (pytest.approx(v, rel=1e-4, abs=1e-6) if isinstance(v, float) else v), k
    # the trained generator differs from the base (the checkpoint was loaded)
    assert rows["adapter"][2]["clip"] != rows["adapter"][1]["clip"]


@pytest.fixture
def flux():
    return get_backend("flux", tiny=True, device="cpu")


def _base_storages(*nets):
    """{data_ptr: bytes} of the distinct storages of the nets' base (non-LoRA) parameters."""
    return {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes()
            for net in nets for n, p in net.named_parameters() if "lora_" not in n}


def test_adapter_mode_holds_one_copy_of_the_base_weights(flux):
    full = rtdmd.build_models(flux, "full")
    n_base = len(_base_storages(flux.network))
    assert len(_base_storages(full.gen, full.fake, full.teacher)) == 3 * n_base
    models = rtdmd.build_models(flux, "adapter")
    assert models.gen is models.fake is models.teacher
    assert len(_base_storages(models.gen, models.fake, models.teacher)) == n_base
    # two disjoint trained sets, the fake's keyed like the generator's, starting equal
    assert set(models.fake_named) == set(models.gen_named)
    assert not {id(p) for p in models.fake_named.values()} & {id(p) for p in models.gen_named.values()}
    assert all(torch.equal(models.fake_named[k], p) for k, p in models.gen_named.items())


def test_adapter_switches_give_the_active_adapter_and_every_flag_back(flux):
    net = flux.network
    if "fake" not in net.peft_config:
        flux.add_adapter_copy(net, "fake")
    fake = flux.adapter_parameters(net, "fake")
    next(iter(fake.values())).requires_grad_(False)      # an unusual pattern that peft's set_adapter would reset
    before = adapter_state(net)
    flags = [f for _, f in before.flags]
    cond = flux.encode(["a red cube"])
    x, s = torch.randn(1, *flux.latent_shape, generator=torch.Generator().manual_seed(0)), torch.tensor([0.6])
    with torch.no_grad():
        for p in fake.values():      # the fake adapter away from the generator's, so that the switch is visible
            p.add_(0.05)
        v_gen = flux.velocity(net, x, s, cond)
    for ctx, active in ((lambda: flux.use_adapter(net, "fake"), ["fake"]), (lambda: flux.reference(net), None)):
        with pytest.raises(RuntimeError, match="inside"):
            with ctx():
                inside = adapter_state(net)
                assert [f for _, f in inside.flags] == flags      # flags untouched inside the block too
                assert inside.disabled == (active is None)
                if active:
                    assert inside.active == active
                    with torch.no_grad():
                        assert not torch.allclose(flux.velocity(net, x, s, cond), v_gen)
                raise RuntimeError("inside")
        after = adapter_state(net)
        assert after.active == before.active == [ADAPTER] and not after.disabled
        assert [f for _, f in after.flags] == flags
    with torch.no_grad():
        assert torch.equal(flux.velocity(net, x, s, cond), v_gen)


def test_adapter_mode_without_lora_is_one_line(tmp_path, capsys, restore_torch_globals):
    from common.config import user_errors
    with pytest.raises(SystemExit) as e:
        with user_errors():
            rtdmd.main(parse_config(rtdmd.Config, ["--fake-copy", "adapter", "--out", str(tmp_path)],
                                    presets=rtdmd.PRESETS))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.strip().count("\n") == 0 and "--fake-copy full" in err


class _Built(Exception):
    """Raised by the spy below once rtdmd.main has built its networks: nothing else of the run is needed."""


def test_lora_rank_alpha_and_checkpointing_reach_both_adapters(tmp_path, monkeypatch, restore_torch_globals):
    """--lora-rank / --lora-alpha shape the generator's and the fake score's adapters (spec 4.3: rank 32, alpha 64,
    scale alpha / rank = 2, not peft's alpha = rank), and the diffusers presets turn gradient checkpointing on."""
    built = {}

    def spy(backend, mode):
        built["models"] = real(backend, mode)
        raise _Built

    real = rtdmd.build_models
    monkeypatch.setattr(rtdmd, "build_models", spy)
    with pytest.raises(_Built):
        rtdmd.main(parse_config(rtdmd.Config, ["--teacher", "flux", "--tiny", "--device", "cpu", "--out",
                                               str(tmp_path), "--lora-rank", "4"], presets=rtdmd.PRESETS))
    net = built["models"].gen                 # adapter mode (the preset): both adapters on this transformer
    for name in (ADAPTER, FAKE_ADAPTER):
        assert (net.peft_config[name].r, net.peft_config[name].lora_alpha) == (4, 64.0)
    layer = next(m for m in net.modules() if hasattr(m, "scaling") and ADAPTER in m.scaling)
    assert layer.scaling[ADAPTER] == layer.scaling[FAKE_ADAPTER] == 16.0
    assert net.is_gradient_checkpointing
    cfg = parse_config(rtdmd.Config, ["--teacher", "flux", "--gradient-checkpointing", "false"], presets=rtdmd.PRESETS)
    assert not cfg.gradient_checkpointing and cfg.lora_alpha == 64.0 and cfg.lora_rank == 32
