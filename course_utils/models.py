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

from course_utils.hardware import HardwareInfo, detect, preflight
from course_utils.profiles import Backend, Profile, resolve_profile

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
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_quant_storage=torch.bfloat16 if fsdp else torch.uint8,
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


def model_source(
    profile: str | Profile = "auto",
    *,
    stand_in: str | None = None,
    stand_in_dir: str | os.PathLike | None = None,
    hardware: HardwareInfo | None = None,
    load_in_4bit: bool | None = None,
) -> ModelSource:
    """The model id, precision and backend for ``profile``, and why. Builds the stand-in on
    ``cpu-tiny``; refuses early (:class:`~course_utils.hardware.PreflightError`) when the model will
    not fit, before any download."""
    hw = hardware or detect()
    prof = profile if isinstance(profile, Profile) else resolve_profile(profile, hardware=hw)
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


def point_unsloth_at_course_llama_cpp(environ=None) -> str:
    """Before ``import unsloth``: unless you chose your own, Unsloth's llama.cpp folder is the course's
    (``outputs/tools/llama.cpp-…``, lesson 06), read once at import. Returns the folder in effect."""
    from course_utils.gguf_export import default_tools_dir

    env = os.environ if environ is None else environ
    return env.setdefault("UNSLOTH_LLAMA_CPP_PATH", str(default_tools_dir()))


def load(
    profile: str | Profile = "auto",
    *,
    stand_in: str | None = None,
    stand_in_dir: str | os.PathLike | None = None,
    hardware: HardwareInfo | None = None,
    max_seq_length: int = 4096,
    load_in_4bit: bool | None = None,
) -> LoadedModel:
    """Load model + processor for ``profile`` and say what was chosen and why (lesson 01 shows the
    same calls as plain library code).

    ``stand_in`` picks the CPU stand-in (``tiny-mistral-small-3`` by default, or
    ``tiny-mistral-small-4``); ``load_in_4bit`` overrides the profile (QLoRA on CPU works through
    bitsandbytes, slowly).
    """
    import torch

    hw = hardware or detect()
    chosen = model_source(
        profile, stand_in=stand_in, stand_in_dir=stand_in_dir, hardware=hw, load_in_4bit=load_in_4bit
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
        kwargs.update(dtype=torch.bfloat16, device_map="auto")
    else:
        kwargs.update(dtype=torch.float32)  # bf16 matmuls are slow on most CPUs; the stand-in is small
    processor = AutoProcessor.from_pretrained(source)
    model = AutoModelForImageTextToText.from_pretrained(source, **kwargs)
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
