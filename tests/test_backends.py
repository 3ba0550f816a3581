"""The diffusers backends on their tiny random twins (offline, CPU).

The reference everywhere is diffusers itself: the pipelines' own __call__ (for the same initial noise, sigmas,
prompt embeddings and guidance), their static packing helpers, and `pipe.load_lora_weights`.
"""
import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from common.backend import BackendError, get_backend
from common.backends import Flux2Backend, FluxBackend, SD3Backend, WanBackend
from common.backends import flux as flux_mod
from common.backends import flux2 as flux2_mod
from common.backends.tiny import tiny_pipeline
from common.flow import interpolate, rollout

torch.set_num_threads(1)
PROMPTS = ["a red cube on a table", "a cat"]
K = 4
BASE_T = torch.linspace(1, 0, K + 1)[:-1].tolist()       # the unshifted grid; the schedulers shift it


def _flux_kw(be, c):
    return dict(prompt_embeds=c["prompt_embeds"], pooled_prompt_embeds=c["pooled_prompt_embeds"],
                guidance_scale=be.guidance)


def _sd3_kw(be, c):
    return dict(prompt_embeds=c["prompt_embeds"], pooled_prompt_embeds=c["pooled_prompt_embeds"],
                negative_prompt_embeds=c["neg_prompt_embeds"],
                negative_pooled_prompt_embeds=c["neg_pooled_prompt_embeds"], guidance_scale=be.guidance, sigmas=BASE_T)


def _wan_kw(be, c):
    # WanPipeline calls scheduler.set_timesteps(n) without sigmas: hand it the same base grid
    sch = be.pipe.scheduler
    orig = type(sch).set_timesteps.__get__(sch)
    sch.set_timesteps = lambda n=None, device=None, **kw: orig(device=device, sigmas=BASE_T)
    kw = dict(prompt_embeds=c["prompt_embeds"], negative_prompt_embeds=c["neg_prompt_embeds"],
              guidance_scale=be.guidance, num_frames=be.num_frames)
    if isinstance(be.network, torch.nn.Module) and hasattr(be.network, "experts"):
        kw["guidance_scale_2"] = be.guidance_2
    return kw


def _flux2_kw(be, c):
    return dict(prompt_embeds=c["prompt_embeds"], negative_prompt_embeds=c["neg_prompt_embeds"],
                guidance_scale=be.guidance)


def _flux_true_cfg_kw(be, c):
    return dict(_flux_kw(be, c), true_cfg_scale=be.true_cfg, negative_prompt_embeds=c["neg_prompt_embeds"],
                negative_pooled_prompt_embeds=c["neg_pooled_prompt_embeds"])


CASES = {
    "flux": (lambda: FluxBackend(tiny=True), _flux_kw),
    "flux_true_cfg": (lambda: FluxBackend(tiny=True, true_cfg=2.5, negative_prompt="blurry"), _flux_true_cfg_kw),
    "sd3": (lambda: SD3Backend(tiny=True), _sd3_kw),
    "wan": (lambda: WanBackend(tiny=True), _wan_kw),
    "wan22": (lambda: WanBackend(tiny=True, two_experts=True, guidance=4.0, guidance_2=2.0), _wan_kw),
    "flux2": (lambda: Flux2Backend(tiny=True, guidance=3.0), _flux2_kw),
}


