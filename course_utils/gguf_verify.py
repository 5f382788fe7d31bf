"""Is the GGUF the model you trained? llama.cpp against transformers: next-token logits, the chat
template's token ids, and replies — in process or from a llama.cpp server process, as lesson 07 serves.

Backs lesson 06.
"""

from __future__ import annotations

import os
from pathlib import Path

from course_utils.llama_server import vision_handler_class

# Logit parity tolerances per file type, relative to the spread (std) of the reference logits, and the
# share of positions whose top-1 token must agree. Measured on the stand-in (lesson 06) with margin.
TOLERANCES = {
    "F16": {"rel_mean_abs": 0.005, "top1": 0.98},
    "BF16": {"rel_mean_abs": 0.02, "top1": 0.95},
    "Q8_0": {"rel_mean_abs": 0.03, "top1": 0.95},
    "Q5_K_M": {"rel_mean_abs": 0.15, "top1": 0.85},
    "Q4_K_M": {"rel_mean_abs": 0.25, "top1": 0.75},
}


def open_gguf(
    model_path: str | os.PathLike,
    mmproj: str | os.PathLike | None = None,
    n_ctx: int = 4096,
    n_threads: int | None = None,
    logits_all: bool = False,
    seed: int = 0,
):
    """A ``llama_cpp.Llama`` for an exported model; with ``mmproj``, images work in chat completions.

    Threads: one fewer than the CPU cores (at least 1) — on a 2-core machine llama.cpp's OpenMP
    threads otherwise fight the rest of the process and run several times slower.
    """
    from llama_cpp import Llama

    threads = n_threads or max(1, (os.cpu_count() or 2) - 1)
    handler = None
    if mmproj is not None:
        handler = vision_chat_handler(model_path, mmproj)
    return Llama(
        str(model_path),
        n_ctx=n_ctx,
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=logits_all,
        chat_handler=handler,
        verbose=False,
        seed=seed,
    )


def vision_chat_handler(model_path: str | os.PathLike, mmproj: str | os.PathLike):
    """llama-cpp-python's multimodal (mtmd) handler, driven by the GGUF's own chat template."""
    return vision_handler_class(model_path)(clip_model_path=str(mmproj), verbose=False)


# --- Verification --------------------------------------------------------------------------------


def logit_parity(llm, model, processor, conversations: list[list[dict]]) -> dict:
    """Next-token logits of llama.cpp (``llm`` opened with ``logits_all=True``) vs transformers, on the
    same token ids, over every position of every conversation."""
    import numpy as np
    import torch

    diffs, agree, spread, positions = [], 0, [], 0
    for conversation in conversations:
        ids = processor.apply_chat_template(
            conversation, tokenize=True, return_dict=True, return_tensors="pt"
        )["input_ids"]
        with torch.no_grad():
            reference = model(input_ids=ids.to(model.device)).logits[0].float().cpu().numpy()
        llm.reset()
        llm.eval(ids[0].tolist())
        got = np.asarray(llm.scores[: ids.shape[1]], dtype=np.float32)
        diffs.append(np.abs(got - reference).ravel())
        spread.append(reference.std())
        agree += int((got.argmax(-1) == reference.argmax(-1)).sum())
        positions += ids.shape[1]
    diff = np.concatenate(diffs)
    return {
        "positions": positions,
        "max_abs": float(diff.max()),
        "mean_abs": float(diff.mean()),
        "rel_mean_abs": float(diff.mean() / np.mean(spread)),
        "top1": agree / positions,
    }


def gguf_replies(
    llm, records: list[dict], max_new_tokens: int = 200, progress: bool = True, details: list | None = None
) -> list[str]:
    """Greedy chat completions from llama.cpp for each record's prompt (its messages minus the reply),
    images sent as data URIs — the same requests a server would get. With ``details`` (a list), each
    reply's ``finish_reason``, ``prompt_tokens`` and ``completion_tokens`` are appended to it."""
    from tqdm.auto import tqdm

    from course_utils.chat import openai_messages
    from course_utils.evaluate import prompts_of

    replies = []
    for prompt in tqdm(prompts_of(records), desc="llama.cpp", disable=not progress):
        out = llm.create_chat_completion(
            messages=openai_messages(prompt), max_tokens=max_new_tokens, temperature=0.0
        )
        replies.append(out["choices"][0]["message"]["content"] or "")
        if details is not None:
            details.append(
                {
                    "finish_reason": out["choices"][0]["finish_reason"],
                    "prompt_tokens": out["usage"]["prompt_tokens"],
                    "completion_tokens": out["usage"]["completion_tokens"],
                }
            )
    return replies


