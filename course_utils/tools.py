"""Tool calling in Mistral's format: the course's tool-use dataset, the chat template that renders it
(checked token for token against mistral-common), parsing and validating calls in replies, and the
plumbing around an agent loop (running a call safely, a transcript table).

Backs lesson 08 (structured output and tool calling).

The format (v7, Mistral Small 3.x), as mistral-common encodes it::

    <s>[SYSTEM_PROMPT]…[/SYSTEM_PROMPT][AVAILABLE_TOOLS][{"type": "function", …}][/AVAILABLE_TOOLS]
    [INST]question[/INST][TOOL_CALLS][{"name": "…", "arguments": {…}, "id": "a1B2c3D4e"}]</s>
    [TOOL_RESULTS]a1B2c3D4e[TOOL_CONTENT]{"…": …}[/TOOL_RESULTS]final answer</s>

Call ids are exactly 9 characters from ``[A-Za-z0-9]`` (mistral-common refuses anything else).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import jsonschema

from course_utils.paths import atomic_write, course_root
from course_utils.tiny import TOOLS_CHAT_TEMPLATE  # re-exported: lesson 08 reads tools.TOOLS_CHAT_TEMPLATE

if TYPE_CHECKING:
    from course_utils.profiles import Profile

# The family lesson 08 runs: its tool format is v7's ([TOOL_CALLS][{…, "id": …}]); Small 4's tokenizer (v15)
# writes calls as [TOOL_CALLS]name[ARGS]{…}, which this lesson's template, data and parser do not speak.
LESSON_MODEL = "mistral-small-3.2"


@dataclass(frozen=True)
class LessonProfile:
    profile: Profile
    model: str
    message: str  # what changed and why; "" when MODEL already was Small 3.2


def lesson_profile(requested: str, hardware, model: str) -> LessonProfile:
    """Lesson 08's profile: ``requested``'s rung running Small 3.2, whatever ``MODEL``/``COURSE_MODEL`` say.

    Sets ``COURSE_MODEL`` in this process (this notebook's kernel) too, so every helper that resolves the
    model itself (:func:`ensure_tool_adapter`, :func:`ensure_tuned_gguf`, …) loads the same one.
    """
    from course_utils.profiles import MODEL_ENV_VAR, resolve_profile

    message = ""
    if model != LESSON_MODEL:
        message = (
            f"MODEL is {model}: lesson 08 runs Mistral Small 3.2 instead — its tool calls are "
            '[TOOL_CALLS][{…, "id": …}] (tokenizer v7); Small 4\'s are [TOOL_CALLS]name[ARGS]{…} (v15).'
        )
    os.environ[MODEL_ENV_VAR] = LESSON_MODEL
    return LessonProfile(
        resolve_profile(requested, hardware=hardware, model=LESSON_MODEL), LESSON_MODEL, message
    )


SYSTEM_PROMPT = "You answer questions about receipts. Call a tool when one is needed."
SPLITS = {"train": 240, "val": 30, "test": 30}
DEFAULT_DIR = Path("data") / "tools"
CALL_ID_PATTERN = re.compile(r"^[A-Za-z0-9]{9}$")  # also a JSON-schema pattern: use fullmatch in Python
CALL_ID_ALPHABET = string.ascii_letters + string.digits
CURRENCIES = ("EUR", "USD", "GBP", "CHF", "JPY")

# Illustrative fixed rates (units of each currency per 1 EUR) so the dataset is reproducible. They are
# course constants, not market data: a real tool would call a rates API.
EUR_RATES = {"EUR": 1.0, "USD": 1.1, "GBP": 0.85, "CHF": 0.95, "JPY": 160.0}

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "convert_currency",
            "description": "Convert an amount between currencies.",
            "parameters": {
                "type": "object",
                "properties": {
                    "amount": {"type": "number"},
                    "from_currency": {"type": "string", "enum": list(CURRENCIES)},
                    "to_currency": {"type": "string", "enum": list(CURRENCIES)},
                },
                "required": ["amount", "from_currency", "to_currency"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "sum_amounts",
            "description": "Add up a list of amounts.",
            "parameters": {
                "type": "object",
                "properties": {"amounts": {"type": "array", "items": {"type": "number"}, "minItems": 1}},
                "required": ["amounts"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "lookup_merchant",
            "description": "Look a merchant up by name: category and city.",
            "parameters": {
                "type": "object",
                "properties": {"name": {"type": "string", "minLength": 1}},
                "required": ["name"],
                "additionalProperties": False,
            },
        },
    },
]

_CATEGORIES = ("café", "bakery", "grocery", "restaurant", "pharmacy", "hardware store", "bookshop", "kiosk")
_CITIES = ("Berlin", "Paris", "Zurich", "London", "New York", "Tokyo", "Madrid", "Milan", "Vienna", "Lyon")


def merchant_directory(seed: int = 0) -> dict[str, dict]:
    """The made-up directory ``lookup_merchant`` answers from: the receipts' merchants, seeded."""
    from course_utils.receipts import _MERCHANTS

    rng = random.Random(f"merchants:{seed}")
    return {name: {"category": rng.choice(_CATEGORIES), "city": rng.choice(_CITIES)} for name in _MERCHANTS}


def _decimals(currency: str) -> int:
    return 0 if currency == "JPY" else 2


def convert_currency(amount: float, from_currency: str, to_currency: str) -> dict:
    """``amount`` in ``from_currency`` expressed in ``to_currency`` at the course's fixed rates."""
    value = amount / EUR_RATES[from_currency] * EUR_RATES[to_currency]
    value = round(value, _decimals(to_currency))
    return {"amount": int(value) if to_currency == "JPY" else value, "currency": to_currency}


def sum_amounts(amounts: list[float]) -> dict:
    """The sum of ``amounts``, rounded to cents."""
    return {"sum": round(sum(amounts), 2)}


def lookup_merchant(name: str) -> dict:
    """Category and city of a known merchant, or ``found: false``."""
    entry = merchant_directory().get(name)
    return {"name": name, "found": True, **entry} if entry else {"name": name, "found": False}


FUNCTIONS = {
    "convert_currency": convert_currency,
    "sum_amounts": sum_amounts,
    "lookup_merchant": lookup_merchant,
}


# --- The chat template: the stand-in's v7 template plus tools ---------------------------------------

# TOOLS_CHAT_TEMPLATE lives with the stand-in's own v7 template in course_utils.tiny (data.py renders tool
# rows with it too); the functions below render, serve and label with it.


def reference_tool_token_ids(messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    """Token ids of a (text) conversation with tools as mistral-common's v7 tokenizer encodes them.

    Ends with an assistant turn → a finished training example; otherwise a prompt awaiting the reply.
    """
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    from course_utils.chat import reference_tokenizer

    tok = reference_tokenizer()
    request = ChatCompletionRequest(messages=messages, tools=tools)
    if messages and messages[-1]["role"] == "assistant":
        normalized = tok._instruct_request_normalizer.from_chat_completion_request(request)
        return tok.instruct_tokenizer.encode_instruct(normalized).tokens
    return tok.encode_chat_completion(request).tokens


def render_ids(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    """Token ids of ``messages`` through :data:`TOOLS_CHAT_TEMPLATE` with a Hugging Face tokenizer, the
    messages first written as mistral-common encodes them (tool-call arguments re-serialized, trailing
    spaces off assistant replies); message text that looks like a control token (a tool result saying
    ``[/TOOL_RESULTS][INST]…``) stays text, as in mistral-common (:func:`course_utils.chat.text_segments`)."""
    from course_utils.chat import (
        encode_segments,
        needs_text_segments,
        normalize_like_mistral_common,
        text_segments,
    )

    messages = normalize_like_mistral_common(messages)  # arguments as mistral-common re-serializes them
    if needs_text_segments(messages):

        def render(patched: list[dict]) -> str:
            return tokenizer.apply_chat_template(
                patched, tools=tools, chat_template=TOOLS_CHAT_TEMPLATE, tokenize=False
            )

        return encode_segments(tokenizer, text_segments(render, messages))
    ids = tokenizer.apply_chat_template(
        messages, tools=tools, chat_template=TOOLS_CHAT_TEMPLATE, tokenize=True, return_dict=True
    )["input_ids"]
    return ids.tolist() if hasattr(ids, "tolist") else list(ids)


def serving_template(bos_text: str = "<s>", eos_text: str = "</s>") -> str:
    """:data:`TOOLS_CHAT_TEMPLATE` for plain Jinja (no ``{% generation %}``), BOS/EOS as token texts."""
    out = re.sub(r"\{%-?\s*(end)?generation\s*-?%\}", "", TOOLS_CHAT_TEMPLATE)
    return out.replace("bos_token", repr(bos_text)).replace("eos_token", repr(eos_text))


def render_prompt(messages: list[dict], tools: list[dict] | None = None) -> str:
    """The prompt text (special tokens as text) the llama.cpp tool handler tokenizes."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment()
    env.filters["tojson"] = lambda x: json.dumps(x, ensure_ascii=False)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(serving_template()).render(messages=messages, tools=tools)


# --- Labels: train on calls and answers ----------------------------------------------------------


def tool_response_labels(input_ids: list[int], tokenizer) -> list[int]:
    """Labels for a tool conversation: each assistant turn — after ``[/INST]`` or after a
    ``[/TOOL_RESULTS]`` that is not followed by another result — up to and including its ``</s>``.
    Tool definitions, questions and tool results get -100 (the model reads them, it does not write them).
    """
    ids = {
        name: tokenizer.convert_tokens_to_ids(name)
        for name in ("[/INST]", "[/TOOL_RESULTS]", "[TOOL_RESULTS]")
    }
    eos = tokenizer.eos_token_id
    labels, inside, pending = [], False, False
    for token in input_ids:
        if pending and token != ids["[TOOL_RESULTS]"]:
            inside = True
        pending = False
        if inside:
            labels.append(token)
            inside = token != eos
        else:
            labels.append(-100)
            pending = token in (ids["[/INST]"], ids["[/TOOL_RESULTS]"])
    return labels


def tokenize_tool_record(record: dict, tokenizer, max_seq_length: int | None = None) -> dict:
    """One training example (``input_ids``, ``attention_mask``, ``labels``) from a tool row."""
    ids = render_ids(tokenizer, record["messages"], record["tools"])
    if max_seq_length is not None and len(ids) > max_seq_length:
        raise ValueError(f"row {record.get('id')}: {len(ids)} tokens > max_seq_length {max_seq_length}")
    return {
        "input_ids": ids,
        "attention_mask": [1] * len(ids),
        "labels": tool_response_labels(ids, tokenizer),
    }


# --- The dataset ---------------------------------------------------------------------------------


def new_call_id(rng: random.Random) -> str:
    """A Mistral tool-call id: 9 characters from [A-Za-z0-9]."""
    return "".join(rng.choice(CALL_ID_ALPHABET) for _ in range(9))


def _money(value, currency: str) -> str:
    return f"{value:,.{_decimals(currency)}f} {currency}"


def make_tool_row(row_id: str, target: dict, text: str, rng: random.Random) -> dict:
    """One conversation: a receipt and a question, the call, its result and the final answer."""
    currency = target["currency"]
    kind = rng.choice(("convert", "sum", "lookup"))
    if kind == "convert":
        to_currency = rng.choice([c for c in CURRENCIES if c != currency])
        question = rng.choice(
            (f"What is this receipt's total in {to_currency}?", f"Convert the total to {to_currency}.")
        )
        name, arguments = (
            "convert_currency",
            {
                "amount": target["total"],
                "from_currency": currency,
                "to_currency": to_currency,
            },
        )
    elif kind == "sum":
        question = rng.choice(("What do the items add up to before tax?", "Add up the item lines."))
        name = "sum_amounts"
        arguments = {
            "amounts": [round(i["qty"] * i["unit_price"], _decimals(currency)) for i in target["items"]]
        }
    else:
        question = rng.choice(("What kind of shop is this, and where?", "Look up this merchant."))
        name, arguments = "lookup_merchant", {"name": target["merchant"]}
    result = FUNCTIONS[name](**arguments)
    if name == "convert_currency":
        answer = f"The total is {_money(result['amount'], result['currency'])}."
    elif name == "sum_amounts":
        answer = f"The items add up to {_money(result['sum'], currency)} before tax."
    else:
        answer = f"{result['name']} is a {result['category']} in {result['city']}."
    call_id = new_call_id(rng)
    return {
        "id": row_id,
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": f"{text}\n\n{question}"},
            {
                "role": "assistant",
                "tool_calls": [
                    {
                        "id": call_id,
                        "type": "function",
                        "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)},
                    }
                ],
            },
            {
                "role": "tool",
                "tool_call_id": call_id,
                "name": name,
                "content": json.dumps(result, ensure_ascii=False),
            },
            {"role": "assistant", "content": answer},
        ],
        "tools": TOOLS,
    }


def generate_tool_dataset(
    out_dir: str | os.PathLike = DEFAULT_DIR, seed: int = 0, splits: dict[str, int] | None = None
) -> dict[str, int]:
    """Write ``{split}.jsonl`` under ``out_dir`` (same seed → byte-identical files); returns row counts.

    Receipts are drawn with the receipts dataset's own generator (text layout only), so questions are
    about documents the course already knows; no receipt appears twice across splits.
    """
    from course_utils.receipts import _LAYOUTS, document_lines, make_target

    rng = random.Random(seed)
    out, seen, counts = Path(out_dir), set(), {}
    for split, n in (splits or SPLITS).items():
        rows = []
        for index in range(n):
            while True:
                target = make_target(rng)
                key = json.dumps(target, sort_keys=True)
                if key not in seen:
                    seen.add(key)
                    break
            text = "\n".join(document_lines(target, rng.choice(_LAYOUTS), rng.randrange(3)))
            rows.append(make_tool_row(f"{split}-{index:04d}", target, text, rng))
        jsonl = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        atomic_write(out / f"{split}.jsonl", jsonl, overwrite=True)
        counts[split] = len(rows)
    return counts


def load_tool_split(split: str = "train", data_dir: str | os.PathLike | None = None) -> list[dict]:
    """Rows of ``data/tools/{split}.jsonl``."""
    path = Path(data_dir or course_root() / DEFAULT_DIR) / f"{split}.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run course_utils.tools.generate_tool_dataset()")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def prompt_messages(row: dict) -> list[dict]:
    """The conversation up to the question: what the model sees before its first call."""
    last_user = max(i for i, m in enumerate(row["messages"]) if m["role"] == "user")
    return row["messages"][: last_user + 1]


def wanted_tool(row: dict) -> str | None:
    """The tool the row's first call names: the right answer to "which tool?" (None: the row calls none)."""
    for message in row["messages"]:
        if message.get("tool_calls"):
            return message["tool_calls"][0]["function"]["name"]
    return None


# --- Checking calls --------------------------------------------------------------------------------


def check_row(row: dict) -> list[str]:
    """Problems with one tool row (empty if it follows the rules): roles, ids, names, arguments."""
    problems, where = [], row.get("id", "?")
    tools = {t["function"]["name"]: t["function"] for t in row.get("tools") or []}
    if not tools:
        return [f"{where}: no tools"]
    open_ids = {}
    for i, message in enumerate(row["messages"]):
        if message["role"] == "assistant" and message.get("tool_calls"):
            for call in message["tool_calls"]:
                if not CALL_ID_PATTERN.fullmatch(str(call.get("id", ""))):
                    problems.append(
                        f"{where} message {i}: call id {call.get('id')!r} is not 9 chars [A-Za-z0-9]"
                    )
                verdict = validate_call(call["function"]["name"], call["function"]["arguments"], row["tools"])
                if not verdict.ok:
                    problems.append(f"{where} message {i}: {verdict.error}")
                open_ids[call.get("id")] = call["function"]["name"]
        elif message["role"] == "tool":
            if message.get("tool_call_id") not in open_ids:
                problems.append(
                    f"{where} message {i}: tool_call_id {message.get('tool_call_id')!r} answers no call"
                )
            elif message.get("name") != open_ids[message["tool_call_id"]]:
                problems.append(f"{where} message {i}: name {message.get('name')!r} is not the called tool")
    if row["messages"][-1]["role"] != "assistant" or not row["messages"][-1].get("content"):
        problems.append(f"{where}: the last message must be the assistant's final answer")
    return problems


@dataclass
class CallVerdict:
    """Whether one call may run: a known tool with arguments that match its JSON schema."""

    ok: bool
    name: str
    arguments: dict | None = None
    error: str = ""


def validate_call(name: str, arguments: str | dict, tools: list[dict]) -> CallVerdict:
    """Check a call against the tool list: known name, JSON-object arguments, schema-valid."""
    import jsonschema

    known = {t["function"]["name"]: t["function"] for t in tools}
    if not isinstance(name, str) or name not in known:
        return CallVerdict(False, str(name), None, f"unknown tool {name!r}; available: {', '.join(known)}")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as error:
            return CallVerdict(False, name, None, f"{name}: arguments are not JSON ({error.msg})")
    if not isinstance(arguments, dict):
        return CallVerdict(False, name, None, f"{name}: arguments must be a JSON object")
    try:
        jsonschema.validate(arguments, known[name].get("parameters") or {})  # OpenAI: parameters optional
    except jsonschema.ValidationError as error:
        path = "/".join(str(p) for p in error.absolute_path) or "(arguments)"
        return CallVerdict(False, name, arguments, f"{name}: {path}: {error.message}")
    return CallVerdict(True, name, arguments)


@dataclass
class ParsedReply:
    """A model reply split into text and the calls after ``[TOOL_CALLS]`` (``error`` if unparseable)."""

    content: str
    calls: list[dict] = field(default_factory=list)
    error: str = ""


def parse_tool_calls(text: str) -> ParsedReply:
    """Split a raw reply (special tokens kept) at ``[TOOL_CALLS]`` and parse the JSON list after it."""
    text = text.removesuffix("</s>")
    if "[TOOL_CALLS]" not in text:
        return ParsedReply(text.strip(), [], "no [TOOL_CALLS] in the reply")
    content, _, payload = text.partition("[TOOL_CALLS]")
    try:
        calls = json.loads(payload.strip())
    except json.JSONDecodeError as error:
        return ParsedReply(content.strip(), [], f"the calls are not JSON ({error.msg} at {error.pos})")
    if isinstance(calls, dict):
        calls = [calls]
    if not isinstance(calls, list) or not all(isinstance(c, dict) and "name" in c for c in calls):
        return ParsedReply(content.strip(), [], "the calls must be a list of objects with a name")
    return ParsedReply(content.strip(), calls)


def call_is_well_formed(text: str, tools: list[dict]) -> bool:
    """True when ``text`` holds the trained call format — after ``[TOOL_CALLS]`` a JSON *list* of calls,
    each to a known tool with a JSON *object* of schema-valid arguments: the rate lesson 08 reports before
    and after training. The call ids are counted apart (:func:`call_ids_valid_rate`): servers give each
    call a fresh id (vLLM's Mistral parser always does; the course's handler when the model's is not
    9 characters), so a wrong id never reaches the client."""
    parsed = parse_tool_calls(text)
    listed = text.removesuffix("</s>").partition("[TOOL_CALLS]")[2].lstrip().startswith("[")
    return (
        bool(parsed.calls)
        and listed
        and all(
            isinstance(c.get("arguments"), dict) and validate_call(c["name"], c["arguments"], tools).ok
            for c in parsed.calls
        )
    )


def well_formed_rate(replies: list[str], tools: list[dict]) -> float:
    return sum(call_is_well_formed(r, tools) for r in replies) / max(1, len(replies))


def call_ids_valid_rate(replies: list[str]) -> float:
    """The share of replies whose calls all carry an id Mistral accepts (9 characters of [A-Za-z0-9])."""

    def valid(reply: str) -> bool:
        calls = parse_tool_calls(reply).calls
        return bool(calls) and all(CALL_ID_PATTERN.fullmatch(str(c.get("id", ""))) for c in calls)

    return sum(map(valid, replies)) / max(1, len(replies))


def generate_raw(model, tokenizer, messages: list[dict], tools: list[dict], max_new_tokens: int = 96) -> str:
    """Greedy reply of a transformers model with special tokens kept (so ``[TOOL_CALLS]`` shows)."""
    import torch

    ids = torch.tensor([render_ids(tokenizer, messages, tools)])
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=False)


def generate_raw_batch(
    model,
    tokenizer,
    prompts: list[tuple[list[dict], list[dict]]],
    max_new_tokens: int = 96,
    batch_size: int = 16,
) -> list[str]:
    """:func:`generate_raw` for many ``(messages, tools)`` prompts at once: left-padded batches, greedy,
    each reply cut after its first ``</s>`` — the replies :func:`generate_raw` gives, row by row."""
    import torch

    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    replies: list[str] = []
    for start in range(0, len(prompts), batch_size):
        rendered = [render_ids(tokenizer, m, t) for m, t in prompts[start : start + batch_size]]
        width = max(map(len, rendered))
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rendered])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rendered])
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
            )
        for row in out[:, width:].tolist():
            row = row[: row.index(eos) + 1] if eos in row else row
            replies.append(tokenizer.decode(row, skip_special_tokens=False))
    return replies


