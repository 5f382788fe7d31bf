"""One command that proves the course's GPU path on a CUDA machine without internet — never run in CI.

    python benchmarks/gpu_smoke.py --dry-run           # any machine: the plan, parameter counts, VRAM plan
    python benchmarks/gpu_smoke.py [--steps 20] [--stages build,train-unsloth:mistral-small-3.2,...]
                                   [--out outputs/gpu_smoke.json] [--overwrite]

It builds random-weight models from the course's registry (``course_utils.profiles.MODELS``) at reduced
depth — Mistral Small 3.2 width (hidden 5120, 32/8 heads, MLP 32768) with 3 decoder layers, Ministral 3 8B
width with 3, Small 4 with its 128 experts and MLA at 1 layer — each with the real Pixtral vision tower, the
stand-ins' processor (the real Tekken tokenizer) and the stand-ins' recipe code (``course_utils.tiny``).
Then it runs, as lessons 04–06 do on a GPU:

* lesson 04: Unsloth QLoRA (``FastVisionModel`` + ``UnslothVisionDataCollator`` + TRL ``SFTTrainer``,
  through ``course_utils.train.build_trainer``) for ``--steps`` steps on batches that each hold an image
  row and a text row, and transformers + peft (the course's other backend) on the same model and data;
* lesson 05: batched generation (``course_utils.chat.generate_batch``) with the tuned adapter;
* lesson 06: merge (``course_utils.export.merge_adapter``), GGUF bf16 + projector, template and bf16
  logit parity against the merged model on the GPU (``course_utils.gguf_verify``); and Unsloth's own
  ``save_pretrained_merged`` from the 4-bit model (the 24 GB card's way), compared with that merge.

Each stage runs in its own process: a failure (or a crash) is recorded and the next stage runs; exit code
1 if any stage failed or was skipped. One JSON (``--out``) holds per stage its status and seconds, peak VRAM
per training step, tokens/s, the Unsloth / transformers+peft ratios, and each decoder layer's measured
memory extrapolated to the full depth next to the course's VRAM planner
(``course_utils.memory.estimate_training_memory``). Offline: models are built here, the llama.cpp converter
comes from ``outputs/tools`` (or ``$LLAMA_CPP_DIR``) — fetch it once on a machine with internet
(``python -c "from course_utils.gguf_export import llama_cpp_tools; llama_cpp_tools()"``).

Not yet proven on a GPU: the H200 run of 2026-11-29 (``benchmarks/results/``) passed seven of the ten
stages; ``train-unsloth:mistral-small-4`` ran past its 120 s stage limit, ``train-unsloth:ministral-3-8b``
was skipped when the budget ran out, and ``train-peft:ministral-3-8b`` failed (a RoPE default, fixed
since, not re-run). With a short device lease run those first, e.g. ``--stages
build,train-unsloth:mistral-small-4,train-peft:ministral-3-8b,train-unsloth:ministral-3-8b
--stage-timeout 300 --budget 540``.

Backs lessons 04, 05 and 06 (it runs their GPU path).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

GiB = 1024**3
Backend = Literal["unsloth", "peft"]

# Depth built per model of the registry (the width, heads, experts and vocabulary are the real ones).
SMOKE_LAYERS: dict[str, int] = {"mistral-small-3.2": 3, "ministral-3-8b": 3, "mistral-small-4": 1}
MAIN_MODEL = "mistral-small-3.2"  # the gpu-24gb profile's model: generation and export run on it
PRESET_PROFILE = "gpu-24gb"  # lesson 04's QLoRA preset (r 16, batch 2, 2048 tokens, adamw_8bit)

# The Pixtral vision tower of Mistral Small 3.1/3.2 (config.json "vision_config" of
# https://huggingface.co/mistralai/Mistral-Small-3.1-24B-Instruct-2503, read 2026-11; ≈ 0.44B parameters
# with the projector, as profiles.MODELS says). image_size only bounds the 2-D RoPE; the stand-ins'
# processor resizes images to a 224-pixel longest edge, so image rows stay short.
PIXTRAL_VISION = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    head_dim=64,
    patch_size=14,
    image_size=1540,
)

STAGE_HELP = {
    "build": "random-weight models at reduced depth, saved as bf16 safetensors + the stand-in processor",
    "train-unsloth": "lesson 04 on CUDA: Unsloth QLoRA + UnslothVisionDataCollator + TRL SFTTrainer",
    "train-peft": "the same model and data with transformers + peft + bitsandbytes (course backend)",
    "generate": "lesson 05: generate_batch with the Unsloth adapter, image and text prompts mixed",
    "export": "lesson 06: merge, GGUF bf16 + projector, template and bf16 logit parity",
    "export-unsloth": "lesson 06 on 24 GB: Unsloth's save_pretrained_merged from the 4-bit model",
}
# Most telling first: when the time budget runs out, the stages left are the least important.
STAGES: tuple[str, ...] = (
    "build",
    f"train-unsloth:{MAIN_MODEL}",
    f"train-peft:{MAIN_MODEL}",
    "generate",
    "export",
    "export-unsloth",
    "train-unsloth:ministral-3-8b",
    "train-unsloth:mistral-small-4",
    "train-peft:mistral-small-4",
    "train-peft:ministral-3-8b",
)
GENERATE_PROMPTS = 16
GENERATE_NEW_TOKENS = 32
PARITY_CONVERSATIONS = 3
CHILD_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "UNSLOTH_DISABLE_STATISTICS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
}
PREFIX = "[gpu-smoke]"


class UsageError(ValueError):
    """Bad command-line input: reported as one line, exit code 2."""


class StageError(RuntimeError):
    """A stage ran but its check failed (the message says which and why)."""


# --- Pure helpers (unit-tested) ------------------------------------------------------------------


def parse_stages(text: str | None) -> tuple[str, ...]:
    """``--stages`` → stage names in run order; ``None``, ``""`` or ``"all"`` → every stage.

    Unknown names raise :class:`UsageError` listing the valid ones.
    """
    if text is None or text.strip() in ("", "all"):
        return STAGES
    wanted = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in STAGES]
    if unknown:
        raise UsageError(
            f"unknown stage {unknown[0]!r} in --stages {text!r}; choose from: all, {', '.join(STAGES)}"
        )
    return tuple(s for s in STAGES if s in wanted)


def stage_parts(stage: str) -> tuple[str, Backend | None, str | None]:
    """``"train-unsloth:mistral-small-4"`` → ``("train", "unsloth", "mistral-small-4")``."""
    if stage.startswith("train-"):
        kind, model = stage.split(":", 1)
        return "train", kind.removeprefix("train-"), model  # type: ignore[return-value]
    return stage, None, None


def interleave_modalities(records: list[dict], text_of) -> list[dict]:
    """Even positions keep their image, odd positions become text rows (``text_of(record)``): read in
    order (sequential sampling) with batch size 2, every batch holds one image row and one text row."""
    return [r if i % 2 == 0 else text_of(r) for i, r in enumerate(records)]


def extrapolate_to_full_depth(
    measured_bytes: float, built_layers: int, full_layers: int, per_layer_bytes: float
) -> float:
    """Peak memory of the full-depth model: what was measured at ``built_layers`` plus the memory one
    decoder layer adds (weights, adapters, gradients, optimizer state, kept activations) for each layer
    the smoke model does not have. Everything else (embeddings, lm_head, vision tower, the one layer being
    recomputed, CUDA context) does not grow with depth."""
    if built_layers < 1 or full_layers < built_layers:
        raise ValueError(f"need 1 ≤ built_layers ≤ full_layers, got {built_layers} and {full_layers}")
    if measured_bytes < 0 or per_layer_bytes < 0:
        raise ValueError("memory cannot be negative")
    return measured_bytes + (full_layers - built_layers) * per_layer_bytes


def relative_error_pct(estimate: float, measured: float) -> float:
    """``(estimate − measured) / measured`` in percent: positive when the planner over-estimates."""
    if measured <= 0:
        raise ValueError("measured must be positive")
    return 100.0 * (estimate - measured) / measured


def steady_tokens_per_s(steps: list[dict], skip: int = 1) -> float | None:
    """Training tokens per second over the steps after the first ``skip`` (compilation and warm-up)."""
    kept = steps[skip:] if len(steps) > skip else steps
    seconds = sum(s["seconds"] for s in kept)
    return sum(s["tokens"] for s in kept) / seconds if seconds > 0 else None


def backend_ratios(unsloth: dict, peft: dict) -> dict:
    """Unsloth vs transformers+peft on the same model and data (> 1: Unsloth is faster / leaner)."""

    def ratio(a, b):
        return round(a / b, 3) if a and b else None

    return {
        "speedup_tokens_per_s": ratio(unsloth.get("tokens_per_s"), peft.get("tokens_per_s")),
        "time_per_step_peft_over_unsloth": ratio(
            peft.get("seconds_per_step"), unsloth.get("seconds_per_step")
        ),
        "peak_reserved_unsloth_over_peft": ratio(
            unsloth.get("peak_reserved_gib"), peft.get("peak_reserved_gib")
        ),
        "full_depth_unsloth_over_peft": ratio(
            (unsloth.get("full_depth") or {}).get("extrapolated_gib"),
            (peft.get("full_depth") or {}).get("extrapolated_gib"),
        ),
    }


MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json", "README.md")


def processor_files(folder: Path) -> list[Path]:
    """A saved model folder's files minus the model's own (weights, configs, build record): the
    tokenizer, processor, chat template and, for Small 4, its ``tekken.json``."""
    from course_utils.tiny import BUILD_INFO_FILE

    skip = {*MODEL_FILES, BUILD_INFO_FILE}
    return sorted(
        f for f in Path(folder).iterdir() if f.is_file() and f.name not in skip and f.suffix != ".safetensors"
    )


# --- Models from the registry, through the stand-ins' recipe code --------------------------------


def stand_in_of(model_key: str) -> str:
    """The offline stand-in of the model's family (``course_utils.tiny``): its recipe and processor."""
    from course_utils.profiles import model_spec

    return "tiny-mistral-small-4" if model_spec(model_key).attention == "MLA" else "tiny-mistral-small-3"


