# %% [markdown]
# # 06 · Export to GGUF and Ollama, verified against the model it came from
#
# Export is where fine-tuning runs die: llama.cpp fails to clone or build, the disk fills up while
# merging, vision silently disappears, or the Modelfile's template differs from training and the model
# never stops talking. This lesson merges lesson 04's adapter, converts it with llama.cpp's own tools
# (nothing cloned, nothing compiled at run time), quantizes it, and then *proves* the files are the
# model you trained: logits against transformers, token ids of the chat template, and the task metric of
# lesson 05 — before writing an Ollama Modelfile from the same template.
#
# ## Learning objectives
# - Plan disk space for an export and merge an adapter into 16-bit weights safely.
# - Convert to GGUF (f16) with the vision projector, and quantize to Q8_0 / Q4_K_M / Q5_K_M.
# - Verify each file: next-token logits and chat-template token ids against transformers.
# - Choose a quantization from a size / error / task-metric table.
# - Generate an Ollama Modelfile from the training template; load the GGUF in Ollama, LM Studio or
#   text-generation-webui.

# %% [markdown]
# ## 6.1 What you export, and where it goes
#
# | artifact | what it is | used by |
# |---|---|---|
# | merged safetensors | base + adapter folded into one 16-bit model | vLLM, transformers, Ollama's importer |
# | `receipts-f16.gguf` | the language model in llama.cpp's format | quantizing, reference |
# | `receipts-Q4_K_M.gguf` … | 4–8 bit quantized copies | Ollama, LM Studio, llama.cpp (CPU, small GPU) |
# | `receipts-mmproj-f16.gguf` | Pixtral vision tower + projector | images: llama.cpp `--mmproj`, Ollama |
# | `Modelfile`, `manifest.json` | Ollama recipe; size, sha256 of each file | deployment, integrity checks |
#
# The tools: llama.cpp's `convert_hf_to_gguf.py` comes from the `llama-cpp-python` source distribution
# on PyPI (it vendors llama.cpp, converters included) — fetched once into `outputs/tools/`, or set
# `LLAMA_CPP_DIR` to your own llama.cpp checkout. Quantization runs `llama_model_quantize` from the
# installed `llama-cpp-python`, the same code as the `llama-quantize` binary.

# %%
# NBVAL_IGNORE_OUTPUT
from course_utils import export, gguf_export, gguf_verify, ollama
from course_utils.models import load
from course_utils.paths import outputs_dir
from course_utils.receipts import RECEIPT_SCHEMA, lesson_splits
from course_utils.train import ensure_adapter, preset_for

# Where and how this machine merges, verifies and task-checks — refused here, before any download,
# when VRAM, RAM or disk is short (on a GPU: never a second full copy of the model).
merge_plan = export.plan_merge(profile, hardware)
print(f"merge: {merge_plan.method}; " + "; ".join(merge_plan.reasons))
train_rows, val_rows, test_rows, data_message = lesson_splits(profile.name)
adapter_dir, adapter_message = ensure_adapter(
    profile.name,
    outputs_dir(profile.outputs_name, "adapters") / "receipts-lora",
    train_rows,
    val_rows[:24],
    hardware=hardware,
    model=MODEL,
)
print(data_message, "|", adapter_message)
tools = gguf_export.llama_cpp_tools()
print("llama.cpp converters:", tools.name, sorted(p.name for p in tools.iterdir()))
export_dir = outputs_dir(profile.outputs_name, "export")

# %% [markdown]
# ## 6.2 Plan the disk before merging
#
# Merging writes a full 16-bit copy of the model; each GGUF adds its own size. On Colab or Kaggle this
# is the classic crash half-way through. `plan_export` estimates every artifact from the parameter count
# and `disk_preflight` refuses *before* writing, saying how much is missing. For Mistral Small 3.2:

# %%
# NBVAL_CHECK_OUTPUT
from pathlib import Path

from course_utils.profiles import MODELS, format_table

plan = export.plan_export(
    int(MODELS["mistral-small-3.2"].total_params_b * 1e9), ("F16", "Q8_0", "Q5_K_M", "Q4_K_M")
)
print(format_table(plan.rows()))
try:
    export.disk_preflight(
        Path("my-export"), plan.total_bytes, free_bytes=40 * 2**30
    )  # a Colab disk with 40 GiB free
