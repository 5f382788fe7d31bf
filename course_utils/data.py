"""Make a learner's data safe to train on: one schema, readers and converters for the files people
really bring, validation that never loses a row, response-only labels, token statistics and leak-free
splits.

Backs lesson 03 (and lesson 08's tool-calling rows, checked by :func:`check_tool_calls`).

The canonical record (what every converter produces and training consumes)::

    {"messages": [{"role": "system"|"user"|"assistant"|"tool",
                   "content": "text" | [{"type": "text", "text": …}, {"type": "image"}, …],
                   "weight": 0 | 1,                      # optional, assistant turns only
                   "tool_calls": [{"id": "9 chars", "type": "function",
                                   "function": {"name": …, "arguments": "JSON string"}}],  # assistant
                   "tool_call_id": "9 chars", "name": …}, …],                               # tool
     "images": ["path/or/url", …],          # one entry per {"type": "image"} part, in order
     "tools": [{"type": "function", "function": {"name", "description", "parameters"}}]}  # optional

or, for plain text (TRL's ``text`` / mistral-finetune's pretraining rows), ``{"text": "…"}``.

Files: ``.jsonl``, ``.json`` (an array, an object of arrays, or columns), either gzipped, ``.parquet``,
and Hugging Face ``Dataset``/``DatasetDict`` objects. Everything that reports a problem says
``file:row:field: reason``: rows are 1-based line numbers in JSON Lines, and 0-based indexes
(``data[row]``) in arrays, Parquet and datasets (``split[index]`` for an object of arrays).
"""

from __future__ import annotations

import codecs
import copy
import gzip
import hashlib
import io
import itertools
import json
import math
import os
import re
import reprlib
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Literal

from course_utils.chat import contains_control_tokens, encode_segments, needs_text_segments, text_segments
from course_utils.paths import staged

ROLES = ("system", "user", "assistant", "tool")
IGNORE_INDEX = -100  # label value that the loss skips
# Control-token ids in the Tekken vocabulary (Small 3.x and Small 4 alike; tests read them back from
# both stand-ins' tokenizers, and tokenize_record checks them against the tokenizer it is given).
INST_END_ID, EOS_ID, BOS_ID = 4, 2, 1  # [/INST], </s> and <s>
INST_ID, TOOL_RESULTS_ID, TOOL_RESULTS_END_ID = 3, 7, 8  # [INST], [TOOL_RESULTS], [/TOOL_RESULTS]
THINK_ID, THINK_END_ID = 34, 35  # [THINK], [/THINK]: v13+ tokenizers (Small 4); unused ranks before

# Mistral's tool rules, as mistral-common 1.13.1 enforces them for v7 (protocol/instruct/validator.py)
# (fullmatch: `$` would also match before a final newline, and "abcdefghi\n" passed as a 9-character id)
TOOL_CALL_ID = re.compile(r"[a-zA-Z0-9]{9}")
FUNCTION_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
# mistral-common 1.13.1's v7 validator, finetuning mode, measured 2026-11-29: a system message after a
# user turn is accepted, after an assistant turn rejected ("Unexpected role 'system' after role 'assistant'").
SYSTEM_NOT_FIRST = (
    "system message must come first (the course's template renders a leading one only; mistral-finetune "
    "lifts a single system message to the front; mistral-common v7 accepts one after a user turn and "
    "rejects one after an assistant turn)"
)


class DataFormatError(ValueError):
    """A row could not be understood; the message names the field."""

    def __init__(self, field_name: str, reason: str):
        super().__init__(f"{field_name}: {reason}")
        self.field, self.reason = field_name, reason


class DataReadError(ValueError):
    """A whole file could not be read (wrong encoding, not JSON, corrupt gzip/Parquet): one line saying
    where and what to do."""


SHOWN_CHARS = 80  # how much of a value a message echoes: a 1 MB field is named, never printed whole
SHOWN_TEXT_CHARS = 240  # paths and exception texts: room for a real one, not for a pasted base64 image
_REPR = reprlib.Repr()  # bounded work on huge or deeply nested values (repr() would walk all of them)
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, SHOWN_CHARS, SHOWN_CHARS


def _cut(text: str, limit: int = SHOWN_CHARS) -> str:
    """``text``, or its first ``limit - 1`` characters and an ellipsis."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _shown(value, limit: int = SHOWN_CHARS) -> str:
    """``repr(value)`` for a message, cut to ``limit`` characters (strings keep their beginning)."""
    if isinstance(value, str):
        return _cut(repr(value[: limit + 1]), limit)
    return _cut(_REPR.repr(value), limit)


def _shown_all(values: Iterable) -> str:
    """A list of values as ``repr`` shows it (``['a', 'b']``), each one cut short."""
    return "[" + ", ".join(_shown(v) for v in values) + "]"


# --- Converters ----------------------------------------------------------------------------------


def _text_parts_with_images(text: str, placeholder: str = "<image>") -> list[dict] | str:
    """ShareGPT/LLaVA style ``<image>`` placeholders become image parts (in place)."""
    if placeholder not in text:
        return text
    parts: list[dict] = []
    for i, chunk in enumerate(text.split(placeholder)):
        if i:
            parts.append({"type": "image"})
        if chunk.strip():
            parts.append({"type": "text", "text": chunk.strip("\n")})
    return parts


def short_tool_call_id(seed: str, taken: set[str] = frozenset()) -> str:
    """A deterministic 9-character [A-Za-z0-9] id (Mistral's rule) derived from ``seed``."""
    alphabet = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    for attempt in range(1000):
        number = int(hashlib.sha256(f"{attempt}:{seed}".encode()).hexdigest(), 16)
        chars = []
        for _ in range(9):
            number, digit = divmod(number, 62)
            chars.append(alphabet[digit])
        candidate = "".join(chars)
        if candidate not in taken:
            return candidate
    raise ValueError(f"no free tool-call id for {_shown(seed)}")  # pragma: no cover - 62**9 ids


def _with_system(messages: list[dict], text, field_name: str) -> list[dict]:
    """Prepend a top-level system prompt; a second one (also in the turns) is an error, never dropped."""
    if text is None or text == "":
        return messages
    if not isinstance(text, str):
        raise DataFormatError(field_name, f"must be a string, got {type(text).__name__}")
    if any(isinstance(m, dict) and m.get("role") == "system" for m in messages):
        raise DataFormatError(field_name, "a system prompt is given twice (here and as a system turn)")
    return [{"role": "system", "content": text}, *messages]


def _tools_of(row: dict) -> list | None:
    """``tools`` (OpenAI/Mistral list, or LLaMA-Factory's JSON string of bare functions) or
    mistral-finetune's ``available_tools``, in the canonical ``{"type": "function", …}`` shape."""
    if "tools" in row and "available_tools" in row:
        raise DataFormatError("tools", "both tools and available_tools are given: keep one")
    key = "tools" if "tools" in row else "available_tools"
    tools = row.get(key)
    if tools is None or tools == "" or tools == []:
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as exc:
            raise DataFormatError(key, f"a string that is not JSON ({exc.msg})") from None
    if not isinstance(tools, list):
        raise DataFormatError(key, f"must be a list of tools, got {type(tools).__name__}")
    return [
        t
        if not isinstance(t, dict) or "function" in t or "name" not in t
        else {"type": "function", "function": t}
        for t in tools
    ]


def from_alpaca(row: dict, system: str | None = None) -> dict:
    """``instruction`` (+ optional ``input``) → user, ``output`` → assistant; ``system`` and
    ``history`` ([[instruction, response], …], LLaMA-Factory) become the turns before it."""
    for key in ("instruction", "output"):
        if key not in row:
            raise DataFormatError(key, "missing (Alpaca rows need instruction and output)")
    if row.get("input") not in (None, "") and not isinstance(row.get("input"), str):
        raise DataFormatError("input", f"must be a string, got {type(row['input']).__name__}")
    if row.get("input") and not isinstance(row["instruction"], str):
        raise DataFormatError("instruction", f"must be a string, got {type(row['instruction']).__name__}")
    user = row["instruction"] if not row.get("input") else f"{row['instruction']}\n\n{row['input']}"
    messages: list[dict] = []
    history = row.get("history") or []
    if not isinstance(history, list):
        raise DataFormatError(
            "history", f"must be a list of [instruction, response] pairs, got {_shown(history)}"
        )
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise DataFormatError(f"history[{i}]", "must be an [instruction, response] pair")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]
    messages = _with_system(messages, row.get("system") or system, "system")
    images = list(row.get("images") or ([row["image"]] if row.get("image") else []))
    if images:
        messages[-2]["content"] = [{"type": "image"} for _ in images] + [{"type": "text", "text": user}]
    return {"messages": messages, "images": images}


_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "chatgpt": "assistant",
    "bing": "assistant",
    "function_call": "assistant",  # LLaMA-Factory: a tool call {"name", "arguments"} (or a list of them)
    "observation": "tool",  # LLaMA-Factory: the tool's result
    "tool": "tool",
}


def _sharegpt_calls(value: str, where: str, turn: int, taken: set[str]) -> list[dict]:
    try:
        calls = json.loads(value)
    except json.JSONDecodeError as exc:
        raise DataFormatError(
            where, f"a function_call must be JSON {{name, arguments}} ({exc.msg})"
        ) from None
    calls = calls if isinstance(calls, list) else [calls]
    out = []
    for k, call in enumerate(calls):
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            raise DataFormatError(where, "a function_call must be {name, arguments} (or a list of them)")
        arguments = call.get("arguments", {})
        arguments = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
        call_id = short_tool_call_id(f"{turn}:{k}:{call['name']}:{arguments}", taken)
        taken.add(call_id)
        out.append(
            {"id": call_id, "type": "function", "function": {"name": call["name"], "arguments": arguments}}
        )
    return out


