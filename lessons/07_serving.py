# %% [markdown]
# # 07 · Serving: an OpenAI-compatible API, a gateway, a load test and a demo
#
# Self-hosting is the other half of the promise. You put lesson 06's GGUF behind an OpenAI-compatible
# server on 127.0.0.1, call it with the `openai` package (chat, streaming, images), put a LiteLLM gateway in
# front of it (keys, rate limits, one name for several back ends), measure it under load (latency, time to
# first token, tokens/s, errors), and give it a gradio demo. Then: what vLLM needs for the real models,
# and what changes when one machine is not enough.
#
# ## Learning objectives
# - Start, health-check and stop a local OpenAI-compatible server safely (127.0.0.1, by process id).
# - Call it with the openai client: chat, streaming, images as data URIs; and Ollama's native API.
# - Put a LiteLLM proxy in front (master key, rate limits) and know its config.
# - Run a bounded load test and read p50/p95 latency, time to first token and tokens/s.
# - Build the vLLM command for official weights, a merged fine-tune or an adapter — and size the GPUs.

# %% [markdown]
# ## 7.1 The model behind an OpenAI-compatible API
#
# `serve.llama_server` runs llama-cpp-python's server (`python -m llama_cpp.server`, the same API as
# OpenAI's `/v1/chat/completions`) on lesson 06's Q4_K_M file with the vision projector. Three defaults
# matter: it binds **127.0.0.1** (reachable only from this machine — use an SSH tunnel or a reverse proxy
# with TLS to share it), it **queues** concurrent requests instead of cutting off the one streaming, and it
# is stopped **by its process id** when the `with` block ends, even after an error.
#
# One server default to know: `repeat_penalty` is 1.1 (Ollama's too), while lesson 05 and lesson 06's
# task check decode without it. For the same replies as the evaluation, send `repeat_penalty: 1.0` — with
# the OpenAI client, `extra_body={"repeat_penalty": 1.0}`; the Modelfile from lesson 06 sets it for Ollama.
#
# If lesson 06 has not run, the files are exported now (≈ 1 minute on `cpu-tiny`).

# %% tags=["show-output"]
# NBVAL_IGNORE_OUTPUT
from course_utils import export, gguf_export, serve
from course_utils.paths import outputs_dir
from course_utils.receipts import lesson_splits
from course_utils.train import ensure_adapter

export_dir = outputs_dir(profile.outputs_name, "export")
model_file, mmproj_file = export_dir / "receipts-Q4_K_M.gguf", export_dir / "receipts-mmproj-f16.gguf"
if not (model_file.exists() and mmproj_file.exists()):
    from course_utils.models import load

    train_rows, val_rows, _, _ = lesson_splits(profile.name)
    adapter_dir, _ = ensure_adapter(
        profile.name,
        outputs_dir(profile.outputs_name, "adapters") / "receipts-lora",
        train_rows,
        val_rows[:24],
        hardware=hardware,
        model=MODEL,
    )
    base = load(PROFILE, model=MODEL, hardware=hardware, load_in_4bit=False)
    merged = export.merge_adapter(
        base.model, base.processor, adapter_dir, export_dir / "merged", overwrite=True
    )
    f16 = gguf_export.convert_to_gguf(merged, export_dir / "receipts-f16.gguf", "f16", overwrite=True)
    gguf_export.convert_to_gguf(merged, mmproj_file, "f16", mmproj=True, overwrite=True)
    gguf_export.quantize(f16, model_file, "Q4_K_M", overwrite=True)
    print("lesson 06's files were missing: exported them now")
server = serve.llama_server(model_file, mmproj=mmproj_file, alias="receipts", n_ctx=4096).start()
print("serving", model_file.name, "at", server.url, "— pid", server.pid)

# %% [markdown]
# ## 7.2 Clients: chat, streaming, images
#
# Any OpenAI client works — the `openai` package here; LangChain, LlamaIndex, or `curl` the same way. Images
# go as **data URIs** in `image_url` parts (the same request works against vLLM and Ollama's `/v1`).