def smoke_recipe(model_key: str, layers: int | None = None):
    """The stand-in recipe of the model's family (``course_utils.tiny.RECIPES``) at the real width of
    ``profiles.MODELS[model_key]``, ``layers`` decoder layers deep, with the real Pixtral tower."""
    from course_utils.profiles import model_spec
    from course_utils.tiny import RECIPES

    spec = model_spec(model_key)
    layers = SMOKE_LAYERS[model_key] if layers is None else layers
    family = RECIPES[stand_in_of(model_key)]
    text = dict(family.text)
    if spec.text_model_type != text["model_type"]:
        # The family's RoPE is not this model's (Ministral 3 divides positions by its YaRN window):
        # its config class's defaults are the real release's (Ministral3Config: Ministral-3-8B-2512).
        text.pop("rope_parameters", None)
    text.update(
        model_type=spec.text_model_type,
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.context_length,
        tie_word_embeddings=spec.tie_word_embeddings,
    )
    if spec.attention == "MLA":
        text.pop("intermediate_size", None)  # dense MLP width: unused, every Small 4 layer is MoE
        text.update(
            moe_intermediate_size=spec.intermediate_size,
            n_routed_experts=spec.num_experts,
            num_experts_per_tok=spec.experts_per_token,
            n_shared_experts=spec.shared_experts,
            kv_lora_rank=spec.kv_lora_rank,
            q_lora_rank=spec.q_lora_rank,
            qk_rope_head_dim=spec.qk_rope_head_dim,
            qk_nope_head_dim=spec.qk_nope_head_dim,
            v_head_dim=spec.v_head_dim,
        )
    else:
        text.update(intermediate_size=spec.intermediate_size, head_dim=spec.head_dim)
    return replace(family, name=f"smoke-{model_key}-{layers}l", text=text, vision=dict(PIXTRAL_VISION))


@dataclass(frozen=True)
class ModelPlan:
    """A smoke model's shape and parameter counts, computed on the meta device (nothing allocated)."""

    key: str
    layers_built: int
    layers_full: int
    text_model_type: str
    attention: str
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    num_experts: int | None
    parameters_built: int
    parameters_per_layer: int
    parameters_vision: int  # vision tower + projector
    parameters_full_depth: int
    registry_params_b: float

    def as_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


