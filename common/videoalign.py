"""VideoAlign's VideoReward: the VQ / MQ / TA video reward heads OTCA trains Wan on, on transformers' Qwen2-VL.

VideoReward (Liu et al. 2025, "Improving Video Generation with Human Feedback", github.com/KwaiVGI/VideoAlign,
weights huggingface.co/KwaiVGI/VideoReward) is Qwen2-VL-2B-Instruct fine-tuned with LoRA, plus three new tokens
<|VQ_reward|>, <|MQ_reward|>, <|TA_reward|> and a bias-free linear head `rm_head` (hidden -> output_dim) read at
those tokens. Scoring one video v with prompt p:

  1. frames: n = frame_count(F, source_fps, fps = 2) of the F frames, taken at round(linspace(0, F - 1, n)); each
     resized (bicubic, antialias) to frame_size(H, W) (multiples of 28, at most max_frame_pixels pixels), kept on
     8-bit levels as a decoded video file would be, normalised with the CLIP mean / std, cut into Qwen2-VL's
     (2 x 14 x 14) patches (patchify);
  2. text: the released prompt template with p filled in (it holds the three reward tokens in the order VQ, MQ, TA),
     wrapped as one user turn [video, text] by the Qwen2-VL chat template; the video placeholder is expanded to one
     token per 2 x 2 merged patch group;
  3. hidden states h (B, L, D) of the language model on [token embeddings with the vision tower's outputs written
     at the video tokens], with plain sequential positions 0..L-1 on all three M-RoPE axes (the released model
     calls the text model directly, so its own 3D video positions are never used);
  4. raw_k = rm_head(h[pos of token k])[0] for output_dim 1 (the released model: one head read at three tokens;
     output_dim 3 reads head k at token k); reward_k = (raw_k - mean_k) / std_k with model_config.json's
     inference_config. VideoAlign's "Overall" is VQ + MQ + TA: here the static sum of `--reward videoalign`.

Registry names: `videoalign` (three objectives VQ, MQ, TA, which OTCA's MOCA weighs per sample), `videoalign_vq`,
`videoalign_mq`, `videoalign_ta` (one head each; one loaded model is shared by rewards built together).

Weights (option / environment variable / fallback):
  videoalign_path      VIDEOALIGN_PATH      the VideoReward folder: model_config.json + checkpoint-<step>/ with either
                                            model.pth (every tensor of the LoRA-wrapped model) or
                                            adapter_model.safetensors + non_lora_state_dict.pth; optionally
                                            checkpoint-<step>/tokenizer/. Fallback $REWARD_WEIGHTS_DIR/VideoReward,
                                            then the hub cache of KwaiVGI/VideoReward.
  videoalign_base      VIDEOALIGN_BASE      Qwen2-VL-2B-Instruct (model, processor, chat template). Fallback
                                            $REWARD_WEIGHTS_DIR/Qwen2-VL-2B-Instruct, then model_config.json's
                                            model_name_or_path (a hub id, found in the hub cache when offline).
  videoalign_template  VIDEOALIGN_TEMPLATE  the prompt template the model was trained on: VideoAlign's
                                            prompt_template.py (the constant for model_config's
                                            prompt_template_type is read with `ast`, never executed) or a text file
                                            with a {text_prompt} slot. Fallback: prompt_template.py / .txt in the
                                            VideoReward folder, its parent or grandparent (a VideoAlign checkout
                                            holding checkpoints/). The text is not copied into this repository.
The released checkpoint's keys use the transformers 4.45 layout (model.layers.*, visual.*); they are renamed to
the current one (model.language_model.*, model.visual.*) and the LoRA pairs merged into the base weights:
W <- W + (alpha / r) B A.

Sampling options: videoalign_fps (default model_config's fps, 2), videoalign_frames (a fixed frame count, the
reference's num_frames, instead of fps), videoalign_source_fps (the generated videos' frame rate, default 16 as
Wan2.1 exports), videoalign_max_pixels (per frame; default model_config's max_frame_pixels), videoalign_norm
(false: raw head values), videoalign_batch (videos per forward pass). tiny=True without a path builds a tiny random
model of the same classes offline (tiny_videoreward); save_videoreward writes one in the released layout.
"""
from __future__ import annotations

import ast
import json
import logging
import math
import os
import re
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# CLIP_MEAN / CLIP_STD: Qwen2-VL's processor normalises with OpenAI CLIP's statistics
from common.reward_models import CLIP_MEAN, CLIP_STD, _from_pretrained, _weights_dir
from common.rewards import Reward, RewardError, RewardWeightsMissing

log = logging.getLogger(__name__)

HEADS = ("VQ", "MQ", "TA")
SPECIAL_TOKENS = ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>")
HUB_REWARD, HUB_BASE = "KwaiVGI/VideoReward", "Qwen/Qwen2-VL-2B-Instruct"
TEMPLATE_URL = "https://github.com/KwaiVGI/VideoAlign/blob/main/prompt_template.py"
TEMPLATE_SLOT = "{text_prompt}"
# model_config.json's prompt_template_type -> the constant of VideoAlign's prompt_template.py that holds it
TEMPLATE_CONSTANTS = {"detailed_special": "DETAILED_PROMPT_WITH_SPECIAL_TOKEN", "detailed": "DETAILED_PROMPT"}
FRAME_FACTOR, FPS_MIN_FRAMES, FPS_MAX_FRAMES = 2, 4, 768   # qwen-vl-utils' video sampling constants
VIDEO_MIN_PIXELS = 128 * 28 * 28                             # ... and its per-frame pixel floor for videos
DEFAULT_SOURCE_FPS = 16.0                                    # Wan2.1 videos are exported at 16 fps
# reference DataConfig defaults, used where model_config.json leaves a field out
DATA_DEFAULTS = {"fps": 2.0, "num_frames": None, "max_frame_pixels": 240 * 320, "sample_type": "uniform",
                 "prompt_template_type": "none"}