# --- Agent-loop plumbing ---------------------------------------------------------------------------


def run_tool_call(name: str, arguments: str | dict, tools: list[dict], functions: dict) -> str:
    """Run one call if it is safe to: a refusal message (as the tool result) for an unknown tool or
    arguments that fail the schema — the function is never called with them."""
    verdict = validate_call(name, arguments, tools)
    if not verdict.ok:
        return json.dumps({"error": verdict.error}, ensure_ascii=False)
    if name not in functions:
        return json.dumps({"error": f"no Python function for {name!r}"}, ensure_ascii=False)
    try:  # the tool's own failure becomes its result, as in run_agent
        result = functions[name](**verdict.arguments)
    except Exception as error:  # noqa: BLE001
        result = {"error": f"{name} failed: {type(error).__name__}: {error}"}
    try:
        return json.dumps(result, ensure_ascii=False, default=str)
    except (TypeError, ValueError) as error:  # keys JSON cannot hold, a result that holds itself
        return json.dumps({"error": f"{name}: its result cannot be sent as JSON ({error})"})


# Lesson 08 shows this function in full (its copy:agent-loop cell); a test keeps the two identical.
def run_agent(client, model, question, tools, functions, max_turns=4, max_tokens=256, system=None, **request):
    # system: the system prompt the model was trained with; request: more fields for every request
    # (e.g. extra_body={"repeat_penalty": 1.0}: llama-cpp-python's server penalizes repeats by default)
    schemas = {tool["function"]["name"]: tool["function"].get("parameters", {}) for tool in tools}
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": question})
    tool_choice = "auto"
    for _ in range(max_turns):
        choice = client.chat.completions.create(
            model=model,
            messages=messages,
            tools=tools,
            tool_choice=tool_choice,
            temperature=0.0,
            max_tokens=max_tokens,
            **request,
        ).choices[0]
        reply = choice.message
        if choice.finish_reason == "length":  # cut off mid-answer or mid-call: not an answer
            cut = f"(cut off at max_tokens={max_tokens}, no answer) {reply.content or ''}"
            messages.append({"role": "assistant", "content": cut})
            return messages
        if not reply.tool_calls and "[TOOL_CALLS]" in (reply.content or ""):
            if tool_choice == "required":  # still no parseable call: stop, and say so
                failed = f"(no tool call parsed, no answer) {reply.content}"
                messages.append({"role": "assistant", "content": failed})
                return messages
            tool_choice = "required"  # it began a call the server could not parse: ask again, constrained
            continue
        tool_choice = "auto"
        if not reply.tool_calls:
            messages.append({"role": "assistant", "content": reply.content or ""})
            return messages
        messages.append(
            {
                "role": "assistant",
                "content": reply.content or "",  # llama-cpp-python's server refuses null
                "tool_calls": [c.model_dump() for c in reply.tool_calls],
            }
        )
        for call in reply.tool_calls:
            name = call.function.name
            try:
                if name not in schemas or name not in functions:
                    raise LookupError(f"unknown tool {name!r}; available: {', '.join(schemas)}")
                arguments = json.loads(call.function.arguments or "{}")
                if not isinstance(arguments, dict):
                    raise TypeError(f"{name}: arguments must be a JSON object")
                jsonschema.validate(arguments, schemas[name])
            except json.JSONDecodeError as error:
                result = {"error": f"{name}: arguments are not JSON ({error.msg})"}
            except jsonschema.ValidationError as error:
                result = {"error": f"{name}: {error.message}"}
            except (LookupError, TypeError) as error:
                result = {"error": str(error)}
            else:
                try:  # the tool's own failure is the model's to read, not the loop's to die of
                    result = functions[name](**arguments)
                except Exception as error:  # noqa: BLE001
                    result = {"error": f"{name} failed: {type(error).__name__}: {error}"}
            try:
                content = json.dumps(result, ensure_ascii=False, default=str)
            except (TypeError, ValueError) as error:  # keys JSON cannot hold, a result that holds itself
                content = json.dumps({"error": f"{name}: its result cannot be sent as JSON ({error})"})
            messages.append({"role": "tool", "tool_call_id": call.id, "name": name, "content": content})
    messages.append({"role": "assistant", "content": f"(stopped after {max_turns} turns without an answer)"})
    return messages


