"""Lesson 08's tool-use dataset, its template (token for token against mistral-common), call parsing and
validation, the agent-loop plumbing, and the structured-output request builders."""

import json
import re

import pytest

from course_utils import serve, tools
from course_utils.paths import course_root

DATA = course_root() / "data" / "tools"


@pytest.fixture(scope="module")
def rows():
    return {split: tools.load_tool_split(split, DATA) for split in ("train", "val", "test")}


@pytest.fixture(scope="module")
def tokenizer(processor):
    return processor.tokenizer


def test_committed_dataset_regenerates_byte_identical(tmp_path):
    counts = tools.generate_tool_dataset(tmp_path, seed=0)
    assert counts == tools.SPLITS
    for split in counts:
        assert (tmp_path / f"{split}.jsonl").read_bytes() == (DATA / f"{split}.jsonl").read_bytes(), split


def test_another_seed_gives_other_rows(tmp_path):
    tools.generate_tool_dataset(tmp_path, seed=1, splits={"test": 5})
    assert (tmp_path / "test.jsonl").read_text() != "".join(
        (DATA / "test.jsonl").read_text().splitlines(keepends=True)[:5]
    )


def test_rows_follow_mistrals_rules(rows):
    all_rows = [r for split in rows.values() for r in split]
    assert sum(len(v) for v in rows.values()) == sum(tools.SPLITS.values())
    names = set()
    for row in all_rows:
        assert tools.check_row(row) == [], row["id"]
        assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant", "tool", "assistant"]
        (call,) = row["messages"][2]["tool_calls"]
        assert re.fullmatch(r"[A-Za-z0-9]{9}", call["id"]) and call["type"] == "function"
        arguments = call["function"]["arguments"]
        assert isinstance(arguments, str) and arguments == json.dumps(
            json.loads(arguments), ensure_ascii=False
        )
        tool = row["messages"][3]
        assert tool["tool_call_id"] == call["id"] and tool["name"] == call["function"]["name"]
        # the result is what the Python function returns for those arguments
        expected = tools.FUNCTIONS[tool["name"]](**json.loads(arguments))
        assert json.loads(tool["content"]) == expected
        names.add(tool["name"])
    assert names == set(tools.FUNCTIONS)
    receipts = [r["messages"][1]["content"] for r in all_rows]
    assert len(set(receipts)) == len(receipts), "a receipt appears twice (leakage across splits)"


def test_check_row_names_the_broken_field(rows):
    row = json.loads(json.dumps(rows["test"][0]))
    row["messages"][2]["tool_calls"][0]["id"] = "call_1"
    row["messages"][3]["tool_call_id"] = "zzzzzzzzz"
    problems = tools.check_row(row)
    assert any("call id 'call_1'" in p for p in problems)
    assert any("answers no call" in p for p in problems)


def test_every_row_renders_like_mistral_common(rows, tokenizer):
    for row in [r for split in rows.values() for r in split]:
        assert tools.render_ids(tokenizer, row["messages"], row["tools"]) == tools.reference_tool_token_ids(
            row["messages"], row["tools"]
        ), row["id"]
        prompt = tools.prompt_messages(row)
        assert tools.render_ids(tokenizer, prompt, row["tools"]) == tools.reference_tool_token_ids(
            prompt, row["tools"]
        ), row["id"]


def test_template_matches_for_several_calls_content_and_a_later_user_turn(tokenizer):
    call = {"type": "function", "function": {"name": "sum_amounts", "arguments": '{"amounts": [1.5, 2]}'}}
    messages = [
        {"role": "user", "content": "Hi é"},
        {
            "role": "assistant",
            "content": "Let me add.",
            "tool_calls": [{**call, "id": "abcdefghi"}, {**call, "id": "ABCDEFGH1"}],
        },
        {"role": "tool", "tool_call_id": "abcdefghi", "name": "sum_amounts", "content": '{"sum": 3.5}'},
        {"role": "tool", "tool_call_id": "ABCDEFGH1", "name": "sum_amounts", "content": '{"sum": 3.5}'},
        {"role": "assistant", "content": "3.5 twice."},
        {"role": "user", "content": "Thanks"},
    ]
    assert tools.render_ids(tokenizer, messages, tools.TOOLS) == tools.reference_tool_token_ids(
        messages, tools.TOOLS
    )


def test_plain_jinja_serving_prompt_is_the_same_text(rows, tokenizer):
    row = rows["val"][3]
    prompt = tools.prompt_messages(row)
    text = tokenizer.decode(tools.render_ids(tokenizer, prompt, row["tools"]), skip_special_tokens=False)
    assert tools.render_prompt(prompt, row["tools"]) == text


