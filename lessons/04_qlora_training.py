# %% [markdown]
# # 04 · QLoRA fine-tuning that really learns
#
# The lesson the course exists for. You will see what LoRA and 4-bit NF4 quantization do, plan the
# GPU memory before renting one, and fine-tune on the receipts from lesson 03 — Unsloth QLoRA on a GPU,
# transformers + peft on a CPU. On `cpu-tiny` the same cell really trains the stand-in: you will watch
# the loss fall and the share of valid JSON rise from 0 to above 0.9 in about three minutes. Then you
# interrupt a run, resume it, and save the adapter with a training card.
#
# ## Learning objectives
# - Explain LoRA (low-rank updates) and NF4 (normal-float 4-bit) with numbers.
# - Estimate peak training VRAM from a config, term by term — and check it against measurements.
# - Train with response-only loss on mixed image and text rows, with a live loss plot.
# - Interrupt and resume training exactly; save the adapter and a training card.
# - Export the same run as an Axolotl / FSDP config for more than one GPU.

# %% [markdown]
# ## 4.1 LoRA: train a small update, not the model
#
# LoRA freezes a weight matrix `W` (d_out × d_in) and learns `W + (alpha / r) · B·A`, with `A` (r × d_in)
# and `B` (d_out × r). For `r = 16` that is a tiny fraction of the parameters; `alpha / r` scales the
# update, so changing `r` with `alpha = r` keeps the learning rate meaningful.

# %%
# NBVAL_CHECK_OUTPUT
from course_utils.memory import ARCHITECTURES, lora_parameters
from course_utils.profiles import format_table

small32 = ARCHITECTURES["mistral-small-3.2"]
rows = [
    {
        "r": r,
        "LoRA parameters": f"{lora_parameters(small32, r) / 1e6:.1f}M",
        "share of 24B": f"{100 * lora_parameters(small32, r) / small32.total_params:.2f}%",
    }
    for r in (8, 16, 32, 64)
]
print("LoRA on every attention and MLP projection of Mistral Small 3.2's 40 layers:")
print(format_table(rows))

# %% [markdown]
# ## 4.2 NF4: four bits per weight, placed where weights are
#
# QLoRA stores the frozen base model in 4-bit **NormalFloat**: its 16 levels sit at quantiles of a normal
# distribution — where trained weights are dense — plus one scale per block of 64 weights. Compared with
# 16 evenly spaced levels at the same size, the round-trip error is lower:

# %%
# NBVAL_IGNORE_OUTPUT
import bitsandbytes  # the 4-bit library QLoRA uses; on a CPU it notes that optional fused kernels are absent

print("bitsandbytes", bitsandbytes.__version__)

# %%
# NBVAL_CHECK_OUTPUT
import torch

from course_utils.train import nf4_roundtrip_error

torch.manual_seed(0)
weights = torch.randn(64 * 4096) * 0.02  # weights of a trained layer look like this
result = nf4_roundtrip_error(weights)
print(
    f"NF4 error {result.nf4_rmse:.2e} vs uniform int4 {result.int4_rmse:.2e} "
    f"at {result.bits_per_weight_nf4} bits per weight (16-bit: 16)"
)

# %% [markdown]
# ## 4.3 Plan the memory before you rent the GPU
#
# `course_utils.memory` adds up weights, adapters, gradients, optimizer state, activations, logits and
# CUDA overhead from the model's config (the formula and its sources are in the module's docstring;
# `python -m course_utils vram …` prints the same). Here is the usual "which method fits" table,
# recomputed honestly — note that Small 4's 6.5B *active* parameters do not help: all 119B are loaded.

# %%
# NBVAL_CHECK_OUTPUT
from course_utils.memory import calibration_report, method_table

for model_key in ("mistral-small-3.2", "mistral-small-4"):
    print(format_table(method_table(model_key, seq_len=2048, batch_size=1, lora_r=16)))

