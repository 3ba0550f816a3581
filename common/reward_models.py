"""The real reward models, loaded with their real loading code on open_clip and transformers.

name (registry)       model                                    training scale          table scale
hps                   HPSv2.1: open_clip ViT-H-14 + HPS ckpt   cos(image, text)        x100 (as HPS tables)
pickscore             PickScore_v1 (transformers CLIP-H)       cos(image, text)        x exp(logit_scale): the logit
clip                  CLIP ViT-L/14 (openai)                   cos(image, text)        x100 (*)
aesthetic             CLIP-L/14 image embedding + LAION MLP    score on its 1-10 scale x1
imagereward           BLIP ViT-L/16 + BERT + ImageReward MLP   (r - mean) / std        x1 (ImageReward as reported)
temporal_consistency  CLIP-L/14 embeddings of adjacent frames  mean cos                x100
text_alignment        CLIP score averaged over sampled frames  cos                     x100
(*) "CLIP score" columns of text-to-image tables are 100 cos; Hessel et al.'s CLIPScore, 2.5 max(cos, 0), is
    table / 40 clipped at 0. We report 100 cos.
(motion_smoothness has no model: common.rewards.motion_smoothness.)

Weights: every factory takes its location as an option or reads an environment variable, then falls back to the
hub (which works when the files are in the Hugging Face cache, or online without HF_HUB_OFFLINE=1):

  HPS_CKPT           HPS_v2.1_compressed.pt ({"state_dict": ...}), hub xswu/HPSv2
  PICKSCORE_PATH     directory or hub id of yuvalkirstain/PickScore_v1 (CLIPModel)
  PICKSCORE_PROCESSOR  processor dir / hub id (default: PICKSCORE_PATH if it holds a tokenizer, else
                     laion/CLIP-ViT-H-14-laion2B-s32B-b79K, as PickScore's own code does)
  CLIP_PATH          directory or hub id of openai/clip-vit-large-patch14 (clip, aesthetic, video rewards)
  AESTHETIC_CKPT     sac+logos+ava1-l14-linearMSE.pth (github.com/christophschuhmann/improved-aesthetic-predictor)
  IMAGEREWARD_CKPT   ImageReward.pt (hub THUDM/ImageReward); IMAGEREWARD_MED_CONFIG its med_config.json
                     (default: next to the checkpoint); IMAGEREWARD_TOKENIZER bert-base-uncased (dir or hub id)
  REWARD_WEIGHTS_DIR a folder searched for the files above by their released names (default ~/.cache/reward_weights)

A missing file raises common.rewards.RewardWeightsMissing with one line naming what to download and where.

Every factory takes tiny=True: without a weights location it builds a tiny random model of the same
architecture (seeded by `seed`), offline; with a location, tiny=True tells the loader to expect a tiny
architecture (for HPS, whose checkpoint carries no config). Preprocessing is differentiable
(bicubic resize with antialias, centre crop, or for HPS the letterbox of HPSv2's own evaluation transform;
normalise), so gradients reach the pixels.
"""
from __future__ import annotations

import abc
import functools
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from common.rewards import Reward, RewardError, RewardWeightsMissing, frame_indices, per_frame

log = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP / BLIP / HPS normalisation
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGEREWARD_MEAN, IMAGEREWARD_STD = 0.16717362830052426, 1.0333394966054072
IMAGEREWARD_MAX_LEN = 35  # ImageReward tokenises prompts with padding="max_length", max_length=35

HUB = {
    "hps": ("xswu/HPSv2", "HPS_v2.1_compressed.pt"),
    "pickscore": "yuvalkirstain/PickScore_v1",
    "pickscore_processor": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    "clip": "openai/clip-vit-large-patch14",
    "imagereward": ("THUDM/ImageReward", "ImageReward.pt"),
    "imagereward_med_config": ("THUDM/ImageReward", "med_config.json"),
    "bert": "bert-base-uncased",
}
AESTHETIC_URL = ("https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
                 "sac+logos+ava1-l14-linearMSE.pth")

# Tiny random architectures (same classes as the real ones).
TINY_OPEN_CLIP = {"embed_dim": 32,
                  "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
                  "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
TINY_CLIP_MERGES = 488  # make_clip_tokenizer(488): a 1,002-token vocabulary
TINY_BLIP_VISION = {"hidden_size": 128, "intermediate_size": 128, "num_hidden_layers": 2, "image_size": 32,
                    "patch_size": 8}  # 2 heads by the width // 64 rule the loader uses
TINY_MED_CONFIG = {"architectures": ["BertModel"], "hidden_size": 32, "intermediate_size": 37,
                   "num_attention_heads": 2, "num_hidden_layers": 2, "max_position_embeddings": 40,
                   "hidden_act": "gelu", "layer_norm_eps": 1e-12, "pad_token_id": 0, "type_vocab_size": 2,
                   "add_cross_attention": True, "encoder_width": 128, "model_type": "bert",
                   "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}


# ----- differentiable preprocessing -------------------------------------------------------------------------

def resize_center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, size, size): bicubic resize (antialias when shrinking) of the shorter side to
    `size`, then the centre crop: the tensor analogue of torchvision Resize(size, BICUBIC) + CenterCrop(size),
    the preprocessing of CLIP, HPS, PickScore and BLIP. Differentiable; an input already size x size is
    returned unchanged (no resampling at all, so scores at the native size equal the reference exactly)."""
    h, w = x.shape[-2:]
    if (h, w) != (size, size):
        # torchvision rounds the longer side down: int(size * long / short)
        nh, nw = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
        top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
        x = x[..., top:top + size, left:left + size]
    return x


def resize_longest_pad(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, size, size): bicubic resize (antialias) of the LONGER side to `size`, keeping the
    aspect ratio (new side = round(side * size / max(H, W))), then zero padding centred (left/top get the floor
    half): HPSv2's evaluation transform (open_clip's image_transform(..., resize_longest_max=True), a letterbox).
    For square images it equals resize_center_crop. Differentiable; a size x size input is returned unchanged."""
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    scale = size / max(h, w)
    nh, nw = round(h * scale), round(w * scale)
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
    ph, pw = size - nh, size - nw
    return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))  # black borders, before normalisation