# %%
from course_utils.data import resolve_image_path
from course_utils.evaluate import prompts_of

_, _, test_rows, _ = lesson_splits(profile.name)
image_row = next(r for r in test_rows if r.get("images"))
BASE_URL = server.url + "/v1"  # llama.cpp here; vLLM, Ollama (…:11434/v1) or LM Studio the same way
IMAGE_PATH = str(resolve_image_path(image_row["images"][0], None))

# %% tags=["copyable", "copy:openai-client", "show-output"]
# NBVAL_IGNORE_OUTPUT
# Chat with any OpenAI-compatible server: an image (as a data URI) and a streamed reply. Needs BASE_URL
# and IMAGE_PATH; if the server wants a key, it comes from the environment, never from the code.
# model="receipts" is the name this lesson's server serves: use yours (vLLM: --served-model-name).
import base64
import os

from openai import OpenAI

client = OpenAI(base_url=BASE_URL, api_key=os.environ.get("SERVER_API_KEY", "not-needed"))
print("models:", [m.id for m in client.models.list().data])
with open(IMAGE_PATH, "rb") as image_file:
    image_url = "data:image/png;base64," + base64.b64encode(image_file.read()).decode()
response = client.chat.completions.create(
    model="receipts",
    messages=[
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": image_url}},
                {"type": "text", "text": "Extract this receipt as JSON."},
            ],
        }
    ],
    max_tokens=120,
    temperature=0.0,
    extra_body={"repeat_penalty": 1.0},  # llama-cpp-python's server defaults to 1.1 (Ollama: the Modelfile)
)
print("image →", response.choices[0].message.content, f"({response.usage.prompt_tokens} prompt tokens)")
stream = client.chat.completions.create(
    model="receipts",
    messages=[{"role": "user", "content": "Extract: Café Nord, 2 tea 1.50 EUR"}],
    max_tokens=40,
    temperature=0.0,
    stream=True,
    extra_body={"repeat_penalty": 1.0},
)
print("stream →", end=" ")
for chunk in stream:
    if chunk.choices:
        print(chunk.choices[0].delta.content or "", end="", flush=True)
print()

# %% [markdown]
# The same request as `curl` — what a learner's other tools (LM Studio's server, text-generation-webui's
# OpenAI extension, no-code tools such as MindStudio or Flowise) send when you give them
# `http://127.0.0.1:<port>/v1` as the base URL and `receipts` as the model name:

# %%
# NBVAL_CHECK_OUTPUT
import json

body = {
    "model": "receipts",
    "temperature": 0.15,
    "max_tokens": 200,
    "messages": [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,<…>"}},
                {"type": "text", "text": "Extract this receipt as JSON."},
            ],
        }
    ],
}
print(
    "curl http://127.0.0.1:PORT/v1/chat/completions -H 'Content-Type: application/json' -d '"
    + json.dumps(body)
    + "'"
)

# %% [markdown]
# **Ollama** (lesson 06's Modelfile) has the same `/v1` API on port 11434, plus its native `/api/chat`,
# which takes images as base64 strings on the message. Guarded: it runs only where an Ollama server is up.
# Lesson 06's Modelfile is text-only (its projector stays out: ollama#17491), so the live request sends a
# text receipt; the image request's body is shown either way.

# %%
# NBVAL_IGNORE_OUTPUT
text_row = next(r for r in test_rows if not r.get("images"))
if serve.ollama_running():
    print(serve.ollama_chat("receipts-extractor", prompts_of([text_row])[0]))
else:
    payload = serve.ollama_chat_payload("receipts-extractor", prompts_of([image_row])[0])
    print(
        "no Ollama server here; /api/chat would get:",
        {
            **payload,
            "messages": [
                {**m, "images": [i[:24] + "…" for i in m["images"]]} if "images" in m else m
                for m in payload["messages"]
            ],
        },
    )