def served_replies(
    model_path: str | os.PathLike,
    records: list[dict],
    mmproj: str | os.PathLike | None = None,
    max_new_tokens: int = 200,
    n_ctx: int = 2048,
    progress: bool = True,
    details: list | None = None,
    n_gpu_layers: int = 0,
) -> list[str]:
    """Like :func:`gguf_replies`, but the GGUF is served by its own llama.cpp server process
    (``serve.llama_server``: 127.0.0.1, the model's template, images through ``mmproj``) and asked over
    the OpenAI-compatible API — the way lesson 07 serves it. One process per model: nothing of one
    model's C state (its projector context above all) outlives it or meets the next model's. Decoding is
    plain greedy (``repeat_penalty`` 1.0, not the server's default 1.1), so replies equal
    :func:`gguf_replies` on the same file."""
    from tqdm.auto import tqdm

    from course_utils import serve
    from course_utils.chat import openai_messages
    from course_utils.evaluate import prompts_of

    replies = []
    with serve.llama_server(
        model_path, mmproj=mmproj, alias="eval", n_ctx=n_ctx, n_gpu_layers=n_gpu_layers
    ) as server:
        api = serve.client(server.url + "/v1", timeout=600)
        for prompt in tqdm(
            prompts_of(records), desc=f"llama.cpp server {Path(model_path).name}", disable=not progress
        ):
            # llama_cpp.server (like Ollama) applies repeat_penalty 1.1 unless told otherwise:
            # plain greedy here, as in lesson 05 and in gguf_replies
            out = api.chat.completions.create(
                model="eval",
                messages=openai_messages(prompt),
                max_tokens=max_new_tokens,
                temperature=0.0,
                extra_body={"repeat_penalty": 1.0},
            )
            replies.append(out.choices[0].message.content or "")
            if details is not None:
                details.append(
                    {
                        "finish_reason": out.choices[0].finish_reason,
                        "prompt_tokens": out.usage.prompt_tokens,
                        "completion_tokens": out.usage.completion_tokens,
                    }
                )
    return replies


def within_tolerance(parity: dict, qtype: str) -> bool:
    limits = TOLERANCES[qtype.upper()]
    return parity["rel_mean_abs"] <= limits["rel_mean_abs"] and parity["top1"] >= limits["top1"]


def llama_cpp_prompt_ids(llm, conversation: list[dict]) -> list[int]:
    """Token ids llama-cpp-python feeds the model for a chat completion with the GGUF's embedded
    template (its own ``Jinja2ChatFormatter``, special-token texts and BOS rule — as ``Llama`` and
    ``python -m llama_cpp.server`` do)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    formatter = Jinja2ChatFormatter(
        llm.metadata["tokenizer.chat_template"],
        eos_token=llm._model.token_get_text(llm.token_eos()),
        bos_token=llm._model.token_get_text(llm.token_bos()),
    )
    result = formatter(messages=conversation)
    return llm.tokenize(result.prompt.encode("utf-8"), add_bos=not result.added_special, special=True)


def template_parity(llm, processor, conversations: list[list[dict]]) -> list[dict]:
    """Conversations whose llama.cpp token ids differ from transformers' (empty = parity)."""
    mismatches = []
    for i, conversation in enumerate(conversations):
        expected = processor.apply_chat_template(
            as_parts(conversation), tokenize=True, return_dict=True, return_tensors="pt"
        )["input_ids"][0].tolist()
        got = llama_cpp_prompt_ids(llm, conversation)
        if got != expected:
            first = next(
                (j for j, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected))
            )
            mismatches.append(
                {
                    "conversation": i,
                    "first_difference": first,
                    "llama_cpp": got[first : first + 5],
                    "transformers": expected[first : first + 5],
                }
            )
    return mismatches


def as_parts(conversation: list[dict]) -> list[dict]:
    """Plain-string contents as text parts (the processor's template takes both; be explicit)."""
    return [
        dict(m, content=[{"type": "text", "text": m["content"]}]) if isinstance(m["content"], str) else m
        for m in conversation
    ]