def plan_model(model_key: str, layers: int | None = None) -> ModelPlan:
    """Parameter counts of the smoke model and of the same model at full depth, from its config."""
    import torch
    from transformers import Mistral3ForConditionalGeneration

    from course_utils.models import parameter_breakdown
    from course_utils.profiles import model_spec
    from course_utils.tiny import build_config

    spec = model_spec(model_key)
    recipe = smoke_recipe(model_key, layers)
    with torch.device("meta"):
        model = Mistral3ForConditionalGeneration(build_config(recipe))
    groups = parameter_breakdown(model)
    built = sum(groups.values())
    per_layer = sum(p.numel() for p in model.model.language_model.layers[0].parameters())
    built_layers = recipe.text["num_hidden_layers"]
    return ModelPlan(
        key=model_key,
        layers_built=built_layers,
        layers_full=spec.num_layers,
        text_model_type=spec.text_model_type,
        attention=spec.attention,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        num_experts=spec.num_experts,
        parameters_built=built,
        parameters_per_layer=per_layer,
        parameters_vision=groups["vision tower"] + groups["projector"],
        parameters_full_depth=built + (spec.num_layers - built_layers) * per_layer,
        registry_params_b=spec.total_params_b,
    )


def smoke_preset(steps: int):
    """Lesson 04's QLoRA preset, one micro-batch per step (same peak memory, 4× fewer forward passes)."""
    from course_utils.train import preset_for

    return preset_for(
        PRESET_PROFILE,
        max_steps=steps,
        gradient_accumulation_steps=1,
        logging_steps=1,
        save_steps=10**6,
    )


def planner_estimate(
    model,
    backend: Backend,
    seq_len: int,
    batch_size: int,
    lora_r: int,
    optimizer: str,
    checkpointing: bool,
    experts_quantized: bool = False,
):
    """The course's VRAM planner for one backend: Unsloth offloads the checkpointed layer inputs to CPU
    RAM; both backends compute logits for the labelled positions only (Unsloth's fused loss, the course's
    ``response_only_loss``), so no full-vocabulary logits are kept. Small 4's 3-D expert weights stay
    16-bit under bitsandbytes 4-bit loading unless ``experts_quantized``. ``model``: a registry key or a
    ``memory.Architecture``."""
    import inspect

    from course_utils.memory import estimate_training_memory

    kwargs = dict(
        method="qlora",
        seq_len=max(1, int(seq_len)),
        batch_size=batch_size,
        lora_r=lora_r,
        gradient_checkpointing=checkpointing,
        optimizer=optimizer,
        offload_checkpoints=backend == "unsloth",
        fused_cross_entropy=True,
        backend="unsloth" if backend == "unsloth" else "transformers",
        quantize_moe_experts=experts_quantized,
    )
    accepted = inspect.signature(estimate_training_memory).parameters
    return estimate_training_memory(model, **{k: v for k, v in kwargs.items() if k in accepted})


def built_architecture(model_key: str, plan: ModelPlan):
    """The planner's view of the smoke model itself (same widths, the built depth and parameter count)."""
    from course_utils.memory import ARCHITECTURES

    full = ARCHITECTURES[model_key]
    changes = {
        "name": f"{model_key} ({plan.layers_built} layers)",
        "total_params": plan.parameters_built,
        "num_layers": plan.layers_built,
        "moe_expert_params": getattr(full, "moe_expert_params", 0) * plan.layers_built / plan.layers_full,
    }
    return replace(full, **{k: v for k, v in changes.items() if hasattr(full, k)})


def experts_quantized(model) -> bool:
    """Whether the MoE expert weights of the first decoder layer were quantized at load (bitsandbytes
    4-bit converts ``nn.Linear`` only: 3-D expert tensors stay 16-bit). ``True`` for dense models."""
    import torch

    _, layers = decoder_layers(model)
    experts = [p for name, p in layers[0].named_parameters() if ".experts." in f".{name}"]
    return all(p.dtype not in (torch.bfloat16, torch.float16, torch.float32) for p in experts)


# --- Dry run -------------------------------------------------------------------------------------


def outputs_base() -> Path:
    """``outputs/`` under the course root (or ``$COURSE_OUTPUTS``), as ``paths.outputs_dir`` — not created."""
    from course_utils.paths import OUTPUTS_ENV_VAR, course_root

    return Path(os.environ[OUTPUTS_ENV_VAR]) if os.environ.get(OUTPUTS_ENV_VAR) else course_root() / "outputs"


def converter_location() -> tuple[Path | None, str]:
    """Where lesson 06's llama.cpp converter would come from, without downloading it."""
    from course_utils.gguf_export import LLAMA_CPP_PYTHON, TOOLS_ENV_VAR

    if os.environ.get(TOOLS_ENV_VAR):
        own = Path(os.environ[TOOLS_ENV_VAR])
        return (own if (own / "convert_hf_to_gguf.py").is_file() else None), f"${TOOLS_ENV_VAR}={own}"
    cached = outputs_base() / "tools" / f"llama.cpp-{LLAMA_CPP_PYTHON}"
    return (cached if (cached / "convert_hf_to_gguf.py").is_file() else None), str(cached)


def models_for(stages: tuple[str, ...]) -> list[str]:
    needed = []
    for stage in stages:
        kind, _, model = stage_parts(stage)
        keys = list(SMOKE_LAYERS) if kind == "build" else [model or MAIN_MODEL]
        needed += [k for k in keys if k not in needed]
    return [k for k in SMOKE_LAYERS if k in needed]