# %% [markdown]
# ## 7.3 A gateway: LiteLLM
#
# A gateway gives every client one URL and one key, whichever back end answers: your llama.cpp server
# today, vLLM tomorrow, Ollama on a laptop, a hosted API as fallback. It enforces per-model rate limits
# and logs requests. Keys are written as `os.environ/NAME` references — the config file holds no secret.

# %%
# NBVAL_CHECK_OUTPUT
import yaml

gateway_config = serve.litellm_config(
    [
        {
            "name": "receipts",
            "kind": "openai",
            "api_base": "http://127.0.0.1:PORT/v1",
            "model": "receipts",
            "rpm": 120,
        },
        {
            "name": "receipts-ollama",
            "kind": "ollama",
            "api_base": "http://127.0.0.1:11434",
            "model": "receipts-extractor",
        },
    ]
)
print(yaml.safe_dump(gateway_config, sort_keys=False))

# %%
# NBVAL_IGNORE_OUTPUT
import secrets

from course_utils.paths import atomic_write

live_config = serve.litellm_config(
    [{"name": "receipts", "kind": "openai", "api_base": server.url + "/v1", "model": "receipts", "rpm": 600}]
)
config_path = atomic_write(
    outputs_dir(profile.outputs_name, "serving") / "litellm.yaml", yaml.safe_dump(live_config), overwrite=True
)
master_key = "sk-" + secrets.token_urlsafe(16)  # in production: read it from the environment, never print it
proxy = serve.litellm_proxy(config_path, master_key).start(timeout=240)
gateway = serve.client(proxy.url + "/v1", master_key)
print("LiteLLM proxy at", proxy.url, "— pid", proxy.pid)
print(
    "through the gateway →",
    serve.chat(
        gateway,
        "receipts",
        [{"role": "user", "content": "Extract: Tea 1.50 EUR"}],
        max_tokens=40,
        temperature=0.0,
    ),
)

# %% [markdown]
# ## 7.4 Load test: the numbers to watch
#
# Bounded by construction: 8 concurrent clients send 64 streamed requests through the gateway, then it
# stops. Watch **time to first token** (what users feel), **p95 latency** (the slow tail), **tokens/s**
# (capacity) and the **error rate**. One llama.cpp process answers one request at a time, so latency grows
# with concurrency while tokens/s stays flat — the reason to batch (vLLM) or add replicas.

# %% tags=["show-output"]
# NBVAL_IGNORE_OUTPUT
from course_utils.profiles import format_table

load_prompts = prompts_of([r for r in test_rows if not r.get("images")][:16])
result = serve.load_test(
    proxy.url + "/v1", "receipts", load_prompts, concurrency=8, requests=64, max_tokens=48, api_key=master_key
)
summary = result.summary()
print(format_table([summary]))
assert summary["errors"] == 0, result.errors[:3]
figure = result.plot()

# %% [markdown]
# ## 7.5 A demo people can click
#
# `demo.build_demo` is a gradio chat with image upload, an endpoint box and a temperature slider; replies
# stream. It binds 127.0.0.1 with `share=False` (a public `*.gradio.live` link only if you pass
# `share=True` — think before you do); set `DEMO_USER` and `DEMO_PASSWORD` in the environment to require a
# login. The endpoint box is editable, so the gateway key you pass goes to your own endpoint only: a URL a
# visitor types is called without it. Below it is driven through `gradio_client`, as a script or a test would.
#
# A chat box is also where people type `[/INST]` to close their turn and write the assistant's (prompt
# injection). mistral-common encodes typed control tokens as text; so do the course's training
# tokenization (lesson 03) and its tool server (lesson 08). This lesson's server does not: for images it
# relies on llama-cpp-python's multimodal handler, which tokenizes the whole rendered prompt with control
# tokens parsed. Before people outside your team use a demo, serve with vLLM's `--tokenizer-mode mistral`
# (mistral-common renders the prompt, 7.6) or put the course's text-as-text encoding in front
# (`course_utils.chat.text_segments`).

