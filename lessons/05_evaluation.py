# %% [markdown]
# # 05 · Evaluation: did fine-tuning help?
#
# Public benchmarks are directional; your task is what you ship. This lesson measures the adapter
# from lesson 04 against the base model on the 100 held-out test receipts — same rows, same greedy
# decoding, batched — with task metrics (JSON and schema validity, field-level precision/recall/F1,
# exact match) and held-out loss. Then it digs into the errors, catches the classic silent failure (an
# adapter that changes nothing), saves a report, and shows when a general benchmark is the right tool.
#
# ## Learning objectives
# - Generate for a whole test split in batches (left padding, greedy) and know why that is fast and fair.
# - Score structured output: JSON validity, schema validity, field-level F1 with normalisation, exact match.
# - Compare base and tuned side by side — table, chart, per-field breakdown, worst examples.
# - Detect a no-op adapter, and read held-out loss and perplexity.
# - Use an LLM judge and lm-evaluation-harness for what task metrics cannot measure.

# %% [markdown]
# ## 5.1 The test split, the base model and the adapter
#
# Lesson 03 saved the splits and lesson 04 the adapter under `outputs/<profile>/`; if you run this lesson
# alone, both are rebuilt the same way (the adapter takes ≈ 3 minutes on `cpu-tiny`).
#
# One model in memory serves both sides of the comparison: peft's `disable_adapter()` runs the untouched
# base weights, so "base" and "tuned" differ by the adapter and nothing else.

# %%
# NBVAL_IGNORE_OUTPUT
from course_utils.evaluate import load_tuned
from course_utils.models import load
from course_utils.paths import outputs_dir
from course_utils.receipts import RECEIPT_SCHEMA, lesson_splits
from course_utils.train import ensure_adapter, preset_for

train_rows, val_rows, test_rows, data_message = lesson_splits(profile.name)
print(
    data_message,
    "—",
    len(test_rows),
    "test rows,",
    sum(bool(r.get("images")) for r in test_rows),
    "with images",
)
adapter_dir, adapter_message = ensure_adapter(
    profile.name,
    outputs_dir(profile.outputs_name, "adapters") / "receipts-lora",
    train_rows,
    val_rows[:24],
    hardware=hardware,
    model=MODEL,
)
print(adapter_message)
loaded = load(PROFILE, model=MODEL, hardware=hardware)
tuned = load_tuned(loaded.model, adapter_dir)
processor = loaded.processor
preset = preset_for(profile.name)
print(loaded.description)

# %% [markdown]
# ## 5.2 Batched generation
#
# Generating one prompt at a time leaves most of the hardware idle. `generate_batch` sorts prompts by
# length, pads them **on the left** (so every row's next token sits in the last column) and decodes
# greedily — deterministic, so base and tuned see exactly the same conditions. On the course's 2-core CPU
# machine, batches of 16 were 13.9× faster than one prompt at a time, with 64 of 64 replies identical
# (`benchmarks/generation_batching.py`, its measured run in the docstring).

# %%
from course_utils.evaluate import prompts_of, targets_of

prompts = prompts_of(test_rows)  # the test conversations without their answers
targets = targets_of(test_rows)
model, conversations = tuned, prompts[:8]

# %% tags=["copyable", "copy:batch-generate"]
# NBVAL_IGNORE_OUTPUT
# Greedy replies for many conversations, a batch at a time. Needs `model`, `processor` and `conversations`
# (lists of chat messages; images as {"type": "image", "image": a PIL image or a path}).
import torch

