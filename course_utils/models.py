"""Load the model and processor a profile asks for — Unsloth on CUDA, transformers otherwise.

Backs lesson 01 (which shows the same loading as plain library code); later lessons import it.

The backend is decided from ``torch.cuda.is_available()`` and the profile *before* anything imports
``unsloth``: a successful ``import unsloth`` patches transformers' TrainingArguments, TRL's
SFTConfig/SFTTrainer and TRL's loss kernel, so it is a decision with effects, made once, here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from course_utils.hardware import HardwareInfo, detect, preflight, refuse_unfit_model
from course_utils.profiles import (
    DEFAULT_MODEL,
    MODELS,
    Backend,
    Profile,
    profile_for_model,
    resolve_model,
    resolve_profile,
)

# Keep the Pixtral tower, its projector and the output head in 16-bit when the language model is
# quantized (full module names: a bare "vision_tower" would not match inside Mistral3's wrapper).
SKIP_QUANTIZATION = ["model.vision_tower", "model.multi_modal_projector", "lm_head"]


@dataclass
class LoadedModel:
    model: object
    processor: object
    profile: Profile
    backend: Backend
    source: str  # a Hub id or a local directory
    reasons: list[str] = field(default_factory=list)

    @property
    def description(self) -> str:
        return "\n".join(f"- {r}" for r in self.reasons)

    def __iter__(self):  # `model, processor, description = load(...)`
        yield from (self.model, self.processor, self.description)


def choose_backend(profile: Profile, hardware: HardwareInfo) -> tuple[str, str]:
    """Which library loads the model, and why — without importing it."""
    if profile.backend == "unsloth" and hardware.accelerator == "cuda":
        return "unsloth", "CUDA GPU found: Unsloth's FastVisionModel (fused kernels, lower memory)."
    if hardware.accelerator == "cuda":
        return "transformers", "CUDA GPU found, profile asks for plain transformers."
    return "transformers", (
        f"No CUDA GPU ({hardware.accelerator.upper()}): transformers + peft, the same API Unsloth wraps. "
        "Unsloth is not imported, so transformers and TRL stay unpatched."
    )


def _quantization_config(environ=None):
    """NF4 with double quantization, bf16 compute. Under FSDP (accelerate sets ``ACCELERATE_USE_FSDP``
    in each process it launches) the packed 4-bit weights are stored as bf16 too: FSDP shards only
    parameters of one dtype, and bitsandbytes' default uint8 storage would leave them unsharded (peft's
    and bitsandbytes' FSDP-QLoRA recipe: ``bnb_4bit_quant_storage`` = the compute dtype)."""
    import torch
    from transformers import BitsAndBytesConfig

    env = os.environ if environ is None else environ
    fsdp = env.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")
    # fp16 on cards without bf16 (T4, V100), as the training presets do
    no_bf16 = torch.cuda.is_available() and not torch.cuda.is_bf16_supported()
    compute = torch.float16 if no_bf16 else torch.bfloat16
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=compute if fsdp else torch.uint8,
        llm_int8_skip_modules=SKIP_QUANTIZATION,
    )


@dataclass(frozen=True)
class ModelSource:
    """What a profile loads, decided before anything heavy is imported (lesson 01's loading cell)."""

    model_id: str  # a Hub id, or the stand-in's local folder
    load_in_4bit: bool
    backend: Backend
    profile: Profile
    reasons: tuple[str, ...]

    @property
    def tekken_file(self) -> Path | None:
        """The ``tekken.json`` mistral-common encodes this model's chat format with: the stand-in's own
        file, Small 4's from its Hub repository; None for Small 3.x (the v7 format over the shipped
        vocabulary, ``course_utils.chat.reference_token_ids``' default)."""
        local = Path(self.model_id) / "tekken.json"
        if local.is_file():
            return local
        if self.profile.model == DEFAULT_MODEL:
            return None
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(MODELS[self.profile.model].hf_id, "tekken.json"))


def model_source(
    profile: str | Profile = "auto",
    *,
    model: str | None = None,
    stand_in: str | None = None,
    stand_in_dir: str | os.PathLike | None = None,
    hardware: HardwareInfo | None = None,
    load_in_4bit: bool | None = None,
) -> ModelSource:
    """The model id, precision and backend for ``profile`` running ``model`` (a notebook's ``MODEL``;
    ``COURSE_MODEL`` overrides it, see :func:`~course_utils.profiles.resolve_model`), and why. Builds
    the stand-in on ``cpu-tiny``; refuses early (:class:`~course_utils.hardware.PreflightError`) when
    the model will not fit, before any download. ``stand_in`` names a stand-in outright."""
    hw = hardware or detect()
    if isinstance(profile, Profile):
        prof = profile if model is None else profile_for_model(profile, resolve_model(model))
    else:
        prof = resolve_profile(profile, hardware=hw, model=model)
    refuse_unfit_model(prof)
    preflight(prof, hw)
    backend, why = choose_backend(prof, hw)
    reasons = [f"Profile {prof.name!r}: {prof.description}", why]
    four_bit = prof.load_in_4bit if load_in_4bit is None else load_in_4bit
    if prof.is_stand_in:
        from course_utils.tiny import build_stand_in

        name = stand_in or prof.model_key
        source = str(build_stand_in(name, stand_in_dir))
        reasons.append(
            f"Stand-in {name!r} built offline at {Path(source).name}/ (random weights, real "
            "architecture, real Tekken tokenizer): outputs are gibberish, the code path is real."
        )
    else:
        source = prof.load_id
        reasons.append(f"Weights: {source} ({'4-bit NF4' if four_bit else '16-bit'}).")
    return ModelSource(source, four_bit, backend, prof, tuple(reasons))


