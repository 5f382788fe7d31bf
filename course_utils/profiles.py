"""The model ladder and the hardware profiles that pick a rung of it.

Backs lessons 00 and 01 (the ladder, claims vs configs, the KV cache).

Every number in ``MODELS`` comes from a model's ``config.json`` (as mirrored by the defaults of the
transformers config class that names that checkpoint) or from the model card cited beside it — not
from blog posts. The stand-ins' numbers are read from the configs that :mod:`course_utils.tiny` writes.

A *profile* decides model and method; the notebooks' code path does not change with it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Literal, get_args

GiB = 1024**3
Method = Literal["qlora", "lora", "full"]
Backend = Literal["unsloth", "transformers"]
PROFILE_ENV_VAR = "COURSE_PROFILE"
# The model family a notebook runs (its ``MODEL`` parameter); ``COURSE_MODEL`` overrides it.
CourseModel = Literal["mistral-small-3.2", "mistral-small-4"]
COURSE_MODELS: tuple[str, ...] = get_args(CourseModel)
DEFAULT_MODEL: CourseModel = "mistral-small-3.2"
MODEL_ENV_VAR = "COURSE_MODEL"
# Each family's offline stand-in (course_utils.tiny builds them).
STAND_IN_OF_MODEL: dict[str, str] = {
    "mistral-small-3.2": "tiny-mistral-small-3",
    "mistral-small-4": "tiny-mistral-small-4",
}


@dataclass(frozen=True)
class ModelSpec:
    """Facts about one model, enough to plan memory and explain the architecture."""

    key: str
    display_name: str
    hf_id: str | None
    total_params_b: float
    active_params_b: float
    architecture: str
    text_model_type: str
    attention: str  # "GQA" or "MLA"
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    context_length: int
    vision: bool
    license: str
    intermediate_size: int = 0  # dense MLP width (Small 4: the shared expert's and each routed expert's)
    vocab_size: int = 131072  # Tekken
    tie_word_embeddings: bool = False
    vision_params_b: float = 0.0  # Pixtral vision tower + projector
    kv_lora_rank: int | None = None  # MLA only: width of the compressed KV latent
    qk_rope_head_dim: int | None = None  # MLA only: the decoupled RoPE key part, cached per token
    q_lora_rank: int | None = None  # MLA only: width of the compressed query
    qk_nope_head_dim: int | None = None  # MLA only
    v_head_dim: int | None = None  # MLA only
    served_bytes_per_weight: float = 2.0  # the official checkpoint's precision (bf16 unless noted)
    num_experts: int | None = None
    experts_per_token: int | None = None
    shared_experts: int | None = None
    unsloth_ids: tuple[str, ...] = ()
    other_ids: tuple[str, ...] = ()
    ollama_tags: tuple[str, ...] = ()
    recommended_temperature: float = 0.15
    notes: str = ""
    is_stand_in: bool = False

    def kv_cache_bytes_per_token(self, bytes_per_value: int = 2) -> int:
        """Bytes the KV cache grows by per token of context (all layers, 16-bit by default).

        GQA caches a key and a value vector per KV head per layer. MLA caches one compressed
        latent (``kv_lora_rank``) plus the shared RoPE key part (``qk_rope_head_dim``) per layer —
        that is why a 119B MoE can afford a 256k context.
        """
        if self.attention == "MLA":
            assert self.kv_lora_rank is not None and self.qk_rope_head_dim is not None
            per_layer = self.kv_lora_rank + self.qk_rope_head_dim
        else:
            per_layer = 2 * self.num_key_value_heads * self.head_dim
        return self.num_layers * per_layer * bytes_per_value

    def weights_gib(self, bits_per_param: float) -> float:
        """Size of all weights at a given precision (4-bit NF4 ≈ 4.5 bits with its scales)."""
        return self.total_params_b * 1e9 * bits_per_param / 8 / GiB

    def as_dict(self) -> dict:
        return asdict(self)


# --- The ladder ---------------------------------------------------------------------------------
# Mistral Small 3.1 / 3.2: transformers Mistral3Config(text=MistralConfig, vision=PixtralVisionConfig)
# as published in the 2503/2506 checkpoints: 40 layers, hidden 5120, 32 q heads / 8 kv heads,
# head_dim 128, 131072 context, Pixtral vision tower (24 layers, patch 14, longest edge 1540).
_SMALL_3_COMMON = dict(
    total_params_b=24.0,
    active_params_b=24.0,
    architecture="Mistral3ForConditionalGeneration",
    text_model_type="mistral",
    attention="GQA",
    num_layers=40,
    hidden_size=5120,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    intermediate_size=32768,
    vision_params_b=0.44,
    context_length=131072,
    vision=True,
    license="Apache-2.0",
)

MODELS: dict[str, ModelSpec] = {
    "mistral-small-4": ModelSpec(
        key="mistral-small-4",
        display_name="Mistral Small 4 (119B MoE)",
        hf_id="mistralai/Mistral-Small-4-119B-2603",
        total_params_b=119.0,
        active_params_b=6.5,
        architecture="Mistral3ForConditionalGeneration",
        text_model_type="mistral4",
        attention="MLA",
        num_layers=36,
        hidden_size=4096,
        num_attention_heads=32,
        num_key_value_heads=32,
        head_dim=128,
        intermediate_size=2048,
        vision_params_b=0.44,
        context_length=262144,
        vision=True,
        license="Apache-2.0",
        kv_lora_rank=256,
        qk_rope_head_dim=64,
        q_lora_rank=1024,
        qk_nope_head_dim=64,
        v_head_dim=128,
        served_bytes_per_weight=1.0,  # the official checkpoint is FP8 (model card); -NVFP4 also exists
        num_experts=128,
        experts_per_token=4,
        shared_experts=1,
        unsloth_ids=("unsloth/Mistral-Small-4-119B-2603-GGUF",),
        other_ids=(
            "mistralai/Mistral-Small-4-119B-2603-NVFP4",
            "axolotl-ai-co/Mistral-Small-4-119B-2603-BF16",
        ),
        ollama_tags=(),
        notes=(
            "A 119B mixture of experts: 128 routed experts (4 per token) + 1 shared, so about 6.5B "
            "parameters work per token but all 119B must sit in memory. Official weights are FP8. "
            "QLoRA needs about 68-69 GiB (axolotl examples/mistral4). Reasoning mode "
            "(reasoning_effort, [THINK]). No official Ollama tag yet (ollama#15142)."
        ),
    ),
    "mistral-small-3.2": ModelSpec(
        key="mistral-small-3.2",
        display_name="Mistral Small 3.2 (24B dense)",
        hf_id="mistralai/Mistral-Small-3.2-24B-Instruct-2506",
        unsloth_ids=(
            "unsloth/Mistral-Small-3.2-24B-Instruct-2506-unsloth-bnb-4bit",
            "unsloth/Mistral-Small-3.2-24B-Instruct-2506-bnb-4bit",
        ),
        ollama_tags=("mistral-small3.2",),
        notes="The 24B dense vision model most people mean by 'Mistral Small'. QLoRA fits a 24 GB card.",
        **_SMALL_3_COMMON,
    ),
    "mistral-small-3.1": ModelSpec(
        key="mistral-small-3.1",
        display_name="Mistral Small 3.1 (24B dense)",
        hf_id="mistralai/Mistral-Small-3.1-24B-Instruct-2503",
        unsloth_ids=(
            "unsloth/Mistral-Small-3.1-24B-Instruct-2503-unsloth-bnb-4bit",
            "unsloth/Mistral-Small-3.1-24B-Instruct-2503-bnb-4bit",
        ),
        ollama_tags=("mistral-small3.1",),
        notes="Same architecture as 3.2; 3.2 follows instructions better and repeats itself less.",
        **_SMALL_3_COMMON,
    ),
    # Ministral 3 (2512): transformers Ministral3Config defaults name mistralai/Ministral-3-8B-Base-2512.
    "ministral-3-8b": ModelSpec(
        key="ministral-3-8b",
        display_name="Ministral 3 8B (vision, free-Colab rung)",
        hf_id="mistralai/Ministral-3-8B-Instruct-2512",
        # the Instruct release ships FP8 weights (its model card); ...-2512-BF16 is the 16-bit release
        served_bytes_per_weight=1.0,
        total_params_b=8.8,  # model card: 8.4B language model + 0.4B vision encoder
        active_params_b=8.8,
        architecture="Mistral3ForConditionalGeneration",
        text_model_type="ministral3",
        attention="GQA",
        num_layers=34,
        hidden_size=4096,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        intermediate_size=14336,
        vision_params_b=0.4,
        context_length=262144,
        vision=True,
        license="Apache-2.0",
        other_ids=("mistralai/Ministral-3-3B-Instruct-2512", "mistralai/Ministral-3-14B-Instruct-2512"),
        notes=(
            "Same family, same Tekken tokenizer and vision stack, small enough for QLoRA on a 16 GB T4. "
            "Unsloth's public notebook uses the 3B sibling."
        ),
    ),
}


def stand_in_spec(key: str, config, num_params: int) -> ModelSpec:
    """Describe a locally built stand-in from its transformers config (no numbers typed by hand)."""
    text = config.text_config
    n_params = num_params
    is_mla = getattr(text, "kv_lora_rank", None) is not None
    return ModelSpec(
        key=key,
        display_name=f"{key} (offline stand-in, random weights)",
        hf_id=None,
        total_params_b=(n_params or 0) / 1e9,
        active_params_b=(n_params or 0) / 1e9,
        architecture=config.architectures[0] if config.architectures else "Mistral3ForConditionalGeneration",
        text_model_type=text.model_type,
        attention="MLA" if is_mla else "GQA",
        num_layers=text.num_hidden_layers,
        hidden_size=text.hidden_size,
        num_attention_heads=text.num_attention_heads,
        num_key_value_heads=text.num_key_value_heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
        context_length=text.max_position_embeddings,
        vision=True,
        license="Apache-2.0 (course code)",
        kv_lora_rank=getattr(text, "kv_lora_rank", None),
        qk_rope_head_dim=getattr(text, "qk_rope_head_dim", None),
        num_experts=getattr(text, "n_routed_experts", None),
        experts_per_token=getattr(text, "num_experts_per_tok", None) if is_mla else None,
        shared_experts=getattr(text, "n_shared_experts", None),
        is_stand_in=True,
        notes="Real architecture, real Tekken tokenizer and chat format, small random weights.",
    )


@dataclass(frozen=True)
class Profile:
    """A rung of the ladder: which model, how it is trained, and what hardware it needs."""

    name: str
    description: str
    model_key: str  # a key of MODELS, or a stand-in name from course_utils.tiny
    method: Method
    load_in_4bit: bool
    min_vram_gib: float  # 0 for CPU profiles
    backend: Backend
    load_id: str | None  # the id handed to from_pretrained (None: the locally built stand-in)
    alternatives: tuple[str, ...] = field(default_factory=tuple)
    model: CourseModel = DEFAULT_MODEL  # the model family (MODEL / COURSE_MODEL) this rung runs

    @property
    def is_stand_in(self) -> bool:
        return self.load_id is None

    @property
    def runs_model(self) -> bool:
        """False where this rung cannot hold its model (Small 4 needs the 80 GB rung): ``models``
        refuses it before any download."""
        return self.model == DEFAULT_MODEL or self.name in SMALL_4_RUNGS

    @property
    def outputs_name(self) -> str:
        """The folder name under ``outputs/`` for what this rung's lessons write: the profile for the
        default model, profile and model otherwise, so two models' adapters never overwrite each other."""
        return self.name if self.model == DEFAULT_MODEL else f"{self.name}-{self.model}"


