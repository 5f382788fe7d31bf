"""The exercises at the end of every lesson (00–08): one checker per exercise, keyed by its id.

A lesson's exercise cell holds the learner's answer (``None`` until they fill it in) and one call, e.g.
``check("05-best-field", best_field, comparison=comparison)``. The expected value is never written in
that cell: the checker here computes it — from the course's registries for the questions about real
models, and from the learner's own run objects passed as keywords (their trainer, evaluation, GGUF
files, load test) for the questions about their run. The answers themselves are in the solutions
notebooks (``notebooks/solutions/``), built from the same lesson sources.

``check`` prints a visible pass, raises :class:`~course_utils.widgets.WrongAnswer` (an
``AssertionError``: the cell fails, with a hint) on a wrong answer, and prints "not answered yet"
without failing when the answer is still ``None`` — so "Run all" keeps going on an untouched notebook.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from course_utils.widgets import WrongAnswer
from course_utils.widgets import check as check_value


@dataclass(frozen=True)
class Exercise:
    """One exercise: what the learner is asked, a hint, and how their answer is judged.

    ``expected`` computes the right value from the run objects (then the answer must equal it, within
    ``tolerance`` for numbers; a list or set means any of its items is right); ``judge`` instead
    inspects an artifact the learner produced and returns what is wrong with it (``None``: nothing).
    """

    id: str
    tier: str  # 🐢, 🐕 or 🦁
    question: str
    hint: str
    needs: tuple[str, ...] = ()  # keyword arguments ``check`` must be given (the learner's run objects)
    expected: Callable[..., Any] | None = None
    judge: Callable[..., str | None] | None = None
    tolerance: float = 0.0


EXERCISES: dict[str, Exercise] = {}


def exercise(**fields) -> Exercise:
    item = Exercise(**fields)
    if item.id in EXERCISES:
        raise ValueError(f"exercise id {item.id!r} is defined twice")
    EXERCISES[item.id] = item
    return item


def check(exercise_id: str, answer, **run) -> bool:
    """Judge ``answer`` to exercise ``exercise_id``: ✅ and ``True``, ⏳ and ``False`` (``None``), or raise.

    ``run`` holds the learner's own objects the exercise needs (its ``needs``), e.g. ``trainer=trainer``.
    """
    if exercise_id not in EXERCISES:
        raise KeyError(f"no exercise {exercise_id!r}; known: {', '.join(sorted(EXERCISES))}")
    item = EXERCISES[exercise_id]
    missing = [name for name in item.needs if name not in run]
    if missing:
        raise TypeError(f"check({exercise_id!r}, ...) needs {', '.join(f'{n}=...' for n in missing)}")
    if answer is None:  # nothing to judge yet (and nothing computed: the expected value stays unknown)
        return check_value(None, None, item.hint, label=exercise_id)
    if item.judge is None:
        expected = item.expected(**run)
        if isinstance(expected, (list, set, frozenset, tuple)) and answer in expected:
            expected = answer  # any of several equally right answers (a tie)
        elif isinstance(expected, (list, set, frozenset, tuple)):
            expected = sorted(expected, key=str)[0]
        return check_value(answer, expected, item.hint, tolerance=item.tolerance, label=exercise_id)
    problem = item.judge(answer, **run)
    if problem:
        raise WrongAnswer(f"❌ {exercise_id}: {problem}. Hint: {item.hint}")
    print(f"✅ {exercise_id}: correct!")
    return True


# --- 00 · Setup ------------------------------------------------------------------------------------


def _active_params(**_) -> float:
    from course_utils.profiles import MODELS

    return MODELS["mistral-small-4"].active_params_b


def _friend_profile(**_) -> str:
    from course_utils.profiles import pick_profile

    return pick_profile("cuda", 39.4)


def _judge_override(answer, **_) -> str | None:
    from course_utils.profiles import PROFILE_ENV_VAR, resolve_profile

    if answer != resolve_profile("t4-16gb").load_id:
        return (
            f"{answer!r} is not what 'auto' loads with {PROFILE_ENV_VAR}=t4-16gb: set the variable before "
            "resolving, and keep the profile's .load_id"
        )
    if os.environ.get(PROFILE_ENV_VAR) == "t4-16gb":
        return f"{PROFILE_ENV_VAR} is still 't4-16gb': remove it, or later cells use the wrong profile"
    return None


exercise(
    id="00-active-params",
    tier="🐢",
    question="Parameters Mistral Small 4 uses per token, in billions",
    hint="look at the 'params' column of the ladder table (the figure in brackets)",
    expected=_active_params,
)
exercise(
    id="00-friend-profile",
    tier="🐕",
    question="The profile 'auto' gives an A100 40 GB (39.4 GiB)",
    hint="pick_profile('cuda', 39.4): the largest rung whose VRAM need the card meets",
    expected=_friend_profile,
)
exercise(
    id="00-override",
    tier="🦁",
    question="The checkpoint 'auto' loads with COURSE_PROFILE=t4-16gb set (then unset it)",
    hint="with mock.patch.dict(os.environ, {'COURSE_PROFILE': 't4-16gb'}): resolve inside the block",
    judge=_judge_override,
)


# --- 01 · Load a model ------------------------------------------------------------------------------


def _kv(key: str) -> int:
    from course_utils.profiles import MODELS

    return MODELS[key].kv_cache_bytes_per_token()


def _judge_conversation(answer, processor, **_) -> str | None:
    from course_utils.chat import reference_token_ids

    roles = [m.get("role") for m in answer] if isinstance(answer, list) else None
    if roles is None or any(not isinstance(m.get("content"), str) for m in answer):
        return "give a list of {'role': ..., 'content': '...'} messages"
    if roles != ["system", "user", "assistant", "user", "assistant"]:
        return f"the roles are {roles}; want system, then user/assistant twice"
    ids = processor.apply_chat_template(answer, tokenize=True, return_dict=True)["input_ids"]
    ids = ids.tolist()[0] if hasattr(ids, "tolist") else list(ids)
    if ids != reference_token_ids(answer):
        return "the processor's ids differ from mistral-common's: is there a control token in a message?"
    return None


exercise(
    id="01-kv-bytes",
    tier="🐢",
    question="KV-cache bytes per token of Mistral Small 3.1 (16-bit)",
    hint="layers x 2 (K and V) x kv_heads x head_dim x 2 bytes, from MODELS['mistral-small-3.1']",
    expected=lambda **_: _kv("mistral-small-3.1"),
)
exercise(
    id="01-kv-ratio",
    tier="🐕",
    question="How many times more KV cache Small 3.2 needs than Small 4 (one decimal)",
    hint="divide the two kv_cache_bytes_per_token() values and round to one decimal",
    expected=lambda **_: round(_kv("mistral-small-3.2") / _kv("mistral-small-4"), 1),
    tolerance=0.02,
)
exercise(
    id="01-own-conversation",
    tier="🦁",
    question="A system prompt and two user/assistant turns, token-identical to mistral-common",
    hint="start with a system message, then user/assistant/user/assistant, plain text in each",
    needs=("processor",),
    judge=_judge_conversation,
)


# --- 02 · Vision prompting --------------------------------------------------------------------------


def _judge_fixed_reply(answer, broken_reply, **_) -> str | None:
    import json

    from course_utils.chat import JSONExtractionError, extract_json
    from course_utils.receipts import RECEIPT_SCHEMA

    try:
        fixed = extract_json(answer, RECEIPT_SCHEMA)
    except JSONExtractionError as error:
        return f"the schema still rejects it: {str(error).splitlines()[0]}"
    original = json.loads(broken_reply)
    changed = sorted(k for k in original if k != "currency" and fixed.get(k) != original[k])
    if changed:
        return f"fix the reply, do not write another receipt: {', '.join(changed)} changed"
    return None


def _screenshot_tokens(**_) -> int:
    from course_utils.chat import image_token_cost

    return image_token_cost(1024, 768)


exercise(
    id="02-screenshot-tokens",
    tier="🐢",
    question="Tokens a 1024x768 screenshot costs on Mistral Small 3.2",
    hint="ceil(1024/28) x ceil(768/28) image tokens, plus one break/end token per row",
    expected=_screenshot_tokens,
)
exercise(
    id="02-per-image-budget",
    tier="🐕",
    question="Largest per-image token budget for 200 images in one 128k request (2,048 kept for text)",
    hint="divide what is left of the 131,072-token context by the number of images (round down)",
    expected=lambda **_: (131072 - 2048) // 200,
)
exercise(
    id="02-fixed-reply",
    tier="🦁",
    question="Fix the reply by hand so the receipt schema accepts it",
    hint="currency codes are upper-case ISO codes",
    needs=("broken_reply",),
    judge=_judge_fixed_reply,
)


# --- 03 · Data formatting ---------------------------------------------------------------------------


def _judge_fixed_row(answer, **_) -> str | None:
    from course_utils.data import check_record

    if not isinstance(answer, dict) or not answer.get("images"):
        return "keep the row's image (its 'images' list)"
    problems = check_record(answer)
    if problems:
        return f"check_record still finds {problems}"
    return None


def _invalid_rows(broken_file, **_) -> int:
    from course_utils.data import validate_file

    return len(validate_file(broken_file).invalid_rows)


exercise(
    id="03-invalid-rows",
    tier="🐢",
    question="Rows of the learner's original upload that were invalid",
    hint="count the distinct row numbers in the first validation report",
    needs=("broken_file",),
    expected=_invalid_rows,
)
exercise(
    id="03-fixed-row",
    tier="🐕",
    question="Make the row valid (keeping its image)",
    hint="merge the two user turns, then end the row with an assistant reply",
    judge=_judge_fixed_row,
)
exercise(
    id="03-keep-all",
    tier="🦁",
    question="max_seq_length that keeps every row of your mixed dataset, a multiple of 16",
    hint="the longest of your lengths, rounded up to a multiple of 16: ceil(max / 16) * 16",
    needs=("lengths",),
    expected=lambda lengths, **_: math.ceil(max(lengths) / 16) * 16,
)


# --- 04 · QLoRA training ----------------------------------------------------------------------------


def _lora_128(**_) -> float:
    from course_utils.memory import ARCHITECTURES, lora_parameters

    return round(lora_parameters(ARCHITECTURES["mistral-small-3.2"], 128) / 1e6, 1)


def _longest_fitting(**_) -> int:
    from course_utils.memory import estimate_training_memory

    return max(
        s
        for s in range(1024, 131073, 1024)
        if estimate_training_memory("mistral-small-3.2", "qlora", s, 1, 16).total_gib <= 24
    )


def _best_eval_steps(trainer, **_) -> set[int]:
    evals = [e for e in trainer.state.log_history if "eval_loss" in e]
    if not evals:
        raise WrongAnswer("❌ 04-best-eval-step: this run logged no eval_loss (was eval_strategy 'no'?)")
    lowest = min(e["eval_loss"] for e in evals)
    return {e["step"] for e in evals if e["eval_loss"] == lowest}


exercise(
    id="04-lora-128",
    tier="🐢",
    question="LoRA parameters r = 128 adds to Mistral Small 3.2 (millions, one decimal)",
    hint="lora_parameters(small32, 128) / 1e6, rounded to one decimal",
    expected=_lora_128,
    tolerance=0.01,
)
exercise(
    id="04-longest-seq",
    tier="🐕",
    question="Longest seq_len (a multiple of 1024) at which Small 3.2 QLoRA, batch 1, r 16 fits 24 GiB",
    hint="loop over range(1024, 131073, 1024) and keep the last whose total_gib is <= 24",
    expected=_longest_fitting,
)
exercise(
    id="04-best-eval-step",
    tier="🦁",
    question="The step of your run whose eval_loss is lowest (from trainer.state.log_history)",
    hint="min over the log_history entries that hold 'eval_loss', by that value; answer its 'step'",
    needs=("trainer",),
    expected=_best_eval_steps,
)


# --- 05 · Evaluation --------------------------------------------------------------------------------


def _f1_example(**_) -> float:
    precision, recall = 6 / 8, 6 / 10
    return round(2 * precision * recall / (precision + recall), 2)


def _best_fields(comparison, **_) -> set[str]:
    rows = comparison.per_field()
    best = max(row["tuned"] for row in rows)
    return {row["field"] for row in rows if row["tuned"] == best}


def _format_fixed(comparison, **_) -> int:
    return sum(not e["json_valid"]["base"] and e["json_valid"]["tuned"] for e in comparison.examples)


exercise(
    id="05-f1",
    tier="🐢",
    question="Field F1 of a reply with 8 facts, 6 right, on a receipt of 10 (two decimals)",
    hint="precision = right / written, recall = right / on the receipt, F1 = 2PR / (P + R)",
    expected=_f1_example,
    tolerance=0.01,
)
exercise(
    id="05-best-field",
    tier="🐕",
    question="The field with the highest F1 for your tuned model",
    hint="max(comparison.per_field(), key=lambda row: row['tuned'])['field']",
    needs=("comparison",),
    expected=_best_fields,
)
exercise(
    id="05-format-fixed",
    tier="🦁",
    question="Test rows where your base model wrote no valid JSON and your tuned model did",
    hint="count comparison.examples whose json_valid['base'] is False and json_valid['tuned'] is True",
    needs=("comparison",),
    expected=_format_fixed,
)


# --- 06 · Export to GGUF and Ollama -----------------------------------------------------------------


def _q4_fraction(files, **_) -> float:
    return round(Path(files["Q4_K_M"]).stat().st_size / Path(files["F16"]).stat().st_size, 2)


def _small4_q4_gib(**_) -> float:
    from course_utils import export

    return round(export.plan_export(int(119e9), ("Q4_K_M",)).files["GGUF Q4_K_M"] / 2**30, 1)


def modelfile_fields(text: str) -> dict:
    """FROM, TEMPLATE (triple-quoted) and PARAMETER values of a Modelfile's text, comments skipped."""
    import re

    fields: dict = {"PARAMETER": {}}
    template = re.search(r'^TEMPLATE """(.*?)"""', text, re.S | re.M)
    fields["TEMPLATE"] = template.group(1) if template else None
    for line in text.splitlines():
        words = line.split(None, 2)
        if len(words) >= 2 and words[0] == "FROM":
            fields["FROM"] = line.split(None, 1)[1].strip()
        elif len(words) == 3 and words[0] == "PARAMETER":
            fields["PARAMETER"].setdefault(words[1], []).append(words[2].strip())
    return fields