@pytest.mark.parametrize("case", list(CASES))
def test_euler_rollout_equals_pipeline(case):
    make, pipe_kw = CASES[case]
    be = make()
    cond = be.encode(PROMPTS)
    x = be.noise(2, torch.Generator().manual_seed(0))
    assert x.shape == (2, *be.latent_shape)
    sig = be.sigmas(K)
    traj = rollout(be.velocity_fn(be.network, cond), x, sig)
    with torch.no_grad():
        out = be.pipe(latents=x.clone(), num_inference_steps=K, output_type="latent", height=be.height,
                      width=be.width, **pipe_kw(be, cond))
    ref = out.images if hasattr(out, "images") else out.frames
    # the pipeline's schedule (its own shift rule) is ours
    torch.testing.assert_close(be.pipe.scheduler.sigmas.float().cpu(), sig.cpu(), atol=1e-6, rtol=0)
    # FLUX.2 returns de-normalised, unpatchified VAE latents; the others return the sampler's latents
    mine = be.to_vae_latents(traj.final) if case == "flux2" else traj.final
    assert ref.abs().max() > 0.5 and (traj.final - x).abs().max() > 0.5     # a non-trivial trajectory
    torch.testing.assert_close(mine, ref.float(), atol=2e-5, rtol=1e-5)
    media = be.decode(traj.final)
    if be.media == "video":
        assert media.shape == (2, be.num_frames, 3, be.height, be.width)
    else:
        assert media.shape == (2, 3, be.height, be.width)
    assert 0 <= media.min() and media.max() <= 1


def test_registry_and_schedules():
    be = get_backend("flux", tiny=True)
    assert isinstance(be, FluxBackend) and be.latent_shape == (64, 16)
    s = be.sigmas(4)
    assert s[0] == 1 and s[-1] == 0 and bool((s[1:] < s[:-1]).all())
    torch.testing.assert_close(be.sigmas(4, shift=3.0)[1], torch.tensor(0.9))     # static override: 3t/(1+2t)
    w = get_backend("wan", tiny=True)
    assert w.shift == 5.0 and w.latent_shape == (16, 2, 4, 4)
    torch.testing.assert_close(w.sigmas(2)[1], torch.tensor(5 * 0.5 / (1 + 4 * 0.5)))


def test_loader_reads_saved_folder_and_missing_weights(tmp_path):
    pipe = tiny_pipeline("sd3", seed=3)
    pipe.save_pretrained(tmp_path / "sd3")
    be = SD3Backend(pretrained=str(tmp_path / "sd3"))          # full-size defaults, only the size is changed
    assert be.height == 512 and be.latent_shape == (4, 256, 256)
    sd_ref = pipe.transformer.state_dict()
    sd_new = {k.replace(".base_layer", ""): v for k, v in be.network.state_dict().items() if "lora_" not in k}
    assert sd_ref.keys() == sd_new.keys() and all(torch.equal(sd_ref[k], sd_new[k]) for k in sd_ref)
    os.environ["HF_HUB_OFFLINE"] = "1"
    with pytest.raises(BackendError) as e:
        FluxBackend()                                          # the official hub id, offline
    msg = str(e.value)
    assert "\n" not in msg and "black-forest-labs/FLUX.1-dev" in msg and "--pretrained" in msg
    with pytest.raises(BackendError):
        FluxBackend(pretrained=str(tmp_path / "nope" / "x"))
    with pytest.raises(BackendError):
        FluxBackend(tiny=True, height=30)
    with pytest.raises(BackendError):
        WanBackend(tiny=True, num_frames=6)
    with pytest.warns(UserWarning, match="ignoring option"):
        SD3Backend(tiny=True, preset="tiny")                  # another family's option: ignored, said so


def test_text_embeddings_cached_once():
    be = SD3Backend(tiny=True)
    calls = []
    be.pipe.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    c1 = be.encode(PROMPTS)
    n = len(calls)
    c2 = be.encode(list(reversed(PROMPTS)) + [PROMPTS[0]])
    assert len(calls) == n                                     # all cached: no text-encoder call
    torch.testing.assert_close(c2["prompt_embeds"][1], c1["prompt_embeds"][0])
    assert c2["neg_prompt_embeds"].shape == c2["prompt_embeds"].shape
    with torch.no_grad():
        pe, _, pooled, _ = be.pipe.encode_prompt(PROMPTS[1], None, None, do_classifier_free_guidance=False,
                                                 max_sequence_length=be.max_sequence_length)
    torch.testing.assert_close(c1["prompt_embeds"][1:], pe)
    torch.testing.assert_close(c1["pooled_prompt_embeds"][1:], pooled)