def normalise(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (x - mean_c) / std_c per channel."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device)[:, None, None]
    s = torch.tensor(std, dtype=x.dtype, device=x.device)[:, None, None]
    return (x - m) / s


def preprocess(images: torch.Tensor, size: int, mean=CLIP_MEAN, std=CLIP_STD, letterbox: bool = False) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1] -> model input (B, 3, size, size): resize_center_crop (or, with letterbox,
    resize_longest_pad) then normalise."""
    return normalise((resize_longest_pad if letterbox else resize_center_crop)(images, size), mean, std)


def cosine_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, D), (B, D) -> (B,): cos(a_i, b_i) = <a_i, b_i> / (|a_i| |b_i|), i.e. diag(norm(A) norm(B)^T)."""
    return (F.normalize(a.float(), dim=-1) * F.normalize(b.float(), dim=-1)).sum(-1)


# ----- weights location -------------------------------------------------------------------------------------

def _weights_dir() -> Path:
    return Path(os.environ.get("REWARD_WEIGHTS_DIR", Path.home() / ".cache" / "reward_weights"))


def resolve_file(value: str | None, env: str, filename: str, hub: tuple[str, str] | None, what: str,
                 url: str | None = None) -> str:
    """The path of a weights file: option, else $env, else $REWARD_WEIGHTS_DIR/filename, else the hub cache
    (hf_hub_download; offline it only finds cached files). Raises RewardWeightsMissing with one line."""
    path = value or os.environ.get(env)
    if path:
        if not Path(path).is_file():
            raise RewardWeightsMissing(f"{what}: no file at {path} ({env}); download {filename} from "
                                       f"{url or 'https://huggingface.co/' + hub[0]} and point {env} at it")
        return str(path)
    local = _weights_dir() / filename
    if local.is_file():
        return str(local)
    if hub is not None:
        try:
            from huggingface_hub import hf_hub_download
            return hf_hub_download(hub[0], hub[1])
        except Exception:  # offline, no cache, no network: all mean "not here"
            pass
    src = url or f"https://huggingface.co/{hub[0]}/blob/main/{hub[1]}"
    raise RewardWeightsMissing(f"{what}: weights not found; download {filename} from {src} and set {env}=/path/to/"
                               f"{filename} (or put it in {_weights_dir()})")


def _load_state(path: str, what: str) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated download or a non-weights file
        raise RewardError(f"{what}: could not read {path} with torch.load ({type(e).__name__}); "
                          f"re-download it") from None
    return obj


def _from_pretrained(cls, path: str, what: str, env: str, hub_id: str | None = None, **kw):
    """cls.from_pretrained(path) with a one-line error naming the hub id / variable when it is not available."""
    try:
        return cls.from_pretrained(path, **kw)
    except (OSError, ValueError) as e:
        p = Path(path)
        if p.is_dir() and any(p.iterdir()):
            raise RewardError(f"{what}: could not load {path}: {str(e).splitlines()[0]}") from None
        known = path in {v for v in HUB.values() if isinstance(v, str)}
        local = not known and (p.is_absolute() or path.startswith(".") or p.exists() or path.count("/") != 1)
        src = hub_id or (None if local else path)
        how = (f"download it with `huggingface-cli download {src} --local-dir DIR` and set {env}=DIR" if src
               else f"set {env} to a directory saved with save_pretrained")
        where = f"no model directory at {path}" if local else f"{path} is not in the local hub cache (offline?)"
        raise RewardWeightsMissing(f"{what}: {where}; {how}") from None


def _seeded(seed: int):
    """Deterministic random init of tiny models without disturbing the caller's RNG."""
    ctx = torch.random.fork_rng(devices=[])
    ctx.__enter__()
    torch.manual_seed(seed)
    return ctx


def _freeze(m: nn.Module, device, dtype) -> nn.Module:
    m = m.to(device=device, dtype=dtype).eval()
    m.requires_grad_(False)  # rewards are frozen; gradients still flow to the pixels
    return m