# %% [markdown]
# How good is the estimate? Against published peaks (Unsloth's context-length benchmarks and notebooks,
# which print peak reserved memory; axolotl's Small 4 recipe) it stays within 20 % per backend —
# Unsloth (gradient checkpoints offloaded to CPU RAM, fused loss) and transformers + peft (checkpoints on
# the GPU, full logits) are calibrated apart. It tends to under-estimate: a "fits in 16 GB" run used
# *at most* 16 GB. On an H200 (`benchmarks/gpu_smoke.py`, Small 3.2 at its real width, a few layers,
# memory per layer extrapolated to all 40), the Unsloth plan came within +5 % of the run; the transformers
# + peft plan was 14 % under until the activations a stock layer keeps were counted from that run.

# %%
# NBVAL_CHECK_OUTPUT
from course_utils.memory import calibration_summary

print(format_table(calibration_report()))
print(format_table(calibration_summary()))

# %%
# NBVAL_IGNORE_OUTPUT
from course_utils.memory import estimate_training_memory

try:  # an interactive planner; the plain call below it does the same without widgets
    import ipywidgets as widgets

    widgets.interact(
        lambda model, method, seq_len, batch_size, lora_r, checkpointing: print(
            estimate_training_memory(model, method, seq_len, batch_size, lora_r, checkpointing).breakdown()
        ),
        model=["mistral-small-3.2", "mistral-small-4", "ministral-3-8b"],
        method=["qlora", "lora", "full"],
        seq_len=widgets.IntSlider(2048, 512, 32768, 512),
        batch_size=widgets.IntSlider(1, 1, 16),
        lora_r=widgets.Dropdown(options=[8, 16, 32, 64], value=16),
        checkpointing=True,
    )
except ImportError:
    print(estimate_training_memory("mistral-small-3.2", "qlora", 2048, 1, 16).breakdown())

# %% [markdown]
# ### What will the run take, and cost?
#
# Dataset tokens (measured on the receipts with the real tokenizer) × epochs ÷ training tokens/s →
# hours; × a dated $/hour quote → dollars. Nobody publishes training speeds for Small 3.2 or 4, so the
# speed is derived — peak TFLOPS × a utilisation read off published QLoRA/LoRA timings ÷ (6 × active
# parameters) — and each plan prints the published measurements it was checked against, with sources
# (`course_utils.costs`). The source article's claim — "a few thousand examples, QLoRA on an A100 80 GB at
# $2–4/h: $10–50" — is checked with its own numbers. The same from a terminal:
# `python -m course_utils plan --model mistral-small-3.2 --rows 3000 --gpu A100-80GB`.

# %%
# NBVAL_IGNORE_OUTPUT
from course_utils.costs import GPUS, DoesNotFit, check_article_claim, measure_tokens_per_row, plan_training

receipts = {m: measure_tokens_per_row(m) for m in ("mistral-small-3.2", "mistral-small-4")}


def show_plan(model="mistral-small-3.2", gpu="A100-80GB", rows=3000, epochs=1.0, price_per_hour=0.0):
    """price_per_hour 0: the dated quote in course_utils.costs.PRICES."""
    try:
        plan = plan_training(
            model,
            gpu,
            rows,
            tokens_per_row=receipts[model],
            epochs=epochs,
            price_per_hour=price_per_hour or None,
        )
    except DoesNotFit as exc:
        print(f"does not fit: {exc}")
        return
    print(plan.report())
    if gpu == "A100-80GB":
        print("\n".join(check_article_claim(plan)))


try:  # widgets; the plain call below does the same without them
    import ipywidgets as widgets

    widgets.interact(
        show_plan,
        model=list(receipts),
        gpu=list(GPUS),
        rows=widgets.IntSlider(value=3000, min=100, max=50000, step=100),
        epochs=widgets.FloatSlider(value=1.0, min=0.5, max=5.0, step=0.5),
        price_per_hour=widgets.FloatText(value=0.0, description="$/GPU-h"),
    )
except ImportError:
    show_plan()