def from_sharegpt(row: dict) -> dict:
    """``conversations: [{from: human|gpt|system, value}]``, with ``<image>`` placeholders, a top-level
    ``system``, per-turn ``weight`` and LLaMA-Factory's ``function_call``/``observation`` turns."""
    turns = row.get("conversations")
    if not isinstance(turns, list):
        raise DataFormatError("conversations", "missing or not a list")
    messages: list[dict] = []
    taken: set[str] = set()
    pending: list[dict] = []  # calls still waiting for their observation
    for i, turn in enumerate(turns):
        who = turn.get("from") if isinstance(turn, dict) else None
        if who not in _SHAREGPT_ROLES:
            raise DataFormatError(f"conversations[{i}].from", f"unknown speaker {_shown(who)}")
        value = turn.get("value")
        if not isinstance(value, str):
            reason = "missing" if value is None else f"must be a string, got {type(value).__name__}"
            raise DataFormatError(f"conversations[{i}].value", reason)
        if who == "function_call":
            calls = _sharegpt_calls(value, f"conversations[{i}].value", i, taken)
            message = {"role": "assistant", "content": None, "tool_calls": calls}
            pending = list(calls)
        elif who in ("observation", "tool"):
            message = {"role": "tool", "content": value}
            if pending:
                call = pending.pop(0)
                message.update(tool_call_id=call["id"], name=call["function"]["name"])
        else:
            message = {"role": _SHAREGPT_ROLES[who], "content": _text_parts_with_images(value)}
        if turn.get("weight") is not None:
            message["weight"] = turn["weight"]
        messages.append(message)
    messages = _with_system(messages, row.get("system"), "system")
    images = row.get("images") or ([row["image"]] if row.get("image") else [])
    record = {"messages": messages, "images": list(images)}
    tools = _tools_of(row)
    if tools is not None:
        record["tools"] = tools
    return record


def _image_url(part: dict, where: str):
    url = part.get("image_url")
    if isinstance(url, dict):
        if not isinstance(url.get("url"), str) or not url["url"]:
            raise DataFormatError(f"{where}.image_url.url", "missing (an image_url object needs a url)")
        return url["url"]
    if not isinstance(url, str) or not url:
        raise DataFormatError(f"{where}.image_url", "missing: a URL, data URI or {url: …} object")
    return url


def _convert_message(message: dict, i: int, images: list, key: str) -> dict:
    where = f"{key}[{i}]"
    if message.get("content") is not None and message.get("text") is not None:
        raise DataFormatError(where, "has both content and text (mistral-finetune takes one of the two)")
    content = message.get("content") if message.get("content") is not None else message.get("text")
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "image_url":
                images.append(_image_url(part, f"{where}.content[{j}]"))
                parts.append({"type": "image"})
            elif kind == "image":
                if part.get("image") is not None:
                    images.append(part["image"])
                parts.append({"type": "image"})
            elif kind == "text":
                parts.append({"type": "text", "text": part.get("text")})
            else:
                raise DataFormatError(f"{where}.content[{j}].type", f"unsupported part type {_shown(kind)}")
        content = parts
    out = {"role": message.get("role"), "content": content}
    for name in ("weight", "tool_calls", "tool_call_id"):  # None = absent (Arrow fills missing keys)
        if message.get(name) is not None:
            out[name] = copy.deepcopy(message[name])
    if message.get("role") == "tool" and message.get("name") is not None:
        out["name"] = message["name"]
    return out


def from_openai(row: dict) -> dict:
    """OpenAI chat format (also la Plateforme's and mistral-finetune's ``messages``/``interactions``):
    ``image_url`` parts become image parts + ``images``; weights, tool calls and ``tools`` are kept."""
    if "messages" in row and "interactions" in row:
        raise DataFormatError("messages", "both messages and interactions are given: keep one")
    key = "interactions" if "interactions" in row and "messages" not in row else "messages"
    messages_in = row.get(key)
    if not isinstance(messages_in, list):
        raise DataFormatError(key, "missing or not a list")
    messages, images = [], list(row.get("images") or [])
    for i, message in enumerate(messages_in):
        if not isinstance(message, dict):
            raise DataFormatError(f"{key}[{i}]", "not an object")
        messages.append(_convert_message(message, i, images, key))
    record = {"messages": messages, "images": images}
    tools = _tools_of(row)
    if tools is not None:
        record["tools"] = tools
    return record


def from_plateforme(row: dict) -> dict:
    """Mistral la Plateforme fine-tuning JSONL (OpenAI-like, ``weight`` on assistant turns kept)."""
    return from_openai(row)


def from_prompt_completion(row: dict) -> dict:
    """TRL's prompt-completion rows. Conversational (lists of messages) are joined; plain strings become
    one user turn and one assistant reply (TRL itself would train them as raw text continuation)."""
    prompt, completion = row.get("prompt"), row.get("completion")
    if isinstance(prompt, str) and isinstance(completion, str):
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        record = {"messages": messages, "images": list(row.get("images") or [])}
        tools = _tools_of(row)
        return {**record, "tools": tools} if tools else record
    if isinstance(prompt, list) and isinstance(completion, list):
        joined = dict(row, messages=prompt + completion)
        for drop in ("prompt", "completion"):
            joined.pop(drop)
        return from_openai(joined)
    raise DataFormatError(
        "completion",
        f"prompt and completion must both be strings or both lists of messages, got "
        f"{type(prompt).__name__} and {type(completion).__name__}",
    )


def from_text(row: dict) -> dict:
    """Plain text for language modelling (TRL's ``text``, mistral-finetune's pretraining rows)."""
    if "text" in row and "content" in row:
        raise DataFormatError("text", "both text and content are given (mistral-finetune takes one)")
    return {"text": row.get("text", row.get("content"))}


def detect_format(row: dict) -> str:
    """Which converter a row needs: ``sharegpt``, ``openai`` (also canonical, la Plateforme and
    mistral-finetune's ``interactions``), ``alpaca``, ``prompt_completion`` (TRL) or ``text``."""
    if "conversations" in row:
        return "sharegpt"
    if "messages" in row or "interactions" in row:
        return "openai"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    if "chosen" in row or "rejected" in row:
        raise DataFormatError(
            "(row)", "preference data (chosen/rejected) is for DPO-style training, not supervised fine-tuning"
        )
    if "text" in row or ("content" in row and "role" not in row):
        return "text"
    raise DataFormatError(
        "(row)",
        f"unknown format: keys {_shown_all(sorted(row)[:6])} — expected messages, interactions, "
        "conversations, instruction/output, prompt/completion or text",
    )


CONVERTERS = {
    "alpaca": from_alpaca,
    "sharegpt": from_sharegpt,
    "openai": from_openai,
    "plateforme": from_plateforme,
    "prompt_completion": from_prompt_completion,
    "text": from_text,
}

# What each converter reads; anything else in a row is reported (counted per file), never ignored silently.
_KNOWN_KEYS = {
    "alpaca": {"instruction", "input", "output", "system", "history", "image", "images"},
    "sharegpt": {"conversations", "system", "tools", "available_tools", "images", "image"},
    "openai": {"messages", "interactions", "images", "tools", "available_tools"},
    "prompt_completion": {"prompt", "completion", "images", "tools"},
    "text": {"text", "content"},
}
_KNOWN_KEYS["plateforme"] = _KNOWN_KEYS["openai"]
_MESSAGE_KEYS = {"role", "content", "text", "weight", "tool_calls", "tool_call_id"}


def unknown_fields(row: dict, fmt: str) -> list[str]:
    """Keys of a raw row that its converter does not carry over (``messages[].name`` for every turn)."""
    known = _KNOWN_KEYS.get(fmt, set()) | {"id", "system_prompt"}
    found = [str(k) for k, v in row.items() if k not in known and v is not None]
    lists = {"sharegpt": [("conversations", {"from", "value", "weight"})]}.get(
        fmt, [(k, _MESSAGE_KEYS) for k in ("messages", "interactions", "prompt", "completion")]
    )
    for key, allowed in lists:
        turns = row.get(key)
        for turn in turns if isinstance(turns, list) else []:
            if isinstance(turn, dict):
                extra = {k for k, v in turn.items() if v is not None} - allowed
                extra -= {"name"} if turn.get("role") == "tool" else set()
                found += [f"{key}[].{k}" for k in sorted(map(str, extra)) if f"{key}[].{k}" not in found]
                found += [f for f in _unknown_part_keys(turn.get("content"), key) if f not in found]
    return found


_PART_KEYS = {"text": {"type", "text"}, "image": {"type", "image"}, "image_url": {"type", "image_url"}}


def _unknown_part_keys(content, key: str) -> list[str]:
    """Keys inside content parts that the conversion drops (``cache_control``, ``image_url.detail``)."""
    found = []
    for part in content if isinstance(content, list) else []:
        if not isinstance(part, dict) or part.get("type") not in _PART_KEYS:
            continue  # an unknown part type is a row error already
        extra = {k for k, v in part.items() if v is not None} - _PART_KEYS[part["type"]]
        found += [f"{key}[].content[].{k}" for k in sorted(map(str, extra))]
        if isinstance(part.get("image_url"), dict):
            found += [
                f"{key}[].content[].image_url.{k}" for k in sorted(map(str, part["image_url"])) if k != "url"
            ]
    return found


