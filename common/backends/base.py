"""Shared machinery of the diffusers families (FLUX.1, SD3, Wan, FLUX.2): loading, LoRA, text-embedding cache,
VAE decode helpers, gradient checkpointing, FSDP2 block lists.

A family adapter (flux.py, sd3.py, wan.py, flux2.py) subclasses DiffusersBackend and fills in
  _encode_batch(prompts) -> dict of (n, ...) tensors      the pipeline's own encode_prompt, no gradients
  velocity(net, x, sigma, cond, guidance)                  the transformer call in the family's convention
  decode(x)                                                latents -> pixels in [0, 1], differentiable
  _latent_shape()                                          one sample's latent shape in the chosen layout
and the class attributes (pipeline class, hub id, LoRA targets, block classes).

Design choices (documented here once):
  * The denoising loop is the project's own (common.flow.rollout); a pipeline's __call__ is only the test
    reference. The pipeline object is kept (self.pipe) for its encode_prompt, VAE and LoRA file format.
  * Text embeddings are computed once per prompt (no gradients) and kept in a dict on the backend's device;
    with offload_text_encoders (default on CUDA) the text encoders go back to the CPU after each encode, so
    they do not hold GPU memory during training.
  * LoRA: peft through diffusers' `add_adapter` under the adapter name "default"; the base weights are frozen.
    reference(net) disables the adapter for the duration of the block (no copy); full fine-tuning falls back
    to the base class's kept copy (keep_reference).
  * frozen_copy(net) is a deep copy (the adapter, if any, comes along frozen): a teacher or fake score that
    must not move when the policy's adapter does. For the 12B FLUX transformer that is 24 GB in bf16: methods
    that only need the base policy should use reference(net) instead, and a second trained network can be a
    second adapter on the same transformer: add_adapter_copy(net, name) and use_adapter(net, name) (RTDMD's
    fake score). peft's set_adapter / enable_adapters also flip requires_grad (the active adapter trainable, the
    others frozen), so reference() and use_adapter() switch the adapter only and give every requires_grad flag
    back as it was, inside the block and after it (else a second adapter would stop training, silently).
  * A teacher that is not the generator's own model (teacher_pretrained; RTDMD's FLUX.2 klein-base beside the
    distilled klein generator) is a second checkpoint of the family: load_network reads its transformer(s) only,
    through the same load_pipeline (networks_only), and keeps it as self.teacher_net, frozen; --tiny builds it as a
    twin of other weights. Settings that differ between the two checkpoints (FLUX.2's true CFG) are read per
    network, never from the backend alone.
  * save_lora(dir) writes the diffusers LoRA format (pytorch_lora_weights.safetensors with the adapter's
    rank/alpha metadata), so `Pipeline.load_lora_weights(dir)` takes a trained result.
"""
from __future__ import annotations

import abc
import contextlib
import copy
import os
import shutil
import tempfile
import warnings
import weakref
from typing import Any, Iterator, NamedTuple, Sequence

import torch
from torch import nn

from common.backend import Backend, BackendError, Cond

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
ADAPTER = "default"


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE asks the hub client never to reach the network."""
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on")


def parse_dtype(dtype: Any, device: torch.device) -> torch.dtype:
    """None -> bf16 on CUDA, float32 elsewhere; also accepts torch dtypes and 'bf16'/'fp16'/'fp32' strings."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "fp32": torch.float32, "float32": torch.float32}
    if str(dtype) not in names:
        raise BackendError(f"unknown dtype {dtype!r}; choose bf16, fp16 or fp32")
    return names[str(dtype)]


def sigma_batch(sigma: torch.Tensor | float, B: int, device: torch.device) -> torch.Tensor:
    """sigma (scalar or (B,)) -> (B,) float32 on device."""
    s = torch.as_tensor(sigma, dtype=torch.float32, device=device)
    return s.expand(B).contiguous() if s.ndim == 0 else s.reshape(B)


def cfg_combine(v_uncond: torch.Tensor, v_cond: torch.Tensor, g: float) -> torch.Tensor:
    """Classifier-free guidance v = v_u + g (v_c - v_u) (g = 1 gives v_c); shapes equal, float32 out."""
    v_uncond, v_cond = v_uncond.float(), v_cond.float()
    return v_uncond + g * (v_cond - v_uncond)


