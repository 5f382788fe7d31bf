"""Nothing dropped without a word (weights, system prompts, unknown keys), tool-calling rows checked by
Mistral's rules, and the TRL / mistral-finetune formats."""

import copy
import json
from pathlib import Path

import pytest

from course_utils.cli import main
from course_utils.data import (
    IGNORE_INDEX,
    DataFormatError,
    check_plateforme,
    check_record,
    check_tool_calls,
    fix_tool_call_ids,
    from_alpaca,
    from_sharegpt,
    record_key,
    split_records,
    to_canonical,
    to_plateforme,
    tokenize_record,
    validate_file,
    validate_rows,
    write_jsonl,
)

FIXTURES = Path(__file__).resolve().parent.parent / "data" / "examples"  # shipped: lesson 03 shows them


def fixture_rows(name: str) -> list[dict]:
    text = (FIXTURES / name).read_text()
    return json.loads(text) if name.endswith(".json") else [json.loads(line) for line in text.splitlines()]


def report_of(*rows, **kwargs):
    return validate_rows(list(enumerate(rows, start=1)), "d.jsonl", **kwargs)


MISTRAL_TOOLS = fixture_rows("mistral_function_calling.jsonl")[0]
OPENAI_TOOLS = fixture_rows("openai_tool_calls.jsonl")[0]


# --- weights ------------------------------------------------------------------------------------


def weighted(first: object = 0, second: object = 1) -> dict:
    return {
        "messages": [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "Five.", "weight": first},
            {"role": "user", "content": "Sure?"},
            {"role": "assistant", "content": "Four.", "weight": second},
        ]
    }


def test_weights_survive_conversion_validation_writing_splits_and_plateforme(tmp_path):
    report = validate_file(FIXTURES / "plateforme_weights.jsonl")
    assert report.ok
    assert [m.get("weight") for m in report.valid[0]["messages"]] == [None, None, 0, None, 1]
    out = write_jsonl(report.valid, tmp_path / "clean.jsonl")
    again = validate_file(out)
    assert again.valid == report.valid  # round trip: every weight and system prompt kept
    splits, _ = split_records(report.valid * 3, fractions=(1.0, 0.0, 0.0))
    assert any(m.get("weight") == 0 for r in splits["train"] for m in r["messages"])
    row = to_plateforme(report.valid[0])
    assert row["messages"][2] == {"role": "assistant", "content": "Five.", "weight": 0}
    assert check_plateforme(row) == []


@pytest.mark.parametrize("bad", [0.5, "0", True, 2, -1])  # null = absent (Arrow fills missing keys)
def test_a_weight_other_than_0_or_1_names_the_row_and_turn(bad):
    report = report_of(weighted(bad))
    assert [str(i) for i in report.issues] == [
        f"d.jsonl:1:messages[1].weight: must be 0 or 1 (0 = not trained on), got {bad!r}"
    ]


def test_weights_belong_to_assistant_turns_and_one_must_train():
    on_user = {
        "messages": [{"role": "user", "content": "q", "weight": 1}, {"role": "assistant", "content": "a"}]
    }
    assert check_record(on_user) == [
        ("messages[0].weight", "only assistant turns may carry a weight, not user")
    ]
    assert ("messages", "every assistant turn has weight 0: nothing to train on") in check_record(
        weighted(0, 0)
    )


def test_rows_differing_only_by_weight_are_not_duplicates():
    report = report_of(weighted(0, 1), weighted(1, 1))
    assert report.ok and len(report.valid) == 2
    assert record_key(weighted(1, 1)) == record_key(
        {"messages": [{k: v for k, v in m.items() if k != "weight"} for m in weighted(1, 1)["messages"]]}
    )  # weight 1 is the default


def test_a_weight_0_turn_contributes_no_loss(processor):
    example = tokenize_record(weighted(0, 1), processor)
    trained = [t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX]
    assert processor.tokenizer.decode(trained) == "Four.</s>"
    both = tokenize_record(weighted(1, 1), processor)
    assert processor.tokenizer.decode(
        [t for t, lab in zip(both["input_ids"], both["labels"]) if lab != IGNORE_INDEX]
    ) == ("Five.</s>Four.</s>")


# --- system prompts and unknown keys --------------------------------------------------------------