def to_canonical(row: dict, fmt: str = "auto") -> dict:
    fmt = detect_format(row) if fmt == "auto" else fmt
    if fmt not in CONVERTERS:
        raise DataFormatError(
            "(format)", f"unknown format {_shown(fmt)}; use one of auto, {', '.join(CONVERTERS)}"
        )
    images = row.get("images")
    if images is not None and not isinstance(images, (list, tuple)):
        raise DataFormatError(
            "images", f"must be a list of image paths or URLs, got {type(images).__name__} (wrap one in [ ])"
        )
    if row.get("image") and images:
        raise DataFormatError("image", "the row has both image and images: list every image in images")
    record = CONVERTERS[fmt](row)
    if "system_prompt" in row:  # mistral-finetune (and others): a top-level system prompt
        if "messages" not in record:
            raise DataFormatError("system_prompt", "a text row cannot carry a system prompt")
        record["messages"] = _with_system(record["messages"], row["system_prompt"], "system_prompt")
    if "id" in row:
        record["id"] = row["id"]
    return record


def from_hf_dataset(
    dataset, fmt: str = "auto", issues: list[Issue] | None = None, name: str = "dataset"
) -> list[dict]:
    """Rows of a Hugging Face ``Dataset``/``DatasetDict`` (or any iterable of dicts) → canonical records.

    Every row is tried: rows that cannot be converted are reported as ``Issue`` (row = index, or
    ``split[index]``) into ``issues`` when given; otherwise one ``DataFormatError`` lists them all at the
    end. PIL images in ``image``/``images`` columns are kept as objects (they are already loaded).
    """
    records, problems = [], []
    for row_id, row in dataset_rows(dataset):
        try:
            records.append(to_canonical(dict(row), fmt))
        except DataFormatError as exc:
            problems.append(Issue(name, row_id, exc.field, exc.reason))
    if issues is not None:
        issues.extend(problems)
    elif problems:
        shown = "; ".join(str(p) for p in problems[:3])
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise DataFormatError("(rows)", f"{len(problems)} row(s) could not be converted: {shown}{more}")
    return records


def dataset_rows(dataset) -> list[tuple[int | str, dict]]:
    """(row id, row) pairs of a ``Dataset`` (0-based index), a ``DatasetDict`` or a dict of row lists
    (``split[index]``), or any iterable of rows (index)."""
    if isinstance(dataset, dict):  # DatasetDict is a dict of Datasets
        return [(f"{split}[{i}]", row) for split in dataset.keys() for i, row in enumerate(dataset[split])]
    return list(enumerate(dataset))


# --- Reading files -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Undecodable:
    """A JSON Lines row whose bytes are not valid text in the file's encoding."""

    reason: str


@dataclass
class LoadedRows:
    """The raw rows of a file: (row id, JSON text or object) pairs and how the file was read."""

    rows: list[tuple[int | str, object]]
    container: str  # "JSON Lines", "JSON array", …, "+ gzip"
    row_kind: Literal["line", "index"]
    notes: list[str] = field(default_factory=list)


_BOMS = [
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
]


def guess_encoding(data: bytes) -> str:
    """A best guess at a non-UTF-8 file's encoding, from byte-order marks and byte patterns."""
    for bom, name in _BOMS:
        if data.startswith(bom):
            return name
    sample = data[:4096]
    if sample and sample.count(b"\x00") > len(sample) // 4:
        return "utf-16-le" if sample[1:2] == b"\x00" else "utf-16-be"
    try:
        sample.decode("cp1252")
        return "cp1252"
    except UnicodeDecodeError:
        return "latin-1"


def _encoding_hint(path: str, encoding: str) -> str:
    iconv = {"utf-16-le": "UTF-16LE", "utf-16-be": "UTF-16BE"}.get(encoding, encoding.upper())
    return (
        f"it looks like {encoding}: pass --encoding {encoding} (encoding='{encoding}'), or convert it once "
        f"with `iconv -f {iconv} -t UTF-8 {path} > {Path(path).stem}.utf8{Path(path).suffix}`"
    )


def _decode_lines(data: bytes, path: str, encoding: str | None) -> list[tuple[int, object]]:
    """JSON Lines → (line number, text or Undecodable). A file in another encoding is one error; a
    few broken lines in a UTF-8 file are row problems and the other rows are kept."""
    if encoding:
        try:
            text = data.decode(encoding)
        except (UnicodeDecodeError, LookupError) as exc:
            raise DataReadError(f"{path}: cannot be read as {encoding}: {exc}") from None
        text = text.removeprefix("\ufeff")
        return [(n, line) for n, line in enumerate(text.split("\n"), start=1) if line.strip()]
    for bom, name in _BOMS:
        if data.startswith(bom):
            raise DataReadError(
                f"{path}: byte 0: a {name.upper()} byte-order mark, not UTF-8 — {_encoding_hint(path, name)}"
            )
    data = data.removeprefix(codecs.BOM_UTF8)
    rows: list[tuple[int, object]] = []
    bad: list[tuple[int, int, bytes]] = []
    multibyte_ok = False
    offset = 0
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8")
            multibyte_ok |= not line.isascii()
            if line.strip():
                rows.append((number, line))
        except UnicodeDecodeError as exc:
            bad.append((number, offset + exc.start, raw[exc.start : exc.start + 1]))
            rows.append((number, None))
        offset += len(raw) + 1
    if not bad:
        return rows
    guess = guess_encoding(data)
    if len(bad) > 1 and not multibyte_ok:  # the whole file is in another encoding
        line, byte, value = bad[0]
        raise DataReadError(
            f"{path}: line {line} (byte offset {byte}): byte {value!r} is not UTF-8 — "
            f"{len(bad)} lines are affected; {_encoding_hint(path, guess)}"
        )
    reasons = {
        line: Undecodable(
            f"not UTF-8: byte {value!r} at byte offset {byte} of the file ({guess}?); the row is skipped"
        )
        for line, byte, value in bad
    }
    return [(n, reasons.get(n, raw)) for n, raw in rows]


def _json_error(path: str, text: str, exc: json.JSONDecodeError) -> DataReadError:
    byte = len(text[: exc.pos].encode("utf-8"))
    return DataReadError(
        f"{path}: not valid JSON at line {exc.lineno}, column {exc.colno} (byte offset {byte}): {exc.msg} "
        "— one broken element makes a JSON array unreadable; fix it there "
        "(JSON Lines files keep the other rows)"
    )


def _looks_like_one_row(document: dict) -> bool:
    """A row, not columns: its main key holds text or a list of turns (columns hold one per row)."""
    try:
        detect_format(document)
    except DataFormatError:
        return False
    keys = ("conversations", "messages", "interactions", "instruction", "prompt", "text", "content")
    value = document[next(k for k in keys if k in document)]
    return isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, dict) for v in value))


def _rows_of_json(document, path: str) -> tuple[list[tuple[int | str, object]], str]:
    if isinstance(document, list):
        return list(enumerate(document)), "JSON array"
    if not isinstance(document, dict):
        raise DataReadError(
            f"{path}: a JSON {type(document).__name__}, not rows (expected an array of objects)"
        )
    if _looks_like_one_row(document):
        return [(0, document)], "JSON object (one row)"
    values = list(document.values())
    if values and all(isinstance(v, list) and all(isinstance(r, dict) for r in v) for v in values):
        return [(f"{key}[{i}]", row) for key, rows in document.items() for i, row in enumerate(rows)], (
            "JSON object of arrays"
        )
    if values and all(isinstance(v, list) for v in values) and len({len(v) for v in values}) == 1:
        columns = list(document)
        return [(i, {c: document[c][i] for c in columns}) for i in range(len(values[0]))], "JSON columns"
    raise DataReadError(
        f"{path}: a JSON object that is neither a row nor arrays of rows "
        f"(keys {_shown_all(sorted(document)[:6])})"
    )


def read_rows(path: str | os.PathLike, encoding: str | None = None) -> LoadedRows:
    """The raw rows of a ``.jsonl``, ``.json`` (array, object of arrays, columns, or JSON Lines named
    .json), ``.parquet`` or gzipped file. UTF-8 with or without BOM is read; anything else is a
    ``DataReadError`` naming the byte offset, the guessed encoding and the fix (or pass ``encoding``)."""
    path = Path(path)
    if path.is_dir():
        raise FileNotFoundError(
            f"{path}: a folder, not a file: name one .jsonl, .json or .parquet file in it"
        )
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    data = path.read_bytes()
    name, suffixes, zipped = str(path), [s.lower() for s in path.suffixes], ""
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataReadError(f"{name}: a gzip file that cannot be decompressed ({exc})") from None
        suffixes, zipped = [s for s in suffixes if s != ".gz"], " + gzip"
    elif suffixes[-1:] == [".gz"]:
        raise DataReadError(f"{name}: named .gz but not gzip-compressed (it starts with {data[:8]!r})")
    if data[:4] == b"PAR1" or suffixes[-1:] == [".parquet"]:
        return LoadedRows(_parquet_rows(data, name), "Parquet" + zipped, "index")
    if encoding is None and not any(data.startswith(bom) for bom, _ in _BOMS):
        if data[:4096].count(b"\x00") > len(data[:4096]) // 4:
            first_nul = data.index(b"\x00")
            raise DataReadError(
                f"{name}: byte offset {first_nul}: NUL bytes, not UTF-8 text — "
                + _encoding_hint(name, guess_encoding(data))
            )
        head = data.removeprefix(codecs.BOM_UTF8).lstrip()[:1]
        if head and head not in b"[{":
            raise DataReadError(
                f"{name}: does not start like JSON (first bytes {data[:20]!r}); the validator reads "
                ".jsonl, .json, .parquet and their .gz; load CSV with datasets.load_dataset('csv', …)"
            )
    else:
        head = None
    is_lines = suffixes[-1:] in ([".jsonl"], [".ndjson"])
    text = _whole_text(data, name, encoding, head)
    start = text.lstrip()[:1] if text is not None else ""
    if start == "[" or (start == "{" and not is_lines):  # one JSON document, unless it is JSON Lines
        try:
            document = json.loads(text)
        except json.JSONDecodeError as exc:
            if start == "[" and not is_lines:
                raise _json_error(name, text, exc) from None
        except RecursionError:  # JSON Lines fall back to their lines (the deep one is a row problem)
            if not is_lines:
                raise DataReadError(
                    f"{name}: JSON nested deeper than Python's reader can follow; no row of it can be read"
                ) from None
        else:
            rows, container = _rows_of_json(document, name)
            notes = [f"{name}: named {suffixes[-1]} but holds a {container}"] if is_lines else []
            return LoadedRows(rows, container + zipped, "index", notes)
    rows = _decode_lines(data, name, encoding)
    notes = [] if is_lines or not rows else [f"{name}: read as JSON Lines (one object per line)"]
    return LoadedRows(rows, "JSON Lines" + zipped, "line", notes)