def to_unit_range(img: torch.Tensor) -> torch.Tensor:
    """VAE output in [-1, 1] -> [0, 1] (the pipelines' postprocess: x / 2 + 1/2, clamped), float32."""
    return (img.float() / 2 + 0.5).clamp(0, 1)


def diffusers_models(net: nn.Module) -> list[nn.Module]:
    """The diffusers transformers inside `net`: net itself, or the experts of a Wan2.2 TwoExperts module."""
    experts = getattr(net, "experts", None)
    return list(experts) if experts is not None else [net]


def has_adapter(model: nn.Module) -> bool:
    """True when a peft adapter is attached to this diffusers model."""
    return bool(getattr(model, "_hf_peft_config_loaded", False)) and ADAPTER in getattr(model, "peft_config", {})


def is_adapter_tensor(path: str, name: str = ADAPTER) -> bool:
    """True when a parameter path (e.g. 'blocks.0.attn.to_q.lora_A.default.weight') belongs to adapter `name`:
    peft stores each adapter's factors under lora_*.<adapter name>."""
    parts = path.split(".")
    return any(a.startswith("lora_") and b == name for a, b in zip(parts, parts[1:]))


def rename_adapter_path(path: str, name: str, new: str) -> str:
    """The parameter path with its adapter-name segment (the one after lora_*) changed from name to new."""
    parts = path.split(".")
    return ".".join(new if i and parts[i - 1].startswith("lora_") and part == name else part
                    for i, part in enumerate(parts))


class AdapterState(NamedTuple):
    """What peft's adapter switches change on one diffusers model: the active adapter names, whether adapters are
    disabled, and every parameter's requires_grad flag."""
    active: list[str]
    disabled: bool
    flags: list[tuple[nn.Parameter, bool]]


_LORA_LAYERS: "weakref.WeakKeyDictionary[nn.Module, tuple[int, list]]" = weakref.WeakKeyDictionary()


def lora_layers(model: nn.Module) -> list:
    """The peft tuner layers of a diffusers model (every LoRA-wrapped linear), found once per set of adapters: a
    module walk over a 12B transformer costs milliseconds, and RTDMD switches adapters several times a step."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    key = len(getattr(model, "peft_config", {}) or {})      # adding an adapter can wrap new layers: look again
    hit = _LORA_LAYERS.get(model)
    if hit is None or hit[0] != key:
        hit = (key, [m for m in model.modules() if isinstance(m, BaseTunerLayer)])
        _LORA_LAYERS[model] = hit
    return hit[1]


def _adapter_tensors(layer) -> Iterator[nn.Parameter]:
    """Every adapter tensor of one tuner layer (all adapters): the ones peft's switches set requires_grad on."""
    for attr in layer.adapter_layer_names:
        yield from getattr(layer, attr).parameters()


def adapter_state(model: nn.Module) -> AdapterState:
    """The current AdapterState of a diffusers model with at least one peft adapter. Only adapter tensors are
    recorded: peft's switches never touch the base weights' flags."""
    layers = lora_layers(model)
    return AdapterState(list(layers[0].active_adapters), bool(layers[0].disable_adapters),
                        [(p, p.requires_grad) for layer in layers for p in _adapter_tensors(layer)])


def restore_adapter_state(model: nn.Module, state: AdapterState, flags_only: bool = False) -> None:
    """Put back the active adapter(s), the enabled/disabled switch (unless flags_only) and the requires_grad flags
    (last: peft's set_adapter and enable_adapters rewrite them). Layer by layer, as diffusers' model-level
    set_adapter / enable_adapters do, without their module walk and peft version check per call."""
    if not flags_only:
        for layer in lora_layers(model):
            layer.set_adapter(state.active)
            layer.enable_adapters(not state.disabled)
    for p, flag in state.flags:
        p.requires_grad_(flag)