def test_system_prompts_of_every_format_are_kept():
    sharegpt = from_sharegpt(
        {"system": "S", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    )
    assert sharegpt["messages"][0] == {"role": "system", "content": "S"}
    alpaca = from_alpaca({"instruction": "q2", "output": "a2", "system": "S", "history": [["q1", "a1"]]})
    assert [(m["role"], m["content"]) for m in alpaca["messages"]] == [
        ("system", "S"),
        ("user", "q1"),
        ("assistant", "a1"),
        ("user", "q2"),
        ("assistant", "a2"),
    ]
    finetune = to_canonical(fixture_rows("mistral_finetune_interactions.jsonl")[0])
    assert finetune["messages"][0] == {"role": "system", "content": "You answer questions about cities."}
    assert finetune["messages"][1] == {"role": "user", "content": "Where is Lyon?"}  # "text" content
    with pytest.raises(DataFormatError, match="system_prompt: a system prompt is given twice"):
        to_canonical({"system_prompt": "A", "messages": [{"role": "system", "content": "B"}]})


def test_write_valid_keeps_system_prompts_of_json_arrays(tmp_path):
    report = validate_file(FIXTURES / "alpaca_llamafactory.json")
    out = write_jsonl(report.valid, tmp_path / "out.jsonl")
    assert validate_file(out).valid == report.valid
    assert report.valid[2]["messages"][0] == {"role": "system", "content": "You are a translator."}
    assert len(report.valid[2]["messages"]) == 5  # history kept


def test_a_system_message_later_says_what_mistral_common_accepts():
    row = {
        "messages": [
            {"role": "user", "content": "q"},
            {"role": "system", "content": "s"},
            {"role": "assistant", "content": "a"},
        ]
    }
    (problem,) = check_record(row)
    assert (
        problem[0] == "messages[1].role" and "mistral-common v7 accepts one after a user turn" in problem[1]
    )


def test_unknown_keys_are_counted_per_file_with_their_first_row(capsys, tmp_path):
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"q{i}", "name": "bob"},
                {"role": "assistant", "content": "a"},
            ],
            "source": "web",
        }
        for i in range(3)
    ]
    rows[0].pop("source")
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = validate_file(path)
    assert report.ok
    assert report.notes == [
        f"{path}: field 'messages[].name' is not part of the openai format: ignored in 3 row(s), "
        "first at row 1 (it is not in --write-valid's output)",
        f"{path}: field 'source' is not part of the openai format: ignored in 2 row(s), first at row 2 "
        "(it is not in --write-valid's output)",
    ]
    assert main(["data", "validate", str(path)]) == 0
    assert "note: " in capsys.readouterr().out


# --- TRL and mistral-finetune formats -------------------------------------------------------------


def test_trl_prompt_completion_rows_both_kinds():
    report = validate_file(FIXTURES / "trl_prompt_completion.jsonl")
    assert report.ok
    assert [m["role"] for m in report.valid[0]["messages"]] == ["system", "user", "assistant"]
    assert report.valid[1]["messages"] == [
        {"role": "user", "content": "The sky is"},
        {"role": "assistant", "content": " blue."},
    ]
    assert any(
        "plain prompt/completion row(s) (first at row 2)" in n and "raw text" in n for n in report.notes
    )


def test_text_rows_validate_and_train_on_every_token(processor):
    report = validate_file(FIXTURES / "trl_text.jsonl")
    assert report.ok and report.valid[0] == {"text": "The sky is blue. Grass is green."}
    example = tokenize_record(report.valid[0], processor)
    assert example["labels"][0] == IGNORE_INDEX and example["labels"][1:] == example["input_ids"][1:]
    assert processor.tokenizer.decode(example["input_ids"]) == "<s>The sky is blue. Grass is green.</s>"
    assert report_of({"text": "  "}).issues[0].field == "text"
    with pytest.raises(DataFormatError, match="chat rows"):
        to_plateforme(report.valid[0])


# --- tool calling -------------------------------------------------------------------------------


def test_mistrals_documented_function_calling_row_validates():
    report = validate_file(FIXTURES / "mistral_function_calling.jsonl")
    assert report.ok, [str(i) for i in report.issues]
    record = report.valid[0]
    assert check_tool_calls(record) == []
    assert (
        record["messages"][2]["tool_calls"][0]["id"] == "Wq2bN7kZp"
        and record["tools"][0]["function"]["name"] == "get_weather"
    )
    assert check_plateforme(to_plateforme(record)) == []  # la Plateforme's rules agree with Mistral's docs