# %% [markdown]
# ## 4.4 Model, data and hyper-parameters
#
# The dataset comes from lesson 03 (`outputs/<profile>/data/`); if you run this lesson alone it is
# rebuilt from `data/receipts` the same way. Half the receipts are image rows, half text rows.
#
# On the random stand-in, adapters alone cannot learn: the frozen random output layer cannot make any
# token likely. So the `cpu-tiny` preset also trains the embedding rows of the tokens that appear in the
# replies (peft's `trainable_token_indices` — a real technique, used to teach a model new tokens), with a
# high learning rate and many small steps. The real models need none of that.

# %% tags=["show-output"]
# NBVAL_IGNORE_OUTPUT
from course_utils.models import load
from course_utils.paths import outputs_dir
from course_utils.receipts import RECEIPT_SCHEMA, lesson_splits
from course_utils.train import preset_for

train_rows, val_rows, test_rows, data_message = lesson_splits(profile.name)  # lesson 03's, or rebuilt
print(data_message)
print(len(train_rows), "train /", len(val_rows), "val /", len(test_rows), "test rows")

loaded = load(PROFILE, model=MODEL, hardware=hardware)
model, processor = loaded.model, loaded.processor
print(loaded.description)
preset = preset_for(profile.name)
print(preset)

# %% [markdown]
# ### Before training
#
# How often does the untrained model reply with valid JSON on the 100 test receipts? (Batched greedy
# generation; lesson 05 measures much more.)

# %% tags=["show-output"]
# NBVAL_IGNORE_OUTPUT
from course_utils.evaluate import json_valid_rate

before, before_replies = json_valid_rate(
    model, processor, test_rows, RECEIPT_SCHEMA, max_new_tokens=preset.max_new_tokens_eval
)
print("before:", before)
print("a reply:", repr(before_replies[0][:120]))

# %% [markdown]
# ## 4.5 Adapters
#
# LoRA goes on every attention and MLP projection of the **language model**; the vision tower stays
# frozen (a plain list of module names would also hit the Pixtral tower's layers — the regular
# expression keeps to `language_model`). On a GPU, Unsloth's `get_peft_model` does the same with
# switches per part. On the stand-in, `trainable_token_indices` also trains the embedding rows of the
# tokens the replies use (section 4.4).
#
# Small 4 names its projections differently — MLA attention has `q_a_proj`, `q_b_proj`,
# `kv_a_proj_with_mqa`, `kv_b_proj` and `o_proj`, and its MoE layers keep the 128 routed experts as 3-D
# tensors (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`) that no module-name pattern reaches:
# peft wraps those by parameter name (`target_parameters`); the router stays frozen. Measured on the
# Small 4 stand-in (`python -m course_utils run --model mistral-small-4 --only 04`): with the dense
# names alone, only `o_proj` and the shared expert trained and the loss stalled at 1.25 with 0 % valid
# JSON; with MLA projections and experts it reaches 0.89 and 0.94 valid JSON on the test split (values
# still invented: schema-valid 0.03; CI asserts ≥ 0.9 valid JSON on every run). On a GPU,
# Unsloth finds the experts itself (it reports "Enabling LoRA on MoE parameters").
#
# First the data: on a CPU it is tokenized and labelled now (lesson 03's response-only labels); on a
# GPU, Unsloth's collator does it batch by batch.

# %%
# NBVAL_IGNORE_OUTPUT
import torch

from course_utils.data import with_images
from course_utils.loss import VisionTextCollator, prepare_examples, trained_token_ids

if torch.cuda.is_available():
    train_examples = [{"messages": with_images(r)} for r in train_rows]
    eval_examples = [{"messages": with_images(r)} for r in val_rows[:24]]
    trainable_tokens = None
else:
    train_examples = prepare_examples(train_rows, processor, preset.max_seq_length, progress=False)
    eval_examples = prepare_examples(val_rows[:24], processor, preset.max_seq_length, progress=False)
    trainable_tokens = trained_token_ids(train_examples) if preset.train_embeddings else None
    collator = VisionTextCollator(processor.tokenizer.pad_token_id)  # pads text, labels and images