processor.tokenizer.padding_side = "left"  # decoder-only: every row's next token in the last column
replies = []
for start in range(0, len(conversations), 8):
    inputs = processor.apply_chat_template(
        conversations[start : start + 8],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        processor_kwargs={"padding": True},
    ).to(model.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    with torch.inference_mode():
        output = model.generate(
            **inputs, max_new_tokens=64, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id
        )
    replies += processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
processor.tokenizer.padding_side = "right"
print(len(replies), "replies; the first:", repr(replies[0][:80]))

# %% [markdown]
# `generate_batch` is that loop as a function (with a progress bar); the course uses it from here on.
# Same prompts, same batches, same replies:

# %% tags=["show-output"]
# NBVAL_IGNORE_OUTPUT
import time

from course_utils.chat import generate_batch

assert replies == generate_batch(model, processor, conversations, max_new_tokens=64, batch_size=8)
seconds = {}
started = time.perf_counter()
with tuned.disable_adapter():
    base_replies = generate_batch(
        tuned, processor, prompts, max_new_tokens=preset.max_new_tokens_eval, batch_size=16
    )
seconds["base"] = time.perf_counter() - started
started = time.perf_counter()
tuned_replies = generate_batch(
    tuned, processor, prompts, max_new_tokens=preset.max_new_tokens_eval, batch_size=16
)
seconds["tuned"] = time.perf_counter() - started
print({name: f"{s:.0f} s" for name, s in seconds.items()}, "for", len(prompts), "prompts")
print("base :", repr(base_replies[0][:100]))
print("tuned:", repr(tuned_replies[0][:100]))

# %% [markdown]
# The base stand-in's replies are empty or noise — random weights. A real base model would answer, just
# not reliably in your schema; that is the gap fine-tuning closes.
#
# ## 5.3 Base vs tuned
#
# `compare` scores every reply against its target. A **field** is a normalised fact: `7.5`, `"7.50"` and
# `"7,50 €"` are the same number; `01.02.2024` and `2024-02-01` the same date; case and spaces do not
# count. Each line item is one fact (name, quantity, unit price). Precision = right facts / facts the
# model wrote; recall = right facts / facts in the receipt; F1 their harmonic mean. Exact match needs
# every fact right.

# %% [markdown]
# The matching in full — `receipt_facts` turns a receipt into normalised facts, and a multiset
# intersection counts the right ones (the package holds this same function; `compare` uses it):

# %%
# NBVAL_CHECK_OUTPUT
from course_utils.evaluate import receipt_facts


def field_scores(predicted: dict | None, expected: dict) -> dict:
    """Matched / predicted / expected fact counts for one receipt (multiset match)."""
    from collections import Counter

    pred, gold = Counter(receipt_facts(predicted)), Counter(receipt_facts(expected))
    matched = pred & gold
    per_field: dict[str, dict[str, int]] = {}
    for counter, key in ((pred, "predicted"), (gold, "expected"), (matched, "matched")):
        for (field_name, _), n in counter.items():
            per_field.setdefault(field_name, {"predicted": 0, "expected": 0, "matched": 0})[key] += n
    return {
        "matched": sum(matched.values()),
        "predicted": sum(pred.values()),
        "expected": sum(gold.values()),
        "per_field": per_field,
        "exact": predicted is not None and pred == gold,
    }


expected = {
    "merchant": "Café Nord",
    "date": "2024-02-01",
    "currency": "EUR",
    "total": 3.0,
    "items": [{"name": "Tea", "qty": 2, "unit_price": 1.5}],
}
predicted = {
    "merchant": "CAFÉ NORD ",
    "date": "01.02.2024",
    "currency": "€",
    "total": "3,00",
    "items": [{"name": "tea", "qty": 2, "unit_price": 1.4}],
}
scores = field_scores(predicted, expected)
print({k: scores[k] for k in ("matched", "predicted", "expected", "exact")})

# %% tags=["show-output"]
# NBVAL_IGNORE_OUTPUT
from course_utils.evaluate import compare
from course_utils.profiles import format_table

comparison = compare({"base": base_replies, "tuned": tuned_replies}, targets, RECEIPT_SCHEMA)
print(format_table(comparison.table()))
base_m, tuned_m = comparison.metrics["base"], comparison.metrics["tuned"]
print(f"field F1: base {base_m['field_f1']:.3f}, tuned {tuned_m['field_f1']:.3f}")
if profile.is_stand_in:
    assert tuned_m["json_valid"] >= base_m["json_valid"] + 0.5, (
        "the adapter should have taught the JSON format"
    )

# %% tags=["show-output"]
# NBVAL_IGNORE_OUTPUT
figure = comparison.plot()

# %% [markdown]
# ## 5.4 Error analysis: which fields, which failures, which rows
#
# Averages hide the story. Per field, where does the tuned model get facts right? Which kind of failure
# dominates — no JSON, JSON that breaks the schema, or well-formed JSON with wrong values?

# %% tags=["show-output"]
# NBVAL_IGNORE_OUTPUT
print(format_table(comparison.per_field()))
print()
print(format_table(comparison.outcomes()))

# %% [markdown]
# On the stand-in the picture is honest and typical of an under-powered model: the adapter moved every
# reply from "no JSON" to schema-valid JSON with wrong values, and the fields it gets right are the ones
# it can guess (the currency, now and then the tax) — it learned the *format*, not to read receipts. A
# real Small 3.2 adapter moves the mass into "partly right" and "all right"; the per-field table then tells
# you which fields need more (or better) training data.
#
# The worst tuned examples, with what was expected:

# %% tags=["show-output"]
# NBVAL_IGNORE_OUTPUT
from course_utils.widgets import render_example

images = [r["images"][0] if r.get("images") else None for r in test_rows]
for example in comparison.worst(3):
    print(render_example(example, images[example["index"]]), end="\n\n")

# %% [markdown]
# Page through all of them — the image, the expected JSON, and both replies (a slider in Jupyter; without
# widgets the first example is printed, and `render_example(comparison.examples[i])` shows any other):

# %%
# NBVAL_IGNORE_OUTPUT
from course_utils.widgets import example_viewer

viewer = example_viewer(comparison.examples, images)

# %% [markdown]
# ## 5.5 The silent no-op adapter, and held-out loss
#
# A LoRA adapter starts as an exact no-op (`B = 0`). If `target_modules` matched nothing you meant, the
# learning rate was 0, or the adapter was never attached, "evaluation after fine-tuning" silently measures
# the base model. `adapter_effect` compares next-token logits with the adapter on and off: 0.0 means the
# adapter does nothing. A freshly initialised adapter — added beside lesson 04's on the same model with
# peft's `add_adapter` / `set_adapter` / `delete_adapter` — shows what that looks like.

# %%
# NBVAL_IGNORE_OUTPUT
from peft import LoraConfig

from course_utils.evaluate import adapter_effect
from course_utils.train import LANGUAGE_TARGETS

# A second adapter on the same model, not a second model: it would not fit beside a 24B model on a GPU.
tuned.add_adapter("fresh", LoraConfig(r=16, target_modules=LANGUAGE_TARGETS))
tuned.set_adapter("fresh")
effects = {"fresh (untrained) adapter": adapter_effect(tuned, processor, val_rows[:4])}
tuned.set_adapter("default")  # lesson 04's adapter again
effects["lesson 04's adapter"] = adapter_effect(tuned, processor, val_rows[:4])
tuned.delete_adapter("fresh")
for name, value in effects.items():
    print(f"{name:28s} largest logit change {value:.4f}", "← a no-op" if value == 0 else "")
assert effects["lesson 04's adapter"] > 0.01, (
    "the adapter changes nothing — check target_modules and the learning rate"
)

# %% [markdown]
# Held-out loss is the mean cross-entropy on the reply tokens of rows the model never trained on;
# perplexity = e^loss ("as unsure as choosing among that many tokens"). It is cheap and smooth, useful to
# compare checkpoints — but a low loss does not guarantee valid JSON, which is why both are reported.

# %% tags=["show-output"]
# NBVAL_IGNORE_OUTPUT
from course_utils.evaluate import heldout_loss

with tuned.disable_adapter():
    base_loss = heldout_loss(tuned, processor, val_rows[:32])
tuned_loss = heldout_loss(tuned, processor, val_rows[:32])
print(format_table([{"model": "base", **base_loss}, {"model": "tuned", **tuned_loss}]))
assert tuned_loss["loss"] < base_loss["loss"]

# %% [markdown]
# ## 5.6 Save the report
#
# `report.json` keeps every reply and score (for later analysis); `report.md` is for people. Reports
# are evidence, so an existing one is not replaced unless you say so — this lesson does, to stay re-runnable.

# %%
# NBVAL_IGNORE_OUTPUT
from course_utils.evaluate import save_report

context = {
    "profile": profile.name,
    "model": loaded.source,
    "adapter": adapter_dir.name,
    "rows": len(test_rows),
    "decoding": f"greedy, max_new_tokens={preset.max_new_tokens_eval}",
    "heldout_loss": {"base": base_loss["loss"], "tuned": tuned_loss["loss"]},
}
report_json, report_md = save_report(
    comparison,
    outputs_dir(profile.outputs_name, "eval", "receipts-lora"),
    context,
    overwrite=True,
    title="Receipts: base vs tuned",
)
print(report_json.name, report_md.name, "in", report_md.parent.relative_to(outputs_dir()))
print("\n".join(report_md.read_text().splitlines()[:18]))

# %% [markdown]
# ## 5.7 An LLM as judge (optional, off by default)
#
# Field F1 cannot say whether a free-text answer is helpful. A stronger model can grade — through any
# OpenAI-compatible endpoint: a hosted API, or your own server from lesson 07. Set `JUDGE_BASE_URL`
# (e.g. `http://127.0.0.1:8080/v1`), `JUDGE_MODEL`, and `JUDGE_API_KEY` if the endpoint needs one (read from
# the environment, never printed). Judges have biases (length, position, their own style): spot-check
# their grades against yours, keep temperature 0, and report their agreement with the task metrics.

# %%
# NBVAL_IGNORE_OUTPUT
import os

from course_utils.evaluate import judge_messages, judge_summary, llm_judge

print(judge_messages(targets[0], tuned_replies[0])[1]["content"][:600], "…")
JUDGE_BASE_URL = os.environ.get("JUDGE_BASE_URL")  # None: the judge is skipped
if JUDGE_BASE_URL:
    grades = llm_judge(
        [(t, r) for t, r in zip(targets[:20], tuned_replies[:20])],
        JUDGE_BASE_URL,
        os.environ.get("JUDGE_MODEL", "mistral-small-latest"),
    )
    print(judge_summary(grades))
else:
    print("\nJudge skipped: set JUDGE_BASE_URL (and JUDGE_MODEL, JUDGE_API_KEY) to grade 20 replies.")

# %% [markdown]
# ## 5.8 Benchmarks vs your task
#
# | question | use |
# |---|---|
# | Does the model do *my* job? | task metrics on held-out data (this lesson) |
# | Did tuning break general skills (forgetting)? | MMLU (knowledge), GSM8K (reasoning), before and after |
# | Which base model to start from? | public leaderboards — directional only, then your task metrics |
# | Is a free-text answer good? | an LLM judge, spot-checked by people |
#
# [lm-evaluation-harness](https://github.com/EleutherAI/lm-evaluation-harness) runs the benchmarks
# (`pip install "lm_eval[hf]"` or `lm_eval[vllm]`, on a GPU; it downloads the datasets). Commands for
# this profile's model — transformers + your adapter, vLLM on merged weights, or any served endpoint.
# lm-eval's `hf` backend loads a causal LM; for the Mistral 3.x vision checkpoints
# (`Mistral3ForConditionalGeneration`) the vLLM or endpoint lines are the dependable ones.

# %%
# NBVAL_CHECK_OUTPUT
import shlex

from course_utils.evaluate import lm_eval_command
from course_utils.profiles import MODELS

real = MODELS["mistral-small-3.2"].hf_id
print(shlex.join(lm_eval_command(real, adapter="outputs/gpu-24gb/adapters/receipts-lora", limit=200)))
print(shlex.join(lm_eval_command("outputs/gpu-24gb/merged/receipts", backend="vllm")))
print(
    shlex.join(
        lm_eval_command(
            "receipts",
            backend="local-chat-completions",
            num_fewshot=None,
            tasks=("gsm8k",),
            base_url="http://127.0.0.1:8080/v1/chat/completions",
        )
    )
)

# %% [markdown]
# `--limit 200` samples per task keeps a first check under an hour on one GPU; drop it for the number you
# publish. Compare base and tuned with the same command, and expect small drops — a large one means the
# learning rate or the number of epochs was too high.
#
# ## 5.9 Small 4: reasoning on and off
#
# Small 4 has a switch Small 3.x lacks: `reasoning_effort` (`"none"` or `"high"`) goes into the prompt as
# `[MODEL_SETTINGS]{"reasoning_effort": "high"}[/MODEL_SETTINGS]` (lesson 03), and with `"high"` a reply
# may open with a `[THINK]…[/THINK]` trace before the answer. What that costs is measurable: reply length,
# trace length, whether the answer is still valid JSON, seconds per reply. `compare_reasoning` generates
# the same prompts once per effort with the control tokens kept and splits each reply as vLLM's
# `--reasoning-parser mistral` does (`course_utils.chat.split_thinking`). The stand-in never saw a trace
# in training, so on it the table shows the mechanism (the setting reaches the prompt, the split works),
# not the behaviour: only the real model's numbers say whether thinking pays for your task.

# %% tags=["show-output"]
# NBVAL_IGNORE_OUTPUT
from course_utils.evaluate import compare_reasoning, supports_reasoning

if supports_reasoning(processor):
    runs = compare_reasoning(
        tuned, processor, prompts[:8], max_new_tokens=preset.max_new_tokens_eval, batch_size=8
    )
    print(format_table([run.row() for run in runs]))
else:
    print(f"{MODEL}'s chat template has no reasoning_effort: run with MODEL = 'mistral-small-4'.")

# %% [markdown]
# ## Summary
#
# - Evaluate on held-out rows with deterministic, batched decoding; the same rows and settings for base
#   and tuned (one model, adapter on and off).
# - Structured output needs several metrics: JSON validity, schema validity, field-level P/R/F1 after
#   normalisation, exact match — plus held-out loss.
# - Read the errors: per-field F1, outcome buckets and the worst rows show what to fix next.
# - An adapter whose effect is 0.0 is a no-op: check it before believing any "after" number.
# - LLM judges and lm-eval-harness answer other questions (free text, forgetting); use them deliberately.
# - On the stand-in: JSON validity rises from ≈ 0 to ≈ 1, field F1 stays low — the format is learned, the
#   values are invented.
# - Small 4's `reasoning_effort` is one more setting to evaluate: measure the trace's length and time and
#   the answer's validity with it on and off, on the same prompts.
#
# ## Exercises
#
# 🐢 A model wrote 8 facts, 6 of them right; the receipt has 10. What is its field F1? (two decimals)

# %%
from course_utils.exercises import check

f1_answer = None  # TODO: precision and recall first, then their harmonic mean
# SOLUTION: precision, recall = 6 / 8, 6 / 10
# SOLUTION: f1_answer = round(2 * precision * recall / (precision + recall), 2)
check("05-f1", f1_answer)

# %% [markdown]
# 🐕 Which field has the highest F1 for the tuned model on this run? (use `comparison.per_field()`)

# %%
best_field = None  # TODO: a field name, as the per-field table spells it
# SOLUTION: best_field = max(comparison.per_field(), key=lambda row: row["tuned"])["field"]
check("05-best-field", best_field, comparison=comparison)

# %% [markdown]
# 🦁 In your evaluation, on how many test rows did the base model write no valid JSON while the tuned
# model did (`comparison.examples` holds each row's `json_valid` per model)? Compare it with the
# `json_valid` change in the table above: are they the same number of rows, and why could they differ?

# %%
format_fixed = None  # TODO: count the examples whose json_valid is False for base and True for tuned
# SOLUTION: format_fixed = sum(
# SOLUTION:     not e["json_valid"]["base"] and e["json_valid"]["tuned"] for e in comparison.examples
# SOLUTION: )
check("05-format-fixed", format_fixed, comparison=comparison)
