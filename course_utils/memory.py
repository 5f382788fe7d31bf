"""Estimate peak training memory from a model's config — before renting a GPU.

Backs lessons 00 and 04 (the VRAM planner).

peak = weights + adapters + gradients + optimizer state + activations + logits
       + CUDA context, all × (1 + allocator overhead)

Where each term comes from (bytes; P = parameters, s = sequence length, b = batch size):

* **weights** — 16-bit: 2·P. QLoRA (NF4, double quantization): the decoder's linear layers take
  4.127 bits per parameter (4-bit codes + one fp8 scale per 64 weights + one fp32 scale per 256
  scales); embeddings, lm_head, norms and the vision tower stay 16-bit (bitsandbytes skips them).
* **adapters** — LoRA adds r·(d_in + d_out) parameters per targeted linear layer (q, k, v, o, gate,
  up, down in every decoder layer), kept in fp32: 4 bytes each.
* **gradients** — one per trainable parameter (fp32 for adapters; bf16 for a full fine-tune).
* **optimizer** — AdamW keeps two moments: 8 bytes per trainable parameter in fp32, 2 with
  8-bit AdamW (bitsandbytes' ``adamw_8bit``).
* **activations** — a decoder layer saves ≈ (10·h + 3·i) values per token for its backward pass
  (norm outputs, q/k/v/attention/o, gate/up/act for the MLP; FlashAttention/SDPA keep no s² matrix),
  2 bytes each, with Unsloth's fused kernels. Stock transformers + peft layers keep ≈ (18·h + 5·i):
  RMSNorm keeps fp32 copies and SiLU, its product with up and each LoRA input are separate tensors —
  measured with ``benchmarks/gpu_smoke.py`` on an H200 (2026-11-29): a QLoRA Mistral Small 3.2 layer
  kept 0.342 GiB for 2 × 350 tokens without checkpointing, where 10·h + 3·i gave 0.195 GiB.
  Without checkpointing every layer keeps them; with gradient checkpointing only each layer's input
  (h values) is kept and one layer is recomputed at a time; Unsloth's "unsloth" mode
  also offloads those inputs to CPU RAM.
* **logits** — the loss needs s·b·V logits; a plain loss keeps the bf16 logits, their fp32 upcast,
  the fp32 log-softmax and its fp32 gradient (2 + 4 + 4 + 4 = 14 bytes each — huge with a 131k
  vocabulary); Unsloth's fused, chunked cross-entropy (and axolotl's Cut Cross Entropy) never
  materialises them.
* **CUDA context** ≈ 0.6 GiB, and the caching allocator's fragmentation ≈ 8 %.

The **backend** decides the last two memory savers. ``"unsloth"``: offloaded gradient checkpointing
(``use_gradient_checkpointing="unsloth"``) and the fused cross-entropy. ``"transformers"``
(transformers + peft + bitsandbytes): checkpoints stay on the GPU and a plain loss materialises the
logits (the course's own CPU trainer computes logits only at the labelled positions, so it needs less).
Either can be overridden with ``offload_checkpoints`` / ``fused_cross_entropy``.

MoE experts: transformers' bitsandbytes 4-bit converts ``nn.Linear`` only, so Small 4's 3-D expert
weights stay 16-bit unless the trainer quantises them itself (axolotl's ``quantize_moe_experts``):
``quantize_moe_experts=False`` plans that plain case.

Calibrated per backend against published peaks (``CALIBRATION``: each with its source);
``calibration_report()`` prints the error of each and ``calibration_summary()`` the worst per backend.
Treat the result as a plan, then check the measured peak after a few steps.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from course_utils.profiles import MODELS, Backend, GiB, Method, ModelSpec

CUDA_CONTEXT_GIB = 0.6
ALLOCATOR_OVERHEAD = 0.08
NF4_BITS = 4.127
# Values a decoder layer keeps per token for its backward pass, as (a, b) in a·h + b·i (module docstring).
ACTIVATION_VALUES: dict[str, tuple[int, int]] = {"unsloth": (10, 3), "transformers": (18, 5)}


@dataclass(frozen=True)
class Architecture:
    """The config numbers the estimate needs."""

    name: str
    total_params: float
    num_layers: int
    hidden_size: int
    intermediate_size: int  # dense MLP width (the shared-expert width for MoE layers)
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int = 131072
    tie_word_embeddings: bool = False
    vision_params: float = 0.0
    moe_expert_params: float = 0.0  # routed-expert weights (not LoRA targets here)
    mla: dict | None = None  # q_lora_rank, kv_lora_rank, qk_rope_head_dim, qk_nope_head_dim, v_head_dim


def architecture_of(spec: ModelSpec) -> Architecture:
    """The estimate's view of a model of the course's registry (``profiles.MODELS``)."""
    mla = None
    if spec.attention == "MLA":
        mla = {
            "q_lora_rank": spec.q_lora_rank,
            "kv_lora_rank": spec.kv_lora_rank,
            "qk_rope_head_dim": spec.qk_rope_head_dim,
            "qk_nope_head_dim": spec.qk_nope_head_dim,
            "v_head_dim": spec.v_head_dim,
        }
    experts = (spec.num_experts or 0) * spec.num_layers * 3 * spec.hidden_size * spec.intermediate_size
    return Architecture(
        spec.key,
        spec.total_params_b * 1e9,
        spec.num_layers,
        spec.hidden_size,
        spec.intermediate_size,
        spec.num_attention_heads,
        spec.num_key_value_heads,
        spec.head_dim,
        vocab_size=spec.vocab_size,
        tie_word_embeddings=spec.tie_word_embeddings,
        vision_params=spec.vision_params_b * 1e9,
        moe_expert_params=experts,
        mla=mla,
    )


# The course's models come from the one registry; two more models only to check the estimate against
# published measurements (Unsloth's benchmarks, ``CALIBRATION``).
ARCHITECTURES: dict[str, Architecture] = {key: architecture_of(spec) for key, spec in MODELS.items()} | {
    "llama-3.1-8b": Architecture("llama-3.1-8b", 8.03e9, 32, 4096, 14336, 32, 8, 128, vocab_size=128256),
    "llama-3.3-70b": Architecture("llama-3.3-70b", 70.6e9, 80, 8192, 28672, 64, 8, 128, vocab_size=128256),
}

METHODS = ("qlora", "lora", "full")
BACKENDS: tuple[Backend, ...] = ("unsloth", "transformers")

# What each backend does by default: (offload the checkpointed layer inputs to CPU, fused cross-entropy)
BACKEND_DEFAULTS: dict[str, tuple[bool, bool]] = {
    "unsloth": (True, True),  # use_gradient_checkpointing="unsloth" + its chunked cross-entropy
    "transformers": (False, False),  # checkpoints on the GPU, plain cross-entropy over all logits
}


@dataclass(frozen=True)
class Estimate:
    model: str
    method: Method
    seq_len: int
    batch_size: int
    lora_r: int
    gradient_checkpointing: bool
    backend: Backend
    weights_gib: float
    adapters_gib: float
    gradients_gib: float
    optimizer_gib: float
    activations_gib: float
    logits_gib: float
    cuda_context_gib: float
    overhead_gib: float
    total_gib: float

    def as_dict(self) -> dict:
        return asdict(self)

    def breakdown(self) -> str:
        rows = [(k.replace("_gib", ""), v) for k, v in self.as_dict().items() if k.endswith("_gib")]
        return "\n".join(f"{name:<14} {value:8.2f} GiB" for name, value in rows)


def lora_parameters(arch: Architecture, r: int) -> float:
    """LoRA parameters on every decoder layer's attention and MLP projections."""
    h, i = arch.hidden_size, arch.intermediate_size
    if arch.mla:
        m = arch.mla
        heads = arch.num_attention_heads
        q_out = heads * (m["qk_nope_head_dim"] + m["qk_rope_head_dim"])
        attention = [
            (h, m["q_lora_rank"]),
            (m["q_lora_rank"], q_out),
            (h, m["kv_lora_rank"] + m["qk_rope_head_dim"]),
            (m["kv_lora_rank"], heads * (m["qk_nope_head_dim"] + m["v_head_dim"])),
            (heads * m["v_head_dim"], h),
        ]
    else:
        q = arch.num_attention_heads * arch.head_dim
        kv = arch.num_key_value_heads * arch.head_dim
        attention = [(h, q), (h, kv), (h, kv), (q, h)]
    mlp = [(h, i), (h, i), (i, h)]
    return arch.num_layers * r * sum(a + b for a, b in attention + mlp)


