"""The real reward models, built tiny and random, saved in the real checkpoints' layouts, loaded through the
production loaders and checked against direct computations with open_clip / transformers / timm."""
import json
import re

import pytest
import torch
import torch.nn.functional as F

from common import reward_models as RM
from common.rewards import RewardError, RewardWeightsMissing, build_reward

PROMPTS = ["a red apple on a table", "a photo of a cat"]


def assert_close(a, b, atol=1e-5, rtol=1.3e-6):
    """torch.allclose with shapes checked (torch.testing.assert_close imports torch.distributed: 3 s a process)."""
    b = torch.as_tensor(b, dtype=a.dtype, device=a.device)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.allclose(a, b, atol=atol, rtol=rtol), f"max |a - b| = {(a - b).abs().max().item():.3g}"


# tiny models: thread start-up and oversubscription on the shared 2-core machine cost more than they give
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _no_env(monkeypatch, tmp_path):
    for v in ["HPS_CKPT", "PICKSCORE_PATH", "PICKSCORE_PROCESSOR", "CLIP_PATH", "AESTHETIC_CKPT", "IMAGEREWARD_CKPT",
              "IMAGEREWARD_MED_CONFIG", "IMAGEREWARD_TOKENIZER"]:
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("REWARD_WEIGHTS_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _images(b=2, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=g)


def _grad_reaches_pixels(reward, size=40):
    x = torch.rand(2, 3, size, size + 8, requires_grad=True)  # not the native size: resize + crop in the graph
    reward(x, PROMPTS).sum().backward()
    return x.grad is not None and bool(x.grad.abs().sum() > 0) and bool(torch.isfinite(x.grad).all())


def _one_line(exc):
    return "\n" not in str(exc) and len(str(exc)) > 20


# ----- preprocessing ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("hw", [(32, 32), (48, 64), (70, 40), (20, 24)])
def test_resize_center_crop_matches_torchvision(hw):
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    x = torch.rand(2, 3, *hw)
    ref = TF.center_crop(TF.resize(x, 32, InterpolationMode.BICUBIC, antialias=True), 32)
    assert_close(RM.resize_center_crop(x, 32), ref, atol=1e-5, rtol=0)
    if hw == (32, 32):
        assert torch.equal(RM.resize_center_crop(x, 32), x)  # native size: untouched


@pytest.mark.parametrize("hw", [(32, 32), (48, 64), (70, 40), (20, 24), (33, 31)])
def test_resize_longest_pad_matches_torchvision_letterbox(hw):
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    x = torch.rand(2, 3, *hw)
    s = 32 / max(hw)
    new = [round(hw[0] * s), round(hw[1] * s)]
    ref = x if new == list(hw) else TF.resize(x, new, InterpolationMode.BICUBIC, antialias=True)
    ref = TF.center_crop(ref, 32)  # torchvision pads with zeros when the image is smaller than the crop
    out = RM.resize_longest_pad(x, 32)
    assert_close(out, ref, atol=1e-5, rtol=0)
    xg = x.clone().requires_grad_(True)
    RM.resize_longest_pad(xg, 32).sum().backward()
    assert xg.grad.abs().sum() > 0


# ----- HPSv2.1 ---------------------------------------------------------------------------------------------

def test_hps_checkpoint_round_trip_equals_open_clip(tmp_path, monkeypatch):
    import open_clip

    src = RM.tiny_open_clip(seed=3)
    ck = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": src.state_dict()}, ck)  # the released file's layout
    monkeypatch.setenv("HPS_CKPT", str(ck))
    r = build_reward("hps", tiny=True).rewards[0]  # production loader, weights by environment variable
    assert r.names == ["hps"] and r.media == "image" and r.differentiable and r.table_scale == [100.0]

    # direct computation with open_clip's own factory and tokenizer
    cfg = tmp_path / "tiny-hps-test.json"
    cfg.write_text(json.dumps(RM.TINY_OPEN_CLIP))
    open_clip.add_model_config(str(cfg))
    ref = open_clip.create_model("tiny-hps-test", pretrained=None, output_dict=True).eval()
    ref.load_state_dict(torch.load(ck)["state_dict"])
    x = _images()
    px = (x - torch.tensor(open_clip.OPENAI_DATASET_MEAN)[:, None, None]) / torch.tensor(
        open_clip.OPENAI_DATASET_STD)[:, None, None]
    out = ref(px, open_clip.get_tokenizer("ViT-H-14")(PROMPTS))
    hps = (out["image_features"] @ out["text_features"].T).diagonal()
    with torch.no_grad():
        assert_close(r(x, PROMPTS)[:, 0], hps, atol=1e-5, rtol=1e-5)
        assert_close(r.table(x, PROMPTS)[:, 0], 100 * hps, atol=1e-3, rtol=1e-5)
    assert _grad_reaches_pixels(r)


def test_hps_missing_or_wrong_file_is_one_clear_line(tmp_path):
    with pytest.raises(RewardWeightsMissing) as e:
        RM.hps(hps_ckpt=str(tmp_path / "nope.pt"))
    assert isinstance(e.value, FileNotFoundError) and _one_line(e.value)
    assert "HPS_CKPT" in str(e.value) and "HPS_v2.1_compressed.pt" in str(e.value)
    with pytest.raises(RewardWeightsMissing) as e:  # nothing configured, hub offline: says what to download
        RM.hps()
    assert _one_line(e.value) and "xswu/HPSv2" in str(e.value) and "HPS_CKPT" in str(e.value)
    bad = tmp_path / "bad.pt"
    torch.save({"state_dict": {"x": torch.zeros(1)}}, bad)
    with pytest.raises(RewardError) as e:
        RM.hps(hps_ckpt=str(bad), tiny=True)
    assert _one_line(e.value)


# ----- transformers CLIP: PickScore, CLIP score, aesthetic --------------------------------------------------

@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("pickscore")
    model, proc = RM.tiny_clip(seed=5)
    with torch.no_grad():
        model.logit_scale.fill_(3.0)  # a PickScore-like learnt temperature, not the init value
    model.save_pretrained(d)
    proc.save_pretrained(d)  # the model dir also holds the processor
    return str(d)


def _direct_clip(d, x):
    """Direct transformers computation: CLIPModel + CLIPProcessor (no resize at the native size, no rescale)."""
    from transformers import CLIPModel, CLIPProcessor

    model, proc = CLIPModel.from_pretrained(d).eval(), CLIPProcessor.from_pretrained(d)
    inputs = proc(text=PROMPTS, images=list(x), do_rescale=False, do_resize=False, do_center_crop=False,
                  padding=True, return_tensors="pt")
    with torch.no_grad():
        o = model(**inputs)
    return model, o


def test_pickscore_and_clip_equal_transformers(clip_dir):
    x = _images(seed=1)
    pick = RM.pickscore(pickscore_path=clip_dir)
    clip = RM.clip_score(clip_path=clip_dir)
    model, o = _direct_clip(clip_dir, x)
    cos = (F.normalize(o.image_embeds, dim=-1) * F.normalize(o.text_embeds, dim=-1)).sum(-1)
    with torch.no_grad():
        assert_close(pick.table(x, PROMPTS)[:, 0], model.logit_scale.exp() * cos, atol=1e-4, rtol=1e-5)
        assert_close(pick(x, PROMPTS)[:, 0], cos, atol=1e-5, rtol=1e-5)
        assert_close(clip.table(x, PROMPTS)[:, 0], 100 * cos, atol=1e-3, rtol=1e-5)
    assert pick.table_scale[0] == pytest.approx(torch.e ** 3.0, rel=1e-5)
    assert _grad_reaches_pixels(pick)


def test_aesthetic_equals_transformers_embedding_into_the_mlp(clip_dir, tmp_path):
    from transformers import CLIPModel

    d = RM.tiny_clip()[0].config.projection_dim
    g = torch.Generator().manual_seed(0)
    sizes = [(1024, d), (128, 1024), (64, 128), (16, 64), (1, 16)]
    sd = {}
    for i, (o, n) in zip([0, 2, 4, 6, 7], sizes):  # the released .pth keys: layers.0/2/4/6/7
        sd[f"layers.{i}.weight"] = torch.randn(o, n, generator=g) / n ** 0.5
        sd[f"layers.{i}.bias"] = torch.randn(o, generator=g)
    ck = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(sd, ck)
    r = RM.aesthetic(aesthetic_ckpt=str(ck), clip_path=clip_dir)
    x = _images(seed=2)
    model = CLIPModel.from_pretrained(clip_dir).eval()
    px = (x - torch.tensor(RM.CLIP_MEAN)[:, None, None]) / torch.tensor(RM.CLIP_STD)[:, None, None]
    with torch.no_grad():
        h = F.normalize(model.get_image_features(pixel_values=px).pooler_output, dim=-1)
        for i in [0, 2, 4, 6, 7]:  # no activations between the linear layers
            h = F.linear(h, sd[f"layers.{i}.weight"], sd[f"layers.{i}.bias"])
        assert_close(r(x)[:, 0], h[:, 0], atol=1e-4, rtol=1e-5)
    assert r.names == ["aesthetic"] and _grad_reaches_pixels(r)
    sd["layers.0.weight"] = torch.zeros(1024, d + 1)
    torch.save(sd, ck)
    with pytest.raises(RewardError) as e:  # an MLP for another CLIP width
        RM.aesthetic(aesthetic_ckpt=str(ck), clip_path=clip_dir)
    assert _one_line(e.value)


@pytest.mark.parametrize("factory, env", [(RM.pickscore, "PICKSCORE_PATH"), (RM.clip_score, "CLIP_PATH"),
                                          (RM.aesthetic, "AESTHETIC_CKPT"), (RM.image_reward, "IMAGEREWARD_CKPT")])
def test_missing_weights_name_what_to_download(factory, env, clip_dir, tmp_path, monkeypatch):
    if factory is RM.aesthetic:
        monkeypatch.setenv("CLIP_PATH", clip_dir)  # backbone present, the MLP file missing
    with pytest.raises(RewardWeightsMissing) as e:
        factory()
    assert _one_line(e.value) and env in str(e.value)


# ----- ImageReward ----------------------------------------------------------------------------------------

def released_imagereward_layout(v: dict, med: dict, embed_dim: int) -> dict[str, tuple]:
    """Every key of ImageReward.pt with its shape, for a given size, written from the released architecture:
    BLIP_Pretrain (timm-style VisionTransformer `visual_encoder`, med.py BertModel `text_encoder` without pooler,
    with cross-attention in every layer, and position_ids as a persistent buffer; vision_proj, text_proj) under
    "blip.", and the head `mlp.layers` (Linear at 0, 2, 4, 6, 7). Written independently of the production
    mapping."""
    dv, dt, n = v["hidden_size"], med["hidden_size"], (v["image_size"] // v["patch_size"]) ** 2
    p, iv, it = v["patch_size"], v["intermediate_size"], med["intermediate_size"]
    keys = {"blip.visual_encoder.cls_token": (1, 1, dv), "blip.visual_encoder.pos_embed": (1, n + 1, dv),
            "blip.visual_encoder.patch_embed.proj.weight": (dv, 3, p, p),
            "blip.visual_encoder.patch_embed.proj.bias": (dv,),
            "blip.visual_encoder.norm.weight": (dv,), "blip.visual_encoder.norm.bias": (dv,)}
    for i in range(v["num_hidden_layers"]):
        b = f"blip.visual_encoder.blocks.{i}."
        keys.update({b + "norm1.weight": (dv,), b + "norm1.bias": (dv,), b + "attn.qkv.weight": (3 * dv, dv),
                     b + "attn.qkv.bias": (3 * dv,), b + "attn.proj.weight": (dv, dv), b + "attn.proj.bias": (dv,),
                     b + "norm2.weight": (dv,), b + "norm2.bias": (dv,), b + "mlp.fc1.weight": (iv, dv),
                     b + "mlp.fc1.bias": (iv,), b + "mlp.fc2.weight": (dv, iv), b + "mlp.fc2.bias": (dv,)})
    t = "blip.text_encoder."
    keys.update({t + "embeddings.word_embeddings.weight": (med["vocab_size"], dt),
                 t + "embeddings.position_embeddings.weight": (med["max_position_embeddings"], dt),
                 t + "embeddings.position_ids": (1, med["max_position_embeddings"]),
                 t + "embeddings.LayerNorm.weight": (dt,), t + "embeddings.LayerNorm.bias": (dt,)})
    for i in range(med["num_hidden_layers"]):
        b = f"{t}encoder.layer.{i}."
        for att, kv_in in [("attention", dt), ("crossattention", dv)]:  # cross-attention keys/values read the image
            keys.update({f"{b}{att}.self.query.weight": (dt, dt), f"{b}{att}.self.query.bias": (dt,),
                         f"{b}{att}.self.key.weight": (dt, kv_in), f"{b}{att}.self.key.bias": (dt,),
                         f"{b}{att}.self.value.weight": (dt, kv_in), f"{b}{att}.self.value.bias": (dt,),
                         f"{b}{att}.output.dense.weight": (dt, dt), f"{b}{att}.output.dense.bias": (dt,),
                         f"{b}{att}.output.LayerNorm.weight": (dt,), f"{b}{att}.output.LayerNorm.bias": (dt,)})
        keys.update({b + "intermediate.dense.weight": (it, dt), b + "intermediate.dense.bias": (it,),
                     b + "output.dense.weight": (dt, it), b + "output.dense.bias": (dt,),
                     b + "output.LayerNorm.weight": (dt,), b + "output.LayerNorm.bias": (dt,)})
    keys.update({"blip.vision_proj.weight": (embed_dim, dv), "blip.vision_proj.bias": (embed_dim,),
                 "blip.text_proj.weight": (embed_dim, dt), "blip.text_proj.bias": (embed_dim,)})
    widths = [dt, 1024, 128, 64, 16, 1]
    for j, i in enumerate([0, 2, 4, 6, 7]):
        keys.update({f"mlp.layers.{i}.weight": (widths[j + 1], widths[j]), f"mlp.layers.{i}.bias": (widths[j + 1],)})
    return keys


@pytest.fixture(scope="module")
def tiny_ir():
    model, tok, med = RM.tiny_imagereward(seed=7)
    return model, tok, med


def _released_state(model, med):
    """A tiny model's weights written in ImageReward.pt's layout (+ the persistent position_ids buffer)."""
    sd = {RM.hf_key_to_imagereward(k): v.clone() for k, v in model.state_dict().items()}
    sd["blip.text_encoder.embeddings.position_ids"] = torch.arange(med["max_position_embeddings"])[None]
    return sd


def test_imagereward_mapping_is_a_bijection_on_every_released_key(tiny_ir):
    model, _, med = tiny_ir
    released = released_imagereward_layout(RM.TINY_BLIP_VISION, med, model.vision_proj.out_features)
    target = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    mapped = {}
    for k, shape in released.items():
        hk = RM.imagereward_key_to_hf(k)
        if k in RM.IMAGEREWARD_DROPPED:  # transformers rebuilds this buffer (non-persistent there)
            assert hk is None
            continue
        assert hk is not None, f"released key {k} has no mapping"
        assert hk not in mapped, f"{k} and {mapped.get(hk)} map to the same key {hk}"
        mapped[hk] = shape
        assert RM.hf_key_to_imagereward(hk) == k  # the inverse used to write released-layout files
    assert set(mapped) == set(target)  # onto: every model weight comes from the checkpoint
    assert mapped == target  # and shapes agree key by key
    assert len(released) == len(target) + len(RM.IMAGEREWARD_DROPPED)


# ImageReward-v1.0 as released: BLIP ViT-L/16 at 224 px (BLIP_Pretrain(vit="large")), med_config.json of BLIP
RELEASED_VIT = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "image_size": 224,
                "patch_size": 16}
RELEASED_MED = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
                "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 3072,
                "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "model_type": "bert",
                "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 0, "type_vocab_size": 2,
                "vocab_size": 30524, "encoder_width": 768, "add_cross_attention": True}


