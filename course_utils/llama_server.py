"""``python -m llama_cpp.server`` with the course's vision chat format (used by :mod:`course_utils.serve`),
and that format's pieces (used in process by :mod:`course_utils.gguf_verify`); and a tool-calling chat
format for Mistral's ``[TOOL_CALLS]`` replies (``--chat_format mistral-tools``), and one for Small 4's
reasoning that returns the ``[THINK]`` trace apart as ``reasoning_content`` (``--chat_format
mistral-reasoning [--reasoning_effort none|high]``), as vLLM's ``--reasoning-parser mistral`` does.

Backs lessons 06, 07 and 08.

Usage: the same options as ``python -m llama_cpp.server``. With ``--clip_model_path`` (the exported
projector), image requests are formatted with the model's own embedded chat template instead of
LLaVA-1.5's: llama-cpp-python's server picks its multimodal handler by ``--chat_format``, so this
wrapper installs the course's handler under the ``llava-1-5`` name before the server starts.
"""

from __future__ import annotations

import json
import os
import re
import sys

from course_utils.export import ExportError


def main(argv: list[str]) -> None:
    import llama_cpp.llama_chat_format as chat_format

    _serve_bad_requests()
    if TOOL_CHAT_FORMAT in argv:
        chat_format.register_chat_completion_handler(TOOL_CHAT_FORMAT)(tool_chat_handler)
    if REASONING_CHAT_FORMAT in argv:
        effort = None
        if "--reasoning_effort" in argv:  # the course's own option, not llama_cpp.server's
            at = argv.index("--reasoning_effort")
            effort, argv = argv[at + 1], argv[:at] + argv[at + 2 :]
        handler = reasoning_chat_handler(embedded_template(argv[argv.index("--model") + 1]), effort)
        chat_format.register_chat_completion_handler(REASONING_CHAT_FORMAT)(handler)
        _serve_reasoning_content()
    if "--clip_model_path" in argv:
        model = argv[argv.index("--model") + 1]
        chat_format.Llava15ChatHandler = vision_handler_class(model)
        if "--chat_format" not in argv:
            argv = [*argv, "--chat_format", "llava-1-5"]
    sys.argv = ["llama_cpp.server", *argv]
    from llama_cpp.server.__main__ import main as server_main

    server_main()


# --- Serving template: the training template, with images as media markers -------------------------


def serving_template(chat_template: str, bos_text: str = "<s>", eos_text: str = "</s>") -> str:
    """The training template for llama.cpp's multimodal handler: generation markers removed (plain
    Jinja has no ``{% generation %}``), image parts rendered as their URL — which llama-cpp-python
    swaps for its media marker and then for the image embeddings — and BOS/EOS written as their token
    texts (that handler passes ``detokenize(bos)``, which is empty for control tokens, so the prompt
    would silently lose its ``<s>``)."""
    out = re.sub(r"\{%-?\s*(end)?generation\s*-?%\}", "", chat_template)
    out = out.replace("bos_token", repr(bos_text)).replace("eos_token", repr(eos_text))
    image = "{{- '[IMG]' -}}"
    if image not in out:
        raise ExportError("the chat template has no image placeholder to adapt")
    # the content part's name is the template's own: `chunk` in the course's v7 template, `block` in
    # the v15 one mistral-common generates (Small 4)
    loops = re.findall(r"\{%-?\s*for\s+(\w+)\s+in\s+content\s*-?%\}", out[: out.index(image)])
    part = loops[-1] if loops else "chunk"
    url = f"{{{{- {part}['image_url']['url'] if {part}['image_url'] is mapping else {part}['image_url'] -}}}}"
    return out.replace(image, url)


def vision_handler_class(model_path: str | os.PathLike):
    """A ``Llava15ChatHandler`` subclass whose prompt format is the GGUF's embedded (training) template."""
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Llava15ChatHandler

    vocab = Llama(str(model_path), vocab_only=True, verbose=False)
    try:
        template = vocab.metadata.get("tokenizer.chat_template")
        bos, eos = (
            vocab._model.token_get_text(vocab.token_bos()),
            vocab._model.token_get_text(vocab.token_eos()),
        )
    finally:
        vocab.close()
    if not template:
        raise ExportError(f"{model_path} carries no tokenizer.chat_template")

    class MistralVisionChatHandler(Llava15ChatHandler):
        DEFAULT_SYSTEM_MESSAGE = None  # the template decides; no LLaVA default prompt
        CHAT_FORMAT = serving_template(template, bos, eos)

    return MistralVisionChatHandler