PROFILES: dict[str, Profile] = {
    "cpu-tiny": Profile(
        name="cpu-tiny",
        description="Any CPU (tests, CI, laptops): the offline stand-in with the real architecture.",
        model_key="tiny-mistral-small-3",
        method="lora",
        load_in_4bit=False,
        min_vram_gib=0,
        backend="transformers",
        load_id=None,
        alternatives=("tiny-mistral-small-4",),
    ),
    "t4-16gb": Profile(
        name="t4-16gb",
        description="Free Colab T4 (16 GB): Ministral 3 8B vision, Unsloth QLoRA.",
        model_key="ministral-3-8b",
        method="qlora",
        load_in_4bit=True,
        min_vram_gib=14.0,
        backend="unsloth",
        load_id="mistralai/Ministral-3-8B-Instruct-2512",
        alternatives=("mistralai/Ministral-3-3B-Instruct-2512",),
    ),
    "gpu-24gb": Profile(
        name="gpu-24gb",
        description="L4, A10G, RTX 4090, RunPod 24 GB: Mistral Small 3.2 24B, Unsloth QLoRA.",
        model_key="mistral-small-3.2",
        method="qlora",
        load_in_4bit=True,
        min_vram_gib=22.0,
        backend="unsloth",
        load_id="unsloth/Mistral-Small-3.2-24B-Instruct-2506-unsloth-bnb-4bit",
    ),
    "gpu-80gb": Profile(
        name="gpu-80gb",
        description="A100/H100 80 GB, H200: Mistral Small 3.2 24B with 16-bit LoRA (or Small 4 QLoRA).",
        model_key="mistral-small-3.2",
        method="lora",
        load_in_4bit=False,
        min_vram_gib=75.0,
        backend="unsloth",
        load_id="mistralai/Mistral-Small-3.2-24B-Instruct-2506",
        alternatives=("mistral-small-4 QLoRA (≈68 GiB with axolotl's quantize_moe_experts recipe)",),
    ),
}

