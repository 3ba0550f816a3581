"""VideoAlign's VideoReward (common/videoalign.py): a tiny random Qwen2-VL reward model saved in the released
checkpoint layout and loaded through the production loader; the head readout against a hand computation on
transformers' own Qwen2VLModel; frames and patches against torchvision and transformers' processor; batch
invariance; the --reward names; missing weights as one line (exit status 2 through otca.py)."""
import os
import sys

import pytest
import torch

from common import videoalign as VA
from common.rewards import RewardError, RewardWeightsMissing, build_reward, parse_reward_spec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PROMPTS = ["a cat", "a red kite over a long sandy beach at dusk"]  # different lengths: right padding in a batch


# tiny models: thread start-up and oversubscription on the shared 2-core machine cost more than they give
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _no_env(monkeypatch, tmp_path):
    for v in ["VIDEOALIGN_PATH", "VIDEOALIGN_BASE", "VIDEOALIGN_TEMPLATE"]:
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("REWARD_WEIGHTS_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny():
    """A tiny VideoReward with LoRA factors (rank 2, B random) injected by peft, as the reference trains it."""
    return VA.tiny_videoreward(seed=3, lora_rank=2)


def _videos(b=2, f=9, h=48, w=72, seed=0):
    return torch.rand(b, f, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _reward(t, **kw):
    return VA.VideoAlignReward(t.model, t.processor, t.template, VA.settings_from(t.model_config, t.processor), **kw)


def _one_line(exc):
    return "\n" not in str(exc) and len(str(exc)) > 20


# ----- frames, sizes, patches -------------------------------------------------------------------------------

def test_frame_count_and_size_by_hand():
    # Wan2.1: 81 frames at 16 fps = 5.06 s -> 10.1 frames at 2 fps -> 10; 5 tiny frames -> the floor of 4
    assert VA.frame_count(81, 16.0, 2.0) == 10
    assert VA.frame_count(5, 16.0, 2.0) == 4
    assert VA.frame_count(3, 16.0, 2.0) == 2      # the ceiling floor(min(768, 3) / 2) * 2 = 2 wins over 4
    assert VA.frame_count(1, 16.0, 2.0) == 1      # used whole (patchify repeats it)
    assert VA.frame_count(100, 16.0, frames=7) == 8
    assert VA.frame_positions(5, 4).tolist() == [0, 1, 3, 4]  # round(0, 1.33, 2.67, 4)
    # 480x832 with max 200704: rounded sides 476x840 too many -> beta = sqrt(399360 / 200704) -> floors 336x588
    assert VA.frame_size(480, 832, 200704) == (336, 588)
    # 32x32: 28x28 too few for 128 * 28 * 28 -> beta = sqrt(100352 / 1024) = 9.9 -> ceil(316.8 / 28) * 28 = 336
    assert VA.frame_size(32, 32, 200704) == (336, 336)


@pytest.mark.parametrize("size", [(56, 84), (112, 140), (28, 56)])
def test_prepare_frames_equals_an_8bit_decode_and_torchvision_resize(size):
    """The reference's path: uint8 frames, torchvision's uint8 bicubic antialias resize, /255, CLIP normalisation.
    Ours resizes in float between two roundings: equal up to a rounding tie (one 8-bit level, rare pixels)."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    x = torch.rand(6, 3, 50, 70, generator=torch.Generator().manual_seed(1))
    u8 = (x * 255).round().to(torch.uint8)[VA.frame_positions(6, 4)]
    ref = TF.resize(u8, list(size), interpolation=InterpolationMode.BICUBIC, antialias=True).float() / 255
    ours = VA.prepare_frames(x, 4, size) * torch.tensor(VA.CLIP_STD)[:, None, None] \
        + torch.tensor(VA.CLIP_MEAN)[:, None, None]
    levels = (ours - ref).abs() * 255
    assert ours.shape == (4, 3, *size)
    assert levels.max() < 1.001 and (levels > 0.5).float().mean() < 1e-3


@pytest.mark.parametrize("frames", [4, 5])
def test_patchify_equals_the_qwen2vl_video_processor(frames):
    """Same patches and grid as transformers' Qwen2VLVideoProcessor on already-sized, already-normalised frames,
    an odd frame count included (the last frame repeated to fill the temporal patch)."""
    from transformers import Qwen2VLVideoProcessor

    fr = torch.randn(frames, 3, 56, 84, generator=torch.Generator().manual_seed(2))
    out = Qwen2VLVideoProcessor(min_pixels=28 * 28, max_pixels=10 ** 7)(
        videos=[fr], do_resize=False, do_rescale=False, do_normalize=False, return_tensors="pt")
    p, grid = VA.patchify(fr)
    assert torch.equal(p, out["pixel_values_videos"]) and grid.tolist() == out["video_grid_thw"][0].tolist()


def test_token_ids_equal_the_qwen2vl_processor(tiny):
    """Our text path (chat template, video placeholder expanded, right padding) gives the processor's input_ids."""
    r = _reward(tiny)
    v = _videos()
    ours = r.inputs(v, PROMPTS)
    n, size = VA.frame_count(9, 16.0), VA.frame_size(48, 72, r.settings.max_pixels, r.settings.min_pixels)
    assert (n, size) == (4, (56, 84))
    frames = [VA.prepare_frames(x, n, size) for x in v]
    turns = [[{"role": "user", "content": [{"type": "video"},
                                           {"type": "text", "text": VA.fill_template(tiny.template, p)}]}]
             for p in PROMPTS]
    texts = [tiny.processor.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in turns]
    ref = tiny.processor(text=texts, videos=frames, padding=True, return_tensors="pt",
                         videos_kwargs={"do_resize": False, "do_rescale": False, "do_normalize": False})
    assert torch.equal(ours["input_ids"], ref["input_ids"])
    assert torch.equal(ours["attention_mask"], ref["attention_mask"])
    assert torch.equal(ours["video_grid_thw"], ref["video_grid_thw"])
    assert torch.allclose(ours["pixel_values_videos"], ref["pixel_values_videos"])
    assert ours["attention_mask"][0].sum() < ours["attention_mask"].shape[1]  # the short prompt is padded


# ----- the readout ------------------------------------------------------------------------------------------

def test_read_heads_one_head_three_tokens_diagonal_and_last():
    scores = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)  # value = 15 b + 3 l + n
    pos = torch.tensor([[1, 2, 4], [0, 3, 2]])
    assert VA.read_heads(scores[..., :1], pos).tolist() == [[3, 6, 12], [15, 24, 21]]     # head 0 at each token
    assert VA.read_heads(scores, pos).tolist() == [[3, 7, 14], [15, 25, 23]]              # head k at token k
    assert VA.read_heads(scores, VA.last_positions(torch.tensor([[1, 1, 1, 0, 0], [1] * 5]))).tolist() == \
        [[6, 7, 8], [27, 28, 29]]
    ids = torch.tensor([[9, 7, 8, 0, 6], [7, 8, 6, 6, 1]])
    assert VA.special_positions(ids[:1], [7, 8, 6]).tolist() == [[1, 2, 4]]
    with pytest.raises(RewardError):  # token 6 twice in row 1
        VA.special_positions(ids, [7, 8, 6])
    assert VA.normalise_heads(torch.tensor([[1.0, 2.0, 3.0]]), [1.0, 0.0, -1.0], [2.0, 4.0, 0.5]).tolist() == \
        [[0.0, 0.5, 8.0]]


def test_reward_is_rm_head_at_the_reward_tokens_of_transformers_hidden_states(tiny):
    """Independent reference: transformers' Qwen2VLModel merges the vision features itself (given the same
    sequential positions); the reward tokens are found by a loop over the ids; rm_head's weight is applied by hand
    and the calibration of model_config.json too."""
    r = _reward(tiny)
    v = _videos()
    inp = r.inputs(v, PROMPTS)
    b, n = inp["input_ids"].shape
    pos = torch.arange(n).view(1, 1, n).expand(3, b, n)
    with torch.no_grad():
        h = tiny.model.vlm.model(**inp, position_ids=pos).last_hidden_state
        got = r(v, PROMPTS)
    w = tiny.model.rm_head.weight[0]
    tok_ids = tiny.processor.tokenizer.convert_tokens_to_ids(list(VA.SPECIAL_TOKENS))
    cal = tiny.model_config["inference_config"]
    for i in range(b):
        row = inp["input_ids"][i].tolist()
        for k, head in enumerate(VA.HEADS):
            raw = float(h[i, row.index(tok_ids[k])] @ w)
            want = (raw - cal[f"{head}_mean"]) / cal[f"{head}_std"]
            assert abs(float(got[i, k]) - want) < 1e-5
    assert r.names == ["VQ", "MQ", "TA"] and got.shape == (2, 3)
    raw = _reward(tiny).raw(v, PROMPTS)
    assert torch.allclose(got, (raw - torch.tensor([0.3, -0.2, 0.1])) / torch.tensor([2.0, 0.5, 1.5]))


def test_batch_invariance_and_gradient(tiny):
    """One by one = batched (rows right-padded to the longest prompt), any micro-batch size; gradients reach the
    pixels (straight-through 8-bit rounding)."""
    v = _videos(b=3, f=5, h=40, w=60, seed=4)
    prompts = PROMPTS + ["three small boats"]
    with torch.no_grad():
        batched = _reward(tiny, batch=0)(v, prompts)
        single = torch.cat([_reward(tiny, batch=1)(v[i:i + 1], prompts[i:i + 1]) for i in range(3)])
    assert torch.allclose(batched, single, atol=1e-5)
    x = v[:2].clone().requires_grad_(True)
    _reward(tiny)(x, PROMPTS).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0 and torch.isfinite(x.grad).all()


# ----- the released layout ----------------------------------------------------------------------------------

def test_key_mapping_round_trips_every_key(tiny):
    """Every key of the LoRA-wrapped model -> its released name -> back: the same tensor (base_layer and whole
    tensors), or the Linear it belongs to (LoRA factors); lm_head is known and skipped."""
    for key in tiny.model.state_dict():
        for adapter in (False, True):
            target, kind = VA.released_key_to_ours(VA.ours_to_released_key(key, adapter_file=adapter))
            if key.startswith("vlm.lm_head."):
                assert kind == "skip"
            elif ".lora_" in key:
                assert kind == "lora_" + key.split(".lora_")[1][0] and target == key.split(".lora_")[0] + ".weight"
            else:
                assert kind == "tensor" and target == key.replace(".base_layer.", "."), key
    # the transformers 4.45 names of the released file
    assert VA.ours_to_released_key("vlm.model.language_model.layers.0.self_attn.q_proj.lora_A.default.weight") == \
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
    assert VA.ours_to_released_key("vlm.model.visual.blocks.0.attn.qkv.weight") == \
        "base_model.model.visual.blocks.0.attn.qkv.weight"
    assert VA.released_key_to_ours("base_model.model.model.embed_tokens.weight") == \
        ("vlm.model.language_model.embed_tokens.weight", "tensor")


@pytest.mark.parametrize("layout", ["lora", "full"])
def test_released_checkpoint_round_trip(tiny, tmp_path, monkeypatch, layout):
    """Saved as the released folders (base model; model_config.json + checkpoint-7 with adapter + non-LoRA
    tensors, or one model.pth), loaded by `--reward videoalign` through the environment variables: the scores of
    the in-memory model (peft's unmerged LoRA layers) to float precision; the LoRA factors do matter."""
    reward_dir, base_dir = VA.save_videoreward(tiny, tmp_path, layout=layout)
    monkeypatch.setenv("VIDEOALIGN_PATH", str(reward_dir))
    monkeypatch.setenv("VIDEOALIGN_BASE", str(base_dir))
    v = _videos(seed=5)
    loaded = build_reward("videoalign")
    assert loaded.names == ["VQ", "MQ", "TA"]
    with torch.no_grad():
        want = _reward(tiny)(v, PROMPTS)
        got = loaded(v, PROMPTS)
        assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
        assert torch.allclose(loaded.combine(got), want.sum(1), atol=1e-5)  # VideoAlign's Overall = VQ + MQ + TA
        no_lora = VA.VideoRewardModel(VA.tiny_videoreward(seed=3).model.vlm, 1, tiny.model.special_token_ids)
        no_lora.rm_head.weight.copy_(tiny.model.rm_head.weight)
        bare = VA.VideoAlignReward(no_lora, tiny.processor, tiny.template, loaded.rewards[0].settings)(v, PROMPTS)
    assert (bare - want).abs().max() > 1e-3


def test_template_read_from_videoalign_prompt_template_py_without_running_it(tmp_path):
    f = tmp_path / "prompt_template.py"
    f.write_text('raise SystemExit("executed")\nOTHER = "x"\nDETAILED_PROMPT_WITH_SPECIAL_TOKEN = """A {text_prompt} '
                 '<|VQ_reward|> <|MQ_reward|> <|TA_reward|>"""\n')
    t = VA.template_from_file(str(f), "detailed_special")
    assert t == "A {text_prompt} <|VQ_reward|> <|MQ_reward|> <|TA_reward|>"
    assert VA.fill_template(t, "a cat").startswith("A a cat <|VQ")
    with pytest.raises(RewardError):
        VA.template_from_file(str(f), "video_score")
    with pytest.raises(RewardError):
        VA.check_template("no slot <|VQ_reward|>", special=True)


# ----- registry, script, errors -----------------------------------------------------------------------------

def test_reward_names_and_one_shared_model():
    assert parse_reward_spec("videoalign,videoalign_vq:0.5") == [("videoalign", 1.0), ("videoalign_vq", 0.5)]
    r = build_reward("videoalign_vq:1.0,videoalign_mq:0.5", tiny=True)
    assert r.names == ["VQ", "MQ"] and r.rewards[0].model is r.rewards[1].model
    assert r.weights.tolist() == [1.0, 0.5]
    both = build_reward("videoalign", tiny=True)(_videos(f=5, h=32, w=32), PROMPTS)
    with torch.no_grad():
        assert torch.allclose(r(_videos(f=5, h=32, w=32), PROMPTS), both[:, :2], atol=1e-6)
    with pytest.raises(RewardError, match="named twice"):
        build_reward("videoalign,videoalign_ta", tiny=True)
    with pytest.raises(RewardError, match="videos"):
        build_reward("videoalign", tiny=True)(torch.rand(2, 3, 32, 32), PROMPTS)


def test_missing_weights_are_one_line(tmp_path, tiny, monkeypatch):
    with pytest.raises(RewardWeightsMissing) as e:   # nothing configured, hub offline
        VA.videoalign()
    assert _one_line(e.value) and "KwaiVGI/VideoReward" in str(e.value) and "VIDEOALIGN_PATH" in str(e.value)
    with pytest.raises(RewardWeightsMissing) as e:   # a folder without model_config.json
        VA.videoalign(videoalign_path=str(tmp_path))
    assert _one_line(e.value) and "model_config.json" in str(e.value)
    reward_dir, base_dir = VA.save_videoreward(tiny, tmp_path / "w", layout="lora")
    with pytest.raises(RewardWeightsMissing) as e:   # the base model is not in the (empty) hub cache
        VA.videoalign(videoalign_path=str(reward_dir))
    assert _one_line(e.value) and "Qwen/Qwen2-VL-2B-Instruct" in str(e.value) and "VIDEOALIGN_BASE" in str(e.value)
    (reward_dir / "prompt_template.txt").unlink()
    with pytest.raises(RewardWeightsMissing) as e:   # the prompt template is the user's copy of VideoAlign's
        VA.videoalign(videoalign_path=str(reward_dir), videoalign_base=str(base_dir))
    assert _one_line(e.value) and "prompt_template.py" in str(e.value) and "VIDEOALIGN_TEMPLATE" in str(e.value)


def test_otca_missing_weights_exit_2_one_line(tmp_path, capsys, monkeypatch, restore_torch_globals):
    import otca
    from common.config import parse_config, user_errors

    monkeypatch.setenv("VIDEOALIGN_PATH", str(tmp_path / "nowhere"))
    cfg = parse_config(otca.Config, argv=["--out", str(tmp_path / "run"), "--device", "cpu", "--reward",
                                          "videoalign", "--steps", "1", "--eval-samples", "0"],
                       presets=otca.PRESETS, checks=[otca.checks])
    with pytest.raises(SystemExit) as e, user_errors():
        otca.main(cfg)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.count("\n") == 0 and err.startswith("error:") and "VIDEOALIGN_PATH" in err


@pytest.mark.slow
def test_otca_tiny_wan_trains_on_the_three_heads(tmp_path, restore_torch_globals):
    """otca.py --teacher wan --tiny --reward videoalign: one GRPO step on VQ, MQ, TA as three MOCA objectives."""
    import json

    import otca
    from common.config import parse_config

    out = str(tmp_path / "run")
    cfg = parse_config(otca.Config, argv=["--out", out, "--device", "cpu", "--teacher", "wan", "--tiny", "--steps",
                                          "1", "--reward", "videoalign", "--nfe", "3", "--group-size", "2",
                                          "--prompts-per-step", "1", "--micro-batch", "0", "--eval-samples", "2",
                                          "--precision", "fp32"],
                       presets=otca.PRESETS, checks=[otca.checks])
    summary = otca.main(cfg)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(ln) for ln in f]
    assert summary["objectives"] == ["VQ", "MQ", "TA"] and set(summary["rewards"]) >= {"VQ", "MQ", "TA"}
    assert len(rows) == 1 and len(rows[0]["obj_weights"]) == 3 and all(f"r_{h}" in rows[0] for h in VA.HEADS)
