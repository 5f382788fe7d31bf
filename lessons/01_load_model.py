# %% [markdown]
# # 01 · Loading the model, and what is inside it
#
# You will load the model your profile picked (the 24B Mistral Small 3.2 on a 24 GB GPU, the
# offline stand-in on a CPU), tour its architecture from its config — attention heads, KV heads, the
# KV cache a long context costs — render its chat template, and stream a first reply.
#
# ## Learning objectives
# - Check the common claims about 'Mistral Small' against the configs.
# - Load model + processor per profile, and know why Unsloth is (or is not) imported.
# - Compute GQA vs MLA KV-cache cost per token and at 4k-256k context, with a plot.
# - Read Small 4's latent attention, experts and router from its stand-in, and measure its KV cache.
# - Read the v7 chat template and avoid the default-system-prompt gotcha.
# - Stream a first generation.

# %% [markdown]
# ## 1.1 Claims vs configs
#
# Three things you will read online, checked against the model registry (whose numbers come from the
# checkpoints' `config.json`):

# %%
# NBVAL_CHECK_OUTPUT
from course_utils.profiles import MODELS

small4, small32 = MODELS["mistral-small-4"], MODELS["mistral-small-3.2"]
claims = [
    (
        "'Mistral Small 4 is a 24B model'",
        f"{small4.total_params_b:g}B total, {small4.active_params_b:g}B active per token"
        f" ({small4.num_experts} experts, top-{small4.experts_per_token} + {small4.shared_experts} shared)",
    ),
    (
        "'The 24B vision model is Mistral Small'",
        f"yes: {small32.display_name}, {small32.architecture}, {small32.attention}",
    ),
    (
        "'6.5B active means it fits a small GPU'",
        f"no: all {small4.total_params_b:g}B are loaded;"
        f" 4-bit weights alone ≈ {small4.weights_gib(4.5):.0f} GiB",
    ),
    (
        "'Both have a 128k context'",
        f"Small 3.2: {small32.context_length // 1024}k, Small 4: {small4.context_length // 1024}k",
    ),
]
for claim, config_says in claims:
    print(f"{claim:<42} -> {config_says}")

# %% [markdown]
# ## 1.2 Load the model for your profile
#
# First the course decides *what* to load, without importing anything heavy: the Hub id for your
# profile (or, on `cpu-tiny`, the stand-in's folder, built offline), 4-bit or not, and why. It refuses
# here, before any download, if the model will not fit.

# %%
# NBVAL_IGNORE_OUTPUT
from course_utils.hardware import memory_report
from course_utils.models import model_source

source = model_source(PROFILE, model=MODEL, hardware=hardware)
MODEL_ID, LOAD_IN_4BIT = source.model_id, source.load_in_4bit
print(*source.reasons, sep="\n")
print(memory_report("before loading"))

# %% [markdown]
# Then the loading itself — the cell to copy into your own project. On a CUDA GPU it is Unsloth's
# `FastVisionModel` (fused kernels, 4-bit uploads, lower memory); anywhere else plain transformers, the
# API Unsloth wraps, with bitsandbytes' `BitsAndBytesConfig` for 4-bit. `import unsloth` patches
# transformers and TRL, so it happens only on the GPU branch, before any model object exists.

# %% tags=["copyable", "copy:load"]
# NBVAL_IGNORE_OUTPUT
# Load a Mistral 3 vision model (Small 3.1/3.2, Ministral 3, or a stand-in of the same architecture).
# Set MODEL_ID (a Hub id or a local folder) and LOAD_IN_4BIT (True for QLoRA) before running it.
import torch

if torch.cuda.is_available():
    from unsloth import FastVisionModel

    model, processor = FastVisionModel.from_pretrained(
        MODEL_ID, load_in_4bit=LOAD_IN_4BIT, max_seq_length=4096, use_gradient_checkpointing="unsloth"
    )
else:
    from transformers import AutoModelForImageTextToText, AutoProcessor, BitsAndBytesConfig

    quantization = None
    if LOAD_IN_4BIT:  # NF4 for the language model; vision tower, projector and output head stay unquantized
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
            llm_int8_skip_modules=["model.vision_tower", "model.multi_modal_projector", "lm_head"],
        )
    processor = AutoProcessor.from_pretrained(MODEL_ID)
    model = AutoModelForImageTextToText.from_pretrained(
        MODEL_ID,
        quantization_config=quantization,
        dtype=torch.float32,  # bf16 is slow on most CPUs
        use_safetensors=True,  # never a pickled .bin: unpickling can run code
    ).eval()