# Mistral Small 4 on each rung that can hold it. The 80 GB rung: QLoRA from the BF16 re-upload (the
# official checkpoint is FP8) with the routed experts quantized to 4-bit too — axolotl's recipe,
# ≈ 68 GiB measured (axolotl examples/mistral4 README, course_utils.memory CALIBRATION); plain
# transformers 4-bit leaves the 3-D expert weights in bf16 (≈ 216 GiB), Unsloth quantizes them itself.
# The T4 and 24 GB rungs cannot hold 119B parameters at any precision the course trains in.
SMALL_4_RUNGS: dict[str, dict] = {
    "cpu-tiny": dict(
        model_key="tiny-mistral-small-4",
        description="Any CPU (tests, CI, laptops): the Small 4 stand-in (MoE + MLA, v15 chat format).",
        alternatives=("tiny-mistral-small-3",),
    ),
    "gpu-80gb": dict(
        model_key="mistral-small-4",
        description="A100/H100 80 GB, H200: Mistral Small 4 119B MoE, QLoRA with 4-bit experts (≈68 GiB).",
        method="qlora",
        load_in_4bit=True,
        load_id="axolotl-ai-co/Mistral-Small-4-119B-2603-BF16",
        alternatives=("mistralai/Mistral-Small-4-119B-2603 (FP8, for serving: lesson 07's vLLM command)",),
    ),
}