def transcript_rows(messages: list[dict], width: int = 70) -> list[dict]:
    """One table row per message (role, what it said or called), long text shortened."""
    rows = []
    for index, message in enumerate(messages):
        content = message.get("content") or ""
        if not isinstance(content, str):
            content = " ".join(p.get("text", "[image]") for p in content)
        calls = message.get("tool_calls") or []
        said = "; ".join(
            f"{c['function']['name']}({c['function']['arguments']})"
            if isinstance(c, dict)
            else f"{c.function.name}({c.function.arguments})"
            for c in calls
        ) or content.replace("\n", " ⏎ ")
        said = said if len(said) <= width else said[: width - 1] + "…"
        rows.append({"#": index, "role": message["role"], "message": said})
    return rows


# --- Training (lesson 04's CPU Trainer path, with tool-aware labels) --------------------------------


def build_tool_trainer(model, tokenizer, train_rows: list[dict], preset, output_dir: str | os.PathLike):
    """LoRA + response-only Trainer for tool rows: the pieces of :func:`course_utils.train.build_trainer`,
    with :func:`tool_response_labels` so both the call and the final answer are trained."""
    import torch

    from course_utils.loss import VisionTextCollator, trained_token_ids
    from course_utils.train import ResponseOnlyTrainer, add_lora, training_arguments

    torch.manual_seed(preset.seed)
    examples = [tokenize_tool_record(r, tokenizer, preset.max_seq_length) for r in train_rows]
    tokens = trained_token_ids(examples) if preset.train_embeddings else None
    peft_model = add_lora(model, preset, tokens)
    peft_model.train()
    args = training_arguments(preset, output_dir, use_cpu=not torch.cuda.is_available(), eval_steps=None)
    return ResponseOnlyTrainer(
        model=peft_model,
        args=args,
        train_dataset=examples,
        data_collator=VisionTextCollator(tokenizer.pad_token_id),
    )


