"""RTDMD's teacher from a checkpoint of its own (--teacher-pretrained; the flux2 preset, spec decision 14): on FLUX.2
the generator starts from the step-distilled klein, the teacher and the fake score from klein-base, whose true CFG
(scale 4, the empty prompt) the teacher runs and the distilled generator does not. Checked on the tiny FLUX.2 twins
(--tiny builds the base twin from another seed and loads it through the production loader): the teacher and the fake
start from the twin's weights in both --fake-copy modes, which give the same losses and gradients; the teacher's
velocity is v_u + s (v_c - v_u) from one batched forward over [empty prompt; prompt]; a guidance scale the teacher
would ignore, missing teacher weights and a teacher of another size are one-line errors (exit 2); the other presets
keep the generator's own model."""
import json

import pytest
import torch

import rtdmd
from common.backend import Cond, get_backend
from common.backends.base import ADAPTER, is_adapter_tensor
from common.backends.tiny import tiny_pipeline
from common.config import parse_config, user_errors

BASE_ID = "black-forest-labs/FLUX.2-klein-base-4B"
TINY = ["--teacher", "flux2", "--tiny", "--device", "cpu", "--precision", "fp32", "--reward", "clip", "--steps", "1",
        "--fake-ratio", "1", "--epochs", "2", "--groups", "1", "--group-size", "2", "--batch", "2", "--lr", "1e-3",
        "--fake-lr", "1e-3", "--lr2", "1e-3"]


def _klein(**kw):
    """The tiny FLUX.2 backend as the preset lays it out: a step-distilled generator, a klein-base teacher twin."""
    return get_backend("flux2", tiny=True, device="cpu", distilled=True, teacher_pretrained=BASE_ID, **kw)


def _base(net):
    """{name: tensor} of a transformer's base (non-LoRA) weights, under the names of a plain copy."""
    return {n.replace(".base_layer", ""): p.detach() for n, p in net.named_parameters() if "lora_" not in n}


def _distilled_backend(monkeypatch):
    """rtdmd.main's get_backend with a step-distilled tiny generator, as the real klein-4B is."""
    real = rtdmd.get_backend
    monkeypatch.setattr(rtdmd, "get_backend", lambda *a, **k: real(*a, distilled=True, **k))


def test_flux2_preset_loads_klein_base_and_the_others_keep_their_own_model():
    cfg = lambda *a: parse_config(rtdmd.Config, list(a), presets=rtdmd.PRESETS)
    assert cfg("--teacher", "flux2").teacher_pretrained == BASE_ID
    assert cfg("--teacher", "flux2", "--teacher-pretrained", "").teacher_pretrained == ""
    for teacher in ("toy2d", "dit", "flux", "sd3", "wan"):
        assert cfg("--teacher", teacher).teacher_pretrained == ""
    be = get_backend("flux", tiny=True, device="cpu")               # '' : no second checkpoint, as before
    assert be.teacher_net is None and be.teacher_pretrained is None
    assert rtdmd.build_models(be, "full").fake_from_gen
    draws = []
    for kw in ({}, {"teacher_pretrained": BASE_ID}):                # the twin leaves the run's random stream alone
        torch.manual_seed(0)
        be = get_backend("flux2", tiny=True, device="cpu", distilled=True, **kw)
        draws.append((torch.rand(3), [p.detach().clone() for p in be.trainable_parameters(be.network)]))
    assert torch.equal(draws[0][0], draws[1][0]) and all(map(torch.equal, draws[0][1], draws[1][1]))