def _judge_modelfile(answer, reference, **_) -> str | None:
    from course_utils import gguf_export

    path = Path(answer)
    if not path.is_file():
        return f"{path} is not a file: write your Modelfile there first"
    mine, theirs = modelfile_fields(path.read_text()), modelfile_fields(reference)
    if "FROM" not in mine:
        return "it has no FROM line"
    source = (path.parent / mine["FROM"]).resolve()
    if not source.is_file():
        return f"FROM {mine['FROM']}: no such file next to the Modelfile"
    file_type = gguf_export.read_gguf_kv(source, "general.file_type")
    if file_type != 7:  # llama.cpp's LLAMA_FTYPE_MOSTLY_Q8_0
        return f"FROM {mine['FROM']} is not the Q8_0 GGUF (its general.file_type is {file_type})"
    if mine["TEMPLATE"] != theirs["TEMPLATE"]:
        return "its TEMPLATE differs from the lesson's: the model would see a prompt it never trained on"
    if mine["PARAMETER"].get("num_ctx") != ["8192"]:
        return f"PARAMETER num_ctx is {mine['PARAMETER'].get('num_ctx')}, want 8192"
    return None


exercise(
    id="06-q4-fraction",
    tier="🐢",
    question="The Q4_K_M file's size as a fraction of the F16 file's (two decimals)",
    hint="files['Q4_K_M'].stat().st_size / files['F16'].stat().st_size",
    needs=("files",),
    expected=_q4_fraction,
    tolerance=0.02,
)
exercise(
    id="06-small4-q4-gib",
    tier="🐕",
    question="GiB of a Q4_K_M GGUF of Mistral Small 4 (119B parameters), one decimal",
    hint="export.plan_export(int(119e9), ('Q4_K_M',)).files['GGUF Q4_K_M'] / 2**30",
    expected=_small4_q4_gib,
    tolerance=0.01,
)
exercise(
    id="06-own-modelfile",
    tier="🦁",
    question="A Modelfile of your own for the Q8_0 GGUF with num_ctx 8192 and the lesson's TEMPLATE",
    hint="start from the lesson's `modelfile` text: change FROM and num_ctx, write it next to the GGUFs",
    needs=("reference",),
    judge=_judge_modelfile,
)


