"""Tiny random miniatures of the four diffusers families, built from configs, with in-memory tokenizers.

Each `tiny_<family>_pipeline()` returns a complete diffusers pipeline (text encoders, tokenizers, VAE,
transformer, scheduler) whose every weight is random, small enough that a 4-step generation takes a few
hundredths of a second on a CPU and needs neither the hub nor a file. The backends' `tiny=True` saves such
a pipeline with save_pretrained to a temporary folder and loads it back through the production loader, so
the loading code path is the one real weights take. Shapes that must agree are written next to each config
(shared/spec/ecosystem.md §2-3 measured them).

Tiny media sizes: FLUX.1 / SD3 / FLUX.2 images 32x32 (VAE factor 2 -> 16x16 latents), Wan videos 5 frames
at 32x32 (factors 4 in time, 8 in space -> latents 16 x 2 x 4 x 4).
"""
from __future__ import annotations

import torch

from common.tokenizers import make_clip_tokenizer, make_qwen2_tokenizer, make_t5_tokenizer

TINY_HEIGHT = TINY_WIDTH = 32
TINY_FRAMES = 5
TINY_MAX_SEQ = 64                 # text tokens in tiny runs (char-level tokenizers: about one a character)
CLIP_TINY_MERGES = 488            # -> a 1,002-token CLIP vocabulary

FLUX_TRANSFORMER = dict(patch_size=1, in_channels=16,           # = 4 x vae latent_channels (2x2 packing)
                        num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                        joint_attention_dim=32,                    # = T5 d_model
                        pooled_projection_dim=32,                  # = CLIP hidden_size (pooler_output)
                        guidance_embeds=True,                      # FLUX.1-dev: embedded guidance
                        axes_dims_rope=(4, 6, 6))                  # sums to attention_head_dim
IMAGE_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                 up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),   # vae_scale_factor 2
                 layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=32,
                 use_quant_conv=False, use_post_quant_conv=False)
FLUX_VAE = dict(IMAGE_VAE, shift_factor=0.1159, scaling_factor=0.3611)       # FLUX.1's factors
SD3_VAE = dict(IMAGE_VAE, shift_factor=0.0609, scaling_factor=1.5035)        # SD3's factors
SD3_TRANSFORMER = dict(sample_size=32, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
                       num_attention_heads=4, caption_projection_dim=32,
                       joint_attention_dim=32,                     # = T5 d_model = CLIP hidden
                       pooled_projection_dim=64, out_channels=4)  # = 2 x CLIP projection_dim
WAN_TRANSFORMER = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16,
                       out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
                       qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
WAN_VAE = dict(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])
FLUX2_TRANSFORMER = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                         num_attention_heads=2,
                         joint_attention_dim=32,                   # = Qwen3 hidden 16 x 2 output layers
                         timestep_guidance_channels=256, axes_dims_rope=(4, 4, 4, 4),
                         guidance_embeds=False)                    # Klein: no embedded guidance
FLUX2_VAE = dict(IMAGE_VAE)
FLUX2_TEXT_LAYERS = (1, 2)        # hidden states of these Qwen3 layers, concatenated -> joint_attention_dim
WAN22_BOUNDARY = 0.875            # Wan2.2 T2V A14B's boundary_ratio


def _clip_config(tok, **kw):
    from transformers import CLIPTextConfig
    # the eos id matters: CLIP pools the hidden state at the first eos token
    return CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id, **kw)


def _t5_kwargs(tok):
    return dict(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                relative_attention_num_buckets=8, is_encoder_decoder=False, use_cache=False,
                decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)


def _scheduler(**kw):
    from diffusers import FlowMatchEulerDiscreteScheduler
    return FlowMatchEulerDiscreteScheduler(**kw)