except export.DiskSpaceError as error:
    print("refused:", error)

# %% [markdown]
# ## 6.3 Merge the adapter
#
# The base is loaded **unquantized**: merging into 4-bit weights would round most of the update away
# (Unsloth's `save_pretrained_merged(..., save_method="merged_16bit")` does the same on a GPU). The merged
# model must give the same logits as base + adapter — checked here before anything else.

# %%
# NBVAL_IGNORE_OUTPUT
import shutil

from course_utils.evaluate import load_tuned

if merge_plan.method == "peft-cpu":  # the stand-in: small enough to load once more, unquantized
    base = load(PROFILE, model=MODEL, hardware=hardware, load_in_4bit=False)
    plan = export.plan_export(
        base.model.num_parameters(),
        ("F16", "Q8_0", "Q5_K_M", "Q4_K_M"),
        merged_bytes_per_param=next(base.model.parameters()).element_size(),
    )
    BASE_ID = base.source
    del base
else:  # a real model: sized from its config (the download was checked by plan_merge above)
    plan = export.plan_export(int(MODELS[profile.model_key].total_params_b * 1e9))
    BASE_ID = profile.load_id
export.disk_preflight(export_dir, plan.total_bytes)  # refuses before writing anything
ADAPTER_DIR, MERGED_DIR, LOAD_IN_4BIT = str(adapter_dir), str(export_dir / "merged"), merge_plan.load_in_4bit
shutil.rmtree(MERGED_DIR, ignore_errors=True)  # this lesson's own folder, replaced on purpose

# %% tags=["copyable", "copy:merge"]
# NBVAL_IGNORE_OUTPUT
# Fold a LoRA adapter into its base model and save safetensors (for llama.cpp's converter, vLLM,
# Ollama): 16-bit on a GPU, 32-bit on the CPU path (the converter makes f16 either way). Needs BASE_ID
# (the base model's Hub id or folder), ADAPTER_DIR, MERGED_DIR and LOAD_IN_4BIT (how it was trained).
# On a GPU, Unsloth loads base + adapter as trained and writes the 16-bit merge shard by shard (it
# fetches the original 16-bit weights one shard at a time) — no second full copy in memory. Without a
# GPU, peft merges into a 32-bit base (never into 4-bit weights: that would round the update away).
from pathlib import Path

import torch

if Path(MERGED_DIR).exists() and any(Path(MERGED_DIR).iterdir()):
    raise FileExistsError(f"{MERGED_DIR} is not empty: choose another folder")
if torch.cuda.is_available():
    from unsloth import FastVisionModel

    model, processor = FastVisionModel.from_pretrained(ADAPTER_DIR, load_in_4bit=LOAD_IN_4BIT)
    model.save_pretrained_merged(MERGED_DIR, processor, save_method="merged_16bit")
else:
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    base_model = AutoModelForImageTextToText.from_pretrained(
        BASE_ID, dtype=torch.float32, use_safetensors=True
    )
    merged = PeftModel.from_pretrained(base_model, ADAPTER_DIR).merge_and_unload()
    merged.save_pretrained(MERGED_DIR)  # safetensors
    AutoProcessor.from_pretrained(BASE_ID).save_pretrained(MERGED_DIR)  # tokenizer, template, image settings
print(sorted(p.name for p in Path(MERGED_DIR).iterdir()))

# %% [markdown]
# The merged model must give the same logits as base + adapter — checked before anything else:

# %%
# NBVAL_IGNORE_OUTPUT
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

merged_dir = Path(MERGED_DIR)
processor = AutoProcessor.from_pretrained(merged_dir)
merged = None
if merge_plan.parity == "in-memory" and profile.is_stand_in:  # fp32, both in memory: exact
    merged = AutoModelForImageTextToText.from_pretrained(merged_dir, dtype=torch.float32).eval()
    tuned = load_tuned(load(PROFILE, model=MODEL, hardware=hardware, load_in_4bit=False).model, adapter_dir)
    text_row = next(r for r in val_rows if not r.get("images"))
    ids = processor.apply_chat_template(
        gguf_verify.as_parts(text_row["messages"][:-1]), tokenize=True, return_dict=True, return_tensors="pt"
    )["input_ids"]
    with torch.no_grad():
        gap = (merged(input_ids=ids).logits - tuned(input_ids=ids).logits).abs().max().item()
    print(f"merged vs base+adapter: largest logit difference {gap:.2e}")
    assert gap < 1e-3
    del tuned