def print_plan(stages: tuple[str, ...], steps: int) -> None:
    preset = smoke_preset(steps)
    print(f"{PREFIX} plan (dry run: no weights allocated, nothing written)")
    print(f"{PREFIX} stages ({len(stages)}):")
    for stage in stages:
        kind, backend, model = stage_parts(stage)
        help_key = f"train-{backend}" if kind == "train" else kind
        print(f"  {stage:<32} {STAGE_HELP[help_key]}")
    print(
        f"{PREFIX} training: {steps} steps, batch {preset.per_device_train_batch_size} "
        "(one image row + one text row each), "
        f"LoRA r {preset.lora_r}, ≤ {preset.max_seq_length} tokens, {preset.optim} ({PRESET_PROFILE} preset)"
    )
    for key in models_for(stages):
        plan = plan_model(key)
        experts = f", {plan.num_experts} experts" if plan.num_experts else ""
        print(
            f"{PREFIX} model {key}: {plan.layers_built} of {plan.layers_full} layers, "
            f"text {plan.text_model_type} ({plan.attention}{experts}), hidden {plan.hidden_size}, "
            f"heads {plan.num_attention_heads}/{plan.num_key_value_heads}, "
            f"intermediate {plan.intermediate_size}"
        )
        print(
            f"  parameters built: {plan.parameters_built:,}; "
            f"per decoder layer: {plan.parameters_per_layer:,}; "
            f"vision tower + projector: {plan.parameters_vision:,}"
        )
        print(
            f"  at full depth: {plan.parameters_full_depth / 1e9:.2f}B "
            f"(registry: {plan.registry_params_b:g}B); bf16 files of the smoke model: "
            f"{plan.parameters_built * 2 / GiB:.1f} GiB"
        )
        for backend in ("unsloth", "peft"):
            checkpointing = backend == "unsloth"  # the course's peft Trainer runs without checkpointing
            args = (backend, preset.max_seq_length, preset.per_device_train_batch_size, preset.lora_r)
            full = planner_estimate(key, *args, preset.optim, checkpointing)
            built = planner_estimate(built_architecture(key, plan), *args, preset.optim, checkpointing)
            print(
                f"  VRAM planner, {backend:<7} at {preset.max_seq_length} tokens: full depth "
                f"{full.total_gib:.1f} GiB, smoke model {built.total_gib:.1f} GiB"
            )
    where, label = converter_location()
    print(
        f"{PREFIX} llama.cpp converter for export: "
        + (f"found at {where}" if where else f"NOT found at {label} (the export stage will fail offline)")
    )


# --- Stage processes -----------------------------------------------------------------------------


def say(text: str) -> None:
    print(f"{PREFIX} {text}", flush=True)


def gib(n_bytes: float) -> float:
    return round(n_bytes / GiB, 3)


def device_info() -> dict:
    import torch

    props = torch.cuda.get_device_properties(0)
    return {
        "gpu": props.name,
        "vram_gib": gib(props.total_memory),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "bf16": torch.cuda.is_bf16_supported(),
    }


