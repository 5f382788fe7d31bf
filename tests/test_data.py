import json
import subprocess
import sys

import pytest
from PIL import Image

from course_utils.data import (
    IGNORE_INDEX,
    DataFormatError,
    check_plateforme,
    count_tokens,
    detect_format,
    from_alpaca,
    from_hf_dataset,
    from_openai,
    from_plateforme,
    from_sharegpt,
    length_stats,
    record_key,
    render_label_mask,
    response_only_labels,
    split_records,
    to_canonical,
    to_plateforme,
    tokenize_record,
    validate_file,
    write_jsonl,
)

OK = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}


# --- converters ---------------------------------------------------------------------------------


def test_alpaca_with_and_without_input():
    assert from_alpaca({"instruction": "Add", "input": "2+2", "output": "4"})["messages"] == [
        {"role": "user", "content": "Add\n\n2+2"},
        {"role": "assistant", "content": "4"},
    ]
    rec = from_alpaca({"instruction": "Say hi", "input": "", "output": "hi"}, system="Be brief.")
    assert [m["role"] for m in rec["messages"]] == ["system", "user", "assistant"]
    with pytest.raises(DataFormatError, match="output: missing"):
        from_alpaca({"instruction": "x"})


def test_sharegpt_maps_speakers_and_image_placeholders():
    rec = from_sharegpt(
        {
            "conversations": [
                {"from": "system", "value": "S"},
                {"from": "human", "value": "<image>\nWhat is it?"},
                {"from": "gpt", "value": "A cat"},
            ],
            "image": "cat.png",
        }
    )
    assert [m["role"] for m in rec["messages"]] == ["system", "user", "assistant"]
    assert rec["messages"][1]["content"] == [{"type": "image"}, {"type": "text", "text": "What is it?"}]
    assert rec["images"] == ["cat.png"]
    with pytest.raises(DataFormatError, match=r"conversations\[0\].from: unknown speaker 'robot'"):
        from_sharegpt({"conversations": [{"from": "robot", "value": "x"}]})


def test_openai_image_url_parts_become_images():
    rec = from_openai(
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Read"},
                        {"type": "image_url", "image_url": {"url": "https://x/y.png"}},
                    ],
                },
                {"role": "assistant", "content": "ok"},
            ]
        }
    )
    assert rec["messages"][0]["content"] == [{"type": "text", "text": "Read"}, {"type": "image"}]
    assert rec["images"] == ["https://x/y.png"]
    with pytest.raises(
        DataFormatError, match=r"messages\[0\].content\[0\].type: unsupported part type 'audio'"
    ):
        from_openai({"messages": [{"role": "user", "content": [{"type": "audio"}]}]})


def test_plateforme_rows_and_format_detection():
    row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 1}]}
    assert from_plateforme(row)["messages"][1] == {"role": "assistant", "content": "a", "weight": 1}
    assert detect_format(row) == "openai"
    assert detect_format({"conversations": []}) == "sharegpt"
    assert detect_format({"instruction": "i", "output": "o"}) == "alpaca"
    assert detect_format({"prompt": "x", "completion": "y"}) == "prompt_completion"
    assert detect_format({"interactions": []}) == "openai" and detect_format({"text": "t"}) == "text"
    with pytest.raises(DataFormatError, match="unknown format"):
        detect_format({"question": "x", "answer": "y"})
    with pytest.raises(DataFormatError, match="preference data"):
        detect_format({"prompt": "x", "chosen": "y", "rejected": "z"})


def test_hf_dataset_rows_convert():
    from datasets import Dataset

    ds = Dataset.from_list(
        [{"instruction": "a", "input": "", "output": "b"}, {"instruction": "c", "input": "d", "output": "e"}]
    )
    recs = from_hf_dataset(ds)
    assert [r["messages"][0]["content"] for r in recs] == ["a", "c\n\nd"]