def _whole_text(data: bytes, name: str, encoding: str | None, head: bytes | None) -> str | None:
    """The file as one text when it decodes; a JSON array that does not is a ``DataReadError`` (no
    line of it can be kept); other files are read line by line, which names each bad line."""
    try:
        return data.decode(encoding or "utf-8").removeprefix("\ufeff")
    except LookupError:
        raise DataReadError(f"{name}: unknown encoding {encoding!r}") from None
    except UnicodeDecodeError as exc:
        if head == b"[" and not encoding:
            line = data[: exc.start].count(b"\n") + 1
            raise DataReadError(
                f"{name}: line {line} (byte offset {exc.start}): byte {data[exc.start : exc.start + 1]!r} "
                f"is not UTF-8 — {_encoding_hint(name, guess_encoding(data))}"
            ) from None
        return None


def _parquet_rows(data: bytes, name: str) -> list[tuple[int, object]]:
    try:
        import pyarrow.parquet as pq

        table = pq.read_table(io.BytesIO(data))
    except ImportError:  # pragma: no cover - pyarrow comes with datasets
        raise DataReadError(f"{name}: reading Parquet needs pyarrow (`pip install pyarrow`)") from None
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, … for a corrupt file
        raise DataReadError(f"{name}: not a readable Parquet file ({type(exc).__name__}: {exc})") from None
    return list(enumerate(table.to_pylist()))


# --- Validation ----------------------------------------------------------------------------------


@dataclass
class Issue:
    file: str
    row: int | str | None  # None: the file as a whole
    field: str
    reason: str

    def __str__(self) -> str:
        if self.row is None:
            return f"{self.file}: {self.reason}"
        return f"{self.file}:{self.row}:{self.field}: {self.reason}"


@dataclass
class ValidationReport:
    file: str
    total: int = 0
    valid: list[dict] = field(default_factory=list)
    valid_rows: list[int | str] = field(default_factory=list)
    issues: list[Issue] = field(default_factory=list)
    fixes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # nothing wrong, but worth knowing (dropped keys, …)
    container: str = "JSON Lines"
    row_kind: Literal["line", "index"] = "line"

    @property
    def invalid_rows(self) -> list[int | str]:
        return list(dict.fromkeys(i.row for i in self.issues if i.row is not None))

    @property
    def ok(self) -> bool:
        return not self.issues

    def summary(self) -> str:
        where = "" if self.row_kind == "line" else f" ({self.container}; rows are 0-based indexes)"
        return (
            f"{self.file}: {self.total} rows, {len(self.valid)} valid, {len(self.invalid_rows)} invalid "
            f"({len(self.issues)} problems), {len(self.fixes)} fixes applied{where}"
        )


def _text_of(content) -> list[tuple[str, str]]:
    """(field suffix, text) pairs of a message content."""
    if isinstance(content, str):
        return [("", content)]
    return [
        (f"[{j}].text", p.get("text"))
        for j, p in enumerate(content)
        if isinstance(p, dict) and p.get("type") == "text"
    ]


def _check_weight(message: dict, where: str, role) -> list[tuple[str, str]]:
    if "weight" not in message:
        return []
    weight = message["weight"]
    if role != "assistant":
        return [(f"{where}.weight", f"only assistant turns may carry a weight, not {role}")]
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight not in (0, 1):
        return [(f"{where}.weight", f"must be 0 or 1 (0 = not trained on), got {_shown(weight)}")]
    return []


def check_record(record: dict, base_dir: Path | None = None) -> list[tuple[str, str]]:
    """Problems of one canonical record as (field, reason) pairs; empty when it is fine."""
    if "messages" not in record and "text" in record:
        return _check_text_record(record)
    problems: list[tuple[str, str]] = []
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        return [("messages", "missing or empty")]
    expected = {"user"}
    image_parts = 0
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ROLES:
            problems.append(
                (f"{where}.role", f"unknown role {_shown(role)}; use system, user, assistant or tool")
            )
            expected = {"assistant"} if "user" in expected else {"user"}  # one problem, not a cascade
            continue
        problems += _check_weight(message, where, role)
        calls = message.get("tool_calls")
        if role == "system":
            if i != 0:
                problems.append((f"{where}.role", SYSTEM_NOT_FIRST))
        elif role not in expected:
            if role == "tool":
                reason = "a tool message must follow an assistant message with tool_calls"
            elif expected == {"tool"}:
                reason = "expected tool (the tool results of the assistant's tool_calls come next)"
            else:
                reason = f"expected {' or '.join(sorted(expected))} (user and assistant must alternate)"
            problems.append((f"{where}.role", reason))
        elif role == "user":
            expected = {"assistant"}
        elif role == "assistant":
            expected = _after_assistant(calls)
        else:
            expected = {"tool", "assistant", "user"}
        content = message.get("content")
        if role == "assistant" and calls is not None and content in (None, "", []):
            continue  # a tool-call turn needs no text (a malformed tool_calls is reported once, below)
        if role == "tool":
            if not isinstance(content, str):
                problems.append(
                    (f"{where}.content", f"a tool result must be a string, got {type(content).__name__}")
                )
            continue
        if isinstance(content, list):
            if not content:
                problems.append((f"{where}.content", "empty"))
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "image":
                    if role != "user":
                        problems.append(
                            (f"{where}.content[{j}]", f"images are only allowed in user messages, not {role}")
                        )
                    image_parts += 1
                elif kind == "text":
                    if not isinstance(part.get("text"), str) or not part["text"].strip():
                        problems.append((f"{where}.content[{j}].text", "empty or not a string"))
                else:
                    problems.append((f"{where}.content[{j}].type", f"unsupported part type {_shown(kind)}"))
        elif not isinstance(content, str):
            problems.append(
                (f"{where}.content", f"must be a string or a list of parts, got {type(content).__name__}")
            )
        elif not content.strip():
            problems.append((f"{where}.content", "empty"))
        if record.get("images"):  # text rows encode it as text (tokenize_record); image rows cannot yet
            problems += _control_token_problems(content, f"{where}.content")
    problems += check_tool_calls(record)
    last = messages[-1]
    if isinstance(last, dict) and last.get("role") in ("system", "user", "tool"):
        problems.append(
            (f"messages[{len(messages) - 1}].role", "the conversation must end with an assistant reply")
        )
    assistants = [m for m in messages if isinstance(m, dict) and m.get("role") == "assistant"]
    if assistants and all(m.get("weight", 1) == 0 for m in assistants):
        problems.append(("messages", "every assistant turn has weight 0: nothing to train on"))
    images = record.get("images") or []
    if len(images) != image_parts:
        problems.append(
            ("images", f"{image_parts} image part(s) in messages but {len(images)} image(s) listed")
        )
    for k, image in enumerate(images):
        problem = _check_image(image, base_dir)
        if problem:
            problems.append((f"images[{k}]", problem))
    return problems


def _after_assistant(calls) -> set[str]:
    """The roles that may follow an assistant turn with these ``tool_calls``: its tool results, or
    after unreadable calls (not a non-empty list: check_tool_calls' one problem) either, no cascade."""
    if calls is None:
        return {"user"}
    return {"tool"} if isinstance(calls, list) and calls else {"tool", "user"}


def _control_token_problems(content, where: str) -> list[tuple[str, str]]:
    problems = []
    for suffix, text in _text_of(content) if isinstance(content, (str, list)) else []:
        found = contains_control_tokens(text) if isinstance(text, str) else []
        if found:
            problems.append(
                (
                    f"{where}{suffix}",
                    f"contains control token(s) {found} in a row with images: the course encodes typed "
                    "control tokens as text only in text rows (remove them or the images)",
                )
            )
    return problems


def _check_text_record(record: dict) -> list[tuple[str, str]]:
    text = record.get("text")
    if not isinstance(text, str):
        return [("text", f"must be a string, got {type(text).__name__}")]
    if not text.strip():
        return [("text", "empty")]
    return []  # control-token text is tokenized as text (tokenize_record)