def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    return {None: torch.float32, "fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
            "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}[dtype]


def _unique_prompts(prompts: Sequence[str] | None, b: int, what: str) -> tuple[list[str], torch.Tensor]:
    """GRPO batches repeat each prompt G times: encode each distinct prompt once.
    Returns (distinct prompts, index (B,) of each sample's prompt)."""
    if prompts is None:
        raise RewardError(f"{what} scores images against prompts; none were given")
    prompts = list(prompts)
    if len(prompts) != b:
        raise RewardError(f"{what}: {len(prompts)} prompts for {b} images")
    uniq = list(dict.fromkeys(prompts))
    pos = {p: i for i, p in enumerate(uniq)}
    return uniq, torch.tensor([pos[p] for p in prompts], dtype=torch.long)


class ImageModelReward(Reward):
    """Common part of the model rewards: images (B, 3, H, W) or videos (B, F, 3, H, W) (scored as the mean
    over `frames` evenly sampled frames) -> (B, 1). Subclasses implement score_images."""

    media = "image"
    differentiable = True
    frames = 4

    @abc.abstractmethod
    def score_images(self, images: torch.Tensor, prompts: Sequence[str] | None) -> torch.Tensor:
        """(B,) scores of images (B, 3, H, W) in [0, 1] on the training scale."""

    def score(self, media, prompts=None):
        if media.ndim == 5:
            return per_frame(lambda x, p: self.score_images(x, p), media, prompts, self.frames)
        if media.ndim != 4 or media.shape[1] != 3:
            raise RewardError(f"{self.names[0]} scores images (B, 3, H, W) or videos (B, F, 3, H, W), "
                              f"got shape {tuple(media.shape)}")
        return self.score_images(media, prompts)

    def to(self, device):
        super().to(device)
        self.device = torch.device(device)
        return self

    def _pixels(self, images, size, mean=CLIP_MEAN, std=CLIP_STD, letterbox=False):
        return preprocess(images.to(self.device, torch.float32), size, mean, std, letterbox).to(self.dtype)


# ----- HPSv2.1 (open_clip) ----------------------------------------------------------------------------------

def tiny_open_clip(seed: int = 0) -> nn.Module:
    """A tiny random open_clip CLIP of the ViT-H-14 family (same class, same key names, real tokenizer ids)."""
    from open_clip.model import CLIP

    ctx = _seeded(seed)
    try:
        return CLIP(**TINY_OPEN_CLIP, output_dict=True)
    finally:
        ctx.__exit__(None, None, None)


def load_hps_model(path: str | None, tiny: bool = False, arch: str = "ViT-H-14", seed: int = 0,
                   device="cpu") -> nn.Module:
    """HPSv2.1 as HPSv2's own code builds it: open_clip `arch` (ViT-H-14) with the checkpoint's "state_dict"
    loaded strictly (the LAION pretrained weights are not needed: the checkpoint holds every key)."""
    import open_clip

    # built directly on the target device: ViT-H-14 is 986M parameters (3.9 GB in float32)
    model = tiny_open_clip(seed) if tiny else open_clip.create_model(arch, pretrained=None, output_dict=True,
                                                                      device=device)
    if path is not None:
        ck = _load_state(path, "HPSv2.1")
        sd = ck.get("state_dict", ck) if isinstance(ck, dict) else ck
        sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}  # DDP-saved files
        try:
            model.load_state_dict(sd)
        except RuntimeError as e:
            hint = " (a tiny checkpoint? pass tiny=True)" if not tiny else ""
            raise RewardError(f"HPSv2.1: {path} does not fit open_clip {arch if not tiny else 'tiny'}{hint}: "
                              f"{str(e).splitlines()[1] if len(str(e).splitlines()) > 1 else e}") from None
    return model


@functools.lru_cache(maxsize=1)
def _open_clip_tokenizer():
    """open_clip's ViT-H-14 tokenizer (bundled BPE: offline, real ids); built once (0.5 s)."""
    import open_clip

    return open_clip.get_tokenizer("ViT-H-14")


class HPSReward(ImageModelReward):
    """HPSv2.1: cos(image_features, text_features) of open_clip ViT-H-14 with the HPS weights (x100 for tables)."""

    names = ["hps"]

    def __init__(self, model: nn.Module, device="cpu", dtype=torch.float32, frames: int = 4):
        self.device, self.dtype, self.frames = torch.device(device), dtype, frames
        self.model = _freeze(model, self.device, dtype)
        self.tokenizer = _open_clip_tokenizer()
        self.size = int(self.model.visual.image_size[0])
        self.table_scale = [100.0]

    def score_images(self, images, prompts):
        uniq, idx = _unique_prompts(prompts, images.shape[0], "hps")
        # HPSv2 letterboxes (resize the longer side, pad): the same as a centre crop for square images
        img = self.model.encode_image(self._pixels(images, self.size, letterbox=True), normalize=True)
        txt = self.model.encode_text(self.tokenizer(uniq).to(self.device), normalize=True)
        return cosine_rows(img, txt[idx.to(self.device)])  # diag(image_features @ text_features.T)