# The 16-bit release each model's FSDP ranks load (transformers + bitsandbytes quantize it themselves, with
# the storage dtype FSDP needs). Not the rungs' own load ids: transformers keeps a pre-quantized
# checkpoint's settings (the Unsloth bnb-4bit uploads) and refuses a BitsAndBytesConfig over FP8
# (Ministral 3's Instruct release). Small 4 is absent: plain 4-bit loading leaves its 3-D expert weights
# in bf16 (≈ 216 GiB) — axolotl's recipe quantizes them (lesson 04, 4.11).
FSDP_SOURCES: dict[str, str] = {
    "mistral-small-3.2": "mistralai/Mistral-Small-3.2-24B-Instruct-2506",
    "mistral-small-3.1": "mistralai/Mistral-Small-3.1-24B-Instruct-2503",
    "ministral-3-8b": "mistralai/Ministral-3-8B-Instruct-2512-BF16",
}


def fsdp_profile(profile: Profile) -> Profile:
    """``profile`` as several GPUs train it: transformers + peft (FSDP shards that, not Unsloth's patched
    model), loading the model's 16-bit release (:data:`FSDP_SOURCES`). ``ValueError`` for a model the
    course does not train with FSDP, with the way it does train it."""
    if profile.model_key not in FSDP_SOURCES:
        raise ValueError(
            f"{profile.model_key} does not train with FSDP here: plain transformers 4-bit loading leaves "
            "Small 4's expert weights in bf16 (≈ 216 GiB). Train it with axolotl's recipe (lesson 04, "
            "4.11: quantize_moe_experts) or on one 80 GB GPU with Unsloth."
        )
    return replace(profile, backend="transformers", load_id=FSDP_SOURCES[profile.model_key])