def ensure_model(model_key: str, work_dir: Path, device: str = "cuda") -> tuple[Path, bool]:
    """Build (or reuse, when the recipe fingerprint matches) the smoke model in ``work_dir/models``.

    Weights are created on the GPU in bf16 (a Small 3.2 layer is 1.1 GB) and saved with ``save_pretrained``
    beside the stand-in's processor files (copied from the built stand-in), so every loader reads them as
    it reads a Hub checkpoint.
    """
    from course_utils.export import disk_preflight
    from course_utils.paths import staged
    from course_utils.tiny import BUILD_INFO_FILE, build_config, build_stand_in, stand_in_info

    stand_in = build_stand_in(stand_in_of(model_key))  # cached; its processor is the one we ship
    recipe = smoke_recipe(model_key)
    fingerprint = f"{recipe.fingerprint()}-{stand_in_info(stand_in)['fingerprint']}"
    target = work_dir / "models" / recipe.name
    info_file = target / BUILD_INFO_FILE
    if info_file.is_file():
        try:
            if json.loads(info_file.read_text()).get("fingerprint") == fingerprint:
                return target, False
        except json.JSONDecodeError:
            pass
    import torch
    from transformers import GenerationConfig, Mistral3ForConditionalGeneration

    config = build_config(recipe)
    torch.manual_seed(recipe.seed)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = Mistral3ForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default_dtype)
    model.eval()
    parameters = sum(p.numel() for p in model.parameters())
    target.parent.mkdir(parents=True, exist_ok=True)
    disk_preflight(target.parent, parameters * 2)
    model.generation_config = GenerationConfig(
        bos_token_id=1, eos_token_id=2, pad_token_id=11, do_sample=False, max_new_tokens=256
    )
    with staged(target, overwrite=True, folder=True) as tmp:
        model.save_pretrained(tmp)
        for file in processor_files(stand_in):
            shutil.copy2(file, tmp / file.name)
        info = {
            "name": recipe.name,
            "fingerprint": fingerprint,
            "num_params": parameters,
            "stand_in": stand_in.name,
        }
        (tmp / BUILD_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return target, True


def load_model(model_dir: Path, backend: Backend, max_seq_length: int):
    """What ``course_utils.models.load`` does for a GPU profile, for a local folder (its preflight sizes
    the real checkpoint, which the smoke model is not): Unsloth 4-bit, or transformers + bitsandbytes NF4
    with the vision tower, projector and lm_head kept in 16-bit."""
    import torch

    if backend == "unsloth":
        from unsloth import FastVisionModel

        return FastVisionModel.from_pretrained(
            str(model_dir),
            load_in_4bit=True,
            max_seq_length=max_seq_length,
            use_gradient_checkpointing="unsloth",
        )
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from course_utils.models import _quantization_config

    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(
        model_dir, quantization_config=_quantization_config(), dtype=torch.bfloat16, device_map="auto"
    )
    return model, processor


def smoke_records(split: str, count: int) -> list[dict]:
    from course_utils.receipts import as_text_record, load_local

    rows = load_local(split)
    rows = (rows * math.ceil(count / len(rows)))[:count]
    return interleave_modalities(rows, as_text_record)


def decoder_layers(model):
    """The language model and its decoder layers (under peft's and Unsloth's wrappers alike)."""
    import torch

    for name, module in model.named_modules():
        if name.endswith("language_model.layers") and isinstance(module, torch.nn.ModuleList):
            parent = model.get_submodule(name.rsplit(".", 1)[0])
            return parent, list(module)
    raise StageError("no language_model.layers in the model: is it a Mistral3 vision model?")


def tensor_bytes(tensor) -> int:
    return tensor.numel() * tensor.element_size()


def quant_state_bytes(state) -> int:
    """The scales bitsandbytes keeps beside a 4-bit weight (absmax, code, and the nested ones)."""
    import torch

    total = 0
    for attr in ("absmax", "code", "offset"):
        value = getattr(state, attr, None)
        if isinstance(value, torch.Tensor):
            total += tensor_bytes(value)
    nested = getattr(state, "state2", None)
    return total + (quant_state_bytes(nested) if nested is not None else 0)


def layer_memory_bytes(model, optimizer) -> list[int]:
    """Bytes each decoder layer holds on the GPU, measured from its tensors: weights as stored (4-bit codes
    + scales, or bf16 experts), LoRA weights, their gradients and the optimizer's state for them."""
    import torch

    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
    states = getattr(inner, "state", {}) if inner is not None else {}
    _, layers = decoder_layers(model)
    out = []
    for layer in layers:
        total = sum(tensor_bytes(b) for b in layer.buffers())
        for param in layer.parameters():
            total += tensor_bytes(param)
            if getattr(param, "quant_state", None) is not None:
                total += quant_state_bytes(param.quant_state)
            if param.requires_grad:
                total += tensor_bytes(param)  # its gradient, same shape and dtype
                for value in states.get(param, {}).values():
                    if isinstance(value, torch.Tensor):
                        total += tensor_bytes(value)
        out.append(total)
    return out


class LayerActivationProbe:
    """Memory each decoder layer's forward leaves allocated for the backward pass (its saved activations
    and output), measured with hooks during the model's forward — not during checkpoint recomputation,
    which runs the layers again without the language model's own forward around them."""

    def __init__(self, model, memory_allocated=None):
        import torch

        self._torch = torch
        self._allocated = memory_allocated or torch.cuda.memory_allocated
        self.per_forward: list[float] = []  # mean retained bytes per layer, one entry per forward
        self._armed = False
        self._current: list[int] = []
        self._before = 0
        language_model, layers = decoder_layers(model)
        self.handles = [
            language_model.register_forward_pre_hook(self._arm),
            language_model.register_forward_hook(self._disarm),
        ]
        for layer in layers:
            self.handles += [
                layer.register_forward_pre_hook(self._enter),
                layer.register_forward_hook(self._exit),
            ]

    def _compiling(self) -> bool:
        return self._torch.compiler.is_compiling()

    def _arm(self, module, args):
        if not self._compiling() and self._torch.is_grad_enabled():
            self._armed, self._current = True, []

    def _disarm(self, module, args, output):
        if self._armed and self._current:
            self.per_forward.append(sum(self._current) / len(self._current))
        self._armed = False

    def _enter(self, module, args):
        if self._armed and not self._compiling():
            self._before = self._allocated()

    def _exit(self, module, args, output):
        if self._armed and not self._compiling():
            self._current.append(self._allocated() - self._before)

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def step_recorder():
    """A TrainerCallback recording, per optimizer step: seconds, input tokens, peak VRAM and loss."""
    import torch
    from transformers import TrainerCallback

    class StepRecorder(TrainerCallback):
        def __init__(self):
            self.steps: list[dict] = []
            self._t0 = 0.0
            self._tokens = 0

        def on_step_begin(self, args, state, control, **kwargs):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._tokens = state.num_input_tokens_seen or 0
            self._t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            torch.cuda.synchronize()
            self.steps.append(
                {
                    "step": state.global_step,
                    "seconds": round(time.perf_counter() - self._t0, 4),
                    "tokens": int((state.num_input_tokens_seen or 0) - self._tokens),
                    "peak_allocated_gib": gib(torch.cuda.max_memory_allocated()),
                    "peak_reserved_gib": gib(torch.cuda.max_memory_reserved()),
                }
            )

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.steps and logs and "loss" in logs:
                self.steps[-1]["loss"] = round(float(logs["loss"]), 4)

    return StepRecorder()


def stage_build(ctx: dict, result: dict) -> None:
    result["models"] = {}
    for key in SMOKE_LAYERS:
        started = time.perf_counter()
        say(f"building {key} ({SMOKE_LAYERS[key]} layers) …")
        path, built = ensure_model(key, ctx["work_dir"])
        result["models"][key] = {
            "path": str(path),
            "built": built,
            "seconds": round(time.perf_counter() - started, 1),
            "bytes_on_disk": sum(f.stat().st_size for f in path.glob("*.safetensors")),
        }


def stage_train(ctx: dict, result: dict, backend: Backend, model_key: str) -> None:
    if backend == "unsloth":
        import unsloth  # noqa: F401  - first, before transformers/TRL objects exist: it patches them

    import torch

    from course_utils.train import build_trainer, save_adapter, training_card

    work_dir: Path = ctx["work_dir"]
    model_dir, built = ensure_model(model_key, work_dir)
    result["model_built_now"] = built
    preset = smoke_preset(ctx["steps"])
    batch = preset.per_device_train_batch_size
    records = smoke_records("train", ctx["steps"] * batch)
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    model, processor = load_model(model_dir, backend, preset.max_seq_length)
    result["load_seconds"] = round(time.perf_counter() - started, 1)
    result["after_load_allocated_gib"] = gib(torch.cuda.memory_allocated())
    say(f"{backend}: loaded {model_key} in {result['load_seconds']} s; building the trainer …")
    recorder = step_recorder()
    run = build_trainer(
        model,
        processor,
        records,
        None,
        preset,
        work_dir / "runs" / f"{backend}-{model_key}",
        backend="unsloth" if backend == "unsloth" else "transformers",
        callbacks=[recorder],
        progress=False,
    )
    run.trainer.args.train_sampling_strategy = "sequential"  # keep each batch one image + one text row
    probe = LayerActivationProbe(run.model)
    say(f"{backend}: training {ctx['steps']} steps …")
    started = time.perf_counter()
    try:
        output = run.trainer.train()
    finally:
        probe.close()
    seconds = time.perf_counter() - started
    steps = recorder.steps
    result.update(
        backend=backend,
        model=model_key,
        train_seconds=round(seconds, 1),
        steps=len(steps),
        batch_size=batch,
        rows={
            "image": sum(1 for r in records if r["images"]),
            "text": sum(1 for r in records if not r["images"]),
        },
        train_loss=round(float(output.training_loss), 4),
        trainable_parameters=run.trainable_parameters,
        total_parameters=run.total_parameters,
        per_step=steps,
        tokens=int(run.trainer.state.num_input_tokens_seen or 0),
        gradient_checkpointing=backend == "unsloth" or bool(run.trainer.args.gradient_checkpointing),
    )
    adapter_dir = work_dir / "adapters" / f"{backend}-{model_key}"  # first: generate and export need it
    save_adapter(
        run, adapter_dir, training_card(run, {"train_loss": result["train_loss"]}, seconds), overwrite=True
    )
    result["adapter"] = str(adapter_dir)
    if not steps:  # the step callbacks never fired: whole-run figures instead of per-step ones
        result["notes"] = ["no per-step figures: the trainer did not call on_step_begin/on_step_end"]
        steps = [
            {
                "step": len(records) // batch,
                "seconds": seconds,
                "tokens": result["tokens"],
                "peak_allocated_gib": gib(torch.cuda.max_memory_allocated()),
                "peak_reserved_gib": gib(torch.cuda.max_memory_reserved()),
            }
        ]
    result["tokens_per_s"] = round(steady_tokens_per_s(steps) or 0.0, 1)
    kept = steps[1:] or steps  # without the first step (compilation and warm-up)
    result["seconds_per_step"] = round(sum(s["seconds"] for s in kept) / len(kept), 4)
    result["peak_allocated_gib"] = max(s["peak_allocated_gib"] for s in steps)
    result["peak_reserved_gib"] = max(s["peak_reserved_gib"] for s in steps)

    layer_bytes = layer_memory_bytes(run.model, run.trainer.optimizer)
    activation = max(probe.per_forward, default=None)
    per_layer = sum(layer_bytes) / len(layer_bytes) + (activation or 0)
    result["per_layer"] = {
        "weights_and_training_state_gib": gib(sum(layer_bytes) / len(layer_bytes)),
        "kept_activations_gib": gib(activation) if activation is not None else None,
        "total_gib": gib(per_layer),
    }
    from course_utils.profiles import model_spec

    plan = plan_model(model_key)
    # the longest padded row trained on (the planner's seq_len); the preset's limit if tokens went uncounted
    longest = max(s["tokens"] for s in steps) // batch or preset.max_seq_length
    result["experts_quantized"] = experts_quantized(run.model)
    planner_args = (
        backend,
        longest,
        batch,
        preset.lora_r,
        preset.optim,
        result["gradient_checkpointing"],
        result["experts_quantized"],
    )
    full_plan = planner_estimate(model_key, *planner_args)
    built_plan = planner_estimate(built_architecture(model_key, plan), *planner_args)
    extrapolated = extrapolate_to_full_depth(
        result["peak_reserved_gib"] * GiB, plan.layers_built, model_spec(model_key).num_layers, per_layer
    )
    result["full_depth"] = {
        "layers": plan.layers_full,
        "seq_len": longest,
        "extrapolated_gib": gib(extrapolated),
        "planner_gib": round(full_plan.total_gib, 3),
        "planner_error_pct": round(relative_error_pct(full_plan.total_gib * GiB, extrapolated), 1),
        "planner_breakdown": full_plan.as_dict(),
    }
    result["built_depth_planner"] = {
        "planner_gib": round(built_plan.total_gib, 3),
        "planner_error_pct": round(relative_error_pct(built_plan.total_gib, result["peak_reserved_gib"]), 1),
    }
    say(
        f"{backend}: {result['tokens_per_s']} tokens/s, peak reserved {result['peak_reserved_gib']} GiB, "
        f"full depth ≈ {result['full_depth']['extrapolated_gib']} GiB "
        f"(planner {result['full_depth']['planner_gib']} GiB)"
    )


def main_adapter(work_dir: Path) -> Path:
    adapter = work_dir / "adapters" / f"unsloth-{MAIN_MODEL}"
    if not (adapter / "adapter_model.safetensors").is_file():
        raise StageError(f"no adapter at {adapter}: run the stage train-unsloth:{MAIN_MODEL} first")
    return adapter


def stage_generate(ctx: dict, result: dict) -> None:
    from unsloth import FastVisionModel  # noqa: I001 - first: it patches transformers (lesson 05 on a GPU)
    import torch

    from course_utils.chat import generate_batch
    from course_utils.evaluate import load_tuned, prompts_of

    work_dir: Path = ctx["work_dir"]
    adapter = main_adapter(work_dir)
    model_dir, _ = ensure_model(MAIN_MODEL, work_dir)
    model, processor = load_model(model_dir, "unsloth", smoke_preset(ctx["steps"]).max_seq_length)
    tuned = load_tuned(model, adapter)
    FastVisionModel.for_inference(tuned)
    records = smoke_records("test", GENERATE_PROMPTS)
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    replies = generate_batch(
        tuned,
        processor,
        prompts_of(records),
        max_new_tokens=GENERATE_NEW_TOKENS,
        batch_size=8,
        progress=False,
    )
    seconds = time.perf_counter() - started
    tokens = sum(len(processor.tokenizer(r, add_special_tokens=False)["input_ids"]) for r in replies)
    result.update(
        prompts=len(replies),
        image_prompts=sum(1 for r in records if r["images"]),
        batch_size=8,
        max_new_tokens=GENERATE_NEW_TOKENS,
        seconds=round(seconds, 2),
        reply_tokens=tokens,
        reply_tokens_per_s=round(tokens / seconds, 1) if seconds > 0 else None,
        peak_reserved_gib=gib(torch.cuda.max_memory_reserved()),
    )
    if len(replies) != len(records):
        raise StageError(f"generate_batch returned {len(replies)} replies for {len(records)} prompts")
    say(f"generate: {len(replies)} replies in {seconds:.1f} s")


def stage_export(ctx: dict, result: dict) -> None:
    import gc

    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from course_utils.export import merge_adapter
    from course_utils.gguf_export import convert_to_gguf, llama_cpp_tools, read_gguf_kv
    from course_utils.gguf_verify import logit_parity, open_gguf, template_parity, within_tolerance
    from course_utils.receipts import as_text_record, load_local

    work_dir: Path = ctx["work_dir"]
    adapter = main_adapter(work_dir)
    tools = llama_cpp_tools()
    model_dir, _ = ensure_model(MAIN_MODEL, work_dir)
    export_dir = work_dir / "export"
    shutil.rmtree(export_dir, ignore_errors=True)
    export_dir.mkdir(parents=True)

    def timed(name, fn):
        started = time.perf_counter()
        value = fn()
        result.setdefault("seconds", {})[name] = round(time.perf_counter() - started, 1)
        return value

    processor = AutoProcessor.from_pretrained(model_dir)
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    # lesson 06 on CUDA (the gpu-80gb plan): the 16-bit base on the GPU, the adapter merged into it in
    # place — no second full copy
    base = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.bfloat16, device_map="cuda")
    merged_dir = merge_adapter(base, processor, adapter, export_dir / "merged")
    result.setdefault("seconds", {})["load_16bit_and_merge"] = round(time.perf_counter() - started, 1)
    result["merge_peak_reserved_gib"] = gib(torch.cuda.max_memory_reserved())
    del base
    gc.collect()
    torch.cuda.empty_cache()
    say("export: merged; converting to GGUF …")
    gguf = timed(
        "convert_bf16",
        lambda: convert_to_gguf(merged_dir, export_dir / "model-bf16.gguf", outtype="bf16", tools=tools),
    )
    mmproj = timed(
        "convert_mmproj",
        lambda: convert_to_gguf(
            merged_dir, export_dir / "mmproj-f16.gguf", outtype="f16", mmproj=True, tools=tools
        ),
    )
    result["gguf_bytes"] = gguf.stat().st_size
    result["mmproj_architecture"] = read_gguf_kv(mmproj, "general.architecture")
    merged = AutoModelForImageTextToText.from_pretrained(merged_dir, dtype=torch.bfloat16, device_map="cuda")
    merged.eval()
    # as lesson 06: text prompts (the GGUF holds the language model; images go through the projector)
    conversations = [as_text_record(r)["messages"][:-1] for r in load_local("val")[:PARITY_CONVERSATIONS]]
    longest = max(
        processor.apply_chat_template(c, tokenize=True, return_dict=True, return_tensors="pt")[
            "input_ids"
        ].shape[1]
        for c in conversations
    )
    llm = open_gguf(gguf, n_ctx=256 * math.ceil((longest + 16) / 256), logits_all=True)
    try:
        parity = timed("logit_parity", lambda: logit_parity(llm, merged, processor, conversations))
        template = template_parity(llm, processor, conversations)
    finally:
        llm.close()
    gguf.unlink()  # 6 GiB the later stages do not need (a 64 GiB disk holds the models, merges and this)
    result["logit_parity_bf16"] = parity
    result["template_mismatches"] = template
    result["within_tolerance"] = within_tolerance(parity, "BF16")
    say(f"export: bf16 parity {parity}")
    problems = []
    if not result["within_tolerance"]:
        problems.append(f"bf16 logits outside the lesson's tolerance: {parity}")
    if template:
        problems.append(f"{len(template)} conversations tokenized differently by llama.cpp: {template[:1]}")
    if result["mmproj_architecture"] != "clip":
        problems.append(f"projector GGUF architecture is {result['mmproj_architecture']!r}, not 'clip'")
    if problems:
        raise StageError("; ".join(problems))