@contextlib.contextmanager
def switched_adapter(models: list[nn.Module], name: str | None) -> Iterator[None]:
    """Run the block with adapter `name` active on every model (None: adapters disabled, the base model); the
    requires_grad flags stay as they were inside the block, and everything is restored afterwards, also when the
    block raises."""
    saved = [adapter_state(m) for m in models]
    try:
        for m, st in zip(models, saved):
            for layer in lora_layers(m):
                if name is None:
                    layer.enable_adapters(False)
                else:
                    layer.set_adapter(name)
                    if st.disabled:
                        layer.enable_adapters(True)
            restore_adapter_state(m, st, flags_only=True)
        yield
    finally:
        for m, st in zip(models, saved):
            restore_adapter_state(m, st)


@contextlib.contextmanager
def quiet_progress_bars() -> Iterator[None]:
    """transformers' and diffusers' progress bars off inside the block, as they were after it: the tiny twins' save
    and load round trip ("Writing model shards", "Loading weights", "Loading pipeline components" on stderr for a
    model built in a blink, before any one-line error). Never around real loading: 12B weights show their progress.
    transformers' switch also sets huggingface_hub's, which is put back too (warnings about HF_HUB_DISABLE_PROGRESS_BARS
    having priority are muted: the environment's setting is kept either way)."""
    from diffusers.utils import logging as dlog
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as tlog
    was = dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled(), are_progress_bars_disabled()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dlog.disable_progress_bar()
        tlog.disable_progress_bar()
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if was[0]:
                dlog.enable_progress_bar()
            if was[1]:
                tlog.enable_progress_bar()
            if are_progress_bars_disabled() != was[2]:
                (disable_progress_bars if was[2] else enable_progress_bars)()


def _is_rank0() -> bool:
    d = torch.distributed
    return not (d.is_available() and d.is_initialized()) or d.get_rank() == 0