def hps(hps_ckpt: str | None = None, tiny: bool = False, device="cpu", dtype=None, seed: int = 0,
        frames: int = 4, hps_arch: str = "ViT-H-14") -> HPSReward:
    """Registry factory "hps". Weights: hps_ckpt, $HPS_CKPT, or the hub file xswu/HPSv2/HPS_v2.1_compressed.pt."""
    path = hps_ckpt or os.environ.get("HPS_CKPT")
    if path is not None or not tiny:  # tiny without a file: random weights
        path = resolve_file(path, "HPS_CKPT", HUB["hps"][1], HUB["hps"], "HPSv2.1")
    return HPSReward(load_hps_model(path, tiny, hps_arch, seed, device), device, _dtype(dtype), frames)


# ----- transformers CLIP: PickScore, CLIP score, aesthetic, temporal consistency -------------------------------

def tiny_clip(seed: int = 0):
    """(CLIPModel, CLIPProcessor): a tiny random transformers CLIP with a 1,002-token slice of the real BPE."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from common.tokenizers import make_clip_tokenizer

    tok = make_clip_tokenizer(TINY_CLIP_MERGES)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    ctx = _seeded(seed)
    try:
        model = CLIPModel(cfg)
    finally:
        ctx.__exit__(None, None, None)
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                            crop_size={"height": 32, "width": 32}), tokenizer=tok)
    return model, proc


def load_clip(path: str | None, processor: str | None, what: str, env: str, tiny: bool, seed: int = 0,
              hub_id: str | None = None):
    """(CLIPModel, CLIPProcessor) from a local directory or hub id, or tiny random when tiny and no path."""
    from transformers import CLIPModel, CLIPProcessor

    if path is None and tiny:
        return tiny_clip(seed)
    model = _from_pretrained(CLIPModel, path, what, env, hub_id)
    proc_src = processor or path
    proc = _from_pretrained(CLIPProcessor, proc_src, f"{what} processor", env)
    return model, proc


def clip_image_embeds(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Projected image embeddings (B, P). transformers 5 returns an output object whose pooler_output holds
    them (older versions returned the tensor): accept both."""
    out = model.get_image_features(pixel_values=pixel_values)
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def clip_text_embeds(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Projected text embeddings (B, P); see clip_image_embeds."""
    out = model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class CLIPBackbone:
    """A frozen transformers CLIPModel with its tokenizer, image size and normalisation constants."""

    def __init__(self, model, processor, device, dtype):
        self.device, self.dtype = torch.device(device), dtype
        self.model = _freeze(model, self.device, dtype)
        self.tokenizer = processor.tokenizer
        ip = processor.image_processor
        self.mean, self.std = tuple(ip.image_mean), tuple(ip.image_std)
        self.size = int(model.config.vision_config.image_size)
        self.max_len = int(model.config.text_config.max_position_embeddings)

    def image(self, images: torch.Tensor) -> torch.Tensor:
        px = preprocess(images.to(self.device, torch.float32), self.size, self.mean, self.std).to(self.dtype)
        return clip_image_embeds(self.model, px)

    def text(self, prompts: Sequence[str]) -> torch.Tensor:
        t = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_len,
                           return_tensors="pt").to(self.device)
        return clip_text_embeds(self.model, t["input_ids"], t["attention_mask"])


class CLIPSimilarityReward(ImageModelReward):
    """cos(image_embeds, text_embeds) of a transformers CLIPModel: PickScore (table: x exp(logit_scale), the
    logit) and CLIP score (table: x100)."""

    def __init__(self, backbone: CLIPBackbone, name: str, table_scale: float, frames: int = 4):
        self.clip, self.names, self.frames = backbone, [name], frames
        self.device, self.dtype = backbone.device, backbone.dtype
        self.table_scale = [table_scale]

    def score_images(self, images, prompts):
        uniq, idx = _unique_prompts(prompts, images.shape[0], self.names[0])
        return cosine_rows(self.clip.image(images), self.clip.text(uniq)[idx.to(self.device)])

    def to(self, device):
        self.clip.model.to(device)
        self.clip.device = self.device = torch.device(device)
        return self


_CLIP_CACHE: dict[tuple, CLIPBackbone] = {}


def _clip_backbone(path, processor, what, env, tiny, device, dtype, seed, hub_id=None) -> CLIPBackbone:
    """One CLIPBackbone per (source, device, dtype): clip, aesthetic and the video rewards share CLIP-L/14."""
    key = (path, processor, tiny and path is None, seed, str(device), dtype)
    if key not in _CLIP_CACHE:
        _CLIP_CACHE[key] = CLIPBackbone(*load_clip(path, processor, what, env, tiny, seed, hub_id), device, dtype)
    return _CLIP_CACHE[key]


def _clip_path(clip_path, tiny):
    return clip_path or os.environ.get("CLIP_PATH") or (None if tiny else HUB["clip"])


def pickscore(pickscore_path: str | None = None, pickscore_processor: str | None = None, tiny: bool = False,
              device="cpu", dtype=None, seed: int = 0, frames: int = 4) -> CLIPSimilarityReward:
    """Registry factory "pickscore": CLIPModel from pickscore_path / $PICKSCORE_PATH / hub PickScore_v1,
    processor from pickscore_processor / $PICKSCORE_PROCESSOR / the model dir if it has a tokenizer / the
    laion CLIP-ViT-H-14 hub id. Training scale cos; table scale exp(logit_scale) (the PickScore logit)."""
    path = pickscore_path or os.environ.get("PICKSCORE_PATH") or (None if tiny else HUB["pickscore"])
    proc = pickscore_processor or os.environ.get("PICKSCORE_PROCESSOR")
    if proc is None and path is not None:
        has_tok = Path(path).is_dir() and (Path(path) / "tokenizer_config.json").is_file()
        proc = path if has_tok else HUB["pickscore_processor"]
    # tiny: a different random CLIP than clip/aesthetic (seed + 1), so that two tiny objectives differ
    bb = _clip_backbone(path, proc, "PickScore", "PICKSCORE_PATH", tiny, device, _dtype(dtype), seed + 1,
                        HUB["pickscore"])
    return CLIPSimilarityReward(bb, "pickscore", float(bb.model.logit_scale.exp()), frames)


def clip_score(clip_path: str | None = None, tiny: bool = False, device="cpu", dtype=None, seed: int = 0,
               frames: int = 4) -> CLIPSimilarityReward:
    """Registry factory "clip": CLIP ViT-L/14 (clip_path / $CLIP_PATH / hub openai/clip-vit-large-patch14).
    Training scale cos; table scale x100 (the convention of T2I papers' "CLIP score" columns)."""
    bb = _clip_backbone(_clip_path(clip_path, tiny), None, "CLIP ViT-L/14", "CLIP_PATH", tiny, device,
                        _dtype(dtype), seed, HUB["clip"])
    return CLIPSimilarityReward(bb, "clip", 100.0, frames)


class AestheticMLP(nn.Module):
    """The improved-aesthetic-predictor head: Linear(d,1024)-Drop(.2)-Linear(1024,128)-Drop(.2)-Linear(128,64)-
    Drop(.1)-Linear(64,16)-Linear(16,1), no activations; keys layers.0/2/4/6/7 as in the released .pth."""

    def __init__(self, d: int = 768):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(d, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                    nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, x):
        return self.layers(x)


class AestheticReward(ImageModelReward):
    """LAION aesthetic score: MLP(normalise(CLIP-L/14 image embedding)), on its 1-10 scale."""

    names = ["aesthetic"]

    def __init__(self, backbone: CLIPBackbone, mlp: AestheticMLP, frames: int = 4):
        self.clip, self.frames = backbone, frames
        self.device, self.dtype = backbone.device, backbone.dtype
        self.mlp = _freeze(mlp, self.device, torch.float32)

    def score_images(self, images, prompts=None):
        emb = F.normalize(self.clip.image(images).float(), dim=-1)  # the predictor was trained on unit embeddings
        return self.mlp(emb).squeeze(-1)

    def to(self, device):
        self.clip.model.to(device)
        self.mlp.to(device)
        self.clip.device = self.device = torch.device(device)
        return self


def aesthetic(aesthetic_ckpt: str | None = None, clip_path: str | None = None, tiny: bool = False, device="cpu",
              dtype=None, seed: int = 0, frames: int = 4) -> AestheticReward:
    """Registry factory "aesthetic": CLIP-L/14 (clip_path / $CLIP_PATH) + the MLP .pth (aesthetic_ckpt /
    $AESTHETIC_CKPT / $REWARD_WEIGHTS_DIR/sac+logos+ava1-l14-linearMSE.pth)."""
    bb = _clip_backbone(_clip_path(clip_path, tiny), None, "aesthetic (CLIP ViT-L/14)", "CLIP_PATH", tiny, device,
                        _dtype(dtype), seed, HUB["clip"])
    d = int(bb.model.config.projection_dim)
    path = aesthetic_ckpt or os.environ.get("AESTHETIC_CKPT")
    if path is None and tiny:
        ctx = _seeded(seed + 1)
        try:
            mlp = AestheticMLP(d)
        finally:
            ctx.__exit__(None, None, None)
        return AestheticReward(bb, mlp, frames)
    path = resolve_file(path, "AESTHETIC_CKPT", "sac+logos+ava1-l14-linearMSE.pth", None, "LAION aesthetic",
                        AESTHETIC_URL)
    sd = _load_state(path, "LAION aesthetic")
    d_ck = sd["layers.0.weight"].shape[1] if "layers.0.weight" in sd else None
    if d_ck != d:
        raise RewardError(f"LAION aesthetic: {path} expects {d_ck}-dim CLIP embeddings but the CLIP model gives "
                          f"{d}; use CLIP ViT-L/14 (CLIP_PATH)")
    mlp = AestheticMLP(d)
    mlp.load_state_dict(sd)
    return AestheticReward(bb, mlp, frames)


# ----- ImageReward (BLIP on transformers) -----------------------------------------------------------------

class ImageRewardMLP(nn.Module):
    """ImageReward's head on the [CLS] state: Linear(w,1024)-Drop(.2)-Linear(1024,128)-Drop(.2)-Linear(128,64)-
    Drop(.1)-Linear(64,16)-Linear(16,1) (keys mlp.layers.0/2/4/6/7 in ImageReward.pt)."""

    def __init__(self, d: int):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(d, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                    nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, x):
        return self.layers(x)


class BlipImageReward(nn.Module):
    """ImageReward's network on transformers' BLIP parts: BlipVisionModel (timm-style ViT, LayerNorm eps 1e-6),
    BlipTextModel without pooler (BERT with cross-attention in every layer), the unused vision/text projections
    (kept so that every key of ImageReward.pt has a home), and the MLP head."""

    def __init__(self, vision_config, text_config, embed_dim: int = 256):
        super().__init__()
        from transformers import BlipTextModel, BlipVisionModel

        self.vision_model = BlipVisionModel(vision_config)
        self.text_encoder = BlipTextModel(text_config, add_pooling_layer=False)
        self.vision_proj = nn.Linear(vision_config.hidden_size, embed_dim)
        self.text_proj = nn.Linear(text_config.hidden_size, embed_dim)
        self.mlp = ImageRewardMLP(text_config.hidden_size)

    def forward(self, pixel_values, input_ids, attention_mask) -> torch.Tensor:
        """(B, 3, S, S) normalised pixels, (B, L) ids and mask -> (B,) raw head output (before normalisation)."""
        img = self.vision_model(pixel_values=pixel_values).last_hidden_state  # (B, 1 + patches, Dv), after norm
        img_mask = torch.ones(img.shape[:-1], dtype=torch.long, device=img.device)
        txt = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=img,
                                encoder_attention_mask=img_mask).last_hidden_state
        return self.mlp(txt[:, 0].float()).squeeze(-1)  # the [CLS] state


# Released ImageReward.pt key -> BlipImageReward key. "{i}" is a layer index. Order matters only in that
# every released prefix is matched by exactly one rule (prefixes are mutually exclusive).
IMAGEREWARD_KEY_RULES: list[tuple[str, str]] = [
    ("blip.visual_encoder.cls_token", "vision_model.embeddings.class_embedding"),
    ("blip.visual_encoder.pos_embed", "vision_model.embeddings.position_embedding"),
    ("blip.visual_encoder.patch_embed.proj.", "vision_model.embeddings.patch_embedding."),
    ("blip.visual_encoder.blocks.{i}.norm1.", "vision_model.encoder.layers.{i}.layer_norm1."),
    ("blip.visual_encoder.blocks.{i}.norm2.", "vision_model.encoder.layers.{i}.layer_norm2."),
    ("blip.visual_encoder.blocks.{i}.attn.qkv.", "vision_model.encoder.layers.{i}.self_attn.qkv."),
    ("blip.visual_encoder.blocks.{i}.attn.proj.", "vision_model.encoder.layers.{i}.self_attn.projection."),
    ("blip.visual_encoder.blocks.{i}.mlp.", "vision_model.encoder.layers.{i}.mlp."),
    ("blip.visual_encoder.norm.", "vision_model.post_layernorm."),
    ("blip.text_encoder.", "text_encoder."),  # BLIP's med.py BERT names = transformers' BlipText names
    ("blip.vision_proj.", "vision_proj."),
    ("blip.text_proj.", "text_proj."),
    ("mlp.", "mlp."),
]
# Persistent buffers of the released model that transformers recomputes (non-persistent there): dropped.
IMAGEREWARD_DROPPED = ("blip.text_encoder.embeddings.position_ids",)


def _rule_regex(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)"))


_FWD = [(_rule_regex(a), b) for a, b in IMAGEREWARD_KEY_RULES]
_BWD = [(_rule_regex(b), a) for a, b in IMAGEREWARD_KEY_RULES]


def _apply_rules(key: str, rules) -> str | None:
    for pat, tmpl in rules:
        m = pat.match(key)
        if m:
            return tmpl.replace("{i}", m.groupdict().get("i") or "") + key[m.end():]
    return None


def imagereward_key_to_hf(key: str) -> str | None:
    """A key of the released ImageReward.pt -> its BlipImageReward key; None for a dropped buffer or an
    unknown key."""
    return None if key in IMAGEREWARD_DROPPED else _apply_rules(key, _FWD)


def hf_key_to_imagereward(key: str) -> str | None:
    """Inverse of imagereward_key_to_hf (BlipImageReward key -> released key), for writing released-layout files."""
    return _apply_rules(key, _BWD)


def imagereward_configs(sd: dict[str, torch.Tensor], med_config: dict[str, Any], vision_heads: int | None = None):
    """(BlipVisionConfig, BlipTextConfig, embed_dim) for a released-layout state dict.

    The released loader hard-codes ViT-L/16 at 224 px; here the vision shape is read from the tensors
    (width = cls_token[-1], patch = patch_embed kernel, image size = patch * sqrt(#patches), depth = #blocks,
    MLP width = fc1 rows), heads = width // 64 (ViT-B: 12, ViT-L: 16) unless given. The text side is the
    med_config BERT, with encoder_width overwritten by the vision width as BLIP does."""
    from transformers import BlipTextConfig, BlipVisionConfig

    p = "blip.visual_encoder."
    width = sd[p + "cls_token"].shape[-1]
    patch = sd[p + "patch_embed.proj.weight"].shape[-1]
    n_patches = sd[p + "pos_embed"].shape[1] - 1
    side = math.isqrt(n_patches)
    depth = len({k.split(".")[3] for k in sd if k.startswith(p + "blocks.")})
    vcfg = BlipVisionConfig(hidden_size=width, intermediate_size=sd[p + "blocks.0.mlp.fc1.weight"].shape[0],
                            num_hidden_layers=depth, num_attention_heads=vision_heads or max(1, width // 64),
                            image_size=side * patch, patch_size=patch, layer_norm_eps=1e-6, hidden_act="gelu")
    m = med_config
    tcfg = BlipTextConfig(vocab_size=sd["blip.text_encoder.embeddings.word_embeddings.weight"].shape[0],
                          hidden_size=m["hidden_size"], encoder_hidden_size=width,
                          intermediate_size=m["intermediate_size"], num_attention_heads=m["num_attention_heads"],
                          num_hidden_layers=m["num_hidden_layers"],
                          max_position_embeddings=m["max_position_embeddings"],
                          layer_norm_eps=m.get("layer_norm_eps", 1e-12), hidden_act=m.get("hidden_act", "gelu"),
                          pad_token_id=m.get("pad_token_id", 0), bos_token_id=m.get("bos_token_id"),
                          sep_token_id=m.get("sep_token_id"), eos_token_id=m.get("eos_token_id"),
                          is_decoder=True)  # is_decoder: builds crossattention (scoring still runs bidirectional)
    return vcfg, tcfg, sd["blip.vision_proj.weight"].shape[0]


def load_imagereward_model(sd: dict[str, torch.Tensor], med_config: dict[str, Any],
                           vision_heads: int | None = None, what: str = "ImageReward") -> BlipImageReward:
    """BlipImageReward from a released-layout state dict: every model key must be supplied (strict); released
    keys with no home are reported in the log and ignored (the released loader uses strict=False too)."""
    vcfg, tcfg, embed = imagereward_configs(sd, med_config, vision_heads)
    model = BlipImageReward(vcfg, tcfg, embed)
    mapped, unknown = {}, []
    for k, v in sd.items():
        hk = imagereward_key_to_hf(k)
        if hk is None:
            if k not in IMAGEREWARD_DROPPED:
                unknown.append(k)
            continue
        mapped[hk] = v
    if unknown:
        log.warning("%s: ignored %d checkpoint keys with no counterpart, e.g. %s", what, len(unknown), unknown[0])
    missing, _ = model.load_state_dict(mapped, strict=False)
    if missing:
        raise RewardError(f"{what}: checkpoint lacks {len(missing)} weights, e.g. {missing[0]}; is it ImageReward.pt?")
    return model


def tiny_imagereward(seed: int = 0):
    """(BlipImageReward, BERT tokenizer with [DEC]/[ENC], med_config): a tiny random ImageReward."""
    from transformers import BlipTextConfig, BlipVisionConfig

    from common.tokenizers import make_bert_tokenizer

    tok = add_blip_specials(make_bert_tokenizer())
    med = dict(TINY_MED_CONFIG, vocab_size=len(tok), bos_token_id=tok.bos_token_id, sep_token_id=tok.sep_token_id)
    v = TINY_BLIP_VISION
    vcfg = BlipVisionConfig(**v, num_attention_heads=max(1, v["hidden_size"] // 64), layer_norm_eps=1e-6)
    tcfg = BlipTextConfig(vocab_size=len(tok), hidden_size=med["hidden_size"], encoder_hidden_size=v["hidden_size"],
                          intermediate_size=med["intermediate_size"], num_attention_heads=med["num_attention_heads"],
                          num_hidden_layers=med["num_hidden_layers"],
                          max_position_embeddings=med["max_position_embeddings"], pad_token_id=tok.pad_token_id,
                          bos_token_id=tok.bos_token_id, sep_token_id=tok.sep_token_id, eos_token_id=None,
                          is_decoder=True)
    ctx = _seeded(seed)
    try:
        model = BlipImageReward(vcfg, tcfg, embed_dim=16)
    finally:
        ctx.__exit__(None, None, None)
    return model, tok, med


def add_blip_specials(tok):
    """BLIP's init_tokenizer: bert-base-uncased + bos [DEC] + additional special [ENC] (vocab 30,522 -> 30,524)."""
    if "[DEC]" not in tok.get_vocab():
        tok.add_special_tokens({"bos_token": "[DEC]"})
    if "[ENC]" not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


class ImageRewardReward(ImageModelReward):
    """ImageReward: (MLP(BLIP text [CLS] | image) - 0.16717) / 1.03334; the same value is reported in tables."""

    names = ["imagereward"]

    def __init__(self, model: BlipImageReward, tokenizer, device="cpu", dtype=torch.float32, frames: int = 4):
        self.device, self.dtype, self.frames = torch.device(device), dtype, frames
        self.model = _freeze(model, self.device, dtype)
        self.model.mlp.float()
        self.tokenizer = tokenizer
        self.size = int(model.vision_model.config.image_size)
        if len(tokenizer) > model.text_encoder.config.vocab_size:
            raise RewardError(f"ImageReward: tokenizer has {len(tokenizer)} tokens, the model "
                              f"{model.text_encoder.config.vocab_size}; use bert-base-uncased")

    def score_images(self, images, prompts):
        uniq, idx = _unique_prompts(prompts, images.shape[0], "imagereward")
        t = self.tokenizer(uniq, padding="max_length", truncation=True, max_length=IMAGEREWARD_MAX_LEN,
                           return_tensors="pt").to(self.device)
        i = idx.to(self.device)
        raw = self.model(self._pixels(images, self.size), t["input_ids"][i], t["attention_mask"][i])
        return (raw - IMAGEREWARD_MEAN) / IMAGEREWARD_STD


def image_reward(imagereward_ckpt: str | None = None, imagereward_med_config: str | None = None,
                 imagereward_tokenizer: str | None = None, imagereward_vision_heads: int | None = None,
                 tiny: bool = False, device="cpu", dtype=None, seed: int = 0, frames: int = 4) -> ImageRewardReward:
    """Registry factory "imagereward": ImageReward.pt (imagereward_ckpt / $IMAGEREWARD_CKPT / hub THUDM/ImageReward)
    in its released key layout, med_config.json (option / $IMAGEREWARD_MED_CONFIG / next to the checkpoint / hub),
    BERT tokenizer (option / $IMAGEREWARD_TOKENIZER / hub bert-base-uncased) + BLIP's [DEC] and [ENC]."""
    from transformers import BertTokenizer

    path = imagereward_ckpt or os.environ.get("IMAGEREWARD_CKPT")
    dt = _dtype(dtype)
    if path is None and tiny:
        model, tok, _ = tiny_imagereward(seed)
        return ImageRewardReward(model, tok, device, dt, frames)
    path = resolve_file(path, "IMAGEREWARD_CKPT", "ImageReward.pt", HUB["imagereward"], "ImageReward")
    med = imagereward_med_config or os.environ.get("IMAGEREWARD_MED_CONFIG")
    if med is None and (Path(path).parent / "med_config.json").is_file():
        med = str(Path(path).parent / "med_config.json")
    med = resolve_file(med, "IMAGEREWARD_MED_CONFIG", "med_config.json", HUB["imagereward_med_config"],
                       "ImageReward med_config")
    with open(med) as f:
        med_cfg = json.load(f)
    sd = _load_state(path, "ImageReward")
    sd = sd.get("state_dict", sd)  # the released file is a bare state dict; accept a wrapped one too
    model = load_imagereward_model(sd, med_cfg, imagereward_vision_heads)
    tok_src = imagereward_tokenizer or os.environ.get("IMAGEREWARD_TOKENIZER") or HUB["bert"]
    tok = add_blip_specials(_from_pretrained(BertTokenizer, tok_src, "ImageReward tokenizer", "IMAGEREWARD_TOKENIZER"))
    return ImageRewardReward(model, tok, device, dt, frames)


# ----- video rewards -------------------------------------------------------------------------------------

class TemporalConsistencyReward(Reward):
    """Temporal consistency of videos (B, F, 3, H, W), F >= 2 -> (B,):
    (1/(F-1)) sum_t cos(e_t, e_{t+1}) with e_t the CLIP image embedding of frame t. A static video scores 1."""

    names = ["temporal_consistency"]
    media = "video"
    differentiable = True

    def __init__(self, backbone: CLIPBackbone, frames: int = 0):
        self.clip, self.frames = backbone, int(frames)  # frames > 1: compare evenly sampled frames (long videos)
        self.table_scale = [100.0]

    def score(self, media, prompts=None):
        if media.ndim != 5 or media.shape[1] < 2:
            raise RewardError(f"temporal_consistency needs videos (B, F>=2, 3, H, W), got {tuple(media.shape)}")
        if self.frames > 1:
            media = media[:, frame_indices(media.shape[1], self.frames).to(media.device)]
        b, f = media.shape[:2]
        e = self.clip.image(media.reshape(b * f, *media.shape[2:])).reshape(b, f, -1)  # (B, F, P)
        return cosine_rows(e[:, 1:].reshape(b * (f - 1), -1), e[:, :-1].reshape(b * (f - 1), -1)).reshape(
            b, f - 1).mean(1)

    def to(self, device):
        self.clip.model.to(device)
        self.clip.device = torch.device(device)
        return self


def temporal_consistency(clip_path: str | None = None, tiny: bool = False, device="cpu", dtype=None,
                         seed: int = 0, temporal_frames: int = 0) -> TemporalConsistencyReward:
    """Registry factory "temporal_consistency" (CLIP ViT-L/14 from clip_path / $CLIP_PATH); temporal_frames > 1
    compares that many evenly sampled frames instead of all adjacent frames (cheaper on long videos)."""
    bb = _clip_backbone(_clip_path(clip_path, tiny), None, "CLIP ViT-L/14", "CLIP_PATH", tiny, device, _dtype(dtype),
                        seed, HUB["clip"])
    return TemporalConsistencyReward(bb, temporal_frames)


def text_alignment(clip_path: str | None = None, tiny: bool = False, device="cpu", dtype=None, seed: int = 0,
                   frames: int = 4) -> Reward:
    """Registry factory "text_alignment": the CLIP score of a video, averaged over `frames` sampled frames."""
    from common.rewards import FramesReward

    return FramesReward(clip_score(clip_path, tiny, device, dtype, seed, frames), frames, names=["text_alignment"])