def merge_deltas(base_dir: Path, first: Path, second: Path, limit: int = 8) -> dict:
    """How two merges of the same adapter agree: for up to ``limit`` decoder weights both folders hold
    (same tensor name), the cosine between their updates (merged − base) and the ratio of their norms."""
    import torch
    from safetensors import safe_open

    def tensors(folder: Path) -> dict[str, tuple[Path, str]]:
        found = {}
        for file in sorted(folder.glob("*.safetensors")):
            with safe_open(str(file), "pt") as handle:
                found.update({name: (file, name) for name in handle.keys()})
        return found

    def read(where: tuple[Path, str]):
        with safe_open(str(where[0]), "pt") as handle:
            return handle.get_tensor(where[1]).float()

    base, a, b = tensors(base_dir), tensors(first), tensors(second)
    names = [n for n in sorted(a) if n in b and n in base and ".layers." in n and "_proj.weight" in n]
    rows = []
    for name in names[:limit]:
        reference = read(base[name])
        # float64: float32 sums over a 5120 × 32768 weight drift past 1 (1.0076 … 1.0264 on the H200)
        da, db = (read(a[name]) - reference).double(), (read(b[name]) - reference).double()
        cosine = torch.nn.functional.cosine_similarity(da.flatten(), db.flatten(), dim=0).item()
        rows.append(
            {
                "tensor": name,
                "cosine": round(cosine, 4),
                "norm_ratio": round((da.norm() / db.norm()).item(), 4),
            }
        )
    return {"compared": len(rows), "common_names": len(names), "tensors": rows}