# ----- frames (pure functions) ------------------------------------------------------------------------------

def frame_count(total: int, source_fps: float, fps: float = 2.0, frames: int | None = None) -> int:
    """How many of a video's `total` frames the model sees (qwen-vl-utils' rule, which VideoAlign uses).

    With a fixed count: n = round(frames / 2) * 2. Otherwise n = total / source_fps * fps (the clip's duration
    times the sampling rate), clamped to [4, floor(min(768, total) / 2) * 2] and rounded to an even number. Either
    way n is capped at total. A video of fewer than 2 frames is used whole (the reference rejects it; patchify
    then repeats its frame to fill the temporal patch)."""
    if total < FRAME_FACTOR:
        return total
    if frames:
        n = round(frames / FRAME_FACTOR) * FRAME_FACTOR
    else:
        lo = math.ceil(FPS_MIN_FRAMES / FRAME_FACTOR) * FRAME_FACTOR
        hi = math.floor(min(FPS_MAX_FRAMES, total) / FRAME_FACTOR) * FRAME_FACTOR
        n = round(min(max(total / source_fps * fps, lo), hi) / FRAME_FACTOR) * FRAME_FACTOR
    return max(min(n, total), 1)


def frame_positions(total: int, n: int) -> torch.Tensor:
    """(n,) long: round(linspace(0, total - 1, n)), the frames taken (first and last included when n >= 2)."""
    return torch.linspace(0, total - 1, n).round().long()


def frame_size(height: int, width: int, max_pixels: int, min_pixels: int = VIDEO_MIN_PIXELS,
               factor: int = 28) -> tuple[int, int]:
    """Qwen2-VL's smart resize: both sides multiples of `factor` (patch 14 x merge 2), close to the input aspect
    ratio, h * w within [min_pixels, max_pixels] (rounded sides first; scaled down by sqrt(HW / max_pixels) and
    floored if too many pixels, else scaled up by sqrt(min_pixels / HW) and ceiled if too few)."""
    if max(height, width) / min(height, width) > 200:
        raise RewardError(f"VideoAlign: frames of {height}x{width} have an aspect ratio above 200")
    h, w = max(factor, round(height / factor) * factor), max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def quantise_8bit(x: torch.Tensor) -> torch.Tensor:
    """x in [0, 1] -> round(255 x) / 255 (the 8-bit levels of a decoded video file), with a straight-through
    gradient (d out / d x = 1), so that the reward stays differentiable in the pixels."""
    return x + ((x * 255).round() / 255 - x).detach()


def prepare_frames(video: torch.Tensor, n: int, size: tuple[int, int], mean: Sequence[float] = CLIP_MEAN,
                   std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """One video (F, 3, H, W) in [0, 1] -> the model's frames (n, 3, h, w), normalised.

    The reference decodes an 8-bit file, takes the frames, resizes them as uint8 (bicubic, antialias: rounded and
    clamped back to 8 bits), then the processor rescales by 1/255 and normalises: here clamp, quantise, take
    frame_positions, resize in float, clamp, quantise, (x - mean_c) / std_c (equal to torchvision's uint8 resize
    up to rounding ties; the lossy codec of a real file is not modelled). Differentiable (straight-through
    rounding)."""
    x = quantise_8bit(video.float().clamp(0, 1))[frame_positions(video.shape[0], n).to(video.device)]
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
    x = quantise_8bit(x.clamp(0, 1))
    m = torch.tensor(mean, dtype=x.dtype, device=x.device)[:, None, None]
    s = torch.tensor(std, dtype=x.dtype, device=x.device)[:, None, None]
    return (x - m) / s


def patchify(frames: torch.Tensor, patch: int = 14, temporal: int = 2, merge: int = 2
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames (T, C, H, W) -> (patches (t * h * w, C * temporal * patch * patch), grid (3,) = [t, h, w]): Qwen2-VL's
    pixel_values_videos for one video, with t = ceil(T / temporal) (the last frame repeated to fill), h = H / patch,
    w = W / patch.

    Patches are ordered time-major, then by merge group (row-major over the (h / merge) x (w / merge) groups),
    then row-major inside a group: the merger concatenates each run of merge^2 consecutive patches into one LM
    token. A patch's features are ordered (channel, time, row, column), the Conv3d kernel layout."""
    t_frames, c, hh, ww = frames.shape
    if hh % (patch * merge) or ww % (patch * merge):
        raise RewardError(f"VideoAlign: frame size {hh}x{ww} is not a multiple of {patch * merge}")
    if pad := -t_frames % temporal:
        frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)])
    t, gh, gw = frames.shape[0] // temporal, hh // patch, ww // patch
    x = frames.reshape(t, temporal, c, gh // merge, merge, patch, gw // merge, merge, patch)
    # (t, dt, c, H/m, dh, y, W/m, dw, x) -> (t, H/m, W/m, dh, dw, c, dt, y, x)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    grid = torch.tensor([t, gh, gw], dtype=torch.long)
    return x.reshape(t * gh * gw, c * temporal * patch * patch), grid


# ----- text -------------------------------------------------------------------------------------------------

def fill_template(template: str, prompt: str) -> str:
    """The reward prompt for one generation prompt: the template with its {text_prompt} slot filled."""
    return template.replace(TEMPLATE_SLOT, prompt)


def template_from_file(path: str, template_type: str) -> str:
    """The prompt template in `path`: VideoAlign's prompt_template.py (the string constant named by
    TEMPLATE_CONSTANTS[template_type], found with ast, the file is never executed) or any other file as text."""
    text = Path(path).read_text(encoding="utf-8")
    if not path.endswith(".py"):
        return text
    name = TEMPLATE_CONSTANTS.get(template_type)
    if name is None:
        raise RewardError(f"VideoAlign: prompt_template_type {template_type!r} is not supported; "
                          f"use one of {', '.join(TEMPLATE_CONSTANTS)} (or a text template file)")
    for node in ast.parse(text).body:
        if (isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets)
                and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)):
            return node.value.value
    raise RewardError(f"VideoAlign: {path} defines no string {name}; is it VideoAlign's prompt_template.py?")