def _disabled(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux_pipeline(seed: int = 0):
    """FluxPipeline: CLIP (tiny vocab) + T5 (char vocab) + AutoencoderKL + FluxTransformer2DModel, dynamic shift."""
    from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel
    torch.manual_seed(seed)
    tok, tok2 = make_clip_tokenizer(CLIP_TINY_MERGES), make_t5_tokenizer()
    return _disabled(FluxPipeline(
        transformer=FluxTransformer2DModel(**FLUX_TRANSFORMER), text_encoder=CLIPTextModel(_clip_config(tok)),
        tokenizer=tok, text_encoder_2=T5EncoderModel(T5Config(**_t5_kwargs(tok2))), tokenizer_2=tok2,
        vae=AutoencoderKL(**FLUX_VAE),
        scheduler=_scheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                             base_image_seq_len=256, max_image_seq_len=4096)))


def tiny_sd3_pipeline(seed: int = 0):
    """StableDiffusion3Pipeline: 2 x CLIP-with-projection + T5 + AutoencoderKL + SD3Transformer2DModel, shift 3."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel
    torch.manual_seed(seed)
    tok, tok2, tok3 = make_clip_tokenizer(CLIP_TINY_MERGES), make_clip_tokenizer(CLIP_TINY_MERGES), make_t5_tokenizer()
    return _disabled(StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(**SD3_TRANSFORMER), scheduler=_scheduler(shift=3.0),
        vae=AutoencoderKL(**SD3_VAE),
        text_encoder=CLIPTextModelWithProjection(_clip_config(tok)), tokenizer=tok,
        text_encoder_2=CLIPTextModelWithProjection(_clip_config(tok2)), tokenizer_2=tok2,
        text_encoder_3=T5EncoderModel(T5Config(**_t5_kwargs(tok3))), tokenizer_3=tok3))


def tiny_wan_pipeline(seed: int = 0, two_experts: bool = False):
    """WanPipeline: UMT5 + AutoencoderKLWan + WanTransformer3DModel, shift 5; two_experts=True gives the Wan2.2
    layout (transformer = high-noise expert, transformer_2 = low-noise expert, boundary_ratio 0.875)."""
    from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel
    torch.manual_seed(seed)
    tok = make_t5_tokenizer()
    kw = dict(transformer_2=WanTransformer3DModel(**WAN_TRANSFORMER), boundary_ratio=WAN22_BOUNDARY) \
        if two_experts else {}
    return _disabled(WanPipeline(
        tokenizer=tok, text_encoder=UMT5EncoderModel(UMT5Config(**_t5_kwargs(tok))),
        vae=AutoencoderKLWan(**WAN_VAE), scheduler=_scheduler(shift=5.0),
        transformer=WanTransformer3DModel(**WAN_TRANSFORMER), **kw))


def tiny_flux2_pipeline(seed: int = 0, distilled: bool = False):
    """Flux2KleinPipeline: Qwen3ForCausalLM (byte vocab, chat template) + AutoencoderKLFlux2 (with batch-norm
    latent statistics, randomised so that decode's de-normalisation is exercised) + Flux2Transformer2DModel."""
    from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM
    torch.manual_seed(seed)
    tok = make_qwen2_tokenizer()
    te = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tok), hidden_size=16, intermediate_size=16, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, head_dim=8,
                                      max_position_embeddings=512))
    vae = AutoencoderKLFlux2(**FLUX2_VAE)
    with torch.no_grad():                       # non-trivial latent statistics (real checkpoints have them)
        vae.bn.running_mean.normal_(0.0, 0.3)
        vae.bn.running_var.uniform_(0.5, 2.0)
    return _disabled(Flux2KleinPipeline(
        transformer=Flux2Transformer2DModel(**FLUX2_TRANSFORMER), vae=vae, text_encoder=te, tokenizer=tok,
        scheduler=_scheduler(shift=3.0, use_dynamic_shifting=True), is_distilled=distilled))


TINY_BUILDERS = {"flux": tiny_flux_pipeline, "sd3": tiny_sd3_pipeline, "wan": tiny_wan_pipeline,
                 "flux2": tiny_flux2_pipeline}


def tiny_pipeline(family: str, seed: int = 0, **kw):
    """The tiny pipeline of `family` (flux | sd3 | wan | flux2); kw go to the builder (two_experts, distilled)."""
    if family not in TINY_BUILDERS:
        raise KeyError(f"no tiny pipeline for {family!r}; choose one of {', '.join(TINY_BUILDERS)}")
    return TINY_BUILDERS[family](seed=seed, **kw)