def stage_export_unsloth(ctx: dict, result: dict) -> None:
    from unsloth import FastVisionModel  # noqa: I001 - first: it patches transformers
    import torch

    work_dir: Path = ctx["work_dir"]
    adapter = main_adapter(work_dir)
    model_dir, _ = ensure_model(MAIN_MODEL, work_dir)  # the base the adapter names
    out = work_dir / "export-unsloth"
    shutil.rmtree(out, ignore_errors=True)
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    model, processor = FastVisionModel.from_pretrained(
        str(adapter), load_in_4bit=True, max_seq_length=smoke_preset(ctx["steps"]).max_seq_length
    )
    result["load_seconds"] = round(time.perf_counter() - started, 1)
    started = time.perf_counter()
    model.save_pretrained_merged(str(out / "merged"), processor, save_method="merged_16bit")
    result["merge_seconds"] = round(time.perf_counter() - started, 1)
    result["peak_reserved_gib"] = gib(torch.cuda.max_memory_reserved())
    result["merged_bytes"] = sum(f.stat().st_size for f in (out / "merged").glob("*.safetensors"))
    peft_merge = work_dir / "export" / "merged"
    if peft_merge.is_dir():  # the export stage's peft merge of the same adapter
        result["vs_peft_merge"] = merge_deltas(model_dir, out / "merged", peft_merge)
    shutil.rmtree(out / "merged")  # measured and compared: free the disk for the stages after this one
    say(f"export-unsloth: merged in {result['merge_seconds']} s")


def run_child(stage: str, work_dir: Path, steps: int, result_path: Path) -> int:
    """Run one stage in this process and write ``{"result": …, "error": …}`` to ``result_path``."""
    for key, value in CHILD_ENV.items():
        os.environ.setdefault(key, value)
    ctx = {"work_dir": work_dir, "steps": steps}
    result: dict = {}
    error = None
    try:
        kind, backend, model = stage_parts(stage)
        if kind == "build":
            stage_build(ctx, result)
        elif kind == "train":
            stage_train(ctx, result, backend, model)  # type: ignore[arg-type]
        elif kind == "generate":
            stage_generate(ctx, result)
        elif kind == "export":
            stage_export(ctx, result)
        elif kind == "export-unsloth":
            stage_export_unsloth(ctx, result)
        else:
            raise StageError(f"unknown stage {stage!r}")
        result["device"] = device_info()
    except Exception as exc:  # recorded, not raised: the parent moves on to the next stage
        error = {
            "message": f"{type(exc).__name__}: {exc}".strip(),
            "traceback_tail": traceback.format_exc().splitlines()[-12:],
        }
    result_path.write_text(json.dumps({"result": result, "error": error}, indent=1, default=str))
    return 1 if error else 0


