# %% [markdown]
# # 02 · Vision prompting, and the dataset you will fine-tune on
#
# Mistral Small 3.1+ reads images. You will see how an image becomes tokens and what that costs
# in a 128k context, prompt the model with one image, several images and a UI screenshot, and extract
# JSON from receipts — the course dataset you fine-tune on in lesson 04.
#
# > **On `cpu-tiny`** the stand-in has random weights: its answers are gibberish and its JSON fails to
# > parse. That is the honest "before" picture. Every call here is the one a GPU runs with the real
# > model — switch the profile and the same cells give real answers.
#
# ## Learning objectives
# - Compute how many tokens an image costs, and how many images fit a 128k / 256k context.
# - Choose an image resolution: the token budget vs legibility trade-off.
# - Prompt with one image, several images and a screenshot; pass images as paths, PIL images or data URIs.
# - Get reliable JSON: system prompt, schema, few-shot with images, low temperature, validation.
# - Know the course dataset: how it was made, its splits and its schema.

# %% [markdown]
# ## 2.1 Load the model and the course dataset
#
# `load_receipts` uses CORD-v2 from the Hugging Face Hub when it is reachable and the shipped synthetic
# receipts otherwise — the same call, and it tells you which one you got. Everything below runs unchanged
# with `MODEL = "mistral-small-4"`: Small 4 is the same Mistral 3 vision wrapper (Pixtral encoder, `[IMG]`
# tokens) around a different text model.

# %%
# NBVAL_IGNORE_OUTPUT
from course_utils.models import load
from course_utils.receipts import load_receipts

model, processor, description = load(PROFILE, model=MODEL, hardware=hardware)
print(description)
test_rows, where = load_receipts("test", source="local" if profile.is_stand_in else "auto", limit=8)
print(where)

# %%
# NBVAL_CHECK_OUTPUT
import json

example = test_rows[0]
print(example["id"], "→", example["images"][0].split("/")[-1])
print(json.dumps(example["target"], ensure_ascii=False, indent=1)[:400])

# %% tags=["show-output"]
# NBVAL_IGNORE_OUTPUT
from IPython.display import display

from course_utils.chat import load_image

receipt = load_image(example["images"][0])
display(receipt)

# %% [markdown]
# ## 2.2 How an image becomes tokens
#
# The Pixtral encoder cuts the image into 14×14-pixel patches and merges each 2×2 block into one token
# (28×28 pixels per token for Small 3.x). Each row of tokens ends with `[IMG_BREAK]`, the last with
# `[IMG_END]`. Images larger than the longest edge (1540 px for Small 3.x) are scaled down first.
# Here is the layout the processor really emits for a small image:

# %%
# NBVAL_CHECK_OUTPUT
from PIL import Image

from course_utils.chat import image_token_cost, user_message

small = Image.new("RGB", (130, 80), "white")
ids = processor.apply_chat_template([user_message("Hi", [small])], tokenize=True, return_dict=True)[
    "input_ids"
][0].tolist()
names = {10: "I", 12: "|", 13: "]"}
print("".join(names[i] for i in ids if i in names).replace("|", "|\n").replace("]", "]\n"), end="")
print(
    "tokens:",
    sum(i in names for i in ids),
    "= image_token_cost:",
    image_token_cost(*small.size, processor=processor),
)

# %% [markdown]
# ### What images cost in a long context
#
# For the real Small 3.x settings (patch 14, merge 2, longest edge 1540) a full-page scan costs
# thousands of tokens. How many fit in a 128k (Small 3.x) or 256k (Small 4) context, keeping 2k tokens
# for the prompt and the reply?

# %%
# NBVAL_CHECK_OUTPUT
from course_utils.profiles import format_table

rows = []
for width, height in [(256, 341), (512, 683), (768, 1024), (1024, 1365), (1540, 2053), (1536, 864)]:
    cost = image_token_cost(width, height)
    rows.append(
        {
            "image (w x h)": f"{width}x{height}",
            "tokens": cost,
            "fit in 128k": (131072 - 2048) // cost,
            "fit in 256k": (262144 - 2048) // cost,
        }
    )
print(format_table(rows))

# %% tags=["show-output"]
# NBVAL_IGNORE_OUTPUT
import matplotlib.pyplot as plt