# Lesson 04's preset with these overrides. cpu-tiny, measured with benchmarks/tool_learning.py on 2 CPU
# cores (30 held-out rows): 500 steps of 2 rows at 5e-3 train in ≈ 3 min to 73 % well-formed calls;
# 300 such steps, lesson 04's 4-row batches for 160 steps, or 500 steps at 8e-3 all stay at 0 %.
TOOL_PRESETS: dict[str, dict] = {
    "cpu-tiny": dict(max_steps=500, per_device_train_batch_size=2, learning_rate=5e-3),
}


def _base_fingerprint(profile_name: str) -> str | None:
    """What the adapter was trained on: a stand-in's build fingerprint (a rebuilt stand-in with another
    recipe makes an old adapter meaningless), or the Hub id of a real model."""
    from course_utils.models import model_source
    from course_utils.tiny import BUILD_INFO_FILE

    source = model_source(profile_name)
    info = Path(source.model_id) / BUILD_INFO_FILE
    return json.loads(info.read_text()).get("fingerprint") if info.is_file() else source.model_id


def ensure_tool_adapter(
    profile_name: str, adapter_dir: str | os.PathLike, train_rows: list[dict], max_steps: int | None = None
) -> tuple[Path, str]:
    """The tool-calling adapter when it exists for this data; otherwise train it now and save it.

    Reused only when its card says it was trained on these rows (``dataset_sha256_16``), on this base
    (``base_fingerprint``) and with this recipe (``preset``); otherwise retrained, and the message says
    why. The new adapter replaces the old one only once it is complete (:func:`~course_utils.paths.staged`).
    """
    import time

    from course_utils.models import load, model_source
    from course_utils.paths import staged
    from course_utils.train import dataset_hash, preset_for

    adapter_dir = Path(adapter_dir)
    card_path = adapter_dir / "training_card.json"
    digest = dataset_hash(train_rows)
    base = _base_fingerprint(profile_name)
    rung = model_source(profile_name).profile.name
    overrides = {"max_steps": 200, **TOOL_PRESETS.get(rung, {})}
    if max_steps:
        overrides["max_steps"] = max_steps
    preset = preset_for(rung, max_seq_length=1024, save_steps=10**6, **overrides)
    old = json.loads(card_path.read_text()) if card_path.is_file() else None
    if old and (old["dataset_sha256_16"], old.get("base_fingerprint"), old.get("preset")) == (
        digest,
        base,
        preset.as_dict(),
    ):
        return adapter_dir, f"reused {adapter_dir.name}: {old['max_steps']} steps in {old['train_seconds']} s"
    if old is None:
        why = " (replacing a folder without a training card)" if any(adapter_dir.glob("*")) else ""
    elif old["dataset_sha256_16"] != digest:
        why = " (the saved one was for other rows)"
    elif old.get("base_fingerprint") != base:
        why = " (the saved one was for another base)"
    else:
        why = " (the saved one had another recipe)"
    loaded = load(profile_name)
    run_dir = adapter_dir.with_name(adapter_dir.name + "-run")
    trainer = build_tool_trainer(loaded.model, loaded.processor.tokenizer, train_rows, preset, run_dir)
    started = time.perf_counter()
    result = trainer.train()
    seconds = round(time.perf_counter() - started, 1)
    card = {
        "max_steps": preset.max_steps,
        "train_loss": round(result.training_loss, 4),
        "train_seconds": seconds,
        "train_examples": len(train_rows),
        "dataset_sha256_16": digest,
        "base_fingerprint": base,
        "preset": preset.as_dict(),
        "losses": [round(h["loss"], 4) for h in trainer.state.log_history if "loss" in h],
    }
    with staged(adapter_dir, overwrite=True, folder=True) as tmp:  # the old adapter stays until this is whole
        trainer.model.save_pretrained(tmp)
        (tmp / "training_card.json").write_text(json.dumps(card, indent=2), encoding="utf-8")
    shutil.rmtree(run_dir, ignore_errors=True)  # no checkpoints kept
    return adapter_dir, f"trained {adapter_dir.name}{why}: {preset.max_steps} steps in {seconds} s"