elif merge_plan.parity != "skip":  # a GPU: the merged model in bf16 against lesson 05's tuned replies
    from course_utils.chat import generate_batch
    from course_utils.evaluate import prompts_of

    if "model" in globals():
        del model  # the merge cell's model: free its memory first
    torch.cuda.empty_cache()
    merged = AutoModelForImageTextToText.from_pretrained(merged_dir, dtype=torch.bfloat16, device_map="cuda")
    report = outputs_dir(profile.outputs_name, "eval", "receipts-lora") / "report.json"
    if report.exists():
        import json

        examples = json.loads(report.read_text())["examples"][:4]
        replies = generate_batch(merged, processor, prompts_of([test_rows[e["index"]] for e in examples]))
        same = sum(r[:40] == e["replies"]["tuned"][:40] for r, e in zip(replies, examples))
        print(f"merged (bf16) vs the tuned model of lesson 05: {same}/{len(examples)} replies start alike")
else:
    print("merged vs base+adapter: skipped —", merge_plan.reasons[1])

# %% [markdown]
# ## 6.4 Convert to GGUF — with the vision projector
#
# Two files come out of one merged folder: the language model (`mistral3` architecture, the Tekken
# tokenizer as `pixtral` pre-tokenizer, the training chat template embedded) and, with `--mmproj`, the
# Pixtral tower + projector. Upstream llama.cpp drops the `[IMG_BREAK]` embedding from the projector
# (`v.token_embd.img_break`), and loading then fails with *"Failed to load mtmd context"*;
# `course_utils.gguf_convert` runs the converter with that one fix.

# %%
from course_utils import gguf_convert

LLAMA_CPP_DIR, GGUF_DIR = str(tools), str(export_dir)
PROJECTOR_FIX = gguf_convert.__file__  # the converter with the one-line projector fix, as a script
for name in ("receipts-f16.gguf", "receipts-mmproj-f16.gguf"):
    (export_dir / name).unlink(missing_ok=True)  # this lesson's own files, replaced on purpose

# %% tags=["copyable", "copy:convert", "show-output"]
# NBVAL_IGNORE_OUTPUT
# Convert a merged Mistral 3 model to GGUF with llama.cpp's converter: the language model, then the
# vision tower + projector (--mmproj). Needs LLAMA_CPP_DIR (a llama.cpp checkout), MERGED_DIR, GGUF_DIR
# and PROJECTOR_FIX: upstream drops the [IMG_BREAK] embedding from Pixtral projectors (llama.cpp#24235),
# so the projector goes through the course's gguf_convert.py, which runs the same converter with that fix.
import shlex
import subprocess
import sys
from pathlib import Path

converter = str(Path(LLAMA_CPP_DIR) / "convert_hf_to_gguf.py")
model_gguf = Path(GGUF_DIR) / "receipts-f16.gguf"
projector_gguf = Path(GGUF_DIR) / "receipts-mmproj-f16.gguf"
commands = [
    [sys.executable, converter, MERGED_DIR, "--outfile", str(model_gguf), "--outtype", "f16"],
    [sys.executable, PROJECTOR_FIX, LLAMA_CPP_DIR, MERGED_DIR, "--outfile", str(projector_gguf)]
    + ["--outtype", "f16", "--mmproj"],
]
for command in commands:
    print("$", shlex.join(command))
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"conversion failed:\n{done.stderr[-2000:]}")
print(f"{model_gguf.name}: {model_gguf.stat().st_size / 2**20:.1f} MiB")
print(f"{projector_gguf.name}: {projector_gguf.stat().st_size / 2**20:.1f} MiB")