print(type(model).__name__, f"{model.num_parameters():,} parameters", "on", model.device)

# %%
# NBVAL_IGNORE_OUTPUT
print(memory_report("after loading"))

# %% [markdown]
# ## 1.3 An architecture tour, computed from the config
#
# Grouped-query attention (GQA) lets several query heads share one key/value head: Small 3.2 has 32
# query heads and 8 KV heads, so its KV cache is 4× smaller than with one KV head per query head. The
# parameter counts below are read off the loaded model.

# %%
# NBVAL_CHECK_OUTPUT
from course_utils.models import parameter_breakdown

text, vision = model.config.text_config, model.config.vision_config
print(
    f"text model: {text.model_type}, {text.num_hidden_layers} layers, hidden {text.hidden_size}, "
    f"{text.num_attention_heads} query heads / {text.num_key_value_heads} KV heads "
    f"({text.num_attention_heads // text.num_key_value_heads} queries share each KV head)"
)
print(
    f"vision tower: {vision.model_type}, {vision.num_hidden_layers} layers, patch {vision.patch_size}, "
    f"merge {model.config.spatial_merge_size}x{model.config.spatial_merge_size}"
)
for part, count in parameter_breakdown(model).items():
    print(f"  {part:<18} {count:>14,}")

# %% [markdown]
# ## 1.4 What a long context costs: the KV cache
#
# Each generated or prompt token stores keys and values for every layer. GQA stores
# `2 × kv_heads × head_dim` numbers per layer; Small 4's multi-head latent attention stores one
# compressed latent (`kv_lora_rank` = 256) plus a 64-wide RoPE key — about 7× less per token than
# Small 3.2 despite being a far bigger model. In 16-bit:

# %%
# NBVAL_CHECK_OUTPUT
from course_utils.profiles import CONTEXTS, format_table, kv_cache_table

rows = kv_cache_table()
print("KV cache in GiB per sequence (16-bit); — means beyond the model's context")
print(format_table(rows))

# %% tags=["show-output"]
# NBVAL_IGNORE_OUTPUT
import matplotlib.pyplot as plt