def test_lesson_08s_tool_rows_with_named_tool_results_validate():
    row = copy.deepcopy(MISTRAL_TOOLS)
    row["messages"][3]["name"] = "get_weather"
    row["messages"][2]["content"] = ""
    assert check_record(to_canonical(row)) == []
    row["messages"][3]["name"] = "get_time"
    assert check_tool_calls(to_canonical(row)) == [
        ("messages[3].name", "'get_time' but call Wq2bN7kZp called 'get_weather'")
    ]


def test_openai_ids_are_rejected_with_the_rule_and_accepted_after_the_opt_in_fix(tmp_path, capsys):
    report = report_of(OPENAI_TOOLS)
    fields = [i.field for i in report.issues]
    assert fields == ["messages[1].tool_calls[0].id", "messages[1].tool_calls[1].id"]
    assert "must be exactly 9 characters [A-Za-z0-9]" in report.issues[0].reason
    assert "--fix-tool-call-ids" in report.issues[0].reason
    fixed = report_of(OPENAI_TOOLS, fix_tool_call_ids=True)
    assert fixed.ok and len(fixed.fixes) == 4
    messages = fixed.valid[0]["messages"]
    ids = [c["id"] for c in messages[1]["tool_calls"]]
    assert [messages[2]["tool_call_id"], messages[3]["tool_call_id"]] == ids  # consistent in the row
    assert all(len(i) == 9 and i.isalnum() for i in ids) and ids[0] != ids[1]
    assert fixed.fixes[0].startswith(
        "d.jsonl:1:messages[1].tool_calls[0].id: 'call_Hk2PqV8sLmW3xYt6RnB0cZa1' → "
    )
    assert report_of(OPENAI_TOOLS, fix_tool_call_ids=True).valid == fixed.valid  # deterministic
    path = FIXTURES / "openai_tool_calls.jsonl"
    assert main(["data", "validate", str(path)]) == 1
    assert (
        main(
            ["data", "validate", str(path), "--fix-tool-call-ids", "--write-valid", str(tmp_path / "o.jsonl")]
        )
        == 0
    )
    assert "fixed: " in capsys.readouterr().out
    assert validate_file(tmp_path / "o.jsonl").ok


def test_fix_tool_call_ids_leaves_good_ids_alone():
    record = to_canonical(MISTRAL_TOOLS)
    before = copy.deepcopy(record)
    assert fix_tool_call_ids(record) == [] and record == before


def tool_row(**changes) -> dict:
    """Mistral's documented row with one change: message index → replacement message (or key → value)."""
    row = copy.deepcopy(MISTRAL_TOOLS)
    for key, value in changes.items():
        if key.startswith("m"):
            row["messages"][int(key[1:])] = value
        else:
            row[key] = value
    return row


CALL = {
    "id": "Wq2bN7kZp",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Lyon"}'},
}


def call(**function) -> dict:
    return {"role": "assistant", "tool_calls": [dict(CALL, function=dict(CALL["function"], **function))]}


@pytest.mark.parametrize(
    "row, field, reason",
    [
        (
            tool_row(m2=call(arguments={"city": "Lyon"})),
            "messages[2].tool_calls[0].function.arguments",
            "must be a JSON string, got dict",
        ),
        (
            tool_row(m2=call(arguments='["Lyon"]')),
            "messages[2].tool_calls[0].function.arguments",
            "a JSON object encoded as a string",
        ),
        (
            tool_row(m2=call(name="get_time")),
            "messages[2].tool_calls[0].function.name",
            "is not one of the row's tools",
        ),
        (
            tool_row(m2=call(name="get weather")),
            "messages[2].tool_calls[0].function.name",
            "must be 1-64 characters",
        ),
        (
            tool_row(m2={"role": "assistant", "tool_calls": [dict(CALL, type="retrieval")]}),
            "messages[2].tool_calls[0].type",
            "must be 'function'",
        ),
        (
            tool_row(m2={"role": "assistant", "tool_calls": [dict(CALL, id="abc")]}),
            "messages[2].tool_calls[0].id",
            "exactly 9 characters",
        ),
        (
            tool_row(m3={"role": "tool", "content": "14", "tool_call_id": "Zz9Zz9Zz9"}),
            "messages[3].tool_call_id",
            "matches no earlier tool call",
        ),
        (tool_row(m3={"role": "tool", "content": "14"}), "messages[3].tool_call_id", "missing"),
        (
            tool_row(m3={"role": "tool", "content": {"t": 14}, "tool_call_id": "Wq2bN7kZp"}),
            "messages[3].content",
            "must be a string",
        ),
        (
            tool_row(m3={"role": "user", "content": "hmm"}),
            "messages[3]",
            "got no tool result before this message",
        ),
        (tool_row(m2={"role": "assistant", "content": None}), "messages[2].content", "got NoneType"),
        (tool_row(m2={"role": "assistant", "tool_calls": []}), "messages[2].tool_calls", "non-empty list"),
        (
            tool_row(
                tools=[
                    {
                        "type": "function",
                        "function": {"name": "get_weather", "parameters": {"type": "nonsense"}},
                    }
                ]
            ),
            "tools[0].function.parameters",
            "not a valid JSON schema",
        ),
        (tool_row(tools={"get_weather": {}}), "tools", "must be a list"),
        (
            tool_row(m4={"role": "tool", "content": "again", "tool_call_id": "Wq2bN7kZp"}),
            "messages[4].tool_call_id",
            "already has a result",
        ),
    ],
)
def test_each_tool_rule_names_the_field(row, field, reason):
    report = report_of(row)
    assert report.invalid_rows == [1]
    assert any(i.field == field and reason in i.reason for i in report.issues), [
        str(i) for i in report.issues
    ]