def check_template(template: str, special: bool) -> None:
    """A usable template has one {text_prompt} slot and, for the special-token readout, each reward token once."""
    bad = [t for t in SPECIAL_TOKENS if template.count(t) != 1] if special else []
    if template.count(TEMPLATE_SLOT) != 1 or bad:
        raise RewardError(f"VideoAlign: the prompt template needs one {TEMPLATE_SLOT} slot"
                          + (f" and each of {', '.join(SPECIAL_TOKENS)} once" if special else ""))


def chat_text(processor, text: str, n_video_tokens: int) -> str:
    """One user turn [video, text] through the processor's chat template (with the assistant prompt opened), its
    single video placeholder repeated n_video_tokens times (what Qwen2VLProcessor does for a video)."""
    conv = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": text}]}]
    s = processor.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    tok = processor.video_token
    if s.count(tok) != 1:
        raise RewardError(f"VideoAlign: the chat template must place one {tok} per video, found {s.count(tok)}")
    return s.replace(tok, tok * n_video_tokens)


# ----- the head readout (pure functions) --------------------------------------------------------------------

def special_positions(input_ids: torch.Tensor, token_ids: Sequence[int]) -> torch.Tensor:
    """input_ids (B, L), K token ids -> (B, K) long: where token k sits in each row (it must occur once)."""
    hits = input_ids[:, :, None] == torch.tensor(list(token_ids), device=input_ids.device)  # (B, L, K)
    counts = hits.sum(1)
    if not bool((counts == 1).all()):
        raise RewardError(f"VideoAlign: each reward token must occur once per sequence, counts {counts.tolist()}")
    return hits.float().argmax(1)


def last_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) right-padded mask -> (B,) index of each row's last real token."""
    return attention_mask.long().sum(1) - 1


def read_heads(scores: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Head outputs at chosen tokens. scores (B, L, N) = rm_head(h); positions (B, K) -> (B, K):
    out[b, k] = scores[b, positions[b, k], 0] if N = 1 (one head read at K tokens), scores[b, positions[b, k], k]
    if N = K (head k at token k); positions (B,) (one token, the last) -> scores[b, positions[b], :], (B, N)."""
    b = torch.arange(scores.shape[0], device=scores.device)
    if positions.ndim == 1:
        return scores[b, positions]
    picked = scores[b[:, None], positions]  # (B, K, N)
    if picked.shape[-1] == 1:
        return picked[..., 0]
    if picked.shape[-1] == picked.shape[1]:
        return picked.diagonal(dim1=1, dim2=2)
    raise RewardError(f"VideoAlign: rm_head has {scores.shape[-1]} outputs for {positions.shape[1]} reward tokens")


def normalise_heads(raw: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(B, K) raw head values -> (raw - mean_k) / std_k per column (inference_config's calibration)."""
    m = torch.tensor(list(mean), dtype=raw.dtype, device=raw.device)
    s = torch.tensor(list(std), dtype=raw.dtype, device=raw.device)
    return (raw - m) / s


# ----- the model --------------------------------------------------------------------------------------------

class VideoRewardModel(nn.Module):
    """Qwen2VLForConditionalGeneration (`vlm`) + rm_head Linear(hidden, output_dim, bias=False), read at the three
    reward tokens (`special_token_ids`, in HEADS order) or, without them, at the last real token."""

    def __init__(self, vlm: nn.Module, output_dim: int = 1, special_token_ids: Sequence[int] | None = None):
        super().__init__()
        self.vlm = vlm
        self.rm_head = nn.Linear(vlm.config.text_config.hidden_size, output_dim, bias=False)
        self.special_token_ids = None if special_token_ids is None else [int(i) for i in special_token_ids]

    def last_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values_videos: torch.Tensor,
                    video_grid_thw: torch.Tensor) -> torch.Tensor:
        """(B, L) ids and mask, (P, C*2*14*14) patches of all B videos, (B, 3) grids -> (B, L, D) final hidden
        states of the language model, with the vision tower's merged tokens at the video placeholders and
        positions 0..L-1 on every M-RoPE axis (as the released model, which calls the text model directly)."""
        inner = self.vlm.model
        embeds = inner.get_input_embeddings()(input_ids)
        vision = torch.cat(list(inner.get_video_features(pixel_values_videos, video_grid_thw).pooler_output))
        mask = (input_ids == self.vlm.config.video_token_id)[..., None]
        if int(mask.sum()) != vision.shape[0]:
            raise RewardError(f"VideoAlign: {int(mask.sum())} video tokens for {vision.shape[0]} vision features")
        embeds = embeds.masked_scatter(mask.expand_as(embeds), vision.to(embeds.dtype))
        b, n = input_ids.shape
        pos = torch.arange(n, device=input_ids.device).view(1, 1, n).expand(3, b, n)
        return inner.language_model(inputs_embeds=embeds, attention_mask=attention_mask,
                                    position_ids=pos).last_hidden_state

    def forward(self, input_ids, attention_mask, pixel_values_videos, video_grid_thw) -> torch.Tensor:
        """-> (B, K) raw head values (K = 3 in HEADS order at the reward tokens; output_dim at the last token)."""
        h = self.last_hidden(input_ids, attention_mask, pixel_values_videos, video_grid_thw)
        scores = self.rm_head(h.to(self.rm_head.weight.dtype)).float()  # (B, L, N)
        if self.special_token_ids is not None:
            return read_heads(scores, special_positions(input_ids, self.special_token_ids))
        return read_heads(scores, last_positions(attention_mask))