def check_tool_calls(record: dict) -> list[tuple[str, str]]:
    """Mistral's tool-calling rules for one canonical record, as (field, reason) pairs.

    ``tools``: a list of ``{"type": "function", "function": {"name", "description", "parameters"}}``
    with names ``[a-zA-Z0-9_-]{1,64}`` and ``parameters`` a valid JSON schema (Draft 7). Assistant
    ``tool_calls``: ``{"id", "type": "function", "function": {"name", "arguments"}}`` with ``id`` exactly
    9 characters ``[A-Za-z0-9]``, unique in the row, and ``arguments`` a JSON string holding an object.
    ``tool`` messages: ``tool_call_id`` answering an earlier, still unanswered call (``name``, if given,
    its function). Calls must be answered before the next user or assistant turn (a row may end on
    the call itself: that trains the model to make it).
    """
    problems: list[tuple[str, str]] = []
    names = _check_tools(record.get("tools"), problems)
    messages = record.get("messages") if isinstance(record.get("messages"), list) else []
    pending: dict[str, str] = {}  # call id -> function name, waiting for a result
    all_ids: set[str] = set()
    answered: set[str] = set()
    unreadable_calls = False  # the last tool_calls was reported: its results match nothing, silently
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            continue
        where, role = f"messages[{i}]", message.get("role")
        if role in ("user", "assistant", "system") and pending:
            problems.append(
                (where, f"tool call(s) {_shown_all(sorted(pending))} got no tool result before this message")
            )
            pending.clear()
        if role in ("user", "assistant", "system"):
            unreadable_calls = False
        if "tool_calls" in message and role != "assistant":
            problems.append((f"{where}.tool_calls", f"only assistant messages make tool calls, not {role}"))
        elif role == "assistant" and message.get("tool_calls") is not None:
            calls = message["tool_calls"]
            if not isinstance(calls, list) or not calls:
                reason = (
                    "must be a non-empty list of calls"
                    if isinstance(calls, list)
                    else f"must be a list of calls, got {type(calls).__name__} (wrap a single call in [ ])"
                )
                problems.append((f"{where}.tool_calls", reason))
                unreadable_calls = True
                continue
            for j, call in enumerate(calls):
                _check_call(call, f"{where}.tool_calls[{j}]", names, all_ids, pending, problems)
        elif role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                reason = (
                    "missing: a tool result must name the call it answers"
                    if call_id in (None, "")
                    else f"must be a string (the id of the call it answers), got {type(call_id).__name__}"
                )
                problems.append((f"{where}.tool_call_id", reason))
                if pending:  # it answers the next call in order: that call is not unanswered as well
                    first = next(iter(pending))
                    del pending[first]
                    answered.add(first)
            elif call_id in pending:
                expected_name = pending.pop(call_id)
                answered.add(call_id)
                if "name" in message and message["name"] != expected_name:
                    problems.append(
                        (
                            f"{where}.name",
                            f"{_shown(message['name'])} but call {_cut(call_id)} called "
                            f"{_shown(expected_name)}",
                        )
                    )
            elif call_id in answered:
                problems.append((f"{where}.tool_call_id", f"call {_shown(call_id)} already has a result"))
            elif not unreadable_calls:
                problems.append(
                    (f"{where}.tool_call_id", f"{_shown(call_id)} matches no earlier tool call in this row")
                )
    return problems


def _check_tools(tools, problems: list[tuple[str, str]]) -> set[str] | None:
    if tools is None:
        return None
    if not isinstance(tools, list):
        problems.append(("tools", f"must be a list of tools, got {type(tools).__name__}"))
        return None
    from jsonschema import Draft7Validator
    from jsonschema.exceptions import SchemaError

    names: set[str] = set()
    for k, tool in enumerate(tools):
        where = f"tools[{k}]"
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict):
            problems.append(
                (where, 'must be {"type": "function", "function": {name, description, parameters}}')
            )
            continue
        if tool.get("type", "function") != "function":
            problems.append((f"{where}.type", f"must be 'function', got {_shown(tool.get('type'))}"))
        name = function.get("name")
        if not isinstance(name, str) or not FUNCTION_NAME.fullmatch(name):
            problems.append(
                (f"{where}.function.name", f"{_shown(name)} must be 1-64 characters [a-zA-Z0-9_-]")
            )
        elif name in names:
            problems.append((f"{where}.function.name", f"{_shown(name)} is defined twice"))
        else:
            names.add(name)
        parameters = function.get("parameters", {})
        if not isinstance(parameters, dict):
            problems.append((f"{where}.function.parameters", "must be a JSON schema object ({} for none)"))
            continue
        try:
            Draft7Validator.check_schema(parameters)
        except SchemaError as exc:
            problems.append((f"{where}.function.parameters", f"not a valid JSON schema: {exc.message}"))
    return names


def _check_call(call, where: str, names, all_ids: set[str], pending: dict, problems: list) -> None:
    if not isinstance(call, dict):
        problems.append((where, "must be an object {id, type, function}"))
        return
    call_id = call.get("id")
    if not isinstance(call_id, str) or not call_id:
        problems.append((f"{where}.id", "missing (Mistral needs a 9-character id per call)"))
    elif not TOOL_CALL_ID.fullmatch(call_id):
        hint = (
            " — an OpenAI-style id: the opt-in fix --fix-tool-call-ids (fix_tool_call_ids) rewrites the "
            "row's ids consistently"
        )
        problems.append(
            (
                f"{where}.id",
                f"{_shown(call_id)} must be exactly 9 characters [A-Za-z0-9] (Mistral's rule){hint}",
            )
        )
    if isinstance(call_id, str) and call_id:
        if call_id in all_ids:
            problems.append((f"{where}.id", f"{_shown(call_id)} is used twice in this row"))
        all_ids.add(call_id)
    if call.get("type", "function") != "function":
        problems.append((f"{where}.type", f"must be 'function', got {_shown(call.get('type'))}"))
    function = call.get("function")
    if not isinstance(function, dict):
        problems.append((f"{where}.function", "missing: {name, arguments}"))
        return
    name = function.get("name")
    if not isinstance(name, str) or not FUNCTION_NAME.fullmatch(name):
        problems.append((f"{where}.function.name", f"{_shown(name)} must be 1-64 characters [a-zA-Z0-9_-]"))
    elif names is not None and name not in names:
        problems.append(
            (f"{where}.function.name", f"{_shown(name)} is not one of the row's tools {sorted(names)}")
        )
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            # parse_constant: Python reads NaN and Infinity, JSON has neither
            decoded = json.loads(arguments, parse_constant=_not_json)
        except (json.JSONDecodeError, RecursionError, ValueError) as exc:
            decoded = exc
        if not isinstance(decoded, dict):
            problems.append((f"{where}.function.arguments", "must be a JSON object encoded as a string"))
    elif arguments is None:
        problems.append((f"{where}.function.arguments", "missing (a JSON string, '{}' for none)"))
    else:
        problems.append(
            (
                f"{where}.function.arguments",
                f"must be a JSON string, got {type(arguments).__name__} (json.dumps it)",
            )
        )
    if isinstance(call_id, str) and call_id:
        pending[call_id] = name