# %% tags=["copyable", "copy:gradio"]
# NBVAL_IGNORE_OUTPUT
# A minimal chat app in front of an OpenAI-compatible server, replies streamed. Needs BASE_URL (and your
# server's model name in place of "receipts"). It binds 127.0.0.1 only (share=False: no public link); it
# opens only when LAUNCH_DEMO=1 is set.
import os

import gradio as gr
from openai import OpenAI

client = OpenAI(base_url=BASE_URL, api_key=os.environ.get("SERVER_API_KEY", "not-needed"))


def text_of(content):  # gradio 6 passes each turn's content as a list of parts: keep the text ones
    if isinstance(content, str):
        return content
    return "\n\n".join(part.get("text", "") for part in content if part.get("type", "text") == "text")


def respond(message, history):
    messages = [{"role": turn["role"], "content": text_of(turn["content"])} for turn in history]
    messages.append({"role": "user", "content": message})
    reply = ""
    for chunk in client.chat.completions.create(
        model="receipts", messages=messages, temperature=0.15, max_tokens=256, stream=True
    ):
        if chunk.choices:
            reply += chunk.choices[0].delta.content or ""
            yield reply


chat_app = gr.ChatInterface(respond, title="Receipts extractor")
if os.environ.get("LAUNCH_DEMO") == "1":
    chat_app.launch(server_name="127.0.0.1", share=False)
print("one turn through the app:", repr(list(respond("Extract: Café Nord, 2 tea 1.50 EUR", []))[-1][:80]))

# %% [markdown]
# The course's fuller demo adds image upload, an endpoint box and a temperature slider, and goes through
# the gateway. Here it is launched on a free local port and driven through `gradio_client`, as a script or
# a test would:

# %% tags=["show-output"]
# NBVAL_IGNORE_OUTPUT
import shutil

from gradio_client import Client, handle_file
from IPython.display import Image, display

from course_utils import demo

app = demo.build_demo(proxy.url + "/v1", api_key=master_key)
demo_url = demo.launch(app, port=serve.free_port())
print("demo at", demo_url)
reply = Client(demo_url, verbose=False).predict(
    {"text": "Extract this receipt as JSON", "files": [handle_file(image_row["images"][0])]},
    proxy.url + "/v1",
    0.0,
    api_name="/chat",
)
print("demo →", reply[:200])
if shutil.which("chromium"):  # a picture of the app for this page (Debian's headless Chromium)
    png, _ = demo.screenshot(demo_url, str(outputs_dir(profile.outputs_name, "serving") / "demo.png"))
    display(Image(png, width=720))
else:
    print("open", demo_url, "in a browser to see the app (no chromium here for a screenshot)")

# %% [markdown]
# ## 7.6 vLLM for the real models
#
# On a GPU, vLLM serves many requests at once (continuous batching, paged KV cache). The command differs by
# what you serve: **official weights** in Mistral's format (`--tokenizer-mode mistral --config-format
# mistral --load-format mistral`, as Mistral's model cards say), a **merged fine-tune** saved by
# transformers (HF format), or the official base with your **adapter** hot-loaded (`--enable-lora
# --lora-modules`, with `--max-lora-rank` read from the adapter). Small 4 also gets
# `--reasoning-parser mistral`, so its `[THINK]` part comes back as `reasoning_content`, not inside the
# answer. Send one request before you rely on a vLLM release: 0.18.0 answered every Small 4 chat request
# with `Kwargs ['reasoning_effort'] are not supported` (vllm-project/vllm#38560; fixes proposed in #38448
# and #41251). `vllm_memory` sizes the
# GPUs from the config and the served precision: Small 4's official checkpoint is FP8 (one byte per
# weight); in bf16 its 119B parameters need tensor parallelism (`--tensor-parallel-size`) across several
# cards.