@given(h2=st.integers(1, 5), w2=st.integers(1, 5), c=st.integers(1, 3), b=st.integers(1, 2))
def test_packing_equals_diffusers(h2, w2, c, b):
    from diffusers import Flux2KleinPipeline, FluxPipeline
    z = torch.randn(b, c, 2 * h2, 2 * w2)
    packed = flux_mod.pack_latents(z)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(z, b, c, 2 * h2, 2 * w2))
    torch.testing.assert_close(flux_mod.unpack_latents(packed, 2 * h2, 2 * w2), z)
    torch.testing.assert_close(flux_mod.image_ids(h2, w2),
                               FluxPipeline._prepare_latent_image_ids(b, h2, w2, "cpu", torch.float32))
    zp = torch.randn(b, 4 * c, h2, w2)
    torch.testing.assert_close(flux2_mod.pack_tokens(zp), Flux2KleinPipeline._pack_latents(zp))
    torch.testing.assert_close(flux2_mod.unpack_tokens(flux2_mod.pack_tokens(zp), h2, w2), zp)
    torch.testing.assert_close(flux2_mod.unpatchify(zp), Flux2KleinPipeline._unpatchify_latents(zp))
    torch.testing.assert_close(flux2_mod.latent_ids(b, h2, w2), Flux2KleinPipeline._prepare_latent_ids(zp))
    torch.testing.assert_close(flux2_mod.text_ids(b, 3), Flux2KleinPipeline._prepare_text_ids(torch.zeros(b, 3, 8)))


@pytest.mark.parametrize("family", ["flux", "wan"])
def test_training_step_through_transformer_and_vae(family):
    be = get_backend(family, tiny=True, gradient_checkpointing=True)
    net = be.network
    net.train()
    assert net.is_gradient_checkpointing
    assert be.pipe.vae.is_gradient_checkpointing or not be.pipe.vae._supports_gradient_checkpointing
    params = be.trainable_parameters(net)
    assert params and all("lora_" in n for n, p in net.named_parameters() if p.requires_grad)
    opt = torch.optim.SGD(params, lr=1.0)
    cond = be.encode(PROMPTS)
    x = be.noise(2, torch.Generator().manual_seed(1))
    before = be.velocity(net, x, 0.7, cond).detach()
    for _ in range(2):                 # 2 steps: LoRA B starts at 0, so A only moves from the 2nd step on
        opt.zero_grad()
        traj = rollout(be.velocity_fn(net, cond), x, be.sigmas(2), grad="all")
        media = be.decode(traj.final)                          # reward-style loss through the VAE decode
        x0 = torch.randn_like(x)
        xt = interpolate(x0, x, 0.5)                           # plus a flow-matching term
        loss = -media.mean() + ((be.velocity(net, xt, 0.5, cond) - (x - x0)) ** 2).mean()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
        opt.step()
    assert sum(float(p.grad.abs().sum()) for p in params) > 0
    assert not any(p.grad is not None for n, p in net.named_parameters() if "lora_" not in n)
    after = be.velocity(net, x, 0.7, cond).detach()
    assert (after - before).abs().max() > 1e-6
    with be.reference(net) as ref:                             # adapter disabled: the base model
        torch.testing.assert_close(be.velocity(ref, x, 0.7, cond), before)
    torch.testing.assert_close(be.velocity(net, x, 0.7, cond), after)   # and enabled again
    # pixels -> latents gradient exists (the VAE decode is differentiable)
    xg = x.clone().requires_grad_(True)
    be.decode(xg).sum().backward()
    assert xg.grad.abs().sum() > 0


