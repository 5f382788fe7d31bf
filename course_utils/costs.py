"""Time and cost of a training run before renting a GPU: ``python -m course_utils plan``.

Backs lesson 04 (the time & cost planner beside the VRAM planner).

    dataset tokens  = rows × tokens per row      (measured on the course's receipts, or given)
    training tokens = dataset tokens × epochs
    hours           = training tokens ÷ training tokens per second ÷ 3600
    cost            = hours × GPUs × $ per GPU-hour

Every number below carries its public source. Where nobody publishes a training speed for a model on a
GPU (nobody does for Mistral Small 3.2 or 4), the speed is derived, and the derivation is printed:

    tokens/s = peak dense bf16 FLOP/s (the GPU's datasheet) × MFU ÷ (6 × active parameters)

6 FLOPs per active parameter per token is a LoRA/QLoRA step under gradient checkpointing: the forward
pass (2), its recomputation (2) and the activation gradients (2); frozen weights get no weight gradient.
The MFU (model FLOPs utilisation) comes from a published measurement with the same method, the same
6·P convention and the same amount of work per micro-batch: Qwen's profiling table (Qwen-14B, one
A100-SXM4-80G, transformers + peft, FlashAttention 2, batch 1 × gradient accumulation 8), which shows
how strongly MFU depends on the tokens in a micro-batch (10 % at 256 tokens, 44 % at 4096 for QLoRA).
``throughput_check()`` compares the derivation with the other published runs and each plan notes the
ones on its GPU: Qwen-72B QLoRA on an A100 within 2 %; Qwen-7B LoRA 24 % slower than derived (smaller
models reach a lower MFU: optimistic for the 8B rung); Unsloth's 24B notebook on an L4 at least 25 %
slower than derived (the L4's datasheet peak is not what a 72 W card sustains). Not modelled: a speed
difference between Unsloth and transformers+peft (Unsloth's README claims 2×; its own 24B notebook on an
L4 ran slower than the transformers-derived figure, so no factor is applied), padding, evaluation and
checkpoint saving, and for Small 4 the MoE routing and per-expert dequantisation (optimistic).

The CPU figure is the course's own measurement (lesson 04 on ``cpu-tiny``). Prices are dated quotes;
pass ``price_per_hour`` (``--price-per-hour``) for yours. Combinations the VRAM planner
(``course_utils.memory``) says do not fit are refused with what would fit instead.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, field

from course_utils.profiles import MODELS, Backend, Method

# --- GPUs ---------------------------------------------------------------------------------------------
# memory_gib: what torch reports on that card (torch.cuda.get_device_properties(0).total_memory / 2**30),
# as printed by Unsloth's start-up banner ("Max memory") in public training logs; peak_tflops: dense
# (no sparsity) bf16 tensor TFLOPS from NVIDIA's datasheets (fp16 on the T4, which has no bf16).


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_gib: float
    peak_tflops: float
    bf16: bool
    source: str


GPUS: dict[str, Gpu] = {
    g.name: g
    for g in (
        Gpu(
            "T4",
            14.741,
            65.0,
            False,
            "https://www.nvidia.com/en-us/data-center/tesla-t4/ (FP16 mixed precision 65 TFLOPS); "
            "memory: Unsloth's Colab notebooks ('Tesla T4. Max memory = 14.741 GB')",
        ),
        Gpu(
            "L4",
            22.161,
            121.0,
            True,
            "https://www.nvidia.com/en-us/data-center/l4/ (BF16 242 TFLOPS with sparsity = 121 dense); "
            "memory: Unsloth's Magistral notebook on a Colab L4 ('Max memory: 22.161 GB')",
        ),
        Gpu(
            "RTX-4090",
            23.52,
            165.2,
            True,
            "NVIDIA Ada GPU architecture whitepaper, RTX 4090 peak BF16 tensor TFLOPS with FP32 accumulate "
            "165.2 (330.4 sparse), https://images.nvidia.com/aem-dam/Solutions/geforce/ada/"
            "nvidia-ada-gpu-architecture.pdf; memory: a public training log "
            "('RTX 4090. Max memory = 23.52 GB')",
        ),
        Gpu(
            "A100-80GB",
            79.151,
            312.0,
            True,
            "https://www.nvidia.com/en-us/data-center/a100/ (BF16 312 TFLOPS, 624 with sparsity); "
            "memory: Unsloth banner 'NVIDIA A100-SXM4-80GB ... Max memory: 79.151 GB'",
        ),
        Gpu(
            "H100-80GB",
            79.179,
            989.0,
            True,
            "https://www.nvidia.com/en-us/data-center/h100/ (H100 SXM BF16 1,979 TFLOPS with sparsity = 989 "
            "dense); memory: Unsloth banner 'NVIDIA H100 80GB HBM3 ... Max memory: 79.179 GB'",
        ),
        Gpu(
            "H200",
            139.8,
            989.0,
            True,
            "https://www.nvidia.com/en-us/data-center/h200/ (BF16 1,979 TFLOPS with sparsity = 989 dense); "
            "memory: Unsloth banner 'NVIDIA H200 ... Max memory: 139.801 GB'",
        ),
    )
}
CPU = "CPU"

# --- Prices (USD per GPU-hour); the first quote of each GPU is the default ---------------------------


@dataclass(frozen=True)
class Price:
    usd_per_hour: float
    offer: str
    source: str
    as_of: str


_RUNPOD_LISTING = "https://deploybase.ai/articles/runpod-gpu-pricing (RunPod prices, 'spot' column)"
_RUNPOD_SERVERLESS = "https://docs.runpod.io/serverless/pricing (flex workers, $/s × 3600)"
_SERVERLESS_AS_OF = "undated page, read 2026-11-29"

PRICES: dict[str, tuple[Price, ...]] = {
    "T4": (
        Price(
            0.0,
            "Google Colab free tier (session and usage limits apply)",
            "https://mccormickml.com/2024/04/23/colab-gpus-features-and-pricing ('The T4 is still free')",
            "2026-03",
        ),
    ),
    "L4": (
        Price(0.44, "RunPod L4 pod", _RUNPOD_LISTING, "2026-03-10"),
        Price(0.684, "RunPod serverless L4 ($0.00019/s)", _RUNPOD_SERVERLESS, _SERVERLESS_AS_OF),
    ),
    "RTX-4090": (
        Price(0.34, "RunPod RTX 4090 pod", _RUNPOD_LISTING, "2026-03-10"),
        Price(1.116, "RunPod serverless 4090 PRO ($0.00031/s)", _RUNPOD_SERVERLESS, _SERVERLESS_AS_OF),
    ),
    "A100-80GB": (
        Price(1.39, "RunPod A100 SXM 80GB pod", _RUNPOD_LISTING, "2026-03-10"),
        Price(2.736, "RunPod serverless A100 80GB ($0.00076/s)", _RUNPOD_SERVERLESS, _SERVERLESS_AS_OF),
    ),
    "H100-80GB": (
        Price(
            2.69,
            "RunPod Secure Cloud H100 SXM pod",
            "https://www.spheron.network/blog/runpod-h100-pricing-2026/ (and the deploybase.ai listing)",
            "2026-05-22",
        ),
        Price(4.176, "RunPod serverless H100 PRO ($0.00116/s)", _RUNPOD_SERVERLESS, _SERVERLESS_AS_OF),
    ),
    "H200": (
        Price(3.59, "RunPod H200 pod", _RUNPOD_LISTING, "2026-03-10"),
        Price(5.58, "RunPod serverless H200 PRO ($0.00155/s)", _RUNPOD_SERVERLESS, _SERVERLESS_AS_OF),
    ),
    CPU: (Price(0.0, "your own machine", "—", "—"),),
}

# --- Throughput -----------------------------------------------------------------------------------------
QWEN_PROFILING = (
    "https://github.com/QwenLM/Qwen/blob/main/README.md, 'Profiling of Memory and Speed' "
    "(one A100-SXM4-80G, batch 1 × gradient accumulation 8, FlashAttention 2; s/it per 8 sequences)"
)
# Seconds per optimizer step (8 sequences of that length) for Qwen-14B; its Q-LoRA loads the Int4
# (GPTQ) checkpoint, the course's QLoRA bitsandbytes NF4: both dequantise the frozen weights each step.
QWEN14B_SECONDS_PER_STEP: dict[str, dict[int, float]] = {
    "qlora": {256: 5.3, 512: 6.3, 1024: 8.2, 2048: 11.8, 4096: 20.1, 8192: 38.3},
    "lora": {256: 1.6, 512: 2.4, 1024: 4.4, 2048: 8.4, 4096: 17.0, 8192: 36.0},
}
QWEN14B_PARAMS = 14e9  # as named; its config gives ≈14.2B with embeddings, so the MFU here is ≈1 % low
QWEN_SEQUENCES_PER_STEP = 8
FLOPS_PER_PARAM_PER_TOKEN = 6
REFERENCE_GPU = "A100-80GB"

# The course's CPU measurement: lesson 04 on cpu-tiny (tiny-mistral-small-3, 17.6M parameters, LoRA r 16
# + trained embedding rows, batch 4, transformers + peft, 2 CPU cores), the reference run whose outputs the
# committed lesson 04 shows (2026-11-29): 220 steps, 227,400 input tokens (trainer_state
# num_input_tokens_seen) in 161.6 s (training_card train_seconds); the lesson prints ≈ 1,440 tokens/s.
CPU_TOKENS = 227_400
CPU_SECONDS = 161.6
CPU_SOURCE = (
    "measured by the course: lesson 04 on cpu-tiny, 227,400 tokens in 161.6 s on 2 CPU cores "
    "(the reference run's training card and trainer_state, 2026-11-29)"
)
STAND_IN_OF = {
    "mistral-small-3.2": "tiny-mistral-small-3",
    "mistral-small-3.1": "tiny-mistral-small-3",
    "ministral-3-8b": "tiny-mistral-small-3",
    "mistral-small-4": "tiny-mistral-small-4",
}
STAND_INS = ("tiny-mistral-small-3", "tiny-mistral-small-4")


def mfu(method: Method, tokens_per_microbatch: float) -> float:
    """MFU at this many tokens per micro-batch, read off Qwen-14B's published A100 speeds.

    Each published point: MFU = (8 sequences × length ÷ s/it) × 6 × 14e9 ÷ 312 TFLOPS. Between points the
    MFU is interpolated linearly in log2(tokens); outside them it is held at the nearest point.
    """
    if method not in QWEN14B_SECONDS_PER_STEP:
        raise ValueError(f"the planner covers qlora and lora, not {method!r}")
    peak = GPUS[REFERENCE_GPU].peak_tflops * 1e12
    points = sorted(
        (
            length,
            QWEN_SEQUENCES_PER_STEP * length / s * FLOPS_PER_PARAM_PER_TOKEN * QWEN14B_PARAMS / peak,
        )
        for length, s in QWEN14B_SECONDS_PER_STEP[method].items()
    )
    x = math.log2(max(tokens_per_microbatch, 1.0))
    if x <= math.log2(points[0][0]):
        return points[0][1]
    for (l0, m0), (l1, m1) in zip(points, points[1:]):
        x0, x1 = math.log2(l0), math.log2(l1)
        if x <= x1:
            return m0 + (m1 - m0) * (x - x0) / (x1 - x0)
    return points[-1][1]


def derived_tokens_per_second(gpu: str, active_params: float, method: Method, tokens_per_microbatch: float):
    """(tokens/s, MFU) = peak FLOP/s × MFU ÷ (6 × active parameters)."""
    utilisation = mfu(method, tokens_per_microbatch)
    rate = GPUS[gpu].peak_tflops * 1e12 * utilisation / (FLOPS_PER_PARAM_PER_TOKEN * active_params)
    return rate, utilisation


@dataclass(frozen=True)
class PublishedRun:
    """A published training speed the derivation can be checked against."""

    label: str
    gpu: str
    active_params: float
    method: Method
    tokens_per_microbatch: float
    tokens_per_second: float
    source: str
    upper_bound: bool = False  # True: the published run's token count is a ceiling


PUBLISHED_RUNS = (
    PublishedRun(
        "Qwen-72B Q-LoRA, 2048 tokens, one A100 (59.5 s per 8 sequences)",
        "A100-80GB",
        72e9,
        "qlora",
        2048,
        8 * 2048 / 59.5,
        QWEN_PROFILING,
    ),
    PublishedRun(
        "Qwen-7B LoRA, 2048 tokens, one A100 (5.2 s per 8 sequences)",
        "A100-80GB",
        7e9,
        "lora",
        2048,
        8 * 2048 / 5.2,
        QWEN_PROFILING,
    ),
    # 15 steps × batch 2 × accumulation 2 = 60 rows of at most 2048 tokens (max_seq_length) in 417.1 s.
    PublishedRun(
        "Unsloth Magistral Small 24B QLoRA on an L4 (60 rows ≤ 2048 tokens in 417.1 s)",
        "L4",
        24e9,
        "qlora",
        2 * 2048,
        60 * 2048 / 417.0752,
        "https://github.com/unslothai/notebooks/blob/main/nb/Magistral_(24B)-Reasoning-Conversational.ipynb",
        upper_bound=True,
    ),
)


def throughput_check() -> list[dict]:
    """The derivation vs each published run: error in percent (for a ceiling, how far above it we are)."""
    rows = []
    for run in PUBLISHED_RUNS:
        derived, utilisation = derived_tokens_per_second(
            run.gpu, run.active_params, run.method, run.tokens_per_microbatch
        )
        rows.append(
            {
                "run": run.label,
                "published_tok_s": round(run.tokens_per_second, 1),
                "derived_tok_s": round(derived, 1),
                "mfu_pct": round(100 * utilisation, 1),
                "error_pct": round(100 * (derived - run.tokens_per_second) / run.tokens_per_second, 1),
                "published_is_ceiling": run.upper_bound,
            }
        )
    return rows


# --- Dataset tokens -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenCount:
    rows: int
    tokens: int
    max_tokens: int
    source: str

    @property
    def per_row(self) -> float:
        return self.tokens / self.rows


def measure_tokens_per_row(model: str, split: str = "train", image_fraction: float = 0.5) -> TokenCount:
    """Tokens per row of the course's receipts as lesson 03 mixes them (half image rows, half text rows).

    Text: the chat template and real Tekken tokenizer of the model family's stand-in. Images: the real
    model's token grid (Mistral Small 3.2: patch 14, merge 2, longest edge 1540 — assumed the same for
    Small 4's and Ministral 3's Pixtral towers); a stand-in model counts at its own (smaller) settings.
    """
    from PIL import Image
    from transformers import AutoProcessor

    from course_utils.chat import image_token_cost
    from course_utils.data import resolve_image_path
    from course_utils.receipts import load_local, local_dir, mix_modalities
    from course_utils.tiny import build_stand_in

    stand_in = model if model in STAND_INS else STAND_IN_OF[model]
    processor = AutoProcessor.from_pretrained(build_stand_in(stand_in))
    records = mix_modalities(load_local(split), image_fraction, seed=0)
    base = local_dir()
    settings = {"processor": processor} if model in STAND_INS else {}
    lengths = []
    for record in records:
        rendered = processor.apply_chat_template(record["messages"], tokenize=False)  # one [IMG] per image
        n = len(processor.tokenizer(rendered, add_special_tokens=False)["input_ids"])
        for image in record.get("images") or []:
            with Image.open(resolve_image_path(image, base)) as img:
                n += image_token_cost(*img.size, **settings) - 1
        lengths.append(n)
    grid = "the stand-in's own image grid" if settings else "Small 3.2's image grid (28 px per token)"
    return TokenCount(
        len(lengths),
        sum(lengths),
        max(lengths),
        f"measured on data/receipts/{split}.jsonl ({len(lengths)} rows, {round(100 * image_fraction)} % "
        f"image rows): {stand_in}'s Tekken tokenizer and chat template, {grid}",
    )


# --- The plan ---------------------------------------------------------------------------------------------


class PlanError(ValueError):
    """Bad input (unknown GPU or model, impossible numbers): the CLI exits 2."""


class DoesNotFit(ValueError):
    """The VRAM planner says the run does not fit: the CLI exits 1 and says what would."""


@dataclass
class Plan:
    model: str
    method: Method
    backend: Backend
    gpu: str
    gpus: int
    rows: int
    tokens_per_row: float | None  # None: only the dataset's total was given
    tokens_source: str
    training_tokens: float
    epochs: float
    batch_size: int
    seq_len: int
    lora_r: int
    peak_gib_per_gpu: float | None  # None on CPU
    gpu_memory_gib: float | None
    tokens_per_second: float
    throughput_source: str
    hours: float
    usd_per_hour: float
    price_source: str
    cost_usd: float
    arithmetic: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)

    def report(self) -> str:
        size = f"{self.rows:,} rows" if self.rows else f"{self.training_tokens / self.epochs:,.0f} tokens"
        head = f"{self.model} {self.method} ({self.backend}), {size} × {self.epochs:g} epoch(s)"
        head += f" on {self.gpus}× {self.gpu}"
        return "\n".join(
            [head, *(f"  {line}" for line in self.arithmetic), *(f"  note: {n}" for n in self.notes)]
        )


# Small 4's recipe is axolotl's (course_utils.train.AXOLOTL_SMALL4_QLORA): r 32, sequence_len 2048,
# micro-batch 1, quantize_moe_experts, Cut Cross Entropy; the rest follow the course's gpu-24gb preset.
RECIPES: dict[str, dict] = {
    "mistral-small-4": dict(
        method="qlora",
        backend="transformers",
        batch_size=1,
        seq_len=2048,
        lora_r=32,
        fused_cross_entropy=True,
        quantize_moe_experts=True,
        recipe="axolotl's examples/mistral4 QLoRA recipe (quantize_moe_experts, Cut Cross Entropy)",
    ),
}
DEFAULT_RECIPE = dict(
    method="qlora",
    backend="unsloth",
    batch_size=2,
    seq_len=2048,
    lora_r=16,
    fused_cross_entropy=None,
    quantize_moe_experts=True,
    recipe="the course's gpu-24gb preset (Unsloth QLoRA, batch 2, seq 2048, r 16)",
)


# The GPUs each course profile is meant for (profiles.PROFILES describes them).
PROFILE_GPUS: dict[str, tuple[str, ...]] = {
    "cpu-tiny": (CPU,),
    "t4-16gb": ("T4",),
    "gpu-24gb": ("L4", "RTX-4090"),
    "gpu-80gb": ("A100-80GB", "H100-80GB", "H200"),
}


def profile_recipe(profile: str, model: str | None = None) -> dict:
    """Method, backend and preset numbers of a course profile (``course_utils.train.PRESETS``); for a model
    with a recipe of its own (Small 4 on gpu-80gb: axolotl's) only the recipe's description — the rung
    trains it that way."""
    from course_utils.profiles import COURSE_MODELS, PROFILES, SMALL_4_RUNGS, profile_for_model

    if profile not in PROFILES:
        raise PlanError(f"unknown profile {profile!r}; choose one of: {', '.join(PROFILES)}")
    prof = PROFILES[profile]
    if model in COURSE_MODELS:  # the rung running that model (Small 4 on gpu-80gb)
        prof = profile_for_model(prof, model)
        if not prof.runs_model:
            holds = ", ".join(name for name in SMALL_4_RUNGS if name != "cpu-tiny")
            raise PlanError(f"profile {profile} cannot hold {model}; plan it on {holds}")
    if model is not None and model != prof.model_key:
        raise PlanError(f"profile {profile} trains {prof.model_key}, not {model}")
    if model in RECIPES:  # the rung trains it with the model's own recipe (Small 4: axolotl's)
        return dict(recipe=f"profile {profile}: {prof.description} {RECIPES[model]['recipe']}")
    from course_utils.train import PRESETS  # imports torch: only when a profile is asked for

    preset = PRESETS[profile]
    return dict(
        method=prof.method,
        backend=prof.backend,
        batch_size=preset.per_device_train_batch_size,
        seq_len=preset.max_seq_length,
        lora_r=preset.lora_r,
        recipe=f"profile {profile}: {prof.description}",
    )


def _memory(model, method, seq_len, batch_size, lora_r, backend, fused, quantize_experts):
    from course_utils.memory import estimate_training_memory

    return estimate_training_memory(
        model,
        method,
        seq_len,
        batch_size,
        lora_r,
        fused_cross_entropy=fused,
        backend=backend,
        quantize_moe_experts=quantize_experts,
    )


def per_gpu_gib(estimate, gpus: int) -> float:
    """Peak per GPU when ``gpus`` cards shard the model (FSDP): weights and training state are split,
    each card keeps its own activations, logits and CUDA context."""
    from course_utils.memory import ALLOCATOR_OVERHEAD

    if gpus == 1:
        return estimate.total_gib
    sharded = estimate.weights_gib + estimate.adapters_gib + estimate.gradients_gib + estimate.optimizer_gib
    own = estimate.activations_gib + estimate.logits_gib
    return (sharded / gpus + own) * (1 + ALLOCATOR_OVERHEAD) + estimate.cuda_context_gib


def fitting_options(estimate, candidates=None) -> list[tuple[str, int, float]]:
    """(GPU, how many, peak GiB per GPU) for the fewest cards of each GPU that hold the run (≤ 8)."""
    out = []
    for name in candidates or GPUS:
        for n in (1, 2, 4, 8):
            need = per_gpu_gib(estimate, n)
            if need <= GPUS[name].memory_gib:
                out.append((name, n, need))
                break
    return out


def _finite(flag: str, value: float, minimum: float = 0.0, inclusive: bool = False) -> float:
    """``value`` when it is a finite number above ``minimum`` (or equal, with ``inclusive``): NaN passes
    every comparison, so ``epochs <= 0`` alone lets it through to print NaN dollars."""
    import math
    import numbers

    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= minimum if inclusive else value > minimum)
    if not ok:
        bound = f"{'≥' if inclusive else '>'} {minimum:g}"
        raise PlanError(f"{flag} must be a finite number {bound}, got {value}")
    return value


def _price(gpu: str, price_per_hour: float | None) -> tuple[float, str]:
    if price_per_hour is not None:
        _finite("--price-per-hour", price_per_hour, inclusive=True)
        return price_per_hour, "your price"
    quote = PRICES[gpu][0]
    return quote.usd_per_hour, f"{quote.offer}, {quote.source}, {quote.as_of}"


def check_names(model: str, gpu: str) -> None:
    """Raise :class:`PlanError` (one line, with the choices) for an unknown model or GPU."""
    stand_in = model in STAND_INS
    if model not in MODELS and not stand_in:
        raise PlanError(f"unknown model {model!r}; choose one of: {', '.join([*MODELS, *STAND_INS])}")
    if gpu not in GPUS and gpu != CPU:
        raise PlanError(f"unknown GPU {gpu!r}; choose one of: {', '.join([*GPUS, CPU])}")
    if (gpu == CPU) != stand_in:
        raise PlanError(
            f"on {CPU} the planner knows the stand-ins ({', '.join(STAND_INS)}); a GPU needs a real model"
            if gpu == CPU
            else f"{model} is a CPU stand-in: plan it with --gpu {CPU}"
        )


def plan_training(
    model: str,
    gpu: str,
    rows: int | None = None,
    *,
    tokens_per_row: float | TokenCount | None = None,
    tokens: float | None = None,
    epochs: float = 1.0,
    method: Method | None = None,
    backend: Backend | None = None,
    batch_size: int | None = None,
    seq_len: int | None = None,
    lora_r: int | None = None,
    gpus: int = 1,
    price_per_hour: float | None = None,
    tokens_per_second: float | None = None,
    quantize_moe_experts: bool | None = None,
    profile: str | None = None,
) -> Plan:
    """Hours and dollars of one training run, every step of the arithmetic kept in ``Plan.arithmetic``.

    Dataset size: ``tokens`` (total), or ``rows`` × ``tokens_per_row`` (a number, a
    :class:`TokenCount`, or measured on the course's receipts when not given). Raises :class:`PlanError`
    for bad input and :class:`DoesNotFit` when the VRAM planner says the run needs more memory than
    ``gpus`` × ``gpu`` has. ``profile`` (a course profile) takes its method, backend and preset
    (batch size, sequence length, LoRA rank); explicit arguments still win.
    """
    check_names(model, gpu)
    stand_in = model in STAND_INS
    if gpu == CPU and gpus != 1:
        raise PlanError(f"--gpus applies to GPUs, not to {CPU}")
    _finite("--epochs", epochs)
    if gpus < 1 or (rows is not None and rows < 1):
        raise PlanError("rows and gpus must be at least 1")
    recipe = {**RECIPES.get(model, DEFAULT_RECIPE)}
    if profile is not None:
        recipe.update(profile_recipe(profile, model))
    for key, value in (
        ("method", method),
        ("backend", backend),
        ("batch_size", batch_size),
        ("seq_len", seq_len),
        ("lora_r", lora_r),
        ("quantize_moe_experts", quantize_moe_experts),
    ):
        if value is not None:
            recipe[key] = value
    if stand_in:
        recipe.update(
            method="lora", backend="transformers", batch_size=batch_size or 4, seq_len=seq_len or 512
        )
    if recipe["method"] not in QWEN14B_SECONDS_PER_STEP:
        raise PlanError(f"the planner covers qlora and lora, not {recipe['method']!r}")
    if min(recipe["batch_size"], recipe["seq_len"], recipe["lora_r"]) < 1:
        raise PlanError("batch size, sequence length and LoRA rank must be positive")

    lines, notes = [], []
    # 1. dataset tokens
    per_row: float | None
    if tokens is not None:
        _finite("--tokens", tokens)
        per_row = tokens / rows if rows else None
        rows = rows or 0
        source = "given (--tokens)"
        dataset = float(tokens)
        lines.append(f"dataset    {dataset:,.0f} tokens (given)")
    else:
        if rows is None:
            raise PlanError("give --rows (with --tokens-per-row, or measured on the receipts) or --tokens")
        if tokens_per_row is None:
            tokens_per_row = measure_tokens_per_row(model)
        if isinstance(tokens_per_row, TokenCount):
            per_row, source = tokens_per_row.per_row, tokens_per_row.source
        else:
            _finite("--tokens-per-row", tokens_per_row)
            per_row, source = float(tokens_per_row), "given (--tokens-per-row)"
        dataset = rows * per_row
        lines.append(
            f"dataset    {rows:,} rows × {per_row:,.1f} tokens/row = {dataset:,.0f} tokens  [{source}]"
        )
    training_tokens = dataset * epochs
    lines.append(f"× epochs   {dataset:,.0f} × {epochs:g} = {training_tokens:,.0f} training tokens")

    # 2. memory: refuse what does not fit
    if stand_in:
        peak, memory = None, None
        lines.append("memory     the stand-in needs about 2 GiB of RAM (lesson 04's training card)")
    else:
        est = _memory(
            model,
            recipe["method"],
            recipe["seq_len"],
            recipe["batch_size"],
            recipe["lora_r"],
            recipe["backend"],
            recipe["fused_cross_entropy"],
            recipe["quantize_moe_experts"],
        )
        peak, memory = per_gpu_gib(est, gpus), GPUS[gpu].memory_gib
        if peak > memory:
            options = ", ".join(
                f"{n}× {name} (≈{need:.0f} GiB each)" for name, n, need in fitting_options(est)
            )
            raise DoesNotFit(
                f"{model} {recipe['method']} ({recipe['backend']}, seq {recipe['seq_len']} × batch "
                f"{recipe['batch_size']}, r {recipe['lora_r']}) needs ≈{peak:.1f} GiB per GPU on "
                f"{gpus}× {gpu}, which has {memory:.1f} GiB. It fits: "
                f"{options or 'none of the listed GPUs (up to 8 cards)'}."
            )
        lines.append(
            f"memory     ≈{peak:.1f} GiB peak per GPU (VRAM planner, {recipe['backend']}) "
            f"≤ {memory:.1f} GiB: fits"
        )
        notes.append(
            f"recipe: {recipe['recipe']}" if method is None and backend is None else "recipe: as given"
        )

    # 3. tokens per second
    if per_row is None:
        notes.append("tokens per row unknown: micro-batches assumed full (batch × seq_len tokens)")
    microbatch = recipe["batch_size"] * min(per_row or recipe["seq_len"], recipe["seq_len"])
    if tokens_per_second is not None:
        _finite("--tokens-per-second", tokens_per_second)
        rate, how = float(tokens_per_second), "given (--tokens-per-second)"
        lines.append(f"speed      {rate:,.0f} tokens/s per GPU (given)")
    elif stand_in:
        rate, how = CPU_TOKENS / CPU_SECONDS, CPU_SOURCE
        lines.append(f"speed      {CPU_TOKENS:,} tokens ÷ {CPU_SECONDS} s = {rate:,.0f} tokens/s  [{how}]")
    else:
        active = MODELS[model].active_params_b * 1e9
        rate, utilisation = derived_tokens_per_second(gpu, active, recipe["method"], microbatch)
        how = (
            f"derived: no published speed for {model} on {gpu}; MFU {100 * utilisation:.1f} % = "
            f"{recipe['method']} at {microbatch:,.0f} tokens per micro-batch, from {QWEN_PROFILING}"
        )
        lines.append(
            f"speed      {GPUS[gpu].peak_tflops:g} TFLOPS × MFU {100 * utilisation:.1f} % ÷ "
            f"(6 × {active / 1e9:g}e9 FLOPs/token) = {rate:,.0f} tokens/s per GPU"
        )
        lines.append(
            f"           MFU: {recipe['method']} at {recipe['batch_size']} × "
            f"{microbatch / recipe['batch_size']:,.0f} = {microbatch:,.0f} tokens per micro-batch, "
            "read off Qwen-14B's published A100 speeds"
        )
        if MODELS[model].num_experts:
            notes.append(
                "MoE: FLOPs from the 6.5B active parameters with a dense model's MFU; routing and per-expert "
                "dequantisation are not modelled, so the real run is likely slower"
            )
        if gpus > 1:
            notes.append(f"{gpus} GPUs assumed to scale linearly (FSDP communication not modelled)")
        for check in throughput_check():
            run = next(r for r in PUBLISHED_RUNS if r.label == check["run"])
            if run.gpu == gpu:
                ceiling = " (a ceiling)" if run.upper_bound else ""
                notes.append(
                    f"check on {gpu}: {run.label}: published {check['published_tok_s']:,.0f} tokens/s"
                    f"{ceiling}, this derivation gives {check['derived_tok_s']:,.0f} "
                    f"({check['error_pct']:+.0f} %)"
                )
    total_rate = rate * gpus

    # 4. hours and dollars
    hours = training_tokens / total_rate / 3600
    lines.append(
        f"hours      {training_tokens:,.0f} ÷ ({rate:,.0f} × {gpus}) ÷ 3600 = {hours:.2f} h"
        + (f" ({hours * 60:.0f} min)" if hours < 1 else "")
    )
    usd, price_source = _price(gpu, price_per_hour)
    cost = hours * gpus * usd
    unit = "machine" if gpu == CPU else "GPU"
    lines.append(f"cost       {hours:.2f} h × {gpus} {unit} × ${usd:.2f}/h = ${cost:.2f}  [{price_source}]")
    if (
        not stand_in
        and MODELS[model].num_experts
        and recipe["method"] == "qlora"
        and recipe["quantize_moe_experts"]
    ):
        notes.append(
            _without_expert_quantisation(model, recipe, rows, per_row, dataset, epochs, tokens_per_second)
        )
    return Plan(
        model,
        recipe["method"],
        recipe["backend"],
        gpu,
        gpus,
        rows,
        per_row,
        source,
        training_tokens,
        epochs,
        recipe["batch_size"],
        recipe["seq_len"],
        recipe["lora_r"],
        peak,
        memory,
        rate,
        how,
        hours,
        usd,
        price_source,
        cost,
        lines,
        notes,
    )


def _without_expert_quantisation(model, recipe, rows, per_row, dataset, epochs, tokens_per_second) -> str:
    """What the same run needs when the 3-D expert weights stay 16-bit (transformers' plain 4-bit
    loading converts nn.Linear only): the fewest cards of each GPU that hold it, and their price."""
    args = [model, "qlora", recipe["seq_len"], recipe["batch_size"], recipe["lora_r"], recipe["backend"]]
    est = _memory(*args, recipe["fused_cross_entropy"], False)
    priced = []
    for name, n, need in fitting_options(est):
        other = plan_training(
            model,
            name,
            rows or None,
            tokens=dataset if not rows else None,
            tokens_per_row=per_row if rows else None,
            epochs=epochs,
            method="qlora",
            backend=recipe["backend"],
            batch_size=recipe["batch_size"],
            seq_len=recipe["seq_len"],
            lora_r=recipe["lora_r"],
            gpus=n,
            tokens_per_second=tokens_per_second,
            quantize_moe_experts=False,
        )
        priced.append(f"{n}× {name} (≈{need:.0f} GiB each): {other.hours:.2f} h, ${other.cost_usd:.2f}")
    return (
        f"without quantize_moe_experts (transformers' plain 4-bit loading keeps the experts 16-bit) the run "
        f"needs ≈{est.total_gib:.0f} GiB: " + ("; ".join(priced) or "more than 8 of any listed GPU")
    )


# --- The source article's claim ------------------------------------------------------------------------
ARTICLE_CLAIM = "a few thousand examples, QLoRA on an A100 80 GB at $2–4/h: $10–50"
CLAIM_PRICES = (2.0, 4.0)
CLAIM_COST = (10.0, 50.0)


def check_article_claim(plan: Plan) -> list[str]:
    """The claim's $10–50 against this plan's hours at the claim's own $2–4/h, with the arithmetic."""
    low, high = (plan.hours * plan.gpus * p for p in CLAIM_PRICES)
    lines = [
        f'claim      "{ARTICLE_CLAIM}"',
        f"this run   {plan.hours:.2f} h × {plan.gpus} GPU × $2–4/h = ${low:.2f}–{high:.2f}",
    ]
    # what dataset the claim's money buys at this speed
    rate = plan.tokens_per_second * plan.gpus
    tokens_for = [c / p * 3600 * rate for c, p in zip(CLAIM_COST, (CLAIM_PRICES[1], CLAIM_PRICES[0]))]
    lines.append(
        f"the claim  $10 at $4/h = 2.5 h, $50 at $2/h = 25 h → {tokens_for[0]:,.0f}–{tokens_for[1]:,.0f} "
        f"training tokens at {rate:,.0f} tokens/s"
    )
    if plan.rows:
        per_example = [t / plan.rows / plan.epochs for t in tokens_for]
        lines.append(
            f"           = {per_example[0]:,.0f}–{per_example[1]:,.0f} tokens per example for {plan.rows:,} "
            f"examples × {plan.epochs:g} epoch(s) (this dataset: {plan.tokens_per_row:,.0f})"
        )
    if high < CLAIM_COST[0]:
        verdict = f"overstated for this run: ${low:.2f}–{high:.2f} is below $10"
    elif low > CLAIM_COST[1]:
        verdict = f"understated for this run: ${low:.2f}–{high:.2f} is above $50"
    else:
        verdict = f"holds for this run: ${low:.2f}–{high:.2f} overlaps $10–50"
    lines.append(f"verdict    {verdict}")
    return lines


# --- Command line ----------------------------------------------------------------------------------------


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="time and cost of a training run before renting a GPU (lesson 04)")
    p.add_argument("--model", help=f"one of: {', '.join([*MODELS, *STAND_INS])} (or give --profile)")
    p.add_argument(
        "--profile", help="a course profile: its model, method and preset (cpu-tiny, gpu-24gb, ...)"
    )
    p.add_argument("--gpu", default=None, help=f"one of: {', '.join([*GPUS, CPU])} (default: every GPU)")
    p.add_argument("--rows", type=int, help="training examples")
    p.add_argument("--tokens-per-row", type=float, help="default: measured on the course's receipts")
    p.add_argument("--tokens", type=float, help="dataset tokens in total (instead of rows × tokens per row)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--method", choices=sorted(QWEN14B_SECONDS_PER_STEP), help="default: the model's recipe")
    p.add_argument("--backend", choices=["unsloth", "transformers"], help="default: the model's recipe")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--lora-r", type=int)
    p.add_argument("--gpus", type=int, default=1, help="how many cards (FSDP)")
    p.add_argument("--price-per-hour", type=float, help="your $ per GPU-hour (default: the dated quote)")
    p.add_argument("--tokens-per-second", type=float, help="your measured speed per GPU")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=plan_command)