@pytest.mark.parametrize("mode", ["full", "adapter"])
def test_teacher_and_fake_start_from_the_base_twin(mode):
    be = _klein()
    twin = tiny_pipeline("flux2", seed=1).transformer.state_dict()      # the twin of seed + 1, built apart
    own = tiny_pipeline("flux2", seed=0, distilled=True).transformer.state_dict()
    m = rtdmd.build_models(be, mode)
    assert not m.fake_from_gen and m.teacher is be.teacher_net and m.gen is be.network
    assert be.network.step_distilled and not be.teacher_net.step_distilled
    for name, net in (("teacher", m.teacher), ("fake", m.fake)):
        w = _base(net)
        assert w.keys() == twin.keys() and all(torch.equal(w[k], twin[k]) for k in twin), name
    g = _base(m.gen)
    assert all(torch.equal(g[k], own[k]) for k in own) and not all(torch.equal(g[k], twin[k]) for k in twin)
    # the teacher's base stays frozen; the fake trains its LoRA adapter, a copy of the generator's starting one
    assert not any(p.requires_grad for n, p in m.teacher.named_parameters() if "lora_" not in n)
    assert m.fake_named.keys() == m.gen_named.keys() and all(is_adapter_tensor(k, ADAPTER) for k in m.fake_named)
    assert not {id(p) for p in m.fake_named.values()} & {id(p) for p in m.gen_named.values()}
    assert all(torch.equal(m.fake_named[k], p) for k, p in m.gen_named.items())
    # memory: adapter mode holds two transformers (generator, teacher = fake's base), full mode three
    storages = {p.untyped_storage().data_ptr() for net in (m.gen, m.fake, m.teacher)
                for n, p in net.named_parameters() if "lora_" not in n}
    assert len(storages) == (2 if mode == "adapter" else 3) * len(twin)
    # at the start the fake (zero LoRA B) is the teacher, not the generator
    cond = be.encode(["a red cube", "a blue ball"])
    x, s = torch.randn(2, *be.latent_shape, generator=torch.Generator().manual_seed(0)), torch.tensor([0.7, 0.4])
    with torch.no_grad():
        with m.teacher_ctx():
            v_t = be.velocity(m.teacher, x, s, cond, 1.0)
        with m.fake_ctx():
            v_f = be.velocity(m.fake, x, s, cond, 1.0)
        v_g = be.velocity(m.gen, x, s, cond, 1.0)
    torch.testing.assert_close(v_f, v_t)
    assert not torch.allclose(v_g, v_t)