# %%
# NBVAL_IGNORE_OUTPUT
files, mmproj = {"F16": model_gguf}, projector_gguf
header = gguf_export.read_gguf_kv(files["F16"])
print({k: header[k] for k in ("general.architecture", "tokenizer.ggml.pre", "general.file_type")})
print(
    "projector:",
    gguf_export.read_gguf_kv(mmproj, "clip.projector_type"),
    "| has img_break:",
    b"v.token_embd.img_break" in mmproj.read_bytes(),
)

# %% [markdown]
# ## 6.5 Quantize
#
# K-quants (`Q4_K_M`, `Q5_K_M`) store weights in blocks of 256 with per-block scales; `_M` keeps the
# most sensitive tensors (attention values, FFN down) at higher precision. `Q8_0` is near-lossless at
# half the size of f16. On the stand-in, rows are only 128 wide — not a multiple of 256 — so llama.cpp
# falls back to `q5_1`/`q8_0` for those tensors and says so; real models (5120 wide) do not.

# %%
F16_GGUF = str(files["F16"])
for qtype in ("Q8_0", "Q5_K_M", "Q4_K_M"):
    (export_dir / f"receipts-{qtype}.gguf").unlink(missing_ok=True)  # replaced on purpose

# %% tags=["copyable", "copy:quantize", "show-output"]
# NBVAL_IGNORE_OUTPUT
# Quantize a GGUF. With llama.cpp built, the command line is `llama-quantize IN OUT TYPE`; without the
# binary, llama-cpp-python calls the same llama_model_quantize function. Needs F16_GGUF and GGUF_DIR.
import ctypes
import shlex
import shutil
import subprocess
from pathlib import Path

import llama_cpp

FILE_TYPES = {
    "Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
    "Q5_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M,
    "Q4_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
}
quantized = {}
for qtype, file_type in FILE_TYPES.items():
    out = Path(GGUF_DIR) / f"receipts-{qtype}.gguf"
    command = ["llama-quantize", F16_GGUF, str(out), qtype]
    print("$", shlex.join(command))
    if shutil.which("llama-quantize"):
        subprocess.run(command, check=True, capture_output=True)
    else:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = file_type
        if llama_cpp.llama_model_quantize(F16_GGUF.encode(), str(out).encode(), ctypes.byref(params)) != 0:
            raise RuntimeError(f"quantizing to {qtype} failed")
    quantized[qtype] = out
    print(f"  {qtype:7s} {out.stat().st_size / 2**20:6.1f} MiB")

# %%
files.update(quantized)

# %% [markdown]
# ## 6.6 Verify: is this the model you trained?
#
# Three checks, each catching a different failure:
#
# 1. **Logits.** llama.cpp and transformers get the same token ids; compare the next-token logits at every
#    position. Error is relative to the spread of the logits; top-1 agreement is the share of positions
#    where both pick the same token. Tolerances per type are in `gguf_verify.TOLERANCES`.
# 2. **Template.** The training template embedded in the GGUF, rendered by llama-cpp-python (as its
#    server does), must give the same token ids as transformers — including `<s>`, which is easy to lose.
# 3. **Task.** Lesson 05's metric on the test split, through llama.cpp (images via the projector). Each
#    file is served by its own llama.cpp server process (`gguf_verify.served_replies`) and asked over the
#    OpenAI-compatible API, as lesson 07 serves it (decoding plain greedy). One process per file also
#    means no C state of one model (its projector context above all) is left behind for the next:
#    evaluated one after another in a single Python process, image replies of the last file sometimes
#    came back empty on fresh CI machines (llama-cpp-python 0.3.36).

# %% tags=["show-output"]
# NBVAL_IGNORE_OUTPUT
conversations = [r["messages"][:-1] for r in val_rows if not r.get("images")][:4]
quality = []
for qtype, path in files.items():
    row = {"type": qtype, "MiB": round(path.stat().st_size / 2**20, 1)}
    if merged is not None:  # the merged model in memory (always on the stand-in)
        llm = gguf_verify.open_gguf(path, logits_all=True, n_ctx=1024)
        parity = gguf_verify.logit_parity(llm, merged, processor, conversations)
        llm.close()
        row["logit error %"] = round(100 * parity["rel_mean_abs"], 2)
        row["top-1 agree"] = round(parity["top1"], 3)
        row["within tolerance"] = gguf_verify.within_tolerance(parity, qtype)
    quality.append(row)