def resolve_model(requested: str | None = None, environ: Mapping[str, str] | None = None) -> CourseModel:
    """The model family to run: ``COURSE_MODEL`` when set (``python -m course_utils run --model``
    sets it for every notebook), else ``requested`` (a notebook's ``MODEL``), else Small 3.2.

    Unknown names raise a one-line ``ValueError`` that lists the valid ones.
    """
    env = os.environ if environ is None else environ
    from_env = env.get(MODEL_ENV_VAR, "").strip()
    name = from_env or (requested or DEFAULT_MODEL).strip()
    if name not in COURSE_MODELS:
        where = MODEL_ENV_VAR if from_env else "MODEL"
        raise ValueError(f"Unknown model {name!r} (from {where}). Choose one of: {', '.join(COURSE_MODELS)}.")
    return name  # type: ignore[return-value]


def profile_for_model(profile: Profile, model: str) -> Profile:
    """``profile``'s rung running ``model``: the matching stand-in on ``cpu-tiny``, the real
    checkpoint on a GPU rung. A rung that cannot hold the model keeps ``runs_model`` False and
    ``course_utils.models`` refuses it before any download (``hardware.preflight`` checks the rest)."""
    if model not in COURSE_MODELS:
        raise ValueError(f"Unknown model {model!r}. Choose one of: {', '.join(COURSE_MODELS)}.")
    if model == profile.model:
        return profile
    if model == DEFAULT_MODEL:
        return PROFILES[profile.name]
    rung = SMALL_4_RUNGS.get(profile.name)
    if rung is None:  # does not fit: the 80 GB rung's checkpoint and floor, refused when loading
        big = SMALL_4_RUNGS["gpu-80gb"]
        return replace(
            profile,
            model=model,
            model_key=big["model_key"],
            method=big["method"],
            load_in_4bit=big["load_in_4bit"],
            load_id=big["load_id"],
            min_vram_gib=PROFILES["gpu-80gb"].min_vram_gib,
            alternatives=(),
        )
    return replace(profile, model=model, **rung)


# Largest first: ``auto`` takes the first profile whose VRAM need the accelerator meets.
_LADDER = ("gpu-80gb", "gpu-24gb", "t4-16gb")


def pick_profile(accelerator: str, vram_gib: float | None) -> str:
    """The profile ``auto`` resolves to for a detected accelerator ("cuda", "mps" or "cpu")."""
    if accelerator == "cuda" and vram_gib:
        for name in _LADDER:
            if vram_gib >= PROFILES[name].min_vram_gib:
                return name
    # MPS and small GPUs: Unsloth needs CUDA, and the 4-bit kernels need it too.
    return "cpu-tiny"


