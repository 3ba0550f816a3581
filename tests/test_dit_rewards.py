"""Attribute rewards from pixels (toy/shape_rewards.py) and the attribute-frequency tools."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from common.rewards import RewardError, build_reward
from toy import shape_rewards as R
from toy import shapes as S



pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py
GEN = lambda s=0: torch.Generator().manual_seed(s)


@pytest.fixture(scope="module")
def images():
    return S.make_batch(24, p_open=0.0, generator=GEN(0))


@pytest.fixture(scope="module")
def videos():
    return S.make_batch(12, video=True, p_open=0.0, generator=GEN(1))


def _swap(attrs, key):
    """The same samples with `key` changed to the next value: ground truth vs a wrong attribute."""
    vals = S.ATTRIBUTES[key]
    return [{**a, key: vals[(vals.index(a[key]) + 1) % len(vals)]} for a in attrs]


@pytest.mark.parametrize("key,fn", [("color", R.color_score), ("position", R.position_score),
                                    ("size", R.size_score), ("shape", R.shape_score)])
def test_image_rewards_rank_truth_above_wrong_attribute(images, key, fn):
    good = fn(images.media, images.prompts)
    bad = fn(S.render(_swap(images.attrs, key), generator=GEN(2)), images.prompts)
    assert good.shape == (24,) and (good > bad).all(), (good.min(), bad.max())
    assert good.mean() > 0.6 and bad.mean() < 0.2


@pytest.mark.parametrize("key,fn", [("color", R.color_score), ("size", R.size_score), ("shape", R.shape_score),
                                    ("motion", R.motion_score)])
def test_video_attribute_rewards_rank_truth_above_wrong(videos, key, fn):
    good = fn(videos.media, videos.prompts)
    bad = fn(S.render(_swap(videos.attrs, key), res=16, generator=GEN(2)), videos.prompts)
    assert good.shape == (12,) and (good > bad).all()


def test_sharpness_prefers_sharp_to_blurred(images):
    k = torch.ones(3, 1, 3, 3) / 9
    blurred = torch.nn.functional.conv2d(torch.nn.functional.pad(images.media, (1,) * 4, mode="replicate"), k,
                                         groups=3)
    assert (R.sharpness_score(images.media) > R.sharpness_score(blurred)).all()
    assert (R.sharpness_score(images.media) > R.sharpness_score(0.5 * images.media + 0.25)).all()  # low contrast


def test_video_consistency_and_smoothness(videos):
    v = videos.media
    flicker = v.clone()
    flicker[:, 1::2] = S.render(_swap(videos.attrs, "color"), res=16, generator=GEN(3))[:, 1::2]
    assert (R.temporal_score(v) > R.temporal_score(flicker)).all()
    moving = torch.tensor([a["motion"] != "still" for a in videos.attrs])
    jerky = v[:, torch.tensor([0, 2, 1, 4, 3, 6, 5, 7])]
    assert (R.smoothness_score(v)[moving] > R.smoothness_score(jerky)[moving]).all()
    assert (R.smoothness_score(v) > 0.9).all()


@pytest.mark.parametrize("fn", [R.color_score, R.position_score, R.size_score, R.shape_score, R.sharpness_score])
def test_image_rewards_pass_gradients(images, fn):
    x = (images.media[:6] + 0.02 * torch.randn(6, 3, 32, 32, generator=GEN(4))).clamp(0, 1).requires_grad_(True)
    fn(x, images.prompts[:6]).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("fn", [R.color_score, R.temporal_score, R.smoothness_score, R.motion_score])
def test_video_rewards_pass_gradients(videos, fn):
    x = (videos.media[:3] + 0.02 * torch.randn(3, 8, 3, 16, 16, generator=GEN(5))).clamp(0, 1)
    x.requires_grad_(True)
    fn(x, videos.prompts[:3]).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_gradient_ascent_on_color_reward_moves_towards_target():
    red = S.render([{"shape": "circle", "color": "red", "size": "large", "position": "left"}] * 2, jitter=False)
    blue = S.render([{"shape": "circle", "color": "blue", "size": "large", "position": "left"}] * 2, jitter=False)
    x = (0.7 * red + 0.3 * blue).requires_grad_(True)  # a purple-red shape: the reward is neither 0 nor 1
    start = R.color_score(x, ["a red shape"] * 2)
    for _ in range(20):
        (g,) = torch.autograd.grad(R.color_score(x, ["a red shape"] * 2).sum(), x)
        x = (x + 2.0 * g).clamp(0, 1).detach().requires_grad_(True)
    assert (R.color_score(x, ["a red shape"] * 2) > start + 0.05).all()


def test_empty_and_open_prompts_are_finite():
    blank = torch.tensor(S.BACKGROUND)[None, :, None, None].expand(2, 3, 32, 32).clone()
    for fn in (R.color_score, R.position_score, R.size_score, R.shape_score, R.sharpness_score):
        assert torch.isfinite(fn(blank, ["a shape", "unrelated words"])).all()


def test_classifier_recovers_ground_truth(images, videos):
    for batch in (images, videos):
        pred = R.classify_attributes(batch.media)
        for k, lab in batch.labels.items():
            assert (pred[k] == lab).float().mean() >= 0.9, k


@given(labels=st.lists(st.integers(0, 3), min_size=1, max_size=50))
def test_attribute_frequencies_match_counts(labels):
    f = R.attribute_frequencies(torch.tensor(labels), "color")
    assert f.shape == (4,) and abs(f.sum().item() - 1) < 1e-12
    assert all(abs(f[i].item() - labels.count(i) / len(labels)) < 1e-12 for i in range(4))


@given(p=st.lists(st.floats(0.01, 1), min_size=2, max_size=5), beta=st.floats(-5, 5), c=st.floats(-3, 3))
def test_tilted_frequencies_closed_form(p, beta, c):
    pt = torch.tensor(p, dtype=torch.float64)
    pt = pt / pt.sum()
    r = torch.linspace(0, 1, len(p), dtype=torch.float64)
    q = R.tilted_frequencies(pt, r, beta)
    ref = pt * torch.exp(beta * r)
    assert torch.allclose(q, ref / ref.sum(), atol=1e-12)
    assert torch.allclose(R.tilted_frequencies(pt, r + c, beta), q, atol=1e-12)  # a constant shift cancels in Z
    assert torch.allclose(R.tilted_frequencies(pt, r, 0.0), pt, atol=1e-12)


@pytest.mark.slow
def test_tilted_frequencies_match_importance_resampling():
    """Monte Carlo: draw attributes from p_T, resample with weights exp(beta r): the frequencies converge to
    p_T exp(beta r) / Z (independent of the closed form's softmax)."""
    g = GEN(7)
    pt = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    r = torch.tensor([0.0, 1.0, 0.2, 0.9], dtype=torch.float64)
    draws = torch.multinomial(pt, 200_000, replacement=True, generator=g)
    w = torch.exp(1.5 * r[draws])
    res = draws[torch.multinomial(w, 200_000, replacement=True, generator=g)]
    mc = R.attribute_frequencies(res, "color")
    assert torch.allclose(mc, R.tilted_frequencies(pt, r, 1.5), atol=0.01)


def test_reward_by_value_and_registry():
    rew = build_reward("dit_color", color_target="red", device="cpu")
    rv = R.reward_by_value(rew, "color", n=6, generator=GEN(8))
    assert rv.shape == (4,) and rv[0] > 0.6 and (rv[1:] < 0.1).all()
    multi = build_reward("dit_color,dit_position:0.5,dit_size,dit_shape,dit_sharpness")
    b = S.make_batch(4, generator=GEN(9))
    out = multi(b.media, b.prompts)
    assert out.shape == (4, 5) and multi.combine(out).shape == (4,)
    vid = build_reward("dit_temporal,dit_smoothness,dit_motion")
    v = S.make_batch(2, video=True, generator=GEN(9))
    assert vid(v.media, v.prompts).shape == (2, 3)
    with pytest.raises(RewardError):
        build_reward("dit_color", color_target="purple")