print(len(train_examples), "training examples;", len(trainable_tokens or []), "embedding rows to train")

# %% tags=["copyable", "copy:lora"]
# NBVAL_IGNORE_OUTPUT
# LoRA on the language model of a Mistral 3 vision model. Needs `model` (lesson 01's loading cell),
# `trainable_tokens` (None for a real model) and a `preset` with lora_r, lora_alpha, lora_dropout, seed
# and train_experts (Small 4 only: LoRA on the routed experts too).
import torch

torch.manual_seed(preset.seed)  # LoRA's A matrices start random
if torch.cuda.is_available():
    from unsloth import FastVisionModel

    model = FastVisionModel.get_peft_model(
        model,
        finetune_vision_layers=False,
        finetune_language_layers=True,
        finetune_attention_modules=True,
        finetune_mlp_modules=True,
        r=preset.lora_r,
        lora_alpha=preset.lora_alpha,
        lora_dropout=preset.lora_dropout,
        bias="none",
        random_state=preset.seed,
        use_gradient_checkpointing="unsloth",
    )
else:
    from peft import LoraConfig, get_peft_model

    projections = "q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj"  # Small 3: GQA, dense MLP
    experts = None
    if getattr(model.config.text_config, "kv_lora_rank", None):  # Small 4: MLA attention, MoE MLP
        projections = "q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj|gate_proj|up_proj|down_proj"
        if preset.train_experts:  # routed experts are 3-D tensors, not nn.Linear: peft wraps them by name
            experts = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    lora_config = LoraConfig(
        r=preset.lora_r,
        lora_alpha=preset.lora_alpha,
        lora_dropout=preset.lora_dropout,
        target_modules=rf".*language_model.*\.({projections})",
        target_parameters=experts,
        trainable_token_indices={"embed_tokens": trainable_tokens} if trainable_tokens else None,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora_config)
model.print_trainable_parameters()

# %% [markdown]
# ## 4.6 The loss: replies only, computed where the labels are
#
# On a CPU the output layer is the expensive part: 131k logits per position. The course's loss runs it
# only at the labelled (reply) positions — the same cross-entropy, ≈ 2× faster here
# (`benchmarks/train_throughput.py`). The package holds this same function (a test keeps them equal):

# %% tags=["copyable", "copy:loss"]
# Cross-entropy on the reply tokens only, with the output layer run at those positions alone.
# Needs nothing but torch; `model` is a Mistral 3 model, with or without peft adapters.
import torch


def response_only_loss(model, inputs: dict, num_items_in_batch=None) -> torch.Tensor:
    """Cross-entropy on the labelled (reply) positions only — the lm_head runs on those alone."""
    labels = inputs["labels"]
    core = model.get_base_model() if hasattr(model, "get_base_model") else model  # under peft's wrapper
    forward = {k: v for k, v in inputs.items() if k != "labels"}
    if "pixel_values" in forward:
        forward["pixel_values"] = forward["pixel_values"].to(next(core.parameters()).dtype)
    hidden = core.model(**forward, use_cache=False).last_hidden_state[:, :-1]
    target = labels[:, 1:]
    keep = target != -100  # -100: not trained on (prompt, images, padding)
    logits = core.lm_head(hidden[keep]).float()
    total = torch.nn.functional.cross_entropy(logits, target[keep], reduction="sum")
    denominator = num_items_in_batch if num_items_in_batch is not None else keep.sum()
    return total / torch.as_tensor(denominator, device=total.device).clamp(min=1)


# %% [markdown]
# ## 4.7 The trainer — and an interruption
#
# On a GPU: TRL's `SFTTrainer` with Unsloth's vision collator, which templates, tokenizes and masks each
# batch (`train_on_responses_only`). Without a GPU: transformers' `Trainer` with the loss above. The
# hyper-parameters have the same names in both (`TrainingArguments` is `SFTConfig`'s parent). Checkpoints
# are saved every `save_steps`; to show resuming, the run is stopped part-way — as a crash or a Colab
# disconnect would.