@pytest.mark.parametrize("call_id, kind", [(["Wq2bN7kZp"], "list"), (123456789, "int"), ({"id": 1}, "dict")])
def test_a_tool_call_id_that_is_not_a_string_says_so_not_missing(call_id, kind):
    report = report_of(tool_row(m3={"role": "tool", "content": "14", "tool_call_id": call_id}))
    assert [(i.field, i.reason) for i in report.issues] == [
        ("messages[3].tool_call_id", f"must be a string (the id of the call it answers), got {kind}")
    ]  # one problem: the call it stood for is not reported unanswered as well


def test_tool_calls_given_as_one_object_say_it_must_be_a_list_without_follow_on_errors():
    one_call = {"role": "assistant", "tool_calls": CALL}
    report = report_of(tool_row(m2=one_call))
    assert [(i.field, i.reason) for i in report.issues] == [
        ("messages[2].tool_calls", "must be a list of calls, got dict (wrap a single call in [ ])")
    ]
    then_user = tool_row(m2=one_call, m3={"role": "user", "content": "Well?"})
    assert [i.field for i in report_of(then_user).issues] == ["messages[2].tool_calls"]
    as_text = report_of(tool_row(m2={"role": "assistant", "tool_calls": "get_weather(Lyon)"}))
    assert [(i.field, i.reason) for i in as_text.issues] == [
        ("messages[2].tool_calls", "must be a list of calls, got str (wrap a single call in [ ])")
    ]


def test_huge_values_are_cut_short_in_every_message():
    huge = "x" * 1_000_000
    rows = [
        {"messages": [{"role": huge, "content": "a"}, {"role": "assistant", "content": "b"}]},
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b", "weight": huge},
            ]
        },
        {"messages": [{"role": "user", "content": [{"type": huge}]}, {"role": "assistant", "content": "b"}]},
        {
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "a"}]},
                {"role": "assistant", "content": "b"},
            ],
            "images": [huge],  # a pasted base64 image without its data: prefix
        },
        {"conversations": [{"from": huge, "value": "a"}]},
        {"instruction": "i", "output": "o", "history": huge},
        tool_row(m3={"role": "tool", "content": "14", "tool_call_id": huge}),
        tool_row(m2={"role": "assistant", "tool_calls": [dict(CALL, id=huge)]}),
        tool_row(m2=call(name=huge)),
        tool_row(m3={"role": "tool", "content": "14", "tool_call_id": "Wq2bN7kZp", "name": huge}),
        {huge: 1},
    ]
    report = report_of(*rows)
    assert report.invalid_rows == list(range(1, len(rows) + 1))
    for issue in report.issues:
        assert len(str(issue)) < 400, str(issue)[:300]
    assert "…" in str(report.issues[0]) and "'xxxxxxxx" in str(report.issues[0])
    assert [i.field for i in report.issues if i.row == 4] == ["images[0]"]  # not "(row): cannot be checked"
    fixed = report_of(
        tool_row(m2={"role": "assistant", "tool_calls": [dict(CALL, id="c" + huge)]}), fix_tool_call_ids=True
    )
    assert fixed.fixes and all(len(f) < 400 for f in fixed.fixes)
    notes = report_of({**tool_row(), "x" + huge: 1}).notes
    assert notes and all(len(n) < 400 for n in notes)