# %% tags=["copyable", "copy:vllm"]
# NBVAL_CHECK_OUTPUT
# Serve the official Mistral Small 3.2 weights with vLLM on one 80 GB GPU (run the printed command there).
# Mistral's own format for weights and tokenizer; tool calls parsed; localhost only.
import shlex

vllm_command = [
    "vllm", "serve", "mistralai/Mistral-Small-3.2-24B-Instruct-2506",
    "--tokenizer-mode", "mistral", "--config-format", "mistral", "--load-format", "mistral",
    "--served-model-name", "mistral-small-3.2",
    "--max-model-len", "32768",
    "--tensor-parallel-size", "1",
    "--host", "127.0.0.1", "--port", "8000",
    "--limit-mm-per-prompt", '{"image": 4}',
    "--tool-call-parser", "mistral", "--enable-auto-tool-choice",
]  # fmt: skip
print(shlex.join(vllm_command))

# %% [markdown]
# `serve.vllm_command` builds that list (and the others) from the model registry, `vllm_memory` checks
# they fit:

# %%
# NBVAL_CHECK_OUTPUT
import shlex

for key, weights, tp, extra in (
    ("mistral-small-3.2", "mistral", 1, {}),
    ("mistral-small-3.2", "hf", 1, {"model_path": "outputs/gpu-24gb/export/merged"}),
    # the adapter a gpu-24gb run trains (rank 16: its preset; the folder exists after that run)
    (
        "mistral-small-3.2",
        "adapter",
        1,
        {"adapter_path": "outputs/gpu-24gb/adapters/receipts-lora", "lora_rank": 16},
    ),
    ("mistral-small-4", "mistral", 4, {}),
):
    print(f"# {key}, {weights} weights, {tp} GPU(s):", serve.vllm_memory(key, 32768, tp))
    print(shlex.join(serve.vllm_command(key, weights, tensor_parallel=tp, **extra)), end="\n\n")

# %% [markdown]
# The gateway config above takes a vLLM back end the same way: `{"kind": "openai", "api_base":
# "http://127.0.0.1:8000/v1", "model": "<served-model-name>"}`.
#
# **Small 4's reasoning, served apart.** llama-cpp-python's server has no reasoning parser: a Small 4 reply
# would arrive with its `[THINK]…[/THINK]` trace inside `content` (or, with control tokens skipped, as
# run-on text). `serve.llama_reasoning_server` starts it with the course's `mistral-reasoning` chat
# format: the prompt is the model's own template rendered with `reasoning_effort` (set for the server, as
# llama.cpp's own `llama-server --chat-template-kwargs` does) and tokenized as mistral-common encodes it,
# and the reply comes back split the way vLLM's `--reasoning-parser mistral` returns it — the trace in
# `reasoning_content`, the answer in `content`. The client reads both with plain `openai` code. (The
# stand-in was not trained on traces, so its `reasoning_content` is usually empty; the tests check the
# split on scripted replies and the served prompt against mistral-common.)

# %% tags=["show-output"]
# NBVAL_IGNORE_OUTPUT
if MODEL == "mistral-small-4":
    question = [{"role": "user", "content": "Tea 1.50 EUR, cake 2.50 EUR. What is the total?"}]
    with serve.llama_reasoning_server(model_file, reasoning_effort="high", n_ctx=2048) as thinker:
        reply = serve.client(thinker.url + "/v1").chat.completions.create(
            model="reasoning", messages=question, max_tokens=48, temperature=0.0
        )
    message = reply.choices[0].message
    print("reasoning_content:", repr(message.model_extra.get("reasoning_content")))
    print("content:          ", repr((message.content or "")[:100]))
    print("prompt tokens:    ", reply.usage.prompt_tokens, "(with [MODEL_SETTINGS] reasoning_effort high)")
else:
    print(f"{MODEL} has no reasoning switch; with MODEL = 'mistral-small-4' this cell serves it apart.")