# --- Tool calling: Mistral's [TOOL_CALLS] format behind OpenAI's `tools` / `tool_calls` ------------

TOOL_CHAT_FORMAT = "mistral-tools"


def tool_prompt_ids(llama, messages: list[dict], tools: list[dict] | None) -> list[int]:
    """The prompt's token ids: the course's tool template (the one the model was trained with) rendered
    and tokenized with the template's special tokens parsed and the messages' text as text — a user
    who types ``[/INST]`` cannot close their turn — equal to mistral-common's encoding (tests check)."""
    from course_utils.chat import normalize_like_mistral_common, text_segments
    from course_utils.tools import render_prompt

    messages = normalize_like_mistral_common(messages)  # arguments as mistral-common re-serializes them
    ids = [llama.token_bos()]
    for k, segment in enumerate(text_segments(lambda m: render_prompt(m, tools), messages)):
        text = segment.text.removeprefix("<s>") if k == 0 else segment.text  # BOS goes in as its id
        ids += llama.tokenize(text.encode("utf-8"), add_bos=False, special=not segment.is_message_text)
    return ids


def tool_chat_handler(
    llama,
    messages: list[dict],
    tools: list[dict] | None = None,
    stream: bool = False,
    seed: int | None = None,
    max_tokens: int | None = None,
    model: str | None = None,
    tool_choice: str | dict | None = None,
    **request,
) -> dict:
    """A llama-cpp-python chat handler: OpenAI ``tools`` in, OpenAI ``tool_calls`` out.

    The reply is generated with special tokens kept; what follows ``[TOOL_CALLS]`` is parsed into
    ``tool_calls`` (``finish_reason: "tool_calls"``), with the model's 9-character id or a fresh one.
    A reply whose calls do not parse comes back as plain ``content``, so a client sees what the model
    wrote. No streaming (a tool call is only useful whole).

    ``tool_choice`` as OpenAI and vLLM read it: ``"auto"`` (or absent) lets the model choose;
    ``"required"`` or ``{"type": "function", "function": {"name": ...}}`` starts the reply with
    ``[TOOL_CALLS]`` and constrains the rest with a grammar from the tools' schemas
    (:func:`course_utils.tools.tool_calls_grammar`) — a call that always parses when ``max_tokens``
    leaves room for it, not a right one; its ids are fresh ones (greedy decoding would repeat the model's).
    ``"none"`` forbids the ``[TOOL_CALLS]`` token and returns what the model wrote as content.
    """
    import random

    from course_utils.tools import CALL_ID_PATTERN, ParsedReply, new_call_id, parse_tool_calls

    if stream:
        raise BadRequest("the mistral-tools chat format does not stream; send stream=false")
    prompt = tool_prompt_ids(llama, messages, tools)
    (calls_token,) = llama.tokenize(b"[TOOL_CALLS]", add_bos=False, special=True)
    forced, constraint = _tool_choice_constraint(llama, tools, tool_choice, calls_token)
    budget = None if max_tokens is None else max(1, max_tokens - len(forced))  # the prefill counts
    text, generated, finish = _generate(
        llama, prompt + forced, seed, budget, **sampling(request), **constraint
    )
    if forced:
        text, generated = "[TOOL_CALLS]" + text, forced + generated
    parsed = parse_tool_calls(text) if tool_choice != "none" else ParsedReply(text.removesuffix("</s>"), [])
    message: dict = {"role": "assistant", "content": parsed.content or None}
    if parsed.calls:
        rng, used = random.Random(), set()

        def call_id(call: dict) -> str:  # the model's id unless forced (greedy ids repeat) or already used
            written = str(call.get("id", ""))
            keep = not forced and CALL_ID_PATTERN.fullmatch(written) and written not in used
            used.add(chosen := written if keep else new_call_id(rng))
            return chosen

        message["tool_calls"] = [
            {
                "id": call_id(call),
                "type": "function",
                "function": {
                    "name": call["name"],
                    "arguments": call["arguments"]
                    if isinstance(call.get("arguments"), str)
                    else json.dumps(call.get("arguments", {}), ensure_ascii=False),
                },
            }
            for call in parsed.calls
        ]
        finish = "tool_calls"
    elif "[TOOL_CALLS]" in text:
        message["content"] = text  # an unparseable call: show it as written
    return _completion(llama, model, message, finish, prompt, generated)