def test_export_to_plateforme_inlines_images_and_passes_its_rules(tmp_path):
    Image.new("RGB", (20, 10), "red").save(tmp_path / "r.png")
    rec = {
        "messages": [
            {"role": "system", "content": "S"},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
            {"role": "assistant", "content": "red"},
        ],
        "images": ["r.png"],
    }
    row = to_plateforme(rec, tmp_path)
    part = row["messages"][1]["content"][0]
    assert part["type"] == "image_url" and part["image_url"].startswith("data:image/png;base64,")
    assert check_plateforme(row) == []
    bad = {
        "messages": [{"role": "user", "content": "q", "weight": 1}, {"role": "bot", "content": ""}],
        "extra": 1,
    }
    problems = check_plateforme(bad)
    assert any("unexpected top-level keys ['extra']" in p for p in problems)
    assert any("weight" in p for p in problems) and any("'bot'" in p for p in problems)
    assert "the last message must be an assistant message" in problems


# --- validation: one bad file per rule ------------------------------------------------------------


def write_lines(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    "bad_row, field, reason",
    [
        ('{"messages": [', "(json)", "bad JSON"),
        (
            {"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]},
            "messages[0].role",
            "unknown role 'bot'",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "x"},
                    {"role": "system", "content": "s"},
                    {"role": "assistant", "content": "y"},
                ]
            },
            "messages[1].role",
            "system message must come first",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "x"},
                    {"role": "user", "content": "y"},
                    {"role": "assistant", "content": "z"},
                ]
            },
            "messages[1].role",
            "expected assistant",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "x"},
                    {"role": "assistant", "content": "y"},
                    {"role": "user", "content": "z"},
                ]
            },
            "messages[2].role",
            "must end with an assistant reply",
        ),
        (
            {"messages": [{"role": "user", "content": "   "}, {"role": "assistant", "content": "y"}]},
            "messages[0].content",
            "empty",
        ),
        (
            {"messages": [{"role": "user", "content": 42}, {"role": "assistant", "content": "y"}]},
            "messages[0].content",
            "got int",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]},
                    {"role": "assistant", "content": "y"},
                ]
            },
            "images",
            "1 image part(s) in messages but 0 image(s) listed",
        ),
        (
            {
                "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
                "images": ["a.png"],
            },
            "images",
            "0 image part(s) in messages but 1 image(s) listed",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]},
                    {"role": "assistant", "content": "y"},
                ],
                "images": ["missing.png"],
            },
            "images[0]",
            "file not found: missing.png",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]},
                    {"role": "assistant", "content": "y"},
                ],
                "images": ["corrupt.png"],
            },
            "images[0]",
            "cannot be read as an image",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image"}, {"type": "text", "text": "ignore [/INST] this"}],
                    },
                    {"role": "assistant", "content": "y"},
                ],
                "images": ["a.png"],
            },
            "messages[0].content[1].text",
            "control token(s) ['[/INST]'] in a row with images",
        ),
        (OK, "(row)", "exact duplicate of row 1"),
    ],
)
def test_each_rule_names_row_field_and_reason(tmp_path, bad_row, field, reason):
    (tmp_path / "corrupt.png").write_bytes(b"not an image")
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    path = write_lines(tmp_path / "d.jsonl", [OK, bad_row, {"instruction": "i", "output": "o"}])
    report = validate_file(path)
    assert [i.row for i in report.issues] == [2]
    issue = report.issues[0]
    assert issue.field == field and reason in issue.reason
    assert str(issue).startswith(f"{path}:2:{field}: ")
    assert report.valid_rows == [1, 3] and len(report.valid) == 2  # the good rows survive


def test_too_long_rows_are_flagged_with_their_token_count(tmp_path, processor):
    path = write_lines(
        tmp_path / "d.jsonl",
        [
            OK,
            {
                "messages": [
                    {"role": "user", "content": "word " * 200},
                    {"role": "assistant", "content": "ok"},
                ]
            },
        ],
    )
    report = validate_file(path, processor=processor, max_seq_length=64)
    assert report.invalid_rows == [2] and "> max_seq_length 64" in report.issues[0].reason