def resolve_profile(requested: str | None = "auto", hardware=None, model: str | None = None) -> Profile:
    """Turn ``"auto"`` (or a name, or the ``COURSE_PROFILE`` variable) into a :class:`Profile`
    running ``model`` (see :func:`resolve_model`: ``COURSE_MODEL`` > ``model`` > Small 3.2).

    Precedence: an explicit name passed in > ``COURSE_PROFILE`` > detection, which needs
    ``hardware`` (``course_utils.hardware.detect()``; this module stays free of hardware code).
    Unknown names raise a ``ValueError`` that lists the valid ones.
    """
    name = requested or "auto"
    if name == "auto":
        name = os.environ.get(PROFILE_ENV_VAR, "").strip() or "auto"
    if name == "auto":
        if hardware is None:
            raise ValueError(
                "profile 'auto' needs the detected hardware: resolve_profile('auto', hardware=detect()) "
                "with detect from course_utils.hardware"
            )
        if getattr(hardware, "unusable_gpu", None):  # a paid GPU torch cannot use: not a CPU run
            raise ValueError(f"profile 'auto' refused: {hardware.unusable_gpu}")
        name = pick_profile(hardware.accelerator, hardware.vram_gib)
    if name not in PROFILES:
        raise ValueError(
            f"Unknown profile {name!r} "
            f"(from {'COURSE_PROFILE' if requested in (None, 'auto') else 'the argument'}). "
            f"Choose one of: auto, {', '.join(PROFILES)}."
        )
    return profile_for_model(PROFILES[name], resolve_model(model))


def model_spec(key: str) -> ModelSpec:
    """Look up a model of the ladder by key, with a helpful error for typos."""
    try:
        return MODELS[key]
    except KeyError:
        raise KeyError(f"Unknown model {key!r}. Known models: {', '.join(MODELS)}.") from None


CONTEXTS = (4096, 32768, 131072, 262144)


def kv_cache_table(
    keys: Sequence[str] = ("mistral-small-3.2", "mistral-small-4", "ministral-3-8b"),
    contexts: Sequence[int] = CONTEXTS,
) -> list[dict]:
    """KV-cache GiB (16-bit) per model and context length; ``None`` beyond a model's context."""
    rows = []
    for key in keys:
        spec = MODELS[key]
        per_token = spec.kv_cache_bytes_per_token()
        row = {"model": key, "attention": spec.attention, "bytes_per_token": per_token}
        for ctx in contexts:
            row[ctx] = per_token * ctx / GiB if ctx <= spec.context_length else None
        rows.append(row)
    return rows


def ladder_rows() -> list[dict]:
    """The model ladder as table rows (facts from configs; see each ModelSpec)."""
    return [
        {
            "model": s.key,
            "params": f"{s.total_params_b:g}B"
            + (f" ({s.active_params_b:g}B active)" if s.active_params_b != s.total_params_b else ""),
            "attention": s.attention
            + (f", {s.num_experts} experts top-{s.experts_per_token}" if s.num_experts else ""),
            "layers": s.num_layers,
            "heads q/kv": f"{s.num_attention_heads}/{s.num_key_value_heads}",
            "context": f"{s.context_length // 1024}k",
            "ollama": ", ".join(s.ollama_tags) or "—",
        }
        for s in MODELS.values()
    ]


def format_table(rows: list[dict]) -> str:
    """Rows of dicts as an aligned text table (works in notebooks, terminals and nbval)."""
    if not rows:
        return ""
    headers = [str(h) for h in rows[0]]
    cells = [
        ["—" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v)) for v in r.values()]
        for r in rows
    ]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]

    def line(values):
        return "  ".join(v.ljust(w) for v, w in zip(values, widths)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, cells)])