print(format_table(quality))
assert all(row.get("within tolerance", True) for row in quality), (
    "a GGUF drifted from the merged model beyond tolerance"
)

# %%
# NBVAL_IGNORE_OUTPUT
template_checks = [
    [{"role": "user", "content": "Héllo wörld ✓"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": " spaces \n"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "again"},
    ],
] + conversations
llm = gguf_verify.open_gguf(files["F16"], n_ctx=1024)
mismatches = gguf_verify.template_parity(llm, processor, template_checks)
llm.close()
print(
    f"template: {len(template_checks) - len(mismatches)}/{len(template_checks)} conversations token-identical"
)
assert not mismatches, mismatches

# %% tags=["show-output"]
# NBVAL_IGNORE_OUTPUT
from course_utils.evaluate import compare, targets_of

task_rows = test_rows[: merge_plan.task_rows]  # the stand-in: all; a real model: a capped subset
targets = targets_of(task_rows)
replies, endings = {}, {}
for qtype in merge_plan.task_quants:
    endings[qtype] = []  # why each reply ended: "stop" (end of turn) or "length" (ran out of tokens)
    replies[f"llama.cpp {qtype}"] = gguf_verify.served_replies(
        files[qtype],
        task_rows,
        mmproj=mmproj,
        details=endings[qtype],
        max_new_tokens=preset_for(profile.name).max_new_tokens_eval,
        n_gpu_layers=merge_plan.n_gpu_layers,
    )
task = compare(replies, targets, RECEIPT_SCHEMA)
for row in quality:
    name = f"llama.cpp {row['type']}"
    row["JSON-valid"] = round(task.metrics[name]["json_valid"], 2) if name in task.metrics else None
print(format_table(quality))

# %% [markdown]
# Lesson 05 measured the transformers model on
# the same split; the Q4_K_M file should keep at least 80 % of its JSON-valid rate. The report saved by
# lesson 05 holds that number.

# %% tags=["show-output"]
# NBVAL_IGNORE_OUTPUT
import json

report = outputs_dir(profile.outputs_name, "eval", "receipts-lora") / "report.json"
reference = json.loads(report.read_text())["metrics"]["tuned"]["json_valid"] if report.exists() else None
q4 = task.metrics["llama.cpp Q4_K_M"]["json_valid"]
print(f"JSON-valid: transformers (lesson 05) {reference}, llama.cpp Q4_K_M {q4:.2f}")
by_kind = {
    kind: [
        e["json_valid"]["llama.cpp Q4_K_M"]
        for e, row in zip(task.examples, task_rows)
        if bool(row.get("images")) == (kind == "image")
    ]
    for kind in ("text", "image")
}
print(
    "Q4_K_M JSON-valid by input:",
    {kind: f"{sum(v) / len(v):.2f} of {len(v)}" for kind, v in by_kind.items() if v},
)
if profile.is_stand_in and reference:
    broken = [
        (
            row["id"],
            "image" if row.get("images") else "text",
            end["finish_reason"],
            e["replies"]["llama.cpp Q4_K_M"][-60:],
        )
        for e, row, end in zip(task.examples, task_rows, endings["Q4_K_M"])
        if not e["json_valid"]["llama.cpp Q4_K_M"]
    ]
    assert q4 >= 0.8 * reference, f"Q4_K_M lost too much of the task metric: {q4:.2f}; e.g. {broken[:3]}"

# %% tags=["show-output"]
# NBVAL_IGNORE_OUTPUT
import matplotlib.pyplot as plt

fig, ax1 = plt.subplots(figsize=(7, 3.4))
names = [row["type"] for row in quality]
ax1.bar(names, [row["MiB"] for row in quality], color="#bbb")
ax1.set_ylabel("file size (MiB)")
ax2 = ax1.twinx()
ax2.plot(names, [row["logit error %"] for row in quality], "o-", color="C3", label="logit error %")
ax2.set_ylabel("logit error, % of the logits' spread")
ax1.set_title("Size vs error per quantization (stand-in)")
fig.tight_layout()

# %% [markdown]
# How to choose: **Q4_K_M** is the usual default (≈ 30 % of f16, small quality loss on real models);
# **Q5_K_M** when quality matters and memory allows; **Q8_0** as a near-lossless reference; f16 only to
# quantize from. For Mistral Small 3.2 (24B): f16 ≈ 44.7 GiB, Q8_0 ≈ 23.8 GiB, Q5_K_M ≈ 15.9 GiB, Q4_K_M
# ≈ 13.7 GiB (`plan_export` above) — Q4_K_M fits a 16 GB GPU with a short context.
#
# ## 6.7 The Ollama Modelfile — from the training template
#
# Ollama uses Go templates, not Jinja, so the template must be translated — and a hand-written one is
# where runaway generations come from. `template_parts` renders the *training* template around marker
# strings and cuts out the literal pieces (BOS, `[SYSTEM_PROMPT]`, `[INST]`, `[/INST]`, `</s>`); the
# Modelfile's TEMPLATE is assembled from exactly those pieces (tests check the pieces re-create the
# training template on many conversations). The stop tokens come from the same pieces.
# `PARAMETER repeat_penalty 1.0` matters too: Ollama (like llama-cpp-python's server) penalises repeated
# tokens by 1.1 unless told otherwise — not how the model was evaluated, and JSON is full of repeated quotes
# and braces.

# %%
from course_utils.receipts import SYSTEM_PROMPT

GGUF_ADDS_BOS = gguf_export.read_gguf_kv(files["Q4_K_M"], "tokenizer.ggml.add_bos_token")
print("the GGUF's tokenizer adds <s> itself:", GGUF_ADDS_BOS)

# %% tags=["copyable", "copy:modelfile"]
# NBVAL_CHECK_OUTPUT
# An Ollama Modelfile for a GGUF in Mistral's v7 chat format. Needs GGUF_DIR, SYSTEM_PROMPT and
# GGUF_ADDS_BOS (the GGUF's tokenizer.ggml.add_bos_token): <s> goes in the template only if the GGUF does
# not add it itself — missing or doubled, the model sees a prompt it was never trained on.
from pathlib import Path

template = ("" if GGUF_ADDS_BOS else "<s>") + (
    "{{- range $i, $_ := .Messages }}\n"
    '{{- if eq .Role "system" }}[SYSTEM_PROMPT]{{ .Content }}[/SYSTEM_PROMPT]\n'
    '{{- else if eq .Role "user" }}[INST]{{ .Content }}[/INST]\n'
    '{{- else if eq .Role "assistant" }}{{ .Content }}</s>\n'
    "{{- end }}\n{{- end }}"
)
modelfile = "\n".join(
    [
        "FROM ./receipts-Q4_K_M.gguf",
        f'TEMPLATE """{template}"""',
        f'SYSTEM """{SYSTEM_PROMPT}"""',
        "PARAMETER temperature 0.15",
        "PARAMETER num_ctx 4096",
        "# Ollama's default repeat_penalty is 1.1: not how the model was evaluated (JSON repeats quotes)",
        "PARAMETER repeat_penalty 1.0",
        'PARAMETER stop "</s>"',
        'PARAMETER stop "[INST]"',
    ]
)
modelfile_path = Path(GGUF_DIR) / "Modelfile"
modelfile_path.write_text(modelfile + "\n")
print(modelfile)

# %% [markdown]
# Is that template really the one the model was trained with? `template_parts` renders the *training*
# template around marker strings and cuts out its literal pieces; the Modelfile built from those pieces
# must be the one above (comments aside):

# %%
# NBVAL_CHECK_OUTPUT
parts = ollama.template_parts(processor)
print(parts)
derived = ollama.modelfile(
    "receipts-Q4_K_M.gguf", parts, system=SYSTEM_PROMPT, num_ctx=4096, bos_in_template=not GGUF_ADDS_BOS
)


def without_comments(text):
    return [line for line in text.splitlines() if not line.startswith("#")]


print("same as the training template's pieces:", without_comments(derived) == without_comments(modelfile))

# %%
# NBVAL_IGNORE_OUTPUT
manifest = export.write_manifest(
    export_dir,
    [*files.values(), mmproj, modelfile_path],
    {"adapter": adapter_dir.name, "base_model": BASE_ID, "quality": quality},
    overwrite=True,
)
print(manifest.read_text()[:600], "…")
assert export.verify_manifest(manifest) == []

# %% [markdown]
# ### The alternative to merging: a LoRA GGUF
#
# Keep one base GGUF and ship adapters of a few MB: `llama-server -m base.gguf --lora adapter.gguf`
# (llama-cpp-python: `Llama(model_path=..., lora_path=...)`). `convert_lora_to_gguf` runs llama.cpp's
# `convert_lora_to_gguf.py` — with a fix: for `Mistral3ForConditionalGeneration` it would silently write
# the whole base model instead of the adapter — and refuses any result that is not an adapter. A test
# checks base GGUF + LoRA GGUF = merged GGUF on a pure LoRA adapter. Lesson 04's stand-in adapter also
# trains embedding rows (`trainable_token_indices`), which are not LoRA tensors and have no place in a
# LoRA GGUF — llama.cpp's converter says so, and this is why this lesson merges:

# %%
# NBVAL_IGNORE_OUTPUT
try:
    lora_gguf = gguf_export.convert_lora_to_gguf(
        adapter_dir, BASE_ID, export_dir / "receipts-lora-f16.gguf", tools=tools, overwrite=True
    )
    print("adapter GGUF:", lora_gguf.name, f"{lora_gguf.stat().st_size / 2**20:.1f} MiB")
except export.ExportError as error:
    print("not convertible as a LoRA GGUF:", str(error).splitlines()[-1])

# %% [markdown]
# ### Ollama (runs only where `ollama` is installed)
#
# `ollama create` copies the files into Ollama's store. The Modelfile above is text-only: a separate
# projector as a second `FROM` has hung `ollama create` for Pixtral-style models (ollama#17491), so for
# vision in Ollama use `FROM ./merged` (Ollama converts the merged safetensors itself, projector
# included). `num_ctx` in the Modelfile is the model's default (a request's `options.num_ctx` or the
# server's `OLLAMA_CONTEXT_LENGTH` override it). `/api/chat` takes base64 `images`;
# `/v1/chat/completions` takes data URIs.

# %%
# NBVAL_IGNORE_OUTPUT
import shutil
import subprocess

from course_utils.serve import ollama_running

commands = ollama.ollama_commands("receipts-extractor", modelfile_path)
if shutil.which("ollama") and ollama_running():
    subprocess.run(commands["create"], check=True, cwd=export_dir)
    answer = subprocess.run(commands["run"], capture_output=True, text=True, timeout=300)
    if answer.returncode != 0:  # a model that does not load, a server gone: say what Ollama said
        raise RuntimeError(f"ollama run failed ({answer.returncode}): {answer.stderr.strip()[-500:]}")
    print(answer.stdout)
else:
    print("no Ollama server here (install Ollama, start `ollama serve`); then, in", export_dir.name + "/:")
    for command in commands.values():
        print("  ", " ".join(command))

# %% [markdown]
# ### LM Studio and text-generation-webui
#
# - **LM Studio**: *My Models → Import* (or `lms import receipts-Q4_K_M.gguf`); put
#   `receipts-mmproj-f16.gguf` in the same folder for vision. It reads the chat template from the GGUF —
#   the one verified above. Set temperature 0.15.
# - **text-generation-webui**: copy the GGUF into `user_data/models/` (or `models/` in older versions),
#   choose the *llama.cpp* loader, and for images pass the projector in the loader's `mmproj` field. In
#   *Parameters → Instruction template* keep "from model metadata".
#
# ### On a GPU with Unsloth
#
# Unsloth's `save_pretrained_gguf` clones and builds llama.cpp unless it finds one. It looks in one folder,
# read once when `unsloth` is imported (`UNSLOTH_LLAMA_CPP_PATH`), and demands a `llama-quantize`
# executable there even for f16. The course points that folder at the converters fetched above before
# its one `import unsloth` (`models.load`), and `llama_cpp_tools()` writes a `llama-quantize` that runs
# llama-cpp-python's quantizer — so Unsloth's export works offline, without a build. The model is loaded
# as it was trained (4-bit on the 24 GB and T4 profiles): Unsloth writes the 16-bit merge shard by shard.

# %%
# NBVAL_IGNORE_OUTPUT
import os

print(
    "Unsloth's llama.cpp folder:", os.environ.get("UNSLOTH_LLAMA_CPP_PATH", "(set when unsloth is imported)")
)
print("llama-quantize here:", (tools / "llama-quantize").is_file())
if profile.backend == "unsloth" and hardware.accelerator == "cuda":
    import unsloth_zoo.llama_cpp

    if Path(unsloth_zoo.llama_cpp.LLAMA_CPP_DEFAULT_DIR) != tools:
        print("unsloth was imported before the course set its folder: restart, run this lesson first")
    else:
        os.environ.update(export.unsloth_llama_cpp_env(tools))  # the other two are read at each call
        import gc

        merged = None  # 6.3's merged copy (bf16 on the 80 GB rung): freed before a second model loads
        gc.collect()
        torch.cuda.empty_cache()
        from unsloth import FastVisionModel

        gpu_model, gpu_tokenizer = FastVisionModel.from_pretrained(
            str(adapter_dir), load_in_4bit=merge_plan.load_in_4bit
        )
        gpu_model.save_pretrained_gguf(
            str(export_dir / "unsloth"), gpu_tokenizer, quantization_method="q4_k_m"
        )
else:
    print("(GPU only) model.save_pretrained_gguf(out, tokenizer, quantization_method='q4_k_m')")

# %% [markdown]
# ## Summary
#
# - Merge into an unquantized base, after a disk preflight; check merged = base + adapter.
# - llama.cpp's own converter and quantizer, obtained without cloning or compiling at run time; the vision
#   projector written with the `img_break` fix.
# - Verify every file three ways: logits (per-type tolerances), chat-template token ids, task metric.
# - The Ollama TEMPLATE and stop tokens are derived from the training template, never retyped.
# - A manifest with sizes and sha256 travels with the files; nothing is overwritten unless asked.
# - A LoRA GGUF on the base GGUF (`--lora`) equals the merged model for pure LoRA adapters; adapters that
#   also train embedding rows or whole modules must be merged.
#
# ## Exercises
#
# 🐢 What fraction of the f16 file's size is the Q4_K_M file on the stand-in? (two decimals)

# %%
from course_utils.exercises import check

q4_fraction = None  # TODO: divide the two file sizes (Path.stat().st_size)
# SOLUTION: q4_fraction = round(files["Q4_K_M"].stat().st_size / files["F16"].stat().st_size, 2)
check("06-q4-fraction", q4_fraction, files=files)

# %% [markdown]
# 🐕 Using `export.plan_export`, how many GiB (one decimal) does a Q4_K_M GGUF of Mistral Small 4
# (119B parameters) take? Would it fit on one 80 GB GPU?

# %%
small4_q4_gib = None  # TODO: export.plan_export(...).files holds bytes per file
# SOLUTION: small4_q4_gib = round(export.plan_export(int(119e9), ("Q4_K_M",)).files["GGUF Q4_K_M"] / 2**30, 1)
check("06-small4-q4-gib", small4_q4_gib)

# %% [markdown]
# 🦁 Write a Modelfile of your own for the **Q8_0** file, with a context of 8,192 tokens
# (`PARAMETER num_ctx 8192`) and the same `TEMPLATE` as this lesson's, into the folder of the GGUFs
# (`GGUF_DIR`) as `Modelfile.q8`. The check reads your file: its `FROM` must point at the Q8_0 GGUF and its
# template must be the training template's. Then try `[INST] {{ .Prompt }} [/INST]` (spaces around the
# prompt) as the template: what does the model see that it never saw in training?

# %%
my_modelfile = None  # TODO: the path of the Modelfile you wrote
# SOLUTION: mine = modelfile.replace("receipts-Q4_K_M.gguf", "receipts-Q8_0.gguf")
# SOLUTION: my_modelfile = Path(GGUF_DIR) / "Modelfile.q8"
# SOLUTION: my_modelfile.write_text(mine.replace("num_ctx 4096", "num_ctx 8192") + "\n")
check("06-own-modelfile", my_modelfile, reference=modelfile)