@dataclass
class VideoAlignSettings:
    """How videos become model inputs, and the calibration. fps / frames / max_pixels come from model_config.json's
    data_config (min_pixels too if it holds min_frame_pixels, which only the tiny model does), patch sizes and
    mean / std from the base model's processor, the calibration from inference_config (None: raw values)."""

    fps: float = 2.0
    frames: int | None = None
    source_fps: float = DEFAULT_SOURCE_FPS
    max_pixels: int = 240 * 320
    min_pixels: int = VIDEO_MIN_PIXELS
    patch: int = 14
    temporal: int = 2
    merge: int = 2
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    calibration: dict[str, tuple[float, float]] | None = field(default=None)  # head -> (mean, std)


class VideoAlignReward(Reward):
    """VideoReward on decoded videos (B, F, 3, H, W) in [0, 1] -> (B, len(heads)): the calibrated VQ / MQ / TA
    values (raw head values without calibration). `heads` picks and orders the columns."""

    media = "video"
    differentiable = True

    def __init__(self, model: VideoRewardModel, processor, template: str, settings: VideoAlignSettings,
                 heads: Sequence[str] = HEADS, device="cpu", dtype=torch.float32, batch: int = 8):
        unknown = [h for h in heads if h not in HEADS]
        if unknown or not heads:
            raise RewardError(f"VideoAlign heads are {', '.join(HEADS)}, got {list(heads)}")
        self.device, self.dtype = torch.device(device), dtype
        self.model = model.to(self.device, dtype).eval().requires_grad_(False)
        self.model.rm_head.float()
        self.processor, self.template, self.settings, self.batch = processor, template, settings, int(batch)
        check_template(template, model.special_token_ids is not None)
        self.names = list(heads)
        self.columns = [HEADS.index(h) for h in heads]

    def to(self, device):
        self.model.to(device)
        self.device = torch.device(device)
        return self

    def video_inputs(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One video (F, 3, H, W) -> (patches (P, 3*2*14*14), grid (3,))."""
        s = self.settings
        n = frame_count(video.shape[0], s.source_fps, s.fps, s.frames)
        size = frame_size(video.shape[-2], video.shape[-1], s.max_pixels, s.min_pixels, s.patch * s.merge)
        return patchify(prepare_frames(video.to(self.device), n, size, s.mean, s.std), s.patch, s.temporal, s.merge)

    def inputs(self, media: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Videos (B, F, 3, H, W) and B prompts -> the model's inputs: input_ids, attention_mask (B, L), right
        padded with the tokenizer's pad token; pixel_values_videos (P, 3*2*14*14), all videos' patches in batch
        order; video_grid_thw (B, 3)."""
        patches, grids = zip(*[self.video_inputs(v) for v in media])
        texts = [chat_text(self.processor, fill_template(self.template, p), int(g.prod()) // self.settings.merge ** 2)
                 for p, g in zip(prompts, grids)]
        tok = self.processor.tokenizer
        enc = tok(texts, padding=True, return_tensors="pt", padding_side="right")
        return {"input_ids": enc["input_ids"].to(self.device), "attention_mask": enc["attention_mask"].to(self.device),
                "pixel_values_videos": torch.cat(patches).to(self.dtype),
                "video_grid_thw": torch.stack(grids).to(self.device)}

    def raw(self, media: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """(B, 3) raw head values in HEADS order, `batch` videos per forward pass."""
        step = self.batch if self.batch > 0 else media.shape[0]
        return torch.cat([self.model(**self.inputs(media[i:i + step], prompts[i:i + step]))
                          for i in range(0, media.shape[0], step)])

    def score(self, media, prompts=None):
        if media.ndim != 5 or media.shape[2] != 3:
            raise RewardError(f"VideoAlign scores videos (B, F, 3, H, W), got shape {tuple(media.shape)}")
        if prompts is None or len(prompts) != media.shape[0]:
            raise RewardError(f"VideoAlign needs one prompt per video, got {None if prompts is None else len(prompts)}"
                              f" for {media.shape[0]} videos")
        r = self.raw(media, list(prompts))
        cal = self.settings.calibration
        if cal is not None:
            r = normalise_heads(r, [cal[h][0] for h in HEADS], [cal[h][1] for h in HEADS])
        return r[:, self.columns]


# ----- the released checkpoint layout -----------------------------------------------------------------------

PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


def released_key_to_ours(key: str) -> tuple[str | None, str]:
    """A key of the released checkpoint (a peft-wrapped transformers 4.45 Qwen2VLRewardModelBT) -> (our
    VideoRewardModel key, kind). kind "tensor": a whole tensor; "lora_A" / "lora_B": a LoRA factor of the Linear
    whose weight is the returned key; "skip": known and unused (lm_head, which the reward never reads, and peft's
    original_module copies). (None, kind) for a key with no counterpart. Keys already in the current transformers
    layout (model.language_model.*, model.visual.*) are accepted as well."""
    k = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
    k = re.sub(r"\.modules_to_save\.[^.]+\.", ".", k)
    kind = "tensor"
    m = _LORA_KEY.match(k)
    if m:
        k, kind = m["module"] + ".weight", "lora_" + m["ab"]
    k = k.replace(".base_layer.", ".")
    if k.startswith("lm_head.") or ".original_module." in k:
        return k, "skip"
    if k.startswith("rm_head."):
        return k, kind
    if k.startswith(("model.visual.", "model.language_model.")):
        return "vlm." + k, kind
    if k.startswith("visual."):
        return "vlm.model." + k, kind
    if k.startswith("model."):
        return "vlm.model.language_model." + k[len("model."):], kind
    return None, kind


def ours_to_released_key(key: str, adapter_file: bool = False) -> str:
    """Inverse of released_key_to_ours on a state_dict key of a VideoRewardModel (with peft LoRA layers injected
    into its language model, as the reference trains it): the released name. adapter_file: the names of
    adapter_model.safetensors (peft drops the adapter name "default")."""
    k = key
    if k.startswith("vlm.model.language_model."):
        k = "model." + k[len("vlm.model.language_model."):]
    elif k.startswith("vlm.model.visual."):
        k = "visual." + k[len("vlm.model.visual."):]
    elif k.startswith("vlm."):
        k = k[len("vlm."):]
    if adapter_file:
        k = k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
    return PEFT_PREFIX + k


def lora_scale(peft_cfg: dict[str, Any]) -> float:
    """peft's LoRA scaling: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    r, alpha = float(peft_cfg.get("lora_r", 16)), float(peft_cfg.get("lora_alpha", 32))
    return alpha / math.sqrt(r) if peft_cfg.get("use_rslora") else alpha / r


@torch.no_grad()
def load_released_state(model: VideoRewardModel, state: dict[str, torch.Tensor], scale: float,
                        what: str = "VideoAlign") -> None:
    """Write released tensors into `model`: whole tensors first (base_layer copies, rm_head, the resized token
    embeddings, ...), then every LoRA pair merged into its Linear: W <- W + scale * B @ A (in float32).
    rm_head must be present; shapes must match; unknown keys are reported in the log and ignored."""
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    lora: dict[str, dict[str, torch.Tensor]] = {}
    unknown, seen = [], set()
    for key, value in state.items():
        target, kind = released_key_to_ours(key)
        if kind == "skip":
            continue
        if target not in params:
            unknown.append(key)
            continue
        if kind == "tensor":
            if params[target].shape != value.shape:
                raise RewardError(f"{what}: {key} has shape {tuple(value.shape)}, the model "
                                  f"{tuple(params[target].shape)}; is the base model Qwen2-VL-2B-Instruct?")
            params[target].copy_(value)
            seen.add(target)
        else:
            lora.setdefault(target, {})[kind] = value
    if unknown:
        log.warning("%s: ignored %d checkpoint keys with no counterpart, e.g. %s", what, len(unknown), unknown[0])
    if "rm_head.weight" not in seen:
        raise RewardError(f"{what}: the checkpoint has no rm_head weight; is it a VideoReward checkpoint?")
    for target, ab in lora.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise RewardError(f"{what}: LoRA factor missing for {target}")
        w = params[target]
        w.copy_((w.float() + scale * ab["lora_B"].float() @ ab["lora_A"].float()).to(w.dtype))


def checkpoint_dir(folder: Path, step: int | None = None) -> Path:
    """The checkpoint-<step> sub-folder to load: the given step, else the highest (the reference's choice)."""
    found = {int(p.name.split("-")[-1]): p for p in folder.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()}
    if step is not None and step in found:
        return found[step]
    if not found:
        raise RewardWeightsMissing(f"VideoAlign: no checkpoint-<step> folder in {folder}; download the whole "
                                   f"{HUB_REWARD} repository into it")
    if step is not None:
        log.warning("VideoAlign: no checkpoint-%s in %s, using the latest", step, folder)
    return found[max(found)]


def read_checkpoint(ckpt: Path) -> dict[str, torch.Tensor]:
    """The released tensors of one checkpoint folder: model.pth (everything), or adapter_model.safetensors (LoRA
    factors) + non_lora_state_dict.pth (the other trained tensors)."""
    full, adapter, non_lora = ckpt / "model.pth", ckpt / "adapter_model.safetensors", ckpt / "non_lora_state_dict.pth"
    try:
        if full.is_file():
            return torch.load(full, map_location="cpu", weights_only=True, mmap=True)
        if adapter.is_file() and non_lora.is_file():
            from safetensors.torch import load_file
            state = dict(torch.load(non_lora, map_location="cpu", weights_only=True))
            state.update(load_file(str(adapter)))
            return state
    except Exception as e:  # a truncated download or a non-weights file
        raise RewardError(f"VideoAlign: could not read the checkpoint in {ckpt} ({type(e).__name__}); "
                          f"re-download it") from None
    raise RewardWeightsMissing(f"VideoAlign: {ckpt} holds neither model.pth nor adapter_model.safetensors + "
                               f"non_lora_state_dict.pth; download the whole {HUB_REWARD} repository")


# ----- locating the files -----------------------------------------------------------------------------------

def reward_folder(value: str | None) -> Path:
    """The VideoReward folder: option, $VIDEOALIGN_PATH, $REWARD_WEIGHTS_DIR/VideoReward, the hub cache."""
    how = (f"download it with `huggingface-cli download {HUB_REWARD} --local-dir DIR` and set VIDEOALIGN_PATH=DIR "
           f"(or put it in {_weights_dir() / 'VideoReward'})")
    path = value or os.environ.get("VIDEOALIGN_PATH")
    if path:
        if not (Path(path) / "model_config.json").is_file():
            raise RewardWeightsMissing(f"VideoAlign: no model_config.json in {path} (VIDEOALIGN_PATH); {how}")
        return Path(path)
    local = _weights_dir() / "VideoReward"
    if (local / "model_config.json").is_file():
        return local
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(HUB_REWARD))
    except Exception:  # offline, no cache, no network: all mean "not here"
        pass
    raise RewardWeightsMissing(f"VideoAlign: weights not found; {how}")


def base_source(value: str | None, model_config: dict[str, Any]) -> str:
    """Where the base Qwen2-VL comes from: option, $VIDEOALIGN_BASE, $REWARD_WEIGHTS_DIR/Qwen2-VL-2B-Instruct,
    model_config's model_name_or_path (a hub id, or a path that exists), else the hub id."""
    path = value or os.environ.get("VIDEOALIGN_BASE")
    if path:
        return path
    local = _weights_dir() / HUB_BASE.split("/")[-1]
    if (local / "config.json").is_file():
        return str(local)
    name = model_config.get("model_name_or_path") or HUB_BASE
    is_hub_id = name.count("/") == 1 and not name.startswith(("/", "."))
    return name if Path(name).exists() or is_hub_id else HUB_BASE


def template_file(value: str | None, folder: Path, template_type: str) -> str:
    """The prompt template file: option, $VIDEOALIGN_TEMPLATE, else prompt_template.py / .txt in the VideoReward
    folder, its parent or grandparent. Raises RewardWeightsMissing with one line."""
    how = (f"download prompt_template.py from {TEMPLATE_URL} (VideoReward was trained on its {template_type!r} "
           f"prompt) and set VIDEOALIGN_TEMPLATE=/path/to/prompt_template.py")
    path = value or os.environ.get("VIDEOALIGN_TEMPLATE")
    if path:
        if not Path(path).is_file():
            raise RewardWeightsMissing(f"VideoAlign: no prompt template at {path} (VIDEOALIGN_TEMPLATE); {how}")
        return str(path)
    for d in (folder, folder.parent, folder.parent.parent):
        for name in ("prompt_template.py", "prompt_template.txt"):
            if (d / name).is_file():
                return str(d / name)
    raise RewardWeightsMissing(f"VideoAlign: prompt template not found near {folder}; {how}")


# ----- loading ----------------------------------------------------------------------------------------------

class VideoRewardBundle:
    """Everything a VideoAlignReward needs, loaded once and shared by the rewards built from it."""

    def __init__(self, model: VideoRewardModel, processor, template: str, settings: VideoAlignSettings):
        self.model, self.processor, self.template, self.settings = model, processor, template, settings


_LOADED: "weakref.WeakValueDictionary[tuple, VideoRewardBundle]" = weakref.WeakValueDictionary()


def settings_from(model_config: dict[str, Any], processor) -> VideoAlignSettings:
    """VideoAlignSettings from model_config.json (data_config, inference_config) and the processor."""
    data = {**DATA_DEFAULTS, **(model_config.get("data_config") or {})}
    if data.get("sample_type", "uniform") != "uniform":
        raise RewardError(f"VideoAlign: sample_type {data['sample_type']!r} is not supported (only 'uniform')")
    vp = processor.video_processor
    inf = model_config.get("inference_config")
    cal = None if not inf else {h: (float(inf[f"{h}_mean"]), float(inf[f"{h}_std"])) for h in HEADS}
    return VideoAlignSettings(fps=float(data["fps"] or 2.0), frames=data.get("num_frames"),
                              max_pixels=int(data["max_frame_pixels"]),
                              min_pixels=int(data.get("min_frame_pixels", VIDEO_MIN_PIXELS)),
                              patch=int(vp.patch_size), temporal=int(vp.temporal_patch_size),
                              merge=int(vp.merge_size), mean=tuple(vp.image_mean), std=tuple(vp.image_std),
                              calibration=cal)


def load_videoreward(path: str | None = None, base: str | None = None, template: str | None = None,
                     step: int | None = None, dtype=torch.float32) -> VideoRewardBundle:
    """The released VideoReward, as the reference builds it: the base Qwen2-VL and its processor (right padding),
    the tokenizer with the three reward tokens (checkpoint-<step>/tokenizer/ if shipped, else the base one plus
    the tokens), the token embeddings resized to it, rm_head, then the checkpoint's tensors with the LoRA merged."""
    from transformers import AutoProcessor, AutoTokenizer, Qwen2VLForConditionalGeneration

    folder = reward_folder(path)
    with open(folder / "model_config.json") as f:
        cfg = json.load(f)
    mcfg, peft_cfg = cfg.get("model_config") or {}, cfg.get("peft_lora_config") or {}
    data = {**DATA_DEFAULTS, **(cfg.get("data_config") or {})}
    ckpt = checkpoint_dir(folder, step)
    src = base_source(base, mcfg)
    what, env = "VideoAlign base (Qwen2-VL-2B-Instruct)", "VIDEOALIGN_BASE"
    processor = _from_pretrained(AutoProcessor, src, what, env, HUB_BASE)
    if (ckpt / "tokenizer").is_dir():
        processor.tokenizer = AutoTokenizer.from_pretrained(str(ckpt / "tokenizer"))
    special = bool(mcfg.get("use_special_tokens"))  # the reference then reads at the tokens whatever reward_token
    if not special and mcfg.get("reward_token", "last") != "last":
        raise RewardError(f"VideoAlign: reward_token {mcfg.get('reward_token')!r} is not supported ('special', "
                          f"'last')")
    if special:
        processor.tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    vlm = _from_pretrained(Qwen2VLForConditionalGeneration, src, what, env, HUB_BASE, dtype=dtype)
    if special:
        vlm.resize_token_embeddings(len(processor.tokenizer), mean_resizing=False)
    ids = processor.tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS)) if special else None
    model = VideoRewardModel(vlm, int(mcfg.get("output_dim", 1)), ids).to(dtype)
    load_released_state(model, read_checkpoint(ckpt), lora_scale(peft_cfg))
    text = template_from_file(template_file(template, folder, data["prompt_template_type"]),
                              data["prompt_template_type"])
    return VideoRewardBundle(model, processor, text, settings_from(cfg, processor))


# ----- tiny random VideoReward (offline tests and --tiny) ---------------------------------------------------

TINY_TEMPLATE = ("Judge this generated clip for the prompt {text_prompt}. Picture: <|VQ_reward|> "
                 "Movement: <|MQ_reward|> Match: <|TA_reward|>")  # our own words, same three slots
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TINY_VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
TINY_VOCAB = 300  # > the tiny tokenizer (263 + 3 reward tokens): resizing shrinks it, as for the real model


class TinyVideoReward(NamedTuple):
    """A tiny random VideoReward: `base` (the untouched Qwen2-VL, its vocabulary padded), `base_processor` (no
    reward tokens), `model` (resized embeddings, rm_head, LoRA layers injected with peft when lora_rank > 0),
    `processor` (with the reward tokens), `template`, `model_config` (model_config.json's content)."""
    base: nn.Module
    base_processor: Any
    model: VideoRewardModel
    processor: Any
    template: str
    model_config: dict[str, Any]


def _tiny_processor(tokenizer):
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    px = {"min_pixels": 28 * 28, "max_pixels": 28 * 28 * 1280}
    return Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**px), tokenizer=tokenizer,
                            video_processor=Qwen2VLVideoProcessor(**px), chat_template=TINY_CHAT_TEMPLATE)