def _one_value_per_key(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object whose keys are unique: Python keeps the last of a repeated key without a word."""
    seen: dict[str, object] = {}
    for key, value in pairs:
        if key in seen:
            raise DataFormatError(
                _cut(key), "given twice in one object: keep one (the reader would drop the first)"
            )
        seen[key] = value
    return seen


def _not_json(constant: str):
    raise ValueError(f"{constant} is not JSON")


def fix_tool_call_ids(record: dict) -> list[str]:
    """Opt-in fix: rewrite tool-call ids that break Mistral's 9-character rule (OpenAI's ``call_…``)
    to deterministic 9-character ids, consistently in ``tool_calls`` and ``tool_call_id``. Returns the
    changed fields (``messages[2].tool_calls[0].id: 'call_…' → 'Xy…'``)."""
    messages = record.get("messages") if isinstance(record.get("messages"), list) else []
    calls = [
        (i, j, call)
        for i, m in enumerate(messages)
        if isinstance(m, dict) and isinstance(m.get("tool_calls"), list)
        for j, call in enumerate(m["tool_calls"])
        if isinstance(call, dict) and isinstance(call.get("id"), str) and call["id"]
    ]
    taken = {c["id"] for _, _, c in calls if TOOL_CALL_ID.fullmatch(c["id"])}
    mapping: dict[str, str] = {}
    changes = []
    for i, j, call in calls:
        old = call["id"]
        if TOOL_CALL_ID.fullmatch(old):
            continue
        if old not in mapping:
            mapping[old] = short_tool_call_id(old, taken)
            taken.add(mapping[old])
        call["id"] = mapping[old]
        changes.append(f"messages[{i}].tool_calls[{j}].id: {_shown(old)} → {mapping[old]!r}")
    for i, message in enumerate(messages):
        if (
            isinstance(message, dict)
            and message.get("role") == "tool"
            and message.get("tool_call_id") in mapping
        ):
            old = message["tool_call_id"]
            message["tool_call_id"] = mapping[old]
            changes.append(f"messages[{i}].tool_call_id: {_shown(old)} → {mapping[old]!r}")
    return changes


_fix_ids = fix_tool_call_ids  # validate_rows' keyword of the same name shadows the function


def _check_image(image, base_dir: Path | None) -> str | None:
    if isinstance(image, dict):  # Hugging Face / Parquet image: {"bytes": …, "path": …}
        if image.get("bytes"):
            try:
                from PIL import Image

                with Image.open(io.BytesIO(image["bytes"])) as img:
                    img.verify()
                return None
            except Exception as exc:
                return f"image bytes cannot be read as an image ({type(exc).__name__})"
        if isinstance(image.get("path"), str):
            image = image["path"]
        else:
            return "an image object with neither bytes nor path"
    if not isinstance(image, str):
        return None if hasattr(image, "size") else f"not a path, URL or image: {type(image).__name__}"
    if image.startswith(("http://", "https://")):
        return None  # checked when it is downloaded
    if image.startswith("data:"):
        try:
            from course_utils.chat import load_image

            load_image(image).verify()
            return None
        except Exception as exc:
            return f"data URI does not decode to an image ({_cut(str(exc), SHOWN_TEXT_CHARS)})"
    path = resolve_image_path(image, base_dir)
    if not _is_file(path):
        return f"file not found: {_cut(image, SHOWN_TEXT_CHARS)}"
    try:
        from PIL import Image

        with Image.open(path) as img:
            img.verify()
    except Exception as exc:
        return f"cannot be read as an image ({type(exc).__name__}): {_cut(image, SHOWN_TEXT_CHARS)}"
    return None


def _is_file(path: Path) -> bool:
    """``path.is_file()``, False for a string no file can be named by (``File name too long``)."""
    try:
        return path.is_file()
    except OSError:
        return False


def resolve_image_path(image: str, base_dir: Path | None) -> Path:
    path = Path(image)
    return path if path.is_absolute() or base_dir is None else base_dir / path


@lru_cache(maxsize=8192)
def _file_digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _image_identity(image) -> str:
    """An image's identity: the bytes of a local file (so the key does not depend on where the
    checkout lives), the pixels of an image in memory, else the URL / data URI itself."""
    if isinstance(image, dict):
        if image.get("bytes"):
            return "sha256:" + hashlib.sha256(image["bytes"]).hexdigest()
        image = image.get("path")
    if hasattr(image, "tobytes") and hasattr(image, "size") and hasattr(image, "mode"):  # PIL, in memory
        digest = hashlib.sha256(f"{image.mode}:{image.size}:".encode() + image.tobytes()).hexdigest()
        return "pixels:" + digest
    if (
        isinstance(image, str)
        and not image.startswith(("http://", "https://", "data:"))
        and _is_file(Path(image))
    ):
        return "sha256:" + _file_digest(str(Path(image).resolve()))
    return str(image)


def record_key(record: dict) -> str:
    """A content hash of messages (weights included) + images + tools, for duplicate detection and
    leak-free splits. A weight of 1 is the default, so it counts as no weight."""
    if "messages" not in record and "text" in record:
        payload = {"text": record["text"]}
    else:
        messages = [
            {k: v for k, v in m.items() if not (k == "weight" and v == 1)} if isinstance(m, dict) else m
            for m in record.get("messages") or []
        ]
        payload = {"m": messages, "i": [_image_identity(i) for i in record.get("images") or []]}
        if record.get("tools"):
            payload["t"] = record["tools"]
    encoded = json.dumps(payload, sort_keys=True, ensure_ascii=False, default=repr)
    return hashlib.sha256(encoded.encode()).hexdigest()


def _strip_whitespace(record: dict) -> list[str]:
    changed = []
    if "messages" not in record:
        if isinstance(record.get("text"), str) and record["text"] != record["text"].strip():
            record["text"] = record["text"].strip()
            changed.append("text")
        return changed
    for i, message in enumerate(record["messages"]):
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str) and content != content.strip():
            message["content"] = content.strip()
            changed.append(f"messages[{i}].content")
        elif isinstance(content, list):
            for j, part in enumerate(content):
                if (
                    isinstance(part, dict)
                    and part.get("type") == "text"
                    and isinstance(part.get("text"), str)
                    and part["text"] != part["text"].strip()
                ):
                    part["text"] = part["text"].strip()
                    changed.append(f"messages[{i}].content[{j}].text")
    return changed


def validate_rows(
    rows: Iterable[tuple[int | str, object]],
    file: str,
    *,
    fmt: str = "auto",
    base_dir: Path | None = None,
    processor=None,
    max_seq_length: int | None = None,
    strip_whitespace: bool = False,
    drop_duplicates: bool = False,
    fix_tool_call_ids: bool = False,
) -> ValidationReport:
    """Validate (row id, raw line or dict) pairs; valid rows are kept, invalid ones reported.

    Keys a converter does not carry over are counted per file in ``report.notes`` (with the first row
    they appear in); an empty input is an error (training on nothing is never what was meant).
    """
    fix_ids = fix_tool_call_ids
    report = ValidationReport(file)
    seen: dict[str, int | str] = {}
    unknown: dict[str, list] = {}  # key -> [rows, first row, format]
    plain_prompt_completion = []
    for row_number, raw in rows:
        report.total += 1
        issues = []
        if isinstance(raw, Undecodable):
            report.issues.append(Issue(file, row_number, "(encoding)", raw.reason))
            continue
        try:
            row = (
                json.loads(raw.strip(), object_pairs_hook=_one_value_per_key) if isinstance(raw, str) else raw
            )
            if not isinstance(row, dict):
                raise DataFormatError("(row)", f"expected a JSON object, got {type(row).__name__}")
            row_format = detect_format(row) if fmt == "auto" else fmt
            record = to_canonical(row, row_format)
            if row_format == "prompt_completion" and isinstance(row.get("prompt"), str):
                plain_prompt_completion.append(row_number)
            for key in unknown_fields(row, row_format):
                unknown.setdefault(key, [0, row_number, row_format])[0] += 1
        except json.JSONDecodeError as exc:
            report.issues.append(
                Issue(file, row_number, "(json)", f"bad JSON: {exc.msg} at column {exc.colno}")
            )
            continue
        except RecursionError:
            report.issues.append(
                Issue(file, row_number, "(json)", "nested deeper than the JSON reader follows")
            )
            continue
        except DataFormatError as exc:
            report.issues.append(Issue(file, row_number, exc.field, exc.reason))
            continue
        except Exception as exc:  # a shape no converter foresaw: a row problem, never a traceback
            report.issues.append(
                Issue(
                    file,
                    row_number,
                    "(row)",
                    f"cannot be converted ({type(exc).__name__}: {_cut(str(exc), SHOWN_TEXT_CHARS)})",
                )
            )
            continue
        if strip_whitespace:
            for field_name in _strip_whitespace(record):
                report.fixes.append(f"{file}:{row_number}:{field_name}: stripped leading/trailing whitespace")
        if fix_ids:
            for change in _fix_ids(record):
                report.fixes.append(f"{file}:{row_number}:{change}")
        try:
            for field_name, reason in check_record(record, base_dir):
                issues.append(Issue(file, row_number, field_name, reason))
            key = record_key(record)
        except Exception as exc:  # pragma: no cover - last line of defence, reported like any problem
            report.issues.append(
                Issue(
                    file,
                    row_number,
                    "(row)",
                    f"cannot be checked ({type(exc).__name__}: {_cut(str(exc), SHOWN_TEXT_CHARS)})",
                )
            )
            continue
        if not issues and key in seen:
            if drop_duplicates:
                report.fixes.append(f"{file}:{row_number}:(row): dropped, exact duplicate of row {seen[key]}")
                continue
            issues.append(
                Issue(
                    file, row_number, "(row)", f"exact duplicate of row {seen[key]} (use --drop-duplicates)"
                )
            )
        if not issues and processor is not None and max_seq_length is not None:
            try:
                length = count_tokens(record, processor, base_dir)
            except Exception as exc:  # e.g. a template that cannot render tool calls
                length = None
                issues.append(
                    Issue(
                        file,
                        row_number,
                        "(tokens)",
                        f"cannot be templated: {_cut(str(exc), SHOWN_TEXT_CHARS)}",
                    )
                )
            if length is not None and length > max_seq_length:
                issues.append(
                    Issue(
                        file,
                        row_number,
                        "(tokens)",
                        f"{length} tokens > max_seq_length {max_seq_length}: it would be truncated",
                    )
                )
        if issues:
            report.issues.extend(issues)
        else:
            seen[key] = row_number
            report.valid.append(record)
            report.valid_rows.append(row_number)
    if report.total == 0:
        report.issues.append(Issue(file, None, "(file)", "no rows: the file is empty (nothing to train on)"))
    for key, (count, first, row_format) in unknown.items():
        report.notes.append(
            f"{file}: field {_shown(key)} is not part of the {row_format} format: ignored in {count} row(s), "
            f"first at row {first} (it is not in --write-valid's output)"
        )
    if plain_prompt_completion:
        report.notes.append(
            f"{file}: {len(plain_prompt_completion)} plain prompt/completion row(s) (first at row "
            f"{plain_prompt_completion[0]}) became one user turn and one assistant reply (the chat template "
            "is applied; TRL would train them as raw text continuation)"
        )
    return report


def validate_file(path: str | os.PathLike, encoding: str | None = None, **kwargs) -> ValidationReport:
    """Validate a ``.jsonl``/``.json``/``.parquet`` file (gzipped or not) row by row; images resolve
    relative to the file's folder. A file that cannot be read at all raises ``DataReadError``."""
    path = Path(path)
    loaded = read_rows(path, encoding)
    kwargs.setdefault("base_dir", path.parent)
    report = validate_rows(loaded.rows, str(path), **kwargs)
    report.container, report.row_kind = loaded.container, loaded.row_kind
    report.notes[:0] = loaded.notes
    return report


def validate_dataset(dataset, name: str = "dataset", **kwargs) -> ValidationReport:
    """Validate a Hugging Face ``Dataset``/``DatasetDict`` (rows are indexes, ``split[index]``)."""
    report = validate_rows(dataset_rows(dataset), name, **kwargs)
    report.container, report.row_kind = "Hugging Face dataset", "index"
    return report


