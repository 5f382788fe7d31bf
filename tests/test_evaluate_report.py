"""Base-vs-tuned comparison, the saved report, the LLM judge's prompt/parsing/client, lm-eval commands."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from course_utils.evaluate import (
    JudgeParseError,
    compare,
    example_f1,
    judge_messages,
    judge_summary,
    llm_judge,
    lm_eval_command,
    parse_judge,
    save_report,
)
from course_utils.receipts import RECEIPT_SCHEMA
from course_utils.widgets import render_example

GOLD = {
    "merchant": "Café Nord",
    "date": "2024-02-01",
    "currency": "EUR",
    "items": [{"name": "Tea", "qty": 2, "unit_price": 1.5}],
    "subtotal": 3.0,
    "tax": 0.57,
    "total": 3.57,
}
HALF = dict(GOLD, merchant="Other", date="2023-01-01", tax=9.0)  # 7 facts, 4 right


def test_example_f1_by_hand():
    assert example_f1(json.dumps(GOLD), GOLD) == 1.0
    assert example_f1("no json here", GOLD) == 0.0
    assert example_f1(json.dumps(HALF), GOLD) == pytest.approx(4 / 7, abs=1e-4)


def test_compare_base_vs_tuned_table_worst_and_fields():
    targets = [GOLD, GOLD, GOLD]
    base = ["I cannot read this.", "{broken", json.dumps(HALF)]
    tuned = [json.dumps(GOLD), json.dumps(HALF), json.dumps(GOLD)]
    c = compare({"base": base, "tuned": tuned}, targets, RECEIPT_SCHEMA)
    table = {row["metric"]: row for row in c.table()}
    assert table["json_valid"]["base"] == pytest.approx(1 / 3, abs=1e-3)
    assert table["json_valid"]["tuned"] == 1.0 and table["json_valid"]["change"] == "+0.667"
    assert table["exact_match"]["tuned"] == pytest.approx(2 / 3, abs=1e-3)
    # tuned: 21 predicted, 21 expected, 18 matched → F1 = 18/21
    assert table["field_f1"]["tuned"] == pytest.approx(18 / 21, abs=1e-3)
    assert [e["index"] for e in c.worst(2, "tuned")] == [1, 0]
    assert [e["index"] for e in c.worst(2, "base")] == [0, 1]  # no JSON comes first, then by index
    fields = {row["field"]: row for row in c.per_field()}
    assert fields["merchant"]["tuned"] == pytest.approx(2 / 3, abs=1e-3) and fields["merchant"]["base"] == 0.0
    assert fields["currency"]["base"] == pytest.approx(0.5, abs=1e-3)  # 1 of 1 predicted, 1 of 3 expected
    with pytest.raises(ValueError, match="one reply per target"):
        compare({"base": base[:2]}, targets)


def test_report_is_saved_atomically_and_never_overwritten(tmp_path):
    c = compare({"base": ["nope"], "tuned": [json.dumps(GOLD)]}, [GOLD], RECEIPT_SCHEMA)
    json_path, md_path = save_report(c, tmp_path / "eval", {"profile": "cpu-tiny"})
    saved = json.loads(json_path.read_text())
    assert saved["context"] == {"profile": "cpu-tiny"}
    assert (
        saved["metrics"]["tuned"]["json_valid"] == 1.0 and saved["examples"][0]["replies"]["base"] == "nope"
    )
    text = md_path.read_text()
    assert "| json_valid | 0.0 | 1.0 | +1.000 |" in text and "**profile**: cpu-tiny" in text
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_report(c, tmp_path / "eval")
    assert json.loads(json_path.read_text()) == saved
    save_report(compare({"base": ["x"], "tuned": ["y"]}, [GOLD]), tmp_path / "eval", overwrite=True)
    assert json.loads(json_path.read_text())["metrics"]["tuned"]["json_valid"] == 0.0
    assert not [p for p in (tmp_path / "eval").iterdir() if p.name.startswith(".")]


def test_viewer_text_shows_expected_and_each_reply():
    c = compare({"base": ["nope"], "tuned": [json.dumps(GOLD)]}, [GOLD])
    text = render_example(c.examples[0], "data/receipts/images/x.png")
    assert "image data/receipts/images/x.png" in text and "base (no JSON, F1 0.00): nope" in text
    assert "tuned (JSON, F1 1.00)" in text and "Café Nord" in text


@pytest.mark.parametrize(
    "reply, expected",
    [
        ('{"score": 4, "reason": "total wrong"}', {"score": 4, "reason": "total wrong"}),
        ('```json\n{"score": "5", "reason": "all right"}\n```', {"score": 5, "reason": "all right"}),
        (
            'Sure! {"score": 2.0, "reason": "values invented"} Hope that helps.',
            {"score": 2, "reason": "values invented"},
        ),
        (
            "Score: 3 - merchant and total right",
            {"score": 3, "reason": "Score: 3 - merchant and total right"},
        ),
        ("Score: 4.0 - good", {"score": 4, "reason": "Score: 4.0 - good"}),  # as {"score": 4.0} is
    ],
)
def test_judge_replies_parse(reply, expected):
    assert parse_judge(reply) == expected


@pytest.mark.parametrize(
    "reply",
    [
        '{"score": 7}',
        '{"score": 3.5}',
        '{"score": "high"}',
        "I think it's fine",
        "",
        '{"score": true, "reason": "ok"}',  # a bool is not a score (True == 1 in Python)
        "Score: 4.5 - nearly all right",  # read as 4 before
        "score: 35",
    ],
)
def test_bad_judge_replies_are_refused(reply):
    with pytest.raises(JudgeParseError):
        parse_judge(reply)


def test_judge_prompt_holds_reference_and_reply():
    messages = judge_messages(GOLD, '{"merchant": "X"}')
    assert [m["role"] for m in messages] == ["system", "user"]
    assert json.dumps(GOLD, ensure_ascii=False) in messages[1]["content"]
    assert (
        '{"merchant": "X"}' in messages[1]["content"] and '"score": <integer 1-5>' in messages[1]["content"]
    )
    assert "(empty)" in judge_messages(GOLD, "  ")[1]["content"]


class _FakeJudge(BaseHTTPRequestHandler):
    """An OpenAI-compatible /v1/chat/completions that grades by a word in the reply (a test double)."""

    seen: list = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _FakeJudge.seen.append((self.path, self.headers.get("Authorization"), body))
        prompt = body["messages"][-1]["content"]
        content = (
            '{"score": 5, "reason": "ok"}'
            if "GOOD" in prompt
            else "I refuse to grade"
            if "WEIRD" in prompt
            else '{"score": 1, "reason": "bad"}'
        )
        if "CRASH" in prompt:
            self.send_response(500)
            self.end_headers()
            return
        payload = json.dumps(
            {
                "id": "x",
                "object": "chat.completion",
                "created": 0,
                "model": body["model"],
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": "stop",
                        "message": {"role": "assistant", "content": content},
                    }
                ],
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


def test_llm_judge_talks_openai_protocol_and_keeps_failures(monkeypatch):
    monkeypatch.setenv("JUDGE_API_KEY", "secret-key")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeJudge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        pairs = [(GOLD, "GOOD"), (GOLD, "bad"), (GOLD, "WEIRD"), (GOLD, "CRASH")]
        results = llm_judge(pairs, f"http://127.0.0.1:{server.server_port}/v1", "judge-model", progress=False)
    finally:
        server.shutdown()
        server.server_close()
    assert [r["score"] for r in results] == [5, 1, None, None]
    assert "JudgeParseError" in results[2]["error"] and results[3]["error"]
    assert judge_summary(results) == {"mean_score": 3.0, "scored": 2, "failed": 2}
    path, auth, body = _FakeJudge.seen[0]
    assert path == "/v1/chat/completions" and auth == "Bearer secret-key"
    assert body["model"] == "judge-model" and body["temperature"] == 0.0


def test_lm_eval_commands_per_backend():
    hf = lm_eval_command("mistralai/Ministral-8B-Instruct-2410", adapter="outputs/adapters/x", limit=50)
    assert hf[:4] == ["lm-eval", "run", "--model", "hf"]
    assert (
        hf[hf.index("--model_args") + 1]
        == "pretrained=mistralai/Ministral-8B-Instruct-2410,dtype=bfloat16,peft=outputs/adapters/x"
    )
    assert (
        hf[hf.index("--tasks") + 1] == "mmlu,gsm8k"
        and "--fewshot_as_multiturn" in hf
        and hf[-2:] == ["--limit", "50"]
    )
    vllm = lm_eval_command("merged", backend="vllm", num_fewshot=0)
    assert "--fewshot_as_multiturn" not in vllm and "enable_lora" not in vllm[vllm.index("--model_args") + 1]
    api = lm_eval_command(
        "receipts",
        backend="local-chat-completions",
        num_fewshot=None,
        base_url="http://127.0.0.1:8080/v1/chat/completions",
    )
    assert "base_url=http://127.0.0.1:8080/v1/chat/completions" in api[api.index("--model_args") + 1]
    assert "--num_fewshot" not in api
    with pytest.raises(ValueError, match="base_url"):
        lm_eval_command("x", backend="local-chat-completions")
    with pytest.raises(ValueError, match="choose"):
        lm_eval_command("x", backend="ollama")


def test_outcomes_bucket_every_reply():
    bad_schema = json.dumps({"merchant": "Café Nord"})  # valid JSON, misses required fields
    c = compare(
        {
            "tuned": [
                "nothing",
                bad_schema,
                json.dumps(HALF),
                json.dumps(dict(HALF, merchant="Café Nord")),
                json.dumps(GOLD),
            ]
        },
        [GOLD] * 5,
        RECEIPT_SCHEMA,
    )
    assert [e["outcome"]["tuned"] for e in c.examples] == [
        "no JSON",
        "schema error",
        "partly right",
        "partly right",
        "all right",
    ]
    counts = {row["outcome"]: row["tuned"] for row in c.outcomes()}
    assert counts == {"no JSON": 1, "schema error": 1, "wrong values": 0, "partly right": 2, "all right": 1}
    wrong = json.dumps(
        dict(GOLD, merchant="X", date="2020-01-01", currency="USD", subtotal=1, tax=1, total=1)
    )
    assert compare({"m": [wrong]}, [GOLD], RECEIPT_SCHEMA).examples[0]["outcome"]["m"] == "wrong values"


def test_saved_adapter_loads_and_switches_off_to_the_exact_base(stand_in_dir, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model

    from course_utils.evaluate import adapter_effect, load_tuned
    from course_utils.models import load
    from course_utils.receipts import load_local
    from course_utils.train import LANGUAGE_TARGETS

    rows = load_local("val")[:2]
    trained = get_peft_model(
        load("cpu-tiny", stand_in_dir=stand_in_dir).model, LoraConfig(r=4, target_modules=LANGUAGE_TARGETS)
    )
    with torch.no_grad():
        for name, param in trained.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)  # what training does: B leaves zero
    trained.save_pretrained(tmp_path / "adapter")

    loaded = load("cpu-tiny", stand_in_dir=stand_in_dir)
    ids = loaded.processor.tokenizer("[INST]hi[/INST]", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        reference = loaded.model(input_ids=ids).logits
    tuned = load_tuned(loaded.model, tmp_path / "adapter")
    assert adapter_effect(tuned, loaded.processor, rows) > 0.01
    with torch.no_grad(), tuned.disable_adapter():
        assert torch.equal(tuned(input_ids=ids).logits, reference)


def test_lesson_splits_rebuild_when_lesson_03_did_not_run(tmp_path, monkeypatch):
    from course_utils.data import write_jsonl
    from course_utils.receipts import lesson_splits

    monkeypatch.setenv("COURSE_OUTPUTS", str(tmp_path))
    train, val, test, message = lesson_splits("cpu-tiny")
    assert "rebuilt" in message and (len(train), len(val), len(test)) == (600, 100, 100)
    assert 0 < sum(bool(r.get("images")) for r in test) < 100  # mixed image and text rows
    for name, rows in (("train", train[:3]), ("val", val[:2]), ("test", test[:1])):
        write_jsonl(rows, tmp_path / "cpu-tiny" / "data" / f"{name}.jsonl")
    train2, val2, test2, message2 = lesson_splits("cpu-tiny")
    assert "lesson 03" in message2 and (len(train2), len(val2), len(test2)) == (3, 2, 1)


def test_a_fresh_adapter_beside_the_tuned_one_is_a_no_op_and_leaves_no_trace(stand_in_dir, tmp_path):
    """Lesson 05's no-op check adds a second adapter to the same model instead of loading a second
    model (which does not fit beside a 24B model on a 24 GB or even an 80 GB card)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from course_utils.evaluate import adapter_effect, load_tuned
    from course_utils.models import load
    from course_utils.receipts import load_local
    from course_utils.train import LANGUAGE_TARGETS

    rows = load_local("val")[:2]
    config = LoraConfig(
        r=4, target_modules=LANGUAGE_TARGETS, trainable_token_indices={"embed_tokens": [5, 7]}
    )
    trained = get_peft_model(load("cpu-tiny", stand_in_dir=stand_in_dir).model, config)
    with torch.no_grad():
        for name, param in trained.named_parameters():
            if "lora_B" in name or "trainable_tokens_delta" in name:
                param.normal_(0, 0.05)
    trained.save_pretrained(tmp_path / "adapter")

    loaded = load("cpu-tiny", stand_in_dir=stand_in_dir)
    tuned = load_tuned(loaded.model, tmp_path / "adapter")
    parameters = sum(p.numel() for p in tuned.parameters())
    tuned.add_adapter("fresh", LoraConfig(r=16, target_modules=LANGUAGE_TARGETS))
    tuned.set_adapter("fresh")
    assert adapter_effect(tuned, loaded.processor, rows) == 0.0
    tuned.set_adapter("default")
    assert adapter_effect(tuned, loaded.processor, rows) > 0.01
    tuned.delete_adapter("fresh")
    assert tuned.active_adapter == "default" and sum(p.numel() for p in tuned.parameters()) == parameters


def test_a_reply_holding_a_code_fence_stays_inside_its_block_in_the_report():
    from course_utils.evaluate import compare

    fenced = 'Sure:\n```json\n{"total": 1}\n```\nDone.'
    report = compare({"base": [fenced]}, [{"total": 2}]).markdown(worst=1)
    block = report[report.index("base (F1") :]
    opener = block.splitlines()[2]
    assert opener.startswith("````") and block.count(opener) == 2  # one opening, one closing fence
    assert "Done." in block[: block.rindex(opener)]  # the whole reply is inside the block


def test_names_match_across_unicode_forms():
    from course_utils.evaluate import normalize_text

    assert normalize_text("Cafe\u0301 Nord") == normalize_text("Café Nord")  # NFD vs NFC