# %% [markdown]
# ## 7.7 When one machine is not enough
#
# - **Serving**: tensor parallelism splits every layer across GPUs of one node (fast interconnect needed);
#   pipeline parallelism (`--pipeline-parallel-size`) splits layers across nodes; replicas behind the
#   gateway add throughput. Small 4 in bf16 needs several 80 GB cards with tensor parallelism (the 🐕
#   exercise below sizes it); its FP8 weights take half the memory.
# - **Training**: lesson 04's Axolotl and `accelerate` FSDP configs shard the model across GPUs for Small 4
#   QLoRA; Small 3.2 QLoRA fits one 24 GB card.
# - **Monitoring**: `python -m llama_cpp.server` and vLLM expose request counts; vLLM also serves Prometheus
#   metrics on `/metrics` (queue length, KV-cache usage, time to first token) — alert on p95 latency and
#   error rate, the two numbers the load test printed.

# %% [markdown]
# ## Summary
#
# - `serve.llama_server` puts the GGUF behind an OpenAI-compatible API on 127.0.0.1; `with` stops it by pid.
# - The `openai` client does chat, streaming and images (data URIs); Ollama's native API takes base64 images.
# - LiteLLM gives one URL, one key and rate limits over several back ends; its config references keys.
# - Load tests are bounded and report p50/p95 latency, time to first token, tokens/s and errors.
# - The gradio demo is local and private by default; `gradio_client` drives it from code.
# - vLLM commands differ for official (Mistral format), merged (HF format) and adapter serving;
#   size the GPUs first.
#
# ## Exercises
#
# 🐢 How many tokens per second did the server stream in your load test (7.4)? Compute it from
# `result.tokens` (tokens per request) and `result.wall_seconds` (one decimal), then compare with the
# table's `tokens_per_s`.

# %%
from course_utils.exercises import check

tokens_per_s = None  # TODO: from result.tokens and result.wall_seconds, one decimal
# SOLUTION: tokens_per_s = round(sum(result.tokens) / result.wall_seconds, 1)
check("07-tokens-per-s", tokens_per_s, result=result)

# %% [markdown]
# 🐕 How many 80 GB GPUs does `vllm_memory` say Mistral Small 4 needs in bf16 (`bytes_per_weight=2`) at
# 32k context (the smallest tensor-parallel size from 1, 2, 4, 8 whose per-GPU figure fits)?

# %%
small4_gpus = None  # TODO: loop over (1, 2, 4, 8) with serve.vllm_memory("mistral-small-4", 32768, tp, ...)
# SOLUTION: small4_gpus = next(
# SOLUTION:     tp
# SOLUTION:     for tp in (1, 2, 4, 8)
# SOLUTION:     if serve.vllm_memory("mistral-small-4", 32768, tp, bytes_per_weight=2)["fits"] == "80 GB"
# SOLUTION: )
check("07-small4-gpus", small4_gpus)

# %% [markdown]
# 🦁 Run the load test again through the gateway with **one** client (`concurrency=1`) and 16 requests,
# the rest as in 7.4. The check compares your run with the 8-client one: p50 latency goes down. Why —
# and what happens to tokens/s? What does that say about adding clients to one llama.cpp process?

# %%
single_client = None  # TODO: the result of serve.load_test(...) with concurrency=1, requests=16
# SOLUTION: single_client = serve.load_test(
# SOLUTION:     proxy.url + "/v1",
# SOLUTION:     "receipts",
# SOLUTION:     load_prompts,
# SOLUTION:     concurrency=1,
# SOLUTION:     requests=16,
# SOLUTION:     max_tokens=48,
# SOLUTION:     api_key=master_key,
# SOLUTION: )
# SOLUTION: print(format_table([result.summary(), single_client.summary()]))
check("07-single-client", single_client, baseline=result)

# %% [markdown]
# ## Clean up
# Shut everything down — by process id, as every server here is (the exercises above needed them):

# %%
# NBVAL_IGNORE_OUTPUT
app.close()
for running in (proxy, server):
    running.stop()
    print(running.name, "pid", running.pid, "stopped:", running.process.poll() is not None)
