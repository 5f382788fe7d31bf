"""Make a learner's data safe to train on: one schema, converters, validation that never loses a row,

Backs lesson 03.

response-only labels, token statistics and leak-free splits.

The canonical record (what every converter produces and training consumes)::

    {"messages": [{"role": "system"|"user"|"assistant",
                   "content": "text" | [{"type": "text", "text": …}, {"type": "image"}, …]}, …],
     "images": ["path/or/url", …]}          # one entry per {"type": "image"} part, in order

Everything that reports a problem says ``file:row:field: reason`` (rows are 1-based line numbers).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from course_utils.chat import contains_control_tokens
from course_utils.paths import staged

ROLES = ("system", "user", "assistant")
IGNORE_INDEX = -100  # label value that the loss skips
INST_END_ID, EOS_ID = 4, 2  # [/INST] and </s> in the Tekken vocabulary


class DataFormatError(ValueError):
    """A row could not be understood; the message names the field."""

    def __init__(self, field_name: str, reason: str):
        super().__init__(f"{field_name}: {reason}")
        self.field, self.reason = field_name, reason


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


def from_alpaca(row: dict, system: str | None = None) -> dict:
    """``instruction`` (+ optional ``input``) → user, ``output`` → assistant."""
    for key in ("instruction", "output"):
        if key not in row:
            raise DataFormatError(key, "missing (Alpaca rows need instruction and output)")
    user = row["instruction"] if not row.get("input") else f"{row['instruction']}\n\n{row['input']}"
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]
    images = [row["image"]] if row.get("image") else []
    if images:
        messages[-2]["content"] = [{"type": "image"}, {"type": "text", "text": user}]
    return {"messages": messages, "images": images}


_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "chatgpt": "assistant",
    "bing": "assistant",
}


def from_sharegpt(row: dict) -> dict:
    """``conversations: [{from: human|gpt|system, value}]``, with ``<image>`` placeholders."""
    turns = row.get("conversations")
    if not isinstance(turns, list):
        raise DataFormatError("conversations", "missing or not a list")
    messages = []
    for i, turn in enumerate(turns):
        who = turn.get("from") if isinstance(turn, dict) else None
        if who not in _SHAREGPT_ROLES:
            raise DataFormatError(f"conversations[{i}].from", f"unknown speaker {who!r}")
        messages.append(
            {"role": _SHAREGPT_ROLES[who], "content": _text_parts_with_images(turn.get("value", ""))}
        )
    images = row.get("images") or ([row["image"]] if row.get("image") else [])
    return {"messages": messages, "images": list(images)}


def from_openai(row: dict) -> dict:
    """OpenAI chat format: ``image_url`` parts (URL or data URI) become image parts + ``images``."""
    messages_in = row.get("messages")
    if not isinstance(messages_in, list):
        raise DataFormatError("messages", "missing or not a list")
    messages, images = [], list(row.get("images") or [])
    for i, message in enumerate(messages_in):
        if not isinstance(message, dict):
            raise DataFormatError(f"messages[{i}]", "not an object")
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "image_url":
                    url = (
                        part["image_url"]["url"]
                        if isinstance(part.get("image_url"), dict)
                        else part.get("image_url")
                    )
                    images.append(url)
                    parts.append({"type": "image"})
                elif kind == "image":
                    if part.get("image") is not None:
                        images.append(part["image"])
                    parts.append({"type": "image"})
                elif kind == "text":
                    parts.append({"type": "text", "text": part.get("text")})
                else:
                    raise DataFormatError(
                        f"messages[{i}].content[{j}].type", f"unsupported part type {kind!r}"
                    )
            content = parts
        messages.append({"role": message.get("role"), "content": content})
    return {"messages": messages, "images": images}


def from_plateforme(row: dict) -> dict:
    """Mistral la Plateforme fine-tuning JSONL (OpenAI-like; ``weight`` on assistant turns is dropped)."""
    return from_openai(row)


def detect_format(row: dict) -> str:
    """Which converter a row needs: ``alpaca``, ``sharegpt`` or ``openai`` (also canonical/Plateforme)."""
    if "conversations" in row:
        return "sharegpt"
    if "messages" in row:
        return "openai"
    if "instruction" in row and "output" in row:
        return "alpaca"
    raise DataFormatError(
        "(row)",
        f"unknown format: keys {sorted(row)[:6]} — expected messages, conversations or instruction/output",
    )


CONVERTERS = {
    "alpaca": from_alpaca,
    "sharegpt": from_sharegpt,
    "openai": from_openai,
    "plateforme": from_plateforme,
}


def to_canonical(row: dict, fmt: str = "auto") -> dict:
    fmt = detect_format(row) if fmt == "auto" else fmt
    if fmt not in CONVERTERS:
        raise DataFormatError("(format)", f"unknown format {fmt!r}; use one of auto, {', '.join(CONVERTERS)}")
    record = CONVERTERS[fmt](row)
    if "id" in row:
        record["id"] = row["id"]
    return record


def from_hf_dataset(dataset: Iterable[dict], fmt: str = "auto") -> list[dict]:
    """Rows of a Hugging Face ``datasets.Dataset`` (or any iterable of dicts) → canonical records.

    PIL images in ``image``/``images`` columns are kept as objects (they are already loaded).
    """
    return [to_canonical(dict(row), fmt) for row in dataset]


# --- Validation ----------------------------------------------------------------------------------


@dataclass
class Issue:
    file: str
    row: int
    field: str
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.row}:{self.field}: {self.reason}"


@dataclass
class ValidationReport:
    file: str
    total: int = 0
    valid: list[dict] = field(default_factory=list)
    valid_rows: list[int] = field(default_factory=list)
    issues: list[Issue] = field(default_factory=list)
    fixes: list[str] = field(default_factory=list)

    @property
    def invalid_rows(self) -> list[int]:
        return sorted({i.row for i in self.issues})

    @property
    def ok(self) -> bool:
        return not self.issues

    def summary(self) -> str:
        return (
            f"{self.file}: {self.total} rows, {len(self.valid)} valid, {len(self.invalid_rows)} invalid "
            f"({len(self.issues)} problems), {len(self.fixes)} fixes applied"
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


def check_record(record: dict, base_dir: Path | None = None) -> list[tuple[str, str]]:
    """Problems of one canonical record as (field, reason) pairs; empty when it is fine."""
    problems: list[tuple[str, str]] = []
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        return [("messages", "missing or empty")]
    expected = "user"
    image_parts = 0
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ROLES:
            problems.append((f"{where}.role", f"unknown role {role!r}; use system, user or assistant"))
            expected = "assistant" if expected == "user" else "user"  # one problem, not a cascade
            continue
        if role == "system":
            if i != 0:
                problems.append((f"{where}.role", "system message must come first"))
        elif role != expected:
            problems.append((f"{where}.role", f"expected {expected} (user and assistant must alternate)"))
        else:
            expected = "assistant" if role == "user" else "user"
        content = message.get("content")
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
                    problems.append((f"{where}.content[{j}].type", f"unsupported part type {kind!r}"))
        elif not isinstance(content, str):
            problems.append(
                (f"{where}.content", f"must be a string or a list of parts, got {type(content).__name__}")
            )
        elif not content.strip():
            problems.append((f"{where}.content", "empty"))
        for suffix, text in _text_of(content) if isinstance(content, (str, list)) else []:
            found = contains_control_tokens(text) if isinstance(text, str) else []
            if found:
                problems.append(
                    (
                        f"{where}.content{suffix}",
                        f"contains control token(s) {found}: they would become real special tokens",
                    )
                )
    if isinstance(messages[-1], dict) and messages[-1].get("role") in ("system", "user"):
        problems.append(
            (f"messages[{len(messages) - 1}].role", "the conversation must end with an assistant reply")
        )
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


def _check_image(image, base_dir: Path | None) -> str | None:
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
            return f"data URI does not decode to an image ({exc})"
    path = resolve_image_path(image, base_dir)
    if not path.is_file():
        return f"file not found: {image}"
    try:
        from PIL import Image

        with Image.open(path) as img:
            img.verify()
    except Exception as exc:
        return f"cannot be read as an image ({type(exc).__name__}): {image}"
    return None


def resolve_image_path(image: str, base_dir: Path | None) -> Path:
    path = Path(image)
    return path if path.is_absolute() or base_dir is None else base_dir / path


@lru_cache(maxsize=8192)
def _file_digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _image_identity(image) -> str:
    """An image's identity: the bytes of a local file (so the key does not depend on where the
    checkout lives), else the URL / data URI / description itself."""
    if (
        isinstance(image, str)
        and not image.startswith(("http://", "https://", "data:"))
        and Path(image).is_file()
    ):
        return "sha256:" + _file_digest(str(Path(image).resolve()))
    return str(image)


def record_key(record: dict) -> str:
    """A content hash of messages + images, for duplicate detection and leak-free splits."""
    payload = json.dumps(
        {"m": record.get("messages"), "i": [_image_identity(i) for i in record.get("images") or []]},
        sort_keys=True,
        ensure_ascii=False,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def _strip_whitespace(record: dict) -> list[str]:
    changed = []
    for i, message in enumerate(record["messages"]):
        content = message.get("content")
        if isinstance(content, str) and content != content.strip():
            message["content"] = content.strip()
            changed.append(f"messages[{i}].content")
        elif isinstance(content, list):
            for j, part in enumerate(content):
                if (
                    part.get("type") == "text"
                    and isinstance(part.get("text"), str)
                    and part["text"] != part["text"].strip()
                ):
                    part["text"] = part["text"].strip()
                    changed.append(f"messages[{i}].content[{j}].text")
    return changed


def validate_rows(
    rows: Iterable[tuple[int, object]],
    file: str,
    *,
    fmt: str = "auto",
    base_dir: Path | None = None,
    processor=None,
    max_seq_length: int | None = None,
    strip_whitespace: bool = False,
    drop_duplicates: bool = False,
) -> ValidationReport:
    """Validate (row number, raw line or dict) pairs; valid rows are kept, invalid ones reported."""
    report = ValidationReport(file)
    seen: dict[str, int] = {}
    for row_number, raw in rows:
        report.total += 1
        issues = []
        try:
            row = json.loads(raw.strip()) if isinstance(raw, str) else raw
            if not isinstance(row, dict):
                raise DataFormatError("(row)", f"expected a JSON object, got {type(row).__name__}")
            record = to_canonical(row, fmt)
        except json.JSONDecodeError as exc:
            report.issues.append(
                Issue(file, row_number, "(json)", f"bad JSON: {exc.msg} at column {exc.colno}")
            )
            continue
        except DataFormatError as exc:
            report.issues.append(Issue(file, row_number, exc.field, exc.reason))
            continue
        if strip_whitespace:
            for field_name in _strip_whitespace(record):
                report.fixes.append(f"{file}:{row_number}:{field_name}: stripped leading/trailing whitespace")
        for field_name, reason in check_record(record, base_dir):
            issues.append(Issue(file, row_number, field_name, reason))
        key = record_key(record)
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
            length = count_tokens(record, processor, base_dir)
            if length > max_seq_length:
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
    return report


def validate_file(path: str | os.PathLike, **kwargs) -> ValidationReport:
    """Validate a JSONL file line by line (images resolve relative to the file's folder)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, encoding="utf-8") as f:
        lines = [(n, line) for n, line in enumerate(f, start=1) if line.strip()]
    kwargs.setdefault("base_dir", path.parent)
    return validate_rows(lines, str(path), **kwargs)


def write_jsonl(
    records: Iterable[dict], path: str | os.PathLike, overwrite: bool = False, base_dir: Path | None = None
) -> Path:
    """Write records atomically; refuse to replace an existing file unless ``overwrite``.

    With ``base_dir`` (where the records' relative image paths point), image paths are rewritten
    relative to the new file, so the written dataset still finds its images.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; choose another name or pass overwrite=True (--overwrite)")
    with staged(path, overwrite) as tmp, tmp.open("w", encoding="utf-8") as f:
        for record in records:
            record = _jsonable(record)
            if base_dir is not None and record.get("images"):
                record["images"] = [_relocate(i, base_dir, path.parent) for i in record["images"]]
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def _relocate(image: str, old_base: Path, new_base: Path) -> str:
    if image.startswith(("http://", "https://", "data:", "<")) or Path(image).is_absolute():
        return image
    return os.path.relpath(Path(old_base).resolve() / image, Path(new_base).resolve())


def _jsonable(record: dict) -> dict:
    out = dict(record)
    if out.get("images"):
        out["images"] = [i if isinstance(i, str) else "<in-memory image>" for i in out["images"]]
    return out


# --- la Plateforme export ------------------------------------------------------------------------


def to_plateforme(record: dict, base_dir: Path | None = None) -> dict:
    """A canonical record as Mistral la Plateforme fine-tuning JSONL: images inlined as data URIs."""
    from course_utils.chat import to_data_uri

    images = iter(record.get("images") or [])
    messages = []
    for message in record["messages"]:
        content = message["content"]
        if isinstance(content, list):
            parts = []
            for part in content:
                if part["type"] == "image":
                    image = next(images)
                    if isinstance(image, str) and not image.startswith(("http://", "https://", "data:")):
                        image = resolve_image_path(image, base_dir)
                    url = (
                        image
                        if isinstance(image, str) and image.startswith(("http", "data:"))
                        else to_data_uri(image)
                    )
                    parts.append({"type": "image_url", "image_url": url})
                else:
                    parts.append({"type": "text", "text": part["text"]})
            content = parts
        messages.append({"role": message["role"], "content": content})
    return {"messages": messages}


def check_plateforme(row: dict) -> list[str]:
    """la Plateforme's documented dataset rules for one row: problems as readable strings."""
    problems = []
    messages = row.get("messages")
    if set(row) - {"messages", "tools"}:
        problems.append(f"unexpected top-level keys {sorted(set(row) - {'messages', 'tools'})}")
    if not isinstance(messages, list) or not messages:
        return problems + ["messages: missing or empty"]
    for i, message in enumerate(messages):
        role = message.get("role")
        if role not in ("system", "user", "assistant", "tool"):
            problems.append(f"messages[{i}].role: {role!r} is not system/user/assistant/tool")
        if "weight" in message and (role != "assistant" or message["weight"] not in (0, 1)):
            problems.append(f"messages[{i}].weight: only assistant messages may have weight 0 or 1")
        content = message.get("content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                if part.get("type") == "image_url" and not isinstance(part.get("image_url"), str):
                    problems.append(f"messages[{i}].content[{j}].image_url: must be a URL or data URI string")
                elif part.get("type") not in ("text", "image_url"):
                    problems.append(f"messages[{i}].content[{j}].type: {part.get('type')!r} not allowed")
        elif not isinstance(content, str) or not content:
            problems.append(f"messages[{i}].content: must be a non-empty string or a list of parts")
    if messages[-1].get("role") != "assistant":
        problems.append("the last message must be an assistant message")
    return problems


# --- Templating and labels -----------------------------------------------------------------------


def with_images(record: dict, base_dir: Path | None = None) -> list[dict]:
    """The record's messages with each image part carrying its image (path → PIL), for the processor."""
    images = iter(record.get("images") or [])
    messages = []
    for message in record["messages"]:
        content = message["content"]
        if isinstance(content, list):
            content = [
                dict(p, image=_image_source(next(images), base_dir)) if p.get("type") == "image" else p
                for p in content
            ]
        messages.append({"role": message["role"], "content": content})
    return messages


def _image_source(image, base_dir):
    """A PIL image from a record's image entry (relative paths resolve against ``base_dir``)."""
    from course_utils.chat import load_image

    if isinstance(image, str) and not image.startswith(("http://", "https://", "data:")):
        return load_image(resolve_image_path(image, base_dir))
    return load_image(image)


def response_only_labels(input_ids: list[int]) -> list[int]:
    """Labels that train on assistant replies only: each reply runs from after ``[/INST]`` up to and
    including its ``</s>``; the system prompt, user turns and image tokens get -100.

    Structural (v7 format), so it works for vision rows too — transformers 5.17's
    ``return_assistant_tokens_mask`` marks the wrong tokens once images are expanded.
    """
    labels, inside = [], False
    for token in input_ids:
        if inside:
            labels.append(token)
            if token == EOS_ID:
                inside = False
        else:
            labels.append(IGNORE_INDEX)
            if token == INST_END_ID:
                inside = True
    return labels


def tokenize_record(
    record: dict, processor, base_dir: Path | None = None, max_seq_length: int | None = None
) -> dict:
    """Template + tokenize one record and attach response-only ``labels``.

    Raises ``ValueError`` if no token is left to train on (the classic "losses are all 0").
    """
    messages = with_images(record, base_dir)
    out = processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt")
    ids = out["input_ids"][0].tolist()
    labels = response_only_labels(ids)
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


def count_tokens(record: dict, processor, base_dir: Path | None = None) -> int:
    """Sequence length of a record without decoding pixels: text tokens + each image's token cost."""
    from course_utils.chat import image_token_cost

    rendered = processor.apply_chat_template(record["messages"], tokenize=False)  # one [IMG] per image
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
    status = {}
    for name, records in splits.items():
        target = out / f"{name}.jsonl"
        tmp = out / f".{name}.candidate.jsonl"
        if tmp.exists():
            tmp.unlink()
        write_jsonl(records, tmp, base_dir=base_dir)
        if target.exists() and target.read_bytes() == tmp.read_bytes():
            tmp.unlink()
            status[name] = "unchanged"
        elif target.exists() and not overwrite:
            tmp.unlink()
            raise FileExistsError(
                f"{target} exists with different content; pass overwrite=True to replace it"
            )
        else:
            status[name] = "replaced" if target.exists() else "written"
            os.replace(tmp, target)
    return status