def _device_map(environ) -> dict:
    """One process: spread the model over the GPUs. Several (``accelerate launch``): DDP puts each process's
    copy on its own GPU; FSDP wants no device map (accelerate places the shards)."""
    if int(environ.get("WORLD_SIZE", "1")) == 1:
        return {"device_map": "auto"}
    if environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes"):
        return {}
    return {"device_map": {"": int(environ.get("LOCAL_RANK", "0"))}}


def point_unsloth_at_course_llama_cpp(environ=None) -> str:
    """Before ``import unsloth``: unless you chose your own, Unsloth's llama.cpp folder is the course's
    (``outputs/tools/llama.cpp-…``, lesson 06), read once at import. Returns the folder in effect."""
    from course_utils.gguf_export import default_tools_dir

    env = os.environ if environ is None else environ
    return env.setdefault("UNSLOTH_LLAMA_CPP_PATH", str(default_tools_dir()))


def load(
    profile: str | Profile = "auto",
    *,
    model: str | None = None,
    stand_in: str | None = None,
    stand_in_dir: str | os.PathLike | None = None,
    hardware: HardwareInfo | None = None,
    max_seq_length: int = 4096,
    load_in_4bit: bool | None = None,
) -> LoadedModel:
    """Load model + processor for ``profile`` and say what was chosen and why (lesson 01 shows the
    same calls as plain library code).

    ``model`` is the family (``"mistral-small-3.2"`` or ``"mistral-small-4"``; ``COURSE_MODEL``
    overrides it): on ``cpu-tiny`` it picks the matching stand-in, which ``stand_in`` can name outright;
    ``load_in_4bit`` overrides the profile (QLoRA on CPU works through bitsandbytes, slowly).
    """
    import torch

    hw = hardware or detect()
    chosen = model_source(
        profile,
        model=model,
        stand_in=stand_in,
        stand_in_dir=stand_in_dir,
        hardware=hw,
        load_in_4bit=load_in_4bit,
    )
    prof, backend, source, four_bit = chosen.profile, chosen.backend, chosen.model_id, chosen.load_in_4bit
    reasons = list(chosen.reasons)

    if backend == "unsloth":
        point_unsloth_at_course_llama_cpp()
        from unsloth import FastVisionModel  # the one deliberate place the course imports unsloth

        model, processor = FastVisionModel.from_pretrained(
            source,
            load_in_4bit=four_bit,
            max_seq_length=max_seq_length,
            use_gradient_checkpointing="unsloth",
        )
        return LoadedModel(model, processor, prof, backend, source, reasons)

    from transformers import AutoModelForImageTextToText, AutoProcessor

    kwargs: dict = {}
    if four_bit:
        kwargs["quantization_config"] = _quantization_config()
        reasons.append(
            "bitsandbytes NF4 for the language model; vision tower, projector and lm_head stay 16-bit."
        )
    if hw.accelerator == "cuda":
        kwargs["dtype"] = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        kwargs.update(_device_map(os.environ))
    else:
        kwargs.update(dtype=torch.float32)  # bf16 matmuls are slow on most CPUs; the stand-in is small
    processor = AutoProcessor.from_pretrained(source)
    # safetensors only: a pickled pytorch_model.bin can run code when it is loaded
    model = AutoModelForImageTextToText.from_pretrained(source, use_safetensors=True, **kwargs)
    model.eval()
    return LoadedModel(model, processor, prof, backend, source, reasons)


def parameter_breakdown(model) -> dict[str, int]:
    """Parameters per component of a Mistral3 model (tied weights counted once)."""
    groups = {"vision tower": 0, "projector": 0, "language model": 0, "lm_head (untied)": 0}
    seen = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            continue
        seen.add(id(param))
        if "vision_tower" in name:
            groups["vision tower"] += param.numel()
        elif "multi_modal_projector" in name:
            groups["projector"] += param.numel()
        elif name.startswith("lm_head"):
            groups["lm_head (untied)"] += param.numel()
        else:
            groups["language model"] += param.numel()
    return groups
