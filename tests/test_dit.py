"""The small DiT (common/dit.py), its backend, the shapes grammar and the pretraining command."""
import math
import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from common.backend import BackendError, get_backend
from common.dit import (DiT, DiTBackend, DiTConfig, cfg_combine, flow_matching_loss, load_pretrained,
                        media_to_latent, patchify, save_pretrained, timestep_embedding, unpatchify)
from common.flow import make_sigmas, rollout
from toy import shapes as S



pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


def _randomise_zero_layers(net: DiT, seed: int = 0) -> DiT:
    """adaLN-Zero starts with v = 0 and zero gradients upstream; give the zero layers small random weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in [b.ada[1] for b in net.blocks] + [net.final_ada[1], net.final]:
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.05)
    return net


MICRO = dict(dim=32, depth=2, heads=2, patch=4, text_dim=32, text_depth=1, vocab_size=len(S.VOCAB))


def _net(video=False, seed=0, micro=True):
    """A random DiT with non-zero output layers: the micro config (fast) or the tiny preset."""
    torch.manual_seed(seed)
    cfg = DiTConfig(**MICRO, resolution=16, frames=4 if video else 0) if micro else \
        DiTConfig.from_preset("tiny", video)
    return _randomise_zero_layers(DiT(cfg), seed)


# ----- pure pieces ------------------------------------------------------------------------------------------
@given(video=st.booleans(), p=st.sampled_from([1, 2, 4]), hw=st.sampled_from([4, 8]), b=st.integers(1, 3))
def test_patchify_roundtrip_and_layout(video, p, hw, b):
    shape = (3, 2, hw, hw) if video else (3, hw, hw)
    x = torch.randn(b, *shape)
    t = patchify(x, p)
    n_frames = 2 if video else 1
    assert t.shape == (b, n_frames * (hw // p) ** 2, 3 * p * p)
    assert torch.equal(unpatchify(t, p, shape), x)
    # token 0 is the top-left p x p patch of the first frame, channels outermost
    first = x[:, :, 0, :p, :p] if video else x[:, :, :p, :p]
    assert torch.equal(t[:, 0], first.reshape(b, -1))


@given(sig=st.lists(st.floats(0, 1), min_size=1, max_size=5), dim=st.sampled_from([8, 32]))
def test_timestep_embedding_closed_form(sig, dim):
    s = torch.tensor(sig)
    e = timestep_embedding(s, dim)
    k = torch.arange(dim // 2, dtype=torch.float64)
    ang = 1000 * s.double()[:, None] * torch.exp(-math.log(10000.0) * k / (dim // 2))[None]
    assert torch.allclose(e.double(), torch.cat([ang.cos(), ang.sin()], 1), atol=1e-4)


@given(g=st.floats(-3, 8))
def test_cfg_combine_is_affine(g):
    vc, vu = torch.randn(4, 3), torch.randn(4, 3)
    out = cfg_combine(vc, vu, g)
    assert torch.allclose(out, (1 - g) * vu + g * vc, atol=1e-5)
    assert torch.allclose(cfg_combine(vc, vu, 1.0), vc, atol=1e-6)


def _attrs(video):
    place = ("motion", S.MOTIONS) if video else ("position", S.POSITIONS)
    return st.fixed_dictionaries({"shape": st.sampled_from((None,) + S.SHAPES),
                                  "color": st.sampled_from((None,) + S.COLORS),
                                  "size": st.sampled_from((None,) + S.SIZES),
                                  place[0]: st.sampled_from((None,) + place[1])})


@given(data=st.data(), video=st.booleans())
def test_prompt_grammar_roundtrip_and_tokens(data, video):
    a = data.draw(_attrs(video))
    p = S.make_prompt(a)
    assert S.parse_prompt(p, video) == a
    ids, mask = S.tokenize([p, "", "a purple circle"])
    assert ids[:, 0].eq(S.BOS).all() and mask[:, 0].all()
    assert mask[1].sum() == 1                       # the null prompt is [BOS] alone
    assert ids[2, 2] == S.UNK                       # out-of-grammar words map to UNK
    assert int(mask[0].sum()) == 1 + len(p.split())


def test_splits_hold_out_full_combinations():
    train, ev = S.split_prompts("train"), S.split_prompts("eval")
    assert ev and not set(ev) & set(train)
    full, said = S.sample_attrs(300, generator=torch.Generator().manual_seed(0))
    assert not any(S.heldout(s) for s in said)
    assert all(all(f[k] == v for k, v in s.items() if v is not None) for f, s in zip(full, said))


# ----- the network ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("video", [False, True])
def test_dit_shapes_and_gradients(video):
    net = _net(video)
    B = 3
    x = torch.randn(B, *net.cfg.latent_shape, requires_grad=True)
    ids, mask = S.tokenize(["a red circle on the left", "", "a square moving up"])
    out = net(x, torch.rand(B), ids, mask)
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if "frame_pos" not in name and "text.tok" not in name:
            assert p.grad.abs().sum() > 0, name


def test_adaln_zero_init_is_zero_velocity():
    net = DiT(DiTConfig.from_preset("tiny"))
    ids, mask = S.tokenize(["a red circle"] * 2)
    assert torch.count_nonzero(net(torch.randn(2, 3, 32, 32), torch.rand(2), ids, mask)) == 0


def test_gradient_checkpointing_same_gradients():
    grads = []
    for ckpt in (False, True):
        net = _net().train()
        net.grad_checkpointing = ckpt
        ids, mask = S.tokenize(["a blue square"] * 2)
        x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
        net(x, torch.tensor([0.3, 0.8]), ids, mask).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_text_changes_the_output():
    net = _net()
    x, s = torch.randn(1, 3, 16, 16).expand(2, -1, -1, -1), torch.full((2,), 0.5)
    ids, mask = S.tokenize(["a red circle on the left", "a blue square on the right"])
    out = net(x, s, ids, mask)
    assert (out[0] - out[1]).abs().max() > 1e-4


def test_flow_matching_steps_reduce_loss():
    torch.manual_seed(0)
    net = DiT(DiTConfig.from_preset("tiny"))
    b = S.make_batch(16, generator=torch.Generator().manual_seed(0))
    x0, (ids, mask) = media_to_latent(b.media), S.tokenize(b.prompts)

    def eval_loss():  # same sigmas and noise every time: a deterministic estimate
        with torch.no_grad():
            return flow_matching_loss(net, x0, ids, mask, torch.Generator().manual_seed(123)).item()

    before = eval_loss()
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(10):
        loss = flow_matching_loss(net, x0, ids, mask, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert after < 0.8 * before, (before, after)


# ----- the backend ------------------------------------------------------------------------------------------
def test_cfg_scale_one_equals_conditional_and_batched_pass_matches_two_passes():
    be = DiTBackend(tiny=True)
    _randomise_zero_layers(be.network)
    cond = be.encode(["a red circle on the left", "a large green triangle"])
    x, s = be.noise(2, torch.Generator().manual_seed(0)), torch.tensor([0.9, 0.4])
    v_cond = be.network(x, s, cond["ids"], cond["mask"]).float()
    assert torch.equal(be.velocity(be.network, x, s, cond, guidance=1.0), v_cond)
    null = be.null_cond(2)
    v_unc = be.network(x, s, null["ids"][:, :1], null["mask"][:, :1]).float()  # unpadded null prompt
    for g in (0.0, 1.0, 3.5):
        assert torch.allclose(be.velocity(be.network, x, s, cond, guidance=g), cfg_combine(v_cond, v_unc, g),
                              atol=1e-5)


@pytest.mark.parametrize("video", [False, True])
def test_backend_samples_with_rollout(video):
    be = get_backend("dit", tiny=True, video=video, guidance=2.0)
    assert be.media == ("video" if video else "image")
    prompts = be.prompts("train")[:2] + be.prompts("eval")[:1]
    cond = be.encode(prompts)
    x = be.noise(3, torch.Generator().manual_seed(0))
    tr = rollout(be.velocity_fn(be.network, cond), x, be.sigmas(3), kind="dance", noise_level=0.3,
                 generator=torch.Generator().manual_seed(1))
    out = be.decode(tr.final)
    F_, R = be.cfg.frames, be.cfg.resolution
    assert out.shape == ((3, F_, 3, R, R) if video else (3, 3, R, R))
    assert out.min() >= 0 and out.max() <= 1 and tr.logprobs.shape == (3, 3)


def test_decode_is_differentiable_and_inverts_media_to_latent():
    be = DiTBackend(tiny=True, video=True)
    b = S.make_batch(2, video=True, generator=torch.Generator().manual_seed(0))
    lat = media_to_latent(b.media).requires_grad_(True)
    assert lat.shape[1:] == be.latent_shape
    out = be.decode(lat)
    assert torch.allclose(out, b.media, atol=1e-6)
    out.sum().backward()
    assert lat.grad.abs().sum() > 0


def test_bf16_network_returns_float32_velocity():
    be = DiTBackend(tiny=True, dtype="bf16")
    _randomise_zero_layers(be.network.float()).to(torch.bfloat16)
    cond = be.encode(["a red circle"] * 2)
    v = be.velocity(be.network, be.noise(2), 0.5, cond)
    assert v.dtype == torch.float32 and torch.isfinite(v).all()


def test_save_load_roundtrip(tmp_path):
    net = _net(video=True)
    save_pretrained(net, str(tmp_path), steps=7)
    net2 = load_pretrained(str(tmp_path))
    assert net2.cfg.latent_shape == net.cfg.latent_shape and net2.cfg.extra["steps"] == 7
    for (k, a), (k2, b) in zip(net.state_dict().items(), net2.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    be = DiTBackend(pretrained=str(tmp_path))  # the checkpoint's config says video; no flag needed
    assert be.media == "video" and be.latent_shape == net.cfg.latent_shape
    cond = be.encode(["a blue square moving left"])
    x = be.noise(1)
    assert torch.equal(be.velocity(be.network, x, 0.5, cond, 1.0), net(x, torch.tensor([0.5]), cond["ids"],
                                                                          cond["mask"]))


def test_missing_checkpoint_names_the_command(tmp_path):
    with pytest.raises(BackendError, match="python -m toy.pretrain_dit --preset small"):
        DiTBackend(preset="small", pretrained=str(tmp_path / "nothing"))
    with pytest.raises(BackendError, match="unknown DiT preset"):
        DiTBackend(preset="huge")
    with pytest.raises(BackendError):
        DiTBackend(tiny=True).prompts("nope")


def test_pretrain_command_trains_resumes_and_saves(tmp_path, capsys):
    from toy.pretrain_dit import main
    out = str(tmp_path / "run")
    main(["--out", out, "--steps", "3", "--batch", "4", "--save-every", "2", "--eval-per-prompt", "0"])
    assert load_pretrained(out).cfg.extra["steps"] == 3
    main(["--out", out, "--steps", "5", "--batch", "4", "--resume", "--eval-per-prompt", "0"])
    assert load_pretrained(out).cfg.extra["steps"] == 5
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path / "none"), "--resume"])
    assert e.value.code == 2 and "error:" in capsys.readouterr().err


SHIPPED = os.path.join(os.path.dirname(os.path.dirname(__file__)), "toy", "weights", "dit-tiny")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isfile(os.path.join(SHIPPED, "model.safetensors")), reason="no shipped teacher")
def test_shipped_teacher_follows_prompts():
    """The shipped CPU-pretrained tiny teacher: held-out prompts, 12 Euler steps, attributes read from pixels."""
    from toy.shape_rewards import classify_attributes
    be = DiTBackend()  # default location
    prompts = be.prompts("eval")[:6]
    n = 4
    cond = be.encode([p for p in prompts for _ in range(n)])
    with torch.no_grad():
        x = rollout(be.velocity_fn(be.network, cond), be.noise(len(cond.prompts), torch.Generator().manual_seed(0)),
                    make_sigmas(12)).final
    pred = classify_attributes(be.decode(x))
    want = [S.parse_prompt(p) for p in cond.prompts]
    for k in ("color", "position"):
        acc = sum(int(pred[k][i]) == S.ATTRIBUTES[k].index(w[k]) for i, w in enumerate(want)) / len(want)
        chance = 1 / len(S.ATTRIBUTES[k])
        assert acc > chance + 0.3, (k, acc)