def test_labels_cover_the_call_and_the_answer_only(rows, tokenizer):
    example = tools.tokenize_tool_record(rows["train"][0], tokenizer)
    trained = tokenizer.decode(
        [t for t, label in zip(example["input_ids"], example["labels"]) if label != -100],
        skip_special_tokens=False,
    )
    call = rows["train"][0]["messages"][2]["tool_calls"][0]
    answer = rows["train"][0]["messages"][4]["content"]
    assert trained.startswith("[TOOL_CALLS][")
    assert trained.endswith("</s>" + answer + "</s>")
    assert call["id"] in trained and "[TOOL_RESULTS]" not in trained and "[AVAILABLE_TOOLS]" not in trained


@pytest.mark.parametrize(
    "reply, ok",
    [
        (
            '[TOOL_CALLS][{"name": "sum_amounts", "arguments": {"amounts": [1, 2.5]}, "id": "a1b2c3d4e"}]',
            True,
        ),
        ('[TOOL_CALLS][{"name": "lookup_merchant", "arguments": {"name": "Taco Loco"}}]</s>', True),
        ('[TOOL_CALLS][{"name": "sum_amounts", "arguments": {"amounts": "12"}}]', False),  # schema
        ('[TOOL_CALLS][{"name": "delete_files", "arguments": {}}]', False),  # unknown tool
        ('[TOOL_CALLS][{"name": "sum_amounts", "arguments": {"amounts": [1]', False),  # cut off
        ('{"name": "sum_amounts", "arguments": {"amounts": [1]}}', False),  # no [TOOL_CALLS]
        ("", False),
        # the trained format is a list of calls with an object of arguments
        ('[TOOL_CALLS]{"name": "sum_amounts", "arguments": {"amounts": [1]}}', False),
        ('[TOOL_CALLS][{"name": "sum_amounts", "arguments": "{\\"amounts\\": [1]}"}]', False),
        ('[TOOL_CALLS][{"name": ["sum_amounts"], "arguments": {}}]', False),  # a list is no name
    ],
)
def test_well_formed_calls(reply, ok):
    assert tools.call_is_well_formed(reply, tools.TOOLS) is ok


def test_rate_counts_replies():
    good = '[TOOL_CALLS][{"name": "sum_amounts", "arguments": {"amounts": [1]}}]'
    assert tools.well_formed_rate([good, "nope", good, good], tools.TOOLS) == 0.75


def test_validate_call_says_which_argument_is_wrong():
    verdict = tools.validate_call(
        "convert_currency", '{"amount": 3, "from_currency": "EUR", "to_currency": "BTC"}', tools.TOOLS
    )
    assert not verdict.ok and "to_currency" in verdict.error and "BTC" in verdict.error
    assert "not JSON" in tools.validate_call("sum_amounts", "{amounts: [1]}", tools.TOOLS).error


def test_run_tool_call_never_executes_bad_arguments_or_unknown_tools():
    called = []
    functions = {"sum_amounts": lambda amounts: called.append(amounts) or {"sum": 0}}
    refused = json.loads(
        tools.run_tool_call("sum_amounts", '{"amounts": "1; rm -rf /"}', tools.TOOLS, functions)
    )
    assert "error" in refused and called == []
    unknown = json.loads(tools.run_tool_call("delete_files", "{}", tools.TOOLS, functions))
    assert "unknown tool 'delete_files'" in unknown["error"] and called == []
    assert json.loads(tools.run_tool_call("sum_amounts", '{"amounts": [2]}', tools.TOOLS, functions)) == {
        "sum": 0
    }
    assert called == [[2]]


def test_tool_functions_compute_what_they_say():
    assert tools.convert_currency(11.0, "USD", "EUR") == {"amount": 10.0, "currency": "EUR"}
    assert tools.convert_currency(1.0, "EUR", "JPY") == {"amount": 160, "currency": "JPY"}
    assert tools.sum_amounts([0.1, 0.2]) == {"sum": 0.3}
    assert tools.lookup_merchant("Nowhere Inc")["found"] is False
    assert tools.lookup_merchant("Taco Loco")["found"] is True


def test_transcript_rows_shorten_and_show_calls(rows):
    table = tools.transcript_rows(rows["test"][0]["messages"], width=40)
    assert [r["role"] for r in table] == ["system", "user", "assistant", "tool", "assistant"]
    assert table[2]["message"].startswith(rows["test"][0]["messages"][2]["tool_calls"][0]["function"]["name"])
    assert all(len(r["message"]) <= 40 for r in table)