def _tool_choice_constraint(llama, tools: list[dict] | None, tool_choice, calls_token: int):
    """(tokens to prefill, extra ``generate`` arguments) for a request's ``tool_choice``."""
    import llama_cpp
    from llama_cpp import LlamaGrammar

    from course_utils.tools import tool_calls_grammar

    if tool_choice in (None, "auto"):
        return [], {}
    if tool_choice == "none":

        def ban_calls(input_ids, scores):
            scores[calls_token] = -float("inf")
            return scores

        return [], {"logits_processor": [ban_calls]}
    if tool_choice == "required":
        name = None
    elif isinstance(tool_choice, dict) and isinstance((tool_choice.get("function") or {}).get("name"), str):
        name = tool_choice["function"]["name"]
    else:
        raise BadRequest(
            f"tool_choice {tool_choice!r}: use 'auto', 'none', 'required' or "
            '{"type": "function", "function": {"name": ...}} with the name of one of the tools'
        )
    if not tools:
        raise BadRequest(f"tool_choice {tool_choice!r} needs tools in the request")
    try:
        text = tool_calls_grammar(tools, name)
    except ValueError as error:
        raise BadRequest(str(error)) from None
    # llama.cpp returns no sampler for a grammar it cannot parse, and generating with it then crashes the
    # process: try it here first
    sampler = llama_cpp.llama_sampler_init_grammar(llama._model.vocab, text.encode(), b"root")
    if not sampler:
        raise BadRequest(
            "llama.cpp cannot parse the grammar from the tools' schemas (a regex construct it lacks, such "
            "as a negated shorthand inside a class?)"
        )
    llama_cpp.llama_sampler_free(sampler)
    return [calls_token], {"grammar": LlamaGrammar.from_string(text, verbose=False)}


class BadRequest(ValueError):
    """A request a handler refuses. In process a ``ValueError``; through the server an OpenAI-shaped
    HTTP 400 (``invalid_request_error``, see :func:`_serve_bad_requests`) — any other error becomes a
    500 with a traceback in the log, which clients retry."""

    PREFIX = "invalid request: "

    def __init__(self, message: str):
        super().__init__(self.PREFIX + message)


def _serve_bad_requests() -> None:
    """Teach llama_cpp.server's error handler (it maps error messages to responses by regex) that a
    :class:`BadRequest` is the client's mistake: 400 with the message, like OpenAI's API."""
    from llama_cpp.server.errors import ErrorResponse, RouteErrorHandler

    def bad_request(body, match):
        return 400, ErrorResponse(message=match.group(1), type="invalid_request_error", param=None, code=None)

    RouteErrorHandler.pattern_and_formatters[
        re.compile("^" + re.escape(BadRequest.PREFIX) + "(.+)$", re.S)
    ] = bad_request


# The course handlers' sampling defaults (llama-cpp-python's own), by the request's OpenAI-style names.
SAMPLING_DEFAULTS = dict(
    temperature=0.2,
    top_p=0.95,
    top_k=40,
    min_p=0.05,
    typical_p=1.0,
    presence_penalty=0.0,
    frequency_penalty=0.0,
    repeat_penalty=1.1,
)


def sampling(request: dict) -> dict:
    """``Llama.generate``'s sampling arguments from a chat request's (a missing or null value takes
    :data:`SAMPLING_DEFAULTS`; ``temperature`` is ``temp`` there); other request fields are ignored."""
    values = {k: d if request.get(k) is None else request[k] for k, d in SAMPLING_DEFAULTS.items()}
    values["temp"] = values.pop("temperature")
    return values


def _generate(llama, prompt: list[int], seed: int | None, max_tokens: int | None, **sampling):
    """Generate after ``prompt`` until EOS or the limit: (text with control tokens, token ids, finish)."""
    if seed is not None:
        llama.set_seed(seed)
    limit = max_tokens or max(1, llama.n_ctx() - len(prompt))
    generated, finish = [], "length"
    for token in llama.generate(prompt, **sampling):
        if token == llama.token_eos():
            finish = "stop"
            break
        generated.append(token)
        if len(generated) >= limit:
            break
    return llama.detokenize(generated, special=True).decode("utf-8", errors="replace"), generated, finish