def write_jsonl(
    records: Iterable[dict],
    path: str | os.PathLike,
    overwrite: bool = False,
    base_dir: Path | None = None,
    allow_empty: bool = False,
) -> Path:
    """Write records atomically; refuse to replace an existing file unless ``overwrite``, and refuse
    to write no record at all (``ValueError``, nothing created or replaced) unless ``allow_empty``.

    With ``base_dir`` (where the records' relative image paths point), image paths are rewritten
    relative to the new file, so the written dataset still finds its images. Images held in memory
    (PIL, or ``{"bytes": …}``) are written as data URIs.
    """
    path = Path(path)
    records, nothing = iter(records), object()
    first = next(records, nothing)
    if first is nothing and not allow_empty:  # an empty file trains on nothing, and replaces a good one
        raise ValueError(f"no rows to write: nothing written to {path} (an empty file trains on nothing)")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; choose another name or pass overwrite=True (--overwrite)")
    with staged(path, overwrite) as tmp, tmp.open("w", encoding="utf-8") as f:
        for record in itertools.chain([] if first is nothing else [first], records):
            record = _jsonable(record)
            if base_dir is not None and record.get("images"):
                record["images"] = [_relocate(i, base_dir, path.parent) for i in record["images"]]
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def _relocate(image: str, old_base: Path, new_base: Path) -> str:
    if image.startswith(("http://", "https://", "data:", "<")) or Path(image).is_absolute():
        return image
    return os.path.relpath(Path(old_base).resolve() / image, Path(new_base).resolve())


def _image_as_text(image):
    """A record's image as JSON can hold it: paths and URLs as they are, images in memory as data URIs."""
    import base64

    if isinstance(image, str):
        return image
    if isinstance(image, dict) and image.get("bytes"):
        from PIL import Image

        with Image.open(io.BytesIO(image["bytes"])) as img:
            kind = (img.format or "png").lower()
        return f"data:image/{kind};base64," + base64.b64encode(image["bytes"]).decode("ascii")
    if isinstance(image, dict) and isinstance(image.get("path"), str):
        return image["path"]
    from course_utils.chat import to_data_uri

    return to_data_uri(image)


def _jsonable(record: dict) -> dict:
    out = dict(record)
    if out.get("images"):
        out["images"] = [_image_as_text(i) for i in out["images"]]
    return out


# --- la Plateforme export ------------------------------------------------------------------------


def to_plateforme(record: dict, base_dir: Path | None = None) -> dict:
    """A canonical record as Mistral la Plateforme fine-tuning JSONL: images inlined as data URIs;
    weights, tool calls and ``tools`` kept."""
    from course_utils.chat import to_data_uri

    if "messages" not in record:
        raise DataFormatError("text", "la Plateforme's fine-tuning files take chat rows (messages) only")
    images = iter(record.get("images") or [])
    messages = []
    for message in record["messages"]:
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if part["type"] == "image":
                    image = _image_as_text(next(images))
                    if not image.startswith(("http://", "https://", "data:")):
                        image = to_data_uri(resolve_image_path(image, base_dir))
                    parts.append({"type": "image_url", "image_url": image})
                else:
                    parts.append({"type": "text", "text": part["text"]})
            content = parts
        out = {"role": message["role"], "content": content}
        if content is None:
            del out["content"]
        for key in ("tool_calls", "tool_call_id", "name", "weight"):
            if key in message:
                out[key] = message[key]
        messages.append(out)
    row = {"messages": messages}
    if record.get("tools"):
        row["tools"] = record["tools"]
    return row


def check_plateforme(row: dict) -> list[str]:
    """la Plateforme's documented dataset rules for one row: problems as readable strings."""
    problems = []
    messages = row.get("messages")
    if set(row) - {"messages", "tools"}:
        problems.append(f"unexpected top-level keys {_shown_all(sorted(set(row) - {'messages', 'tools'}))}")
    if not isinstance(messages, list) or not messages:
        return problems + ["messages: missing or empty"]
    for i, message in enumerate(messages):
        role = message.get("role")
        if role not in ("system", "user", "assistant", "tool"):
            problems.append(f"messages[{i}].role: {_shown(role)} is not system/user/assistant/tool")
        if "weight" in message and (role != "assistant" or message["weight"] not in (0, 1)):
            problems.append(f"messages[{i}].weight: only assistant messages may have weight 0 or 1")
        if role == "tool" and not message.get("tool_call_id"):
            problems.append(f"messages[{i}].tool_call_id: a tool message needs the id of the call it answers")
        content = message.get("content")
        if role == "assistant" and message.get("tool_calls") and content in (None, ""):
            continue  # Mistral's documented function-calling rows: a call needs no text
        if isinstance(content, list):
            for j, part in enumerate(content):
                if part.get("type") == "image_url" and not isinstance(part.get("image_url"), str):
                    problems.append(f"messages[{i}].content[{j}].image_url: must be a URL or data URI string")
                elif part.get("type") not in ("text", "image_url"):
                    problems.append(
                        f"messages[{i}].content[{j}].type: {_shown(part.get('type'))} not allowed"
                    )
        elif not isinstance(content, str) or not content:
            problems.append(f"messages[{i}].content: must be a non-empty string or a list of parts")
    if messages[-1].get("role") != "assistant":
        problems.append("the last message must be an assistant message")
    return problems


# --- Templating and labels -----------------------------------------------------------------------


def with_images(record: dict, base_dir: Path | None = None) -> list[dict]:
    """The record's messages with each image part carrying its image (path → PIL), for the processor.

    Tool calls, tool results and their ids travel with their messages; ``weight`` does not (the
    template does not know it: :func:`tokenize_record` applies it to the labels)."""
    images = iter(record.get("images") or [])
    messages = []
    for message in record["messages"]:
        content = message.get("content")
        if isinstance(content, list):
            content = [
                dict(p, image=_image_source(next(images), base_dir)) if p.get("type") == "image" else p
                for p in content
            ]
        out = {"role": message["role"], "content": content}
        out.update({k: message[k] for k in ("tool_calls", "tool_call_id", "name") if k in message})
        messages.append(out)
    return messages


def _image_source(image, base_dir):
    """A PIL image from a record's image entry (relative paths resolve against ``base_dir``)."""
    from course_utils.chat import load_image

    if isinstance(image, dict):  # Hugging Face / Parquet: {"bytes": …, "path": …}
        if image.get("bytes"):
            from PIL import Image

            return Image.open(io.BytesIO(image["bytes"]))
        image = image.get("path")
    if isinstance(image, str) and not image.startswith(("http://", "https://", "data:")):
        return load_image(resolve_image_path(image, base_dir))
    return load_image(image)


def response_only_labels(input_ids: list[int], train_on_thinking: bool = True) -> list[int]:
    """Labels that train on assistant replies only: a reply runs from after ``[/INST]`` — or after
    ``[/TOOL_RESULTS]``, the answer to a tool's result — up to and including its ``</s>``; the system
    prompt, user turns, tool results and image tokens get -100. With ``train_on_thinking=False`` a
    reasoning trace ``[THINK]…[/THINK]`` (Small 4) is context too: the model learns the answer only.

    Structural (Mistral's v7 and v15 formats), so it works for vision rows too — transformers 5.17's
    ``return_assistant_tokens_mask`` marks the wrong tokens once images are expanded.
    """
    labels, inside, thinking = [], False, False
    for token in input_ids:
        if token in (INST_ID, TOOL_RESULTS_ID):  # the user's or a tool's words begin: no reply here
            inside = False
        if inside and token == THINK_ID:
            thinking = True
        learn = inside and not (thinking and not train_on_thinking)
        labels.append(token if learn else IGNORE_INDEX)
        if token == THINK_END_ID:
            thinking = False
        if token == EOS_ID:
            inside = False
        if token in (INST_END_ID, TOOL_RESULTS_END_ID):  # the model's turn starts after these
            inside = True
    return labels


CONTROL_IDS = {
    "[/INST]": INST_END_ID,
    "</s>": EOS_ID,
    "[INST]": INST_ID,
    "[TOOL_RESULTS]": TOOL_RESULTS_ID,
    "[/TOOL_RESULTS]": TOOL_RESULTS_END_ID,
    "[THINK]": THINK_ID,
    "[/THINK]": THINK_END_ID,
}


def check_control_ids(tokenizer) -> None:
    """Refuse a tokenizer whose control tokens sit at other ids than the labels assume (a non-Tekken
    vocabulary): one line naming the token. Tokens the tokenizer lacks (``[THINK]`` before v13) pass."""
    unknown = tokenizer.convert_tokens_to_ids(getattr(tokenizer, "unk_token", None) or "<unk>")
    for name, expected in CONTROL_IDS.items():
        found = tokenizer.convert_tokens_to_ids(name)
        if found not in (expected, None, unknown):
            raise ValueError(
                f"tokenizer {type(tokenizer).__name__}: {name} is id {found}, the labels expect {expected} "
                "(the Tekken vocabulary of Mistral Small 3.x/4); use that model's tokenizer"
            )