def test_imagereward_mapping_covers_the_released_size_on_meta():
    """The same bijection at the released size (ViT-L/16, BERT-base, 625 keys), with no memory: meta tensors."""
    released = released_imagereward_layout(RELEASED_VIT, RELEASED_MED, 256)
    sd = {k: torch.empty(shape, device="meta") for k, shape in released.items()}
    vcfg, tcfg, embed = RM.imagereward_configs(sd, RELEASED_MED)
    assert (vcfg.num_attention_heads, vcfg.image_size, tcfg.encoder_hidden_size, embed) == (16, 224, 1024, 256)
    with torch.device("meta"):
        model = RM.BlipImageReward(vcfg, tcfg, embed)
    target = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    mapped = {RM.imagereward_key_to_hf(k): s for k, s in released.items() if k not in RM.IMAGEREWARD_DROPPED}
    assert len(mapped) == len(released) - 1 == len(target) and mapped == target


def test_imagereward_vision_mapping_reproduces_a_timm_vit(tiny_ir):
    """BLIP's vit.py is timm's VisionTransformer: a random timm ViT under "blip.visual_encoder." names, loaded
    through the mapping, must give the same image tokens in transformers' BlipVisionModel."""
    from timm.models.vision_transformer import VisionTransformer

    model, _, med = tiny_ir
    v = RM.TINY_BLIP_VISION
    torch.manual_seed(11)
    vit = VisionTransformer(img_size=v["image_size"], patch_size=v["patch_size"], embed_dim=v["hidden_size"],
                            depth=v["num_hidden_layers"], num_heads=v["hidden_size"] // 64,
                            mlp_ratio=v["intermediate_size"] / v["hidden_size"], qkv_bias=True, num_classes=0).eval()
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(0.05 * torch.randn_like(p))  # timm inits zeros/ones in places: perturb so every weight matters
    sd = _released_state(model, med)
    vsd = {"blip.visual_encoder." + k: t for k, t in vit.state_dict().items()}
    assert set(vsd) <= set(sd)  # timm's names are exactly the released vision names
    sd.update(vsd)
    loaded = RM.load_imagereward_model(sd, med).eval()
    px = torch.randn(2, 3, v["image_size"], v["image_size"])
    with torch.no_grad():
        assert_close(loaded.vision_model(pixel_values=px).last_hidden_state, vit.forward_features(px),
                                   atol=1e-5, rtol=1e-4)