def tiny_videoreward(seed: int = 0, lora_rank: int = 0) -> TinyVideoReward:
    """A tiny random VideoReward of the real classes: Qwen2-VL (vision depth 1, width 16; LM 2 layers, width 32,
    M-RoPE sections [2, 1, 1]), a byte-level Qwen tokenizer with the vision tokens, the reward tokens added and the
    embeddings resized as the reference does, a random rm_head (output_dim 1) and, with lora_rank > 0, peft LoRA
    factors on every Linear of the language model (the reference's targets), B random so that they matter."""
    import copy

    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from common.reward_models import _seeded
    from common.tokenizers import make_qwen2_tokenizer

    tok0 = make_qwen2_tokenizer()
    tok0.add_special_tokens({"additional_special_tokens": list(TINY_VISION_TOKENS)})
    vs, ve, img, vid = tok0.convert_tokens_to_ids(list(TINY_VISION_TOKENS))
    text = dict(vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0},
                bos_token_id=tok0.pad_token_id, eos_token_id=tok0.pad_token_id, pad_token_id=tok0.pad_token_id)
    vision = dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=14,
                  temporal_patch_size=2, spatial_merge_size=2)
    cfg = Qwen2VLConfig(text_config=text, vision_config=vision, vision_start_token_id=vs, vision_end_token_id=ve,
                        image_token_id=img, video_token_id=vid, tie_word_embeddings=True)
    tok1 = copy.deepcopy(tok0)
    tok1.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    ctx = _seeded(seed)
    try:
        base = Qwen2VLForConditionalGeneration(cfg).eval()
        vlm = copy.deepcopy(base)
        vlm.resize_token_embeddings(len(tok1), mean_resizing=False)
        with torch.no_grad():  # trained reward-token embeddings: not the init
            vlm.get_input_embeddings().weight[-len(SPECIAL_TOKENS):].normal_(0, 0.5)
        model = VideoRewardModel(vlm, 1, tok1.convert_tokens_to_ids(list(SPECIAL_TOKENS)))
        if lora_rank:
            from peft import LoraConfig, inject_adapter_in_model

            targets = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".language_model." in n]
            inject_adapter_in_model(LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0,
                                               target_modules=targets), model)
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if "lora_B" in n:
                        p.normal_(0, 0.2)
    finally:
        ctx.__exit__(None, None, None)
    model.eval()
    mc = {"data_config": {"fps": 2.0, "num_frames": None, "max_frame_pixels": 56 * 84, "min_frame_pixels": 28 * 28,
                          "eval_dim": list(HEADS), "prompt_template_type": "detailed_special",
                          "sample_type": "uniform"},
          "model_config": {"model_name_or_path": HUB_BASE, "output_dim": 1, "use_special_tokens": True,
                           "reward_token": "special"},
          "peft_lora_config": {"lora_enable": bool(lora_rank), "lora_r": lora_rank or 16,
                               "lora_alpha": 2 * lora_rank or 32, "use_rslora": False,
                               "lora_namespan_exclude": ["lm_head", "rm_head", "embed_tokens", "visual"]},
          "inference_config": {"VQ_mean": 0.3, "VQ_std": 2.0, "MQ_mean": -0.2, "MQ_std": 0.5, "TA_mean": 0.1,
                               "TA_std": 1.5}}
    return TinyVideoReward(base, _tiny_processor(tok0), model, _tiny_processor(tok1), TINY_TEMPLATE, mc)