def test_safe_fixes_are_opt_in_and_reported(tmp_path):
    padded = {"messages": [{"role": "user", "content": "  Hi \n"}, {"role": "assistant", "content": "Hello"}]}
    path = write_lines(tmp_path / "d.jsonl", [OK, padded])
    plain = validate_file(path)
    assert plain.invalid_rows == [] and plain.valid[1]["messages"][0]["content"] == "  Hi \n"  # unchanged
    fixed = validate_file(path, strip_whitespace=True, drop_duplicates=True)
    assert fixed.fixes[0].endswith("2:messages[0].content: stripped leading/trailing whitespace")
    assert fixed.fixes[1].endswith("2:(row): dropped, exact duplicate of row 1")
    assert len(fixed.valid) == 1 and fixed.ok


def test_writing_valid_rows_never_overwrites_and_keeps_images_findable(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (8, 8)).save(src / "a.png")
    row = {
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]},
            {"role": "assistant", "content": "y"},
        ],
        "images": ["a.png"],
    }
    report = validate_file(write_lines(src / "d.jsonl", [row]))
    out = tmp_path / "clean" / "good.jsonl"
    write_jsonl(report.valid, out, base_dir=src)
    assert validate_file(out).ok  # the image path was rewritten relative to the new file
    with pytest.raises(FileExistsError, match="overwrite"):
        write_jsonl(report.valid, out)