edges = list(range(112, 1541, 28))
fig, ax = plt.subplots(figsize=(7, 3.5))
ax.plot(edges, [image_token_cost(e * 3 // 4, e) for e in edges], label="portrait 3:4 (receipt, page)")
ax.plot(edges, [image_token_cost(e, e * 9 // 16) for e in edges], label="landscape 16:9 (screenshot)")
ax.set_xlabel("longest edge (px)")
ax.set_ylabel("tokens per image")
ax.set_title("Image token cost grows with the square of the resolution")
ax.grid(alpha=0.3)
ax.legend()
plt.show()

# %% [markdown]
# ## 2.3 A resize policy: the trade-off
#
# `resize_for_budget(image, max_tokens)` scales an image down until it costs at most `max_tokens`.
# Fewer tokens are cheaper, faster and leave room for more images — but below roughly 8–10 pixels of
# text height, small print stops being legible to any model. Compare the same receipt at three budgets
# (the real model's settings):

# %%
# NBVAL_IGNORE_OUTPUT
from course_utils.chat import resize_for_budget

budgets = [40, 120, 400]
fig, axes = plt.subplots(1, 3, figsize=(10, 4))
for ax, budget in zip(axes, budgets):
    shrunk = resize_for_budget(receipt, budget)
    ax.imshow(shrunk, cmap="gray")
    ax.set_title(
        f"≤{budget} tokens: {shrunk.size[0]}x{shrunk.size[1]} px, {image_token_cost(*shrunk.size)} tokens",
        fontsize=9,
    )
    ax.axis("off")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 2.4 One image, one question
#
# The whole of image prompting with transformers: a user turn whose content lists the image first
# (the layout Mistral's models were trained on) and then the text; the processor's chat template turns
# the image into rows of `[IMG]` tokens and returns `pixel_values` beside the token ids; `generate`
# continues after the prompt. The cell below is plain library code — copy it with the loading cell of
# lesson 01.

# %%
IMAGE_PATH = example["images"][0]  # a receipt from the course dataset; use your own image file

# %% tags=["copyable", "copy:image-prompt"]
# NBVAL_IGNORE_OUTPUT
# Ask about an image. Needs `model` and `processor` (lesson 01's loading cell) and IMAGE_PATH.
import torch
from PIL import Image

messages = [
    {
        "role": "user",
        "content": [
            {"type": "image", "image": Image.open(IMAGE_PATH).convert("RGB")},
            {"type": "text", "text": "What is the name of the shop on this receipt?"},
        ],
    }
]
inputs = processor.apply_chat_template(
    messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
).to(model.device)
inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
with torch.inference_mode():
    output = model.generate(**inputs, max_new_tokens=24, do_sample=False)  # greedy; sample at 0.15 for chat
reply = processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
image_tokens = int((inputs["input_ids"] == processor.tokenizer.convert_tokens_to_ids("[IMG]")).sum())
print(f"{inputs['input_ids'].shape[1]} prompt tokens, {image_tokens} of them [IMG]; reply: {reply!r}")

# %% [markdown]
# ## 2.5 Document → JSON on the course dataset
#
# The prompt that works for extraction: a system prompt that says *only JSON*, an instruction that
# names every key, and (for the real model) temperature 0.15 or greedy decoding. The reply is then
# **validated**: `extract_json` finds the object even inside a ```` ```json ```` fence or before chatter,
# and checks it against the schema — a failure says exactly which field is wrong. Batched generation
# (left padding) processes several receipts at once.

# %% [markdown]
# `extract_json` in full — the course's package holds this same function (a test keeps the two equal),
# and later lessons import it from there:


# %%
class JSONExtractionError(ValueError):
    """A reply held no usable JSON object; the message says what failed and where."""


def extract_json(reply: str, schema: dict | None = None) -> dict:
    """The JSON object in a model reply — bare, in a ```json fence, after other fences, or before chatter.

    Looked for in order: the reply itself, fences tagged ``json`` or untagged, the text outside fences, any
    other fence; in each, the object that starts at its first ``{``. The first that parses wins, so an
    object nested in broken JSON never counts, and fences written inside a JSON string stay text. NaN and
    Infinity (``1e999`` too) are refused: Python writes them, JSON has no such numbers.
    With ``schema`` (JSON Schema), the object is validated too; the error names the failing field.
    """
    import json
    import math
    import re

    def refuse(constant: str):
        raise ValueError(f"{constant} is not JSON (JSON has no NaN or Infinity)")

    def finite(text: str) -> float:
        value = float(text)
        return value if math.isfinite(value) else refuse(text)

    fences = re.findall(r"```([\w+-]*)(.*?)```", reply, flags=re.DOTALL)
    outside = re.sub(r"```.*?```", " ", reply, flags=re.DOTALL)
    places = [reply] + [body for tag, body in fences if tag.lower() in ("", "json")]
    places += [outside] + [body for tag, body in fences if tag.lower() not in ("", "json")]
    failures = []
    for text in places:
        start = text.find("{")
        if start < 0:
            continue
        try:
            value, _ = json.JSONDecoder(parse_constant=refuse, parse_float=finite).raw_decode(text, start)
        except json.JSONDecodeError as exc:
            near = text[max(start, exc.pos - 20) : exc.pos + 20]
            failures.append(f"invalid JSON at character {exc.pos}: {exc.msg} — near {near!r}")
            continue
        except ValueError as exc:
            failures.append(str(exc))
            continue
        break
    else:
        if failures:
            raise JSONExtractionError(failures[0])
        raise JSONExtractionError(f"no JSON object in the reply (no '{{' found): {reply[:80]!r}")
    if schema is not None:
        import jsonschema

        errors = sorted(
            jsonschema.Draft7Validator(schema).iter_errors(value), key=lambda e: list(e.absolute_path)
        )
        if errors:
            first = errors[0]
            where = (
                "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first.absolute_path).lstrip(".")
                or "(root)"
            )
            more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
            raise JSONExtractionError(f"schema: field {where}: {first.message}{more}")
    return value


# %%
# NBVAL_IGNORE_OUTPUT
from course_utils.chat import generate_batch
from course_utils.receipts import RECEIPT_SCHEMA

prompts = [
    [
        dict(
            m,
            content=[
                dict(part, image=row["images"][0]) if part["type"] == "image" else part
                for part in m["content"]
            ],
        )
        if isinstance(m["content"], list)
        else m
        for m in row["messages"][:-1]
    ]
    for row in test_rows[:4]
]
replies = generate_batch(model, processor, prompts, max_new_tokens=48, batch_size=4)
for row, reply in zip(test_rows, replies):
    try:
        parsed = extract_json(reply, RECEIPT_SCHEMA)
        verdict = f"valid, total {parsed['total']} (expected {row['target']['total']})"
    except JSONExtractionError as error:
        verdict = f"rejected: {error}"
    print(f"{row['id']}: {verdict[:110]}")

# %% [markdown]
# `extract_json` on replies you would see from a real model:

# %%
# NBVAL_CHECK_OUTPUT
samples = [
    'Sure! ```json\n{"merchant": "Café", "date": "2024-02-01", "currency": "EUR", '
    '"items": [{"name": "Tea", "qty": 2, "unit_price": 1.5}], "subtotal": 3.0, '
    '"tax": 0.57, "total": 3.57}\n```',
    '{"merchant": "Café", "date": "01.02.2024", "currency": "EUR", "items": [], '
    '"subtotal": 3, "tax": 0.57, "total": 3.57}',
    "The total is 3.57 EUR.",
]
for reply in samples:
    try:
        print("OK   ", extract_json(reply, RECEIPT_SCHEMA)["total"])
    except JSONExtractionError as error:
        print("ERROR", error)

# %% [markdown]
# ## 2.6 Prompt patterns: few-shot with images
#
# Showing one or two solved examples (image + correct JSON) before the real question is the strongest
# prompt-only fix for format errors. It costs context: every example image is paid for again.

# %%
# NBVAL_CHECK_OUTPUT
from course_utils.receipts import INSTRUCTION, SYSTEM_PROMPT

train_rows, _ = load_receipts("train", source="local", limit=2)
few_shot = [{"role": "system", "content": SYSTEM_PROMPT}]
for shot in train_rows:
    few_shot += [
        user_message(INSTRUCTION, [shot["images"][0]]),
        {"role": "assistant", "content": shot["messages"][-1]["content"]},
    ]
few_shot.append(user_message(INSTRUCTION, [example["images"][0]]))
zero_shot = [{"role": "system", "content": SYSTEM_PROMPT}, user_message(INSTRUCTION, [example["images"][0]])]


def count(conversation):
    return processor.apply_chat_template(conversation, tokenize=True, return_dict=True)["input_ids"].shape[1]


print(
    f"zero-shot prompt: {count(zero_shot)} tokens; two-shot prompt: {count(few_shot)} tokens"
    " (stand-in's 224 px images)"
)

# %%
# NBVAL_IGNORE_OUTPUT
from course_utils.chat import generate  # the cell above, as a function

print(generate(model, processor, few_shot, max_new_tokens=48, temperature=0.15))

# %% [markdown]
# ## 2.7 A UI screenshot review
#
# Vision models are handy reviewers of screenshots. This mock settings page has a deliberate bug —
# a low-contrast *Save* button overlapping the last row. A good prompt asks for specific, checkable
# findings.

# %% tags=["show-output"]
# NBVAL_IGNORE_OUTPUT
from course_utils.receipts import render_ui_mockup

screenshot = render_ui_mockup(seed=0)
display(screenshot)
review = [
    {"role": "system", "content": "You are a meticulous UI reviewer."},
    user_message(
        "List up to three concrete usability or accessibility problems in this screenshot, "
        "each with the element and a fix.",
        [screenshot],
    ),
]
print(generate(model, processor, review, max_new_tokens=40))

# %% [markdown]
# ## 2.8 Comparing several images
#
# Several images go into one user message; the model sees them in order. Name them in the text so the
# answer can refer to them.

# %%
# NBVAL_IGNORE_OUTPUT
first, second = test_rows[1], test_rows[2]
compare = [
    user_message(
        "Receipt A is the first image, receipt B the second. Which one has the higher total, "
        "and by how much? Answer in one sentence.",
        [first["images"][0], second["images"][0]],
    )
]
print(generate(model, processor, compare, max_new_tokens=32))
print(
    "ground truth:",
    first["target"]["total"],
    first["target"]["currency"],
    "vs",
    second["target"]["total"],
    second["target"]["currency"],
)

# %% [markdown]
# ## 2.9 Images over an API
#
# OpenAI-compatible servers (vLLM, llama.cpp's server, Ollama's `/v1`) take images as `data:` URIs in
# an `image_url` part; lesson 07 sends exactly this. The round trip is lossless:

# %%
# NBVAL_CHECK_OUTPUT
from course_utils.chat import to_data_uri

uri = to_data_uri(small)
api_message = {
    "role": "user",
    "content": [
        {"type": "image_url", "image_url": {"url": uri}},
        {"type": "text", "text": "What is in this image?"},
    ],
}
print(uri[:30] + "…", len(uri), "characters")
print("round trip identical:", load_image(uri).convert("RGB").tobytes() == small.tobytes())

# %% [markdown]
# ## Summary
#
# - An image costs `rows × cols` tokens plus one per row, with one token per 28×28 px for Small 3.x:
#   a 1540 × 2053 px page is ≈ 2.4k tokens (the table in 2.2); resize to a budget, but keep text legible.
# - Images go first in the user turn, as paths, PIL images, URLs or data URIs.
# - Reliable JSON comes from a strict system prompt, named keys, low temperature, few-shot examples —
#   and validation of every reply. On the stand-in all of it fails, honestly; lesson 04 fixes that by
#   fine-tuning on `data/receipts` (600 train / 100 val / 100 test, datasheet in `data/README.md`).
#
# ## Exercises
#
# 🐢 How many tokens does a 1024×768 (landscape) screenshot cost on Mistral Small 3.2?

# %%
from course_utils.exercises import check

screenshot_tokens = None  # TODO: 1024/28 and 768/28, rounded up, plus one token per row
# SOLUTION: screenshot_tokens = image_token_cost(1024, 768)
check("02-screenshot-tokens", screenshot_tokens)

# %% [markdown]
# 🐕 You must send 200 receipt photos of 1200×1600 px in **one** 128k-token request (keep 2,048 tokens
# for text). What is the largest per-image token budget that works? Use it with `resize_for_budget` and
# check the result fits.

# %%
per_image_budget = None  # TODO: what is left of the context for images, shared by 200 of them
# SOLUTION: per_image_budget = (131072 - 2048) // 200
check("02-per-image-budget", per_image_budget)

# %% [markdown]
# 🦁 This reply is rejected by the schema. Fix it (by hand: copy `broken_reply` into `fixed_reply` and
# edit the string) so `extract_json(..., RECEIPT_SCHEMA)` accepts it; the check also makes sure it is
# still the same receipt. Then look at the date: the schema accepted `2024-13-01`. Which check would
# catch it?

# %%
broken_reply = (
    '{"merchant": "Bistro", "date": "2024-13-01", "currency": "eur", '
    '"items": [{"name": "Soup", "qty": 1, "unit_price": 6.5}], "subtotal": 6.5, "tax": 1.24, "total": 7.74}'
)
try:
    extract_json(broken_reply, RECEIPT_SCHEMA)
except JSONExtractionError as error:
    print("rejected:", error)
fixed_reply = None  # TODO: the edited string
# SOLUTION: fixed_reply = broken_reply.replace('"currency": "eur"', '"currency": "EUR"')
check("02-fixed-reply", fixed_reply, broken_reply=broken_reply)
