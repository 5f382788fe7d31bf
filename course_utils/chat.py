"""Conversations: the reference encoding (mistral-common), prompts, and generation.

Backs lessons 01 (chat template, streaming) and 02 (vision prompting, JSON extraction).

mistral-common is Mistral's own reference implementation of the chat format; the course checks the
Hugging Face chat template against it token for token (``tests/test_template_parity.py`` for Small
3's v7 format, ``tests/test_small4_format.py`` for Small 4's v15: reasoning effort, thinking, tools).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

CONTROL_TOKENS = (
    "<s>", "</s>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
    "[IMG]", "[IMG_BREAK]", "[IMG_END]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
)  # fmt: skip
# Small 4 (v15) adds these: tool results, tool-call arguments, thinking and model settings.
CONTROL_TOKENS_V15 = CONTROL_TOKENS + (
    "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[ARGS]", "[CALL_ID]", "[THINK]", "[/THINK]",
    "[MODEL_SETTINGS]", "[/MODEL_SETTINGS]",
)  # fmt: skip


@lru_cache(maxsize=4)
def reference_tokenizer(
    patch_size: int | None = None, max_image_size: int | None = None, spatial_merge_size: int = 2
):
    """mistral-common's v7 instruct tokenizer over the real Tekken vocabulary.

    Pass the image settings of a processor (patch size, longest edge, merge size) to encode images
    the way that processor does; leave them out for text-only conversations.
    """
    from mistral_common.protocol.instruct.normalize import get_normalizer
    from mistral_common.protocol.instruct.validator import ValidationMode, get_validator
    from mistral_common.tokens.tokenizers.base import TokenizerVersion
    from mistral_common.tokens.tokenizers.image import ImageConfig, ImageEncoder, SpecialImageIDs
    from mistral_common.tokens.tokenizers.instruct import InstructTokenizerV7
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    from course_utils.tiny import tekken_path

    tekken = Tekkenizer.from_file(tekken_path())
    image_encoder = None
    if patch_size is not None:
        config = ImageConfig(
            image_patch_size=patch_size, max_image_size=max_image_size, spatial_merge_size=spatial_merge_size
        )
        ids = SpecialImageIDs(
            img=tekken.get_special_token("[IMG]"),
            img_break=tekken.get_special_token("[IMG_BREAK]"),
            img_end=tekken.get_special_token("[IMG_END]"),
        )
        image_encoder = ImageEncoder(config, ids)
    return MistralTokenizer(
        InstructTokenizerV7(tekken, image_encoder=image_encoder),
        validator=get_validator(TokenizerVersion.v7, mode=ValidationMode.test),
        request_normalizer=get_normalizer(TokenizerVersion.v7, tekken.model_settings_builder),
    )


def _to_mistral_common_content(content):
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if part["type"] == "text":
            parts.append({"type": "text", "text": part["text"]})
        elif part["type"] in ("image", "image_url"):
            image = part.get("image") or part.get("image_url") or part.get("url")
            if isinstance(image, dict):
                image = image.get("url")
            if isinstance(image, str):
                parts.append({"type": "image_url", "image_url": {"url": image}})
            else:
                parts.append({"type": "image", "image": image})
        else:
            raise ValueError(f"unsupported content part type {part['type']!r}")
    return parts


@lru_cache(maxsize=8)
def _tokenizer_from_file(tekken_file: str, finetuning: bool):
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    mode = ValidationMode.finetuning if finetuning else ValidationMode.test
    return MistralTokenizer.from_file(tekken_file, mode=mode)


def reference_tokenizer_from_file(tekken_file: str | os.PathLike, finetuning: bool = False):
    """mistral-common's tokenizer for a ``tekken.json`` — for the Small 4 stand-in's file, tokenizer
    v15 (model settings, ``[THINK]``, tools, images with the file's image settings).

    ``finetuning=True`` validates conversations that end with the assistant's reply (training
    examples); the default mode validates prompts that await one.
    """
    path = Path(tekken_file)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: a Small 4 stand-in folder holds tekken.json "
            "(rebuild it with course_utils.tiny.build_stand_in('tiny-mistral-small-4'))."
        )
    return _tokenizer_from_file(str(path.resolve()), finetuning)


def _image_url_part(part: dict) -> dict:
    """An image part (PIL image, path, URL or ``image_url`` object) as an OpenAI ``image_url`` part:
    ``http(s)``/data URLs pass through, anything else becomes a PNG data URI."""
    source = part.get("image") or part.get("image_url") or part.get("url") or part.get("path")
    if isinstance(source, dict):
        source = source.get("url")
    url = (
        source
        if isinstance(source, str) and source.startswith(("http://", "https://", "data:"))
        else to_data_uri(source)
    )
    return {"type": "image_url", "image_url": {"url": url}}


def _to_openai_message(message: dict) -> dict:
    """A Hugging Face chat message as the OpenAI-style dict ``ChatCompletionRequest.from_openai`` takes:
    image parts holding a PIL image, path or URL become ``image_url`` parts (PIL → PNG data URI)."""
    out = {key: value for key, value in message.items() if key != "content"}
    content = message.get("content")
    if isinstance(content, list):
        parts = []
        for part in content:
            if part.get("type") in ("image", "image_url"):
                parts.append(_image_url_part(part))
            else:
                parts.append(part)
        content = parts
    out["content"] = content
    return out


def canonical_arguments(arguments: str | None) -> str:
    """A tool call's argument string as mistral-common encodes it: valid JSON re-serialized
    (``json.dumps(..., ensure_ascii=False)``: ``{"a": 1}``, no ``\\u`` escapes), empty as ``{}``, other
    text as a quoted JSON string."""
    import json

    if not arguments:
        return "{}"
    try:
        return json.dumps(json.loads(arguments), ensure_ascii=False)
    except json.JSONDecodeError:
        return json.dumps(arguments, ensure_ascii=False)


def normalize_like_mistral_common(messages: list[dict]) -> list[dict]:
    """``messages`` written the way mistral-common encodes them, so that Small 4's chat template gives
    the same tokens: each tool call's ``arguments`` re-serialized (:func:`canonical_arguments`), the
    tool results of one assistant turn in the order of its calls, and trailing spaces dropped from
    text-only assistant replies (mistral-common strips them; it keeps them when the reply has a
    ``[THINK]`` part).

    mistral-common (and so vLLM's Mistral tokenizer) applies these rules; a Hugging Face chat
    template copies what it is given: ``'{"a":1}'`` and ``'{"a": 1}'`` are one prompt to
    mistral-common and two token sequences through the template. Run Small 4 training data through
    this before templating it, so training and serving see the same tokens. The input is not modified.
    """
    out: list[dict] = []
    for message in messages:
        message = dict(message)
        if message.get("tool_calls"):
            calls = []
            for call in message["tool_calls"]:
                function = dict(call["function"])
                if function.get("arguments") is None or isinstance(function["arguments"], str):
                    function["arguments"] = canonical_arguments(function.get("arguments"))
                calls.append({**call, "function": function})
            message["tool_calls"] = calls
        content = message.get("content")
        thinking = message.get("reasoning_content") or message.get("reasoning")
        if message.get("role") == "assistant" and not thinking and content:
            if isinstance(content, list) and all(part.get("type") == "text" for part in content):
                content = "".join(part["text"] for part in content)
            if isinstance(content, str):
                message["content"] = content.rstrip(" ")
        out.append(message)
    # results of one turn, stably sorted by the position of their call (unknown ids last)
    start = 0
    while start < len(out):
        if out[start].get("role") != "tool":
            start += 1
            continue
        end = start
        while end < len(out) and out[end].get("role") == "tool":
            end += 1
        calls_before = next(
            (m for m in reversed(out[:start]) if m.get("role") == "assistant"), {"tool_calls": None}
        )
        order = {c.get("id") or "null": i for i, c in enumerate(calls_before.get("tool_calls") or [])}
        out[start:end] = sorted(
            out[start:end], key=lambda m: order.get(m.get("tool_call_id") or "null", len(order))
        )
        start = end
    return out


def reference_token_ids(
    messages: list[dict],
    processor=None,
    *,
    tools: list[dict] | None = None,
    reasoning_effort: str | None = None,
    tekken_file: str | os.PathLike | None = None,
) -> list[int]:
    """Token ids of ``messages`` as mistral-common encodes them (``encode_chat_completion``).

    Without ``tekken_file``: the v7 format of Small 3.x over the shipped Tekken vocabulary; with
    ``processor``, images use its image settings. With ``tekken_file`` (a Small 4 stand-in's
    ``tekken.json``): that file's format (v15) — ``tools`` (OpenAI-style definitions), assistant
    ``tool_calls``, ``tool`` results, ``reasoning_content`` or ``thinking`` parts, and
    ``reasoning_effort`` ("none" | "high"; unset = the file's default); images use the file's settings.

    A conversation ending with an assistant turn is encoded as a finished (training) example;
    otherwise as a prompt awaiting the reply.
    """
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    ends_with_reply = bool(messages) and messages[-1]["role"] == "assistant"
    if tekken_file is not None:
        tok = reference_tokenizer_from_file(tekken_file, finetuning=ends_with_reply)
        image = tok.instruct_tokenizer.tokenizer.image
        if processor is not None and image is not None:
            in_file = (image.image_patch_size, image.spatial_merge_size, image.max_image_size)
            in_processor = processor_image_settings(processor)
            if in_processor != in_file:
                raise ValueError(
                    f"{tekken_file}: image settings (patch, merge, longest edge) {in_file} differ from the "
                    f"processor's {in_processor}; load the processor from the same folder."
                )
        builder = tok.instruct_tokenizer.tokenizer.model_settings_builder
        if reasoning_effort is not None:
            allowed = (
                [str(v) for v in builder.reasoning_effort.values]
                if builder and builder.reasoning_effort
                else []
            )
            if reasoning_effort not in allowed:
                raise ValueError(
                    f"reasoning_effort={reasoning_effort!r} is not accepted by {tekken_file}: "
                    f"use one of {', '.join(allowed) or '(none: this tokenizer has no reasoning effort)'}."
                )
        extra = {} if reasoning_effort is None else {"reasoning_effort": reasoning_effort}
        request = ChatCompletionRequest.from_openai(
            [_to_openai_message(m) for m in messages], tools=tools, **extra
        )
        return tok.encode_chat_completion(request).tokens
    if tools is not None or reasoning_effort is not None:
        raise ValueError(
            "tools and reasoning_effort are encoded with Small 4's tokenizer: pass "
            "tekken_file=<the tiny-mistral-small-4 folder>/tekken.json"
        )

    kwargs = {}
    if processor is not None:
        patch, merge, longest_edge = processor_image_settings(processor)
        kwargs = dict(patch_size=patch, max_image_size=longest_edge, spatial_merge_size=merge)
    tok = reference_tokenizer(**kwargs)
    converted = [{"role": m["role"], "content": _to_mistral_common_content(m["content"])} for m in messages]
    request = ChatCompletionRequest(messages=converted)
    if ends_with_reply:
        instruct = tok.instruct_tokenizer
        normalized = tok._instruct_request_normalizer.from_chat_completion_request(request)
        return instruct.encode_instruct(normalized).tokens
    return tok.encode_chat_completion(request).tokens


def contains_control_tokens(text: str, control_tokens: tuple[str, ...] = CONTROL_TOKENS) -> list[str]:
    """Control-token strings (``[INST]``, ``</s>``, …) typed inside message text.

    The HF tokenizer turns such text into real control tokens (a prompt-injection risk, and ids that
    differ from mistral-common's, which encodes them as plain text). Validate user data
    with this before training; for Small 4 pass ``control_tokens=CONTROL_TOKENS_V15``.
    """
    return [t for t in control_tokens if t in text]


# --- Message text stays text: control tokens typed by a user are not control tokens -------------------

# Anything shaped like a Mistral control token ([INST], [/TOOL_RESULTS], </s>, <SPECIAL_20>, …). Matching
# more than the vocabulary has is harmless: such text is tokenized as text, which is what it is.
CONTROL_LIKE = re.compile(r"</?s>|<unk>|<pad>|<SPECIAL_\d+>|\[/?[A-Z_]+\]")
_HOLE = "\ue000{}\ue001"  # private-use marks no template or tokenizer gives a meaning to
_HOLE_SPLIT = re.compile("\ue000(\\d+)\ue001")


@dataclass(frozen=True)
class Segment:
    """A piece of a rendered prompt: template text (control tokens parsed) or message text (never)."""

    text: str
    is_message_text: bool


def text_segments(render: Callable[[list[dict]], str], messages: list[dict]) -> list[Segment]:
    """Render ``messages`` with ``render`` (a chat template to a string) and split the result into the
    template's text and the message texts that look like control tokens — so a user who types
    ``[/INST]`` cannot close their turn and write the assistant's (prompt injection).

    mistral-common encodes every message's text as text and adds control tokens by id; a Hugging Face
    or llama.cpp tokenizer given the rendered string parses ``[INST]`` wherever it appears. Tokenize
    the segments apart (:func:`encode_segments`): each message text here is enclosed by control tokens
    in Mistral's formats, so no token is lost at a boundary. Messages without such text are left in
    the template's text (nothing to protect). Adjacent text parts of a message are joined with
    ``"\\n\\n"``, as the template joins them; an assistant reply loses its trailing spaces (``" "``), as
    there.
    """
    holes: list[str] = []

    def hole(text: str) -> str:
        holes.append(text)
        return _HOLE.format(len(holes) - 1)

    patched = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str) and CONTROL_LIKE.search(content):
            text = content.rstrip(" ") if message.get("role") == "assistant" else content
            message = {**message, "content": hole(text)}
        elif isinstance(content, list) and any(
            p.get("type") == "text" and CONTROL_LIKE.search(p.get("text") or "") for p in content
        ):
            parts: list[dict] = []
            for part in content:
                if part.get("type") == "text" and parts and parts[-1].get("type") == "text":
                    parts[-1] = {"type": "text", "text": parts[-1]["text"] + "\n\n" + part["text"]}
                else:
                    parts.append(dict(part))
            if message.get("role") == "assistant" and parts and parts[-1].get("type") == "text":
                parts[-1] = {**parts[-1], "text": parts[-1]["text"].rstrip(" ")}
            parts = [
                {**q, "text": hole(q["text"])}
                if q.get("type") == "text" and CONTROL_LIKE.search(q["text"])
                else q
                for q in parts
            ]
            message = {**message, "content": parts}
        patched.append(message)
    pieces = _HOLE_SPLIT.split(render(patched))
    segments = []
    for i, piece in enumerate(pieces):
        if i % 2:
            segments.append(Segment(holes[int(piece)], True))
        elif piece:
            segments.append(Segment(piece, False))
    return segments


def encode_segments(tokenizer, segments: list[Segment]) -> list[int]:
    """Token ids of ``segments`` with a Hugging Face tokenizer: template text with its control tokens,
    message text with none (``split_special_tokens=True``) — mistral-common's encoding."""
    ids: list[int] = []
    for segment in segments:
        ids += tokenizer(
            segment.text, add_special_tokens=False, split_special_tokens=segment.is_message_text
        )["input_ids"]
    return ids


def needs_text_segments(messages: list[dict]) -> bool:
    """True when some message's text looks like a control token (see :func:`text_segments`)."""
    for message in messages:
        content = message.get("content")
        texts = (
            [content]
            if isinstance(content, str)
            else [p.get("text") or "" for p in content if isinstance(p, dict) and p.get("type") == "text"]
            if isinstance(content, list)
            else []
        )
        if any(CONTROL_LIKE.search(t) for t in texts):
            return True
    return False


def user_message(text: str, images: list | None = None) -> dict:
    """A user turn with optional images first (the layout Mistral's models were trained on)."""
    if not images:
        return {"role": "user", "content": text}
    content = [{"type": "image", "image": image} for image in images]
    content.append({"type": "text", "text": text})
    return {"role": "user", "content": content}


def prepare_inputs(processor, messages: list[dict], device=None):
    """Apply the chat template (with images) and return model-ready tensors."""
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    if device is not None:
        inputs = inputs.to(device)
    return inputs


def generate(
    model,
    processor,
    messages: list[dict],
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    seed: int | None = 0,
    streamer=None,
) -> str:
    """Generate one reply. ``temperature=0`` is greedy (deterministic); Mistral recommends 0.15."""
    import torch

    inputs = prepare_inputs(processor, messages, device=model.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    if seed is not None:
        torch.manual_seed(seed)
    sampling = dict(do_sample=True, temperature=temperature) if temperature > 0 else dict(do_sample=False)
    with torch.inference_mode():
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            streamer=streamer,
            pad_token_id=processor.tokenizer.pad_token_id,
            **sampling,
        )
    new_tokens = output[0, inputs["input_ids"].shape[1] :]
    return processor.decode(new_tokens, skip_special_tokens=True)


def stream(
    model,
    processor,
    messages: list[dict],
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    seed: int | None = 0,
) -> Iterator[str]:
    """Yield the reply piece by piece as it is generated (a background thread runs ``generate``)."""
    from threading import Thread

    from transformers import TextIteratorStreamer

    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    errors: list[BaseException] = []

    def run():
        try:
            generate(model, processor, messages, max_new_tokens, temperature, seed, streamer=streamer)
        except BaseException as exc:  # surfaced in the caller's thread below
            errors.append(exc)
            streamer.end()

    thread = Thread(target=run, daemon=True)
    thread.start()
    yield from streamer
    thread.join()
    if errors:
        raise errors[0]


# --- Images --------------------------------------------------------------------------------------


def load_image(source):
    """A PIL image from a path, a PIL image, an ``http(s)`` URL or a ``data:image/...;base64,`` URI."""
    import base64
    import io
    from pathlib import Path

    from PIL import Image

    if isinstance(source, Image.Image):
        return source
    if isinstance(source, (str, Path)):
        text = str(source)
        if text.startswith("data:"):
            header, _, payload = text.partition(",")
            if ";base64" not in header or not header.startswith("data:image/"):
                raise ValueError(f"expected a data:image/...;base64, URI, got {header[:40]!r}")
            return Image.open(io.BytesIO(base64.b64decode(payload)))
        if text.startswith(("http://", "https://")):
            import requests

            response = requests.get(text, timeout=30)
            response.raise_for_status()
            return Image.open(io.BytesIO(response.content))
        path = Path(text)
        if not path.is_file():
            raise FileNotFoundError(f"image not found: {path}")
        return Image.open(path)
    raise TypeError(f"cannot load an image from {type(source).__name__}")


def to_data_uri(image, image_format: str = "PNG") -> str:
    """Encode an image as a data URI — what OpenAI-compatible servers (vLLM, llama.cpp, Ollama's /v1) take."""
    import base64
    import io

    buffer = io.BytesIO()
    load_image(image).save(buffer, format=image_format)
    return f"data:image/{image_format.lower()};base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def image_grid(
    width: int, height: int, patch_size: int, spatial_merge_size: int, longest_edge: int
) -> tuple[int, int]:
    """(rows, columns) of image tokens the Pixtral processor makes for a ``width`` x ``height`` image.

    The image is scaled down (never up) to fit ``longest_edge``, then rounded up to whole
    ``merge x merge`` blocks of patches; each block becomes one token.
    """
    ratio = max(height / longest_edge, width / longest_edge)
    if ratio > 1:
        height, width = math.floor(height / ratio), math.floor(width / ratio)
    block = patch_size * spatial_merge_size  # each token covers a merge x merge block of patches
    return (height - 1) // block + 1, (width - 1) // block + 1


def image_token_cost(
    width: int,
    height: int,
    processor=None,
    *,
    patch_size: int = 14,
    spatial_merge_size: int = 2,
    longest_edge: int = 1540,
) -> int:
    """Context tokens one image takes: rows x cols ``[IMG]`` + one ``[IMG_BREAK]``/``[IMG_END]`` per row.

    Defaults are Mistral Small 3.1/3.2's (patch 14, merge 2, longest edge 1540); pass ``processor``
    to read them from a loaded processor instead.
    """
    if processor is not None:
        patch_size, spatial_merge_size, longest_edge = processor_image_settings(processor)
    rows, cols = image_grid(width, height, patch_size, spatial_merge_size, longest_edge)
    return rows * cols + rows


def processor_image_settings(processor) -> tuple[int, int, int]:
    """(patch size, spatial merge size, longest edge) of a Pixtral processor."""
    ip = processor.image_processor
    patch = ip.patch_size["height"] if isinstance(ip.patch_size, dict) else ip.patch_size
    return patch, processor.spatial_merge_size, ip.size["longest_edge"]


def resize_for_budget(
    image, max_tokens: int, *, patch_size: int = 14, spatial_merge_size: int = 2, longest_edge: int = 1540
):
    """Downscale ``image`` (keeping its aspect ratio) until it costs at most ``max_tokens``.

    The trade-off: fewer tokens → cheaper, faster, more images per context; but small print becomes
    unreadable below roughly 8-10 pixels per character height. Never upscales.
    """
    from PIL import Image

    image = load_image(image)
    settings = dict(patch_size=patch_size, spatial_merge_size=spatial_merge_size, longest_edge=longest_edge)
    width, height = image.size
    if image_token_cost(width, height, **settings) <= max_tokens:
        return image
    low, high = 0.0, 1.0
    for _ in range(30):  # binary search on the scale factor
        mid = (low + high) / 2
        w, h = max(1, int(width * mid)), max(1, int(height * mid))
        if image_token_cost(w, h, **settings) <= max_tokens:
            low = mid
        else:
            high = mid
    w, h = max(1, int(width * low)), max(1, int(height * low))
    if image_token_cost(w, h, **settings) > max_tokens:
        raise ValueError(
            f"no size of this image fits {max_tokens} tokens (the minimum is 2: one token + [IMG_END])"
        )
    return image.resize((w, h), Image.LANCZOS)


# --- JSON replies -------------------------------------------------------------------------------


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


# --- Batches ------------------------------------------------------------------------------------


def generate_batch(
    model,
    processor,
    conversations: list[list[dict]],
    max_new_tokens: int = 64,
    batch_size: int = 8,
    progress: bool = True,
    template_kwargs: dict | None = None,
    skip_special_tokens: bool = True,
) -> list[str]:
    """Greedy replies for many conversations, ``batch_size`` at a time with left padding.

    ``template_kwargs`` go to the chat template (Small 4: ``{"reasoning_effort": "high"}``);
    ``skip_special_tokens=False`` keeps control tokens such as ``[THINK]`` in the replies (padding and
    end-of-sequence are dropped either way).
    """
    import torch
    from tqdm.auto import tqdm

    tokenizer = processor.tokenizer
    previous_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only models continue from the right edge
    replies: list[str] = []
    try:
        for start in tqdm(range(0, len(conversations), batch_size), disable=not progress, desc="generating"):
            batch = conversations[start : start + batch_size]
            inputs = processor.apply_chat_template(
                batch,
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
                return_tensors="pt",
                processor_kwargs={"padding": True},
                **(template_kwargs or {}),
            )
            inputs = inputs.to(model.device)
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
            with torch.inference_mode():
                output = model.generate(
                    **inputs,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                )
            new = output[:, inputs["input_ids"].shape[1] :]
            if skip_special_tokens:
                replies.extend(processor.batch_decode(new, skip_special_tokens=True))
            else:
                drop = {tokenizer.pad_token_id, tokenizer.eos_token_id}
                replies.extend(
                    tokenizer.decode([t for t in row.tolist() if t not in drop], skip_special_tokens=False)
                    for row in new
                )
    finally:
        tokenizer.padding_side = previous_side
    return replies


THINK_OPEN, THINK_CLOSE = "[THINK]", "[/THINK]"


@dataclass(frozen=True)
class SplitReply:
    """A reply with its reasoning trace apart, as a reasoning parser returns it (``reasoning_content``)."""

    thinking: str | None  # the text inside [THINK]…[/THINK]; None when the reply has no trace
    answer: str  # the rest: what the user is shown
    closed: bool = True  # False: the trace never closed (cut off by the token limit)


def split_thinking(reply: str) -> SplitReply:
    """Split a Small 4 reply (decoded with its control tokens) into its ``[THINK]`` trace and the answer.

    As vLLM's ``--reasoning-parser mistral``: the text between ``[THINK]`` and ``[/THINK]`` is the
    reasoning, the rest the content; a trace that never closes is all reasoning (answer empty).
    """
    start = reply.find(THINK_OPEN)
    if start < 0:
        return SplitReply(None, reply.strip())
    before, rest = reply[:start], reply[start + len(THINK_OPEN) :]
    end = rest.find(THINK_CLOSE)
    if end < 0:
        return SplitReply(rest.strip(), before.strip(), closed=False)
    return SplitReply(rest[:end].strip(), (before + rest[end + len(THINK_CLOSE) :]).strip())


_OPENAI_MESSAGE_KEYS = ("role", "content", "name", "tool_calls", "tool_call_id")


def openai_messages(messages: list[dict]) -> list[dict]:
    """Course/HF messages (image parts holding a path, PIL image or URL) as OpenAI chat messages:
    images become ``image_url`` parts with data URIs (``http(s)`` URLs are passed through); tool calls,
    call ids and tool names are kept (arguments given as an object become the JSON string the API
    takes); keys of the course's own (``weight``) are left out, as the API refuses unknown ones."""
    import json

    out = []
    for message in messages:
        sent = {key: message[key] for key in _OPENAI_MESSAGE_KEYS if key in message}
        content = message["content"]
        if isinstance(content, list):
            content = [
                _image_url_part(part) if part.get("type") in ("image", "image_url") else part
                for part in content
            ]
        sent["content"] = content
        if isinstance(message.get("tool_calls"), list):
            sent["tool_calls"] = [
                {
                    **call,
                    "function": {
                        **call["function"],
                        "arguments": json.dumps(call["function"]["arguments"], ensure_ascii=False),
                    },
                }
                if isinstance(call.get("function", {}).get("arguments"), (dict, list))
                else call
                for call in message["tool_calls"]
            ]
        out.append(sent)
    return out