def test_cli_validate_reports_every_bad_row_and_writes_good_ones(tmp_path):
    path = write_lines(
        tmp_path / "mixed.jsonl",
        [
            OK,
            "{oops",
            {"instruction": "i", "output": "o"},
            {"messages": [{"role": "assistant", "content": "x"}]},
        ],
    )
    out = tmp_path / "good.jsonl"
    run = subprocess.run(
        [sys.executable, "-m", "course_utils", "data", "validate", str(path), "--write-valid", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1
    assert f"{path}:2:(json): bad JSON" in run.stdout
    assert f"{path}:4:messages[0].role: expected user" in run.stdout
    assert "4 rows, 2 valid, 2 invalid" in run.stdout and "Traceback" not in run.stderr
    assert len(out.read_text().splitlines()) == 2
    missing = subprocess.run(
        [sys.executable, "-m", "course_utils", "data", "validate", str(tmp_path / "nope.jsonl")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 2 and "no such file" in missing.stderr and "Traceback" not in missing.stderr


# --- labels ---------------------------------------------------------------------------------------


def test_structural_labels_equal_the_templates_generation_mask(processor):
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "A2 done"},
    ]
    out = processor.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids = out["input_ids"][0].tolist()
    mask = out["assistant_masks"][0]
    assert response_only_labels(ids) == [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]


def test_vision_rows_train_on_exactly_the_reply_and_eos(processor, tmp_path):
    Image.new("RGB", (100, 70), "white").save(tmp_path / "r.png")
    record = {
        "messages": [
            {"role": "system", "content": "S"},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Read"}]},
            {"role": "assistant", "content": '{"total": 3}'},
        ],
        "images": ["r.png"],
    }
    example = tokenize_record(record, processor, tmp_path)
    trained = [t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX]
    assert processor.tokenizer.decode(trained) == '{"total": 3}</s>'
    image_positions = [i for i, t in enumerate(example["input_ids"]) if t in (10, 12, 13)]
    assert image_positions and all(example["labels"][i] == IGNORE_INDEX for i in image_positions)
    assert "pixel_values" in example
    assert count_tokens(record, processor, tmp_path) == len(example["input_ids"])
    assert "[[" in render_label_mask(example, processor.tokenizer) and "#c8f7c5" in render_label_mask(
        example, processor.tokenizer, html=True
    )


def test_an_example_with_nothing_to_train_on_is_refused(processor):
    record = {
        "messages": [{"role": "user", "content": "long " * 50}, {"role": "assistant", "content": "short"}]
    }
    with pytest.raises(ValueError, match="every label is masked"):
        tokenize_record(record, processor, max_seq_length=20)  # truncation cut the reply off


# --- statistics and splits ------------------------------------------------------------------------


def test_length_stats_by_hand():
    stats = length_stats(list(range(1, 101)), max_seq_length=90)
    assert (stats["p50"], stats["p90"], stats["p99"], stats["max"]) == (50, 90, 99, 100)
    assert stats["recommended_max_seq_length"] == 128 and stats["truncated"] == 10


def test_split_is_deterministic_order_free_and_leak_free():
    records = [
        {"messages": [{"role": "user", "content": f"q{i % 90}"}, {"role": "assistant", "content": "a"}]}
        for i in range(100)
    ]  # 10 exact duplicates
    splits, removed = split_records(records, seed=3)
    assert removed == 10 and sum(len(v) for v in splits.values()) == 90
    assert (len(splits["train"]), len(splits["val"]), len(splits["test"])) == (72, 9, 9)
    again, _ = split_records(list(reversed(records)), seed=3)
    assert {k: [record_key(r) for r in v] for k, v in splits.items()} == {
        k: [record_key(r) for r in v] for k, v in again.items()
    }
    keys = {k: {record_key(r) for r in v} for k, v in splits.items()}
    assert (
        not (keys["train"] & keys["val"])
        and not (keys["train"] & keys["test"])
        and not (keys["val"] & keys["test"])
    )
    other, _ = split_records(records, seed=4)
    assert [record_key(r) for r in other["test"]] != [record_key(r) for r in splits["test"]]


def test_canonical_keeps_ids():
    assert to_canonical(dict(OK, id="row-7"))["id"] == "row-7"


def test_keys_and_mixing_do_not_depend_on_where_the_checkout_lives(tmp_path):
    import shutil

    from course_utils.paths import course_root
    from course_utils.receipts import DEFAULT_DIR, load_local

    rows = load_local("val")[:20]
    copy = tmp_path / "elsewhere"
    shutil.copytree(course_root() / DEFAULT_DIR, copy)
    moved = load_local("val", copy)[:20]
    assert [record_key(r) for r in rows] == [record_key(r) for r in moved]
    from course_utils.receipts import mix_modalities

    assert [bool(r["images"]) for r in mix_modalities(rows, 0.5, 0)] == [
        bool(r["images"]) for r in mix_modalities(moved, 0.5, 0)
    ]
    splits_a, _ = split_records(rows, seed=1)
    splits_b, _ = split_records(moved, seed=1)
    assert [r["id"] for r in splits_a["test"]] == [r["id"] for r in splits_b["test"]]


def test_write_jsonl_leaves_no_temporary_file_when_a_row_fails(tmp_path):
    from course_utils.data import write_jsonl

    rows = [{"messages": [{"role": "user", "content": "hi"}]}, {"messages": object()}]
    with pytest.raises(TypeError):
        write_jsonl(rows, tmp_path / "out.jsonl")
    assert list(tmp_path.iterdir()) == []  # neither the output nor a half-written temporary file


# --- labels on Small 4's format (v15: tool results, [THINK] traces) -------------------------------

RATE_TOOL = {
    "type": "function",
    "function": {
        "name": "get_rate",
        "description": "Exchange rate to USD",
        "parameters": {"type": "object", "properties": {"c": {"type": "string"}}, "required": ["c"]},
    },
}


def _call(call_id, currency):
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": "get_rate", "arguments": json.dumps({"c": currency})},
    }


TOOL_AND_THINKING = [
    {"role": "system", "content": "You convert receipts."},
    {"role": "user", "content": "Total in USD?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [_call("abc123def", "EUR"), _call("abc123deg", "GBP")],
    },
    {"role": "tool", "tool_call_id": "abc123def", "content": "1.1"},
    {"role": "tool", "tool_call_id": "abc123deg", "content": "1.3"},
    {"role": "assistant", "reasoning_content": "7 EUR at 1.1", "content": "It is 7.70 USD."},
    {"role": "user", "content": "Thanks"},
    {
        "role": "assistant",
        "content": [{"type": "thinking", "thinking": "be brief"}, {"type": "text", "text": "ok"}],
    },
]


@pytest.fixture(scope="module")
def small4_processor(stand_in_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(stand_in_dir / "tiny-mistral-small-4")


def _flat(value):
    value = value.tolist() if hasattr(value, "tolist") else value
    return value[0] if value and isinstance(value[0], list) else value


def test_control_ids_are_the_stand_ins_tokenizers_ids(processor, small4_processor):
    from course_utils.data import CONTROL_IDS, THINK_END_ID, THINK_ID, check_control_ids

    small4 = small4_processor.tokenizer
    assert {name: small4.convert_tokens_to_ids(name) for name in CONTROL_IDS} == CONTROL_IDS
    v7 = processor.tokenizer  # Small 3.x: no [THINK] yet, the rest at the same ids
    assert {n: v7.convert_tokens_to_ids(n) for n in CONTROL_IDS if n not in ("[THINK]", "[/THINK]")} == {
        n: i for n, i in CONTROL_IDS.items() if i not in (THINK_ID, THINK_END_ID)
    }
    check_control_ids(small4)
    check_control_ids(v7)


def test_a_tokenizer_with_other_control_ids_is_refused_in_one_line():
    from course_utils.data import check_control_ids

    class Shifted:
        unk_token = "<unk>"

        def convert_tokens_to_ids(self, token):
            return {"<unk>": 0, "[/INST]": 32001}.get(token, 0)

    with pytest.raises(ValueError, match=r"^tokenizer Shifted: \[/INST\] is id 32001, the labels expect 4 "):
        check_control_ids(Shifted())


def test_small_4_labels_equal_the_templates_generation_mask_with_tools_and_thinking(small4_processor):
    out = small4_processor.apply_chat_template(
        TOOL_AND_THINKING,
        tools=[RATE_TOOL],
        reasoning_effort="high",
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    ids, mask = _flat(out["input_ids"]), _flat(out["assistant_masks"])
    assert response_only_labels(ids) == [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]
    trained = small4_processor.tokenizer.decode([t for t in response_only_labels(ids) if t != IGNORE_INDEX])
    assert "It is 7.70 USD.</s>" in trained  # the reply after the tool results
    assert "1.3" not in trained and "Thanks" not in trained and "reasoning_effort" not in trained


def test_train_on_thinking_false_leaves_the_trace_as_context(small4_processor):
    ids = _flat(
        small4_processor.apply_chat_template(
            TOOL_AND_THINKING, tools=[RATE_TOOL], tokenize=True, return_dict=True
        )["input_ids"]
    )
    with_trace, without = response_only_labels(ids), response_only_labels(ids, train_on_thinking=False)
    decode = small4_processor.tokenizer.decode
    assert "[THINK]7 EUR at 1.1[/THINK]It is 7.70 USD.</s>" in decode(
        [t for t in with_trace if t != IGNORE_INDEX]
    )
    assert decode([t for t in without if t != IGNORE_INDEX]) == (
        '[TOOL_CALLS]get_rate[ARGS]{"c": "EUR"}[TOOL_CALLS]get_rate[ARGS]{"c": "GBP"}</s>'
        "It is 7.70 USD.</s>ok</s>"
    )
    # only the trace changed: every other position is labelled the same
    differ = [i for i, (a, b) in enumerate(zip(with_trace, without)) if a != b]
    assert differ and all(without[i] == IGNORE_INDEX for i in differ)


def test_tokenize_record_passes_train_on_thinking_and_weights_map_to_turns(small4_processor):
    record = {"messages": TOOL_AND_THINKING, "tools": [RATE_TOOL]}
    full = tokenize_record(record, small4_processor)
    answer_only = tokenize_record(record, small4_processor, train_on_thinking=False)
    count = lambda ex: sum(label != IGNORE_INDEX for label in ex["labels"])  # noqa: E731
    assert count(answer_only) < count(full)
    # three assistant turns, three trained spans: a weight-0 tool call is context, the rest still trained
    weighted = [dict(m) for m in TOOL_AND_THINKING]
    weighted[2]["weight"] = 0
    calls_as_context = tokenize_record({"messages": weighted, "tools": [RATE_TOOL]}, small4_processor)
    trained = small4_processor.tokenizer.decode([t for t in calls_as_context["labels"] if t != IGNORE_INDEX])
    assert "[TOOL_CALLS]" not in trained and "It is 7.70 USD.</s>" in trained