def estimate_training_memory(
    model: str | Architecture,
    method: Method = "qlora",
    seq_len: int = 2048,
    batch_size: int = 1,
    lora_r: int = 16,
    gradient_checkpointing: bool = True,
    optimizer: str = "adamw_8bit",
    offload_checkpoints: bool | None = None,
    fused_cross_entropy: bool | None = None,
    *,
    backend: Backend = "unsloth",
    quantize_moe_experts: bool = True,
) -> Estimate:
    """Peak training memory, term by term (see the module docstring for the formula).

    ``offload_checkpoints`` / ``fused_cross_entropy`` left at ``None`` take the ``backend``'s defaults
    (``BACKEND_DEFAULTS``).
    """
    arch = ARCHITECTURES[model] if isinstance(model, str) else model
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if seq_len < 1 or batch_size < 1 or lora_r < 1:
        raise ValueError("seq_len, batch_size and lora_r must be positive")
    if backend not in BACKEND_DEFAULTS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    default_offload, default_fused = BACKEND_DEFAULTS[backend]
    offload_checkpoints = default_offload if offload_checkpoints is None else offload_checkpoints
    fused_cross_entropy = default_fused if fused_cross_entropy is None else fused_cross_entropy
    embeddings = arch.vocab_size * arch.hidden_size * (1 if arch.tie_word_embeddings else 2)
    unquantized = embeddings + arch.vision_params
    quantizable = arch.total_params - unquantized
    if method == "qlora" and not quantize_moe_experts:  # 3-D expert weights left in 16-bit
        unquantized += arch.moe_expert_params
        quantizable -= arch.moe_expert_params
    if method == "qlora":
        weights = quantizable * NF4_BITS / 8 + unquantized * 2
    else:
        weights = arch.total_params * 2
    optimizer_bytes = 2 if optimizer == "adamw_8bit" else 8
    if method == "full":
        trainable = arch.total_params
        adapters, gradients = 0.0, trainable * 2
    else:
        trainable = lora_parameters(arch, lora_r)
        adapters, gradients = trainable * 4, trainable * 4
    optimizer_state = trainable * optimizer_bytes

    tokens = seq_len * batch_size
    per_h, per_i = ACTIVATION_VALUES[backend]
    per_layer = 2 * (per_h * arch.hidden_size + per_i * arch.intermediate_size) * tokens
    if not gradient_checkpointing:
        activations = arch.num_layers * per_layer
    else:
        kept_inputs = 0 if offload_checkpoints else arch.num_layers * 2 * arch.hidden_size * tokens
        activations = kept_inputs + per_layer
    logits = 0 if fused_cross_entropy else tokens * arch.vocab_size * 14
    subtotal = weights + adapters + gradients + optimizer_state + activations + logits
    overhead = ALLOCATOR_OVERHEAD * subtotal
    total = subtotal + overhead + CUDA_CONTEXT_GIB * GiB

    def g(v):
        return v / GiB

    return Estimate(
        arch.name,
        method,
        seq_len,
        batch_size,
        lora_r,
        gradient_checkpointing,
        backend,
        g(weights),
        g(adapters),
        g(gradients),
        g(optimizer_state),
        g(activations),
        g(logits),
        CUDA_CONTEXT_GIB,
        g(overhead),
        g(total),
    )