def test_teacher_runs_true_cfg_with_the_empty_prompt_and_the_distilled_generator_none():
    be = _klein()
    teacher, gen = be.teacher_net, be.network
    assert be.guidance_applies(teacher) and not be.guidance_applies(gen) and be.guidance == 1.0
    rows = []
    hooks = [net.register_forward_pre_hook(lambda m, a, k: rows.append((m, k["hidden_states"].shape[0])),
                                           with_kwargs=True) for net in (teacher, gen)]
    cond = be.encode(["a red cube", "a blue ball"])
    neg = be.encode([""])["prompt_embeds"]
    assert torch.equal(cond["neg_prompt_embeds"], neg.expand(2, -1, -1))        # the empty prompt, per row
    x, s = torch.randn(2, *be.latent_shape, generator=torch.Generator().manual_seed(1)), torch.tensor([0.8, 0.3])
    with torch.no_grad():
        v = be.velocity(teacher, x, s, cond, 4.0)
        assert rows == [(teacher, 4)]                # one batched forward over [negative; positive]
        v_c = be.velocity(teacher, x, s, cond, 1.0)
        v_u = be.velocity(teacher, x, s, Cond({"prompt_embeds": cond["neg_prompt_embeds"]}), 1.0)
        torch.testing.assert_close(v, v_u + 4.0 * (v_c - v_u), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(v, v_c)
        rows.clear()
        assert torch.equal(be.velocity(gen, x, s, cond, 4.0), be.velocity(gen, x, s, cond, 1.0))
        assert rows == [(gen, 2), (gen, 2)]          # the distilled generator: no CFG batch
    for h in hooks:
        h.remove()


def test_rtdmd_run_the_teachers_calls_take_cfg_and_no_other_call_does(tmp_path, monkeypatch, restore_torch_globals):
    """End to end (the flux2 preset's adapter layout, a distilled tiny generator): every teacher forward holds the
    empty prompt's embeddings on its first half of rows and the prompts on the other; no generator or fake forward
    sees the empty prompt."""
    seen, backends = [], []
    real = rtdmd.get_backend

    def spy(*a, **k):
        be = real(*a, distilled=True, **k)
        backends.append(be)
        for net in (be.network, be.teacher_net):
            net.register_forward_pre_hook(lambda m, args, kw: seen.append(
                (getattr(m, "nfe_role", "student"), kw["encoder_hidden_states"].detach().clone())), with_kwargs=True)
        return be
    monkeypatch.setattr(rtdmd, "get_backend", spy)
    rtdmd.main(parse_config(rtdmd.Config, [*TINY, "--out", str(tmp_path)], presets=rtdmd.PRESETS))
    neg = backends[0].encode([""])["prompt_embeds"][0]
    is_neg = lambda enc: [torch.equal(row, neg) for row in enc]
    teacher = [enc for role, enc in seen if role == "teacher"]
    assert len(teacher) == 1 + 2                     # one stage-1 generator turn, two stage-2 epochs
    for enc in teacher:
        assert is_neg(enc) == [True] * 2 + [False] * 2  # [uncond; cond] over B = 2 rows
    others = [enc for role, enc in seen if role != "teacher"]
    assert {role for role, _ in seen} == {"student", "fake", "teacher"} and not any(any(is_neg(e)) for e in others)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same tiny FLUX.2 run (distilled generator, base teacher twin) in both --fake-copy modes: (dir, metrics
    rows, every clip_grad call's gradients)."""
    mp = pytest.MonkeyPatch()
    threads, det, grad = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(), torch.is_grad_enabled()
    out = {}
    for mode in ("full", "adapter"):
        d = tmp_path_factory.mktemp(mode)
        grads, clip = [], rtdmd.clip_grad

        def capture(params, max_norm, grads=grads, clip=clip):
            params = list(params)
            grads.append([p.grad.clone() for p in params])     # a missing gradient is an error: every tensor trains
            return clip(params, max_norm)
        mp.setattr(rtdmd, "clip_grad", capture)
        _distilled_backend(mp)
        rtdmd.main(parse_config(rtdmd.Config, [*TINY, "--fake-copy", mode, "--out", str(d)], presets=rtdmd.PRESETS))
        mp.undo()
        out[mode] = (d, [json.loads(line) for line in open(d / "metrics.jsonl")], grads)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(det)
    torch.set_grad_enabled(grad)
    return out


def test_both_fake_copy_modes_give_the_same_losses_and_gradients(runs):
    (_, rows_f, g_f), (_, rows_a, g_a) = runs["full"], runs["adapter"]
    assert len(g_f) == len(g_a) == 6                 # fake then generator update: 1 stage-1 step, 2 epochs
    for a, b in zip(g_f, g_a):
        assert len(a) == len(b) > 0 and any(float(x.abs().max()) > 0 for x in a)
        for x, y in zip(a, b):
            assert torch.allclose(x, y, rtol=1e-5, atol=1e-7 * float(x.abs().max()) + 1e-12)
    for ra, rf in zip(rows_a, rows_f):
        for k in ("fake_loss", "consistency", "dmd_loss", "loss", "pg", "dmd"):
            if k in rf:
                assert ra[k] == pytest.approx(rf[k], rel=1e-5, abs=1e-9), k


def test_eval_only_puts_the_trained_generator_in_the_generator(runs, tmp_path, monkeypatch, restore_torch_globals):
    """With a teacher checkpoint the fake sits on the teacher's model: --eval-only samples the trained generator in
    the generator (its base as the adapters-off reference), the same table in both modes."""
    d, _, _ = runs["adapter"]
    tables = {}
    for mode in ("full", "adapter"):
        _distilled_backend(monkeypatch)
        tables[mode] = rtdmd.main(parse_config(rtdmd.Config, [*TINY, "--fake-copy", mode, "--eval-only", "--ckpt",
                                                              str(d), "--eval-nfe", "2", "--eval-per-prompt", "1",
                                                              "--out", str(tmp_path / mode)],
                                               presets=rtdmd.PRESETS))["rows"]
        monkeypatch.undo()
    rows = tables["adapter"]
    assert [r["model"] for r in rows] == ["teacher (N=50, Euler)", "base generator (K=2)", "RTDMD (K=2)"]
    for ra, rf in zip(rows, tables["full"]):
        assert ra["clip"] == pytest.approx(rf["clip"], rel=1e-4, abs=1e-6)
    assert rows[2]["clip"] != rows[1]["clip"]


def _one_line_exit_2(capsys, argv):
    with pytest.raises(SystemExit) as e:
        with user_errors():
            rtdmd.main(parse_config(rtdmd.Config, argv, presets=rtdmd.PRESETS))
    err = capsys.readouterr().err
    # (tiny runs print the save/load round trip's progress bars before it; the message is the last line, alone)
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert e.value.code == 2 and len(lines) == 1 and err.rstrip().endswith(lines[0]), err
    return lines[0]


def test_a_guidance_scale_the_teacher_would_ignore_is_one_line(tmp_path, monkeypatch, capsys,
                                                               restore_torch_globals):
    """--teacher-pretrained '' on the distilled klein: the teacher would drop the preset's --cfg-scale 4 (it did)."""
    _distilled_backend(monkeypatch)
    err = _one_line_exit_2(capsys, [*TINY, "--teacher-pretrained", "", "--out", str(tmp_path / "a")])
    assert "--cfg-scale 4 would be ignored" in err and "--teacher-pretrained" in err
    err = _one_line_exit_2(capsys, ["--cfg-scale", "2", "--out", str(tmp_path / "b")])     # the one-class toy too
    assert "--cfg-scale 2 would be ignored" in err


def test_missing_teacher_weights_and_a_teacher_of_another_size_are_one_line(tmp_path, monkeypatch, capsys,
                                                                           restore_torch_globals):
    """The generator loads from a saved folder (the production loader, no --tiny); the teacher's weights are missing
    (a folder, a hub id not in the offline cache) or of another architecture."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tiny_pipeline("flux2", seed=0, distilled=True).save_pretrained(tmp_path / "klein")
    argv = ["--teacher", "flux2", "--pretrained", str(tmp_path / "klein"), "--device", "cpu", "--out",
            str(tmp_path / "run")]
    missing = str(tmp_path / "nope" / "klein-base")
    err = _one_line_exit_2(capsys, [*argv, "--teacher-pretrained", missing])
    assert f"--teacher-pretrained {missing!r}: no such folder" in err
    err = _one_line_exit_2(capsys, [*argv])                   # the preset's hub id, not downloaded
    assert BASE_ID in err and f"huggingface-cli download {BASE_ID} --local-dir DIR" in err
    assert "pass --teacher-pretrained DIR" in err
    from diffusers import Flux2Transformer2DModel

    from common.backends.tiny import FLUX2_TRANSFORMER
    other = tiny_pipeline("flux2", seed=1)
    other.register_modules(transformer=Flux2Transformer2DModel(**dict(FLUX2_TRANSFORMER, num_layers=2)))
    other.save_pretrained(tmp_path / "bigger")
    err = _one_line_exit_2(capsys, [*argv, "--teacher-pretrained", str(tmp_path / "bigger")])
    assert "differs from the generator's" in err and "transformer_blocks.1" in err
    with pytest.raises(SystemExit) as e:                       # the toy and the DiT have no checkpoint to load
        parse_config(rtdmd.Config, ["--teacher-pretrained", str(tmp_path / "klein")], presets=rtdmd.PRESETS,
                     checks=[rtdmd.checks])
    assert e.value.code == 2 and "--teacher-pretrained loads a diffusers checkpoint" in capsys.readouterr().err


def test_a_teacher_of_another_size_by_name_is_refused_before_loading(capsys):
    """A klein-9B generator with the flux2 preset's klein-base-4B teacher: one line at parse time, naming the base
    of the generator's size (the load-time shape check above would first read 9B + 4B of weights)."""
    assert [rtdmd._size_tag(m) for m in ("black-forest-labs/FLUX.2-klein-base-9B", "/models/FLUX.2-klein-4B/",
                                         "black-forest-labs/FLUX.1-dev", "")] == ["9B", "4B", None, None]
    with pytest.raises(SystemExit) as e:
        parse_config(rtdmd.Config, ["--teacher", "flux2", "--pretrained", "black-forest-labs/FLUX.2-klein-9B"],
                     presets=rtdmd.PRESETS, checks=[rtdmd.checks])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "(9B)" in err and "(4B)" in err
    assert "black-forest-labs/FLUX.2-klein-base-9B" in err
    argv = ["--teacher", "flux2", "--pretrained", "/m/klein-9B", "--teacher-pretrained", "/m/klein-base-9B"]
    cfg = parse_config(rtdmd.Config, argv, presets=rtdmd.PRESETS, checks=[rtdmd.checks])
    assert cfg.teacher_pretrained == "/m/klein-base-9B"