def tokenize_record(
    record: dict,
    processor,
    base_dir: Path | None = None,
    max_seq_length: int | None = None,
    train_on_thinking: bool = True,
) -> dict:
    """Template + tokenize one record and attach response-only ``labels``; assistant turns with
    ``weight: 0`` are context too (their labels are -100), and so are reasoning traces when
    ``train_on_thinking`` is False. A ``{"text": …}`` record trains on all of its tokens (``<s>`` text
    ``</s>``, as mistral-finetune's pretraining rows).

    Raises ``ValueError`` if no token is left to train on (the classic "losses are all 0").
    """
    if "messages" not in record and "text" in record:
        ids = [
            BOS_ID,
            *processor_tokenizer(processor)(
                record["text"], add_special_tokens=False, split_special_tokens=True
            )["input_ids"],
            EOS_ID,
        ]
        out: dict = {}
        labels = [IGNORE_INDEX, *ids[1:]]
    else:
        messages = with_images(record, base_dir)
        kwargs = template_kwargs(record, processor)
        if needs_text_segments(messages):  # typed control tokens stay text, as in mistral-common
            if record.get("images"):
                raise ValueError(
                    "control-token text (such as [INST]) in a row with images: the course encodes it as "
                    "text only in text rows; remove it or drop the images"
                )
            out = {}
            ids = encode_segments(
                processor_tokenizer(processor),
                text_segments(lambda m: processor.apply_chat_template(m, tokenize=False, **kwargs), messages),
            )
        else:
            out = processor.apply_chat_template(
                messages, tokenize=True, return_dict=True, return_tensors="pt", **kwargs
            )
            ids = out["input_ids"][0].tolist()
        check_control_ids(processor_tokenizer(processor))
        labels = _apply_weights(response_only_labels(ids, train_on_thinking), record["messages"])
    if max_seq_length is not None and len(ids) > max_seq_length:
        if "pixel_values" in out:
            raise ValueError(
                f"{len(ids)} tokens > max_seq_length {max_seq_length}: truncating would cut image tokens"
            )
        ids, labels = ids[:max_seq_length], labels[:max_seq_length]
    if all(label == IGNORE_INDEX for label in labels):
        raise ValueError(
            "every label is masked: nothing to train on (does the row end with an assistant reply, "
            "and did truncation cut it off?)"
        )
    example = {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}
    for key in ("pixel_values", "image_sizes"):
        if key in out:
            example[key] = out[key]
    return example


def template_kwargs(record: dict, processor) -> dict:
    """``apply_chat_template`` arguments for a record: its ``tools``, and for a tool conversation on a
    template that knows no tool calls (the v7 stand-in's) the course's tool-aware v7 template
    (:data:`course_utils.tiny.TOOLS_CHAT_TEMPLATE`, token-identical to mistral-common's encoding)."""
    kwargs = {"tools": record["tools"]} if record.get("tools") else {}
    uses_tools = record.get("tools") or any(
        m.get("tool_calls") or m.get("role") == "tool" for m in record.get("messages", [])
    )
    own = getattr(processor, "chat_template", None) or processor_tokenizer(processor).chat_template or ""
    if uses_tools and "tool_calls" not in own:
        from course_utils.tiny import TOOLS_CHAT_TEMPLATE

        kwargs["chat_template"] = TOOLS_CHAT_TEMPLATE
    return kwargs


def processor_tokenizer(processor):
    """The text tokenizer of a processor (or the tokenizer itself)."""
    return getattr(processor, "tokenizer", processor)


def _apply_weights(labels: list[int], messages: list[dict]) -> list[int]:
    """Mask the trained spans of assistant turns with ``weight: 0`` (the k-th span is the k-th
    assistant turn). Rows whose spans do not map one-to-one onto assistant turns are refused rather
    than trained wrongly."""
    weights = [m.get("weight", 1) for m in messages if m.get("role") == "assistant"]
    if all(w == 1 for w in weights):
        return labels
    spans, start = [], None
    for position, label in enumerate(labels):
        if label != IGNORE_INDEX and start is None:
            start = position
        if label == EOS_ID and start is not None:
            spans.append((start, position + 1))
            start = None
    if start is not None:
        spans.append((start, len(labels)))
    if len(spans) != len(weights):
        raise ValueError(
            f"cannot apply per-turn weights: {len(weights)} assistant turns but {len(spans)} trained spans "
            "(an assistant turn with no trained token, e.g. a reply that is only a [THINK] trace while "
            "train_on_thinking is False)"
        )
    labels = list(labels)
    for (begin, end), weight in zip(spans, weights):
        if weight == 0:
            labels[begin:end] = [IGNORE_INDEX] * (end - begin)
    return labels


def _template_messages(record: dict) -> list[dict]:
    """The record's messages for templating without decoding pixels (weights left out)."""
    return [{k: v for k, v in m.items() if k != "weight"} for m in record["messages"]]


def count_tokens(record: dict, processor, base_dir: Path | None = None) -> int:
    """Sequence length of a record without decoding pixels: text tokens + each image's token cost."""
    from course_utils.chat import image_token_cost

    if "messages" not in record and "text" in record:
        tokenizer = processor_tokenizer(processor)
        return (
            len(tokenizer(record["text"], add_special_tokens=False, split_special_tokens=True)["input_ids"])
            + 2
        )
    kwargs = template_kwargs(record, processor)
    if needs_text_segments(record["messages"]) and not record.get("images"):
        render = lambda m: processor.apply_chat_template(m, tokenize=False, **kwargs)  # noqa: E731
        return len(
            encode_segments(processor_tokenizer(processor), text_segments(render, _template_messages(record)))
        )
    rendered = processor.apply_chat_template(
        _template_messages(record), tokenize=False, **kwargs
    )  # one [IMG] per image
    ids = processor.tokenizer(rendered, add_special_tokens=False)["input_ids"]
    total = len(ids)
    for image in record.get("images") or []:
        img = _image_source(image, base_dir) if not hasattr(image, "size") else image
        total += image_token_cost(*img.size, processor=processor) - 1
    return total


def render_label_mask(example: dict, tokenizer, html: bool = False, max_tokens: int = 400) -> str:
    """Show which tokens are trained on: ``[[trained]]`` in text, green vs grey spans in HTML."""
    import html as html_lib

    pieces = []
    for token, label in list(zip(example["input_ids"], example["labels"]))[:max_tokens]:
        text = tokenizer.decode([token])
        if html:
            color = "#c8f7c5" if label != IGNORE_INDEX else "#eeeeee"
            pieces.append(
                f'<span style="background:{color};white-space:pre-wrap">{html_lib.escape(text)}</span>'
            )
        else:
            pieces.append(f"[[{text}]]" if label != IGNORE_INDEX else text)
    if not html:
        import re

        text = "".join(pieces).replace("]][[", "")  # one bracket pair per trained span
        return re.sub(r"(\[IMG\])+", lambda m: f"[IMG]x{len(m.group(0)) // 5}", text)
    return "<div style='font-family:monospace;line-height:1.8'>" + "".join(pieces) + "</div>"


# --- Statistics and splits -----------------------------------------------------------------------


def length_stats(lengths: list[int], max_seq_length: int | None = None, multiple: int = 64) -> dict:
    """Percentiles, a recommended ``max_seq_length`` (p99 rounded up) and how many rows it would cut."""
    if not lengths:
        raise ValueError("no lengths given")
    ordered = sorted(lengths)

    def pct(p: float) -> int:
        return ordered[min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1)]

    recommended = int(math.ceil(pct(99) / multiple) * multiple)
    limit = max_seq_length or recommended
    return {
        "count": len(ordered),
        "min": ordered[0],
        "p50": pct(50),
        "p90": pct(90),
        "p95": pct(95),
        "p99": pct(99),
        "max": ordered[-1],
        "mean": round(sum(ordered) / len(ordered), 1),
        "recommended_max_seq_length": recommended,
        "max_seq_length": limit,
        "truncated": sum(length > limit for length in ordered),
    }


def split_records(
    records: list[dict], fractions: tuple[float, float, float] = (0.8, 0.1, 0.1), seed: int = 0
) -> tuple[dict[str, list[dict]], int]:
    """Deterministic train/val/test split after removing exact duplicates (so none leaks across splits).

    Assignment depends only on each record's content hash and the seed, not on file order.
    Returns the splits and how many duplicates were removed.
    """
    if abs(sum(fractions) - 1) > 1e-9:
        raise ValueError(f"fractions must sum to 1, got {fractions}")
    unique: dict[str, dict] = {}
    for record in records:
        unique.setdefault(record_key(record), record)
    removed = len(records) - len(unique)
    keys = sorted(unique, key=lambda k: hashlib.sha256(f"{seed}:{k}".encode()).hexdigest())
    n = len(keys)
    n_train = round(n * fractions[0])
    n_val = round(n * fractions[1])
    parts = {"train": keys[:n_train], "val": keys[n_train : n_train + n_val], "test": keys[n_train + n_val :]}
    return {name: [unique[k] for k in ks] for name, ks in parts.items()}, removed


def save_splits(
    splits: dict[str, list[dict]],
    out_dir: str | os.PathLike,
    base_dir: Path | None = None,
    overwrite: bool = False,
) -> dict[str, str]:
    """Write ``{split}.jsonl`` files for the next lesson; identical files are left alone, different
    existing ones are never replaced unless ``overwrite`` — each file's fate is returned."""
    out = Path(out_dir)
    candidates = {}
    for name, records in splits.items():  # every split written aside first: all replaced, or none
        tmp = out / f".{name}.candidate.jsonl"
        if tmp.exists():
            tmp.unlink()
        write_jsonl(records, tmp, base_dir=base_dir, allow_empty=True)  # a small set's empty split
        candidates[name] = (out / f"{name}.jsonl", tmp)
    status = {}
    for name, (target, tmp) in candidates.items():
        if target.exists() and target.read_bytes() == tmp.read_bytes():
            status[name] = "unchanged"
        else:
            status[name] = "replaced" if target.exists() else "written"
    conflicts = [str(target) for name, (target, _) in candidates.items() if status[name] == "replaced"]
    if conflicts and not overwrite:
        for _, tmp in candidates.values():
            tmp.unlink()
        raise FileExistsError(
            f"{', '.join(conflicts)} exist(s) with different content; pass overwrite=True to replace "
            "(nothing was written)"
        )
    for name, (target, tmp) in candidates.items():
        if status[name] == "unchanged":
            tmp.unlink()
        else:
            os.replace(tmp, target)
    return status