@dataclass(frozen=True)
class CalibrationPoint:
    """A published peak-memory measurement of one training run, and where it was published."""

    model: str
    method: Method
    seq_len: int
    batch_size: int
    lora_r: int
    backend: Backend
    measured_gib: float
    source: str
    url: str
    fused_cross_entropy: bool | None = None  # None: the backend's default
    quantize_moe_experts: bool = True

    def estimate(self) -> Estimate:
        return estimate_training_memory(
            self.model,
            self.method,
            self.seq_len,
            self.batch_size,
            self.lora_r,
            fused_cross_entropy=self.fused_cross_entropy,
            backend=self.backend,
            quantize_moe_experts=self.quantize_moe_experts,
        )


# Unsloth's context-length benchmarks (QLoRA 4-bit on every linear layer, r 32, batch 1, every sequence
# padded to the length shown: the longest that fits the card, so the real peak is at most the card).
UNSLOTH_BENCHMARKS = "https://github.com/unslothai/unsloth (README, context length benchmarks; also its docs)"
CALIBRATION_TOLERANCE_PCT = 20.0

CALIBRATION: list[CalibrationPoint] = [
    CalibrationPoint(
        "llama-3.1-8b",
        "qlora",
        40724,
        1,
        32,
        "unsloth",
        16.0,
        "Unsloth benchmarks: Llama 3.1 8B, longest context in 16 GB",
        UNSLOTH_BENCHMARKS,
    ),
    CalibrationPoint(
        "llama-3.1-8b",
        "qlora",
        78475,
        1,
        32,
        "unsloth",
        24.0,
        "Unsloth benchmarks: Llama 3.1 8B, 24 GB",
        UNSLOTH_BENCHMARKS,
    ),
    CalibrationPoint(
        "llama-3.1-8b",
        "qlora",
        342733,
        1,
        32,
        "unsloth",
        80.0,
        "Unsloth benchmarks: Llama 3.1 8B, 80 GB",
        UNSLOTH_BENCHMARKS,
    ),
    CalibrationPoint(
        "llama-3.3-70b",
        "qlora",
        12106,
        1,
        32,
        "unsloth",
        48.0,
        "Unsloth benchmarks: Llama 3.3 70B, 48 GB",
        UNSLOTH_BENCHMARKS,
    ),
    CalibrationPoint(
        "llama-3.3-70b",
        "qlora",
        89389,
        1,
        32,
        "unsloth",
        80.0,
        "Unsloth benchmarks: Llama 3.3 70B, 80 GB (A100)",
        UNSLOTH_BENCHMARKS,
    ),
    # Unsloth's Magistral Small 2509 notebook (Mistral Small 3.2's 24B architecture), run on a Colab L4
    # and saved with its outputs: max_seq_length 2048, batch 2, r 32, use_gradient_checkpointing="unsloth",
    # adamw_8bit -> "Peak reserved memory = 18.139 GB" (torch.cuda.max_memory_reserved() / 1024**3).
    CalibrationPoint(
        "mistral-small-3.2",
        "qlora",
        2048,
        2,
        32,
        "unsloth",
        18.139,
        "Unsloth notebook: Magistral Small 24B QLoRA on an L4, peak reserved",
        "https://github.com/unslothai/notebooks/blob/main/nb/Magistral_(24B)-Reasoning-Conversational.ipynb",
    ),
    CalibrationPoint(
        "llama-3.1-8b",
        "qlora",
        5789,
        1,
        32,
        "transformers",
        24.0,
        "Unsloth benchmarks: Hugging Face + FA2, Llama 3.1 8B, 24 GB",
        UNSLOTH_BENCHMARKS,
    ),
    CalibrationPoint(
        "llama-3.1-8b",
        "qlora",
        28454,
        1,
        32,
        "transformers",
        80.0,
        "Unsloth benchmarks: Hugging Face + FA2, Llama 3.1 8B, 80 GB",
        UNSLOTH_BENCHMARKS,
    ),
    CalibrationPoint(
        "llama-3.3-70b",
        "qlora",
        6916,
        1,
        32,
        "transformers",
        80.0,
        "Unsloth benchmarks: Hugging Face + FA2, Llama 3.3 70B, 80 GB",
        UNSLOTH_BENCHMARKS,
    ),
    # axolotl (transformers + peft + bitsandbytes, its quantize_moe_experts and the Cut Cross Entropy
    # plugin): examples/mistral4/qlora-vision.yml, r 32, sequence_len 2048, micro-batch 1 -> "~68 GiB".
    CalibrationPoint(
        "mistral-small-4",
        "qlora",
        2048,
        1,
        32,
        "transformers",
        68.0,
        "axolotl examples/mistral4 README: Small 4 QLoRA (vision, no experts)",
        "https://github.com/axolotl-ai-cloud/axolotl/blob/main/examples/mistral4/README.md",
        fused_cross_entropy=True,
    ),
]