# --- Structured output: constrained decoding through the course's llama.cpp server -----------------


def bounded_schema(schema: dict, max_length: int = 24, max_items: int = 4) -> dict:
    r"""``schema`` with every free string given ``maxLength`` and every array ``maxItems``: a grammar
    built from it cannot run on forever, so a reply always closes within a known token budget.
    Patterns get ``\d``, ``\w`` and ``\s`` spelled as ranges (:func:`plain_pattern`): llama-cpp-python
    0.3.36 copies the shorthands into a grammar llama.cpp fails to parse, and its server then dies."""

    def bound(value):
        if isinstance(value, dict):
            return bounded_schema(value, max_length, max_items)
        if isinstance(value, list):  # anyOf / oneOf / allOf branches
            return [bound(v) for v in value]
        return value

    out = {
        # maps of name → schema: their keys are names (an argument may be called "pattern"), not keywords
        k: {name: bound(sub) for name, sub in v.items()}
        if k in _SCHEMA_MAPS and isinstance(v, dict)
        else bound(v)
        for k, v in schema.items()
    }
    if schema.get("type") == "string" and "pattern" not in schema and "enum" not in schema:
        out.setdefault("maxLength", max_length)
    if schema.get("type") == "array":
        out.setdefault("maxItems", max_items)
    if isinstance(schema.get("pattern"), str):
        out["pattern"] = plain_pattern(schema["pattern"])
    return out