# --- 07 · Serving -----------------------------------------------------------------------------------


def _tokens_per_s(result, **_) -> float:
    return round(sum(result.tokens) / result.wall_seconds, 1)


def _small4_gpus(**_) -> int:
    from course_utils import serve

    return next(
        tp
        for tp in (1, 2, 4, 8)
        if serve.vllm_memory("mistral-small-4", 32768, tp, bytes_per_weight=2)["fits"] == "80 GB"
    )


def _judge_single_client(answer, baseline, **_) -> str | None:
    summary = getattr(answer, "summary", None)
    if summary is None:
        return "give the result of serve.load_test(...)"
    mine, theirs = answer.summary(), baseline.summary()
    if mine["requests"] != 16:
        return f"it sent {mine['requests']} requests, want 16"
    if mine["errors"]:
        return f"{mine['errors']} requests failed, e.g. {answer.errors[0]}: is the server still up?"
    if not mine["p50_latency_s"] < theirs["p50_latency_s"]:
        return (
            f"p50 latency {mine['p50_latency_s']} s is not below the 8-client run's "
            f"{theirs['p50_latency_s']} s: did you pass concurrency=1?"
        )
    return None


exercise(
    id="07-tokens-per-s",
    tier="🐢",
    question="Tokens per second your load test streamed (one decimal)",
    hint="sum(result.tokens) / result.wall_seconds",
    needs=("result",),
    expected=_tokens_per_s,
    tolerance=0.01,
)
exercise(
    id="07-small4-gpus",
    tier="🐕",
    question="80 GB GPUs Mistral Small 4 needs in bf16 at 32k context (tensor-parallel size)",
    hint="the first tp in (1, 2, 4, 8) whose vllm_memory(..., bytes_per_weight=2)['fits'] is '80 GB'",
    expected=_small4_gpus,
)
exercise(
    id="07-single-client",
    tier="🦁",
    question="Your load test again with one client and 16 requests: p50 latency goes down",
    hint="serve.load_test(..., concurrency=1, requests=16) through the same gateway",
    needs=("baseline",),
    judge=_judge_single_client,
)