def test_duplicate_call_ids_in_a_row_are_reported():
    row = copy.deepcopy(MISTRAL_TOOLS)
    row["messages"][6]["tool_calls"][0]["id"] = "Wq2bN7kZp"
    assert ("messages[6].tool_calls[0].id", "'Wq2bN7kZp' is used twice in this row") in check_tool_calls(
        to_canonical(row)
    )


def test_llamafactory_function_call_turns_become_tool_calls():
    report = validate_file(FIXTURES / "sharegpt_tools_llamafactory.json")
    assert report.ok, [str(i) for i in report.issues]
    messages = report.valid[0]["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant"]
    call = messages[1]["tool_calls"][0]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Lyon"}'}
    assert messages[2]["tool_call_id"] == call["id"] and len(call["id"]) == 9
    assert report.valid[0]["tools"][0] == {
        "type": "function",
        "function": fixture_rows("mistral_function_calling.jsonl")[0]["tools"][0]["function"],
    }


def test_a_template_that_cannot_render_a_row_is_a_row_problem_not_a_crash(processor):
    report = report_of(MISTRAL_TOOLS, processor=processor, max_seq_length=4096)
    assert report.invalid_rows in ([], [1])  # [1] while the course's template has no tool support
    assert all(i.field == "(tokens)" for i in report.issues)


def mistral_common_verdict(record: dict) -> str:
    """What mistral-common's own v7 validator (fine-tuning mode) says about a canonical record."""
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.validator import ValidationMode, get_validator
    from mistral_common.tokens.tokenizers.base import TokenizerVersion

    messages = [{k: v for k, v in m.items() if k != "weight"} for m in record["messages"]]
    try:
        request = ChatCompletionRequest(messages=messages, tools=record.get("tools"))
        get_validator(TokenizerVersion.v7, ValidationMode.finetuning).validate_request(request)
    except Exception as exc:
        return f"rejected: {exc}"
    return "accepted"


def test_the_tool_rules_agree_with_mistral_commons_validator():
    documented = to_canonical(MISTRAL_TOOLS)
    llamafactory = validate_file(FIXTURES / "sharegpt_tools_llamafactory.json").valid[0]
    fixed = report_of(OPENAI_TOOLS, fix_tool_call_ids=True).valid[0]
    for record in (documented, llamafactory, fixed):
        assert check_record(record) == [] and mistral_common_verdict(record) == "accepted"
    openai = to_canonical(OPENAI_TOOLS)
    assert check_record(openai) and "length of 9" in mistral_common_verdict(openai)
    bad_schema = tool_row(
        tools=[{"type": "function", "function": {"name": "get_weather", "parameters": {"type": 5}}}]
    )
    assert check_record(to_canonical(bad_schema)) and "Invalid tool schema" in mistral_common_verdict(
        to_canonical(bad_schema)
    )


def test_alpaca_rows_with_an_images_list_keep_every_image():
    record = from_alpaca({"instruction": "Compare.", "output": "Same.", "images": ["a.png", "b.png"]})
    assert record["images"] == ["a.png", "b.png"]
    assert record["messages"][0]["content"] == [
        {"type": "image"},
        {"type": "image"},
        {"type": "text", "text": "Compare."},
    ]


@pytest.mark.parametrize(
    "name", ["mistral_function_calling.jsonl", "openai_tool_calls.jsonl", "sharegpt_tools_llamafactory.json"]
)
def test_tool_rows_train_through_the_course_tokenization_as_mistral_common_encodes_them(processor, name):
    """Every tool-calling shape lesson 03 accepts becomes a training example: the v7 stand-in's own template
    knows no tool calls, so the course's tool template renders it — token for token mistral-common's."""
    from course_utils.tools import reference_tool_token_ids

    report = validate_file(FIXTURES / name, fix_tool_call_ids=True)
    assert report.valid, report.issues
    for row in report.valid:
        example = tokenize_record(row, processor)
        unweighted = [{k: v for k, v in m.items() if k != "weight"} for m in row["messages"]]
        assert example["input_ids"] == reference_tool_token_ids(unweighted, row.get("tools"))
        trained = processor.tokenizer.decode(
            [t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX]
        )
        calls = [m for m in row["messages"] if m.get("tool_calls")]
        assert trained.count("[TOOL_CALLS]") == len(calls) and "[TOOL_RESULTS]" not in trained
        answers = [m["content"] for m in row["messages"] if m["role"] == "assistant" and m.get("content")]
        assert all(answer.rstrip(" ") in trained for answer in answers)