def save_videoreward(tiny: TinyVideoReward, folder: str | Path, layout: str = "lora", step: int = 7,
                     tokenizer_dir: bool = True) -> tuple[Path, Path]:
    """Write `tiny` in the released layout: folder/base (save_pretrained of the base model and processor) and
    folder/VideoReward (model_config.json, prompt_template.txt, checkpoint-<step>/ with model.pth for layout
    "full", or adapter_model.safetensors + non_lora_state_dict.pth for layout "lora", and tokenizer/).
    Returns (reward folder, base folder)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    base_dir, reward_dir = folder / "base", folder / "VideoReward"
    ckpt = reward_dir / f"checkpoint-{step}"
    ckpt.mkdir(parents=True, exist_ok=True)
    tiny.base.save_pretrained(base_dir)
    tiny.base_processor.save_pretrained(base_dir)
    sd = {k: v.detach().clone().contiguous() for k, v in tiny.model.state_dict().items()}
    if layout == "full":
        torch.save({ours_to_released_key(k): v for k, v in sd.items()}, ckpt / "model.pth")
    elif layout == "lora":
        save_file({ours_to_released_key(k, adapter_file=True): v for k, v in sd.items() if ".lora_" in k},
                  str(ckpt / "adapter_model.safetensors"))
        trained = ("rm_head.weight", "vlm.model.language_model.embed_tokens.weight")
        torch.save({ours_to_released_key(k): sd[k] for k in trained}, ckpt / "non_lora_state_dict.pth")
    else:
        raise ValueError(f"layout must be 'full' or 'lora', got {layout!r}")
    if tokenizer_dir:
        tiny.processor.tokenizer.save_pretrained(ckpt / "tokenizer")
    with open(reward_dir / "model_config.json", "w") as f:
        json.dump(tiny.model_config, f, indent=2)
    (reward_dir / "prompt_template.txt").write_text(tiny.template, encoding="utf-8")
    return reward_dir, base_dir


# ----- registry factories -----------------------------------------------------------------------------------

def videoalign(videoalign_path: str | None = None, videoalign_base: str | None = None,
               videoalign_template: str | None = None, videoalign_step: int | None = None,
               videoalign_fps: float | None = None, videoalign_frames: int | None = None,
               videoalign_source_fps: float = DEFAULT_SOURCE_FPS, videoalign_max_pixels: int | None = None,
               videoalign_norm: bool = True, videoalign_batch: int = 8, tiny: bool = False, device="cpu",
               dtype=None, seed: int = 0, heads: Sequence[str] = HEADS, **_: Any) -> VideoAlignReward:
    """Registry factory "videoalign": VQ, MQ, TA as three objectives (heads picks a subset). Weights as in the
    module docstring; tiny=True without videoalign_path / $VIDEOALIGN_PATH: a tiny random model (seeded)."""
    from common.reward_models import _dtype

    dt = _dtype(dtype)
    path = videoalign_path or os.environ.get("VIDEOALIGN_PATH")
    key = ("tiny", seed, str(dt)) if path is None and tiny else \
        (path, videoalign_base or os.environ.get("VIDEOALIGN_BASE"),
         videoalign_template or os.environ.get("VIDEOALIGN_TEMPLATE"), videoalign_step, str(dt))
    bundle = _LOADED.get(key)
    if bundle is None:
        if path is None and tiny:
            t = tiny_videoreward(seed)
            bundle = VideoRewardBundle(t.model, t.processor, t.template, settings_from(t.model_config, t.processor))
        else:
            bundle = load_videoreward(path, videoalign_base, videoalign_template, videoalign_step, dt)
        _LOADED[key] = bundle
    s = replace(bundle.settings, source_fps=float(videoalign_source_fps),
                fps=float(videoalign_fps or bundle.settings.fps), frames=videoalign_frames or bundle.settings.frames,
                max_pixels=int(videoalign_max_pixels or bundle.settings.max_pixels),
                calibration=bundle.settings.calibration if videoalign_norm else None)
    reward = VideoAlignReward(bundle.model, bundle.processor, bundle.template, s, heads, device, dt, videoalign_batch)
    reward.bundle = bundle  # keeps the shared model in _LOADED while a reward uses it
    return reward


def videoalign_vq(**kw) -> VideoAlignReward:
    """Registry factory "videoalign_vq": the visual-quality head alone."""
    return videoalign(**kw, heads=("VQ",))


def videoalign_mq(**kw) -> VideoAlignReward:
    """Registry factory "videoalign_mq": the motion-quality head alone."""
    return videoalign(**kw, heads=("MQ",))


def videoalign_ta(**kw) -> VideoAlignReward:
    """Registry factory "videoalign_ta": the text-alignment head alone."""
    return videoalign(**kw, heads=("TA",))