def plan_command(args) -> int:
    from course_utils.profiles import PROFILES

    if args.profile and args.profile not in PROFILES:
        print(
            f"error: unknown profile {args.profile!r}; choose one of: {', '.join(PROFILES)}", file=sys.stderr
        )
        return 2
    if not args.model and not args.profile:
        print("error: give --model or --profile", file=sys.stderr)
        return 2
    model = args.model or PROFILES[args.profile].model_key
    if args.gpu:
        gpus = [args.gpu]
    elif args.profile:
        gpus = list(PROFILE_GPUS[args.profile])
    else:
        gpus = [CPU] if model in STAND_INS else list(GPUS)
    kwargs = dict(
        profile=args.profile,
        rows=args.rows,
        tokens_per_row=args.tokens_per_row,
        tokens=args.tokens,
        epochs=args.epochs,
        method=args.method,
        backend=args.backend,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lora_r=args.lora_r,
        gpus=args.gpus,
        price_per_hour=args.price_per_hour,
        tokens_per_second=args.tokens_per_second,
    )
    try:
        for gpu in gpus:
            check_names(model, gpu)
        if args.tokens is None and args.tokens_per_row is None and args.rows is not None:
            kwargs["tokens_per_row"] = measure_tokens_per_row(model)  # once for every GPU
        plans, refusals = [], []
        for gpu in gpus:
            try:
                plans.append(plan_training(model, gpu, **kwargs))
            except DoesNotFit as exc:
                refusals.append(f"{gpu}: {exc}")
    except PlanError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"plans": [p.as_dict() for p in plans], "refused": refusals}, indent=2))
        return 0 if plans else 1
    for plan in plans:
        print(plan.report())
        if plan.gpu == "A100-80GB" and plan.method == "qlora":
            print("  source article's claim:")
            print("\n".join(f"    {line}" for line in check_article_claim(plan)))
        print()
    for refusal in refusals:
        print(f"does not fit — {refusal}")
    if len(gpus) > 1:
        print("\n" + summary_table(plans, refusals))
    return 0 if plans else 1


def summary_table(plans: list[Plan], refusals: list[str] = ()) -> str:
    """One line per GPU: fits, speed, hours and dollars (the per-GPU comparison)."""
    from course_utils.profiles import format_table

    rows = [
        {
            "gpu": f"{p.gpus}× {p.gpu}",
            "peak GiB/GPU": "—" if p.peak_gib_per_gpu is None else round(p.peak_gib_per_gpu, 1),
            "tokens/s": round(p.tokens_per_second * p.gpus),
            "hours": round(p.hours, 2),
            "$/GPU-h": p.usd_per_hour,
            "cost $": round(p.cost_usd, 2),
        }
        for p in plans
    ]
    rows += [
        {
            "gpu": r.split(":")[0],
            "peak GiB/GPU": "does not fit",
            "tokens/s": "",
            "hours": "",
            "$/GPU-h": "",
            "cost $": "",
        }
        for r in refusals
    ]
    return format_table(rows)