# --- 08 · Structured output and tools ---------------------------------------------------------------


def _grammar_gain(table, **_) -> float:
    def valid(configuration: str) -> float:
        return next(r for r in table if r["configuration"] == configuration and r["rows"] == "text")[
            "json_valid"
        ]

    return round(valid("base + schema") - valid("base"), 2)


def _judge_bad_arguments(answer, tools, **_) -> str | None:
    from course_utils.tools import validate_call

    verdict = validate_call("convert_currency", answer, tools)
    if verdict.arguments is None:
        return "that is not a JSON object of arguments: the loop would refuse it before the schema"
    if verdict.ok:
        return (
            "the schema accepts these arguments: make one wrong (a missing field, a wrong type, a bad code)"
        )
    return None


def _judge_tax_tool(answer, function, tools, **_) -> str | None:
    from course_utils.tools import run_tool_call

    if not isinstance(answer, dict) or answer.get("function", {}).get("name") != "tax_rate":
        return "give a tool definition: {'type': 'function', 'function': {'name': 'tax_rate', ...}}"
    if not callable(function):
        return "give the function too (function=my_function)"
    called_with = []

    def spy(**arguments):
        called_with.append(arguments)
        return function(**arguments)

    extended = [*tools, answer]
    good = run_tool_call("tax_rate", '{"currency": "GBP"}', extended, {"tax_rate": spy})
    bad = run_tool_call("tax_rate", '{"currency": "BTC"}', extended, {"tax_rate": spy})
    if "0.2" not in good:
        return f"a call for GBP returned {good[:80]!r}, want its rate 0.20"
    if "error" not in bad or len(called_with) != 1:
        return "a call for BTC reached your function: the schema's enum must refuse unknown currencies"
    return None


exercise(
    id="08-base-constrained",
    tier="🐢",
    question="JSON-valid rate the grammar adds to the base model's text rows (two decimals)",
    hint="the json_valid of 'base + schema' minus that of 'base', both on the text rows, rounded to 2",
    needs=("table",),
    expected=_grammar_gain,
    tolerance=0.011,
)
exercise(
    id="08-bad-arguments",
    tier="🐕",
    question="Arguments for convert_currency that are valid JSON but that the loop must refuse",
    hint="parseable JSON (verdict.arguments is set) that still fails the schema (verdict.ok is False)",
    needs=("tools",),
    judge=_judge_bad_arguments,
)
exercise(
    id="08-tax-tool",
    tier="🦁",
    question="A fourth tool, tax_rate(currency), with a schema whose enum refuses unknown currencies",
    hint="a good call returns the GBP rate; an unknown currency is refused by your schema's enum",
    needs=("function", "tools"),
    judge=_judge_tax_tool,
)