# %%
# NBVAL_IGNORE_OUTPUT
import time

from course_utils.train import make_callbacks

RUN_DIR = outputs_dir(profile.outputs_name, "runs", time.strftime("receipts-%Y%m%d-%H%M%S"))
callbacks, throughput = make_callbacks(plot=True)  # tokens/s, peak memory and a live loss plot

# %% tags=["copyable", "copy:train-gpu"]
# NBVAL_IGNORE_OUTPUT
# On a CUDA GPU: Unsloth + TRL. Needs `model` (with adapters), `processor`, `train_examples` /
# `eval_examples` ({"messages": [...]} rows, images inside the messages), RUN_DIR, `callbacks` and a
# `preset` with per_device_train_batch_size, gradient_accumulation_steps, learning_rate,
# lr_scheduler_type, warmup_ratio, max_steps, weight_decay, optim, logging_steps, save_steps, seed and
# max_seq_length (course_utils.train.TrainPreset, or any object with those attributes).
import math

import torch

if torch.cuda.is_available():
    from trl import SFTConfig, SFTTrainer
    from unsloth import FastVisionModel
    from unsloth.trainer import UnslothVisionDataCollator

    FastVisionModel.for_training(model)
    bf16 = torch.cuda.is_bf16_supported()  # T4 and V100 have no bf16: fp16 there
    trainer = SFTTrainer(
        model=model,
        processing_class=processor,
        data_collator=UnslothVisionDataCollator(
            model,
            processor,
            max_seq_length=preset.max_seq_length,  # else it cuts at the model's own (128k) length
            train_on_responses_only=True,
            instruction_part="[INST]",
            response_part="[/INST]",
        ),
        train_dataset=train_examples,
        eval_dataset=eval_examples,
        callbacks=callbacks,
        args=SFTConfig(
            output_dir=str(RUN_DIR),
            per_device_train_batch_size=preset.per_device_train_batch_size,
            per_device_eval_batch_size=preset.per_device_train_batch_size,  # the default, 8, is larger
            gradient_accumulation_steps=preset.gradient_accumulation_steps,
            learning_rate=preset.learning_rate,
            lr_scheduler_type=preset.lr_scheduler_type,
            warmup_steps=math.ceil(preset.warmup_ratio * preset.max_steps),
            max_steps=preset.max_steps,
            weight_decay=preset.weight_decay,
            optim=preset.optim,
            logging_steps=preset.logging_steps,
            save_strategy="steps",
            save_steps=preset.save_steps,
            eval_strategy="steps",
            eval_steps=preset.save_steps,
            seed=preset.seed,
            bf16=bf16,
            fp16=not bf16,
            include_num_input_tokens_seen=True,
            report_to="none",
            remove_unused_columns=False,  # the collator needs the messages
            dataset_text_field="",
            dataset_kwargs={"skip_prepare_dataset": True},
            max_length=preset.max_seq_length,
        ),
    )

# %% tags=["copyable", "copy:train-cpu"]
# NBVAL_IGNORE_OUTPUT
# Without a GPU: transformers' Trainer with the response-only loss. Needs `model` (with adapters),
# tokenized `train_examples` / `eval_examples` (input_ids, labels, pixel_values…), a `collator` that pads
# them (text rows: transformers' DataCollatorForSeq2Seq; with images the course's
# course_utils.loss.VisionTextCollator also pads pixel_values and image_sizes), `response_only_loss`
# (above), RUN_DIR, `callbacks` and a `preset` with per_device_train_batch_size,
# gradient_accumulation_steps, learning_rate, lr_scheduler_type, warmup_ratio, max_steps, weight_decay,
# optim, logging_steps, save_steps, seed and bf16.
import math

import torch
from transformers import Trainer, TrainingArguments


