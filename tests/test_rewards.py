"""The reward interface without models: spec parser, MultiReward, build_reward, frame sampling, motion smoothness."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from common import rewards as R
from common.rewards import (FnReward, FramesReward, MultiReward, RewardError, frame_indices, motion_smoothness,
                            parse_reward_spec, per_frame)

REAL = ["hps", "pickscore", "clip", "aesthetic", "imagereward", "temporal_consistency", "motion_smoothness",
        "text_alignment"]
weights = st.floats(min_value=-100, max_value=100, allow_nan=False).map(lambda w: round(w, 4))


def assert_close(a, b, atol=1e-5, rtol=1.3e-6):
    """torch.allclose with shapes checked (torch.testing.assert_close imports torch.distributed: 3 s a process)."""
    b = torch.as_tensor(b, dtype=a.dtype, device=a.device)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.allclose(a, b, atol=atol, rtol=rtol), f"max |a - b| = {(a - b).abs().max().item():.3g}"


@given(st.lists(st.tuples(st.sampled_from(REAL + ["frames:hps", "frames:clip"]), weights), min_size=1, max_size=4),
       st.lists(st.booleans(), min_size=4, max_size=4))
def test_parser_round_trips_names_and_weights(pairs, explicit):
    # weight 1.0 may be written or left out; both parse to 1.0
    spec = ",".join(f"{n}:{w}" if (e or w != 1.0) else n for (n, w), e in zip(pairs, explicit))
    assert parse_reward_spec(spec) == [(n, float(w)) for n, w in pairs]


@pytest.mark.parametrize("spec, bad", [("hsp", "'hsp'"), ("hps:0.5,clipp:2", "'clipp'"), ("frames:nope", "frames:nope"),
                                       ("frames:frames:hps", "frames:frames:hps"), ("hps:1:2", "'hps:1'")])
def test_parser_rejects_unknown_names_with_one_line(spec, bad):
    with pytest.raises(RewardError) as e:
        parse_reward_spec(spec)
    msg = str(e.value)
    assert "\n" not in msg and bad in msg and "unknown reward" in msg and "hps" in msg  # names the choices


@pytest.mark.parametrize("spec", ["hps:abc", "clip:x", "hps:nan", "hps:inf", "", " , "])
def test_parser_rejects_bad_weights_and_empty_specs(spec):
    with pytest.raises(RewardError) as e:
        parse_reward_spec(spec)
    assert "\n" not in str(e.value)


def test_parser_bare_frames_name_is_weight_one():
    assert parse_reward_spec(" frames:hps , clip:1.4 ") == [("frames:hps", 1.0), ("clip", 1.4)]


def _factory_a(scale: float = 1.0):
    return FnReward(lambda x: scale * x.flatten(1).mean(1), names="a", media="image", table_scale=10.0)


def _factory_b(**opts):
    return FnReward(lambda x: x.flatten(1).std(1) + opts.get("offset", 0.0), names="b", media="image")


@pytest.fixture
def fake_registry(monkeypatch):
    reg = dict(R.REGISTRY)
    reg.update({"fa": f"{__name__}:_factory_a", "fb": f"{__name__}:_factory_b"})
    monkeypatch.setattr(R, "REGISTRY", reg)


def test_build_reward_filters_options_and_combines(fake_registry):
    x = torch.rand(5, 3, 8, 8)
    mr = R.build_reward("fa:0.5,fb:2", scale=3.0, offset=1.0, tiny=True)  # fa takes scale only; fb takes all
    assert isinstance(mr, MultiReward) and mr.names == ["a", "b"] and mr.media == "image"
    r = mr(x)
    ref = torch.stack([3.0 * x.flatten(1).mean(1), x.flatten(1).std(1) + 1.0], 1)
    assert_close(r, ref)
    assert_close(mr.combine(r), 0.5 * ref[:, 0] + 2 * ref[:, 1])
    assert mr.table_scale == [10.0, 1.0]
    assert_close(mr.table(x), ref * torch.tensor([10.0, 1.0]))


def test_build_reward_rejects_duplicate_objectives(fake_registry):
    with pytest.raises(RewardError, match="named twice"):
        R.build_reward("fa,fa:2")


def test_build_reward_frames_prefix_wraps_image_rewards(fake_registry):
    mr = R.build_reward("frames:fa", frames=3)
    (fr,) = mr.rewards
    assert isinstance(fr, FramesReward) and fr.media == "video" and fr.frames == 3 and fr.table_scale == [10.0]
    v = torch.rand(2, 7, 3, 4, 4)
    ref = v[:, [0, 3, 6]].flatten(2).mean(2).mean(1)  # frames 0, 3, 6 of 7
    assert_close(mr(v)[:, 0], ref)
    with pytest.raises(RewardError):
        fr(torch.rand(2, 3, 4, 4))  # an image given to a video reward: one clear error


@given(st.integers(1, 60), st.integers(-1, 70))
def test_frame_indices_are_even_sorted_and_cover_the_ends(f, n):
    idx = frame_indices(f, n).tolist()
    assert idx == sorted(set(idx)) and 0 <= idx[0] and idx[-1] <= f - 1
    if n <= 0 or n >= f:
        assert idx == list(range(f))
    elif n == 1:
        assert idx == [(f - 1) // 2]  # the middle frame
    else:
        assert idx[0] == 0 and idx[-1] == f - 1 and len(idx) <= n
        # evenly spaced: gaps differ by at most one frame (rounding of linspace)
        if n >= 2 and len(idx) == n:
            gaps = [b - a for a, b in zip(idx, idx[1:])]
            assert max(gaps) - min(gaps) <= 1


@given(st.integers(1, 4), st.integers(1, 9), st.integers(0, 5))
def test_per_frame_equals_a_loop_over_frames(b, f, n):
    v = torch.randn(b, f, 3, 2, 2)
    prompts = [f"p{i}" for i in range(b)]
    seen = []

    def score(imgs, ps):
        seen.append(ps)
        return torch.stack([imgs.mean((1, 2, 3)), imgs.amax((1, 2, 3))], 1)

    out = per_frame(score, v, prompts, n)
    idx = frame_indices(f, n).tolist()
    ref = torch.stack([torch.stack([v[:, j].mean((1, 2, 3)), v[:, j].amax((1, 2, 3))], 1) for j in idx]).mean(0)
    assert_close(out, ref)
    assert seen[0] == [p for p in prompts for _ in idx]  # each frame is scored against its own video's prompt


def _ref_smoothness(v):
    # independent reference: torch.diff of order 2 along time, per video
    return torch.stack([-(torch.diff(x.float(), n=2, dim=0) ** 2).mean() for x in v])


@given(st.integers(1, 3), st.integers(3, 8), st.integers(1, 16))
def test_motion_smoothness_matches_second_difference(b, f, side):
    v = torch.rand(b, f, 3, side, side)
    assert_close(motion_smoothness(v), _ref_smoothness(v))


@given(st.floats(-0.05, 0.05), st.integers(3, 9))
def test_motion_smoothness_is_maximal_for_static_and_constant_rate_videos(rate, f):
    base = torch.rand(2, 1, 3, 8, 8)
    t = torch.arange(f, dtype=torch.float32)[None, :, None, None, None]
    static, ramp = base.expand(2, f, 3, 8, 8), base + rate * t  # pixels changing at a constant rate
    jitter = static + 0.1 * torch.randn(2, f, 3, 8, 8)
    assert torch.all(motion_smoothness(static) == 0)
    assert torch.allclose(motion_smoothness(ramp), torch.zeros(2), atol=1e-10)
    assert torch.all(motion_smoothness(jitter) < 0)


def test_motion_smoothness_downsamples_large_frames_and_has_gradients():
    v = torch.rand(2, 4, 3, 130, 100, requires_grad=True)
    s = motion_smoothness(v, max_side=64)  # ceil(130 / 64) = 3: a 3x3 area average first
    pooled = torch.nn.functional.avg_pool2d(v.detach().reshape(8, 3, 130, 100), 3, ceil_mode=True).reshape(2, 4, -1)
    assert_close(s.detach(), _ref_smoothness(pooled))
    s.sum().backward()
    assert v.grad.abs().sum() > 0
    with pytest.raises(RewardError):
        motion_smoothness(torch.rand(2, 2, 3, 8, 8))  # fewer than 3 frames


def test_motion_smoothness_reward_is_registered():
    mr = R.build_reward("motion_smoothness:0.5")
    v = torch.rand(3, 5, 3, 8, 8)
    assert mr.names == ["motion_smoothness"] and mr.media == "video" and mr.differentiable
    assert_close(mr(v)[:, 0], _ref_smoothness(v))


def test_reward_call_shapes_and_table_default():
    r = FnReward(lambda x: x.sum(1), names="s")
    x = torch.randn(4, 2)
    assert r(x).shape == (4, 1) and r.table_scale == [1.0]
    assert_close(r.table(x), r(x))


def test_parse_reward_options_types_and_errors():
    opts = R.parse_reward_options(["hps_ckpt=/w/HPS.pt", "frames=8", "tiny=true", "seed=3", "scale=0.5", "x-y=a=b"])
    assert opts == {"hps_ckpt": "/w/HPS.pt", "frames": 8, "tiny": True, "seed": 3, "scale": 0.5, "x_y": "a=b"}
    assert R.parse_reward_options(None) == {}
    for bad in ["novalue", "=3"]:
        with pytest.raises(RewardError) as e:
            R.parse_reward_options([bad])
        assert "\n" not in str(e.value) and "key=value" in str(e.value)