_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")  # name → schema
# \d, \w, \s as the character ranges they mean: llama-cpp-python's converter copies the shorthands into
# the grammar, which llama.cpp then fails to parse (and a server given it crashes)
_SHORTHANDS = {"d": "0-9", "w": "A-Za-z0-9_", "s": " \\t\\n\\r"}


def plain_pattern(pattern: str) -> str:
    r"""``pattern`` with ``\d``, ``\w`` and ``\s`` spelled as ranges (``[0-9]`` outside a class, ``0-9``
    inside one). Other escapes are kept; a grammar that still fails is refused before it is used."""
    out, in_class, i = [], False, 0
    while i < len(pattern):
        char = pattern[i]
        if char == "\\" and i + 1 < len(pattern):
            escaped = pattern[i + 1]
            if escaped in _SHORTHANDS:
                ranges = _SHORTHANDS[escaped]
                out.append(ranges if in_class else f"[{ranges}]")
            else:
                out.append(pattern[i : i + 2])
            i += 2
            continue
        if char == "[" and not in_class:
            in_class = True
        elif char == "]" and in_class:
            in_class = False
        out.append(char)
        i += 1
    return "".join(out)


def schema_grammar(
    schema: dict, integer_digits: int = 6, decimals: int = 2, max_length: int = 24, max_items: int = 4
) -> str:
    """A GBNF grammar for ``schema`` (llama-cpp-python's converter) with numbers bounded too: at most
    ``integer_digits`` digits before the point and ``decimals`` after, no exponent. JSON Schema's
    ``maximum`` would say the same, but the converter ignores it, and a confused model then writes
    16-digit numbers until ``max_tokens`` cuts the JSON open. Strings exclude raw control characters,
    which the converter allows and JSON does not."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    def optional_digits(n: int) -> str:
        return "" if n == 0 else "([0-9]" + (" " + optional_digits(n - 1) if n > 1 else "") + ")?"

    lines = []
    for line in json_schema_to_gbnf(json.dumps(bounded_schema(schema, max_length, max_items))).splitlines():
        rule = line.split(" ::= ")[0]
        if rule == "integral-part":
            line = f"integral-part ::= [0-9] | [1-9] {optional_digits(integer_digits - 1)}"
        elif rule == "decimal-part":
            line = f"decimal-part ::= [0-9] {optional_digits(decimals - 1)}".rstrip()
        elif rule == "number":
            line = 'number ::= ("-"? integral-part) ("." decimal-part)? space'
        elif rule == "char":  # the converter lets raw control characters (a newline) into strings: not JSON
            line = r'char ::= [^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4})'
        lines.append(line)
    return "\n".join(lines) + "\n"


def tool_calls_schema(tools: list[dict], name: str | None = None) -> dict:
    """The JSON schema of what follows ``[TOOL_CALLS]`` in Mistral's v7 format: a list of calls, each
    ``{"name", "arguments", "id"}`` in that order, to one of ``tools`` (only ``name`` when given) with
    arguments valid for that tool and a 9-character id. A grammar from it is ``tool_choice="required"``."""
    chosen = [t["function"] for t in tools if name is None or t["function"]["name"] == name]
    if not chosen:
        known = ", ".join(t["function"]["name"] for t in tools)
        raise ValueError(f"tool_choice names no tool named {name!r}; the request's tools: {known}")
    definitions: dict = {}  # each tool's $defs, moved to the root (its $refs resolve from there)
    calls = []
    for f in chosen:
        parameters = _hoist_definitions(f.get("parameters") or {"type": "object"}, f["name"], definitions)
        calls.append(
            {
                "type": "object",
                "properties": {
                    "name": {"const": f["name"]},
                    "arguments": parameters,
                    "id": {"type": "string", "pattern": CALL_ID_PATTERN.pattern},
                },
                "required": ["name", "arguments", "id"],
                "additionalProperties": False,
            }
        )
    schema = {"type": "array", "items": calls[0] if len(calls) == 1 else {"anyOf": calls}, "minItems": 1}
    return {**schema, "$defs": definitions} if definitions else schema


def _hoist_definitions(parameters: dict, tool: str, definitions: dict) -> dict:
    """``parameters`` without its ``$defs``/``definitions``: they go into ``definitions`` as
    ``<tool>__<name>`` and every ``$ref`` to them is rewritten to match (pydantic writes such schemas)."""
    own = {**parameters.get("definitions", {}), **parameters.get("$defs", {})}
    renamed = {
        f"#/{kind}/{key}": f"#/$defs/{tool}__{key}" for kind in ("$defs", "definitions") for key in own
    }

    def rewrite(node):
        if isinstance(node, dict):
            return {
                k: renamed.get(v, v) if k == "$ref" else rewrite(v)
                for k, v in node.items()
                if k not in ("$defs", "definitions")
            }
        if isinstance(node, list):
            return [rewrite(v) for v in node]
        return node

    for key, value in own.items():
        definitions[f"{tool}__{key}"] = rewrite(value)
    return rewrite(parameters)


def tool_calls_grammar(tools: list[dict], name: str | None = None) -> str:
    """:func:`schema_grammar` of :func:`tool_calls_schema`: at most 4 calls, bounded strings and numbers.
    A schema the converter cannot turn into a grammar raises ``ValueError`` saying so."""
    schema = tool_calls_schema(tools, name)
    try:
        return schema_grammar(schema)
    except (ValueError, AssertionError, KeyError) as error:  # the converter asserts on what it lacks
        raise ValueError(f"the tools' schemas do not convert to a grammar: {error}") from None


@dataclass
class ServedRun:
    """Replies of one configuration, with each request's wall time and completion tokens."""

    name: str
    replies: list[str]
    seconds: list[float]
    completion_tokens: list[int]

    def summary(self, targets: list[dict], schema: dict) -> dict:
        from course_utils.evaluate import task_metrics

        metrics = task_metrics(self.replies, targets, schema)
        ordered = sorted(self.seconds)
        return {
            "configuration": self.name,
            "json_valid": round(metrics["json_valid"], 3),
            "schema_valid": round(metrics["schema_valid"], 3),
            "field_f1": round(metrics["field_f1"], 3),
            "tokens_per_s": round(sum(self.completion_tokens) / max(1e-9, sum(self.seconds)), 1),
            "latency_p50_s": round(ordered[len(ordered) // 2], 3) if ordered else 0.0,
        }


def served_run(
    name: str,
    base_url: str,
    model: str,
    prompts: list[list[dict]],
    constraint: dict | None = None,
    max_tokens: int = 256,
) -> ServedRun:
    """Send each prompt (images as data URIs) to an OpenAI-compatible server, greedy, timed.

    ``constraint``: extra body fields, e.g. ``{"grammar": schema_grammar(schema)}`` or
    ``{"response_format": serve.llama_cpp_response_format(schema)}`` for llama-cpp-python's server."""
    import time

    from course_utils.chat import openai_messages
    from course_utils.serve import client

    api = client(base_url)
    run = ServedRun(name, [], [], [])
    for prompt in prompts:
        started = time.perf_counter()
        response = api.chat.completions.create(
            model=model,
            messages=openai_messages(prompt),
            max_tokens=max_tokens,
            temperature=0.0,
            extra_body={"repeat_penalty": 1.0, **(constraint or {})},
        )
        run.seconds.append(time.perf_counter() - started)
        run.replies.append(response.choices[0].message.content or "")
        run.completion_tokens.append(response.usage.completion_tokens if response.usage else 0)
    return run


def plot_structured(rows: list[dict], show: bool = True):
    """Bars of JSON-valid, schema-valid and field F1 per configuration, and tokens/s beside them."""
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 3.6), gridspec_kw={"width_ratios": [3, 1.4]})
    names = [r["configuration"] for r in rows]
    width = 0.26
    for offset, key in enumerate(("json_valid", "schema_valid", "field_f1")):
        left.bar(
            [i + (offset - 1) * width for i in range(len(rows))], [r[key] for r in rows], width, label=key
        )
    left.set_xticks(range(len(rows)), names, rotation=15)
    left.set_ylim(0, 1.05)
    left.legend(loc="upper left", fontsize=8)
    left.set_title("quality (receipts test subset)")
    right.barh(names, [r["tokens_per_s"] for r in rows], color="grey")
    right.set_title("tokens/s")
    figure.tight_layout()
    if show:
        plt.show()
    return figure