class ResponseOnlyTrainer(Trainer):
    """transformers' Trainer with the response-only loss, computed at the labelled positions only."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = response_only_loss(model, inputs, num_items_in_batch)
        return (loss, None) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        with torch.no_grad():
            loss = response_only_loss(model, self._prepare_inputs(inputs))
        return loss.detach(), None, None


if not torch.cuda.is_available():
    trainer = ResponseOnlyTrainer(
        model=model,
        train_dataset=train_examples,
        eval_dataset=eval_examples,
        data_collator=collator,
        callbacks=callbacks,
        args=TrainingArguments(
            output_dir=str(RUN_DIR),
            per_device_train_batch_size=preset.per_device_train_batch_size,
            per_device_eval_batch_size=preset.per_device_train_batch_size,
            gradient_accumulation_steps=preset.gradient_accumulation_steps,
            learning_rate=preset.learning_rate,
            lr_scheduler_type=preset.lr_scheduler_type,
            warmup_steps=math.ceil(preset.warmup_ratio * preset.max_steps),
            max_steps=preset.max_steps,
            weight_decay=preset.weight_decay,
            optim=preset.optim,
            logging_steps=preset.logging_steps,
            save_strategy="steps",
            save_steps=preset.save_steps,
            eval_strategy="steps",
            eval_steps=preset.save_steps,
            seed=preset.seed,
            data_seed=preset.seed,
            # the GPU runs' precision; a no-op here: accelerate autocasts the model's forward, and the loss
            # calls the model's parts, so this path trains in fp32 (benchmarks/train_throughput.py)
            bf16=preset.bf16,
            use_cpu=True,
            include_num_input_tokens_seen=True,
            ddp_find_unused_parameters=False,  # with several processes: every LoRA weight is used each step
            report_to="none",
            remove_unused_columns=False,  # keep pixel_values and image_sizes
            dataloader_num_workers=0,
            disable_tqdm=True,
        ),
    )

# %% tags=["show-output"]
# NBVAL_IGNORE_OUTPUT
from course_utils.train import StopAfter

interrupt_at = preset.save_steps * 2
trainer.add_callback(StopAfter(interrupt_at))
started = time.perf_counter()
trainer.train()
print("stopped at step", trainer.state.global_step, "of", preset.max_steps)

# %% [markdown]
# ## 4.8 Resume exactly where it stopped
#
# `resume_from_checkpoint` restores the adapter, the optimizer, the learning-rate schedule, the data
# order and the random state, so the run continues as if nothing happened (a test checks that the final
# loss matches an uninterrupted run). One figure does not survive a resume: the `train_loss` transformers
# prints at the end sums the loss of the steps since the resume but divides by every step of the run, so
# here it reads far too low (the early steps, where the loss is highest, are left out of the sum). The
# training card below adds those steps back from the log history the checkpoint restores
# (`course_utils.train.train_loss_of`).

# %%
# NBVAL_IGNORE_OUTPUT
from course_utils.train import latest_checkpoint, plot_losses

checkpoint = latest_checkpoint(RUN_DIR)
print("resuming from", checkpoint.split("/")[-1])
trainer.remove_callback(StopAfter)
result = trainer.train(resume_from_checkpoint=checkpoint)
train_seconds = time.perf_counter() - started
print(f"finished at step {trainer.state.global_step}; training time {train_seconds:.0f} s")

# %% tags=["show-output"]
# NBVAL_IGNORE_OUTPUT
figure = plot_losses(throughput.history)
print(throughput.history[-1])

# %% [markdown]
# ## 4.9 After training

# %% tags=["show-output"]
# NBVAL_IGNORE_OUTPUT
after, after_replies = json_valid_rate(
    model, processor, test_rows, RECEIPT_SCHEMA, max_new_tokens=preset.max_new_tokens_eval
)
print(
    f"JSON-valid on the test split: before {before['json_valid']:.2f} -> after {after['json_valid']:.2f} "
    f"(schema-valid {before['schema_valid']:.2f} -> {after['schema_valid']:.2f})"
)
print("a reply:", after_replies[0][:200])
print("expected:", test_rows[0]["messages"][-1]["content"][:200])
if profile.is_stand_in:
    assert after["json_valid"] >= 0.9, "the stand-in should have learned the JSON format — check the preset"

# %% [markdown]
# The stand-in now writes well-formed receipts JSON — merchant, date, items, totals — but look at the
# values: it *invents* them. A 17M-parameter random model trained for three minutes learns the format,
# not to read receipts; field accuracy is what the real model brings (lesson 05 measures both).
#
# Measured memory vs the plan: on a GPU this compares the estimate for your model with the measured
# peak; on a CPU the peak is the process's RAM.

# %% tags=["show-output"]
# NBVAL_IGNORE_OUTPUT
from course_utils.hardware import memory_report

if not profile.is_stand_in:
    plan = estimate_training_memory(
        profile.model_key,
        profile.method,
        preset.max_seq_length,
        preset.per_device_train_batch_size,
        preset.lora_r,
        optimizer=preset.optim,
        backend=profile.backend,
    )
    print(f"estimated peak {plan.total_gib:.1f} GiB")
print(memory_report("after training"))

# %% [markdown]
# ## 4.10 Save the adapter and its training card
#
# The adapter (safetensors) is a few MB; the card records hyper-parameters, a hash of the dataset,
# library versions, final metrics and hardware, so the run can be reproduced. Lesson 05 evaluates it and
# lesson 06 merges and exports it. This lesson's adapter folder is replaced deliberately (`overwrite=True`).

# %%
# NBVAL_IGNORE_OUTPUT
from course_utils.train import (
    TrainingRun,
    count_parameters,
    dataset_hash,
    save_adapter,
    train_loss_of,
    training_card,
)

run = TrainingRun(
    trainer,
    model,
    processor,
    preset,
    "unsloth" if torch.cuda.is_available() else "transformers",
    RUN_DIR,
    *count_parameters(model),
    len(train_examples),
    dataset_hash(train_rows),
)
card = training_card(
    run,
    {
        "train_loss": train_loss_of(trainer, result.training_loss, resumed_from=checkpoint),
        "json_valid_before": before["json_valid"],
        "json_valid_after": after["json_valid"],
        "schema_valid_after": after["schema_valid"],
    },
    train_seconds,
)
adapter_dir = save_adapter(
    run, outputs_dir(profile.outputs_name, "adapters") / "receipts-lora", card, overwrite=True
)
print(sorted(p.name for p in adapter_dir.iterdir()))

# %% [markdown]
# ## 4.11 When one GPU is not enough
#
# Mistral Small 4 QLoRA needs ≈ 68 GiB: one 80 GB card, or several smaller ones. It does not go the way
# of Small 3.2: its official weights are FP8, and transformers' 4-bit loading quantizes only `nn.Linear`
# layers while Small 4's 128 experts are 3-D tensors — left in bf16 they alone take ≈ 216 GiB. Axolotl's
# published recipe (`examples/mistral4/qlora-vision.yml`, ≈ 68 GiB without training the experts) starts
# from a BF16 re-upload, quantizes the experts itself (`quantize_moe_experts`) and uses Cut Cross
# Entropy. Below: that recipe on this dataset, and an `accelerate` FSDP config whose wrapped layer
# classes are read from the model (`_no_split_modules`), not typed in:
#
# ```bash
# axolotl train outputs/<profile>/configs/axolotl-small4.yml
# accelerate launch --config_file outputs/<profile>/configs/fsdp-2gpu.yml your_train.py
# ```
#
# This lesson's run as a script — for a rented GPU, in `tmux`, not in a kernel that dies with your
# browser tab — with `--processes N` launching it through accelerate (FSDP with this config on CUDA;
# on a CPU accelerate 1.15 runs DDP over gloo instead, and says so):
#
# ```bash
# python -m course_utils train --out outputs/<profile>/runs/r1            # one process
# python -m course_utils train --out outputs/<profile>/runs/r1 --resume   # after a disconnect
# python -m course_utils train --out outputs/<profile>/runs/r2 --processes 2 --max-steps 200
# ```

# %%
# NBVAL_CHECK_OUTPUT
import yaml

from course_utils.train import accelerate_fsdp_config, axolotl_small4_qlora, fsdp_layer_classes, write_yaml

configs = outputs_dir(profile.outputs_name, "configs")
# axolotl's published recipe, our data: the train split lesson 03 saved
axolotl = axolotl_small4_qlora(str(outputs_dir(profile.name, "data") / "train.jsonl"))
ax_path = write_yaml(axolotl, configs / "axolotl-small4.yml", overwrite=True)
fsdp = accelerate_fsdp_config(num_processes=2, layer_classes=fsdp_layer_classes(model))  # this model's layers
fsdp_path = write_yaml(fsdp, configs / "fsdp-2gpu.yml", overwrite=True)
print({k: axolotl[k] for k in ("base_model", "adapter", "lora_r", "sequence_len", "sample_packing")})
print(yaml.safe_load(fsdp_path.read_text())["fsdp_config"]["fsdp_auto_wrap_policy"])

# %% [markdown]
# ## Summary
#
# - LoRA trains < 1 % of the parameters; NF4 stores the frozen rest in ≈ 4.1 bits per weight with double
#   quantization, as the course loads it (≈ 4.5 with one level of scales).
# - Plan memory from the config before renting a GPU: QLoRA on Small 3.2 fits 24 GB, 16-bit LoRA does
#   not; Small 4 QLoRA needs ≈ 68 GiB (axolotl's measurement; the course's planner: 66 for that recipe).
# - The same steps on every profile, as plain library code: Unsloth + TRL's `SFTTrainer` on CUDA,
#   transformers' `Trainer` + peft on CPU, both with response-only loss on mixed image and text rows.
# - Checkpoints make interruptions harmless: `resume_from_checkpoint` continues exactly.
# - On the stand-in, JSON validity goes from 0 to ≥ 0.9 — the format is learned, the values are not.
#
# ## Exercises
#
# 🐢 How many LoRA parameters does r = 128 add to Mistral Small 3.2? (millions, one decimal; the table
# in 4.1 stops at 64)

# %%
from course_utils.exercises import check

lora_128_millions = None  # TODO: use lora_parameters
# SOLUTION: lora_128_millions = round(lora_parameters(small32, 128) / 1e6, 1)
check("04-lora-128", lora_128_millions)

# %% [markdown]
# 🐕 With `python -m course_utils vram` (or `estimate_training_memory`), find the longest `seq_len`
# (a multiple of 1024) at which Mistral Small 3.2 QLoRA, batch 1, r 16, still fits a 24 GiB card.

# %%
longest_fitting = None  # TODO: try seq_len values
# SOLUTION: longest_fitting = max(
# SOLUTION:     s
# SOLUTION:     for s in range(1024, 131073, 1024)
# SOLUTION:     if estimate_training_memory("mistral-small-3.2", "qlora", s, 1, 16).total_gib <= 24
# SOLUTION: )
check("04-longest-seq", longest_fitting)

# %% [markdown]
# 🦁 Your run evaluated on the validation rows every `save_steps` steps; `trainer.state.log_history`
# holds every logged value. At which step was the eval loss lowest? Was it the last evaluation — and if
# not, what would you change (steps, learning rate, or `load_best_model_at_end`)? Plot the train and eval
# losses from the history yourself to see it.

# %%
best_eval_step = None  # TODO: the "step" of the log_history entry with the lowest "eval_loss"
# SOLUTION: evaluations = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
# SOLUTION: best_eval_step = min(evaluations, key=lambda entry: entry["eval_loss"])["step"]
check("04-best-eval-step", best_eval_step, trainer=trainer)