def calibration_report(backend: Backend | None = None) -> list[dict]:
    """Estimate vs each published measurement (of one backend, or all), with the relative error."""
    rows = []
    for point in CALIBRATION:
        if backend is not None and point.backend != backend:
            continue
        est = point.estimate().total_gib
        rows.append(
            {
                "backend": point.backend,
                "source": point.source,
                "seq_len": point.seq_len,
                "measured_gib": point.measured_gib,
                "estimate_gib": round(est, 1),
                "error_pct": round(100 * (est - point.measured_gib) / point.measured_gib, 1),
            }
        )
    return rows


def calibration_summary() -> list[dict]:
    """Per backend: how many published points, the mean error (bias) and the worst error."""
    rows = []
    for backend in BACKENDS:
        errors = [r["error_pct"] for r in calibration_report(backend)]
        rows.append(
            {
                "backend": backend,
                "points": len(errors),
                "mean_error_pct": round(sum(errors) / len(errors), 1),
                "worst_error_pct": max(errors, key=abs),
                "tolerance_pct": CALIBRATION_TOLERANCE_PCT,
            }
        )
    return rows


def method_table(
    model: str, seq_len: int = 2048, batch_size: int = 1, lora_r: int = 16, backend: Backend = "unsloth"
) -> list[dict]:
    """QLoRA / LoRA / full for one model — the honest version of the usual hardware table."""
    rows = []
    for method in METHODS:
        est = estimate_training_memory(
            model, method, seq_len, batch_size, lora_r, optimizer="adamw_8bit", backend=backend
        )
        rows.append(
            {
                "model": model,
                "method": method,
                "weights": round(est.weights_gib, 1),
                "training state": round(est.adapters_gib + est.gradients_gib + est.optimizer_gib, 1),
                "activations": round(est.activations_gib + est.logits_gib, 1),
                "total GiB": round(est.total_gib, 1),
            }
        )
    return rows