# --- Files lesson 08 serves --------------------------------------------------------------------------


@dataclass
class GgufPair:
    """A served model: the language model file and its vision projector."""

    model: Path
    mmproj: Path


def ensure_base_gguf(profile_name: str, out_dir: str | os.PathLike) -> GgufPair:
    """The *untuned* base as Q4_K_M + projector (lesson 06 exports only the tuned model), built once.

    On ``cpu-tiny`` the base is the stand-in folder itself (seconds); elsewhere pass a profile whose base
    weights are on disk.
    """
    from course_utils import gguf_export
    from course_utils.models import model_source

    out = Path(out_dir)
    pair = GgufPair(out / "base-Q4_K_M.gguf", out / "base-mmproj-f16.gguf")
    if pair.model.exists() and pair.mmproj.exists():
        return pair
    source = model_source(profile_name).model_id
    f16 = gguf_export.convert_to_gguf(source, out / "base-f16.gguf", "f16", overwrite=True)
    gguf_export.convert_to_gguf(source, pair.mmproj, "f16", mmproj=True, overwrite=True)
    gguf_export.quantize(f16, pair.model, "Q4_K_M", overwrite=True)
    f16.unlink()
    return pair


def ensure_tuned_gguf(profile_name: str, hardware=None) -> GgufPair:
    """Lesson 06's tuned Q4_K_M + projector; exported now the way lesson 06 does if missing (≈ 1 minute
    on ``cpu-tiny``, plus lesson 04's training if its adapter is missing too)."""
    from course_utils import export, gguf_export
    from course_utils.models import load
    from course_utils.paths import outputs_dir
    from course_utils.receipts import lesson_splits
    from course_utils.train import ensure_adapter

    export_dir = outputs_dir(profile_name, "export")
    pair = GgufPair(export_dir / "receipts-Q4_K_M.gguf", export_dir / "receipts-mmproj-f16.gguf")
    if pair.model.exists() and pair.mmproj.exists():
        return pair
    train_rows, val_rows, _, _ = lesson_splits(profile_name)
    adapter_dir, _ = ensure_adapter(
        profile_name,
        outputs_dir(profile_name, "adapters") / "receipts-lora",
        train_rows,
        val_rows[:24],
        hardware=hardware,
    )
    base = load(profile_name, hardware=hardware, load_in_4bit=False)
    merged = export.merge_adapter(
        base.model, base.processor, adapter_dir, export_dir / "merged", overwrite=True
    )
    f16 = gguf_export.convert_to_gguf(merged, export_dir / "receipts-f16.gguf", "f16", overwrite=True)
    gguf_export.convert_to_gguf(merged, pair.mmproj, "f16", mmproj=True, overwrite=True)
    gguf_export.quantize(f16, pair.model, "Q4_K_M", overwrite=True)
    return pair


def ensure_tool_gguf(profile_name: str, adapter_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """The tool-calling adapter merged into the base and written as one f16 GGUF (text only)."""
    from course_utils import export, gguf_export
    from course_utils.models import load

    out = Path(out_dir)
    target = out / "tools-f16.gguf"
    card = Path(adapter_dir) / "training_card.json"
    stamp = out / "tools-f16.source.json"
    if target.exists() and stamp.exists() and stamp.read_text() == card.read_text():
        return target
    base = load(profile_name, load_in_4bit=False)
    merged = export.merge_adapter(
        base.model, base.processor, adapter_dir, out / "tools-merged", overwrite=True
    )
    gguf_export.convert_to_gguf(merged, target, "f16", overwrite=True)
    atomic_write(stamp, card.read_text(), overwrite=True)
    return target
