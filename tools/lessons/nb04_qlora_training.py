from lessons import code, md

NAME = "04_qlora_training.ipynb"
TITLE = "04 · QLoRA fine-tuning that really learns"
INTRO = """The lesson the course exists for. You will see what LoRA and 4-bit NF4 quantization do, plan the
GPU memory before renting one, and fine-tune on the receipts from lesson 03 — Unsloth QLoRA on a GPU,
transformers + peft on a CPU. On `cpu-tiny` the same cell really trains the stand-in: you will watch
the loss fall and the share of valid JSON rise from 0 to above 0.9 in about three minutes. Then you
interrupt a run, resume it, and save the adapter with a training card."""
OBJECTIVES = [
    "Explain LoRA (low-rank updates) and NF4 (normal-float 4-bit) with numbers.",
    "Estimate peak training VRAM from a config, term by term — and check it against measurements.",
    "Train with response-only loss on mixed image and text rows, with a live loss plot.",
    "Interrupt and resume training exactly; save the adapter and a training card.",
    "Export the same run as an Axolotl / FSDP config for more than one GPU.",
]

CELLS = [
    md("""
## 4.1 LoRA: train a small update, not the model

LoRA freezes a weight matrix `W` (d_out × d_in) and learns `W + (alpha / r) · B·A`, with `A` (r × d_in)
and `B` (d_out × r). For `r = 16` that is a tiny fraction of the parameters; `alpha / r` scales the
update, so changing `r` with `alpha = r` keeps the learning rate meaningful.
"""),
    code("""
# NBVAL_CHECK_OUTPUT
from course_utils.memory import ARCHITECTURES, lora_parameters
from course_utils.profiles import format_table

small32 = ARCHITECTURES["mistral-small-3.2"]
rows = [{"r": r, "LoRA parameters": f"{lora_parameters(small32, r) / 1e6:.1f}M",
         "share of 24B": f"{100 * lora_parameters(small32, r) / small32.total_params:.2f}%"} for r in (8, 16, 32, 64)]
print("LoRA on every attention and MLP projection of Mistral Small 3.2's 40 layers:")
print(format_table(rows))
"""),
    md("""
## 4.2 NF4: four bits per weight, placed where weights are

QLoRA stores the frozen base model in 4-bit **NormalFloat**: its 16 levels sit at quantiles of a normal
distribution — where trained weights are dense — plus one scale per block of 64 weights. Compared with
16 evenly spaced levels at the same size, the round-trip error is lower:
"""),
    code("""
# NBVAL_IGNORE_OUTPUT
import bitsandbytes  # the 4-bit library QLoRA uses; on a CPU it notes that optional fused kernels are absent

print("bitsandbytes", bitsandbytes.__version__)
"""),
    code("""
# NBVAL_CHECK_OUTPUT
import torch

from course_utils.train import nf4_roundtrip_error

torch.manual_seed(0)
weights = torch.randn(64 * 4096) * 0.02  # weights of a trained layer look like this
result = nf4_roundtrip_error(weights)
print(f"NF4 error {result['nf4_rmse']:.2e} vs uniform int4 {result['int4_rmse']:.2e} "
      f"at {result['bits_per_weight_nf4']} bits per weight (16-bit: 16)")
"""),
    md("""
## 4.3 Plan the memory before you rent the GPU

`course_utils.memory` adds up weights, adapters, gradients, optimizer state, activations, logits and
CUDA overhead from the model's config (the formula and its sources are in the module's docstring;
`python -m course_utils vram …` prints the same). Here is the usual "which method fits" table,
recomputed honestly — note that Small 4's 6.5B *active* parameters do not help: all 119B are loaded.
"""),
    code("""
# NBVAL_CHECK_OUTPUT
from course_utils.memory import calibration_report, method_table

for model_key in ("mistral-small-3.2", "mistral-small-4"):
    print(format_table(method_table(model_key, seq_len=2048, batch_size=1, lora_r=16)))
"""),
    md("""
How good is the estimate? Against published peaks (Unsloth's context-length benchmarks, which report
the longest sequence that fits a given card) it stays within 20 %. It tends to under-estimate: a
"fits in 16 GB" run used *at most* 16 GB.
"""),
    code("""
# NBVAL_CHECK_OUTPUT
print(format_table(calibration_report()))
"""),
    code("""
# NBVAL_IGNORE_OUTPUT
from course_utils.memory import estimate_training_memory

try:  # an interactive planner; the plain call below it does the same without widgets
    import ipywidgets as widgets

    widgets.interact(
        lambda model, method, seq_len, batch_size, lora_r, checkpointing: print(
            estimate_training_memory(model, method, seq_len, batch_size, lora_r, checkpointing).breakdown()),
        model=["mistral-small-3.2", "mistral-small-4", "ministral-3-8b"], method=["qlora", "lora", "full"],
        seq_len=widgets.IntSlider(2048, 512, 32768, 512), batch_size=widgets.IntSlider(1, 1, 16),
        lora_r=widgets.Dropdown(options=[8, 16, 32, 64], value=16), checkpointing=True)
except ImportError:
    print(estimate_training_memory("mistral-small-3.2", "qlora", 2048, 1, 16).breakdown())
"""),
    md("""
## 4.4 Model, data and hyper-parameters

The dataset comes from lesson 03 (`outputs/<profile>/data/`); if you run this lesson alone it is
rebuilt from `data/receipts` the same way. Half the receipts are image rows, half text rows.

On the random stand-in, adapters alone cannot learn: the frozen random output layer cannot make any
token likely. So the `cpu-tiny` preset also trains the embedding rows of the tokens that appear in the
replies (peft's `trainable_token_indices` — a real technique, used to teach a model new tokens), with a
high learning rate and many small steps. The real models need none of that.
"""),
    code("""
# NBVAL_IGNORE_OUTPUT
from course_utils.data import mix_modalities
from course_utils.models import load
from course_utils.paths import outputs_dir
from course_utils.receipts import RECEIPT_SCHEMA, load_local, read_jsonl
from course_utils.train import preset_for

data_dir = outputs_dir(profile.name, "data")
if (data_dir / "train.jsonl").exists():
    train_rows, val_rows, test_rows = (read_jsonl(data_dir / f"{s}.jsonl") for s in ("train", "val", "test"))
    print("dataset from lesson 03:", data_dir.name)
else:
    train_rows, val_rows, test_rows = (mix_modalities(load_local(s), 0.5, seed=0) for s in ("train", "val", "test"))
    print("lesson 03's output not found: rebuilt the same mixed dataset from data/receipts")
print(len(train_rows), "train /", len(val_rows), "val /", len(test_rows), "test rows")

loaded = load(PROFILE, hardware=hardware)
model, processor = loaded.model, loaded.processor
print(loaded.description)
preset = preset_for(profile.name)
print(preset)
"""),
    md("""
### Before training

How often does the untrained model reply with valid JSON on the 100 test receipts? (Batched greedy
generation; lesson 05 measures much more.)
"""),
    code("""
# NBVAL_IGNORE_OUTPUT
from course_utils.evaluate import json_valid_rate

before, before_replies = json_valid_rate(model, processor, test_rows, RECEIPT_SCHEMA,
                                         max_new_tokens=preset.max_new_tokens_eval)
print("before:", before)
print("a reply:", repr(before_replies[0][:120]))
"""),
    md("""
## 4.5 Train — and interrupt

`build_trainer` is the same call on every profile: on CUDA it uses Unsloth's `FastVisionModel` with
`UnslothVisionDataCollator` and TRL's `SFTTrainer`; on a CPU, transformers' `Trainer` + peft with the
same hyper-parameter names. Both train on the replies only (lesson 03's labels). Checkpoints are saved
every `save_steps`. To show resuming, this first cell stops the run part-way — as a crash or a Colab
disconnect would.
"""),
    code("""
# NBVAL_IGNORE_OUTPUT
import time

from course_utils.train import build_trainer, make_callbacks, stop_after

run_dir = outputs_dir(profile.name, "runs", time.strftime("receipts-%Y%m%d-%H%M%S"))
callbacks, throughput = make_callbacks(plot=True)
run = build_trainer(model, processor, train_rows, val_rows[:24], preset, run_dir, backend=loaded.backend,
                    callbacks=callbacks)
print(f"trainable parameters: {run.trainable_parameters:,} of {run.total_parameters:,}", *run.notes, sep="\\n")
interrupt_at = preset.save_steps * 2
run.trainer.add_callback(stop_after(interrupt_at))
started = time.perf_counter()
run.trainer.train()
print("stopped at step", run.trainer.state.global_step, "of", preset.max_steps)
"""),
    md("""
## 4.6 Resume exactly where it stopped

`resume_from_checkpoint` restores the adapter, the optimizer, the learning-rate schedule, the data
order and the random state, so the run continues as if nothing happened (a test checks that the final
loss matches an uninterrupted run).
"""),
    code("""
# NBVAL_IGNORE_OUTPUT
from course_utils.train import latest_checkpoint, plot_losses

checkpoint = latest_checkpoint(run_dir)
print("resuming from", checkpoint.split("/")[-1])
run.trainer.callback_handler.callbacks = [c for c in run.trainer.callback_handler.callbacks if type(c).__name__ != "StopAfter"]
result = run.trainer.train(resume_from_checkpoint=checkpoint)
train_seconds = time.perf_counter() - started
print(f"finished at step {run.trainer.state.global_step}; training time {train_seconds:.0f} s")
"""),
    code("""
# NBVAL_IGNORE_OUTPUT
figure = plot_losses(throughput.history)
print(throughput.history[-1])
"""),
    md("""
## 4.7 After training
"""),
    code("""
# NBVAL_IGNORE_OUTPUT
after, after_replies = json_valid_rate(run.model, processor, test_rows, RECEIPT_SCHEMA,
                                       max_new_tokens=preset.max_new_tokens_eval)
print(f"JSON-valid on the test split: before {before['json_valid']:.2f} -> after {after['json_valid']:.2f} "
      f"(schema-valid {before['schema_valid']:.2f} -> {after['schema_valid']:.2f})")
print("a reply:", after_replies[0][:200])
print("expected:", test_rows[0]["messages"][-1]["content"][:200])
if profile.is_stand_in:
    assert after["json_valid"] >= 0.9, "the stand-in should have learned the JSON format — check the preset"
"""),
    md("""
The stand-in now writes well-formed receipts JSON — merchant, date, items, totals — but look at the
values: it *invents* them. A 17M-parameter random model trained for three minutes learns the format,
not to read receipts; field accuracy is what the real model brings (lesson 05 measures both).

Measured memory vs the plan: on a GPU this compares the estimate for your model with the measured
peak; on a CPU the peak is the process's RAM.
"""),
    code("""
# NBVAL_IGNORE_OUTPUT
from course_utils.hardware import memory_report

if not profile.is_stand_in:
    plan = estimate_training_memory(profile.model_key, profile.method, preset.max_seq_length,
                                    preset.per_device_train_batch_size, preset.lora_r)
    print(f"estimated peak {plan.total_gib:.1f} GiB")
print(memory_report("after training"))
"""),
    md("""
## 4.8 Save the adapter and its training card

The adapter (safetensors) is a few MB; the card records hyper-parameters, a hash of the dataset,
library versions, final metrics and hardware, so the run can be reproduced. Lesson 05 evaluates it and
lesson 06 merges and exports it. This lesson's adapter folder is replaced deliberately (`overwrite=True`).
"""),
    code("""
# NBVAL_IGNORE_OUTPUT
from course_utils.train import save_adapter, training_card

card = training_card(run, {"train_loss": result.training_loss, "json_valid_before": before["json_valid"],
                           "json_valid_after": after["json_valid"], "schema_valid_after": after["schema_valid"]},
                     train_seconds)
adapter_dir = save_adapter(run, outputs_dir(profile.name, "adapters") / "receipts-lora", card, overwrite=True)
print(sorted(p.name for p in adapter_dir.iterdir()))
"""),
    md("""
## 4.9 When one GPU is not enough

Mistral Small 4 QLoRA needs ≈ 69 GiB: one 80 GB card, or several smaller ones. The same run as an
Axolotl config and an `accelerate` FSDP config:

```bash
axolotl train outputs/<profile>/configs/axolotl-small4.yml
accelerate launch --config_file outputs/<profile>/configs/fsdp-2gpu.yml your_train.py
```
"""),
    code("""
# NBVAL_CHECK_OUTPUT
import yaml

from course_utils.train import accelerate_fsdp_config, axolotl_config, write_yaml

configs = outputs_dir(profile.name, "configs")
axolotl = axolotl_config("mistralai/Mistral-Small-4-119B-2603", "data/train.jsonl", preset_for("gpu-80gb"))
ax_path = write_yaml(axolotl, configs / "axolotl-small4.yml", overwrite=True)
fsdp_path = write_yaml(accelerate_fsdp_config(num_processes=2), configs / "fsdp-2gpu.yml", overwrite=True)
print({k: axolotl[k] for k in ("base_model", "adapter", "lora_r", "sequence_len", "sample_packing")})
print(yaml.safe_load(fsdp_path.read_text())["fsdp_config"]["fsdp_auto_wrap_policy"])
"""),
    md("""
## Summary

- LoRA trains < 1 % of the parameters; NF4 stores the frozen rest in ≈ 4.5 bits per weight.
- Plan memory from the config before renting a GPU: QLoRA on Small 3.2 fits 24 GB, 16-bit LoRA does
  not; Small 4 QLoRA needs ≈ 66–69 GiB.
- One `build_trainer` for every profile: Unsloth + TRL on CUDA, transformers + peft on CPU, both with
  response-only loss on mixed image and text rows.
- Checkpoints make interruptions harmless: `resume_from_checkpoint` continues exactly.
- On the stand-in, JSON validity goes from 0 to ≥ 0.9 — the format is learned, the values are not.

## Exercises

🐢 How many LoRA parameters does r = 32 add to Mistral Small 3.2? (millions, one decimal)
"""),
    code("""
from course_utils.widgets import check

lora_32_millions = None  # TODO: use lora_parameters(small32, 32)
check(lora_32_millions, round(lora_parameters(small32, 32) / 1e6, 1), "lora_parameters(small32, 32) / 1e6", tolerance=0.01)
"""),
    md("""
🐕 With `python -m course_utils vram` (or `estimate_training_memory`), find the longest `seq_len`
(a multiple of 1024) at which Mistral Small 3.2 QLoRA, batch 1, r 16, still fits a 24 GiB card.
"""),
    code("""
longest_fitting = None  # TODO: try seq_len values
answer = max(s for s in range(1024, 131073, 1024) if estimate_training_memory("mistral-small-3.2", "qlora", s, 1, 16).total_gib <= 24)
check(longest_fitting, answer, "loop over range(1024, 131073, 1024) and keep the last that is <= 24 GiB")
"""),
    md("""
🦁 Train the stand-in again with `train_embeddings=False` (`preset_for(profile.name, train_embeddings=False,
max_steps=60)`) and compare its loss after 60 steps with this run's. Why does it stay high? (Hint:
FACTS in the course repository, and section 4.4.)
"""),
    code("""
stays_high = None  # TODO: True or False, after running the experiment
check(stays_high, True, "a frozen random output layer cannot make any token likely")
"""),
]