def test_imagereward_released_checkpoint_equals_transformers_blip(tiny_ir, tmp_path):
    from transformers import BertTokenizer, BlipConfig, BlipForImageTextRetrieval

    from common.tokenizers import make_bert_tokenizer

    model, _, med = tiny_ir
    sd = _released_state(model, med)
    with torch.no_grad():
        for k in sd:
            if k.startswith("mlp."):
                sd[k] = torch.randn_like(sd[k]) * 0.3  # the head's init is near zero: make it count
    torch.save(sd, tmp_path / "ImageReward.pt")
    (tmp_path / "med_config.json").write_text(json.dumps(med))  # found next to the checkpoint
    make_bert_tokenizer().save_pretrained(tmp_path / "bert")  # plain BERT; the loader adds [DEC] and [ENC]
    r = build_reward("imagereward", imagereward_ckpt=str(tmp_path / "ImageReward.pt"),
                     imagereward_tokenizer=str(tmp_path / "bert")).rewards[0]
    assert r.names == ["imagereward"] and r.table_scale == [1.0]

    # direct: transformers' BLIP retrieval model holding the same ViT and BERT, with the spec's computation
    vcfg, tcfg, embed = RM.imagereward_configs(sd, med)
    blip = BlipForImageTextRetrieval(BlipConfig(vision_config=vcfg.to_dict(), text_config=tcfg.to_dict(),
                                                image_text_hidden_size=embed)).eval()
    hf = {RM.imagereward_key_to_hf(k): t for k, t in sd.items() if not k.startswith("mlp.")}
    missing, unexpected = blip.load_state_dict({k: t for k, t in hf.items() if k}, strict=False)
    assert all(k.startswith("itm_head") for k in missing) and not unexpected
    tok = BertTokenizer.from_pretrained(tmp_path / "bert")
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    t = tok(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    x = _images(seed=4)
    px = (x - torch.tensor(RM.CLIP_MEAN)[:, None, None]) / torch.tensor(RM.CLIP_STD)[:, None, None]
    with torch.no_grad():
        img = blip.vision_model(pixel_values=px).last_hidden_state
        img_mask = torch.ones(img.shape[:-1], dtype=torch.long)
        cls = blip.text_encoder(input_ids=t.input_ids, attention_mask=t.attention_mask, encoder_hidden_states=img,
                                encoder_attention_mask=img_mask).last_hidden_state[:, 0]
        for i in [0, 2, 4, 6, 7]:
            cls = F.linear(cls, sd[f"mlp.layers.{i}.weight"], sd[f"mlp.layers.{i}.bias"])
        ref = (cls[:, 0] - 0.16717362830052426) / 1.0333394966054072
        out = r(x, PROMPTS)[:, 0]
    assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert out.std() > 0 and _grad_reaches_pixels(r)


def test_imagereward_unknown_keys_are_reported_and_missing_ones_rejected(tiny_ir, caplog):
    model, _, med = tiny_ir
    sd = _released_state(model, med)
    sd["blip.some_extra.weight"] = torch.zeros(1)
    RM.load_imagereward_model(sd, med)
    assert any("ignored 1 checkpoint keys" in m for m in caplog.messages)
    del sd["blip.visual_encoder.blocks.0.attn.qkv.weight"]
    with pytest.raises(RewardError) as e:
        RM.load_imagereward_model(sd, med)
    assert _one_line(e.value) and re.search(r"self_attn\.qkv", str(e.value))


# ----- tiny builds, multi-objective and video rewards ------------------------------------------------------

def test_every_real_reward_builds_tiny_and_backpropagates():
    mr = build_reward("hps:0.7,pickscore,clip:1.4,aesthetic,imagereward:0.5", tiny=True)
    assert mr.names == ["hps", "pickscore", "clip", "aesthetic", "imagereward"] and mr.differentiable
    x = torch.rand(3, 3, 24, 40, requires_grad=True)
    r = mr(x, PROMPTS + ["a dog"])
    assert r.shape == (3, 5) and r.dtype == torch.float32 and torch.isfinite(r).all()
    assert not torch.allclose(r[:, 1], r[:, 2])  # two tiny objectives are different models
    mr.combine(r).sum().backward()
    assert x.grad.abs().sum() > 0
    assert_close(mr.combine(r.detach()), r.detach() @ torch.tensor([0.7, 1, 1.4, 1, 0.5]))


def test_video_rewards_shapes_and_properties():
    mr = build_reward("frames:hps,temporal_consistency:0.5,motion_smoothness:0.5,text_alignment", tiny=True, frames=3)
    assert mr.names == ["hps", "temporal_consistency", "motion_smoothness", "text_alignment"]
    assert mr.media == "video" and mr.differentiable
    frame = _images(b=2, seed=8)
    static = frame[:, None].expand(2, 6, 3, 32, 32)
    moving = torch.rand(2, 6, 3, 32, 32)
    s, m = mr(static, PROMPTS), mr(moving, PROMPTS)
    assert s.shape == m.shape == (2, 4)
    assert_close(s[:, 1], torch.ones(2))  # a static video is perfectly consistent (cos = 1)...
    assert torch.all(m[:, 1] < s[:, 1])  # ...and more consistent than random frames
    assert torch.all(s[:, 2] == 0) and torch.all(m[:, 2] < 0)  # smoothness: 0 is the maximum
    hps, clip = mr.rewards[0].inner, mr.rewards[3].inner
    with torch.no_grad():  # an image reward on a static video equals the reward of its frame
        assert_close(s[:, 0], hps(frame, PROMPTS)[:, 0], atol=1e-5, rtol=1e-5)
        assert_close(s[:, 3], clip(frame, PROMPTS)[:, 0], atol=1e-5, rtol=1e-5)
    sub = RM.temporal_consistency(tiny=True, temporal_frames=3)  # frames 0, 2/3, 5 of 6: compared pairwise
    with torch.no_grad():
        e = mr.rewards[1].clip.image(moving[:, frame_indices_ref(6, 3)].reshape(6, 3, 32, 32)).reshape(2, 3, -1)
        ref = (F.cosine_similarity(e[:, 1:], e[:, :-1], dim=-1)).mean(1)
        assert_close(sub(moving)[:, 0], ref, atol=1e-5, rtol=1e-5)
    v = moving.clone().requires_grad_(True)
    mr.combine(mr(v, PROMPTS)).sum().backward()
    assert v.grad.abs().sum() > 0


def frame_indices_ref(f, n):
    return [round(i * (f - 1) / (n - 1)) for i in range(n)]


def test_image_rewards_average_videos_over_frames_and_check_inputs():
    r = RM.hps(tiny=True)
    v = torch.rand(2, 5, 3, 32, 32)
    with torch.no_grad():
        ref = torch.stack([r(v[:, j], PROMPTS) for j in (0, 1, 3, 4)]).mean(0)  # 4 evenly spread frames of 5
        assert_close(r(v, PROMPTS), ref, atol=1e-6, rtol=1e-5)
    with pytest.raises(RewardError):
        r(torch.rand(2, 3, 32, 32), None)  # prompts are required
    with pytest.raises(RewardError):
        r(torch.rand(2, 3, 32, 32), ["one prompt"])  # one prompt per image
    with pytest.raises(RewardError):
        r(torch.rand(2, 1, 32, 32), PROMPTS)  # not RGB