# --- structured-output request bodies ------------------------------------------------------------

SCHEMA = {"type": "object", "properties": {"total": {"type": "number"}}, "required": ["total"]}
MESSAGES = [{"role": "user", "content": "Total?"}]


def test_vllm_body_has_openais_json_schema_shape():
    body = serve.vllm_structured_request("m", MESSAGES, SCHEMA)
    assert serve.check_openai_structured_request(body) == []
    assert body["response_format"]["json_schema"]["schema"] == SCHEMA


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: b["response_format"].update(type="json"), "type"),
        (lambda b: b["response_format"].pop("json_schema"), "json_schema"),
        (lambda b: b["response_format"]["json_schema"].pop("name"), "name"),
        (lambda b: b["response_format"]["json_schema"].update(schema={"type": "objet"}), "not a JSON schema"),
        (lambda b: b.pop("response_format"), "response_format"),
    ],
)
def test_openai_shape_check_catches_mistakes(mutate, message):
    body = serve.vllm_structured_request("m", MESSAGES, SCHEMA)
    mutate(body)
    problems = serve.check_openai_structured_request(body)
    assert problems and any(message in p for p in problems), problems


def test_vllm_schema_name_rule():
    with pytest.raises(ValueError, match="schema name"):
        serve.vllm_structured_request("m", MESSAGES, SCHEMA, name="has space")


def test_ollama_body_and_its_check():
    body = serve.ollama_structured_request("receipts-extractor", MESSAGES, SCHEMA)
    assert serve.check_ollama_structured_request(body) == [] and body["format"] == SCHEMA
    assert serve.check_ollama_structured_request({**body, "format": {"type": 3}})
    assert any(
        "response_format" in p for p in serve.check_ollama_structured_request({**body, "response_format": 1})
    )
    assert serve.check_ollama_structured_request({**body, "format": "json"}) == []


def test_llama_cpp_format_and_tool_server_command(tmp_path):
    assert serve.llama_cpp_response_format(SCHEMA) == {"type": "json_object", "schema": SCHEMA}
    server = serve.llama_tool_server(tmp_path / "m.gguf")
    assert server.command[-2:] == ["--chat_format", "mistral-tools"] and "127.0.0.1" in server.command


def test_wanted_tool_is_the_first_calls_name(rows):
    names = {tools.wanted_tool(r) for r in rows["test"]}
    assert names == {t["function"]["name"] for t in tools.TOOLS}
    assert tools.wanted_tool({"messages": [{"role": "user", "content": "hi"}]}) is None


def test_validate_call_takes_a_tool_without_parameters_and_refuses_a_name_that_is_no_string():
    ping = [{"type": "function", "function": {"name": "ping", "description": "are you there?"}}]
    assert tools.validate_call("ping", "{}", ping).ok  # OpenAI lets a tool omit its parameters
    verdict = tools.validate_call(["sum_amounts"], "{}", tools.TOOLS)
    assert not verdict.ok and "unknown tool" in verdict.error


def test_call_ids_are_counted_apart_from_well_formedness():
    good = '[TOOL_CALLS][{"name": "sum_amounts", "arguments": {"amounts": [1]}, "id": "a1b2c3d4e"}]'
    short = '[TOOL_CALLS][{"name": "sum_amounts", "arguments": {"amounts": [1]}, "id": "X"}]'
    none = '[TOOL_CALLS][{"name": "sum_amounts", "arguments": {"amounts": [1]}}]'
    assert tools.well_formed_rate([good, short, none], tools.TOOLS) == 1.0
    assert tools.call_ids_valid_rate([good, short, none, "no call"]) == 0.25


def test_run_tool_call_reports_a_failing_tool_and_a_result_json_cannot_hold():
    import datetime

    def broken(amounts):
        raise ZeroDivisionError("division by zero")

    failed = json.loads(
        tools.run_tool_call("sum_amounts", '{"amounts": [1]}', tools.TOOLS, {"sum_amounts": broken})
    )
    assert "sum_amounts failed: ZeroDivisionError" in failed["error"]
    dated = {"sum_amounts": lambda amounts: {"on": datetime.date(2024, 2, 1)}}
    assert json.loads(tools.run_tool_call("sum_amounts", '{"amounts": [1]}', tools.TOOLS, dated)) == {
        "on": "2024-02-01"
    }
