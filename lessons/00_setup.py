# %% [markdown]
# # 00 · Setup and hardware planning
#
# You will find out which Mistral Small model your hardware can fine-tune, check that the
# environment is complete, and build the offline stand-in model that lets every lesson run on any CPU.
# The same cells run on a free Colab T4, a 24 GB card, an 80 GB card or a laptop: a *profile* picks the
# scale, the code path stays the same.
#
# ## Learning objectives
# - Tell Mistral Small 4 (119B MoE) from Mistral Small 3.1/3.2 (24B dense) — from their configs.
# - Read your accelerator, memory and disk, and see which rung of the model ladder fits.
# - Choose a profile (widget or plain code) and understand the preflight refusal.
# - Run the environment check and build the offline stand-ins.

# %% [markdown]
# ## 0.1 The model ladder
#
# "Mistral Small" names two different architectures. **Mistral Small 3.1/3.2** is a 24B *dense* vision
# model with grouped-query attention (GQA) and a 128k context — the one most tutorials mean.
# **Mistral Small 4** is a 119B *mixture of experts*: 128 experts, 4 chosen per token plus a shared one,
# so only about 6.5B parameters work per token — but all 119B must sit in memory. It uses multi-head
# latent attention (MLA) and a 256k context. Every number below comes from the model configs
# (`course_utils.profiles.MODELS`), not from blog posts.

# %%
# NBVAL_CHECK_OUTPUT
from course_utils.profiles import format_table, ladder_rows

print(format_table(ladder_rows()))

# %% [markdown]
# The course picks a rung from your hardware:
#
# | profile | hardware | model | method |
# |---|---|---|---|
# | `cpu-tiny` | any CPU | offline stand-in (real architecture + tokenizer) | transformers + peft LoRA |
# | `t4-16gb` | free Colab T4 | Ministral 3 8B (vision) | Unsloth QLoRA |
# | `gpu-24gb` | L4, A10G, RTX 4090 | Mistral Small 3.2 24B | Unsloth QLoRA |
# | `gpu-80gb` | A100, H100, H200 | Small 3.2 LoRA, or Small 4 QLoRA (≈68 GiB) | Unsloth, transformers+peft |
#
# ## 0.2 Your hardware
#
# `detect()` reads the accelerator with torch only. It does **not** import Unsloth: importing Unsloth
# patches transformers and TRL, so the course makes that choice once, in `course_utils.models`.

# %% tags=["show-output"]
# NBVAL_IGNORE_OUTPUT
from course_utils.hardware import describe_profiles

print(hardware.summary())
print(format_table(describe_profiles(hardware)))

# %% [markdown]
# ## 0.3 Choose a profile
#
# The dropdown and the `PROFILE` variable in the parameters cell do the same thing; the variable is the
# source of truth, so "Run all" and scripts behave exactly like clicking. Choosing a profile your
# machine cannot hold is refused **before** anything is downloaded — with what is needed, what is there
# and what to pick instead.

# %%
# NBVAL_IGNORE_OUTPUT
from course_utils.profiles import PROFILES, resolve_profile
from course_utils.widgets import choice


def use_profile(name):
    global PROFILE, profile
    PROFILE, profile = name, resolve_profile(name, hardware=hardware, model=MODEL)
    print("profile set to", name, "—", profile.model_key)


picker = choice(list(PROFILES), profile.name, "Profile", on_change=use_profile)

# %%
# NBVAL_CHECK_OUTPUT
from course_utils.hardware import HardwareInfo, PreflightError, preflight

# What a learner on a free Colab T4 sees when they ask for the 24B model:
t4 = HardwareInfo("cuda", "Tesla T4", 14.7, ram_gib=12.7, disk_free_gib=70, cpu_count=2, environment="colab")
try:
    preflight(PROFILES["gpu-24gb"], t4)
except PreflightError as refusal:
    print(refusal)

# %%
need = preflight(profile, hardware)  # raises with the same kind of message if your choice does not fit
print(
    f"{profile.name}: needs about {need['memory_gib']:.0f} GiB (GPU) memory"
    f" and {need['disk_gib']:.1f} GiB disk — OK"
)

# %% [markdown]
# ## 0.4 Environment check
#
# `python -m course_utils doctor` prints the same report in a terminal. A version different from
# `requirements.txt` is a `[FAIL]`: the course's pins are one tested set (Unsloth 2026.10 caps
# transformers ≤ 5.17, TRL ≤ 1.15, datasets < 5). torch (and triton/xformers, built against it) is the
# exception: Colab's own CUDA torch is kept, and a different version is a `[NOTE]`, not a failure.