fig, ax = plt.subplots(figsize=(7, 4))
for row in rows:
    points = [(ctx, row[ctx]) for ctx in CONTEXTS if row[ctx] is not None]
    ax.plot(
        [p[0] // 1024 for p in points],
        [p[1] for p in points],
        marker="o",
        label=f"{row['model']} ({row['attention']})",
    )
ax.set_xscale("log", base=2)
ax.set_xlabel("context length (k tokens)")
ax.set_ylabel("KV cache, GiB per sequence (16-bit)")
ax.set_title("GQA vs MLA: memory for one long sequence")
ax.grid(True, alpha=0.3)
ax.legend()
plt.show()

# %% [markdown]
# ### Small 4's attention and experts, read from its stand-in — and its KV cache measured
#
# The table above is arithmetic from the config. The Small 4 stand-in has Small 4's real architecture
# (`Mistral4` text model: multi-head latent attention and a mixture of experts) at toy sizes, so its
# config names every part — and a forward pass shows what the cache really holds. Whatever `MODEL` you
# picked, this loads the stand-in (a few MB, random weights): it shows the structure and the memory
# arithmetic, not the 119B model's quality.

# %%
# NBVAL_IGNORE_OUTPUT
from transformers import AutoModelForImageTextToText

from course_utils.tiny import build_stand_in

small4_model = AutoModelForImageTextToText.from_pretrained(
    build_stand_in("tiny-mistral-small-4"), dtype=torch.float32
).eval()

# %%
# NBVAL_CHECK_OUTPUT
t4 = small4_model.config.text_config
print(
    f"{t4.model_type}: {t4.num_hidden_layers} layers, hidden {t4.hidden_size}, {t4.num_attention_heads} heads"
)
print(
    f"MLA: queries through a {t4.q_lora_rank}-wide latent (q_a_proj -> q_b_proj); keys and values through "
    f"a {t4.kv_lora_rank}-wide latent (kv_a_proj_with_mqa -> kv_b_proj); per head "
    f"{t4.qk_nope_head_dim} + {t4.qk_rope_head_dim} (RoPE) key dims, {t4.v_head_dim} value dims"
)
layer = small4_model.model.language_model.layers[0]
print(
    f"MoE: {t4.n_routed_experts} routed experts, {t4.num_experts_per_tok} chosen per token, "
    f"{t4.n_shared_experts} shared expert always on; each expert {t4.moe_intermediate_size} wide"
)
print(
    f"router: {type(layer.mlp.gate).__name__}, one score per expert from the hidden state "
    f"(weight {tuple(layer.mlp.gate.weight.shape)}), top-{t4.num_experts_per_tok} renormalised: "
    f"{t4.norm_topk_prob}; experts stored as 3-D tensors: "
    + ", ".join(f"{name} {tuple(p.shape)}" for name, p in layer.mlp.experts.named_parameters())
)

# %% [markdown]
# Now measure: run 64 tokens through the stand-in with `use_cache=True` and add up the bytes the cache
# holds. transformers' Mistral 4 caches the compressed latent (`kv_lora_rank` wide) and the RoPE key part
# (`qk_rope_head_dim`) per layer — not full keys and values per head — so the measured bytes per token
# should equal the MLA formula the table used (here in float32, 4 bytes per number):

# %%
# NBVAL_CHECK_OUTPUT
from course_utils.profiles import stand_in_spec

prompt_tokens = 64
input_ids = torch.arange(1000, 1000 + prompt_tokens).unsqueeze(0)  # any token ids: only the shapes matter
with torch.inference_mode():
    cache = small4_model(input_ids=input_ids, use_cache=True).past_key_values
cached_bytes = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
spec = stand_in_spec("tiny-mistral-small-4", small4_model.config, small4_model.num_parameters())
per_head_kv = (
    t4.num_hidden_layers
    * t4.num_attention_heads
    * (t4.qk_nope_head_dim + t4.qk_rope_head_dim + t4.v_head_dim)
)
print(
    f"measured: {cached_bytes:,} bytes for {prompt_tokens} tokens",
    f"= {cached_bytes // prompt_tokens} bytes per token",
)
print(
    "computed: layers x (kv_lora_rank + qk_rope_head_dim) x 4 =",
    f"{spec.kv_cache_bytes_per_token(4)} bytes per token",
)
print(f"full keys and values per head would be {per_head_kv * 4} bytes per token")
print("measured == computed:", cached_bytes == spec.kv_cache_bytes_per_token(4) * prompt_tokens)

# %% [markdown]
# ## 1.5 The chat template
#
# Mistral's v7 format has no spaces around its tags and no roles written out:
# `<s>[SYSTEM_PROMPT]…[/SYSTEM_PROMPT][INST]user[/INST]assistant</s>`. mistral-common is Mistral's
# reference encoder; the course's template matches it token for token (the tests check hundreds of
# random conversations, images included).
#
# ⚠️ **The default-system-prompt gotcha.** The HF-format template on the Hub inserts a default system
# prompt *with today's date* when you give none; mistral-common inserts nothing. Train without a system
# prompt, serve through a template that adds one, and the model sees a prompt it never trained on. Pass
# an explicit system prompt in training *and* serving — and keep one template for both (lesson 06
# generates the Ollama Modelfile from this same template).
#
# With `MODEL = "mistral-small-4"` the same cells show Small 4's format (mistral-common's v15: the same
# tags, plus `[MODEL_SETTINGS]` for `reasoning_effort` and `[THINK]…[/THINK]` traces — lesson 03), checked
# against mistral-common with the model's own `tekken.json`.

# %%
# NBVAL_CHECK_OUTPUT
from course_utils.chat import reference_token_ids

conversation = [
    {"role": "system", "content": "You extract receipts to JSON."},
    {"role": "user", "content": "Café Nero, 2 × flat white 3.40 EUR"},
    {"role": "assistant", "content": '{"merchant": "Café Nero", "total": 6.80, "currency": "EUR"}'},
]
print(processor.apply_chat_template(conversation, tokenize=False))
ids = processor.apply_chat_template(conversation, tokenize=True, return_dict=True)["input_ids"]
ids = ids.tolist()[0] if hasattr(ids, "tolist") else ids
reference = reference_token_ids(conversation, tekken_file=source.tekken_file)  # v15's own file on Small 4
print(len(ids), "tokens; identical to mistral-common:", ids == reference)

# %% [markdown]
# The template marks the assistant's reply with `{% generation %}`, so training can compute the loss on
# the reply (and its `</s>`) only — lesson 03 builds on this:

# %%
# NBVAL_CHECK_OUTPUT
out = processor.apply_chat_template(
    conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
)
ids, mask = out["input_ids"], out["assistant_masks"]
ids = ids.tolist()[0] if hasattr(ids, "tolist") else ids
mask = mask[0] if isinstance(mask[0], list) else mask
print("trained on:", repr(processor.tokenizer.decode([i for i, m in zip(ids, mask) if m])))

# %% [markdown]
# ## 1.6 A first streamed generation
#
# `stream()` yields text as it is produced. On `cpu-tiny` the weights are random, so the reply is
# gibberish — but it is the same `generate` call a GPU makes with the real model. Greedy decoding
# (temperature 0) is deterministic; for real use Mistral recommends temperature 0.15 for Small 3.2.

# %%
# NBVAL_IGNORE_OUTPUT
from course_utils.chat import stream, user_message

question = [user_message("In one sentence: what is a mixture of experts?")]
for piece in stream(model, processor, question, max_new_tokens=24, temperature=0.0):
    print(piece, end="", flush=True)
print()

# %% [markdown]
# ## Summary
#
# - Small 3.2: 24B dense, GQA (32 q / 8 kv heads), 128k context; Small 4: 119B MoE, 6.5B active,
#   MLA, 256k context. Memory follows total parameters; the KV cache follows the attention design.
# - Small 4's stand-in names the parts (MLA latents, routed and shared experts, router) and its measured
#   cache equals the MLA formula: a latent plus a RoPE key per layer and token.
# - One loading cell: Unsloth's `FastVisionModel` on CUDA, transformers (+ `BitsAndBytesConfig`) elsewhere;
#   `model_source(profile)` says what to load and why, and refuses what will not fit.
# - The v7 template matches mistral-common token for token; always pass an explicit system prompt.
#
# ## Exercises
#
# 🐢 How many bytes does **Mistral Small 3.1** add to its KV cache per token (16-bit)? Compute it from
# layers, KV heads and head dimension (or from `MODELS`).

# %%
from course_utils.exercises import check

small31_bytes_per_token = None  # TODO: layers x 2 (K and V) x kv_heads x head_dim x 2 bytes
# SOLUTION: small31_bytes_per_token = MODELS["mistral-small-3.1"].kv_cache_bytes_per_token()
check("01-kv-bytes", small31_bytes_per_token)

# %% [markdown]
# 🐕 For one 128k-token sequence, how many times more KV-cache memory does Small 3.2 need than Small 4?
# (Round to one decimal.)

# %%
ratio = None  # TODO: use kv_cache_table() or kv_cache_bytes_per_token()
# SOLUTION: ratio = round(
# SOLUTION:     MODELS["mistral-small-3.2"].kv_cache_bytes_per_token()
# SOLUTION:     / MODELS["mistral-small-4"].kv_cache_bytes_per_token(),
# SOLUTION:     1,
# SOLUTION: )
check("01-kv-ratio", ratio)

# %% [markdown]
# 🦁 Write a two-turn conversation of your own **with** a system prompt (system, then user/assistant
# twice); the check confirms the processor's ids equal `reference_token_ids(...)`. Then put `[/INST]`
# inside a user message and see them differ — why is that a prompt-injection risk when you build training
# data from user text?

# %%
my_conversation = None  # TODO: a list of {"role": ..., "content": ...} messages
# SOLUTION: my_conversation = [
# SOLUTION:     {"role": "system", "content": "You answer in one short sentence."},
# SOLUTION:     {"role": "user", "content": "Hi"},
# SOLUTION:     {"role": "assistant", "content": "Hello!"},
# SOLUTION:     {"role": "user", "content": "What is a token?"},
# SOLUTION:     {"role": "assistant", "content": "A piece of text the model reads as one unit."},
# SOLUTION: ]
check("01-own-conversation", my_conversation, processor=processor)