def _completion(llama, model, message: dict, finish: str, prompt: list[int], generated: list[int]) -> dict:
    """An OpenAI ``chat.completion`` object."""
    import time
    import uuid

    return {
        "id": "chatcmpl-" + uuid.uuid4().hex,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model or llama.model_path,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
        "usage": {
            "prompt_tokens": len(prompt),
            "completion_tokens": len(generated),
            "total_tokens": len(prompt) + len(generated),
        },
    }


# --- Reasoning: Small 4's [THINK] trace returned apart, as reasoning_content ----------------------

REASONING_CHAT_FORMAT = "mistral-reasoning"


def embedded_template(model_path: str | os.PathLike) -> str:
    """The chat template a GGUF carries (``tokenizer.chat_template``: the training template)."""
    from llama_cpp import Llama

    vocab = Llama(str(model_path), vocab_only=True, verbose=False)
    try:
        template = vocab.metadata.get("tokenizer.chat_template")
    finally:
        vocab.close()
    if not template:
        raise ExportError(f"{model_path} carries no tokenizer.chat_template")
    return template


def reasoning_prompt_ids(
    llama, template: str, messages: list[dict], reasoning_effort: str | None
) -> list[int]:
    """The prompt's token ids: the model's own template rendered with ``reasoning_effort`` (Small 4's
    ``[MODEL_SETTINGS]`` block; ``None`` leaves the template's default), control tokens parsed from the
    template only — equal to mistral-common's encoding of the request (tests check)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from course_utils.chat import text_segments

    formatter = Jinja2ChatFormatter(template, eos_token="</s>", bos_token="<s>", add_generation_prompt=True)
    extra = {} if reasoning_effort is None else {"reasoning_effort": reasoning_effort}

    def render(turns: list[dict]) -> str:
        return formatter(messages=turns, **extra).prompt

    ids = [llama.token_bos()]
    for k, segment in enumerate(text_segments(render, messages)):
        text = segment.text.removeprefix("<s>") if k == 0 else segment.text  # BOS goes in as its id
        ids += llama.tokenize(text.encode("utf-8"), add_bos=False, special=not segment.is_message_text)
    return ids


def _serve_reasoning_content() -> None:
    """llama_cpp.server returns replies through its ``ChatCompletion`` TypedDicts, which drop every field
    they do not name; add ``reasoning_content`` (vLLM's name for it) to the reply message. Must run before
    ``llama_cpp.server.app`` is imported: its routes read the (string) annotation then."""
    from typing import Optional

    import llama_cpp.llama_types as types
    from typing_extensions import NotRequired

    class ChatCompletionResponseMessage(types.ChatCompletionResponseMessage):
        pass

    # set as objects, not as this module's string annotations (pydantic resolves those here and fails)
    ChatCompletionResponseMessage.__annotations__ = {"reasoning_content": NotRequired[Optional[str]]}  # noqa: UP045
    ChatCompletionResponseMessage.__optional_keys__ |= {"reasoning_content"}
    types.ChatCompletionResponseMessage = ChatCompletionResponseMessage


def reasoning_chat_handler(template: str, reasoning_effort: str | None = None):
    """A llama-cpp-python chat handler for Small 4: the prompt carries ``reasoning_effort`` (the server's
    ``--reasoning_effort``), and the reply's ``[THINK]…[/THINK]`` comes back as ``reasoning_content``,
    the rest as ``content`` (:func:`course_utils.chat.split_thinking`). No streaming."""

    def handler(
        llama,
        messages: list[dict],
        stream: bool = False,
        seed: int | None = None,
        max_tokens: int | None = None,
        model: str | None = None,
        **request,
    ) -> dict:
        from course_utils.chat import split_thinking

        if stream:
            raise BadRequest("the mistral-reasoning chat format does not stream; send stream=false")
        prompt = reasoning_prompt_ids(llama, template, messages, reasoning_effort)
        text, generated, finish = _generate(llama, prompt, seed, max_tokens, **sampling(request))
        split = split_thinking(text)
        message = {"role": "assistant", "content": split.answer, "reasoning_content": split.thinking}
        return _completion(llama, model, message, finish, prompt, generated)

    return handler


if __name__ == "__main__":
    main(sys.argv[1:])