# %%
# NBVAL_IGNORE_OUTPUT
from course_utils.cli import REPO_ROOT, check_packages, read_pins

requirements = REPO_ROOT / "requirements.txt"
rows = check_packages(read_pins(requirements) if requirements.is_file() else None)
for row in rows:
    print(row.line())
failures = [row.name for row in rows if not row.ok]
assert not failures, f"Fix these before going on: {failures} — run `pip install -r requirements.txt`"

# %% [markdown]
# ## 0.5 The offline stand-ins
#
# On a CPU the course trains a *stand-in*: the real `Mistral3ForConditionalGeneration` architecture
# (Pixtral vision tower + Mistral text model), the **real** Tekken tokenizer that ships inside
# `mistral-common` (131,072 tokens) and the real v7 chat format — only the weights are small and random.
# Its token ids equal the real model's, so data prepared for it is data prepared for the 24B model, and
# its GGUF export goes through the same llama.cpp converter. Building both takes a few seconds and is
# cached under `outputs/stand-ins/`; the same seed gives byte-identical files.

# %%
# NBVAL_IGNORE_OUTPUT
from course_utils.tiny import build_all, stand_in_info

stand_ins = build_all()
for name, path in stand_ins.items():
    info = stand_in_info(path)
    print(f"{name}: {info['num_params'] / 1e6:.1f}M parameters, fingerprint {info['fingerprint']}")

# %%
# NBVAL_CHECK_OUTPUT
from transformers import AutoConfig

for name, path in stand_ins.items():
    text = AutoConfig.from_pretrained(path).text_config
    kind = (
        f"MLA (latent {text.kv_lora_rank}), {text.n_routed_experts} experts"
        if text.model_type == "mistral4"
        else f"GQA {text.num_attention_heads} q / {text.num_key_value_heads} kv heads"
    )
    print(
        f"{name}: text model '{text.model_type}', {text.num_hidden_layers} layers, {kind}, "
        f"vocab {text.vocab_size}, context {text.max_position_embeddings}"
    )

# %% [markdown]
# ## Summary
#
# - Mistral Small 3.1/3.2 is 24B dense (GQA, 128k); Mistral Small 4 is a 119B MoE with 6.5B active
#   (MLA, 256k). Fine-tuning memory follows *total* parameters, not active ones.
# - `auto` picks the largest rung your GPU fits; `COURSE_PROFILE` or `PROFILE` overrides it, and
#   preflight refuses an impossible choice before downloading anything.
# - The CPU stand-ins share the real architecture, tokenizer and chat format, so every lesson runs
#   anywhere, and the code you run is the code a GPU runs.
#
# ## Exercises
#
# 🐢 **Read the ladder.** How many parameters does Mistral Small 4 use *per token*, in billions?

# %%
from course_utils.exercises import check

active_params_b = None  # TODO: replace None with your answer (a number, in billions)
# SOLUTION: active_params_b = 6.5  # the ladder's "params" column: 119B total (6.5B active)
check("00-active-params", active_params_b)

# %% [markdown]
# 🐕 **Pick for a friend.** A friend has an A100 with 40 GB (it reports 39.4 GiB). Which profile does
# `auto` give them? Check with `course_utils.profiles.pick_profile`.

# %%
friend_profile = None  # TODO: a profile name such as "t4-16gb"
# SOLUTION: from course_utils.profiles import pick_profile
# SOLUTION:
# SOLUTION: friend_profile = pick_profile("cuda", 39.4)
check("00-friend-profile", friend_profile)

# %% [markdown]
# 🦁 **Override.** Set the environment variable `COURSE_PROFILE` to `t4-16gb` *inside Python*
# (`os.environ[...]`), resolve `"auto"` again and keep the checkpoint that profile would download (its
# `load_id`, the id `from_pretrained` is given). Then remove the variable again (or use
# `unittest.mock.patch.dict(os.environ, …)`, which puts it back for you) so later cells keep your real
# profile. The check looks at both.

# %%
overridden = None  # TODO: set the variable, then resolve_profile("auto", hardware=hardware).load_id
# SOLUTION: import os
# SOLUTION: from unittest import mock
# SOLUTION:
# SOLUTION: from course_utils.profiles import resolve_profile
# SOLUTION:
# SOLUTION: with mock.patch.dict(os.environ, {"COURSE_PROFILE": "t4-16gb"}):
# SOLUTION:     overridden = resolve_profile("auto", hardware=hardware).load_id
check("00-override", overridden)