def _perturb_lora(net, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in net.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("family", ["flux", "sd3", "wan22", "flux2"])
def test_lora_save_load_into_fresh_pipeline(family, tmp_path):
    kw = dict(tiny=True, lora_rank=4, lora_alpha=8)              # alpha != rank: the scale must survive the file
    fam = "wan" if family == "wan22" else family
    if family == "wan22":
        kw["two_experts"] = True
    be = get_backend(fam, **kw)
    _perturb_lora(be.network)
    cond = be.encode(PROMPTS)
    x = be.noise(2, torch.Generator().manual_seed(2))
    sig = torch.tensor([0.9, 0.3])                              # wan22: one sample per expert
    v_lora = be.velocity(be.network, x, sig, cond)
    with be.reference(be.network) as ref:
        v_base = be.velocity(ref, x, sig, cond)
    assert (v_lora - v_base).abs().max() > 1e-3
    files = be.save_lora(str(tmp_path))
    assert all(os.path.isfile(f) for f in files)

    fresh = get_backend(fam, **dict(kw, full_finetune=True))   # same base weights, no adapter
    torch.testing.assert_close(fresh.velocity(fresh.network, x, sig, cond), v_base)
    fresh.pipe.load_lora_weights(str(tmp_path))                # the diffusers loader takes our file
    if family == "wan22":
        fresh.pipe.load_lora_weights(str(tmp_path / "transformer_2"), load_into_transformer_2=True)
    torch.testing.assert_close(fresh.velocity(fresh.network, x, sig, cond), v_lora, atol=1e-5, rtol=1e-5)

    other = get_backend(fam, **kw)                              # and our own loader, into a new adapter
    other.load_lora(str(tmp_path))
    torch.testing.assert_close(other.velocity(other.network, x, sig, cond), v_lora, atol=1e-5, rtol=1e-5)
    assert other.trainable_parameters(other.network)


def test_frozen_copy_and_full_finetune_reference():
    be = FluxBackend(tiny=True)
    cp = be.frozen_copy(be.network)
    assert not any(p.requires_grad for p in cp.parameters())
    cond = be.encode(PROMPTS[:1])
    x = be.noise(1, torch.Generator().manual_seed(3))
    v0 = be.velocity(cp, x, 0.5, cond)
    _perturb_lora(be.network)
    torch.testing.assert_close(be.velocity(cp, x, 0.5, cond), v0)     # the copy does not follow the adapter
    assert be.fsdp_blocks() == [*be.network.transformer_blocks, *be.network.single_transformer_blocks]

    be.keep_reference(be.network)      # with the adapter nothing is copied: reference() disables it
    assert getattr(be, "reference_net", None) is None
    ff = SD3Backend(tiny=True, full_finetune=True)
    assert all(p.requires_grad for p in ff.network.parameters())
    with pytest.raises(RuntimeError):
        with ff.reference(ff.network):
            pass
    ff.keep_reference(ff.network)
    with ff.reference(ff.network) as ref:
        assert ref is not ff.network and not any(p.requires_grad for p in ref.parameters())
    with pytest.raises(BackendError):
        ff.save_lora("/tmp/unused")


def test_bf16_network_float32_velocity_and_lora():
    be32 = FluxBackend(tiny=True)
    be16 = FluxBackend(tiny=True, dtype="bf16")
    assert be16.dtype == torch.bfloat16
    dts = {n: p.dtype for n, p in be16.network.named_parameters()}
    assert all(d == torch.float32 for n, d in dts.items() if "lora_" in n)     # adapter kept in float32
    assert any(d == torch.bfloat16 for n, d in dts.items() if "lora_" not in n)
    cond32, cond16 = be32.encode(PROMPTS), be16.encode(PROMPTS)
    x = be32.noise(2, torch.Generator().manual_seed(4))
    v32, v16 = be32.velocity(be32.network, x, 0.6, cond32), be16.velocity(be16.network, x, 0.6, cond16)
    assert v16.dtype == torch.float32 and v16.shape == x.shape
    rel = (v16 - v32).norm() / v32.norm()
    assert rel < 0.05                                          # same weights, bf16 rounding only


def test_benchmark_script_tiny_cpu(tmp_path):
    import importlib.util
    import json
    spec = importlib.util.spec_from_file_location(
        "flux_lora_step", os.path.join(os.path.dirname(__file__), "..", "benchmarks", "flux_lora_step.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = mod.main(["--tiny", "--device", "cpu", "--warmup", "0", "--steps", "1", "--out", str(tmp_path / "r.json")])
    assert res["params"] == sum(p.numel() for p in FluxBackend(tiny=True, full_finetune=True).network.parameters())
    assert res["lora_params"] > 0 and res["step_s_median"] > 0 and res["image_tokens"] == 64
    assert json.loads((tmp_path / "r.json").read_text())["loss"] == res["loss"]


def test_wan22_routes_each_sample_by_sigma():
    be = WanBackend(tiny=True, two_experts=True, guidance=3.0, guidance_2=1.5)
    net = be.network
    assert len(be.fsdp_blocks()) == 2 * len(net.experts[0].blocks)
    cond = be.encode(PROMPTS)
    x = be.noise(2, torch.Generator().manual_seed(5))
    sig = torch.tensor([0.95, 0.4])                            # boundary 0.875: high expert, then low expert
    v = be.velocity(net, x, sig, cond)
    hi = be._expert_velocity(net.experts[0], x[:1], sig[:1] * 1000, cond.select([0]), 3.0)
    lo = be._expert_velocity(net.experts[1], x[1:], sig[1:] * 1000, cond.select([1]), 1.5)
    torch.testing.assert_close(v, torch.cat([hi, lo]), atol=1e-5, rtol=1e-5)
    assert (hi - be._expert_velocity(net.experts[1], x[:1], sig[:1] * 1000, cond.select([0]), 3.0)).abs().max() > 1e-4


def test_calls_as_relabels_a_module_for_the_block_and_restores_its_role():
    from common.backend import calls_as
    net = torch.nn.Linear(2, 2)
    with calls_as(net, "teacher"):
        assert net.nfe_role == "teacher"
    assert not hasattr(net, "nfe_role")          # absent before: absent after
    net.nfe_role = "student"
    with pytest.raises(RuntimeError), calls_as(net, "fake"):
        assert net.nfe_role == "fake"
        raise RuntimeError("the block fails")
    assert net.nfe_role == "student"             # restored on the way out of an exception too


BARS = ("Writing model shards", "Loading weights", "Loading pipeline components", "it/s]")


def test_tiny_twins_print_no_progress_bars_and_real_loading_keeps_them(tmp_path, capfd):
    """--tiny saves a random miniature and loads it back (the production loader): transformers' and diffusers'
    progress bars for that blink of a round trip went to stderr, ahead of any one-line error. They are off for the
    round trip only (the generator and load_network's teacher twin), both libraries' switches as they were after it;
    loading real weights (a local folder here) still shows its bars (load_pipeline turned diffusers' off for good)."""
    from diffusers.utils import logging as dlog
    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers.utils import logging as tlog
    before = dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled(), are_progress_bars_disabled()
    capfd.readouterr()
    be = Flux2Backend(tiny=True, teacher_pretrained="klein-base")       # the generator and a teacher twin
    err = capfd.readouterr().err
    assert be.teacher_net is not None and not [b for b in BARS if b in err], err
    assert (dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled(), are_progress_bars_disabled()) == before
    if before[:2] == (True, True):   # (unless this environment turned them off: HF_HUB_DISABLE_PROGRESS_BARS=1)
        tiny_pipeline("flux2", seed=3).save_pretrained(tmp_path / "flux2")
        capfd.readouterr()
        be.load_pipeline(str(tmp_path / "flux2"), torch.float32)
        err = capfd.readouterr().err
        assert "Loading pipeline components" in err and "Loading weights" in err, err
        assert dlog.is_progress_bar_enabled() and tlog.is_progress_bar_enabled()