# --- The orchestrating process -------------------------------------------------------------------


def run_stage_process(stage: str, work_dir: Path, steps: int, timeout: float) -> dict:
    """The stage in a child process (its own CUDA context and process group), bounded by ``timeout``."""
    result_path = work_dir / "stage-results" / f"{stage.replace(':', '-')}.json"
    result_path.parent.mkdir(parents=True, exist_ok=True)
    result_path.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child-stage",
        stage,
        "--work-dir",
        str(work_dir),
        "--steps",
        str(steps),
        "--child-result",
        str(result_path),
    ]
    started = time.perf_counter()
    # cwd: Unsloth writes unsloth_compiled_cache/ and its merge buffers into the working directory
    process = subprocess.Popen(cmd, env={**os.environ, **CHILD_ENV}, cwd=work_dir, start_new_session=True)
    timed_out = False
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        _stop_group(process)
    except KeyboardInterrupt:
        _stop_group(process)
        raise
    seconds = round(time.perf_counter() - started, 1)
    record = {"name": stage, "seconds": seconds}
    payload = json.loads(result_path.read_text()) if result_path.is_file() else None
    if timed_out:
        record.update(status="failed", error=f"timed out after {timeout:.0f} s (stage process stopped)")
    elif payload is None:
        record.update(status="failed", error=f"stage process exited with {process.returncode} and no result")
    elif payload["error"]:
        record.update(
            status="failed", error=payload["error"]["message"], traceback=payload["error"]["traceback_tail"]
        )
    else:
        record["status"] = "ok"
    record["result"] = (payload or {}).get("result", {})
    return record


def _stop_group(process: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def summarize(records: list[dict]) -> dict:
    """Cross-stage figures: the Unsloth / transformers+peft ratios per model trained both ways."""
    by_name = {r["name"]: r for r in records if r["status"] == "ok"}
    ratios = {}
    for key in SMOKE_LAYERS:
        unsloth, peft = by_name.get(f"train-unsloth:{key}"), by_name.get(f"train-peft:{key}")
        if unsloth and peft:
            ratios[key] = backend_ratios(unsloth["result"], peft["result"])
    return {"unsloth_vs_peft": ratios}


def write_report(path: Path, report: dict) -> None:
    from course_utils.paths import atomic_write

    atomic_write(path, json.dumps(report, indent=1, default=str) + "\n", overwrite=True)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's own prints the usage first)
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="gpu_smoke.py",
        description="Prove the course's GPU path (lessons 04-06) on random-weight models of the real widths.",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit (any machine)")
    parser.add_argument("--stages", default="all", help=f"comma-separated subset of: {', '.join(STAGES)}")
    parser.add_argument(
        "--steps", type=int, default=20, help="training steps per training stage (default 20)"
    )
    parser.add_argument("--out", default=None, help="the JSON report (default outputs/gpu_smoke.json)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    parser.add_argument(
        "--work-dir", default=None, help="models, adapters, exports (default outputs/gpu_smoke)"
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=480,
        help="seconds for all stages (default 480); later stages are skipped",
    )
    parser.add_argument(
        "--stage-timeout", type=float, default=240, help="seconds one stage may take (default 240)"
    )
    parser.add_argument("--child-stage", help=argparse.SUPPRESS)
    parser.add_argument("--child-result", help=argparse.SUPPRESS)
    return parser


def parse_args(argv: list[str] | None):
    args = build_parser().parse_args(argv)
    args.stage_list = parse_stages(args.stages)
    if args.steps < 2:
        raise UsageError(
            f"--steps must be at least 2 (the first step includes compilation), got {args.steps}"
        )
    if args.budget <= 0 or args.stage_timeout <= 0:
        raise UsageError("--budget and --stage-timeout must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except UsageError as exc:
        print(f"gpu_smoke.py: error: {exc} (see --help)", file=sys.stderr)
        return 2
    if args.child_stage:
        return run_child(args.child_stage, Path(args.work_dir), args.steps, Path(args.child_result))
    if args.dry_run:
        print_plan(args.stage_list, args.steps)
        return 0

    out = (Path(args.out) if args.out else outputs_base() / "gpu_smoke.json").resolve()
    if out.exists() and not args.overwrite:
        print(f"gpu_smoke.py: error: {out} exists; pass --overwrite or another --out", file=sys.stderr)
        return 2
    import torch

    if not torch.cuda.is_available():
        print(
            "gpu_smoke.py: no CUDA GPU here (torch.cuda.is_available() is False): this smoke test needs one; "
            "--dry-run prints the plan on any machine",
            file=sys.stderr,
        )
        return 2
    work_dir = (Path(args.work_dir) if args.work_dir else outputs_base() / "gpu_smoke").resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "script": "benchmarks/gpu_smoke.py",
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": {
            "steps": args.steps,
            "stages": list(args.stage_list),
            "layers": SMOKE_LAYERS,
            "preset": PRESET_PROFILE,
            "budget_s": args.budget,
            "work_dir": str(work_dir),
        },
        "stages": [],
    }
    started = time.perf_counter()
    for index, stage in enumerate(args.stage_list, 1):
        left = args.budget - (time.perf_counter() - started)
        if left < 30:
            report["stages"].append(
                {
                    "name": stage,
                    "status": "skipped",
                    "seconds": 0,
                    "error": f"time budget ({args.budget:.0f} s) spent",
                }
            )
            say(f"[{index}/{len(args.stage_list)}] {stage}: skipped (time budget spent)")
            continue
        say(f"[{index}/{len(args.stage_list)}] {stage} …")
        record = run_stage_process(stage, work_dir, args.steps, min(args.stage_timeout, left))
        report["stages"].append(record)
        line = f"[{index}/{len(args.stage_list)}] {stage}: {record['status']} in {record['seconds']} s"
        say(line + (f" — {record['error'].splitlines()[0][:300]}" if record.get("error") else ""))
        report["device"] = report.get("device") or record["result"].get("device")
        report["seconds"] = round(time.perf_counter() - started, 1)
        report.update(summarize(report["stages"]))
        write_report(out, report)  # after every stage: an interrupted run keeps what it measured
    failed = [r["name"] for r in report["stages"] if r["status"] != "ok"]
    report["failed"] = failed
    write_report(out, report)
    say(f"report: {out} ({len(report['stages']) - len(failed)} ok, {len(failed)} failed or skipped)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