class DiffusersBackend(Backend):
    """Base of the four diffusers families. Constructor options (all keyword, all with defaults):

    pretrained   hub id or local diffusers folder (default: the family's official hub id)
    tiny         True: a random miniature of the family (common/backends/tiny.py), saved to a temporary folder
                 and loaded back through the same loader; offline, CPU, well under a second per step
    lora_rank    LoRA rank (default 32; ignored with full_finetune); lora_alpha (default = rank)
    full_finetune  train every transformer weight instead of a LoRA adapter
    dtype        parameter dtype: None -> bf16 on CUDA (float32 with full_finetune: trained weights), float32 on CPU
    device       None -> cuda if available else cpu
    height, width, num_frames   media size in pixels / frames (family defaults)
    guidance     guidance scale (family default); gradient_checkpointing: on the transformer blocks
    shift        override of the schedule's shift (static); max_sequence_length: text tokens
    offload_text_encoders   move text encoders to the CPU after encoding (default: on CUDA only)
    negative_prompt   the unconditional prompt for true CFG (default "")
    teacher_pretrained   another checkpoint of the family loaded beside the generator as self.teacher_net (frozen,
                 transformer only: load_network), for a teacher that is not the generator's own model (RTDMD on
                 FLUX.2: klein-base beside the step-distilled klein); None: self.teacher_net is None
    """

    media = "image"
    pipeline_class: str = ""                  # diffusers class name
    default_pretrained: str = ""              # official hub id
    download_hint: str = ""                   # what to download (gated licence etc.)
    lora_targets: tuple[str, ...] | str = ("to_q", "to_k", "to_v", "to_out.0")   # names, or one regex
    block_attrs: tuple[str, ...] = ("transformer_blocks",)   # attributes of the transformer listing its blocks
    default_size: tuple[int, int] = (512, 512)
    default_guidance: float = 1.0
    default_max_seq: int = 512
    default_shift: float = 1.0
    uses_true_cfg: bool = False               # the Cond carries negative-prompt embeddings

    def __init__(self, pretrained: str | None = None, tiny: bool = False, lora_rank: int = 32,
                 lora_alpha: float | None = None, full_finetune: bool = False, dtype: Any = None,
                 device: str | torch.device | None = None, height: int | None = None, width: int | None = None,
                 num_frames: int | None = None, guidance: float | None = None, gradient_checkpointing: bool = False,
                 shift: float | None = None, max_sequence_length: int | None = None,
                 offload_text_encoders: bool | None = None, negative_prompt: str = "", seed: int = 0,
                 teacher_pretrained: str | None = None, **family_options: Any):
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dev = torch.device(device)
        if dtype is None and full_finetune:   # trained weights stay float32: an AdamW step of 1e-4 vanishes in bf16
            dtype = torch.float32
        super().__init__(device=dev, dtype=parse_dtype(dtype, dev))
        self.tiny = bool(tiny)
        self.family_options = dict(family_options)
        self._setup_defaults()                                  # tiny sizes, family options (hook)
        if self.family_options:
            # the method scripts pass some options to every backend (the toy's teacher, the DiT's preset):
            # ignored here, with a warning, rather than failing a run over an option meant for another family
            warnings.warn(f"{self.name}: ignoring option(s) {', '.join(sorted(self.family_options))}", stacklevel=2)
        h, w = self.default_size
        self.height, self.width = int(height or h), int(width or w)
        self.num_frames = int(num_frames or getattr(self, "default_frames", 1))
        self.guidance = float(guidance if guidance is not None else self.default_guidance)
        self.max_sequence_length = int(max_sequence_length or self.default_max_seq)
        self.offload_text_encoders = (dev.type == "cuda" if offload_text_encoders is None
                                      else bool(offload_text_encoders))
        self.negative_prompt = negative_prompt
        self.lora_rank, self.full_finetune = int(lora_rank), bool(full_finetune)
        self.lora_alpha = float(lora_alpha if lora_alpha is not None else lora_rank)
        if not self.full_finetune and self.lora_rank < 1:
            raise BackendError(f"--lora-rank must be >= 1 (got {lora_rank}); use --full-finetune to train all weights")
        self.pretrained = pretrained or self.default_pretrained
        self._embed_cache: dict[str, dict[str, torch.Tensor]] = {}

        self.gradient_checkpointing = bool(gradient_checkpointing)
        self.pipe = self._tiny_pipeline(seed) if self.tiny else self.load_pipeline(self.pretrained, self.dtype)
        self._place_modules()
        self.network = self._make_network()
        self.network.requires_grad_(False)
        if self.full_finetune:
            self.network.requires_grad_(True)
        else:
            self.add_lora(self.network)
        if gradient_checkpointing:
            for m in diffusers_models(self.network):
                m.enable_gradient_checkpointing()
            # the decoder too, where diffusers supports it: reward gradients through a 512 px decode are large
            vae = self.pipe.vae
            if getattr(vae, "_supports_gradient_checkpointing", False):
                vae.enable_gradient_checkpointing()
        self._check_size()
        self.latent_shape = tuple(self._latent_shape())
        self.shift = float(shift if shift is not None else self._default_shift())
        self.teacher_pretrained = teacher_pretrained or None
        self.teacher_net = self.load_network(teacher_pretrained, seed=seed + 1) if teacher_pretrained else None

    # ----- loading ----------------------------------------------------------------------------------
    def _setup_defaults(self) -> None:
        """Family hook run before sizes are read (tiny defaults)."""

    def _tiny_pipeline(self, seed: int, twin: bool = False):
        """Build the tiny pipeline, save it, and load it back through load_pipeline (the production path).
        twin: load_network's teacher twin (other weights from `seed`, the global random stream left as it was;
        only its transformer(s) are loaded back).

        Under torch.distributed the round trip is skipped (every rank builds the same seeded pipeline): the
        transformers models' save_pretrained writes files on rank 0 only, so other ranks would find none."""
        from common.backends.tiny import tiny_pipeline
        with torch.random.fork_rng(devices=[], enabled=twin):
            pipe = tiny_pipeline(self.name, seed=seed, **self._tiny_kwargs(twin))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            pipe.set_progress_bar_config(disable=True)
            return pipe.to(dtype=self.dtype)
        tmp = tempfile.mkdtemp(prefix=f"tiny-{self.name}-")
        try:
            with quiet_progress_bars():   # a blink for these sizes: no bars on stderr
                pipe.save_pretrained(tmp)
                return self.load_pipeline(tmp, self.dtype, networks_only=twin)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _tiny_kwargs(self, twin: bool = False) -> dict:
        """The family's tiny-builder options (twin: those of load_network's teacher twin)."""
        return {}

    def load_pipeline(self, pretrained: str, dtype: torch.dtype, flag: str = "--pretrained",
                      networks_only: bool = False):
        """`<PipelineClass>.from_pretrained(pretrained, torch_dtype=dtype)`: hub id or local folder. networks_only:
        the transformer(s) alone (every other component None, not read: load_network's second checkpoint).

        A missing or incomplete download raises BackendError with one line saying what to fetch and where to
        point `flag` (the command-line flag that named the checkpoint); HF_HUB_OFFLINE=1 (honoured by
        huggingface_hub itself) makes that immediate."""
        import diffusers
        from diffusers.utils import logging as dlog
        cls = getattr(diffusers, self.pipeline_class)
        local = os.path.isdir(pretrained)
        if not local and (os.path.sep in pretrained and not pretrained.count("/") == 1 or pretrained.startswith(".")):
            raise BackendError(f"{flag} {pretrained!r}: no such folder")
        skip = {n: None for n in cls._get_signature_keys(cls)[0] if not n.startswith("transformer")} \
            if networks_only else {}
        verbosity = dlog.get_verbosity()
        if not local:   # a missing download is our one line below, not diffusers' "Couldn't connect ..." warnings
            dlog.set_verbosity_error()
        try:
            pipe = cls.from_pretrained(pretrained, dtype=dtype, **skip)
        except (OSError, ValueError, EnvironmentError) as e:
            where = "the local folder" if local else ("the hub cache (HF_HUB_OFFLINE=1 is set)" if hub_offline()
                                                      else "the hub")
            why = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            # a hub id: that one; a local folder: the family's official checkpoint (the generator's flag) or the
            # checkpoint the folder should hold
            hub_id = pretrained if not local else (self.default_pretrained if flag == "--pretrained" else "HUB_ID")
            raise BackendError(
                f"cannot load {self.name} weights from {where} {pretrained!r} ({why}): download them with "
                f"`huggingface-cli download {hub_id} --local-dir DIR`{self.download_hint} and pass "
                f"{flag} DIR") from None
        finally:
            dlog.set_verbosity(verbosity)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def load_network(self, pretrained: str, seed: int = 1, flag: str = "--teacher-pretrained") -> nn.Module:
        """Another checkpoint of this family as a second network beside self.network: a teacher that is not the
        generator's own model (RTDMD on FLUX.2: the klein-base teacher beside the step-distilled klein generator).
        Only its transformer(s) are read, through load_pipeline (networks_only: the text encoders, tokenizers and
        VAE stay the generator's, so both checkpoints must share them, as a klein and its klein-base do), by the
        family's _network_of; on the training device, frozen, in eval mode, without an adapter, with gradient
        checkpointing when the generator has it. --tiny: a twin of the tiny pipeline from `seed` (other weights,
        the same config; a base model where the family has step-distilled ones), saved and loaded back the same
        way. Every tensor must have the generator's name and shape, else BackendError (one line)."""
        pipe = self._tiny_pipeline(seed, twin=True) if self.tiny else \
            self.load_pipeline(pretrained, self.dtype, flag=flag, networks_only=True)
        net = self._network_of(pipe)
        for m in diffusers_models(net):
            m.to(self.device)
            m.requires_grad_(False)
            m.eval()
            if self.gradient_checkpointing:
                m.enable_gradient_checkpointing()
        mine = {n.replace(".base_layer", ""): p.shape for n, p in self.network.named_parameters() if "lora_" not in n}
        theirs = {n: p.shape for n, p in net.named_parameters()}
        bad = sorted(set(mine) ^ set(theirs)) or [n for n in mine if mine[n] != theirs[n]]
        if bad:
            raise BackendError(f"{flag} {pretrained!r}: its {self.name} transformer differs from the generator's "
                               f"(e.g. {bad[0]}): pass a checkpoint of the same architecture and size as --pretrained")
        return net

    def _place_modules(self) -> None:
        """Transformer(s) and VAE on the training device, frozen; text encoders wait on the CPU when offloading."""
        for name in ("transformer", "transformer_2", "vae"):
            m = getattr(self.pipe, name, None)
            if m is not None:
                m.to(self.device)
                m.requires_grad_(False)
        for m in self._text_encoders():
            m.requires_grad_(False)
            m.eval()
            m.to("cpu" if self.offload_text_encoders else self.device)

    def _text_encoders(self) -> list[nn.Module]:
        return [getattr(self.pipe, n) for n in ("text_encoder", "text_encoder_2", "text_encoder_3")
                if getattr(self.pipe, n, None) is not None]

    def _make_network(self) -> nn.Module:
        """The generator: the network of the main pipeline (families also read their backend-wide settings here)."""
        return self._network_of(self.pipe)

    def _network_of(self, pipe) -> nn.Module:
        """The network (what velocity() takes) of a pipeline of this family: its transformer by default."""
        return pipe.transformer

    def _default_shift(self) -> float:
        cfg = self.pipe.scheduler.config
        return float(cfg.get("flow_shift", None) or cfg.get("shift", None) or self.default_shift)

    def _check_size(self) -> None:
        m = self.size_multiple()
        if self.height % m or self.width % m:
            raise BackendError(f"{self.name}: height and width must be multiples of {m} "
                               f"(got {self.height}x{self.width})")

    def size_multiple(self) -> int:
        return int(getattr(self.pipe, "vae_scale_factor", 8)) * 2

    # ----- text embeddings --------------------------------------------------------------------------
    @abc.abstractmethod
    def _encode_batch(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """The family's text encoding of distinct prompts: name -> (n, ...) tensor (no gradients)."""

    @torch.no_grad()
    def _encode_cached(self, prompts: list[str]) -> None:
        missing = [p for p in dict.fromkeys(prompts) if p not in self._embed_cache]
        if not missing:
            return
        encs = self._text_encoders()
        if self.offload_text_encoders:
            for m in encs:
                m.to(self.device)
        try:
            out = self._encode_batch(missing)
        finally:
            if self.offload_text_encoders:
                for m in encs:
                    m.to("cpu")
        for i, p in enumerate(missing):
            self._embed_cache[p] = {k: v[i].detach().to(self.device) for k, v in out.items()}

    def encode(self, prompts: Sequence[str]) -> Cond:
        """Cached text embeddings of `prompts` (each computed once); with true CFG also the negative prompt's
        embeddings under 'neg_*' keys, repeated over the batch."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        wanted = prompts + ([self.negative_prompt] if self.uses_true_cfg else [])
        self._encode_cached(wanted)
        keys = self._embed_cache[prompts[0]].keys()
        tensors = {k: torch.stack([self._embed_cache[p][k] for p in prompts]) for k in keys}
        if self.uses_true_cfg:
            neg = self._embed_cache[self.negative_prompt]
            for k in keys:
                tensors["neg_" + k] = neg[k].unsqueeze(0).expand(len(prompts), *neg[k].shape).contiguous()
        return Cond(tensors, prompts)

    def clear_text_cache(self) -> None:
        self._embed_cache.clear()

    # ----- helpers for velocity ----------------------------------------------------------------------
    def _net_dtype(self, net: nn.Module) -> torch.dtype:
        """The dtype inputs are cast to: the backend's load dtype (not the first parameter's: diffusers keeps
        some modules, e.g. Wan's time embedder, in float32 inside a bf16 model)."""
        return self.dtype

    # ----- LoRA ----------------------------------------------------------------------------------------
    def lora_config(self):
        from peft import LoraConfig
        # gaussian A, zero B: the adapter starts as the identity, so the trained model starts at the base model
        return LoraConfig(r=self.lora_rank, lora_alpha=self.lora_alpha, init_lora_weights="gaussian",
                          target_modules=self.lora_targets if isinstance(self.lora_targets, str)
                          else list(self.lora_targets))

    def add_lora(self, net: nn.Module) -> None:
        """Attach a fresh LoRA adapter (trainable) to every transformer in net; base weights stay frozen."""
        for m in diffusers_models(net):
            self._add_adapter_to(m)

    def trainable_parameters(self, net: nn.Module) -> list[nn.Parameter]:
        return [p for p in net.parameters() if p.requires_grad]

    @contextlib.contextmanager
    def reference(self, net: nn.Module) -> Iterator[nn.Module]:
        """The base policy: the adapters disabled for the block (LoRA; the active adapter and every requires_grad
        flag as before, inside and after), else the kept copy (full fine-tuning)."""
        models = diffusers_models(net)
        if not all(has_adapter(m) for m in models):
            with super().reference(net) as ref:
                yield ref
            return
        with switched_adapter(models, None):
            yield net

    def keep_reference(self, net: nn.Module) -> None:
        """With the LoRA adapter nothing to keep (reference() disables it); with --full-finetune a frozen copy."""
        if not self.has_lora(net):
            super().keep_reference(net)

    def has_lora(self, net: nn.Module) -> bool:
        """True when every transformer in net carries the LoRA adapter (False with --full-finetune)."""
        return all(has_adapter(m) for m in diffusers_models(net))

    def adapter_parameters(self, net: nn.Module, name: str = ADAPTER,
                           key_as: str | None = None) -> dict[str, nn.Parameter]:
        """Adapter `name`'s tensors in net, keyed by their net.named_parameters() path; key_as: that path with the
        adapter's name segment written as key_as (e.g. a second adapter's tensors under the keys the first one's
        would have in a separate copy of the network, so that checkpoints do not depend on where it lives)."""
        out = {}
        for path, p in net.named_parameters():
            if is_adapter_tensor(path, name):
                out[path if key_as is None else rename_adapter_path(path, name, key_as)] = p
        return out

    def add_adapter_copy(self, net: nn.Module, name: str, source: str = ADAPTER,
                         source_net: nn.Module | None = None) -> dict[str, nn.Parameter]:
        """A LoRA adapter `name` on every transformer in net with adapter `source`'s config and a copy of its current
        values, float32 and trainable (like _add_adapter_to). source_net: where `source` lives (default net itself,
        a second adapter; another network of the same architecture, e.g. the generator's adapter copied onto a
        teacher checkpoint's transformer). The active adapter and the other parameters' requires_grad flags are left
        as they were (on a transformer without adapters the copy is the active one). Returns
        adapter_parameters(net, name)."""
        source_net = net if source_net is None else source_net
        if name == source and source_net is net:
            raise BackendError(f"adapter {name!r}: a copy needs a name of its own")
        for m, s in zip(diffusers_models(net), diffusers_models(source_net), strict=True):
            if not (getattr(s, "_hf_peft_config_loaded", False) and source in s.peft_config):
                raise BackendError(f"{self.name}: no LoRA adapter {source!r} to copy (trained with --full-finetune?)")
            if name in (getattr(m, "peft_config", None) or {}):
                raise BackendError(f"{self.name}: adapter {name!r} exists already")
            st = adapter_state(m) if getattr(m, "_hf_peft_config_loaded", False) else None
            # peft draws the new adapter's gaussian init from the global stream: a copy must not move the run's draws
            devices = sorted({p.device.index or 0 for p in m.parameters() if p.device.type == "cuda"})
            with torch.random.fork_rng(devices=devices), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")   # two adapters: the aim
                m.add_adapter(copy.deepcopy(s.peft_config[source]), adapter_name=name)
            if st is not None:
                restore_adapter_state(m, st)   # add_adapter activated the new adapter and froze the source
            src = self.adapter_parameters(s, source)
            with torch.no_grad():
                for key, p in self.adapter_parameters(m, name, key_as=source).items():
                    p.data = src[key].detach().to(p.device).clone().float()
                    p.requires_grad_(True)
        return self.adapter_parameters(net, name)

    @contextlib.contextmanager
    def use_adapter(self, net: nn.Module, name: str) -> Iterator[nn.Module]:
        """Every transformer in net runs with adapter `name` (alone) for the block, with gradients where its tensors
        require them; the previous active adapter and every requires_grad flag come back afterwards (also on an
        exception). Backward passes through activations recomputed under gradient checkpointing must run inside
        the block too: the recomputation uses whichever adapter is active then."""
        models = diffusers_models(net)
        missing = [m for m in models if name not in getattr(m, "peft_config", {})]
        if missing:
            raise BackendError(f"{self.name}: no LoRA adapter {name!r} (see add_adapter_copy)")
        with switched_adapter(models, name):
            yield net

    def lora_state_dicts(self, net: nn.Module | None = None) -> list[dict[str, torch.Tensor]]:
        """peft state dicts (keys without the 'transformer.' prefix), one per transformer in net, full CPU
        tensors. Under FSDP2 the shards are gathered (a collective: call it on every rank)."""
        from peft.utils import get_peft_model_state_dict

        def full(v: torch.Tensor) -> torch.Tensor:
            v = v.detach()
            v = v.full_tensor() if hasattr(v, "full_tensor") else v      # DTensor shard -> whole tensor
            return v.cpu().contiguous()

        net = self.network if net is None else net
        return [{k: full(v) for k, v in get_peft_model_state_dict(m, adapter_name=ADAPTER).items()}
                for m in diffusers_models(net)]

    def save_lora(self, directory: str, net: nn.Module | None = None) -> list[str]:
        """Write the adapter in the diffusers LoRA format: directory/pytorch_lora_weights.safetensors (and
        directory/transformer_2/... for a Wan2.2 low-noise expert). Returns the files (to be) written.
        Under torch.distributed call it on every rank (FSDP2 shards are gathered); rank 0 writes."""
        net = self.network if net is None else net
        models = diffusers_models(net)
        if not all(has_adapter(m) for m in models):
            raise BackendError(f"{self.name}: no LoRA adapter to save (trained with --full-finetune?)")
        cls = type(self.pipe)
        files = []
        for i, (m, sd) in enumerate(zip(models, self.lora_state_dicts(net))):
            d = directory if i == 0 else os.path.join(directory, "transformer_2")
            meta = m.peft_config[ADAPTER].to_dict()
            cls.save_lora_weights(d, transformer_lora_layers=sd, safe_serialization=True,
                                  transformer_lora_adapter_metadata=meta, is_main_process=_is_rank0())
            files.append(os.path.join(d, LORA_WEIGHT_NAME))
        return files

    def load_lora(self, directory: str, net: nn.Module | None = None) -> None:
        """Load save_lora's files (or any diffusers-format transformer LoRA of matching targets) into net's
        adapter, replacing its values; the adapter stays trainable."""
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file
        net = self.network if net is None else net
        models = diffusers_models(net)
        for i, m in enumerate(models):
            f = os.path.join(directory if i == 0 else os.path.join(directory, "transformer_2"), LORA_WEIGHT_NAME)
            if not os.path.isfile(f):
                raise BackendError(f"no LoRA file {f}")
            sd = {k.removeprefix("transformer."): v for k, v in load_file(f).items()}
            if not has_adapter(m):
                self._add_adapter_to(m)
            res = set_peft_model_state_dict(m, sd, adapter_name=ADAPTER)
            unexpected = getattr(res, "unexpected_keys", None)
            if unexpected:
                raise BackendError(f"LoRA file {f} has {len(unexpected)} keys this {self.name} adapter lacks "
                                   f"(e.g. {unexpected[0]}): different targets or rank")

    def _add_adapter_to(self, m: nn.Module) -> None:
        m.add_adapter(self.lora_config(), adapter_name=ADAPTER)
        m.to(self.device)
        for n, p in m.named_parameters():
            if "lora_" in n:
                # LoRA factors in float32 when the base is bf16: updates of size 1e-4 vanish in bf16
                p.data = p.data.float()
                p.requires_grad_(True)

    # ----- distributed -------------------------------------------------------------------------------
    def fsdp_blocks(self, network: nn.Module | None = None) -> list[nn.Module]:
        """The FSDP2 wrap policy: the transformer blocks, each sharded on its own (then the root), for
        common.dist.wrap_fsdp2(net, backend.fsdp_blocks(net))."""
        net = self.network if network is None else network
        out: list[nn.Module] = []
        for m in diffusers_models(net):
            for attr in self.block_attrs:
                out.extend(getattr(m, attr, []))
        return out

    # ----- VAE ---------------------------------------------------------------------------------------
    def _vae_decode(self, z: torch.Tensor) -> torch.Tensor:
        """vae.decode on the VAE's device/dtype; differentiable in z."""
        vae = self.pipe.vae
        p = next(vae.parameters())
        return vae.decode(z.to(p.device, p.dtype), return_dict=False)[0]
